"""Builds the native CPU solver (src/bpnp/solvers/native_pnp.c) with the package.

Two shared libraries, loaded by bpnp.solvers.native through ctypes (they are not Python
modules): ``_native_pnp_omp`` (OpenMP over the batch) and ``_native_pnp`` (plain pthreads).
Both are optional: without a C compiler the package installs and runs on the torch solver,
and says so at run time. Metadata lives in pyproject.toml.
"""

import hashlib
import platform
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

SOURCE = "src/bpnp/solvers/native_pnp.c"
DIGEST = hashlib.sha256(Path(__file__).with_name("src").joinpath("bpnp/solvers/native_pnp.c").read_bytes()).hexdigest()[
    :16
]
# -fno-math-errno lets sqrt compile to one instruction (20% of the solve); no -ffast-math: the
# solver relies on inf/NaN semantics.
BASE = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-std=gnu99"]
OPENMP = (["-fopenmp", "-pthread", "-DBPNP_THREADS"], ["-fopenmp", "-pthread"])
VARIANTS = {  # extension name -> (compile flags, link flags) to try, best first
    "bpnp.solvers._native_pnp_omp": [(BASE + OPENMP[0], OPENMP[1])],
    "bpnp.solvers._native_pnp": [
        (BASE + ["-fopenmp-simd", "-pthread", "-DBPNP_THREADS"], ["-pthread"]),
        (BASE + ["-pthread", "-DBPNP_THREADS"], ["-pthread"]),
        (BASE, []),
    ],
}
# On x86-64 also an AVX2 + FMA build of the OpenMP one (10% faster solves, measured on a 2-core
# EPYC); bpnp.solvers.native loads it only where the CPU has both.
if platform.machine().lower() in ("x86_64", "amd64"):
    VARIANTS["bpnp.solvers._native_pnp_omp_avx2"] = [(BASE + ["-mavx2", "-mfma"] + OPENMP[0], OPENMP[1])]
MSVC_FLAGS = {"bpnp.solvers._native_pnp_omp_avx2": ["/O2", "/arch:AVX2"]}
EXPORTS = [
    "bpnp_solve",
    "bpnp_options_layout",
    "bpnp_source_digest",
    "bpnp_symmetric_eig",
    "bpnp_ransac_round",
    "bpnp_layer_forward",
    "bpnp_layer_backward",
    "bpnp_undistort_points",
]


class BuildNative(build_ext):
    """Tries each flag variant of an extension in turn; the C exports, not a PyInit symbol."""

    def get_export_symbols(self, ext):
        return EXPORTS

    def build_extension(self, ext):
        msvc = self.compiler.compiler_type == "msvc"
        variants = [(MSVC_FLAGS.get(ext.name, ["/O2"]), [])] if msvc else VARIANTS[ext.name]
        ext.libraries = [] if msvc else ["m"]
        last = None
        for compile_args, link_args in variants:
            ext.extra_compile_args = compile_args
            ext.extra_link_args = link_args
            try:
                return super().build_extension(ext)
            except Exception as exc:  # a missing flag or runtime: try the next variant
                last = exc
        raise last


setup(
    ext_modules=[
        Extension(name, [SOURCE], define_macros=[("BPNP_SOURCE_DIGEST", f'"{DIGEST}"')], optional=True)
        for name in VARIANTS
    ],
    cmdclass={"build_ext": BuildNative},
)
