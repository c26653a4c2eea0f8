"""Reads of waiting requests' prefixes from the pool, carried by step plans: no extra round trip to the
workers.

A request next in line with blocks after its device and host hits is looked up in one step's plan (a
count: how many leading keys every rank's pool holds); the next step's plan reads that many blocks into
host blocks (so a lookup that finds nothing takes and evicts no host block); the step after admits it
with those blocks as host hits. While its read is pending the request is not admitted, so it never
recomputes what the pool holds. The workers run a plan's reads after its forward and pool writes, so a
block written in the same step is found.

Pure Python: kvcache plans the host blocks; the workers read (worker.kv_tiers).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from pdserve.kvcache.manager import KVCacheManager, PoolLoad
from pdserve.messages import PoolRead
from pdserve.request import Request


class PoolReads:
    def __init__(self, kv: KVCacheManager) -> None:
        self.kv = kv
        self._counted: dict[str, int] = {}  # req_id -> leading blocks the pool holds, to read with the next plan
        self._in_flight: dict[str, PoolLoad | None] = {}  # req_id -> its load (None: a count) in a plan being run

    def is_pending(self, req_id: str) -> bool:
        """A count or read of the request is under way: admitting it now would miss its pool hits."""
        return req_id in self._counted or req_id in self._in_flight

    def plan(self, lookups: Sequence[tuple[Request, list[bytes]]], requests: Mapping[str, Request]) -> list[PoolRead]:
        """This step's reads: the loads of last step's counts, then counts of `lookups` (requests next in
        line, with the keys after their device and host hits)."""
        reads = []
        for req_id, count in self._counted.items():
            request = requests.get(req_id)
            load = self.kv.plan_pool_load(request, count) if request is not None else None
            if load is not None:
                self._in_flight[req_id] = load
                reads.append(PoolRead(req_id, _names(load.keys), load.host_block_ids))
        self._counted = {}
        for request, keys in lookups:
            self._in_flight[request.req_id] = None
            reads.append(PoolRead(request.req_id, [key.hex() for key in keys]))
        return reads

    def finish(self, reads: Sequence[PoolRead], found: Sequence[int], requests: Mapping[str, Request]) -> None:
        """The plan carrying `reads` ran: `found[i]` leading blocks of read i were counted, or read on every
        rank. A count's blocks are read with the next plan; a load's are named on the host (kvcache)."""
        for read, num in zip(reads, found, strict=True):
            load = self._in_flight.pop(read.req_id, None)
            if load is None:
                if num and read.req_id in requests:
                    self._counted[read.req_id] = num
                continue
            self.kv.finish_pool_load(load, num)
            if read.req_id not in requests:  # finished while its blocks were read: they stay cached, unheld
                self.kv.tiers.forget(read.req_id)

    def forget(self, req_id: str) -> None:
        """The request finished or was admitted: no load of its count is planned (one in flight still ends
        in finish())."""
        self._counted.pop(req_id, None)


def _names(keys: Sequence[bytes | str]) -> list[str]:
    return [k.hex() if isinstance(k, bytes) else k for k in keys]
