"""The library's documented error and warning types."""

from __future__ import annotations

__all__ = ["PnPInputError", "BackendUnavailableError", "PnPConvergenceWarning", "NativeSolverWarning"]


class PnPInputError(ValueError):
    """Bad input to a bpnp function: the message names the argument, its shape and the rule."""


class BackendUnavailableError(RuntimeError):
    """The requested forward solver cannot run here (e.g. ``backend="native"`` without the
    compiled library, or on a non-CPU tensor; ``method="opencv"`` without OpenCV)."""


class PnPConvergenceWarning(RuntimeWarning):
    """Some items of a batch did not reach a well-posed optimum (see ``PnPResult.converged``)."""


class NativeSolverWarning(RuntimeWarning):
    """The compiled CPU solver is not available (named cause); the torch solver runs instead."""
