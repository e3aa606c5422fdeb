"""Checks of the layer used by the tests, the demo and the benchmarks: finite-difference
gradients, and the count of tensor operations a call launches.

Central differences of fully converged solves; all perturbed copies of a batch are solved as
one batch, so a check costs a single batched solve per input.
"""

from __future__ import annotations

import torch

from .layer import solve_pnp
from .options import SolverOptions

__all__ = [
    "STEPS",
    "loss_weights",
    "fd_gradient",
    "analytic_gradient",
    "EXHAUSTIVE",
    "best_known_minimum",
    "count_launches",
]

STEPS = {"x2d": 1e-3, "x3d": 1e-5, "K": 1e-3, "weights": 1e-5}


def loss_weights(B: int, seed: int = 0) -> torch.Tensor:
    """Random ``(B, 6)`` float64 weights of the test loss ``sum(v * pose)``."""
    return torch.randn(B, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def fd_gradient(inputs: dict, name: str, v: torch.Tensor, mask: torch.Tensor | None = None, **solve_kw) -> torch.Tensor:
    """d(sum v * pose)/d inputs[name] by central differences of fully converged solves.

    inputs: x2d (B,n,2), x3d (n,3)|(B,n,3), K (3,3)|(B,3,3), weights (n,)|(B,n); float64.
    The 2m perturbed copies of the whole batch are solved as one batch of 2m*B problems.
    solve_kw: extra options of :func:`~bpnp.solve_pnp` (e.g. ``backend``).
    """
    x = inputs[name]
    h = STEPS[name]
    active = torch.ones(x.numel(), dtype=torch.bool) if mask is None else mask.reshape(-1) > 0
    eye = torch.eye(x.numel(), dtype=x.dtype)[active].reshape(-1, *x.shape)
    m = eye.shape[0]
    copies = torch.cat([x + h * eye, x - h * eye], 0)  # 2m x shape
    B, n, _ = inputs["x2d"].shape
    C = 2 * m
    batched = {}
    for key, val in inputs.items():
        val = copies if key == name else val.expand(C, *val.shape)
        per_item = {"x2d": 3, "x3d": 3, "K": 3, "weights": 2}[key]
        if val.dim() - 1 < per_item:  # shared across the batch: give each item its copy
            val = val.unsqueeze(1).expand(C, B, *val.shape[1:])
        batched[key] = val.reshape(C * B, *val.shape[2:])
    pose = solve_pnp(batched["x2d"], batched["x3d"], batched["K"], batched["weights"], warn=False, **solve_kw).pose
    loss = (pose.reshape(C, B, 6) * v).sum((1, 2))
    grad = torch.zeros(x.numel(), dtype=x.dtype)
    grad[active] = (loss[:m] - loss[m:]) / (2 * h)
    return grad.reshape(x.shape)


def analytic_gradient(inputs: dict, name: str, v: torch.Tensor, **solve_kw) -> torch.Tensor:
    """d(sum v * pose)/d inputs[name] by the layer's backward (``solve_kw`` as in fd_gradient)."""
    leaf = {k: (t.clone().requires_grad_(k == name)) for k, t in inputs.items()}
    pose = solve_pnp(leaf["x2d"], leaf["x3d"], leaf["K"], leaf["weights"], warn=False, **solve_kw).pose
    (g,) = torch.autograd.grad((pose * v).sum(), [leaf[name]])
    return g


#: The solver with every shortcut off: all 9 eigenvector starts (+ the tetrahedral ones for every
#: problem), every distinct candidate refined to convergence, no screening.
EXHAUSTIVE = SolverOptions(num_candidates=9)._tuned(
    object_ratio=0.0, screen_iter=0, num_eigvecs=9, solid_eigvecs=9, thin_ratio=1.0
)


def best_known_minimum(
    x2d: torch.Tensor, x3d: torch.Tensor, K: torch.Tensor, weights: torch.Tensor, random_starts: int = 64, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The lowest-cost valid minimum (every weighted point in front of the camera) found from many
    polished starts: the exhaustive global solve, OpenCV's SQPNP/ITERATIVE/EPNP/IPPE answers (when
    OpenCV is installed) and ``random_starts`` random rotations with the object on its mean ray.

    Args:
        x2d: ``(B, n, 2)``; x3d: ``(B, n, 3)``; K: ``(B, 3, 3)``; weights: ``(B, n)``; float64 CPU.
    Returns:
        ``cost (B,)`` (inf where no valid minimum was found) and ``pose (B, 6)``.
    """
    from .geometry import rotmat_to_rvec, rvec_to_rotmat
    from .normalise import normalise_problem, pose_from_normalised
    from .solvers.candidates import normalised_rays
    from .solvers.pnp import refine
    from .synthetic import random_rotations

    B, n, _ = x2d.shape
    x2d_n, x3d_n, K_n, w_n, norm = normalise_problem(x2d, x3d, K, weights)
    x3d_n, K_n, w_n = x3d_n.expand(B, n, 3), K_n.expand(B, 3, 3), w_n.expand(B, n)
    starts_R, starts_t = [], []
    res = solve_pnp(x2d, x3d, K, weights, options=EXHAUSTIVE, warn=False, backend="torch")
    R0 = res.R
    starts_R.append(R0)
    starts_t.append((res.t + (R0 @ norm.centre.expand(B, 3)[..., None])[..., 0]) / norm.scale)
    try:
        from .solvers.opencv import OPENCV_FLAGS, opencv_poses

        for flag in OPENCV_FLAGS:
            rvec, t = opencv_poses(x2d, x3d, K, flag)
            ok = torch.isfinite(rvec).all(-1) & torch.isfinite(t).all(-1)
            R = rvec_to_rotmat(torch.where(ok[:, None], rvec, torch.zeros_like(rvec)))
            t_n = (t + (R @ norm.centre.expand(B, 3)[..., None])[..., 0]) / norm.scale
            starts_R.append(R)
            starts_t.append(torch.where(ok[:, None], t_n, starts_t[0]))
    except Exception:  # OpenCV missing: the other starts remain
        pass
    g = torch.Generator().manual_seed(seed)
    rays = normalised_rays(x2d_n, K_n)
    mean_ray = (w_n[..., None] * rays).sum(1) / w_n.sum(-1, keepdim=True)
    spread = (w_n * (rays - mean_ray[:, None]).pow(2).sum(-1)).sum(-1).div(w_n.sum(-1)).sqrt()
    t_guess = mean_ray / spread.clamp_min(1e-12)[:, None]
    for _ in range(random_starts):
        starts_R.append(rvec_to_rotmat(random_rotations(B, g)))
        starts_t.append(t_guess)
    S = len(starts_R)
    R_all = torch.stack(starts_R, 1).reshape(B * S, 3, 3)
    t_all = torch.stack(starts_t, 1).reshape(B * S, 3)

    def rep(x):
        return x[:, None].expand(B, S, *x.shape[1:]).reshape(B * S, *x.shape[1:])

    out = refine(R_all, t_all, rep(x2d_n), rep(x3d_n), rep(K_n), rep(w_n), EXHAUSTIVE, max_iter=300)
    cost = torch.nan_to_num(out.cost, nan=float("inf")).reshape(B, S)
    best = cost.argmin(-1)
    idx = torch.arange(B) * S + best
    R, t_n = out.state[0][idx], out.state[1][idx]
    pose_n = torch.cat([rotmat_to_rvec(R), t_n], -1)
    pose = pose_from_normalised(pose_n, R, norm)
    return cost.gather(1, best[:, None])[:, 0] * norm.weight[:, 0] * norm.focal[:, 0] ** 2, pose


#: ATen operations that launch no kernel of their own: views and metadata (``_unsafe_view`` is the
#: view ``matmul`` returns), and ``scalar_tensor``, the host scalar a Python number becomes when it is
#: an operand (``torch.where(mask, x, 0.0)``).
NOT_LAUNCHES = frozenset(
    "aten::" + name
    for name in (
        "view", "reshape", "expand", "select", "slice", "empty", "as_strided", "detach", "alias", "unsqueeze",
        "squeeze", "permute", "transpose", "t", "empty_like", "empty_strided", "unbind", "split", "narrow",
        "_reshape_alias", "lift_fresh", "resolve_conj", "resolve_neg", "expand_as", "view_as", "diagonal",
        "unflatten", "flatten", "contiguous", "to", "result_type", "split_with_sizes", "chunk", "lift",
        "_unsafe_view", "scalar_tensor",
    )
)  # fmt: skip

#: ATen operations that wait for the device (a host read of a device value).
SYNCS = frozenset({"aten::_local_scalar_dense", "aten::nonzero", "aten::is_nonzero", "aten::item"})


def count_launches(fn) -> tuple[int, int]:
    """``(launches, syncs)`` of one call of ``fn`` (after a warm-up call), counted with
    :mod:`torch.profiler`: every ``aten::`` event without an ``aten::`` child that is not a view
    or metadata is one kernel launch on a GPU (inside custom ops too); syncs are host reads of
    device values (``.item()``, ``bool(t)``, ``nonzero``). Exact, unlike a time.
    """
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    launches = syncs = 0
    for event in prof.events():
        if not event.name.startswith("aten::") or any(c.name.startswith("aten::") for c in event.cpu_children):
            continue
        launches += event.name not in NOT_LAUNCHES
        syncs += event.name in SYNCS
    return launches, syncs
