"""The wire contract of the device link: topics, payloads and broker URLs."""

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest

from roompay.protocol import (
    CommandName,
    EventName,
    InvalidTopicError,
    MqttEndpoint,
    ParsedTopic,
    ProtocolError,
    TopicKind,
    Topics,
    parse_mqtt_url,
)
from roompay.protocol.messages import (
    AckStatus,
    ActiveRun,
    BootEvent,
    CommandAck,
    DevicePresence,
    EndReason,
    Heartbeat,
    RunAck,
    RunEvent,
    RunEventKind,
    StartCommand,
    StateMessage,
    StopCommand,
    decode,
    encode,
    peek_cmd_id,
)

ISSUED = datetime(2025, 3, 1, 8, 0, 0, tzinfo=UTC)


def start_command(**overrides: object) -> StartCommand:
    fields: dict[str, object] = {
        "cmd_id": "cmd-1",
        "order_id": "0f" * 16,
        "program": "massage-30",
        "duration_s": 1800,
        "issued_at": ISSUED,
        "expires_at": ISSUED + timedelta(minutes=3),
        "seq": 7,
        "key_id": "k1",
        "sig": "c2lnbmF0dXJl",
    }
    fields.update(overrides)
    return StartCommand.model_validate(fields)


def stop_command(**overrides: object) -> StopCommand:
    fields: dict[str, object] = {
        "cmd_id": "stop-1",
        "run_id": "r1",
        "order_id": "0f" * 16,
        "reason": "guest_request",
        "issued_at": ISSUED,
        "expires_at": ISSUED + timedelta(minutes=3),
        "seq": 8,
        "key_id": "k1",
        "sig": "c2lnbmF0dXJl",
    }
    fields.update(overrides)
    return StopCommand.model_validate(fields)


# --- topics -------------------------------------------------------------------


def test_topics_build_the_layout_under_the_default_root() -> None:
    topics = Topics()

    assert topics.root == "roompay/v1"
    assert topics.state("A-1") == "roompay/v1/dev/A-1/state"
    assert topics.command("A-1", CommandName.START) == "roompay/v1/dev/A-1/cmd/start"
    assert topics.event("A-1", EventName.ACK) == "roompay/v1/dev/A-1/evt/ack"
    assert topics.device_subscription("A-1") == "roompay/v1/dev/A-1/cmd/#"
    assert topics.server_subscriptions() == ("roompay/v1/dev/+/evt/#", "roompay/v1/dev/+/state")


def test_topics_use_a_custom_root() -> None:
    topics = Topics("t-1a2b/v1")

    assert topics.event("dev_9", EventName.RUN) == "t-1a2b/v1/dev/dev_9/evt/run"
    assert topics.server_subscriptions() == ("t-1a2b/v1/dev/+/evt/#", "t-1a2b/v1/dev/+/state")


@pytest.mark.parametrize(
    ("topic", "expected"),
    [
        ("roompay/v1/dev/A-1/state", ParsedTopic("A-1", TopicKind.STATE, None)),
        ("roompay/v1/dev/A-1/cmd/start", ParsedTopic("A-1", TopicKind.CMD, CommandName.START)),
        ("roompay/v1/dev/A-1/cmd/run_ack", ParsedTopic("A-1", TopicKind.CMD, CommandName.RUN_ACK)),
        ("roompay/v1/dev/x_Y-9/evt/hb", ParsedTopic("x_Y-9", TopicKind.EVT, EventName.HB)),
        ("roompay/v1/dev/A-1/evt/fault", ParsedTopic("A-1", TopicKind.EVT, EventName.FAULT)),
    ],
)
def test_parse_takes_a_topic_apart(topic: str, expected: ParsedTopic) -> None:
    assert Topics().parse(topic) == expected


@pytest.mark.parametrize(
    ("topic", "answer"),
    [
        ("roompay/v1/dev/A-1/evt/ack", True),
        ("roompay/v1/dev/A-1/evt/run", False),
        ("roompay/v1/dev/A-1/evt/hb", False),
        ("roompay/v1/dev/A-1/state", False),
        ("roompay/v1/dev/A-1/cmd/start", False),
    ],
)
def test_only_an_evt_ack_is_an_answer_to_a_command(topic: str, answer: bool) -> None:
    assert Topics().parse(topic).is_answer is answer


def test_parse_inverts_every_builder() -> None:
    topics = Topics("site/v1")

    for name in CommandName:
        assert topics.parse(topics.command("d", name)) == ParsedTopic("d", TopicKind.CMD, name)
    for event in EventName:
        assert topics.parse(topics.event("d", event)) == ParsedTopic("d", TopicKind.EVT, event)
    assert topics.parse(topics.state("d")) == ParsedTopic("d", TopicKind.STATE, None)


