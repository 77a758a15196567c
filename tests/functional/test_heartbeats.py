"""Heartbeats are noted as they come and written in bulk, on both databases."""

import logging
from datetime import datetime, timedelta

import pytest
from sqlalchemy import select, update

from roompay.protocol.messages import Heartbeat, encode
from roompay.protocol.topics import EventName, ParsedTopic, TopicKind
from roompay.services.devices import flush_heartbeats, submit_device_message
from roompay.store.db import transaction
from roompay.store.models import Device
from roompay.store.writer import StripedWriter
from tests.support.devices import device_agents
from tests.support.server import Stack
from tests.support.waiting import wait_for


def _beat(stack: Stack) -> bytes:
    return encode(Heartbeat(uptime_s=5, relay_on=False, ts=stack.clock.now()))


def _presence(stack: Stack, code: str) -> tuple[bool, datetime | None]:
    with stack.runtime.ctx.sessions() as session:
        device = session.scalars(select(Device).where(Device.code == code)).one()
        return device.online, device.last_seen_at


def _offline_since(stack: Stack, code: str, minutes: int) -> None:
    """The appliance's will was written `minutes` ago."""
    at = stack.clock.now() - timedelta(minutes=minutes)
    with transaction(stack.runtime.ctx.sessions) as session:
        session.execute(
            update(Device).where(Device.code == code).values(online=False, last_seen_at=at)
        )


def test_a_heartbeat_is_written_at_the_flush_and_brings_its_appliance_back_online(
    quiet_stack: Stack,
) -> None:
    stack, code = quiet_stack, quiet_stack.device_codes[0]
    ctx = stack.runtime.ctx
    _offline_since(stack, code, 5)
    before = _presence(stack, code)

    submit_device_message(ctx, ParsedTopic(code, TopicKind.EVT, EventName.HB), _beat(stack))

    # Nothing is written when it comes
    assert _presence(stack, code) == before
    # Then the flush writes when it was heard, and the appliance is online again
    assert flush_heartbeats(ctx) == 1
    online, seen = _presence(stack, code)
    assert online is True
    assert seen is not None
    assert before[1] is not None
    assert seen > before[1]
    # And a second flush has nothing left to write
    assert flush_heartbeats(ctx) == 0


def test_a_heartbeat_heard_before_a_will_written_since_does_not_undo_it(
    quiet_stack: Stack,
) -> None:
    stack, code = quiet_stack, quiet_stack.device_codes[0]
    ctx = stack.runtime.ctx
    heard = stack.clock.now() - timedelta(minutes=2)
    ctx.heartbeats.note(code, heard)
    _offline_since(stack, code, 1)  # the will came after the heartbeat
    before = _presence(stack, code)

    assert flush_heartbeats(ctx) == 1

    assert _presence(stack, code) == before


def test_an_unknown_appliance_or_a_malformed_heartbeat_changes_nothing_and_is_logged(
    quiet_stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    stack = quiet_stack
    ctx = stack.runtime.ctx
    counts = stack.table_counts()
    with caplog.at_level(logging.WARNING):
        unknown = ParsedTopic("ZZ0001", TopicKind.EVT, EventName.HB)
        submit_device_message(ctx, unknown, _beat(stack))
        submit_device_message(
            ctx,
            ParsedTopic(stack.device_codes[1], TopicKind.EVT, EventName.HB),
            b'{"uptime_s": -1}',
        )
        assert flush_heartbeats(ctx) == 1

    assert "messages from unknown devices ['ZZ0001']" in caplog.text
    assert f"bad message from device {stack.device_codes[1]}" in caplog.text
    assert stack.table_counts() == counts
    assert ctx.heartbeats.take() == {}


def test_the_appliances_are_grouped_by_the_writer_that_owns_them(quiet_stack: Stack) -> None:
    ctx = quiet_stack.runtime.ctx
    codes = [f"G{n:04d}" for n in range(40)]
    assert ctx.by_writer(codes) == [codes]  # no writer: one group, run inline
    ctx.writer = StripedWriter([ctx.sessions] * 4)
    try:
        groups = ctx.by_writer(codes)
    finally:
        ctx.writer = None

    assert sorted(code for group in groups for code in group) == codes
    assert 1 < len(groups) <= 4
    writer = StripedWriter([ctx.sessions] * 4)
    for group in groups:
        assert len({id(writer.stripe(code)) for code in group}) == 1


def test_a_running_server_writes_its_appliances_heartbeats(stack: Stack) -> None:
    code = stack.device_codes[0]
    with device_agents(stack, [code], heartbeat_s=0.05):
        _online, first = _presence(stack, code)
        assert first is not None  # the appliance's birth was written
        # Written by the server's own flush, every maintenance interval
        wait_for(
            lambda: (seen := _presence(stack, code)[1]) is not None and seen > first,
            10,
            "a heartbeat written",
        )
