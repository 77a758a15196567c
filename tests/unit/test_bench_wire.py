"""The benchmark's bare MQTT framing and its percentile, checked against the specs."""

from roompay.bench.mqtt import PUBACK, Will, connect_packet, packet
from roompay.bench.pay_to_start import percentile
from roompay.bench.report import ratio


def test_a_connect_packet_is_framed_as_mqtt_3_1_1_says() -> None:
    # MQTT 3.1.1 §3.1: protocol name "MQTT", level 4, flags, keepalive, then the payload.
    assert connect_packet("dev-1", 60, True, None) == (
        b"\x10\x11" + b"\x00\x04MQTT" + b"\x04" + b"\x02" + b"\x00\x3c" + b"\x00\x05dev-1"
    )


def test_a_last_will_sets_its_flag_qos_and_retain_and_follows_the_client_id() -> None:
    framed = connect_packet("d", 0, False, Will("t/s", b"x", qos=1, retain=True))

    assert framed[9] == 0x04 | (1 << 3) | 0x20
    assert framed.endswith(b"\x00\x01d" + b"\x00\x03t/s" + b"\x00\x01x")


def test_remaining_lengths_above_127_take_continuation_bytes() -> None:
    # §2.2.3: 321 = 0xC1 0x02 (65 + 2 * 128).
    assert packet(PUBACK, bytes(321))[:3] == bytes([PUBACK, 0xC1, 0x02])
    assert packet(PUBACK, bytes(127))[:2] == bytes([PUBACK, 0x7F])


def test_percentiles_use_the_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]

    assert percentile(values, 0.5) == 50.0
    assert percentile(values, 0.99) == 99.0
    assert percentile([3.0], 0.99) == 3.0
    assert percentile([], 0.99) == 0.0


def test_a_ratio_without_a_base_is_zero_rather_than_an_error() -> None:
    assert ratio(6.0, 2.0) == 3.0
    assert ratio(6.0, 0.0) == 0.0