@pytest.mark.parametrize(
    "topic",
    [
        "other/v1/dev/A-1/state",
        "roompay/v2/dev/A-1/state",
        "roompay/v1/dev/A-1",
        "roompay/v1/dev//state",
        "roompay/v1/dev/A 1/state",
        "roompay/v1/dev/A+1/state",
        "roompay/v1/dev/#/state",
        "roompay/v1/dev/" + "a" * 65 + "/state",
        "roompay/v1/dev/A-1/state/extra",
        "roompay/v1/dev/A-1/status",
        "roompay/v1/dev/A-1/cmd",
        "roompay/v1/dev/A-1/cmd/launch",
        "roompay/v1/dev/A-1/evt/ack/more",
        "roompay/v1/dev/A-1/evt/",
        "roompay/v1/dev/A-1/evt/start",
        "roompay/v1/dev/A-1/cmd/ack",
        "roompay/v1/devices/A-1/state",
        "",
    ],
)
def test_parse_rejects_topics_outside_the_layout(topic: str) -> None:
    with pytest.raises(InvalidTopicError):
        Topics().parse(topic)


def test_invalid_topic_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="not a state, cmd or evt topic"):
        Topics().parse("roompay/v1/dev/A-1/nope")


@pytest.mark.parametrize("code", ["", "a b", "a/b", "a+b", "a#", "ä", "a" * 65, "a.b"])
def test_builders_reject_malformed_device_codes(code: str) -> None:
    topics = Topics()

    with pytest.raises(InvalidTopicError, match="invalid device code"):
        topics.state(code)
    with pytest.raises(InvalidTopicError, match="invalid device code"):
        topics.command(code, CommandName.START)


def test_builders_accept_a_64_character_code() -> None:
    assert Topics("r").state("Z" * 64) == f"r/dev/{'Z' * 64}/state"


@pytest.mark.parametrize("root", ["", "/a", "a/", "a//b", "a/+/b", "a/#", "a b"])
def test_topics_reject_malformed_roots(root: str) -> None:
    with pytest.raises(InvalidTopicError, match="invalid topic root"):
        Topics(root)


# --- messages -----------------------------------------------------------------


def test_start_command_encodes_to_compact_json() -> None:
    assert encode(start_command()) == (
        b'{"v":1,"cmd_id":"cmd-1","order_id":"0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f",'
        b'"program":"massage-30","duration_s":1800,'
        b'"issued_at":"2025-03-01T08:00:00Z","expires_at":"2025-03-01T08:03:00Z",'
        b'"seq":7,"key_id":"k1","sig":"c2lnbmF0dXJl"}'
    )


def test_stop_command_encodes_to_compact_json() -> None:
    assert encode(stop_command()) == (
        b'{"cmd_id":"stop-1","run_id":"r1","order_id":"0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f",'
        b'"reason":"guest_request","issued_at":"2025-03-01T08:00:00Z",'
        b'"expires_at":"2025-03-01T08:03:00Z","seq":8,"key_id":"k1","sig":"c2lnbmF0dXJl"}'
    )


@pytest.mark.parametrize("missing", ["seq", "key_id", "sig"])
def test_commands_need_seq_key_id_and_sig(missing: str) -> None:
    start = start_command().model_dump(mode="json", exclude={missing})
    stop = stop_command().model_dump(mode="json", exclude={missing})

    with pytest.raises(ProtocolError, match=f"invalid StartCommand: {missing}: Field required"):
        decode(StartCommand, json.dumps(start).encode())
    with pytest.raises(ProtocolError, match=f"invalid StopCommand: {missing}: Field required"):
        decode(StopCommand, json.dumps(stop).encode())


@pytest.mark.parametrize("key_id", ["", "k|1", "k 1", "k" * 33])
def test_commands_refuse_malformed_key_ids(key_id: str) -> None:
    with pytest.raises(ValueError, match="key_id"):
        start_command(key_id=key_id)


def test_stop_command_must_expire_after_issue() -> None:
    with pytest.raises(ValueError, match="expires_at must be later than issued_at"):
        stop_command(expires_at=ISSUED)


def test_boot_event_without_an_active_run_leaves_it_out() -> None:
    boot = BootEvent(boot_id=3, fw="1.2.3", unsent_results=0, ts=ISSUED)

    assert encode(boot) == (
        b'{"boot_id":3,"fw":"1.2.3","unsent_results":0,"ts":"2025-03-01T08:00:00Z"}'
    )


