"""Every default and tuning constant of the forward solver, in one place.

:class:`SolverOptions` holds what a user chooses (how many candidates, iterations, whether to
search globally, escalate, check warm starts); :class:`_Tuning` the solver's internal thresholds
(screening, SO(3) starts, LM tolerances, escalation tests), private: they were set by the
global-optimum tests and are no promise of the API. Both forward solvers (the compiled C one and
the batched torch one) read the same options; the C side receives both parts as one typed struct
whose layout is generated from :data:`NATIVE_FIELDS` (checked against the C ``sizeof`` when the
library loads).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace

from .errors import PnPInputError

__all__ = ["SolverOptions", "RansacOptions", "NATIVE_FIELDS", "MAX_CANDIDATES"]

#: Candidates one problem may refine (the C solver's fixed-size buffers).
MAX_CANDIDATES = 9


@dataclass(frozen=True)
class _Tuning:
    """The solver's internal thresholds (private; see the module). Read through
    :class:`SolverOptions` (``options.screen_iter``); changed with :meth:`SolverOptions._tuned`.

    Attributes:
        screen_iter: LM iterations every candidate gets before screening (0: no screening).
        screen_ratio: after screening only candidates with cost <= this x the problem's best go on.
        object_ratio: candidates whose object-space error exceeds this multiple of the best
            valid candidate's are not refined (0: refine every distinct valid candidate).
        num_eigvecs: eigenvectors of Omega used as SO(3) starts (each with both signs) for flat
            or thin point sets (which also get the 12 rotations of the tetrahedral group).
        solid_eigvecs: eigenvectors used for solid point sets (no fixed starts).
        thin_ratio: a point set is thin when its smallest spread (std) is below this fraction of
            its largest; decided per problem (>= 1: every point set gets the fixed starts).
        so3_iters: damped Newton iterations on SO(3) from every start.
        so3_damping: initial damping of the SO(3) Newton iterations.
        dedupe: SO(3) minima closer than this (Frobenius norm of the rotation difference) to a
            better one are the same basin.
        behind_penalty: added to a candidate's normalised object-space error times the fraction
            of its points behind the camera (ranking key).
        duplicate_penalty: added to the ranking key of a duplicate candidate.
        candidate_cutoff: candidates whose ranking key reaches this are not refined (keeps
            duplicates and candidates with nearly every point behind the camera out).
        lm_damping: initial Marquardt damping, relative to the Hessian diagonal.
        lm_rtol: LM stops when the decrement of an accepted step is <= lm_rtol * cost + atol ...
        lm_atol: ... with ``atol = lm_atol * sum(w) * (mean |x2d|^2 + 1)`` (float64 rounding of
            the residuals).
        depth_floor: trial poses with a weighted point at depth <= depth_floor * |t| (the start's
            t) are rejected (points behind the camera never enter the answer).
        polish_steps: undamped Newton steps after convergence (to float64 stationarity).
        depth_margin: a candidate with a weighted point behind the camera is moved along the
            optical axis until its nearest weighted point is this many object sizes (weighted RMS
            radius) in front, so that the LM starts in the valid region (outliers drag
            object-space minima behind the camera).
        escalate_ratio: residuals are heavy-tailed when the largest squared residual (points of
            positive weight, unweighted) exceeds this multiple of the median one (Gaussian noise:
            median ratio 5-10 for n = 8..500, 99% quantile 14-33; 20 escalates 0-3.5% of clean
            problems and catches the outlier-set misses).
        escalate_misfit: a problem whose answer leaves an RMS residual above this fraction of
            the RMS spread of its pixels (the fit explains little of the image: gross outliers)
            is escalated too (clean problems, 0-3 px noise: at most 0.18 in 4,000; 30-50% outlier
            sets: 0.7-0.95 where the heavy-tail test had not escalated them).
    """

    screen_iter: int = 4
    screen_ratio: float = 2.0
    object_ratio: float = 10.0
    num_eigvecs: int = 4
    solid_eigvecs: int = 4
    thin_ratio: float = 0.35
    so3_iters: int = 8
    so3_damping: float = 1e-3
    dedupe: float = 0.1
    behind_penalty: float = 10.0
    duplicate_penalty: float = 100.0
    candidate_cutoff: float = 10.5
    lm_damping: float = 1e-4
    lm_rtol: float = 1e-15
    lm_atol: float = 1e-28
    depth_floor: float = 1e-9
    polish_steps: int = 2
    depth_margin: float = 3.0
    escalate_ratio: float = 20.0
    escalate_misfit: float = 0.3

    def __post_init__(self) -> None:
        for name, (lo, hi) in {"screen_iter": (0, 1_000_000), "num_eigvecs": (1, 9), "solid_eigvecs": (1, 9),
                               "so3_iters": (0, 10_000), "polish_steps": (0, 100)}.items():  # fmt: skip
            _check_int(name, getattr(self, name), lo, hi)
        positive = (
            "screen_ratio", "so3_damping", "dedupe", "behind_penalty", "duplicate_penalty", "candidate_cutoff",
            "lm_damping", "lm_rtol", "lm_atol", "depth_floor", "depth_margin", "escalate_ratio", "escalate_misfit",
        )  # fmt: skip
        for name in positive:
            _check_float(name, getattr(self, name), strictly_positive=True)
        _check_float("object_ratio", self.object_ratio, strictly_positive=False)
        _check_float("thin_ratio", self.thin_ratio, strictly_positive=False)
        if self.screen_ratio < 1:
            raise PnPInputError(f"screen_ratio: expected >= 1, got {self.screen_ratio!r}")


@dataclass(frozen=True)
class SolverOptions:
    """Options of the global PnP solve. Frozen: make a variant with ``dataclasses.replace``.

    The solver's internal thresholds are not options (:class:`_Tuning`, private); they read as
    attributes too (``options.lm_rtol``).

    Attributes:
        num_candidates: object-space minima refined per problem (1..9; more is safer, slower).
        max_iter: Levenberg-Marquardt iteration cap of the final refinement (>= 1).
        global_search: with an ``init_pose``, False skips the global initialisation and only
            refines the warm start (several times faster, no global-optimum guarantee; for
            training loops whose problems change little per step).
        check_every: the torch solver asks the device whether all items are done every this
            many LM iterations (each ask is a host-device synchronisation on a GPU); the answer
            does not depend on it. None: 1 on the CPU, 4 on other devices.
        well_posed_ratio: an answer is well posed when the smallest eigenvalue of its Hessian
            exceeds this fraction of the largest; otherwise ``converged`` is False.
        small_problem: problems with at most this many points of positive weight get the
            exhaustive search (all 9 eigenvector starts and the fixed ones, every candidate
            refined to convergence, no screening): cheap there, and where the shortcuts miss.
        ambiguity_threshold: ``ambiguous`` is True when another distinct minimum's cost exceeds
            the answer's by at most this many residual variances (``cost / (2 n - 6)``); the
            default is the 95% quantile of a chi-square with 6 degrees of freedom.
        escalate: a problem some of whose candidates had weighted points behind the camera, or
            whose answer has heavy-tailed residuals (outliers, inconsistent data), gets a second,
            exhaustive search; the better answer wins.
        check_warm_start: check warm-started local refinements (``global_search=False``) by the
            object-space error (``PnPResult.trusted``); about as costly as the refinement itself
            (B = 1024, n = 50), so a training loop that trusts its warm starts can switch it off.
        cube_starts: a problem that gets the exhaustive second pass (see ``escalate``) also gets a
            third: Levenberg-Marquardt from the 24 rotations of the cube with the object on the
            mean ray of its pixels (screened as the candidates are); the lowest cost wins. On
            30-50% outlier sets it found the best-known minimum where the object-space starts
            had missed it (13 of 600 problems).
        warm_start_ratio: a warm-started local refinement (``global_search=False``) is trusted
            when its object-space error is at most this multiple of the best object-space minimum
            (measured on reshuffled warm starts: 96% of wrong-basin answers caught at 1.2, 4 false
            alarms in 1,617 right ones; see ``PnPResult.trusted``).
    """

    num_candidates: int = 4
    max_iter: int = 100
    global_search: bool = True
    check_every: int | None = None
    well_posed_ratio: float = 1e-10
    small_problem: int = 6
    ambiguity_threshold: float = 12.6
    escalate: bool = True
    check_warm_start: bool = True
    cube_starts: bool = True
    warm_start_ratio: float = 1.2
    _tuning: _Tuning = field(default_factory=lambda: _Tuning(), repr=False)

    def __post_init__(self) -> None:
        ints = {"num_candidates": (1, MAX_CANDIDATES), "max_iter": (1, 1_000_000), "small_problem": (0, 1_000_000)}
        for name, (lo, hi) in ints.items():
            _check_int(name, getattr(self, name), lo, hi)
        if self.check_every is not None:
            _check_int("check_every", self.check_every, 1, 1_000_000)
        for name in ("global_search", "escalate", "check_warm_start", "cube_starts"):
            if not isinstance(getattr(self, name), bool):
                raise PnPInputError(f"{name}: expected a bool, got {getattr(self, name)!r}")
        for name in ("well_posed_ratio", "warm_start_ratio"):
            _check_float(name, getattr(self, name), strictly_positive=True)
        _check_float("ambiguity_threshold", self.ambiguity_threshold, strictly_positive=False)
        if not isinstance(self._tuning, _Tuning):
            raise PnPInputError(f"_tuning: expected a bpnp.options._Tuning, got {type(self._tuning).__name__}")

    def __getattr__(self, name: str) -> object:
        # Only reached for names that are not fields: the internal thresholds. Private names
        # (pickling's __setstate__, _tuning itself before __init__) must not recurse.
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return getattr(self._tuning, name)
        except AttributeError:
            raise AttributeError(f"{type(self).__name__!r} has no option {name!r}") from None

    def _tuned(self, **changes: object) -> SolverOptions:
        """A copy with internal thresholds changed (the solver's own variants, the tests)."""
        return replace(self, _tuning=replace(self._tuning, **changes))


@dataclass(frozen=True)
class RansacOptions:
    """Options of the batched RANSAC in :func:`~bpnp.solve_pnp` (``ransac=True`` takes these
    defaults). Frozen: make a variant with ``dataclasses.replace``.

    Attributes:
        threshold: inlier threshold on the reprojection error, in pixels (the units of x2d).
        confidence: stop a problem once an all-inlier sample has been drawn with this
            probability (from its best inlier ratio so far; the usual adaptive count).
        max_iterations: most minimal samples per problem.
        min_iterations: fewest minimal samples per problem (a floor against a lucky early stop).
        samples_per_round: minimal samples drawn per problem and round; a round is one batched
            step for the whole batch, and problems drop out of later rounds once done.
        local_iterations: rounds of local optimisation: least-squares refinement on the inliers
            of the best hypothesis, re-reading the inliers at the refined pose.
        seed: the random stream (the same seed, inputs and device give the same answer).
    """

    threshold: float = 4.0
    confidence: float = 0.999
    max_iterations: int = 1000
    min_iterations: int = 16
    samples_per_round: int = 16
    local_iterations: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        _check_float("threshold", self.threshold, strictly_positive=True)
        _check_float("confidence", self.confidence, strictly_positive=True)
        if not self.confidence < 1:
            raise PnPInputError(f"confidence: expected a number in (0, 1), got {self.confidence!r}")
        _check_int("max_iterations", self.max_iterations, 1, 10_000_000)
        _check_int("min_iterations", self.min_iterations, 0, 10_000_000)
        _check_int("samples_per_round", self.samples_per_round, 1, 100_000)
        _check_int("local_iterations", self.local_iterations, 0, 100)
        _check_int("seed", self.seed, 0, 2**63 - 1)


def _check_int(name: str, value: object, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise PnPInputError(f"{name}: expected an int in [{lo}, {hi}], got {value!r}")
    if not lo <= value <= hi:
        raise PnPInputError(f"{name}: expected an int in [{lo}, {hi}], got {value}")


def _check_float(name: str, value: object, strictly_positive: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise PnPInputError(f"{name}: expected a finite number, got {value!r}")
    if value < 0 or (strictly_positive and value == 0):
        raise PnPInputError(
            f"{name}: expected a {'positive' if strictly_positive else 'non-negative'} number, got {value!r}"
        )


#: The fields the C solver reads (user options and internal thresholds), in the order of its
#: ``Options`` struct; ``check_every`` only the Python side reads.
_NATIVE_ORDER = (
    "num_candidates",
    "max_iter",
    "global_search",
    "screen_iter",
    "screen_ratio",
    "object_ratio",
    "num_eigvecs",
    "solid_eigvecs",
    "thin_ratio",
    "so3_iters",
    "so3_damping",
    "dedupe",
    "behind_penalty",
    "duplicate_penalty",
    "candidate_cutoff",
    "lm_damping",
    "lm_rtol",
    "lm_atol",
    "depth_floor",
    "polish_steps",
    "well_posed_ratio",
    "depth_margin",
    "small_problem",
    "ambiguity_threshold",
    "escalate",
    "escalate_ratio",
    "check_warm_start",
    "warm_start_ratio",
    "cube_starts",
    "escalate_misfit",
)
_KINDS = {f.name: f.type for cls in (SolverOptions, _Tuning) for f in fields(cls)}
NATIVE_FIELDS: tuple[tuple[str, type], ...] = tuple(
    (name, int if _KINDS[name] in ("int", "bool") else float) for name in _NATIVE_ORDER
)
