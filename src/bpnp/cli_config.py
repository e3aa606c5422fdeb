"""Command-line options built from configuration dataclasses: one source for names, defaults, help.

A field becomes an option when its metadata has a ``help`` (see :func:`bpnp.pose.config.option`):
``batch_size`` -> ``--batch-size`` (or the metadata's ``flag``), typed by its annotation (``bool``
fields get ``--x`` / ``--no-x``), its choices from the metadata's ``choices``, its default taken
from the dataclass (or from a given instance) and shown in the help. Values are checked where the
dataclass checks them (its ``__post_init__``); :func:`config_from_args` turns such a check's
``ValueError`` into one line naming the option.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["add_config_options", "config_values", "config_from_args", "ConfigError"]


class ConfigError(ValueError):
    """A value the configuration refuses, in the words of the command line (``--steps: ...``)."""


def _field_default(config: Any, f: dataclasses.Field) -> Any:
    if not isinstance(config, type):
        return getattr(config, f.name)
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag", "--" + f.name.replace("_", "-"))


def _parser_of(annotation: str) -> Callable[[str], Any] | None:
    base = annotation.replace(" | None", "").strip()
    return {"int": int, "float": float, "str": str}.get(base)


def _fields(config: Any, names: Iterable[str] | None) -> list[dataclasses.Field]:
    cls = config if isinstance(config, type) else type(config)
    found = [f for f in dataclasses.fields(cls) if "help" in f.metadata]
    if names is None:
        return found
    wanted = list(names)
    by_name = {f.name: f for f in found}
    missing = [n for n in wanted if n not in by_name]
    if missing:
        raise KeyError(f"{cls.__name__} has no documented fields {missing}")
    return [by_name[n] for n in wanted]


def add_config_options(
    parser: argparse.ArgumentParser,
    config: Any,
    names: Iterable[str] | None = None,
    *,
    parsers: dict[str, Callable[[str], Any]] | None = None,
    unset: bool = False,
    note: str = "",
) -> None:
    """Add an option per documented field of ``config`` (a dataclass or an instance of one).

    Args:
        names: the fields to expose, in this order (None: every documented one).
        parsers: a parser per field name where the annotation's is not enough (e.g. a device).
        unset: the options' default is None, so that only what the command line gives overrides
            another source (a ``--config`` file); the help still shows the dataclass's default.
        note: appended to every help text.
    """
    for f in _fields(config, names):
        default = _field_default(config, f)
        shown = "on" if default is True else "off" if default is False else default
        help_text = f.metadata["help"] + note + (f" (default {shown})" if default not in (None, "") else "")
        kw: dict[str, Any] = {"dest": f.name, "help": help_text, "default": None if unset else default}
        if f.type == "bool":
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = (parsers or {}).get(f.name) or _parser_of(str(f.type)) or str
            if "nargs" in f.metadata:  # a fixed-length tuple of numbers
                kw.update(type=float, nargs=f.metadata["nargs"])
            if "choices" in f.metadata:
                kw["choices"] = tuple(f.metadata["choices"])
            kw["metavar"] = f.metadata.get("metavar", _flag(f)[2:].upper().replace("-", "_"))
        parser.add_argument(_flag(f), **kw)


def config_values(args: argparse.Namespace, config: Any, names: Iterable[str] | None = None) -> dict[str, Any]:
    """The fields the command line set (not None), by field name."""
    return {f.name: getattr(args, f.name) for f in _fields(config, names) if getattr(args, f.name, None) is not None}


def config_from_args(cls: type, values: dict[str, Any]) -> Any:
    """``cls(**values)``, a refused value reported as :class:`ConfigError` with the option's name
    (the dataclass's messages begin ``<field>: ...``)."""
    try:
        return cls(**values)
    except ValueError as exc:
        raise ConfigError(in_option_words(cls, str(exc))) from None


def in_option_words(cls: type, message: str) -> str:
    """``"beta: expected ..."`` -> ``"--beta: expected ..."`` for a field of ``cls``."""
    head, sep, rest = message.partition(":")
    for f in dataclasses.fields(cls):
        if sep and head == f.name:
            return f"{_flag(f)}:{rest}"
    return message
