"""The one-way nftables rules: their text, nft's own check, and their effect.

The last tests build two network namespaces joined by a veth pair, load the
rules the way docs/OPERATIONS.md says, and send real datagrams: what the
rules must stop does not arrive, and the transmitter reaches the receiver
only through a static neighbour entry, as on a real one-way link. A third
namespace plays a host on the IT side, routed to the receiver: it must not
reach the link port, neither through the rules nor through a receiver socket
pinned to the link interface (``receiver.interface``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from diode.cli import main
from diode.keys import write_keypair
from diode.linkrules import ARP_TABLE, TABLE, rules

NFT_PACKAGE = "nftables"


def ensure_nft() -> str:
    """The nft binary; installed with apt-get when missing and we are root (as the
    Makefile does for mosquitto), else the test is skipped saying exactly why."""
    found = shutil.which("nft") or ("/usr/sbin/nft" if os.path.exists("/usr/sbin/nft") else None)
    if found:
        return found
    if os.geteuid() != 0:
        pytest.skip(f"nft is missing and we are not root: apt-get install {NFT_PACKAGE}")
    if shutil.which("apt-get") is None:
        pytest.skip(f"nft is missing and there is no apt-get to install {NFT_PACKAGE}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", NFT_PACKAGE]
    if subprocess.run(install, env=env, capture_output=True, check=False).returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, check=False)
        done = subprocess.run(install, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            pytest.skip(f"nft is missing and apt-get install {NFT_PACKAGE} failed: {done.stderr}")
    found = shutil.which("nft") or "/usr/sbin/nft"
    if not os.path.exists(found):
        pytest.skip(f"apt-get installed {NFT_PACKAGE} but no nft binary was found")
    return found


# -- the text ---------------------------------------------------------------------------


def rule_lines(ruleset: str) -> list[str]:
    return [line.strip() for line in ruleset.splitlines() if "drop" in line and "#" not in line]


def test_transmitter_drops_everything_arriving_on_the_link() -> None:
    text = rules("tx", "eth1")
    assert f"table inet {TABLE}" in text
    assert f"table arp {ARP_TABLE}" in text
    assert "hook input" in text
    assert "hook forward" in text
    assert "hook output" not in text  # the transmitter sends: its output stays open
    drops = rule_lines(text)
    assert any(line.startswith('iifname "eth1" counter drop') for line in drops)
    assert any(line.startswith('oifname "eth1" counter drop') for line in drops)  # no routing
    assert len(drops) == 4


def test_receiver_drops_everything_leaving_on_the_link_arp_included() -> None:
    text = rules("rx", "eth1")
    assert "hook output" in text
    assert "hook forward" in text
    arp = text[text.index(f"table arp {ARP_TABLE}") :]
    assert "hook output" in arp
    assert 'oifname "eth1" counter drop' in arp
    assert len(rule_lines(text)) == 6


def test_receiver_takes_the_link_port_from_the_link_only() -> None:
    text = rules("rx", "eth1", (5141, 5140))
    chain = text[text.index("chain input") : text.index("chain output")]
    lines = [line.strip() for line in chain.splitlines()]
    accept = next(i for i, line in enumerate(lines) if " accept comment" in line)
    assert lines[accept].startswith('iifname "eth1" udp dport { 5140, 5141 } accept')
    # after the accept: the rest of the link dropped, then the port everywhere else
    assert lines[accept + 1].startswith('iifname "eth1" counter drop')
    assert lines[accept + 2].startswith("udp dport { 5140, 5141 } counter drop")
    assert "--port 5140 --port 5141" in text


@pytest.mark.parametrize("ports", [(), (0,), (65536,)])
def test_rejects_a_bad_port(ports: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="ports"):
        rules("rx", "eth1", ports)


@pytest.mark.parametrize("side", ["tx", "rx"])
def test_every_rule_and_chain_is_explained(side: str) -> None:
    text = rules(side, "eth1")
    for line in text.splitlines():
        if "drop" in line and not line.lstrip().startswith("#"):
            assert 'comment "' in line, line
    # a comment block precedes each table and each inet chain
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("table ") or line.strip().startswith("chain "):
            assert lines[i - 1].strip().startswith("#"), line


@pytest.mark.parametrize("side", ["tx", "rx"])
def test_loading_twice_replaces_instead_of_duplicating(side: str) -> None:
    text = rules(side, "eth1")
    # add + delete before the definitions: one transaction that replaces the tables
    assert text.index(f"delete table inet {TABLE}") < text.index(f"table inet {TABLE} {{")
    assert text.index(f"delete table arp {ARP_TABLE}") < text.index(f"table arp {ARP_TABLE} {{")


@pytest.mark.parametrize(
    ("side", "interface"),
    [("both", "eth1"), ("tx", ""), ("tx", "a" * 16), ("rx", 'eth1" accept'), ("rx", "eth 1")],
)
def test_rejects_a_bad_side_or_interface(side: str, interface: str) -> None:
    with pytest.raises(ValueError, match=r"side|interface"):
        rules(side, interface)


def test_cli_prints_the_rules(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["link-rules", "rx", "--interface", "enp3s0"]) == 0
    assert capsys.readouterr().out == rules("rx", "enp3s0") + "\n"
    assert main(["link-rules", "rx", "--interface", "enp3s0", "--port", "6000"]) == 0
    assert capsys.readouterr().out == rules("rx", "enp3s0", (6000,)) + "\n"


# -- nft's own check ---------------------------------------------------------------------


@pytest.mark.parametrize("side", ["tx", "rx"])
@pytest.mark.parametrize("interface", ["eth1", "enp3s0f1", "diode0", "bond0.100"])
def test_nft_accepts_the_ruleset(side: str, interface: str) -> None:
    nft = ensure_nft()
    # -c: parse and check against the kernel in a transaction that is never committed.
    done = subprocess.run(
        [nft, "-c", "-f", "-"],
        input=rules(side, interface),
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr


# -- the effect, between two network namespaces ---------------------------------------

RECEIVE = textwrap.dedent(
    """
    import socket, sys
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((sys.argv[1], int(sys.argv[2])))
    s.settimeout(float(sys.argv[3]))
    print("listening", flush=True)
    try:
        print(s.recv(2048).decode(), flush=True)
    except TimeoutError:
        print("nothing", flush=True)
    """
)
SEND = textwrap.dedent(
    """
    import socket, sys, time
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for _ in range(10):
        try:
            s.sendto(sys.argv[3].encode(), (sys.argv[1], int(sys.argv[2])))
        except OSError:
            pass  # EPERM from the output rule: the point of it
        time.sleep(0.05)
    """
)
TX_IP, RX_IP, PORT = "192.0.2.1", "192.0.2.2", 5140


@dataclass
class Link:
    """Two namespaces, ``tx`` and ``rx``, joined by veth ``tx_if`` <-> ``rx_if``."""

    nft: str
    tx: str
    rx: str
    tx_if: str
    rx_if: str

    def run(self, ns: str, *argv: str, stdin: str | None = None) -> str:
        done = subprocess.run(
            ["ip", "netns", "exec", ns, *argv],
            input=stdin,
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0, f"{argv}: {done.stderr}"
        return done.stdout

    def load(self, ns: str, side: str) -> None:
        iface = self.tx_if if ns == self.tx else self.rx_if
        self.run(ns, self.nft, "-f", "-", stdin=rules(side, iface))

    def unload(self, ns: str) -> None:
        self.run(ns, self.nft, "delete", "table", "inet", TABLE)
        self.run(ns, self.nft, "delete", "table", "arp", ARP_TABLE)

    def mac(self, ns: str, iface: str) -> str:
        return self.run(ns, "cat", f"/sys/class/net/{iface}/address").strip()

    def static_neighbour(self, ns: str, iface: str, ip: str, mac: str) -> None:
        self.run(ns, "ip", "neigh", "replace", ip, "lladdr", mac, "dev", iface, "nud", "permanent")

    def flush_neighbours(self) -> None:
        # nud all: a plain flush keeps the permanent (static) entries
        self.run(self.tx, "ip", "neigh", "flush", "dev", self.tx_if, "nud", "all")
        self.run(self.rx, "ip", "neigh", "flush", "dev", self.rx_if, "nud", "all")

    def datagram_arrives(self, src: str, dst: str, dst_ip: str, text: str) -> bool:
        """Send ``text`` from namespace ``src`` to ``dst_ip`` in ``dst``; did it arrive?"""
        listener = subprocess.Popen(
            ["ip", "netns", "exec", dst, sys.executable, "-c", RECEIVE, dst_ip, str(PORT), "2"],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert listener.stdout is not None
        assert listener.stdout.readline().strip() == "listening"
        self.run(src, sys.executable, "-c", SEND, dst_ip, str(PORT), text)
        out, _ = listener.communicate(timeout=10)
        return out.strip() == text

    def counter(self, ns: str, family: str, table: str, chain: str) -> int:
        listing = self.run(ns, self.nft, "list", "chain", family, table, chain)
        return sum(
            int(line.split("packets", 1)[1].split()[0])
            for line in listing.splitlines()
            if "packets" in line
        )


def _ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True)


@pytest.fixture
def link() -> Iterator[Link]:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    nft = ensure_nft()
    tag = uuid.uuid4().hex[:6]
    tx, rx = f"dtx{tag}", f"drx{tag}"
    tx_if, rx_if = f"dt{tag}", f"dr{tag}"
    try:
        _ip("netns", "add", tx)
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"cannot create a network namespace: {exc.stderr!r}")
    try:
        _ip("netns", "add", rx)
        _ip("link", "add", tx_if, "type", "veth", "peer", "name", rx_if)
        _ip("link", "set", tx_if, "netns", tx)
        _ip("link", "set", rx_if, "netns", rx)
        for ns, iface, ip in ((tx, tx_if, TX_IP), (rx, rx_if, RX_IP)):
            _ip("-n", ns, "addr", "add", f"{ip}/24", "dev", iface)
            _ip("-n", ns, "link", "set", iface, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield Link(nft=nft, tx=tx, rx=rx, tx_if=tx_if, rx_if=rx_if)
    finally:
        for ns in (tx, rx):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


@pytest.mark.netns
def test_without_rules_the_link_is_two_way(link: Link) -> None:
    # The control: what the rules stop below does get through without them.
    assert link.datagram_arrives(link.tx, link.rx, RX_IP, "forward")
    assert link.datagram_arrives(link.rx, link.tx, TX_IP, "back")


@pytest.mark.netns
def test_receiver_rules_stop_everything_back_including_arp(link: Link) -> None:
    link.load(link.rx, "rx")
    link.flush_neighbours()

    # No ARP reply can come back: the transmitter cannot resolve the receiver.
    assert not link.datagram_arrives(link.tx, link.rx, RX_IP, "needs arp")
    assert link.counter(link.rx, "arp", ARP_TABLE, "output") > 0

    # With a static neighbour entry, as on the real link, datagrams arrive.
    link.static_neighbour(link.tx, link.tx_if, RX_IP, link.mac(link.rx, link.rx_if))
    assert link.datagram_arrives(link.tx, link.rx, RX_IP, "one way")

    # Nothing goes back, even with the transmitter's address resolved by hand.
    link.static_neighbour(link.rx, link.rx_if, TX_IP, link.mac(link.tx, link.tx_if))
    before = link.counter(link.rx, "inet", TABLE, "output")
    assert not link.datagram_arrives(link.rx, link.tx, TX_IP, "back channel")
    assert link.counter(link.rx, "inet", TABLE, "output") > before


@pytest.mark.netns
def test_transmitter_rules_stop_everything_arriving(link: Link) -> None:
    link.load(link.tx, "tx")
    link.static_neighbour(link.tx, link.tx_if, RX_IP, link.mac(link.rx, link.rx_if))
    link.static_neighbour(link.rx, link.rx_if, TX_IP, link.mac(link.tx, link.tx_if))

    assert link.datagram_arrives(link.tx, link.rx, RX_IP, "one way")
    assert not link.datagram_arrives(link.rx, link.tx, TX_IP, "back channel")
    assert link.counter(link.tx, "inet", TABLE, "input") > 0

    # ARP from the link is dropped too: the receiver cannot resolve the transmitter.
    link.flush_neighbours()
    link.static_neighbour(link.tx, link.tx_if, RX_IP, link.mac(link.rx, link.rx_if))
    assert not link.datagram_arrives(link.rx, link.tx, TX_IP, "needs arp")
    assert link.counter(link.tx, "arp", ARP_TABLE, "input") > 0


@pytest.mark.netns
def test_loading_twice_keeps_one_copy_and_unloading_restores(link: Link) -> None:
    link.load(link.rx, "rx")
    first = link.run(link.rx, link.nft, "-s", "list", "ruleset")
    link.load(link.rx, "rx")
    assert link.run(link.rx, link.nft, "-s", "list", "ruleset") == first
    link.unload(link.rx)
    assert TABLE not in link.run(link.rx, link.nft, "-s", "list", "ruleset")


# -- an IT-side host routed to the receiver -------------------------------------------

IT_IP, RX_IT_IP = "198.51.100.1", "198.51.100.2"

PINNED = textwrap.dedent(
    """
    import socket, sys
    sys.path.insert(0, sys.argv[5])
    from receiver.link import open_link_socket
    s = open_link_socket(sys.argv[1], int(sys.argv[2]), 65536, sys.argv[3] or None)
    s.setblocking(True)
    s.settimeout(float(sys.argv[4]))
    print("listening", flush=True)
    try:
        print(s.recv(2048).decode(), flush=True)
    except TimeoutError:
        print("nothing", flush=True)
    """
)


@pytest.fixture
def it_host(link: Link) -> Iterator[str]:
    """A third namespace on the receiver's IT side, with a route to the link's addresses."""
    tag = uuid.uuid4().hex[:6]
    ns, it_if, rx_it_if = f"dit{tag}", f"di{tag}", f"dj{tag}"
    try:
        _ip("netns", "add", ns)
        _ip("link", "add", it_if, "type", "veth", "peer", "name", rx_it_if)
        _ip("link", "set", it_if, "netns", ns)
        _ip("link", "set", rx_it_if, "netns", link.rx)
        _ip("-n", ns, "addr", "add", f"{IT_IP}/24", "dev", it_if)
        _ip("-n", link.rx, "addr", "add", f"{RX_IT_IP}/24", "dev", rx_it_if)
        _ip("-n", ns, "link", "set", it_if, "up")
        _ip("-n", link.rx, "link", "set", rx_it_if, "up")
        _ip("-n", ns, "route", "add", "192.0.2.0/24", "via", RX_IT_IP)
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


def pinned_receiver_gets(link: Link, src: str, interface: str, text: str) -> bool:
    """Send ``text`` from ``src`` to the link port, read by the receiver's own socket code."""
    root = str(Path(__file__).resolve().parent.parent)
    args = [RX_IP, str(PORT), interface, "2", root]
    listener = subprocess.Popen(
        ["ip", "netns", "exec", link.rx, sys.executable, "-c", PINNED, *args],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert listener.stdout is not None
    assert listener.stdout.readline().strip() == "listening"
    link.run(src, sys.executable, "-c", SEND, RX_IP, str(PORT), text)
    out, _ = listener.communicate(timeout=10)
    return out.strip() == text


@pytest.mark.netns
def test_an_it_host_reaches_the_link_port_without_the_rules(link: Link, it_host: str) -> None:
    # The control: routed to the receiver, the IT host reaches the link port.
    assert link.datagram_arrives(it_host, link.rx, RX_IP, "from the IT side")


@pytest.mark.netns
def test_receiver_rules_keep_the_link_port_for_the_link(link: Link, it_host: str) -> None:
    link.load(link.rx, "rx")
    link.static_neighbour(link.tx, link.tx_if, RX_IP, link.mac(link.rx, link.rx_if))
    before = link.counter(link.rx, "inet", TABLE, "input")
    assert not link.datagram_arrives(it_host, link.rx, RX_IP, "from the IT side")
    assert not link.datagram_arrives(link.rx, link.rx, RX_IP, "from this host")  # loopback
    assert link.counter(link.rx, "inet", TABLE, "input") > before
    assert link.datagram_arrives(link.tx, link.rx, RX_IP, "from the link")


@pytest.mark.netns
def test_a_receiver_pinned_to_the_link_interface_hears_the_link_only(
    link: Link, it_host: str
) -> None:
    # No rules at all: SO_BINDTODEVICE alone keeps the IT host out.
    link.static_neighbour(link.tx, link.tx_if, RX_IP, link.mac(link.rx, link.rx_if))
    assert pinned_receiver_gets(link, it_host, "", "unpinned, from the IT side")  # control
    assert not pinned_receiver_gets(link, it_host, link.rx_if, "pinned, from the IT side")
    assert pinned_receiver_gets(link, link.tx, link.rx_if, "pinned, from the link")


@pytest.mark.netns
def test_check_config_finds_a_listen_address_that_is_not_on_the_pinned_interface(
    link: Link, it_host: str, tmp_path: Path
) -> None:
    write_keypair(tmp_path, "tx")

    def check(listen: str) -> subprocess.CompletedProcess[str]:
        config = tmp_path / "rx.toml"
        config.write_text(
            f'[receiver]\nlisten = "{listen}"\ninterface = "{link.rx_if}"\n'
            f'state_dir = "{tmp_path}/state"\n\n'
            '[[streams]]\nid = 1\npublic_keys = ["tx.pub"]\n'
        )
        diode = str(Path(sys.executable).parent / "diode")
        return subprocess.run(
            ["ip", "netns", "exec", link.rx, diode, "check-config", str(config)],
            capture_output=True,
            text=True,
            check=False,
        )

    assert check(RX_IP).returncode == 0
    # the IT-side address: valid on this host, but pinned to the link nothing would arrive
    wrong = check(RX_IT_IP)
    assert wrong.returncode == 2
    assert f"receiver.listen: {RX_IT_IP} is not an address of interface" in wrong.stderr
