"""KV transfer counters of one instance (both sides), reported in EngineStats."""

from __future__ import annotations

import bisect
from collections import Counter

from pdserve.messages import TRANSFER_SECONDS_BUCKETS, TransferCounters


class TransferStats:
    def __init__(self) -> None:
        self.bytes_sent = 0
        self.bytes_received = 0
        self.num_transfers = 0
        self.seconds_sum = 0.0
        self._buckets = [0] * len(TRANSFER_SECONDS_BUCKETS)
        self.failures: Counter[str] = Counter()
        self.send_seconds_busy = 0.0
        self.send_seconds_exposed = 0.0
        self.pool_seconds_put = 0.0
        self.pool_seconds_get = 0.0
        self.num_load_recomputes = 0
        self.num_recomputed_tokens = 0

    def observe(self, seconds: float) -> None:
        self.num_transfers += 1
        self.seconds_sum += seconds
        index = bisect.bisect_left(TRANSFER_SECONDS_BUCKETS, seconds)
        for i in range(index, len(self._buckets)):
            self._buckets[i] += 1

    def fail(self, reason: str) -> None:
        self.failures[reason] += 1

    def snapshot(self) -> TransferCounters:
        return TransferCounters(
            bytes_sent=self.bytes_sent,
            bytes_received=self.bytes_received,
            num_transfers=self.num_transfers,
            seconds_sum=self.seconds_sum,
            seconds_buckets=list(self._buckets),
            failures=dict(self.failures),
            send_seconds_busy=self.send_seconds_busy,
            send_seconds_exposed=self.send_seconds_exposed,
            pool_seconds_put=self.pool_seconds_put,
            pool_seconds_get=self.pool_seconds_get,
            num_load_recomputes=self.num_load_recomputes,
            num_recomputed_tokens=self.num_recomputed_tokens,
        )
