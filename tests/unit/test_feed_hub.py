"""The feed hub's buffer: what a stream at some position gets next, or that it fell behind."""

from datetime import UTC, datetime
from typing import cast

from hypothesis import given
from hypothesis import strategies as st

from roompay.services.context import ServiceContext
from roompay.services.feed import FeedItem
from roompay.web.feed import HUB_BUFFER, FeedHub


def _item(step_id: int) -> FeedItem:
    return FeedItem(
        id=step_id,
        at=datetime(2026, 12, 4, tzinfo=UTC),
        event="paid",
        detail={},
        order_id=f"o{step_id}",
        status="paid",
        hotel="h1",
        device="DRY-0001",
        kind="clothes_dryer",
        room="101",
        program="dry30",
        wallet="wechat",
        amount_fen=800,
    )


def _hub_with(count: int) -> FeedHub:
    hub = FeedHub(cast(ServiceContext, object()))  # the buffer never touches its context
    for step_id in range(1, count + 1):
        hub._take(_item(step_id))
    return hub


@given(st.integers(0, HUB_BUFFER + 300), st.data())
def test_a_stream_gets_exactly_what_came_after_its_position(
    count: int, data: st.DataObject
) -> None:
    hub = _hub_with(count)
    position = data.draw(st.integers(0, count))
    got = hub.since(position)
    oldest_kept = max(1, count - HUB_BUFFER + 1)
    if position + 1 < oldest_kept:
        # Some of what it has not seen is gone: it must catch up from the database
        assert got is None
    else:
        assert got is not None
        assert [item.id for item in got] == list(range(position + 1, count + 1))
        # Each step is rendered once, and the frame carries its id for Last-Event-ID
        assert all(hub.frame(item).startswith(f"id: {item.id}\n") for item in got)


def test_frames_of_steps_gone_from_the_buffer_are_dropped_too() -> None:
    hub = _hub_with(HUB_BUFFER + 10)
    assert len(hub._frames) == HUB_BUFFER
    assert min(hub._frames) == 11
