"""The native CPU forward: ``native_pnp.c``, compiled when the package is built, called through ctypes.

The C file is the torch solver's algorithm (:mod:`bpnp.solvers.candidates`, :mod:`~bpnp.solvers.lm`,
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

from ..compiler import constant_for_compiler
from ..errors import BackendUnavailableError, NativeSolverWarning
from ..options import NATIVE_FIELDS, SolverOptions
from .pnp import PnPSolution

__all__ = [
    "native_available",
    "native_unavailable_reason",
    "native_build",
    "solve_pnp_native",
    "ransac_round_native",
    "layer_forward_native",
    "layer_backward_native",
    "UNIT_FIELDS",
    "undistort_points_native",
]

_HERE = Path(__file__).parent
_SOURCE = _HERE / "native_pnp.c"
#: The builds, best first: name for BPNP_NATIVE_BUILD -> module name stem. "openmp-avx2" is the
#: OpenMP build compiled for AVX2 + FMA (x86-64 only), loaded where the CPU has both.
_BUILDS = {"openmp-avx2": "_native_pnp_omp_avx2", "openmp": "_native_pnp_omp", "pthreads": "_native_pnp"}

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
    # The layer's entry points take raw addresses (c_void_p): a single solve is a few tens of
    # microseconds, and a ctypes.cast per argument would be a tenth of it.
    vp = ctypes.c_void_p
    lib.bpnp_layer_forward.restype = ctypes.c_int
    # bpnp_layer_forward(B, n, x2d, x3d, x3d_batched, K, K_batched, w, w_batched, init, dist,
    #                    dist_batched, options, num_threads, forked, pose, R, cost, second, H, units,
    #                    flags, iterations)
    lib.bpnp_layer_forward.argtypes = [ip, ip, vp, vp, ip, vp, ip, vp, ip, vp, vp, ip, vp, ip, ip, vp, vp, vp, vp, vp, vp, vp, vp]  # fmt: skip
    lib.bpnp_layer_backward.restype = None
    # bpnp_layer_backward(B, n, x2d, x3d, x3d_batched, K, K_batched, w, w_batched, dist, dist_batched,
    #                     pose, R, H, units, flags, grad_pose, gp_item, gp_entry, grad_R, num_threads,
    #                     forked, g_x2d, g_x3d, g_K, g_w, g_dist)
    lp = ctypes.c_int64
    lib.bpnp_layer_backward.argtypes = [ip, ip, vp, vp, ip, vp, ip, vp, ip, vp, ip, vp, vp, vp, vp, vp, vp, lp, lp, vp, ip, ip, vp, vp, vp, vp, vp]  # fmt: skip
    lib.bpnp_undistort_points.restype = None
    # bpnp_undistort_points(m, per, xd, dist, dist_batched, xu, ok)
    lib.bpnp_undistort_points.argtypes = [ip, ip, vp, vp, ip, vp, vp]
    return lib


def _load() -> ctypes.CDLL | None:
    global _lib, _reason, _tried, _build_name
    if _tried:  # the answer is final once _tried is set (last, under the lock): no lock per solve
        return _lib
    with _lock:
        if not _tried:
            _lib, _build_name, _reason = _find_library()
            _tried = True
        return _lib


def _find_library() -> tuple[ctypes.CDLL | None, str | None, str | None]:
    """The best build this machine can load: ``(library, build name, None)``, or
    ``(None, None, why not)``."""
    if os.environ.get("BPNP_NATIVE", "1") == "0":
        return None, None, "disabled by BPNP_NATIVE=0"
    choice = os.environ.get("BPNP_NATIVE_BUILD", "auto")
    if choice != "auto" and choice not in _BUILDS:
        return None, None, f"BPNP_NATIVE_BUILD={choice!r}: expected auto or one of {sorted(_BUILDS)}"
    errors = []
    for name, stem in _BUILDS.items():
        if choice not in ("auto", name):
            continue
        if name == "openmp-avx2" and not _cpu_has_avx2():
            if choice == name:
                errors.append("this CPU lacks AVX2 or FMA")
            continue
        path = _library_path(stem)
        if path is None:
            errors.append(f"{stem} was not built (no C compiler when the package was installed?)")
            continue
        try:
            return _open(path), name, None
        except (OSError, RuntimeError, AttributeError) as exc:
            errors.append(str(exc))
    return None, None, "; ".join(errors)


def _cpu_has_avx2() -> bool:
    """Whether the CPU runs AVX2 and FMA code (PyTorch's dispatch level says so: its AVX2 level
    needs both; ATEN_CPU_CAPABILITY=default turns it off)."""
    get = getattr(torch.backends.cpu, "get_cpu_capability", None)
    return get is not None and get() in ("AVX2", "AVX512")


@constant_for_compiler
def native_available() -> bool:
    """Whether the compiled CPU solver can be used (a constant for torch.compile)."""
    return _load() is not None


def native_unavailable_reason() -> str | None:
    """Why :func:`native_available` is False (None when it is available)."""
    _load()
    return _reason


def native_build() -> str | None:
    """The build in use: ``"openmp-avx2"``, ``"openmp"`` or ``"pthreads"`` (None when unavailable)."""
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


def _f64(x: Tensor | None) -> Tensor | None:
    """A contiguous float64 tensor with the values of a CPU tensor, for the C entry points: ``x``
    itself when it is one (C reads the memory; no copy per call of a small solve), None for None."""
    if x is None or (x.dtype == torch.float64 and x.is_contiguous()):
        return x
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


#: Per-item constants of the change of units the layer's C entry points return: centre (3),
#: scale, principal point (2), focal, largest weight, the answer's normalised translation (3).
UNIT_FIELDS = 11

_options_cache: dict[int, tuple[SolverOptions, NativeOptions]] = {}


def _native_options(options: SolverOptions) -> NativeOptions:
    """The C struct of (frozen) options, built once per options object (keyed by identity:
    hashing 31 fields costs more than a small solve's checks)."""
    found = _options_cache.get(id(options))
    if found is None or found[0] is not options:
        if len(_options_cache) > 64:
            _options_cache.clear()
        found = _options_cache[id(options)] = (options, NativeOptions.from_options(options))
    return found[1]


def _address(x: Tensor | None) -> int | None:
    return None if x is None else x.data_ptr()


def _batched(x: Tensor | None, B: int) -> int:
    """The C flag of an input shared by the batch (0) or given per item (1)."""
    return int(x is not None and (x.shape[0] != 1 or B == 1))


def _problem_arguments(B: int, x2d: Tensor, x3d: Tensor, K: Tensor, weights: Tensor | None) -> tuple[list, list]:
    """The leading C arguments of both layer calls, ``x2d, x3d, x3d_batched, K, K_batched, w,
    w_batched``, and the float64 tensors they point into (to keep alive during the call)."""
    kept = [_f64(x2d), _f64(x3d), _f64(K), _f64(weights)]
    x2d, x3d, K, weights = kept
    args = [x2d.data_ptr(), x3d.data_ptr(), _batched(x3d, B), K.data_ptr(), _batched(K, B)]
    return args + [_address(weights), _batched(weights, B)], kept


def layer_forward_outputs(B: int, empty=torch.empty, pose_dtype: torch.dtype = torch.float64) -> tuple[Tensor, ...]:
    """The outputs of ``bpnp_layer_forward`` for a batch of ``B``, allocated by ``empty`` (e.g. a
    fake tensor's ``new_empty``): ``pose (B, 6)`` and ``R (B, 3, 3)`` in ``pose_dtype``; ``cost``,
    ``second_cost (B,)``, ``H (B, 6, 6)``, ``units (B, UNIT_FIELDS)`` float64; ``flags (B, 4)``
    bool; ``summary (2,)`` int32. The one description of the C call's output layout."""
    f64 = torch.float64
    return (
        empty(B, 6, dtype=pose_dtype),
        empty(B, 3, 3, dtype=pose_dtype),
        empty(B, dtype=f64),
        empty(B, dtype=f64),
        empty(B, 6, 6, dtype=f64),
        empty(B, UNIT_FIELDS, dtype=f64),
        empty(B, 4, dtype=torch.bool),  # C writes 0/1 bytes
        empty(2, dtype=torch.int32),
    )


def layer_forward_native(
    x2d: Tensor,
    x3d: Tensor,
    K: Tensor,
    weights: Tensor | None,
    init_pose: Tensor | None,
    dist: Tensor | None,
    options: SolverOptions,
) -> tuple[int, tuple[Tensor, ...]]:
    """The least-squares layer's forward in one C call (``bpnp_layer_forward``): the value checks,
    the unit-free problem, degenerate items, the global solve (with ``dist``: on the undistorted
    pixels, then LM on the distorted cost), flags, fallback and units.

    Args:
        x2d: ``(B, n, 2)``; x3d: ``(B|1, n, 3)``; K: ``(B|1, 3, 3)``; weights: ``(B|1, n)`` or None;
        init_pose: ``(B, 6)`` or None; dist: ``(B|1, 5)`` or None; CPU tensors (read as float64),
        the user's units.
        options: :class:`~bpnp.options.SolverOptions`.
    Returns:
        ``(code, outputs)``: a check code (0: solved; else the input check that failed, nothing
        solved) and ``pose (B, 6), R (B, 3, 3), cost (B,), second_cost (B,), H (B, 6, 6)`` (the
        normalised problem's chart Hessian), ``units (B, UNIT_FIELDS)``, ``flags (B, 4)`` bool
        (converged, ambiguous, trusted, no answer) and ``summary (2,)`` int32 (the most LM
        iterations of any item, the number of items not converged).
    """
    lib = _load()
    if lib is None:
        raise BackendUnavailableError(f"bpnp native solver unavailable: {_reason}")
    B, n, _ = x2d.shape
    problem, _kept = _problem_arguments(B, x2d, x3d, K, weights)
    init_pose, dist = _f64(init_pose), _f64(dist)
    out = layer_forward_outputs(B)
    code = lib.bpnp_layer_forward(
        B, n, *problem, _address(init_pose), _address(dist), _batched(dist, B),
        ctypes.addressof(_native_options(options)), torch.get_num_threads(), int(_in_forked_child),
        *[x.data_ptr() for x in out],
    )  # fmt: skip
    if code < 0:  # pragma: no cover - SolverOptions validates the same ranges first
        raise BackendUnavailableError(f"the native solver refused the options {options}")
    return code, out


def layer_backward_native(
    x2d: Tensor,
    x3d: Tensor,
    K: Tensor,
    weights: Tensor | None,
    dist: Tensor | None,
    forward: tuple[Tensor, ...],
    grad_pose: Tensor,
    grad_R: Tensor | None,
    needs: tuple[bool, ...],
) -> tuple[Tensor | None, ...]:
    """The least-squares layer's implicit backward in one C call (``bpnp_layer_backward``).

    Args:
        x2d, x3d, K, weights, dist: as given to :func:`layer_forward_native`.
        forward: its ``pose, R, H, units, flags``.
        grad_pose: ``(B, 6)``, any strides; grad_R: ``(B, 3, 3)`` or None (CPU tensors, read as
            float64).
        needs: which of ``(x2d, x3d, K, weights, dist)`` need a gradient.
    Returns:
        Per-item gradients ``(B, n, 2), (B, n, 3), (B, 3, 3), (B, n), (B, 5)`` (None where not needed).
    """
    lib = _load()
    if lib is None:
        raise BackendUnavailableError(f"bpnp native solver unavailable: {_reason}")
    B, n, _ = x2d.shape
    problem, _kept = _problem_arguments(B, x2d, x3d, K, weights)
    dist, grad_R = _f64(dist), _f64(grad_R)
    if grad_pose.dtype != torch.float64:
        grad_pose = grad_pose.detach().to(torch.float64)
    # (read through its strides: the gradient of a sum arrives expanded, and a copy costs more
    # than a small problem's backward)
    f64 = torch.float64
    need_x2d, need_x3d, need_K, need_w, need_dist = tuple(needs) + (False,) * (5 - len(needs))
    grads = [
        torch.empty(B, n, 2, dtype=f64) if need_x2d else None,
        torch.empty(B, n, 3, dtype=f64) if need_x3d else None,
        torch.empty(B, 3, 3, dtype=f64) if need_K else None,
        torch.empty(B, n, dtype=f64) if need_w else None,
        torch.empty(B, 5, dtype=f64) if need_dist else None,
    ]
    pose, R, H, units, flags = forward
    pose, R = _f64(pose), _f64(R)
    lib.bpnp_layer_backward(
        B, n, *problem, _address(dist), _batched(dist, B), pose.data_ptr(), R.data_ptr(), H.data_ptr(),
        units.data_ptr(), flags.data_ptr(), grad_pose.data_ptr(), *grad_pose.stride(), _address(grad_R),
        torch.get_num_threads(), int(_in_forked_child), *[None if g is None else g.data_ptr() for g in grads],
    )  # fmt: skip
    return tuple(grads)


def undistort_points_native(xd: Tensor, dist: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`bpnp.geometry.undistort_points` in C (same Newton iteration, same tolerance), for
    CPU tensors, without gradients.

    Args:
        xd: ``(..., n, 2)`` distorted normalised coordinates; dist: ``(5,)``, or ``(B, 5)`` with
        ``xd`` of shape ``(B, n, 2)``.
    Returns:
        ``xn`` (float64, the shape of ``xd``) and ``ok (..., n)`` bool.
    """
    lib = _load()
    if lib is None:
        raise BackendUnavailableError(f"bpnp native solver unavailable: {_reason}")
    xd64, dist64 = _f64(xd), _f64(dist)
    xu = torch.empty(xd.shape, dtype=torch.float64)
    ok = torch.empty(xd.shape[:-1], dtype=torch.bool)
    m = ok.numel()
    per = xd.shape[-2] if dist.dim() == 2 else max(m, 1)
    lib.bpnp_undistort_points(
        m, per, xd64.data_ptr(), dist64.data_ptr(), int(dist.dim() == 2), xu.data_ptr(), ok.data_ptr()
    )
    return xu, ok
