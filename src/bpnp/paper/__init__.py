"""The experiments of the paper (Chen et al., CVPR 2020), runnable by anyone: learning a pose
(:mod:`.learn_pose`), 3D structure (:mod:`.learn_structure`) and camera intrinsics
(:mod:`.learn_intrinsics`) through the PnP layer, the layer demo and ``bpnp demo all``.

Applications of the library, never imported by it."""
