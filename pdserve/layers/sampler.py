"""Token sampling: greedy, temperature, top-k, top-p, min-p, per-request seeds, logprobs.

Logprobs are those of the raw model distribution (before temperature and
filtering), as OpenAI and vLLM report them. A request with a seed owns a
generator, so its samples do not depend on what else is in the batch.
"""

from __future__ import annotations

import torch

from pdserve.messages import SamplingSpec

MIN_TEMPERATURE = 1e-5  # below this, logits / temperature overflows float32: sample greedily


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0) -> None:
        self.device = device
        self._shared = torch.Generator(device=device).manual_seed(seed)
        self._seeded: dict[str, torch.Generator] = {}

    def forget(self, req_ids: list[str]) -> None:
        for req_id in req_ids:
            self._seeded.pop(req_id, None)

    def _generator(self, req_id: str, seed: int | None) -> torch.Generator:
        if seed is None:
            return self._shared
        g = self._seeded.get(req_id)
        if g is None:
            g = self._seeded[req_id] = torch.Generator(device=self.device).manual_seed(seed)
        return g

    def __call__(
        self, logits: torch.Tensor, req_ids: list[str], specs: list[SamplingSpec]
    ) -> tuple[list[int], list[list[tuple[int, float]]] | None]:
        """logits: [num_seqs, vocab] float32 -> one token id per row (and logprobs if asked)."""
        token_ids = logits.argmax(dim=-1)
        random_rows = [i for i, s in enumerate(specs) if s.temperature >= MIN_TEMPERATURE]
        if random_rows:
            sampled = self._sample(logits[random_rows], [req_ids[i] for i in random_rows],
                                   [specs[i] for i in random_rows])
            token_ids[random_rows] = sampled
        token_list = token_ids.tolist()
        if all(s.num_logprobs < 0 for s in specs):
            return token_list, None
        return token_list, self._logprobs(logits, token_ids, specs)

    def _sample(self, logits: torch.Tensor, req_ids: list[str], specs: list[SamplingSpec]) -> torch.Tensor:
        temps = torch.tensor([s.temperature for s in specs], device=logits.device)
        logits = logits / temps[:, None]
        if any(s.top_k > 0 or s.top_p < 1 or s.min_p > 0 for s in specs):
            logits = self._filter(logits, specs)
        probs = logits.softmax(dim=-1)
        # exponential race: argmax(p / q), q ~ Exp(1), draws index i with probability p_i.
        # Noise is drawn in vocabulary order per request, so a seeded row never depends on its neighbours.
        noise = torch.empty_like(probs)
        for row, (req_id, spec) in enumerate(zip(req_ids, specs)):
            noise[row].exponential_(generator=self._generator(req_id, spec.seed))
        return (probs / noise).argmax(dim=-1)

    @staticmethod
    def _filter(logits: torch.Tensor, specs: list[SamplingSpec]) -> torch.Tensor:
        """Mask tokens outside top-k, top-p and min-p with -inf (in vocabulary order)."""
        vocab = logits.shape[-1]
        device = logits.device
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        ranks = torch.arange(vocab, device=device)
        top_k = torch.tensor([s.top_k if s.top_k > 0 else vocab for s in specs], device=device)
        min_p = torch.tensor([s.min_p for s in specs], device=device)
        drop = ranks[None, :] >= top_k[:, None]
        drop |= probs < min_p[:, None] * probs[:, :1]
        uses_top_p = [i for i, s in enumerate(specs) if s.top_p < 1]
        if uses_top_p:
            top_p = torch.tensor([max(specs[i].top_p, 1e-6) for i in uses_top_p], device=device)
            kept = probs[uses_top_p].masked_fill(drop[uses_top_p], 0.0)
            kept = kept / kept.sum(dim=-1, keepdim=True)
            drop[uses_top_p] |= (kept.cumsum(dim=-1) - kept) >= top_p[:, None]  # the top token always stays
        drop_in_vocab_order = torch.empty_like(drop).scatter_(1, order, drop)
        return logits.masked_fill(drop_in_vocab_order, float("-inf"))

    def _logprobs(
        self, logits: torch.Tensor, token_ids: torch.Tensor, specs: list[SamplingSpec]
    ) -> list[list[tuple[int, float]]]:
        logprobs = logits.log_softmax(dim=-1)
        k = max(s.num_logprobs for s in specs)
        top_values, top_ids = logprobs.topk(max(k, 1), dim=-1)
        chosen = logprobs.gather(1, token_ids[:, None]).squeeze(1).tolist()
        values, ids, tokens = top_values.tolist(), top_ids.tolist(), token_ids.tolist()
        out = []
        for row, spec in enumerate(specs):
            k_row = max(spec.num_logprobs, 0)
            out.append([(tokens[row], chosen[row]), *zip(ids[row][:k_row], values[row][:k_row])])
        return out
