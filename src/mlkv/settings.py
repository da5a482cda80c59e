"""Command-line flags built from settings dataclasses, so that a setting is declared once.

A settings class is a dataclass whose fields carry their help as an attribute docstring, as litgpt's configs do::

    @dataclass
    class TrainConfig:
        seq_len: int = setting(2048, group="budget and batch")
        \"\"\"Tokens per training sequence.\"\"\"

``add_arguments(parser, TrainConfig)`` adds ``--seq-len`` (type ``int``, default 2048, the docstring as help, the
default shown), and ``from_args(TrainConfig, args)`` builds the dataclass back. Field names are the flag names with
``_`` for ``-``; ``setting()`` adds what a type cannot say: choices, aliases, a group, a metavar.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from functools import cache
from typing import Any

__all__ = ["setting", "field_docs", "add_arguments", "from_args"]


def setting(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING, choices=None,
            aliases: tuple[str, ...] = (), group: str | None = None, metavar: str | None = None,
            cli: bool = True) -> Any:
    """A dataclass field with command-line metadata (``cli=False``: not a flag)."""
    meta = {"choices": choices, "aliases": tuple(aliases), "group": group, "metavar": metavar, "cli": cli}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=meta)


@cache
def field_docs(cls: type) -> dict[str, str]:
    """``{field: docstring}`` from the string literal right after each annotated field in the class body (and its
    dataclass bases)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is object:
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):  # no source (frozen app, REPL): no help text
            continue
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, after in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _base_type(annotation: Any) -> tuple[Any, bool]:
    """(the non-None type, whether it is a list) of a field annotation such as ``int | None`` or ``list[str]``."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return _base_type(args[0])
        return str, False  # e.g. int | str: parsed by the command itself
    if origin is list:
        return typing.get_args(annotation)[0], True
    return annotation, False


def add_arguments(parser: argparse.ArgumentParser, cls: type, *, exclude: tuple[str, ...] = (),
                  defaults: dict[str, Any] | None = None) -> argparse.ArgumentParser:
    """Add one flag per field of the dataclass ``cls`` (``--field-name``), grouped by ``setting(group=...)``.

    ``defaults`` overrides a field's default for this command only (reproduce's uptraining uses other defaults).
    Every flag gets help text: a field without a docstring is a programming error caught by the CLI test."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    groups: dict[str | None, Any] = {}
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if f.name in exclude or not meta.get("cli", True):
            continue
        group_name = meta.get("group")
        if group_name not in groups:
            groups[group_name] = parser.add_argument_group(group_name) if group_name else parser
        kind, is_list = _base_type(hints[f.name])
        default = (defaults or {}).get(f.name, f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None))
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        flags = ["--" + f.name.replace("_", "-"), *meta.get("aliases", ())]
        help_ = docs.get(f.name, "")
        kw: dict[str, Any] = {"dest": f.name, "help": help_}
        if kind is bool:
            kw.update(action=argparse.BooleanOptionalAction, default=default)
        else:
            kw.update(type=kind if kind in (int, float) else str, default=default)
            if is_list:
                kw["nargs"] = "+"
            if required:
                kw["required"] = True
            if meta.get("choices"):
                kw["choices"] = meta["choices"]
            if meta.get("metavar"):
                kw["metavar"] = meta["metavar"]
        if default not in (None, False, [], ()) and kind is not bool and "%(default)" not in help_:
            kw["help"] = f"{help_} (default: %(default)s)".strip()
        groups[group_name].add_argument(*flags, **kw)
    return parser


def from_args(cls: type, args: argparse.Namespace, **overrides: Any):
    """The dataclass ``cls`` from parsed flags (fields without a flag keep their default)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    values.update(overrides)
    return cls(**values)
