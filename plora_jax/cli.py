"""Command-line flags generated from frozen config dataclasses, so flags and config never drift.

Each field becomes `--field-name` with the field's type and default: bools become
`--flag/--no-flag`, `X | None` takes an X, `tuple[int, ...]` takes several values. The help text
comes from the comment after the field in its source, when there is one.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import types
import typing
from typing import Any


def _field_comments(cls) -> dict[str, str]:
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    return dict(re.findall(r"^\s+(\w+):[^#\n]*#\s*(.+)$", source, flags=re.M))


def unwrap_optional(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def add_dataclass_args(
    parser: argparse.ArgumentParser, cls, exclude: tuple[str, ...] = (), title: str | None = None
) -> None:
    hints = typing.get_type_hints(cls)
    comments = _field_comments(cls)
    group = parser.add_argument_group(title or cls.__name__)
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        flag = "--" + f.name.replace("_", "-")
        tp = unwrap_optional(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f"{comments.get(f.name, '')} (default: {default})".strip().replace("%", "%%")  # argparse formats it
        if tp is bool:
            group.add_argument(
                flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default, help=help_text
            )
        elif typing.get_origin(tp) is tuple:
            group.add_argument(
                flag, dest=f.name, nargs="*", type=typing.get_args(tp)[0], default=default, help=help_text
            )
        elif tp in (int, float, str):
            group.add_argument(flag, dest=f.name, type=tp, default=default, help=help_text)
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: no CLI mapping for type {tp}")


def dataclass_from_args(cls, args: argparse.Namespace, exclude: tuple[str, ...] = (), **extra: Any):
    values = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(cls)
        if f.name not in exclude and hasattr(args, f.name)
    }
    return cls(**values, **extra)
