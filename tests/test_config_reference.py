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
