"""Every config key with its type, default, allowed values and the comment that explains it
(``mimscale config list``, the section list of ``python -m mimscale.pretrain --help``).

Read from the dataclass tree itself (config.Config and each method's section from the registry), so
the listing cannot drift from what the loader accepts. The explanations are the comments beside
(or directly above) each field in the source: the one place they are written.
"""
from __future__ import annotations

import dataclasses
import inspect
import io
import textwrap
import tokenize
import typing
from dataclasses import dataclass
from typing import Any, Literal, Optional

from mimscale.config import Config


@dataclass(frozen=True)
class Key:
    key: str  # dotted, e.g. "train.base_lr"
    type: str  # "int", "float", "bool", "str", "choice"; "... or null" when null is allowed
    default: Any
    allowed: tuple[str, ...]  # the closed choices of a "choice" key, else empty
    doc: str  # the source's comment for the field ("" when it has none)


def type_name(hint: Any) -> tuple[str, tuple[str, ...]]:
    """(a short type name, the allowed values of a Literal) for a field's annotation."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "choice", tuple(str(a) for a in typing.get_args(hint))
    if origin is typing.Union:  # Optional[X]
        inner, allowed = type_name(next(a for a in typing.get_args(hint) if a is not type(None)))
        return f"{inner} or null", allowed
    return getattr(hint, "__name__", str(hint)), ()


def field_comments(cls: type) -> dict[str, str]:
    """{field: its comment} from ``cls``'s source: the comment lines directly above the field and
    the one after it on its line, joined. Classes without source (make_dataclass) give {}."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))  # a class defined in a block is indented
    except (OSError, TypeError):
        return {}
    names = {f.name for f in dataclasses.fields(cls)}
    out: dict[str, str] = {}
    above: list[str] = []
    current: Optional[str] = None  # the field whose line is being read
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            if current is not None:  # on the field's own line
                out[current] = " ".join([*above, text]).strip() if current not in out else out[current]
            else:
                above.append(text)
        elif tok.type == tokenize.NAME and tok.start[1] == 4 and tok.string in names and current is None:
            current = tok.string
        elif tok.type == tokenize.NEWLINE:
            if current is not None:
                out.setdefault(current, " ".join(above).strip())
                above, current = [], None
        elif tok.type == tokenize.NL and current is None and not tok.line.strip():
            above = []  # a blank line ends a comment block
    return out


def keys(obj: Any = None, prefix: str = "") -> list[Key]:
    """Every leaf key of the config tree under ``obj`` (default: a fresh Config), in field order."""
    obj = Config() if obj is None else obj
    hints = typing.get_type_hints(type(obj))
    docs = field_comments(type(obj))
    out: list[Key] = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            out.extend(keys(value, key + "."))
        else:
            name, allowed = type_name(hints[f.name])
            out.append(Key(key, name, value, allowed, docs.get(f.name, "")))
    return out


def sections() -> dict[str, list[str]]:
    """{section: its keys' last names}, top-level keys under "" (for --help)."""
    out: dict[str, list[str]] = {}
    for k in keys():
        head, _, tail = k.key.rpartition(".")
        out.setdefault(head, []).append(tail)
    return out


def render(selected: list[Key], docs: bool = True) -> str:
    """One line per key: key, type, default, allowed values; its comment indented below."""
    width = max((len(k.key) for k in selected), default=0)
    lines = []
    for k in selected:
        default = "null" if k.default is None else repr(k.default) if isinstance(k.default, str) else k.default
        allowed = f"  one of: {', '.join(k.allowed)}" if k.allowed else ""
        lines.append(f"{k.key:<{width}}  {k.type:<14} default {default}{allowed}")
        if docs and k.doc:
            lines.append(f"{'':<{width}}    {k.doc}")
    return "\n".join(lines)


def help_epilog() -> str:
    """The config sections and their keys, for ``--help`` (details: ``mimscale config list``)."""
    lines = ["config sections and keys (set any with --set section.key=value; types, defaults, allowed values",
             "and what each does: mimscale config list [SECTION]):"]
    for section, names in sections().items():
        lines.append(f"  {section or '(top level)'}: {', '.join(names)}")
    return "\n".join(lines)
