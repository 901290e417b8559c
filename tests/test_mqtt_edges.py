"""MqttOutput edge cases (issue 14, item 8 and a log bullet of item 11), against real mosquitto.

A topic that cannot be encoded is refused, counted and logged, never a crash
or a crash loop on the spooled message; packet identifiers never collide with
paho's own; the private members of paho and aiomqtt the output uses are
checked at start; paho's log lines come out as structlog JSON.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import aiomqtt
import paho.mqtt.client as paho
import pytest

from diode.config.mqtt import StreamOutput
from diode.records import Sample, TagInfo, ValueType
from receiver import mqtt as mqtt_module
from receiver.mqtt import MAX_WINDOW, MqttInternalsError, MqttOutput, check_internals
from receiver.payload import Message
from receiver.spool import Spool
from tests.support.mosquitto import Mosquitto
from tests.test_mqtt_output import broker_config, running, subscriber, until

OUT = StreamOutput.model_validate({"prefix": "diode", "site": "s", "qos": 1})
LONG = TagInfo(tag_id=1, name="x" * 70_000, device="plc1", value_type=ValueType.INT32)
SURROGATE = TagInfo(tag_id=3, name="a\udc80", device="plc1", value_type=ValueType.INT32)
OK = TagInfo(tag_id=2, name="ok", device="plc1", value_type=ValueType.INT32)


def value(info: TagInfo, v: int) -> tuple[TagInfo, Sample]:
    return info, Sample(tag_id=info.tag_id, ts_ns=1_700_000_000_000_000_000 + v, value=v)


async def test_a_topic_over_65535_bytes_is_refused_counted_and_the_rest_published(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    output = MqttOutput(broker_config(mosquitto.port, tmp_path))
    async with subscriber(mosquitto.port, "diode/#") as received, running(output):
        output.publish_samples(OUT, [value(LONG, 1), value(OK, 2)])
        output.publish_samples(OUT, [value(SURROGATE, 3), value(OK, 4)])
        await until(lambda: received.values("diode/s/plc1/ok") == [2, 4])
        await until(lambda: output.counters["published"] == 2)
        assert output.counters["unencodable"] == 2
        # What the broker has leaves the spool with the next commit, or 50 ms later.
        await until(lambda: output.backlog == 0)


@pytest.mark.parametrize("topic", ["a/" + "b" * 65_534, "a/+/b", "a/#", "a/\0", ""])
async def test_an_unencodable_message_spooled_before_does_not_loop(
    mosquitto: Mosquitto, tmp_path: Path, topic: str
) -> None:
    """As an earlier version could leave it: read, dropped in its turn, counted, not retried."""
    config = broker_config(mosquitto.port, tmp_path)
    spool = Spool(config.spool_path, 100)
    spool.append(
        [
            Message("diode/s/before", b'{"value": 1}', 1, False),
            Message(topic, b'{"value": 2}', 1, False),
            Message("diode/s/after", b'{"value": 3}', 1, False),
        ],
        time.time(),
    )
    spool.close()
    output = MqttOutput(config)
    async with subscriber(mosquitto.port, "diode/#") as received, running(output):
        await until(lambda: len(received.on("diode/s/after")) == 1)
        await until(lambda: output.backlog == 0)
        assert output.counters["unencodable"] == 1
        assert [m.topic for m in received.on("diode/s/")] == ["diode/s/before", "diode/s/after"]
        await asyncio.sleep(0.3)
        assert output.counters["reconnects"] == 0  # the broker never closed on us


async def test_packet_ids_skip_those_paho_has_in_flight(tmp_path: Path) -> None:
    """A window near 65 535 wraps paho's id counter onto ids still in flight.

    The paho client is real and not connected: its own QoS 1 message (the
    receiver status) sits in ``_out_messages`` under an id the generator is
    about to give out again.
    """
    output = MqttOutput(broker_config(1, tmp_path, max_inflight=65535))
    assert output._window == MAX_WINDOW < 65535
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    client._out_messages[7] = paho.MQTTMessage(mid=7)
    output._acks[8] = mqtt_module._Pending(asyncio.Event())
    client._last_mid = 6
    assert output._mid(client) == 9
    client._last_mid = 65534
    assert output._mid(client) == 65535
    assert output._mid(client) == 1  # wrapped, skipping nothing in use


async def test_paho_own_publishes_skip_the_ids_the_pump_has_in_flight(tmp_path: Path) -> None:
    """The other way round: the receiver status must not take an id of a value in flight."""
    output = MqttOutput(broker_config(1, tmp_path))
    inner = output._client()._client  # real, not connected: paho keeps the message queued
    inner._last_mid = 41
    output._acks[42] = mqtt_module._Pending(asyncio.Event())
    info = inner.publish("diode/$receiver/status", b"{}", qos=1)
    assert info.mid == 43


async def test_a_missing_or_changed_paho_internal_fails_loudly_at_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stands in for an upgrade of paho: the members are changed here, the client is real."""
    config = broker_config(1, tmp_path)
    check_internals.cache_clear()
    MqttOutput(config).counters  # the installed versions pass  # noqa: B018
    check_internals.cache_clear()
    monkeypatch.setattr(paho.Client, "_mid_generate", lambda self: 1)
    with pytest.raises(MqttInternalsError, match="_mid_generate"):
        MqttOutput(config)
    monkeypatch.undo()
    check_internals.cache_clear()
    monkeypatch.delattr(paho.Client, "_handle_pubackcomp")
    with pytest.raises(MqttInternalsError, match="_handle_pubackcomp"):
        MqttOutput(config)
    monkeypatch.undo()
    check_internals.cache_clear()
    # A PUBACK no longer read into _in_packet["packet"]: the handler never sees its id.
    original = paho.Client._packet_handle

    def renamed(self: paho.Client) -> object:
        self._in_packet["body"] = self._in_packet.pop("packet")
        self._in_packet["packet"] = b""
        return original(self)

    monkeypatch.setattr(paho.Client, "_packet_handle", renamed)
    with pytest.raises(MqttInternalsError, match="PUBACK"):
        MqttOutput(config)
    monkeypatch.undo()
    check_internals.cache_clear()


