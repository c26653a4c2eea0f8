"""Token sampling: greedy, temperature, top-k, top-p, min-p, per-request seeds, logprobs, and the logits
processors a request may ask for: logit bias, repetition / frequency / presence penalties, a grammar's
token bitmask (structured output) and banned tokens (min_tokens, bad words).

Logprobs are those of the raw model distribution (before processors, temperature and
filtering), as OpenAI and vLLM report them. The processors run batched on the device,
on the rows that have any, in one order (`SamplingSpec`): logit bias, repetition
penalty, frequency and presence penalties, then grammar-disallowed and banned tokens
at -inf (bans that would leave no token the grammar allows are lifted: the grammar wins). A seeded sample draws its noise from
a generator seeded with (the request's seed, the token's index in the completion):
it depends on nothing else in the batch, and the sampler keeps no per-request state,
so a request continues the same sequence on another instance (P then D, a migration).
"""

from __future__ import annotations

import hashlib
import struct

import torch

from pdserve.layers.device import to_device
from pdserve.messages import SamplingSpec

MIN_TEMPERATURE = 1e-5  # below this, logits / temperature overflows float32: sample greedily


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0) -> None:
        self.device = device
        self._shared = torch.Generator(device=device).manual_seed(seed)
        self._keyed = torch.Generator(device=device)  # re-seeded for each seeded row

    def forget(self, req_ids: list[str]) -> None:
        """Nothing to forget: seeded samples are keyed on (seed, index), not on per-request state."""

    def _generator(self, spec: SamplingSpec) -> torch.Generator:
        if spec.seed is None:
            return self._shared
        # NOTE: a CUDA kernel takes its Philox seed and offset at launch, so re-seeding for the next row is safe
        return self._keyed.manual_seed(sample_seed(spec.seed, spec.sample_index))

    def __call__(
        self, logits: torch.Tensor, req_ids: list[str], specs: list[SamplingSpec]
    ) -> tuple[list[int], list[list[tuple[int, float]]] | None]:
        """logits: [num_seqs, vocab] float32 -> one token id per row (and logprobs if asked)."""
        return self.to_host(self.sample_on_device(logits, req_ids, specs), specs)

    def sample_on_device(self, logits: torch.Tensor, req_ids: list[str], specs: list[SamplingSpec]) -> torch.Tensor:
        """Everything on the device, with no host sync: [num_seqs, 1 + 2 * (1 + k)] float64 rows of (token id,
        its logprob, top-k logprobs, top-k ids) where any spec asks for logprobs (k = the most asked), else
        [num_seqs] token ids."""
        raw = logits
        if any(s.has_processors for s in specs):
            logits = process_logits(logits, specs)
        token_ids = logits.argmax(dim=-1)
        random_rows = [i for i, s in enumerate(specs) if s.temperature >= MIN_TEMPERATURE]
        if len(random_rows) == len(specs):
            token_ids = self._sample(logits, req_ids, specs)
        elif random_rows:
            rows = to_device(random_rows, logits.device, torch.int64)
            sampled = self._sample(
                logits.index_select(0, rows), [req_ids[i] for i in random_rows], [specs[i] for i in random_rows]
            )
            token_ids.index_copy_(0, rows, sampled)
        if all(s.num_logprobs < 0 for s in specs):
            return token_ids
        logprobs = raw.log_softmax(dim=-1)
        k = max(1, max(s.num_logprobs for s in specs))
        top_values, top_ids = logprobs.topk(k, dim=-1)
        chosen = logprobs.gather(1, token_ids[:, None])
        # one float64 tensor (token ids < 2**53 are exact), so that one copy brings everything to the host
        return torch.cat([token_ids[:, None].double(), chosen.double(), top_values.double(), top_ids.double()], dim=1)

    @staticmethod
    def to_host(
        packed: torch.Tensor, specs: list[SamplingSpec]
    ) -> tuple[list[int], list[list[tuple[int, float]]] | None]:
        """The one host sync of a step: sample_on_device's result as token ids (and logprobs)."""
        rows = packed.tolist()
        if packed.dim() == 1:
            return rows, None
        k = (packed.shape[1] - 2) // 2
        tokens = [int(r[0]) for r in rows]
        out = []
        for row, spec in zip(rows, specs):
            k_row = max(spec.num_logprobs, 0)
            top = zip((int(i) for i in row[2 + k : 2 + k + k_row]), row[2 : 2 + k_row])
            out.append([(int(row[0]), row[1]), *top])
        return tokens, out

    def _sample(self, logits: torch.Tensor, req_ids: list[str], specs: list[SamplingSpec]) -> torch.Tensor:
        temps = to_device([s.temperature for s in specs], logits.device, logits.dtype)
        logits = logits / temps[:, None]
        if any(s.top_k > 0 or s.top_p < 1 or s.min_p > 0 for s in specs):
            logits = self._filter(logits, specs)
        probs = logits.softmax(dim=-1)
        # exponential race: argmax(p / q), q ~ Exp(1), draws index i with probability p_i.
        # Noise is drawn in vocabulary order per request, so a seeded row never depends on its neighbours.
        noise = torch.empty_like(probs)
        for row, spec in enumerate(specs):
            noise[row].exponential_(generator=self._generator(spec))
        return (probs / noise).argmax(dim=-1)

    @staticmethod
    def _filter(logits: torch.Tensor, specs: list[SamplingSpec]) -> torch.Tensor:
        """Mask tokens outside top-k, top-p and min-p with -inf (in vocabulary order)."""
        vocab = logits.shape[-1]
        device = logits.device
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        ranks = torch.arange(vocab, device=device)
        top_k = to_device([s.top_k if s.top_k > 0 else vocab for s in specs], device)
        min_p = to_device([s.min_p for s in specs], device, probs.dtype)
        drop = ranks[None, :] >= top_k[:, None]
        drop |= probs < min_p[:, None] * probs[:, :1]
        uses_top_p = [i for i, s in enumerate(specs) if s.top_p < 1]
        if uses_top_p:
            top_p = to_device([max(specs[i].top_p, 1e-6) for i in uses_top_p], device, probs.dtype)
            rows = to_device(uses_top_p, device, torch.int64)
            row_drop = drop.index_select(0, rows)
            kept = probs.index_select(0, rows).masked_fill(row_drop, 0.0)
            kept = kept / kept.sum(dim=-1, keepdim=True)
            row_drop |= (kept.cumsum(dim=-1) - kept) >= top_p[:, None]  # the top token always stays
            drop.index_copy_(0, rows, row_drop)
        drop_in_vocab_order = torch.empty_like(drop).scatter_(1, order, drop)
        return logits.masked_fill(drop_in_vocab_order, float("-inf"))


