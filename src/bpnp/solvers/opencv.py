"""OpenCV backend (comparison only): ``cv2.solvePnP`` per item, then our exact LM polish.

OpenCV has no per-point weights, so its answer is a start that our weighted LM refines; the
loop over the batch runs on the host.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..errors import BackendUnavailableError
from ..geometry import rvec_to_rotmat
from ..options import SolverOptions
from .pnp import PnPSolution, _finish, refine

OPENCV_FLAGS = ("SQPNP", "ITERATIVE", "EPNP", "IPPE")


def _cv2():
    try:
        import cv2
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise BackendUnavailableError("method='opencv' needs OpenCV: pip install 'bpnp[opencv]'") from err
    return cv2


def opencv_poses(x2d: Tensor, x3d: Tensor, K: Tensor, flag: str = "SQPNP") -> tuple[Tensor, Tensor]:
    """Raw ``cv2.solvePnP`` answers per item (no polish).

    Args:
        x2d ``(B,n,2)``, x3d ``(B|1,n,3)``, K ``(B|1,3,3)``; flag: an OpenCV SOLVEPNP_* name.
    Returns:
        ``rvec (B,3)``, ``t (B,3)`` float64; NaN rows where OpenCV failed.
    """
    cv2 = _cv2()
    B = x2d.shape[0]
    p2 = x2d.detach().cpu().double().numpy()
    p3 = x3d.detach().cpu().double().numpy()
    Ks = K.detach().cpu().double().numpy()
    Ks = Ks / Ks[:, 2:3, 2:3]
    flag_value = getattr(cv2, f"SOLVEPNP_{flag}")
    out = np.full((B, 6), np.nan)
    for i in range(B):
        try:
            ok, r, t = cv2.solvePnP(
                p3[i if p3.shape[0] > 1 else 0], p2[i], Ks[i if Ks.shape[0] > 1 else 0], None, flags=flag_value
            )
        except cv2.error:
            ok = False
        if ok:
            out[i] = np.concatenate([r.ravel(), t.ravel()])
    pose = torch.from_numpy(out).to(x2d.device)
    return pose[:, :3], pose[:, 3:]


def solve_pnp_opencv(
    x2d: Tensor, x3d: Tensor, K: Tensor, weights: Tensor, options: SolverOptions | None = None, flag: str = "SQPNP"
) -> PnPSolution:
    """OpenCV start, then weighted exact-Hessian LM: a :class:`PnPSolution`.

    ``converged`` means what it means for the global solvers (stationary, every weighted point in
    front of the camera, well-posed Hessian), and OpenCV did not fail. Of ``options`` the LM ones
    apply (the global-search ones do not: OpenCV picks the start).
    """
    options = SolverOptions() if options is None else options
    rvec, t = opencv_poses(x2d, x3d, K, flag)
    failed = ~torch.isfinite(rvec).all(-1)
    rvec = torch.where(failed[:, None], torch.zeros_like(rvec), rvec)
    t = torch.where(failed[:, None], torch.tensor([0.0, 0.0, 1.0], dtype=t.dtype, device=t.device), t)
    out = refine(rvec_to_rotmat(rvec), t, x2d, x3d, K, weights, options)
    R, t = out.state
    return _finish(R, t, out.cost, out.hess, out.converged & ~failed, out.iterations, None, options)
