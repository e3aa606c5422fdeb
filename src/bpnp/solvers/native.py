"""The native CPU forward: ``native_pnp.c`` compiled on first use and called through ctypes.

The C file is the torch solver's algorithm (:mod:`bpnp.solvers.init`, :mod:`~bpnp.solvers.lm`,
:mod:`~bpnp.solvers.pnp`) per problem, with threads over the batch: on the CPU it removes the
eager-dispatch overhead and the memory traffic of batched temporaries, which dominate there.
It needs a C compiler (``$CC`` or ``cc``) the first time; the shared library is cached under
``$BPNP_CACHE_DIR`` (default ``~/.cache/bpnp``, or the temporary directory when that is not
writable), keyed by the source and the compiler flags.
Without a compiler, or with ``BPNP_NATIVE=0``, :func:`native_available` is False and the layer
uses the torch solver (``backend="auto"``). ``BPNP_NATIVE_BUILD=openmp|pthreads|serial`` forces
one build (default: the first of these that compiles).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch
from torch import Tensor

from .pnp import PnPSolution

__all__ = ["native_available", "native_unavailable_reason", "solve_pnp_native"]

_SOURCE = Path(__file__).with_name("native_pnp.c")
# -fno-math-errno lets sqrt compile to one instruction (measured: 20% of the solve); no
# -ffast-math, the solver relies on inf/NaN semantics. The "omp simd" loop annotations run the
# per-point sums 2 points per instruction (n = 500: 1.2x). -fopenmp: the batch is shared by
# PyTorch's own OpenMP workers (the library is loaded after torch, so libgomp resolves to the
# runtime torch loaded); where OpenMP is missing (e.g. Apple clang), and in a fork()ed child
# (libgomp's pool does not survive fork), plain pthreads.
_BASE_FLAGS = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-std=gnu99", "-fPIC", "-shared"]
_THREADS = ["-pthread", "-DBPNP_THREADS"]
_BUILDS = {
    "openmp": _BASE_FLAGS + ["-fopenmp"] + _THREADS,
    "pthreads": _BASE_FLAGS + ["-fopenmp-simd"] + _THREADS,
    "pthreads-plain": _BASE_FLAGS + _THREADS,
    "serial": _BASE_FLAGS,
}


def _flag_sets() -> list[list[str]]:
    """Builds to try, best first; ``BPNP_NATIVE_BUILD`` (openmp, pthreads, serial) picks one."""
    choice = os.environ.get("BPNP_NATIVE_BUILD", "auto")
    if choice == "auto":
        return list(_BUILDS.values())
    if choice not in _BUILDS:
        raise RuntimeError(f"BPNP_NATIVE_BUILD={choice!r}: expected auto or one of {sorted(_BUILDS)}")
    return [_BUILDS[choice]]
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_reason: str | None = None
_tried = False


def _cache_dirs() -> list[Path]:
    """Where the compiled library may live: $BPNP_CACHE_DIR, else the user cache, else /tmp."""
    root = os.environ.get("BPNP_CACHE_DIR")
    if root:
        return [Path(root)]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    return [Path(base) / "bpnp", Path(tempfile.gettempdir()) / f"bpnp-{uid}"]


def _build(target: Path, flags: list[str], compiler: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build under a temporary name and rename: concurrent first uses never see half a file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    cmd = [compiler, *flags, str(_SOURCE), "-o", tmp, "-lm"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as exc:
        os.unlink(tmp)
        raise RuntimeError(f"{' '.join(cmd)}: {exc}") from exc
    if proc.returncode != 0:
        os.unlink(tmp)
        raise RuntimeError(f"{' '.join(cmd)}: {proc.stderr.strip()[-500:]}")
    os.replace(tmp, target)


def _compile() -> ctypes.CDLL:
    source = _SOURCE.read_bytes()
    compiler = os.environ.get("CC", "cc")
    errors = []
    for flags in _flag_sets():
        tag = hashlib.sha256(
            source + " ".join([compiler, *flags, platform.machine(), sys.platform]).encode()
        ).hexdigest()[:16]
        for directory in _cache_dirs():
            target = directory / f"native_pnp-{tag}.so"
            if hasattr(os, "getuid") and directory.exists() and directory.stat().st_uid != os.getuid():
                # Never load a library from a directory someone else controls.
                errors.append(f"{directory} belongs to another user")
                continue
            try:
                if not target.exists():
                    _build(target, flags, compiler)
                lib = ctypes.CDLL(str(target))
            except (OSError, RuntimeError) as exc:
                errors.append(str(exc))
                continue
            dp, ip = ctypes.POINTER(ctypes.c_double), ctypes.c_int
            lib.bpnp_solve.restype = ctypes.c_int
            lib.bpnp_solve.argtypes = [ip, ip, dp, dp, ip, dp, ip, dp, ip, dp, ip, dp, ip,
                                       dp, dp, dp, dp, dp, ctypes.POINTER(ctypes.c_uint8),
                                       ctypes.POINTER(ctypes.c_int32)]
            return lib
    raise RuntimeError("; ".join(errors))


def _load() -> ctypes.CDLL | None:
    global _lib, _reason, _tried
    with _lock:
        if not _tried:
            _tried = True
            if os.environ.get("BPNP_NATIVE", "1") == "0":
                _reason = "disabled by BPNP_NATIVE=0"
            else:
                try:
                    _lib = _compile()
                except Exception as exc:  # no compiler, read-only cache, ...: torch fallback
                    _reason = f"could not build the native solver: {exc}"
        return _lib


def native_available() -> bool:
    """Whether the compiled CPU solver can be used (builds it on the first call)."""
    return _load() is not None


def native_unavailable_reason() -> str | None:
    """Why :func:`native_available` is False (None when it is available)."""
    _load()
    return _reason


def _ptr(x: Tensor, ctype=ctypes.c_double):
    return ctypes.cast(x.data_ptr(), ctypes.POINTER(ctype))


def solve_pnp_native(
    x2d: Tensor,
    x3d: Tensor,
    K: Tensor,
    weights: Tensor,
    init_R: Tensor | None = None,
    init_t: Tensor | None = None,
    num_candidates: int = 4,
    max_iter: int = 100,
    global_search: bool = True,
    screen_iter: int = 4,
    screen_ratio: float = 2.0,
    object_ratio: float = 10.0,
    eigvec_starts: tuple[int, int] = (4, 4),
    so3_iters: int = 8,
) -> PnPSolution:
    """:func:`~bpnp.solvers.pnp.solve_pnp_forward` in compiled C, for CPU float64 tensors.

    Args:
        x2d: ``(B, n, 2)``; x3d: ``(B|1, n, 3)``; K: ``(B|1, 3, 3)``; weights: ``(B|1, n)``.
        init_R, init_t: optional warm start ``(B, 3, 3)``, ``(B, 3)``.
        num_candidates, max_iter, global_search, screen_iter, screen_ratio, object_ratio:
            as in :func:`~bpnp.solvers.pnp.solve_pnp_forward`.
        eigvec_starts: eigenvectors of Omega used as SO(3) starts for (flat or thin, solid)
            point sets, as ``num_eigvecs`` and ``solid_eigvecs`` of
            :func:`~bpnp.solvers.init.initial_poses`.
        so3_iters: damped Newton iterations on SO(3) from every start.
    Returns:
        :class:`~bpnp.solvers.pnp.PnPSolution` (``iterations``: the most LM iterations any
        problem of the batch needed; ``rvec`` filled in).
    Raises:
        RuntimeError: when the native solver is not available.
    """
    lib = _load()
    if lib is None:
        raise RuntimeError(f"bpnp native solver unavailable: {_reason}")
    B, n, _ = x2d.shape
    f64 = torch.float64
    if not all(1 <= int(m) <= 9 for m in eigvec_starts):
        raise ValueError(f"eigvec_starts: expected two ints in 1..9, got {eigvec_starts}")

    def prep(x: Tensor) -> Tensor:
        if x.device.type != "cpu":
            raise ValueError("the native solver runs on CPU tensors")
        return x.detach().to(f64).contiguous()

    x2d, x3d, K, weights = prep(x2d), prep(x3d), prep(K), prep(weights)
    init = None
    if init_R is not None:
        init = prep(torch.cat([init_R.reshape(B, 9), init_t.reshape(B, 3)], -1))
    opt = torch.tensor([num_candidates, max_iter, screen_iter, screen_ratio, object_ratio,
                        eigvec_starts[0], eigvec_starts[1], 0.35, so3_iters, 0.1, 2], dtype=f64)
    R = torch.empty(B, 3, 3, dtype=f64)
    rvec = torch.empty(B, 3, dtype=f64)
    t = torch.empty(B, 3, dtype=f64)
    cost = torch.empty(B, dtype=f64)
    hess = torch.empty(B, 6, 6, dtype=f64)
    conv = torch.empty(B, dtype=torch.uint8)
    iters = torch.empty(B, dtype=torch.int32)
    lib.bpnp_solve(
        B, n, _ptr(x2d), _ptr(x3d), int(x3d.shape[0] != 1 or B == 1), _ptr(K), int(K.shape[0] != 1 or B == 1),
        _ptr(weights), int(weights.shape[0] != 1 or B == 1),
        None if init is None else _ptr(init), int(global_search), _ptr(opt), torch.get_num_threads(),
        _ptr(R), _ptr(rvec), _ptr(t), _ptr(cost), _ptr(hess), _ptr(conv, ctypes.c_uint8), _ptr(iters, ctypes.c_int32),
    )
    return PnPSolution(R, t, cost, hess, conv.bool(), int(iters.max()) if B else 0, rvec)
