"""A sandbox that holds its notifies: each is kept once and the provider stops there."""

import asyncio
from pathlib import Path

import httpx

from roompay.sandbox.app import Sandbox
from roompay.sandbox.notifier import ALIPAY_RETRY_DELAYS_S, WECHAT_RETRY_DELAYS_S, Notification


def _wechat_accepts(response: httpx.Response) -> bool:
    return response.status_code in (200, 204)


def _alipay_accepts(response: httpx.Response) -> bool:
    return response.content == b"success"


def test_a_held_notify_is_kept_once_and_neither_provider_sends_it_again(tmp_path: Path) -> None:
    sandbox = Sandbox(tmp_path, time_scale=1e6, hold_notifies=True)

    async def deliver_both() -> list[bool]:
        records = [
            sandbox.notifier.send(
                Notification(
                    url="http://127.0.0.1:9/notify", body=body, headers={}, accepted=accepted
                ),
                delays,
            )
            for body, accepted, delays in (
                (b'{"wallet": "wechat"}', _wechat_accepts, WECHAT_RETRY_DELAYS_S),
                (b"wallet=alipay", _alipay_accepts, ALIPAY_RETRY_DELAYS_S),
            )
        ]
        # On a schedule scaled a million times, every retry would be due within 0.1 s.
        await asyncio.sleep(0.3)
        await sandbox.notifier.aclose()
        return [record.delivered and record.attempts == 1 for record in records]

    assert asyncio.run(deliver_both()) == [True, True]
    assert [request.content for request in sandbox.held_notifies] == [
        b'{"wallet": "wechat"}',
        b"wallet=alipay",
    ]
