"""bpnp: the Perspective-n-Point solver as a differentiable PyTorch layer.

Forward: a batched, global, float64-accurate weighted PnP solve. Backward: exact gradients by
the implicit function theorem (Chen et al., "End-to-End Learnable Geometric Vision by
Backpropagating PnP Optimization", CVPR 2020).
"""

from . import interop, metrics
from ._version import __version__
from .errors import BackendUnavailableError, NativeSolverWarning, PnPConvergenceWarning, PnPInputError
from .geometry import (
    distort,
    project,
    project_jacobian,
    project_points,
    rotmat_to_rvec,
    rvec_to_rotmat,
    transform_points,
    undistort,
)
from .layer import BPnP, solve_pnp
from .options import RansacOptions, SolverOptions
from .result import PnPResult

__all__ = [
    "BPnP",
    "BackendUnavailableError",
    "NativeSolverWarning",
    "PnPConvergenceWarning",
    "PnPInputError",
    "PnPResult",
    "project",
    "project_jacobian",
    "project_points",
    "rotmat_to_rvec",
    "rvec_to_rotmat",
    "SolverOptions",
    "RansacOptions",
    "solve_pnp",
    "transform_points",
    "distort",
    "undistort",
    "interop",
    "metrics",
    "__version__",
]
