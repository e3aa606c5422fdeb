"""What :func:`torch.compile` needs to know about bpnp's Python code."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TypeVar

import torch

F = TypeVar("F", bound=Callable)


def constant_for_compiler(fn: F) -> F:
    """Mark ``fn`` as returning a constant under :func:`torch.compile`
    (:func:`torch.compiler.assume_constant_result`): the compiler calls it once while tracing
    and keeps the answer instead of tracing its body (locks, JSON, ctypes).

    The decorator imports ``torch._dynamo`` (about a second, and dozens of modules); at bpnp's
    import time, unless it is already loaded, the same marker is set directly.
    """
    if "torch._dynamo" in sys.modules:
        return torch.compiler.assume_constant_result(fn)
    fn._dynamo_marked_constant = True  # type: ignore[attr-defined]  # the attribute that decorator sets
    return fn