def test_last_will_is_just_state_and_boot_id() -> None:
    will = StateMessage(state=DevicePresence.LOST, boot_id=3)

    assert encode(will) == b'{"state":"lost","boot_id":3}'
    assert decode(StateMessage, b'{"state":"lost","boot_id":3}') == will


@pytest.mark.parametrize(
    "message",
    [
        CommandAck(cmd_id="c", status=AckStatus.ACCEPTED, run_id="r", ts=ISSUED),
        CommandAck(cmd_id="c", status=AckStatus.REJECTED, reason="busy", ts=ISSUED),
        RunEvent(
            run_id="r",
            cmd_id="c",
            order_id="o",
            event=RunEventKind.PROGRESS,
            seq=3,
            elapsed_s=180,
            remaining_s=1620,
            ts=ISSUED,
        ),
        RunEvent(
            run_id="r",
            cmd_id="c",
            order_id="o",
            event=RunEventKind.ENDED,
            seq=31,
            elapsed_s=1800,
            remaining_s=0,
            ts=ISSUED,
            reason=EndReason.COMPLETED,
            actual_run_s=1800,
        ),
        StateMessage(state=DevicePresence.ONLINE, boot_id=1, fw="1.2.3", ts=ISSUED),
        Heartbeat(uptime_s=42, relay_on=True, run_id="r", ts=ISSUED),
        Heartbeat(uptime_s=0, relay_on=False, ts=ISSUED),
        start_command(),
        stop_command(),
        RunAck(run_id="r", seq=4),
        BootEvent(
            boot_id=2,
            fw="1.2.3",
            active_run=ActiveRun(
                run_id="r", order_id="o", cmd_id="c", elapsed_s=200, remaining_s=400
            ),
            unsent_results=2,
            ts=ISSUED,
        ),
        BootEvent(boot_id=1, fw="1.2.3", unsent_results=0, ts=ISSUED),
    ],
)
def test_messages_round_trip(
    message: CommandAck
    | RunEvent
    | StateMessage
    | Heartbeat
    | StartCommand
    | StopCommand
    | RunAck
    | BootEvent,
) -> None:
    assert decode(type(message), encode(message)) == message


def test_ack_decodes_the_fields_the_server_reads() -> None:
    ack = decode(
        CommandAck,
        b'{"cmd_id":"c9","status":"duplicate","run_id":"r1","ts":"2025-03-01T08:00:05+08:00"}',
    )

    assert ack.status is AckStatus.DUPLICATE
    assert ack.run_id == "r1"
    assert ack.reason is None
    assert ack.ts == datetime(2025, 3, 1, 0, 0, 5, tzinfo=UTC)


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"not json",
        b"\xff\xfe\x00",
        b"[]",
        b'"start"',
        b"{}",
        b'{"v":2,"cmd_id":"c","order_id":"o","program":"p","duration_s":1,'
        b'"issued_at":"2025-03-01T08:00:00Z","expires_at":"2025-03-01T08:03:00Z",'
        b'"seq":1,"key_id":"k1","sig":"s"}',
        b'{"v":1,"cmd_id":"c","order_id":"o","program":"p","duration_s":0,'
        b'"issued_at":"2025-03-01T08:00:00Z","expires_at":"2025-03-01T08:03:00Z",'
        b'"seq":1,"key_id":"k1","sig":"s"}',
        b'{"v":1,"cmd_id":"c","order_id":"o","program":"p","duration_s":-5,'
        b'"issued_at":"2025-03-01T08:00:00Z","expires_at":"2025-03-01T08:03:00Z",'
        b'"seq":1,"key_id":"k1","sig":"s"}',
        b'{"v":1,"cmd_id":"","order_id":"o","program":"p","duration_s":1,'
        b'"issued_at":"2025-03-01T08:00:00Z","expires_at":"2025-03-01T08:03:00Z",'
        b'"seq":1,"key_id":"k1","sig":"s"}',
        # A naive timestamp cannot be compared with the device's clock.
        b'{"v":1,"cmd_id":"c","order_id":"o","program":"p","duration_s":1,'
        b'"issued_at":"2025-03-01T08:00:00","expires_at":"2025-03-01T08:03:00",'
        b'"seq":1,"key_id":"k1","sig":"s"}',
        b'{"v":1,"cmd_id":"c","order_id":"o","program":"p","duration_s":1,'
        b'"issued_at":"2025-03-01T08:03:00Z","expires_at":"2025-03-01T08:00:00Z",'
        b'"seq":1,"key_id":"k1","sig":"s"}',
        b'{"v":1,"cmd_id":"c","order_id":"o","program":"p","duration_s":1,"extra":true,'
        b'"issued_at":"2025-03-01T08:00:00Z","expires_at":"2025-03-01T08:03:00Z",'
        b'"seq":1,"key_id":"k1","sig":"s"}',
    ],
)
def test_bad_start_payloads_raise_protocol_error(payload: bytes) -> None:
    with pytest.raises(ProtocolError, match="invalid StartCommand"):
        decode(StartCommand, payload)


