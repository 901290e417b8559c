"""nftables rules that make each end of the link one way in software too.

The one-way guarantee is physical: a fibre with only the transmit strand, or
a copper pair whose receive pair is cut. These rules are defence in depth on
each host, so that a mistake (a bridged cable, a second NIC, a misrouted
packet, a kernel answering by itself) cannot turn the link into a channel
from the IT side back into the OT side:

* transmitter host: nothing that arrives on the link interface is accepted
  or routed (``input`` and ``forward``); ARP arriving on it is dropped too.
* receiver host: nothing leaves on the link interface (``output`` and
  ``forward``), which also silences the replies the kernel would make by
  itself: ICMP port unreachable when the receiver is down, IPv6 neighbour
  and router solicitations, MLD reports. ARP is not seen by ``inet`` tables,
  so an ``arp`` table drops ARP replies and requests leaving on the link.
  On the way in (``input``), the link port is accepted on the link interface
  only and dropped on every other one (loopback included), so a host on the
  IT side cannot reach the receiver's port at all; and nothing but the link
  port is accepted from the link interface.

Because the receiver never answers ARP, the transmitter needs a static
neighbour entry for the receiver's address (``ip neigh replace RX_IP lladdr
RX_MAC dev IF nud permanent``); see docs/OPERATIONS.md.

Each ruleset replaces the tables of the same name atomically, so loading it
twice gives the same result:
``diode link-rules rx --interface eth1 --port 5140 | nft -f -``.
Raw packet sockets (AF_PACKET) are not seen by these hooks: the daemons open
none, and the physical cut is what covers the rest.

This module only builds text: it runs nothing and reads nothing.
"""

from __future__ import annotations

import re

TABLE = "diode_oneway"
ARP_TABLE = "diode_oneway_arp"
SIDES = ("tx", "rx")
DEFAULT_PORT = 5140

# Linux interface names: at most IFNAMSIZ - 1 = 15 bytes, no slash, no space.
# Kept to a safe alphabet because the name is pasted into the ruleset.
IFNAME_PATTERN = r"^[A-Za-z0-9_.:@-]{1,15}$"
_IFNAME = re.compile(IFNAME_PATTERN)


def _header(side: str, interface: str, ports: tuple[int, ...]) -> list[str]:
    host = "transmitter (OT side)" if side == "tx" else "receiver (IT side)"
    port_args = "".join(f" --port {p}" for p in ports) if side == "rx" else ""
    return [
        f"# diode: one-way rules for the {host}, link interface {interface}.",
        f"# Load with: diode link-rules {side} --interface {interface}{port_args} | nft -f -",
        "# The add/delete pairs make loading idempotent: the tables are replaced",
        "# atomically in one transaction, never duplicated.",
        f"add table inet {TABLE}",
        f"delete table inet {TABLE}",
        f"add table arp {ARP_TABLE}",
        f"delete table arp {ARP_TABLE}",
        "",
    ]


def _tx(interface: str) -> list[str]:
    name = f'"{interface}"'
    return [
        "# IPv4 and IPv6 on the link: nothing comes in.",
        f"table inet {TABLE} {{",
        "    # The transmitter only sends on the link: anything arriving on it is at",
        "    # best noise and at worst an attempt to reach the OT network. Priority raw",
        "    # drops it before connection tracking sees it.",
        "    chain input {",
        "        type filter hook input priority raw; policy accept;",
        f'        iifname {name} counter drop comment "nothing is received from the link"',
        "    }",
        "",
        "    # The link carries only the diode's datagrams, from this host: never route",
        "    # between it and the OT network, in either direction.",
        "    chain forward {",
        "        type filter hook forward priority raw; policy accept;",
        f'        iifname {name} counter drop comment "no routing from the link"',
        f'        oifname {name} counter drop comment "no routing onto the link"',
        "    }",
        "}",
        "",
        "# ARP is not seen by inet tables. The transmitter resolves the receiver with",
        "# a static neighbour entry, so no ARP is needed from the link either.",
        f"table arp {ARP_TABLE} {{",
        "    # Requests and replies alike: the static entry resolves the receiver.",
        "    chain input {",
        "        type filter hook input priority filter; policy accept;",
        f'        iifname {name} counter drop comment "no ARP from the link"',
        "    }",
        "}",
    ]


def _rx(interface: str, ports: tuple[int, ...]) -> list[str]:
    name = f'"{interface}"'
    port_set = "{ " + ", ".join(str(p) for p in ports) + " }"
    return [
        "# IPv4 and IPv6 on the link: nothing goes out; the link port is the link's only.",
        f"table inet {TABLE} {{",
        "    # The link port takes datagrams from the link interface only: dropped on",
        "    # every other interface (loopback too), so no host on the IT side can reach",
        "    # it. And from the link, nothing is accepted but the link port.",
        "    chain input {",
        "        type filter hook input priority raw; policy accept;",
        f"        iifname {name} udp dport {port_set} accept"
        ' comment "the diode datagrams, from the link"',
        f'        iifname {name} counter drop comment "nothing else is received from the link"',
        f'        udp dport {port_set} counter drop comment "the link port answers the link only"',
        "    }",
        "",
        "    # The receiver never sends on the link. This also silences what the kernel",
        "    # would send by itself: ICMP port unreachable while diode-rx is down, TCP",
        "    # resets, IPv6 neighbour/router solicitations, DAD and MLD reports.",
        "    chain output {",
        "        type filter hook output priority raw; policy accept;",
        f'        oifname {name} counter drop comment "nothing is sent on the link"',
        "    }",
        "",
        "    # The link carries only the diode's datagrams, to this host: never route",
        "    # between it and the IT network, in either direction.",
        "    chain forward {",
        "        type filter hook forward priority raw; policy accept;",
        f'        oifname {name} counter drop comment "no routing onto the link"',
        f'        iifname {name} counter drop comment "no routing from the link"',
        "    }",
        "}",
        "",
        "# ARP is not seen by inet tables: without this the kernel would answer the",
        "# transmitter's ARP requests on the link. The transmitter uses a static",
        "# neighbour entry for this host instead.",
        f"table arp {ARP_TABLE} {{",
        "    # Replies and requests alike: the link's far end must learn nothing from here.",
        "    chain output {",
        "        type filter hook output priority filter; policy accept;",
        f'        oifname {name} counter drop comment "no ARP onto the link"',
        "    }",
        "}",
    ]


def rules(side: str, interface: str, ports: tuple[int, ...] = (DEFAULT_PORT,)) -> str:
    """The nftables ruleset (for ``nft -f -``) enforcing one way on ``side``'s host.

    ``side`` is ``"tx"`` (drop everything arriving on ``interface``) or ``"rx"``
    (drop everything leaving on it, and take the link ``ports`` from it only).
    Raises ValueError for another side, an interface name that is not a plain
    Linux interface name, or a port outside 1-65535.
    """
    if side not in SIDES:
        raise ValueError(f"side must be 'tx' or 'rx', got {side!r}")
    if not _IFNAME.fullmatch(interface):
        raise ValueError(
            f"not an interface name: {interface!r} (1-15 characters: letters, digits, _ . : @ -)"
        )
    if not ports or any(not 1 <= p <= 65535 for p in ports):
        raise ValueError(f"ports must be 1-65535, got {list(ports)}")
    ports = tuple(sorted(set(ports)))
    body = _tx(interface) if side == "tx" else _rx(interface, ports)
    return "\n".join([*_header(side, interface, ports), *body]) + "\n"