def sample_seed(seed: int, sample_index: int) -> int:
    """The generator seed of a request's token number `sample_index`: a 63-bit hash of both."""
    digest = hashlib.blake2b(struct.pack("<QQ", seed & (2**64 - 1), sample_index), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def process_logits(logits: torch.Tensor, specs: list[SamplingSpec]) -> torch.Tensor:
    """A copy of `logits` [rows, vocab] with each row's processors applied (see SamplingSpec for the order)."""
    rows = [i for i, s in enumerate(specs) if s.has_processors]
    device, vocab = logits.device, logits.shape[-1]
    sub = logits.index_select(0, to_device(rows, device, torch.int64)) if len(rows) < len(specs) else logits.clone()
    picked = [specs[i] for i in rows]

    def scatter_rows(pairs: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        flat = [(r, t) for r, t in pairs if 0 <= t < vocab]
        return (
            to_device([r for r, _ in flat], device, torch.int64),
            to_device([t for _, t in flat], device, torch.int64),
        )

    bias = [(r, t, b) for r, s in enumerate(picked) for t, b in s.logit_bias if 0 <= t < vocab]
    if bias:
        r, t = scatter_rows([(r, t) for r, t, _ in bias])
        sub.index_put_((r, t), to_device([b for *_, b in bias], device, sub.dtype), accumulate=True)
    rep = [r for r, s in enumerate(picked) if s.repetition_penalty != 1.0]
    if rep:
        seen = torch.zeros(len(picked), vocab, dtype=torch.bool, device=device)
        r, t = scatter_rows(
            [(r, t) for r in rep for t in (*picked[r].penalty_prompt_ids, *picked[r].penalty_output_ids)]
        )
        seen[r, t] = True
        penalty = to_device([s.repetition_penalty for s in picked], device, sub.dtype)[:, None]
        sub = torch.where(seen, torch.where(sub > 0, sub / penalty, sub * penalty), sub)
    freq = [r for r, s in enumerate(picked) if s.frequency_penalty or s.presence_penalty]
    if freq:
        counts = torch.zeros(len(picked), vocab, dtype=sub.dtype, device=device)
        r, t = scatter_rows([(r, t) for r in freq for t in picked[r].penalty_output_ids])
        counts.index_put_((r, t), torch.ones(len(t), dtype=sub.dtype, device=device), accumulate=True)
        frequency = to_device([s.frequency_penalty for s in picked], device, sub.dtype)[:, None]
        presence = to_device([s.presence_penalty for s in picked], device, sub.dtype)[:, None]
        sub = sub - frequency * counts - presence * (counts > 0).to(sub.dtype)
    masked = [r for r, s in enumerate(picked) if s.token_bitmask is not None]
    if masked:
        sub = apply_bitmasks(sub, masked, [picked[r].token_bitmask for r in masked])  # type: ignore[misc]
    banned = [(r, t) for r, s in enumerate(picked) for t in s.banned_token_ids]
    if banned:
        r, t = scatter_rows(banned)
        allowed = sub
        sub = sub.clone()
        sub[r, t] = float("-inf")
        # where the bans leave nothing the grammar allows (it wants EOS, min_tokens bans it), the grammar wins
        nothing_left = torch.isneginf(sub).all(dim=-1, keepdim=True)
        sub = torch.where(nothing_left, allowed, sub)
    if len(rows) == len(specs):
        return sub
    out = logits.clone()
    out.index_copy_(0, to_device(rows, device, torch.int64), sub)
    return out


def apply_bitmasks(logits: torch.Tensor, rows: list[int], bitmasks: list[bytes]) -> torch.Tensor:
    """-inf where the grammar's bitmask (int32 words, bit set = allowed) disallows the token, in `rows`."""
    words = torch.frombuffer(bytearray(b"".join(bitmasks)), dtype=torch.int32).view(len(rows), -1)
    words = words.to(logits.device, non_blocking=True)
    bits = torch.arange(32, device=logits.device, dtype=torch.int32)
    allowed = ((words[:, :, None] >> bits) & 1).bool().flatten(1)[:, : logits.shape[-1]]
    if allowed.shape[1] < logits.shape[-1]:  # a bitmask shorter than the vocabulary allows nothing past it
        pad = torch.zeros(len(rows), logits.shape[-1] - allowed.shape[1], dtype=torch.bool, device=logits.device)
        allowed = torch.cat([allowed, pad], dim=1)
    index = to_device(rows, logits.device, torch.int64)
    logits[index] = logits[index].masked_fill(~allowed, float("-inf"))
    return logits
