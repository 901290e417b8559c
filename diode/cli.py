"""The ``diode`` command: keys, daemons, config checks, the demo and benchmarks."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from diode import __version__
from diode.config import load, read_toml
from diode.config.modbus import DEFAULT_MAX_GAP
from diode.errors import ConfigError, KeyFileError, SettingError
from diode.keys import write_keypair, write_psk


def _keygen(args: argparse.Namespace) -> int:
    try:
        private, public, kid = write_keypair(args.dir, args.name)
        if args.psk:
            write_psk(args.dir / f"{args.name}.psk")
    except (KeyFileError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"private key: {private} (mode 0600: keep it on the transmitter host)")
    print(f"public key:  {public} (copy this one to the receiver)")
    if args.psk:
        print(f"link secret: {args.dir / (args.name + '.psk')} (copy to both hosts)")
    print(f"key id:      {kid.hex()}")
    return 0


def config_kind(data: dict[str, object]) -> str:
    return "tx" if "transmitter" in data else "rx"


def _check_config(args: argparse.Namespace) -> int:
    """Everything the daemon checks at start, except binding its ports (it may be running)."""
    from diode import startup
    from diode.config.rx import RxConfig
    from diode.config.tx import TxConfig

    try:
        kind = config_kind(read_toml(args.file))
        if kind == "tx":
            from transmitter.app import preflight

            tx = load(TxConfig, args.file).resolve(args.file)
            preflight(tx, create=False)
        else:
            rx = load(RxConfig, args.file).resolve(args.file)
            startup.check_rx(rx, create=False)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except SettingError as exc:
        print(f"error: {args.file}: {exc}", file=sys.stderr)
        return 2
    print(f"{args.file}: ok ({'transmitter' if kind == 'tx' else 'receiver'} config)")
    return 0


def _tx(args: argparse.Namespace) -> int:
    from transmitter.app import main as tx_main

    return tx_main(["--config", str(args.config)])


def _rx(args: argparse.Namespace) -> int:
    from receiver.app import main as rx_main

    return rx_main(["--config", str(args.config)])


def _send_file(args: argparse.Namespace) -> int:
    from diode.config.tx import TxConfig
    from transmitter.files import place_file

    try:
        config = load(TxConfig, args.config).resolve(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not config.files:
        print(f"error: {args.config}: no [[files]] folder to send through", file=sys.stderr)
        return 2
    if not 0 <= args.folder < len(config.files):
        print(
            f"error: --folder {args.folder}: {args.config} has {len(config.files)} [[files]] "
            "folder(s), numbered from 0",
            file=sys.stderr,
        )
        return 2
    watch = config.files[args.folder]
    try:
        placed = place_file(args.path, watch, args.name, replace=args.replace)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{args.path} -> {placed}: the running transmitter sends it from there")
    return 0


def _bench(args: argparse.Namespace) -> int:  # noqa: PLR0912 (one flat branch per benchmark)
    from diode import bench

    if args.seconds is None:
        args.seconds = {"codec": 2.0, "restart": 30.0}.get(args.what, 10.0)
        if args.quick:
            args.seconds = 0.1 if args.what == "codec" else 2.0
    if args.what == "codec":
        result = bench.codec(seconds=args.seconds)
    elif args.what == "link-steps":
        from diode.benchmarks.link_steps import link_steps

        result = link_steps(repeat=20 if args.quick else 300)
    elif args.what == "link":
        from diode.benchmarks.link import DEFAULT_BROKERS, DEFAULT_PYDIODE_VENV, link
        from diode.config.link import FecSettings

        result = link(
            seconds=args.seconds,
            warmup_s=1.0 if args.quick else 3.0,
            rate_mbps=args.rate_mbps,
            losses=tuple(args.loss or (0.0, 0.01)),
            pydiode_bytes=20_000_000 if args.quick else 200_000_000,
            pydiode=None if args.no_pydiode else (args.pydiode or DEFAULT_PYDIODE_VENV),
            rounds=args.rounds or (1 if args.quick else 3),
            sink=args.sink,
            brokers=tuple(args.broker or DEFAULT_BROKERS),
            fec=FecSettings.model_validate(
                {
                    key: value
                    for key, value in (
                        ("repair_ratio", args.repair_ratio),
                        ("repair_burst", args.repair_burst),
                    )
                    if value is not None
                }
            ),
        )
    elif args.what == "tags":
        from diode.benchmarks.tags import DEFAULT_SWEEPS, tags

        result = tags(
            modes=args.mode or tuple(DEFAULT_SWEEPS),
            rates=args.rate,
            seconds=args.seconds,
            max_p99_ms=args.max_p99_ms,
        )
    elif args.what == "cost":
        from diode.benchmarks.tags import cost

        result = cost(rates=args.rate or (10_000, 50_000), seconds=args.seconds, stall_s=args.stall)
    elif args.what == "syslog":
        from diode.benchmarks.syslog import syslog

        result = syslog(
            rate=(args.rate or [20_000])[0],
            values_hz=args.values_hz,
            seconds=args.seconds or 10.0,
        )
    elif args.what == "restart":
        from diode.benchmarks.restart import restart_buffer

        result = restart_buffer(
            rates=args.rate or (1000, 10_000, 50_000),
            seconds=args.seconds if not args.quick else 2.0,
        )
    elif args.what == "drain":
        from diode.benchmarks.drain import drain_cost

        result = drain_cost(datagrams=2000 if args.quick else 20_000)
    elif args.what == "repeat":
        from diode.benchmarks.restart import repeat_cost

        result = repeat_cost(rates=args.rate or (1000, 10_000), seconds=args.seconds)
    elif args.what == "polling":
        from diode.benchmarks.polling import polling

        result = polling(
            device_counts=tuple(args.devices or ((5,) if args.quick else (50, 100, 200, 300, 400))),
            seconds=args.seconds,
            max_gap=args.max_gap,
        )
    elif args.what == "opcua":
        from diode.benchmarks.opcua_scale import opcua

        result = opcua(
            item_counts=tuple(
                args.items
                or ((200,) if args.quick else (1000, 5000, 10_000, 20_000, 40_000, 60_000))
            ),
            seconds=args.seconds,
            warmup_s=1.0 if args.quick else 3.0,
        )
    elif args.what == "files":
        from diode.benchmarks.files import files
        from diode.benchmarks.link import DEFAULT_PYDIODE_VENV

        result = files(
            size_mb=20.0 if args.quick else args.size_mb,
            big_gb=0.2 if args.quick else args.big_gb,
            rate_mbps=args.rate_mbps,
            seconds=args.seconds or 10.0,
            share=args.share,
            rounds=args.rounds or (1 if args.quick else 3),
            lane_rate_mbps=args.lane_rate_mbps,
            pydiode=None if args.no_pydiode else (args.pydiode or DEFAULT_PYDIODE_VENV),
        )
    else:
        print(f"error: unknown benchmark {args.what!r}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from diode.demo import main as demo_main

    return demo_main(args)


def _link_rules(args: argparse.Namespace) -> int:
    from diode.linkrules import DEFAULT_PORT, rules

    try:
        print(rules(args.side, args.interface, tuple(args.port or (DEFAULT_PORT,))))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _version(args: argparse.Namespace) -> int:
    print(f"diode {__version__}")
    return 0


def _add_send_file(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "send-file", help="hand a file to the running transmitter (through its watched folder)"
    )
    p.add_argument("path", type=Path, help="the file to send")
    p.add_argument("--config", type=Path, default=Path("/etc/diode/tx.toml"))
    p.add_argument("--folder", type=int, default=0, help="which [[files]] folder (default: 0)")
    p.add_argument("--name", default=None, help="name on the far side (default: the file's)")
    p.add_argument(
        "--replace", action="store_true", help="replace a file of that name still in the folder"
    )
    p.set_defaults(run=_send_file)


def _add_bench(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("bench", help="benchmarks, printed as JSON")
    p.add_argument(
        "what",
        choices=[
            "codec",
            "link",
            "link-steps",
            "tags",
            "cost",
            "polling",
            "opcua",
            "restart",
            "repeat",
            "drain",
            "files",
            "syslog",
        ],
        help="codec: the sans-I/O core; link: goodput over loopback vs pydiode; "
        "link-steps: CPU of each per-block step of the link, old code against new; "
        "tags: updates/s into MQTT per payload mode; cost: CPU, RSS, latency at 10k and 50k/s; "
        "polling: Modbus devices one transmitter core polls at 1 Hz; "
        "opcua: OPC UA monitored items one transmitter core serves at 1 Hz; "
        "restart: how long a receiver restart the link socket's buffer covers; "
        "repeat: the transmitter's CPU and bandwidth with and without repeat_after_s; "
        "drain: the receiver's journaled drain, CPU per datagram; "
        "files: file goodput vs pydiode, RSS and tag latency while a file flows; "
        "syslog: syslog messages/s to a collector with values flowing",
    )
    p.add_argument("--seconds", type=float, default=None, help="time per measurement")
    p.add_argument("--quick", action="store_true", help="short runs (tests, smoke checks)")
    p.add_argument("--rate-mbps", type=float, default=1000.0, help="link: pacing cap")
    p.add_argument("--repair-ratio", type=float, help="link: FEC repair symbols per source")
    p.add_argument("--repair-burst", type=int, help="link: FEC repair symbols per block")
    p.add_argument("--loss", type=float, action="append", help="link: injected loss (repeat)")
    p.add_argument("--pydiode", type=Path, default=None, help="link: pydiode's virtualenv")
    p.add_argument("--no-pydiode", action="store_true", help="link: skip the pydiode run")
    p.add_argument(
        "--rounds",
        type=int,
        help="link, files: alternating rounds, medians reported (3; 1 with --quick)",
    )
    p.add_argument(
        "--sink", action="store_true", help="link: the transmitter alone, into a datagram counter"
    )
    p.add_argument(
        "--broker",
        choices=["tcp", "unix"],
        action="append",
        help="link: the receiver reaches mosquitto by loopback TCP or its Unix socket "
        "(repeat: each in turn every round; default tcp)",
    )
    p.add_argument("--mode", action="append", help="tags: payload:qos, e.g. per_tag:0 (repeat)")
    p.add_argument(
        "--rate",
        type=int,
        action="append",
        help="tags/cost/restart: updates/s (repeat); syslog: messages/s",
    )
    p.add_argument(
        "--stall", type=float, default=0.0, help="cost: seconds the receiver is stopped, 2 s in"
    )
    p.add_argument("--devices", type=int, action="append", help="polling: device count (repeat)")
    p.add_argument(
        "--max-gap", type=int, default=DEFAULT_MAX_GAP, help="polling: the devices' max_gap"
    )
    p.add_argument("--items", type=int, action="append", help="opcua: monitored items (repeat)")
    p.add_argument("--size-mb", type=float, default=200.0, help="files: goodput file size")
    p.add_argument("--big-gb", type=float, default=2.0, help="files: dense file beside tags")
    p.add_argument("--share", type=float, default=1.0, help="files: the file lane's share")
    p.add_argument(
        "--lane-rate-mbps",
        type=float,
        default=None,
        help="files: [file_lane] rate_mbps (default: its default)",
    )
    p.add_argument(
        "--values-hz", type=int, default=10_000, help="syslog: value updates/s alongside"
    )
    p.add_argument("--max-p99-ms", type=float, default=100.0, help="tags: latency that breaks")
    p.set_defaults(run=_bench)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="diode", description="A software-defined unidirectional gateway (data diode)."
    )
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("keygen", help="write an Ed25519 key pair and print its key id")
    p.add_argument("dir", type=Path, help="folder for NAME.key (0600) and NAME.pub")
    p.add_argument("--name", default="diode", help="file name stem (default: diode)")
    p.add_argument("--psk", action="store_true", help="also write a link secret NAME.psk")
    p.set_defaults(run=_keygen)

    p = sub.add_parser("tx", help="run the transmitter (OT side)")
    p.add_argument("--config", type=Path, default=Path("/etc/diode/tx.toml"))
    p.set_defaults(run=_tx)

    p = sub.add_parser("rx", help="run the receiver (IT side)")
    p.add_argument("--config", type=Path, default=Path("/etc/diode/rx.toml"))
    p.set_defaults(run=_rx)

    p = sub.add_parser("check-config", help="validate a config file without starting anything")
    p.add_argument("file", type=Path)
    p.set_defaults(run=_check_config)

    _add_send_file(sub)

    p = sub.add_parser("demo", help="a whole plant on this machine, with a live view")
    p.add_argument("--loss", type=float, default=0.0, help="share of datagrams to drop (0-1)")
    p.add_argument("--duration", type=float, default=None, help="stop after S seconds")
    p.add_argument("--json", action="store_true", help="print the final summary as JSON")
    p.add_argument(
        "--broker",
        default="auto",
        metavar="auto|embedded|HOST:PORT",
        help="MQTT broker: 127.0.0.1:1883 if one answers, else an embedded one (default: auto)",
    )
    p.add_argument("--seed", type=int, default=1, help="seed of the relay's losses and the noise")
    p.add_argument(
        "--files", action="store_true", help="also drop files into a watched folder and check them"
    )
    p.add_argument(
        "--payload",
        choices=("json", "sparkplug"),
        default="json",
        help="what the receiver publishes: JSON per tag, or Sparkplug B 3.0 (spBv1.0/diode/#)",
    )
    p.set_defaults(run=_demo)

    _add_bench(sub)

    p = sub.add_parser("link-rules", help="print nftables rules that enforce one way")
    p.add_argument("side", choices=["tx", "rx"], help="the host the rules are for")
    p.add_argument("--interface", default="diode0", help="the one-way link's interface")
    p.add_argument(
        "--port",
        type=int,
        action="append",
        help="rx: the link port, receiver.port (repeat for several receivers; default 5140)",
    )
    p.set_defaults(run=_link_rules)

    p = sub.add_parser("version", help="print the version")
    p.set_defaults(run=_version)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    code: int = args.run(args)
    return code
