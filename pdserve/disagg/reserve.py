"""D's admission reserve: blocks kept back for the future decode tokens of requests already running.

reserve = sum over running r of max(0, ceil((len(r) + min(tokens_left(r), clip) * ratio) / block_size)
                                    - blocks held by r)
The ratio starts at `init`, decays by `decay` each step down to `min` (requests tend to stop before
max_tokens), and goes back to `init` on a preemption (the estimate was too low). Pure Python.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass
class Reservee:
    num_tokens: int  # prompt + output so far
    num_tokens_left: int  # max_tokens - output so far
    num_blocks_held: int


class DecodeReserve:
    def __init__(
        self, block_size: int, init: float = 1.0, minimum: float = 0.1, decay: float = 0.998, clip: int = 1024
    ) -> None:
        self.block_size = block_size
        self.init = init
        self.minimum = minimum
        self.decay = decay
        self.clip = clip
        self.ratio = init

    def num_blocks(self, running: Iterable[Reservee]) -> int:
        total = 0
        for r in running:
            future = min(r.num_tokens_left, self.clip) * self.ratio
            need = math.ceil((r.num_tokens + future) / self.block_size)
            total += max(0, need - r.num_blocks_held)
        return total

    def on_step(self) -> None:
        self.ratio = max(self.minimum, self.ratio * self.decay)

    def on_preemption(self) -> None:
        self.ratio = self.init
