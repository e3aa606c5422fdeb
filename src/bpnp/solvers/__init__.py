"""Forward solvers (no autograd): global initialisation, LM refinement, OpenCV backend."""

from .pnp import PnPSolution, refine, solve_pnp_forward

__all__ = ["PnPSolution", "refine", "solve_pnp_forward"]