def test_protocol_error_names_the_field_but_not_the_value() -> None:
    with pytest.raises(ProtocolError) as caught:
        decode(StateMessage, b'{"state":"sleeping","boot_id":1}')

    assert str(caught.value) == (
        "invalid StateMessage: state: Input should be 'online', 'offline' or 'lost'"
    )


@pytest.mark.parametrize(
    "payload",
    [
        b'{"run_id":"r","cmd_id":"c","order_id":"o","event":"ended","seq":1,'
        b'"elapsed_s":1,"remaining_s":0,"ts":"2025-03-01T08:00:00Z"}',
        b'{"run_id":"r","cmd_id":"c","order_id":"o","event":"progress","seq":1,'
        b'"elapsed_s":1,"remaining_s":0,"ts":"2025-03-01T08:00:00Z",'
        b'"reason":"completed","actual_run_s":1}',
        b'{"run_id":"r","cmd_id":"c","order_id":"o","event":"started","seq":-1,'
        b'"elapsed_s":0,"remaining_s":1,"ts":"2025-03-01T08:00:00Z"}',
        b'{"run_id":"r","cmd_id":"c","order_id":"o","event":"ended","seq":1,'
        b'"elapsed_s":1,"remaining_s":0,"ts":"2025-03-01T08:00:00Z",'
        b'"reason":"exploded","actual_run_s":1}',
    ],
)
def test_inconsistent_run_events_raise_protocol_error(payload: bytes) -> None:
    with pytest.raises(ProtocolError, match="invalid RunEvent"):
        decode(RunEvent, payload)


@pytest.mark.parametrize(
    ("payload", "cmd_id"),
    [
        (b'{"cmd_id":"c-7","duration_s":"long"}', "c-7"),
        (b'{"cmd_id":7}', None),
        (b'{"cmd_id":""}', None),
        (b"[1]", None),
        (b"garbage", None),
        (b"\xff", None),
    ],
)
def test_peek_cmd_id_reads_what_it_can(payload: bytes, cmd_id: str | None) -> None:
    assert peek_cmd_id(payload) == cmd_id


# --- MQTT URLs ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mqtt://broker", MqttEndpoint("broker", 1883)),
        ("mqtt://127.0.0.1:18830", MqttEndpoint("127.0.0.1", 18830)),
        (
            "mqtt://backend:s3cret@mq.example.com:1884",
            MqttEndpoint("mq.example.com", 1884, "backend", "s3cret"),
        ),
        ("mqtt://dev%2F1:p%40ss%3A@h", MqttEndpoint("h", 1883, "dev/1", "p@ss:")),
        ("mqtt://[::1]:1883/", MqttEndpoint("::1", 1883)),
    ],
)
def test_parse_mqtt_url(url: str, expected: MqttEndpoint) -> None:
    assert parse_mqtt_url(url) == expected


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("mqtts://broker", "must start with mqtt://"),
        ("tcp://broker:1883", "must start with mqtt://"),
        ("broker:1883", "must start with mqtt://"),
        ("mqtt://", "has no host"),
        ("mqtt://:1883", "has no host"),
        ("mqtt://broker:0", "invalid port"),
        ("mqtt://broker:65536", "invalid port"),
        ("mqtt://broker:port", "invalid port"),
        ("mqtt://broker/topic", "no path, query or fragment"),
        ("mqtt://broker?clean=1", "no path, query or fragment"),
        ("mqtt://broker#x", "no path, query or fragment"),
        ("mqtt://user@broker", "both user and password"),
    ],
)
def test_parse_mqtt_url_rejects(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_mqtt_url(url)


def test_endpoint_hides_its_password() -> None:
    endpoint = parse_mqtt_url("mqtt://backend:s3cret@mq:1884")

    assert "s3cret" not in repr(endpoint)
    assert endpoint.url == "mqtt://backend@mq:1884"


# --- architecture -------------------------------------------------------------


def test_protocol_package_imports_no_framework_and_no_network_client() -> None:
    probe = (
        "import sys, roompay.protocol, roompay.protocol.messages;"
        "print(sorted({m.split('.')[0] for m in sys.modules}"
        " & {'fastapi', 'sqlalchemy', 'starlette', 'paho', 'amqtt'}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )

    assert result.stdout.strip() == "[]"
