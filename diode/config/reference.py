"""docs/CONFIG.md, written from the config models themselves so it cannot drift.

``python -m diode.config.reference > docs/CONFIG.md`` regenerates it; a test
checks the file in the repository is current.
"""

from __future__ import annotations

import enum
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from diode.config.rx import RxConfig
from diode.config.tx import TxConfig

INTRO = """\
# Configuration reference

One TOML file per daemon: `/etc/diode/tx.toml` for the transmitter,
`/etc/diode/rx.toml` for the receiver. Commented examples are in
`systemd/examples/`. Both files are validated at start and by
`diode check-config FILE`: an unknown key, a wrong type, a value out of range,
inconsistent settings (datagram size against the MTU, FEC parameters), a
missing, empty or garbled key file, the wrong half of a key pair, a secret
(private key, link secret, password, client key) that others can read, one
public key under two streams, a folder that is a file or cannot be written, or
an address that is not this host's is an error naming the file and the key;
the daemon exits with status 2 and prints no traceback (so does a port already
in use at start). Types are strict: `port = "502"` is a string, not a port.
Relative paths are relative to the config file's folder. Everything a daemon
writes goes under its `state_dir` unless a path is set explicitly.
A section written `a.b[]` is an array of tables: `[[a.b]]` in TOML.

This page is generated from the code (`python -m diode.config.reference`).
"""


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin in (typing.Union, types.UnionType):
        names = [_type_name(a) for a in args if a is not type(None)]
        optional = type(None) in args
        return " or ".join(names) + (" (optional)" if optional else "")
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if origin is typing.Literal:
        return " or ".join(repr(a) for a in args)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return " or ".join(f'"{m.value}"' for m in annotation)
    named = {Path: "path"}
    return named.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _default(field: FieldInfo) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "**required**"
    if field.default_factory is not None:
        return "(table)" if isinstance(field.default_factory, type) else "`[]`"
    value = field.default
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, str):
        return f'`"{value}"`'
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if value is None:
        return "(none)"
    return f"`{value}`"


def _limits(field: FieldInfo) -> str:
    out = []
    for meta in field.metadata:
        for name, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            bound = getattr(meta, name, None)
            if bound is not None:
                out.append(f"{sign} {bound}")
        pattern = getattr(meta, "pattern", None)
        if pattern:
            out.append(f"matches `{pattern}`")
    return ", ".join(out)


def nested_model(annotation: Any) -> type[BaseModel] | None:
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
        for inner in typing.get_args(candidate):
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                return inner
    return None


def _sections(model: type[BaseModel], path: str) -> Iterator[str]:
    rows = []
    children = []
    for name, field in model.model_fields.items():
        nested = nested_model(field.annotation)
        if nested is not None:
            many = typing.get_origin(field.annotation) is list
            where = f"{path}.{name}" if path else name
            children.append((f"{where}[]" if many else where, nested))
            continue
        doc = (field.description or "").replace("|", "\\|")
        limits = _limits(field)
        rows.append(
            f"| `{name}` | {_type_name(field.annotation)} | {_default(field)} | "
            f"{doc}{' (' + limits + ')' if limits else ''} |"
        )
    if rows:
        yield f"### `{path}`\n"
        if model.__doc__:
            yield " ".join(model.__doc__.split()) + "\n"
        yield "| key | type | default | meaning |\n|---|---|---|---|"
        yield from rows
        yield ""
    for where, section in children:
        yield from _sections(section, where)


def render() -> str:
    parts = [INTRO]
    for title, model in (("Transmitter (`tx.toml`)", TxConfig), ("Receiver (`rx.toml`)", RxConfig)):
        parts.append(f"## {title}\n")
        parts.extend(_sections(model, ""))
    return "\n".join(parts).rstrip() + "\n"


if __name__ == "__main__":
    print(render(), end="")
