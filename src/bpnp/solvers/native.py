"""The native CPU forward: ``native_pnp.c``, compiled when the package is built, called through ctypes.

The C file is the torch solver's algorithm (:mod:`bpnp.solvers.init`, :mod:`~bpnp.solvers.lm`,
:mod:`~bpnp.solvers.pnp`) per problem, with threads over the batch: on the CPU it removes the
eager-dispatch overhead and the memory traffic of batched temporaries, which dominate there.

``pip install .`` / ``pip install -e .`` / ``python -m build --wheel`` compile it (``setup.py``)
into ``bpnp/solvers/_native_pnp_omp*.so`` (OpenMP over the batch, on PyTorch's workers) and
``_native_pnp*.so`` (plain pthreads, used where OpenMP is missing and in a ``fork()``-ed child of
a process whose OpenMP pool is up). Nothing is compiled at run time. Where the build had no C
compiler, :func:`native_available` is False, the reason is in :func:`native_unavailable_reason`,
``backend="auto"`` uses the torch solver and says so once (:class:`~bpnp.errors.NativeSolverWarning`).
``BPNP_NATIVE=0`` disables the native solver; ``BPNP_NATIVE_BUILD=openmp|pthreads`` picks a build.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.machinery
import os
import threading
import warnings
from pathlib import Path

import torch
from torch import Tensor

from ..errors import BackendUnavailableError, NativeSolverWarning
from ..options import NATIVE_FIELDS, SolverOptions
from .pnp import PnPSolution

__all__ = [
    "native_available",
    "native_unavailable_reason",
    "native_build",
    "solve_pnp_native",
    "ransac_round_native",
]

_HERE = Path(__file__).parent
_SOURCE = _HERE / "native_pnp.c"
#: The builds, best first: module name stem -> name for BPNP_NATIVE_BUILD.
_BUILDS = {"openmp": "_native_pnp_omp", "pthreads": "_native_pnp"}

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_build_name: str | None = None
_reason: str | None = None
_tried = False
_warned = False
_in_forked_child = False


def _after_fork_in_child() -> None:
    # GNU libgomp's thread pool does not survive fork(): in the child every OpenMP parallel region
    # (PyTorch's intra-op ones included) would wait forever on the parent's dead workers. As
    # PyTorch's DataLoader does in its workers, the child runs single-threaded, and the native
    # solver uses no OpenMP there.
    global _in_forked_child
    _in_forked_child = True
    if torch.get_num_threads() > 1:
        torch.set_num_threads(1)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class NativeOptions(ctypes.Structure):
    """:class:`~bpnp.options.SolverOptions` as the C solver's ``Options`` struct."""

    _fields_ = [(name, ctypes.c_int if kind is int else ctypes.c_double) for name, kind in NATIVE_FIELDS]

    @classmethod
    def from_options(cls, options: SolverOptions) -> NativeOptions:
        return cls(*(kind(getattr(options, name)) for name, kind in NATIVE_FIELDS))


def source_digest() -> str:
    """The first 16 hex digits of the SHA-256 of ``native_pnp.c`` (the build embeds it)."""
    return hashlib.sha256(_SOURCE.read_bytes()).hexdigest()[:16]


def _library_path(stem: str) -> Path | None:
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = _HERE / f"{stem}{suffix}"
        if path.exists():
            return path
    return None


