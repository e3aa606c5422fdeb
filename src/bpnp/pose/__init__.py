"""Object pose estimation through the PnP layer: meshes, rendering, BOP data, a keypoint heatmap
network, training and evaluation.

The pieces are importable on their own (``bpnp.pose.model.KeypointHeatmapNet``,
``bpnp.pose.model.soft_argmax``, ``bpnp.losses.BPnPReprojectionLoss``, ``bpnp.metrics``); the
``bpnp render`` / ``bpnp train`` / ``bpnp evaluate`` commands are thin over
:mod:`bpnp.pose.data`, :mod:`bpnp.pose.train` and :mod:`bpnp.pose.evaluate`. Rendering needs the
``pose`` extra (``moderngl``, ``trimesh``) and an OpenGL driver (Mesa's EGL works headless).

Units: millimetres for poses and models (as BOP), pixels for images, OpenCV camera convention.
"""
