"""The receiver's end of the link: buffer sizing, kernel drops, and a receive-only socket."""

from __future__ import annotations

import socket
from pathlib import Path

from structlog.testing import capture_logs

from receiver.app import kernel_drops, open_link_socket, size_receive_buffer


def test_a_capped_buffer_is_read_back_and_the_sysctl_named() -> None:
    rmem_max = int(Path("/proc/sys/net/core/rmem_max").read_text())
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock, capture_logs() as logs:
        granted = size_receive_buffer(sock, rmem_max * 4, force=False)
    assert granted < rmem_max * 4
    (warning,) = [e for e in logs if e["event"] == "receive buffer capped by the kernel"]
    assert warning["granted"] == granted
    assert "net.core.rmem_max" in warning["fix"]


def test_as_root_the_buffer_asked_for_is_granted() -> None:
    sock = open_link_socket("127.0.0.1", 0, 8 * 1024 * 1024)
    with sock:
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 2 >= 8 * 1024 * 1024


def test_kernel_drops_are_counted_when_the_queue_overflows() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink:
        sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sink.bind(("127.0.0.1", 0))
        assert kernel_drops(sink) == 0
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as source:
            for _ in range(200):
                source.sendto(b"x" * 1400, sink.getsockname())
        assert kernel_drops(sink) > 0
