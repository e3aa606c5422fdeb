"""Declarative input checks: every public entry point validates before any arithmetic."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .errors import PnPInputError

__all__ = [
    "PnPInputError",
    "canonical_pnp_inputs",
    "canonical_pnp_shapes",
    "check_pnp_values",
    "check_tensor",
    "check_finite",
    "check_camera_matrix",
]


def _shape(t: Tensor) -> str:
    return str(tuple(t.shape))


def check_tensor(name: str, t: object) -> Tensor:
    if not isinstance(t, Tensor):
        raise PnPInputError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise PnPInputError(f"{name}: expected a floating-point tensor, got dtype {t.dtype}")
    return t


#: A value check: a 0-d bool tensor, True where the check fails, and the message that says so.
Problem = tuple[Tensor, Callable[[], str]]


def _raise_first(problems: Sequence[Problem]) -> None:
    """Raise the message of the first failing check. Every condition is read from the device at
    once (one host read, a GPU sync), and one by one only when something failed."""
    if not problems or not bool(torch.stack([bad for bad, _ in problems]).any()):
        return
    for bad, message in problems:
        if bool(bad):
            raise PnPInputError(message())


def _finite_problems(named: Sequence[tuple[str, Tensor | None]]) -> list[Problem]:
    return [
        (~torch.isfinite(t.detach()).all(), lambda name=name, t=t: f"{name}: contains NaN or inf (shape {_shape(t)})")
        for name, t in named
        if t is not None
    ]


def check_finite(name: str, t: Tensor) -> None:
    _raise_first(_finite_problems([(name, t)]))


def check_same_device_dtype(named: Sequence[tuple[str, Tensor]]) -> None:
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.device != first.device:
            raise PnPInputError(
                f"{name}: on device {t.device}, but {first_name} is on {first.device}; move all inputs to one device"
            )
        if t.dtype != first.dtype:
            raise PnPInputError(
                f"{name}: dtype {t.dtype}, but {first_name} has {first.dtype}; use one floating dtype for all inputs"
            )


def _camera_problems(K: Tensor) -> list[Problem]:
    K = K.detach()
    lower = torch.stack([K[..., 1, 0], K[..., 2, 0], K[..., 2, 1]], -1)
    shape = _shape(K)
    return [
        (
            (lower != 0).any(),
            lambda: f"K: expected upper-triangular camera matrices (K[1,0] = K[2,0] = K[2,1] = 0), shape {shape}",
        ),
        (
            ((K[..., 0, 0] <= 0) | (K[..., 1, 1] <= 0)).any(),
            lambda: f"K: focal lengths K[0,0] and K[1,1] must be positive, shape {shape}",
        ),
        ((K[..., 2, 2] <= 0).any(), lambda: f"K: K[2,2] must be positive (usually 1), shape {shape}"),
    ]


def check_camera_matrix(K: Tensor) -> None:
    _raise_first(_camera_problems(K))


def canonical_pnp_inputs(
    x2d: Tensor, x3d: Tensor, K: Tensor, weights: Tensor | None, init_pose: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None, bool]:
    """Check PnP inputs and bring them to batched form.

    Returns ``x2d (B,n,2), x3d (B|1,n,3), K (B|1,3,3), weights (B|1,n) or None,
    init_pose (B,6) or None, unbatched``. Only differentiable reshapes are used.
    """
    canonical = canonical_pnp_shapes(x2d, x3d, K, weights, init_pose)
    check_pnp_values(x2d, x3d, K, weights, init_pose)
    return canonical


def canonical_pnp_shapes(
    x2d: Tensor, x3d: Tensor, K: Tensor, weights: Tensor | None, init_pose: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None, bool]:
    """The checks of :func:`canonical_pnp_inputs` that read no values (types, devices, dtypes,
    shapes), and the batched form; no tensor operation but views."""
    x2d = check_tensor("x2d", x2d)
    x3d = check_tensor("x3d", x3d)
    K = check_tensor("K", K)
    named = [("x2d", x2d), ("x3d", x3d), ("K", K)]
    if weights is not None:
        named.append(("weights", check_tensor("weights", weights)))
    if init_pose is not None:
        named.append(("init_pose", check_tensor("init_pose", init_pose)))
    check_same_device_dtype(named)

    if x2d.dim() not in (2, 3) or x2d.shape[-1] != 2:
        raise PnPInputError(f"x2d: expected shape (B, n, 2) or (n, 2), got {_shape(x2d)}")
    unbatched = x2d.dim() == 2
    if unbatched:
        x2d = x2d[None]
    B, n, _ = x2d.shape
    if n < 4:
        raise PnPInputError(f"x2d: PnP needs at least 4 points, got n = {n} (shape {_shape(x2d)})")
    if x3d.dim() not in (2, 3) or x3d.shape[-1] != 3:
        raise PnPInputError(f"x3d: expected shape (n, 3) or (B, n, 3), got {_shape(x3d)}")
    if x3d.dim() == 3 and unbatched:
        raise PnPInputError(f"x3d: expected shape ({n}, 3) for unbatched x2d, got {_shape(x3d)}")
    x3d_b = x3d if x3d.dim() == 3 else x3d[None]
    if x3d_b.shape[1] != n or x3d_b.shape[0] not in (1, B) or (x3d.dim() == 3 and x3d.shape[0] != B):
        raise PnPInputError(
            f"x3d: expected shape ({n}, 3) or ({B}, {n}, 3) to match x2d {_shape(x2d)}, got {_shape(x3d)}"
        )
    if K.dim() not in (2, 3) or K.shape[-2:] != (3, 3):
        raise PnPInputError(f"K: expected shape (3, 3) or (B, 3, 3), got {_shape(K)}")
    if K.dim() == 3 and (K.shape[0] != B or unbatched):
        raise PnPInputError(f"K: expected shape (3, 3) or ({B}, 3, 3), got {_shape(K)}")
    K_b = K if K.dim() == 3 else K[None]
    w_b = None
    if weights is not None:
        if weights.dim() == 1 and weights.shape[0] == n:
            w_b = weights[None]
        elif weights.dim() == 2 and weights.shape == (B, n) and not unbatched:
            w_b = weights
        else:
            raise PnPInputError(f"weights: expected shape ({n},) or ({B}, {n}), got {_shape(weights)}")
    pose_b = None
    if init_pose is not None:
        expected = (6,) if unbatched else (B, 6)
        if tuple(init_pose.shape) != expected:
            raise PnPInputError(f"init_pose: expected shape {expected}, got {_shape(init_pose)}")
        pose_b = init_pose[None] if unbatched else init_pose
    return x2d, x3d_b, K_b, w_b, pose_b, unbatched


def check_pnp_values(x2d: Tensor, x3d: Tensor, K: Tensor, weights: Tensor | None, init_pose: Tensor | None) -> None:
    """The checks of :func:`canonical_pnp_inputs` on the values (the inputs as given, batched or
    not): finite, K upper triangular with a positive diagonal, weights non-negative with 4
    positive per item. One host read of a device value when all pass (each check reading its own
    would be a GPU sync each)."""
    named = [("x2d", x2d), ("x3d", x3d), ("K", K), ("weights", weights), ("init_pose", init_pose)]
    problems = _finite_problems(named) + _camera_problems(K)
    if weights is not None:
        w = weights.detach()
        problems += [
            ((w < 0).any(), lambda: f"weights: must be non-negative, got a minimum of {float(w.min()):.3g}"),
            (
                ((w > 0).sum(-1) < 4).any(),
                lambda: "weights: every problem needs at least 4 points with positive weight",
            ),
        ]
    _raise_first(problems)