async def test_aiomqtt_without_its_paho_client_fails_loudly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stands in for an aiomqtt that renamed its paho client: the wrapper is real."""
    output = MqttOutput(broker_config(1, tmp_path))
    original = aiomqtt.Client.__init__

    def renamed(self: aiomqtt.Client, *args: object, **kwargs: object) -> None:
        original(self, *args, **kwargs)  # type: ignore[arg-type]
        self._paho = self.__dict__.pop("_client")

    monkeypatch.setattr(aiomqtt.Client, "__init__", renamed)
    with pytest.raises(MqttInternalsError, match="_client"):
        output._client()


LOG_SCRIPT = """
import asyncio, sys
import paho.mqtt.client as paho
from diode import daemon
from diode.config.mqtt import MqttBroker
from receiver.mqtt import MqttOutput

daemon.setup_logging("info", "json")

async def main():
    output = MqttOutput(MqttBroker.model_validate({"spool_path": sys.argv[1]}, strict=False))
    client = output._client()
    client._client._easy_log(paho.MQTT_LOG_ERR, "failed to receive on socket: %s", "boom")
    client._logger.warning("There are %d pending publish calls.", 3)

asyncio.run(main())
"""


def test_paho_and_aiomqtt_log_lines_are_json(tmp_path: Path) -> None:
    """Item 11: a paho error line appeared as plain text inside the JSON log."""
    run = subprocess.run(
        [sys.executable, "-c", LOG_SCRIPT, str(tmp_path / "spool.sqlite")],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    events = {e["event"]: e for e in map(json.loads, lines)}  # every line JSON, or this raises
    assert events["failed to receive on socket: boom"]["level"] == "error"
    assert events["There are 3 pending publish calls."]["level"] == "warning"
