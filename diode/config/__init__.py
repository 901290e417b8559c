"""Config files: TOML read once into frozen, validated models.

Every section is a :class:`Section`: unknown keys are errors, types are strict
(``port = "502"`` is a string, not a port), values are range-checked, and
cross-field rules run at load time. :func:`load` turns the first problem into a
:class:`~diode.errors.ConfigError` naming the file, the dotted key and what is
expected, which the commands print as one line before exiting with status 2.
"""

from __future__ import annotations

import ipaddress
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError

from diode.errors import ConfigError, KeyFileError


class Section(BaseModel):
    """Base of every config section: frozen, strict, no unknown keys."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


M = TypeVar("M", bound=Section)
T = TypeVar("T")


def _ip_literal(value: str) -> str:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(f"expected an IP address, got {value!r}") from None
    return value


# An address, not a name: a one-way link has no DNS (and no ARP replies either).
IpAddress = Annotated[str, AfterValidator(_ip_literal)]


def key_error(key: str, message: str) -> ValidationError:
    """A cross-field error of a section, raised from its model validator, reported at ``key``.

    A plain ``ValueError`` there names the section only (``mqtt``); this names the key
    (``mqtt.socket``) that the operator has to change.
    """
    detail = InitErrorDetails(
        type=PydanticCustomError("value_error", message), loc=(key,), input=None
    )
    return ValidationError.from_exception_data("Section", [detail])


def dotted(loc: tuple[int | str, ...]) -> str:
    """``("modbus", "devices", 0, "port")`` -> ``modbus.devices[0].port``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out


def _describe(error: Any) -> tuple[str, str]:
    # pydantic puts the tag of a tagged union into the location; drop the noise
    # parts ("function-after[...]", "tagged-union[...]") so the key reads as in the file.
    loc = tuple(
        p for p in error["loc"] if not (isinstance(p, str) and ("[" in p or p.endswith("]")))
    )
    message = error["msg"]
    if error["type"] == "extra_forbidden":
        message = "unknown key"
    elif error["type"] == "missing":
        message = "required key is missing"
    elif "input" in error and error["type"] not in ("value_error", "assertion_error"):
        given = error["input"]
        if not isinstance(given, dict | list):
            message += f" (got {given!r})"
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    return dotted(loc), message


def validate(model: type[M], data: dict[str, Any], path: str) -> M:
    """Validate ``data`` as ``model``; the first error becomes a ConfigError."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        key, message = _describe(exc.errors()[0])
        more = len(exc.errors()) - 1
        if more:
            message += f" (and {more} more problem{'s' if more > 1 else ''})"
        raise ConfigError(path, key, message) from None


def read_toml(path: Path) -> dict[str, Any]:
    """The file's TOML as a dict; unreadable or invalid files become ConfigError."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(str(path), "", f"cannot read the file: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(str(path), "", "not a UTF-8 text file") from None
    if not text.strip():
        raise ConfigError(str(path), "", "the file is empty")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), "", f"not valid TOML: {exc}") from None


def load(model: type[M], path: Path) -> M:
    """Read and validate one config file."""
    config = validate(model, read_toml(path), str(path))
    check = getattr(config, "check_files", None)
    if check is not None:
        check(path)
    return config


def checked(path: Path, key: str, check: Callable[[Path], T], file: Path) -> T:
    """``check(file)``, its KeyFileError becoming a ConfigError naming the config file and key."""
    try:
        return check(file)
    except KeyFileError as exc:
        raise ConfigError(str(path), key, str(exc)) from None
