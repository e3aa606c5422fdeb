"""bpnp: the Perspective-n-Point solver as a differentiable PyTorch layer.

Forward: a batched, global, float64-accurate weighted PnP solve. Backward: exact gradients by
the implicit function theorem (Chen et al., "End-to-End Learnable Geometric Vision by
Backpropagating PnP Optimization", CVPR 2020).
"""
from .checks import PnPInputError
from .geometry import (
    project,
    project_points,
    rotmat_to_rvec,
    rvec_to_rotmat,
    transform_points,
)
from .layer import BPnP, PnPConvergenceWarning, PnPResult, solve_pnp

__version__ = "0.1.0"

__all__ = [
    "BPnP",
    "PnPConvergenceWarning",
    "PnPInputError",
    "PnPResult",
    "project",
    "project_points",
    "rotmat_to_rvec",
    "rvec_to_rotmat",
    "solve_pnp",
    "transform_points",
]
