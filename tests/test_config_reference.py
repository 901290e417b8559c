"""docs/CONFIG.md is generated from the config models; it must be current."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from pydantic import BaseModel

from diode.config.reference import nested_model, render
from diode.config.rx import RxConfig
from diode.config.tx import TxConfig

DOC = Path(__file__).resolve().parent.parent / "docs" / "CONFIG.md"


def test_config_reference_is_current() -> None:
    assert DOC.read_text() == render(), (
        "docs/CONFIG.md is stale: run `python -m diode.config.reference > docs/CONFIG.md`"
    )


def _undocumented(model: type[BaseModel], path: str) -> Iterator[str]:
    for name, field in model.model_fields.items():
        nested = nested_model(field.annotation)
        if nested is not None:
            yield from _undocumented(nested, f"{path}.{name}")
        elif not field.description:
            yield f"{path}.{name}"


def test_every_key_is_documented() -> None:
    missing = [*_undocumented(TxConfig, "tx"), *_undocumented(RxConfig, "rx")]
    assert missing == []


def test_the_receiver_examples_are_valid_config() -> None:
    import re
    import tomllib

    from diode.config import validate
    from diode.config.reference import EXAMPLES

    blocks = re.findall(r"```toml\n(.*?)```", EXAMPLES, re.S)
    assert len(blocks) == 2
    receiver = {"listen": "192.0.2.1"}  # the examples show streams only
    uns = tomllib.loads(blocks[0])
    config = validate(RxConfig, {"receiver": receiver, **uns}, "example")
    assert config.streams[0].output.areas["plc1"] == "packaging/line2"
    sparkplug = tomllib.loads(blocks[1])
    stream = {"id": 1, "public_keys": ["k.pub"], "output": sparkplug["streams"]["output"]}
    config = validate(RxConfig, {"receiver": receiver, "streams": [stream]}, "example")
    assert config.streams[0].output.sparkplug.primary_host_id == "scada"