def _open(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    if _SOURCE.exists():
        # A source tree (editable install): a library built from an older native_pnp.c would
        # silently run old code.
        lib.bpnp_source_digest.restype = ctypes.c_char_p
        built = lib.bpnp_source_digest().decode()
        if built != source_digest():
            raise RuntimeError(
                f"{path.name} was built from another native_pnp.c (digest {built}, source "
                f"{source_digest()}): rebuild with `pip install -e .`"
            )
    offsets = (ctypes.c_int64 * len(NATIVE_FIELDS))()
    size = lib.bpnp_options_layout(offsets)
    expected = [getattr(NativeOptions, name).offset for name, _ in NATIVE_FIELDS]
    if size != ctypes.sizeof(NativeOptions) or list(offsets) != expected:
        raise RuntimeError(f"{path.name}: its Options struct does not match bpnp.options.NATIVE_FIELDS")
    dp, ip = ctypes.POINTER(ctypes.c_double), ctypes.c_int
    lib.bpnp_solve.restype = ctypes.c_int
    # bpnp_solve(B, n, x2d, x3d, x3d_batched, K, K_batched, w, w_batched, init, options, num_threads,
    #            forked, R, rvec, t, cost, H, converged, iterations, second_cost, trusted)
    u8, i32 = ctypes.POINTER(ctypes.c_uint8), ctypes.POINTER(ctypes.c_int32)
    opts = ctypes.POINTER(NativeOptions)
    lib.bpnp_solve.argtypes = [ip, ip, dp, dp, ip, dp, ip, dp, ip, dp, opts, ip, ip, dp, dp, dp, dp, dp, u8, i32, dp, u8]  # fmt: skip
    i64 = ctypes.POINTER(ctypes.c_int64)
    lib.bpnp_ransac_round.restype = None
    # bpnp_ransac_round(A, S, n, ids, samples, rays, x2d, x3d, x3d_batched, K, K_batched, w,
    #                   w_batched, tau2, bound, num_threads, forked, R, t, score, count)
    lib.bpnp_ransac_round.argtypes = [ip, ip, ip, i64, i64, dp, dp, dp, ip, dp, ip, dp, ip, dp, dp, ip, ip, dp, dp, dp, i32]  # fmt: skip
    return lib


def _load() -> ctypes.CDLL | None:
    global _lib, _reason, _tried, _build_name
    with _lock:
        if _tried:
            return _lib
        _tried = True
        if os.environ.get("BPNP_NATIVE", "1") == "0":
            _reason = "disabled by BPNP_NATIVE=0"
            return None
        choice = os.environ.get("BPNP_NATIVE_BUILD", "auto")
        if choice != "auto" and choice not in _BUILDS:
            _reason = f"BPNP_NATIVE_BUILD={choice!r}: expected auto or one of {sorted(_BUILDS)}"
            return None
        errors = []
        for name, stem in _BUILDS.items():
            if choice not in ("auto", name):
                continue
            path = _library_path(stem)
            if path is None:
                errors.append(f"{stem} was not built (no C compiler when the package was installed?)")
                continue
            try:
                _lib, _build_name = _open(path), name
                return _lib
            except (OSError, RuntimeError, AttributeError) as exc:
                errors.append(str(exc))
        _reason = "; ".join(errors)
        return None


def native_available() -> bool:
    """Whether the compiled CPU solver can be used."""
    return _load() is not None


def native_unavailable_reason() -> str | None:
    """Why :func:`native_available` is False (None when it is available)."""
    _load()
    return _reason


def native_build() -> str | None:
    """The build in use: ``"openmp"`` or ``"pthreads"`` (None when unavailable)."""
    _load()
    return _build_name


def warn_unavailable_once() -> None:
    """Say once per process that ``backend="auto"`` falls back to the torch solver, and why."""
    global _warned
    if not _warned and _reason is not None and not _reason.startswith("disabled by"):
        _warned = True
        warnings.warn(
            f"bpnp: the native CPU solver is unavailable ({_reason}); using the torch solver "
            "(same answers, slower on the CPU)",
            NativeSolverWarning,
            stacklevel=3,
        )


def _ptr(x: Tensor, ctype=ctypes.c_double):
    return ctypes.cast(x.data_ptr(), ctypes.POINTER(ctype))


def solve_pnp_native(
    x2d: Tensor,
    x3d: Tensor,
    K: Tensor,
    weights: Tensor,
    init_R: Tensor | None = None,
    init_t: Tensor | None = None,
    options: SolverOptions | None = None,
) -> PnPSolution:
    """:func:`~bpnp.solvers.pnp.solve_pnp_forward` in compiled C, for CPU tensors.

    Args:
        x2d: ``(B, n, 2)``; x3d: ``(B|1, n, 3)``; K: ``(B|1, 3, 3)``; weights: ``(B|1, n)``.
        init_R: optional warm start rotations ``(B, 3, 3)``.
        init_t: its translations ``(B, 3)``.
        options: :class:`~bpnp.options.SolverOptions` (default: the defaults).
    Returns:
        :class:`~bpnp.solvers.pnp.PnPSolution`, float64 (``iterations``: the most LM iterations
        any problem of the batch needed; ``rvec`` filled in).
    Raises:
        BackendUnavailableError: when the native solver is not available or a tensor is not on the CPU.
    """
    lib = _load()
    if lib is None:
        raise BackendUnavailableError(f"bpnp native solver unavailable: {_reason}")
    options = SolverOptions() if options is None else options
    B, n, _ = x2d.shape
    f64 = torch.float64

    def prep(x: Tensor) -> Tensor:
        if x.device.type != "cpu":
            raise BackendUnavailableError(f"the native solver runs on CPU tensors, got device {x.device}")
        return x.detach().to(f64).contiguous()

    x2d, x3d, K, weights = prep(x2d), prep(x3d), prep(K), prep(weights)
    init = None
    if init_R is not None:
        init = prep(torch.cat([init_R.reshape(B, 9), init_t.reshape(B, 3)], -1))
    opt = NativeOptions.from_options(options)
    R = torch.empty(B, 3, 3, dtype=f64)
    rvec = torch.empty(B, 3, dtype=f64)
    t = torch.empty(B, 3, dtype=f64)
    cost = torch.empty(B, dtype=f64)
    hess = torch.empty(B, 6, 6, dtype=f64)
    conv = torch.empty(B, dtype=torch.uint8)
    iters = torch.empty(B, dtype=torch.int32)
    second = torch.empty(B, dtype=f64)
    trusted = torch.empty(B, dtype=torch.uint8)
    status = lib.bpnp_solve(
        B,
        n,
        _ptr(x2d),
        _ptr(x3d),
        int(x3d.shape[0] != 1 or B == 1),
        _ptr(K),
        int(K.shape[0] != 1 or B == 1),
        _ptr(weights),
        int(weights.shape[0] != 1 or B == 1),
        None if init is None else _ptr(init),
        ctypes.byref(opt),
        torch.get_num_threads(),
        int(_in_forked_child),
        _ptr(R),
        _ptr(rvec),
        _ptr(t),
        _ptr(cost),
        _ptr(hess),
        _ptr(conv, ctypes.c_uint8),
        _ptr(iters, ctypes.c_int32),
        _ptr(second),
        _ptr(trusted, ctypes.c_uint8),
    )
    if status != 0:  # pragma: no cover - SolverOptions validates the same ranges first
        raise BackendUnavailableError(f"the native solver refused the options {options}")
    return PnPSolution(R, t, cost, hess, conv.bool(), int(iters.max()) if B else 0, rvec, second, trusted.bool())


def _f64(x: Tensor) -> Tensor:
    """A detached, contiguous float64 copy (or view) of a CPU tensor, for the C entry points."""
    return x.detach().to(torch.float64).contiguous()


def ransac_round_native(
    ids: Tensor,
    samples: Tensor,
    rays: Tensor,
    x2d: Tensor,
    x3d: Tensor,
    K: Tensor,
    weights: Tensor,
    tau2: Tensor,
    bound: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One RANSAC round in compiled C: P3P for every minimal sample, MSAC scores, the best pose
    of each sample (:func:`bpnp.solvers.ransac.p3p` and :func:`~bpnp.solvers.ransac.msac_score`,
    the same formulas).

    Args:
        ids: ``(A,)`` rows of the batch in this round; samples: ``(A, S, 3)`` point indices (a
        sample whose first index is negative is skipped); rays: ``(B, n, 3)`` unit bearings;
        x2d: ``(B, n, 2)``; x3d: ``(B|1, n, 3)``; K: ``(B|1, 3, 3)``; weights: ``(B|1, n)``;
        tau2: ``(B,)`` squared thresholds; bound: ``(A,)`` scores at or above it are not kept.
    Returns:
        ``R (A, S, 3, 3)``, ``t (A, S, 3)``, ``score (A, S)`` (inf: no pose of the sample scored
        below the bound) and ``count (A, S)``.
    """
    lib = _load()
    if lib is None:
        raise BackendUnavailableError(f"bpnp native solver unavailable: {_reason}")
    f64 = torch.float64
    A, S, _ = samples.shape
    B, n = x2d.shape[:2]

    rays, x2d, x3d, K, weights, tau2, bound = (_f64(x) for x in (rays, x2d, x3d, K, weights, tau2, bound))
    ids = ids.to(torch.int64).contiguous()
    samples = samples.to(torch.int64).contiguous()
    R = torch.empty(A, S, 3, 3, dtype=f64)
    t = torch.empty(A, S, 3, dtype=f64)
    score = torch.empty(A, S, dtype=f64)
    count = torch.empty(A, S, dtype=torch.int32)
    lib.bpnp_ransac_round(
        A,
        S,
        n,
        _ptr(ids, ctypes.c_int64),
        _ptr(samples, ctypes.c_int64),
        _ptr(rays),
        _ptr(x2d),
        _ptr(x3d),
        int(x3d.shape[0] != 1 or B == 1),
        _ptr(K),
        int(K.shape[0] != 1 or B == 1),
        _ptr(weights),
        int(weights.shape[0] != 1 or B == 1),
        _ptr(tau2),
        _ptr(bound),
        torch.get_num_threads(),
        int(_in_forked_child),
        _ptr(R),
        _ptr(t),
        _ptr(score),
        _ptr(count, ctypes.c_int32),
    )
    return R, t, score, count
