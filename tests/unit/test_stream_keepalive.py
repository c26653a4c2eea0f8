"""The API server's keepalives on a quiet stream (`_with_keepalives`): a None whenever the stream is silent for the
interval, the events in order, and a cancelled consumer (a client gone) leaves the event source closed cleanly."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from pdserve.server.api import _with_keepalives


async def _events(log: list[object], delay_s: float, count: int) -> AsyncIterator[int]:
    try:
        for i in range(count):
            await asyncio.sleep(delay_s)
            yield i
    finally:
        log.append("closed")


def test_keepalives_fill_the_silences_and_events_keep_their_order() -> None:
    async def main() -> list[object]:
        log: list[object] = []
        out: list[object] = []
        events = _events(log, 0.25, 3)
        async with contextlib.aclosing(events):
            async for e in _with_keepalives(events, 0.1):
                out.append(e)
        return [x for x in out if x is not None], out.count(None), log

    got, num_keepalives, log = asyncio.run(main())
    assert got == [0, 1, 2] and num_keepalives >= 3 and log == ["closed"]


def test_a_cancelled_stream_closes_its_events_without_an_error() -> None:
    async def main() -> tuple[list[object], str]:
        log: list[object] = []

        async def consume() -> None:
            events = _events(log, 0.3, 100)
            async with contextlib.aclosing(events):
                async for _ in _with_keepalives(events, 0.1):
                    pass

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.75)  # waiting for the third event, between keepalives
        task.cancel()
        try:
            await task
        except BaseException as e:  # noqa: BLE001 - the test looks at which
            return log, type(e).__name__
        return log, "none"

    log, raised = asyncio.run(main())
    assert log == ["closed"] and raised == "CancelledError"  # not RuntimeError: aclose() of a running generator
