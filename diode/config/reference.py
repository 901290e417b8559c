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

_VALUE_TYPE_ROWS = [
    (
        "`bool`",
        "coil, discrete input, `bit` of a register; OPC UA Boolean",
        "`true` / `false`",
    ),
    (
        "`int8`, `uint8`",
        'Modbus: the `byte = "high"` or `"low"` half of a register; OPC UA SByte, Byte',
        "number",
    ),
    (
        "`int16` ... `uint64`",
        "registers in the tag's `order`; OPC UA integers",
        "number (exact, up to 64 bits)",
    ),
    (
        "`float32`",
        "Modbus float32; OPC UA Float",
        "the shortest decimal that reads back to the same float32: `12.47`, not "
        "`12.470000267028809`",
    ),
    (
        "`float64`",
        "Modbus float64; OPC UA Double",
        "the shortest decimal that reads back to the same float64 (every digit it has)",
    ),
    (
        "`string`",
        "Modbus registers: up to the first NUL, trailing spaces dropped, in the tag's "
        '`encoding` (`"ascii"`, `"utf-8"`, `"latin-1"`); the first character in the high '
        "byte (`order` ABCD, CDAB) or the low byte (BADC, DCBA); OPC UA String",
        "text",
    ),
    (
        "`bytestring`",
        "OPC UA ByteString",
        "base64 text (RFC 4648, padded)",
    ),
    (
        "`datetime`",
        "OPC UA DateTime",
        "RFC 3339 text in UTC with microseconds",
    ),
    (
        "`localized_text`",
        "OPC UA LocalizedText",
        '`{"text": "Hallo", "locale": "de-DE"}`',
    ),
    (
        "`guid`",
        "OPC UA Guid",
        '`"72962b91-fa75-4ae6-8d28-b404dc7daf63"`',
    ),
    (
        "`node_id`",
        "OPC UA NodeId, ExpandedNodeId",
        '`"ns=2;s=Tank.Level"`',
    ),
    (
        "`qualified_name`",
        "OPC UA QualifiedName",
        '`"2:Name"`',
    ),
    (
        "`status_code`",
        "OPC UA StatusCode",
        '`{"code": 2156658688, "name": "BadSensorFailure"}`',
    ),
]

VALUE_TYPES = """\
### Value types and how they are published

A tag's `type` (Modbus: required; OPC UA: learnt from the node's DataType when
unset) goes out in the catalogue and says how the receiver writes the value
in the MQTT payload's `"value"`. An OPC UA array is published as a JSON array
of its elements (an array of arrays for a matrix); its type is its elements'.

| type | from | published as |
|---|---|---|
{rows}

Non-finite floats are the strings `"NaN"`, `"Infinity"`, `"-Infinity"`. A
Modbus number with `scale` or `offset` is computed in float64 and published in
full. A value the link cannot carry (a timestamp past the year 2262, text that
is not valid in its encoding, an OPC UA structure, a value larger than a block)
is published BAD, `"value": null`, with the reason; no other value is affected.
A deadband compares with the last value *sent*: a slow drift is reported once it
moves a deadband away, and a value turning NaN, or back, is always a change.
"""


EXAMPLES = """\
## Examples: topic layouts and Sparkplug B

### A Unified Namespace (ISA-95) for JSON

The default `topic_template` is `{prefix}/{site}/{area}/{device}/{tag}`: the
ISA-95 levels enterprise (`prefix`), site, area and line (`areas`, per device
of the catalogue), then the device (the PLC as the transmitter names it) and
the tag. The catalogue knows devices and tags only, so area and line come from
this file; a device without an entry in `areas` takes `default_area`, and an
empty area leaves its level out (`acme/lyon/plc1/level`).

```toml
[[streams]]
id = 1
public_keys = ["keys/tx.pub"]

[streams.output]
prefix = "acme"                 # enterprise
site = "lyon"
default_area = "utilities"      # devices not listed below
areas = { plc1 = "packaging/line2", plc2 = "packaging/line3", boiler = "energy/steam" }
# acme/lyon/packaging/line2/plc1/level      {"value": 2.25, "ts": "...", "quality": "good", ...}
# acme/lyon/packaging/line2/plc1/$inventory (retained)
# acme/lyon/$status                         (retained)
```

Batched payloads use `{prefix}/{site}/{area}/{device}`. Another layout, e.g.
with a fixed namespace root: `topic_template = "uns/{site}/{area}/{device}/{tag}"`.

### Sparkplug B 3.0

`payload = "sparkplug"` makes the stream an edge node with one device per PLC
(see docs/OPERATIONS.md for connecting Ignition or another host):

```toml
[streams.output]
payload = "sparkplug"
qos = 0                         # Sparkplug 3.0 sends births and data at QoS 0
link_timeout_s = 5.0            # no heartbeat this long: DDEATH for every device

[streams.output.sparkplug]
group_id = "lyon"
edge_node_id = "diode-rx-1"
primary_host_id = "scada"       # optional: NBIRTH only while spBv1.0/STATE/scada is online
# spBv1.0/lyon/NBIRTH/diode-rx-1, spBv1.0/lyon/DBIRTH/diode-rx-1/plc1, .../DDATA/..., ...
```
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
    if origin in (list, dict):
        kind = "list" if origin is list else "table"
        return f"{kind} of {_type_name(args[-1])}"
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
        if model is TxConfig:
            rows = "\n".join(f"| {a} | {b} | {c} |" for a, b, c in _VALUE_TYPE_ROWS)
            parts.append(VALUE_TYPES.format(rows=rows))
    parts.append(EXAMPLES)
    return "\n".join(parts).rstrip() + "\n"


if __name__ == "__main__":
    print(render(), end="")
