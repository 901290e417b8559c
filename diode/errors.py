"""One exception tree for the whole project, each error carrying a reason code.

The receive path turns any input into either a result or a :class:`FrameError`;
config problems become :class:`ConfigError`, which the commands turn into exit
status 2 and one line naming the file and the key.
"""

from __future__ import annotations


class DiodeError(Exception):
    """Base of every error this project raises on purpose."""

    reason: str = "error"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class ConfigError(DiodeError):
    """A config file that cannot be used: names the file, the key and what is expected."""

    reason = "config"

    def __init__(self, path: str, key: str, message: str) -> None:
        self.path = path
        self.key = key
        self.detail = message
        where = f"{path}: {key}: " if key else f"{path}: "
        super().__init__(where + message)


class KeyFileError(DiodeError):
    """A key file that is missing, unreadable or not a key of the expected kind."""

    reason = "key"


class LinkError(DiodeError):
    """The one-way link cannot be set up (socket, address, buffer)."""

    reason = "link"


class FrameError(DiodeError):
    """A datagram or block that was rejected; ``reason`` is the counter it bumps."""

    reason = "malformed"


class SettingError(DiodeError):
    """A setting that is valid on paper but cannot be used on this host at start.

    A port already in use, an address that is not this host's, a state_dir that
    is a file, a folder the daemon may not write: the daemons print it as one
    line naming the config file and the key, and exit with status 2.
    """

    reason = "setting"

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        self.detail = message
        super().__init__(f"{key}: {message}")
