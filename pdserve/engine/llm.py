"""The offline API, shaped like vLLM's: `LLM(model).generate(prompts, sampling_params)`."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any, Union

from pdserve.config import make_engine_config
from pdserve.engine.core import EngineCore
from pdserve.engine.tokenizer import Detokenizer, load_tokenizer
from pdserve.request import CompletionOutput, FinishReason, RequestOutput, SamplingParams

PromptType = Union[str, dict[str, Any], Sequence[int]]
_counter = itertools.count()


class LLM:
    """An engine in this process (tensor-parallel ranks in worker processes)."""

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        """Keyword arguments are those of config.make_engine_config (dtype, num_blocks,
        host_kv_cache_memory, kv_store, ...), named like the command-line flags."""
        self.config = make_engine_config(model, **kwargs)
        self.engine = EngineCore(self.config)
        try:
            self.tokenizer = load_tokenizer(self.engine.source)
        except BaseException:
            self.engine.shutdown()
            raise

    def get_tokenizer(self) -> Any:
        return self.tokenizer

    @property
    def num_preemptions(self) -> int:
        return self.engine.scheduler.stats.num_preemptions

    def _to_token_ids(self, prompt: PromptType, index: int) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"prompt {index} is text, but this model has no tokenizer; pass prompt_token_ids")
            if not prompt:
                raise ValueError(f"prompt {index} is empty; give at least one character")
            return prompt, self.tokenizer.encode(prompt)
        ids = prompt.get("prompt_token_ids") if isinstance(prompt, dict) else prompt
        if isinstance(prompt, dict) and ids is None:
            raise ValueError(f"prompt {index} is a dict without 'prompt_token_ids'")
        if not isinstance(ids, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise ValueError(
                f"prompt {index} is {type(prompt).__name__}; a prompt is a string, a list of token ids, "
                "or {'prompt_token_ids': [...]}"
            )
        return None, list(ids)

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        if isinstance(prompts, (str, dict)) or (
            isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]  # type: ignore[list-item]
        if not isinstance(prompts, (list, tuple)):
            raise ValueError(f"prompts must be a string, a dict or a list of them, got {type(prompts).__name__}")
        prompts = list(prompts)  # type: ignore[arg-type]
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = (
            [sampling_params] * len(prompts) if isinstance(sampling_params, SamplingParams) else list(sampling_params)
        )
        if len(params) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(params)} sampling params; give one or one each")
        encoded = [self._to_token_ids(p, i) for i, p in enumerate(prompts)]
        for i, (_, ids) in enumerate(encoded):  # validate everything before anything is queued
            try:
                self.engine.validate_prompt(ids)
            except ValueError as e:
                raise ValueError(f"prompt {i}: {e}") from None
        return self._run(encoded, params, use_tqdm)

    def chat(
        self,
        messages: list[dict[str, str]] | list[list[dict[str, str]]],
        sampling_params: SamplingParams | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to each conversation, then generate."""
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer, so it has no chat template")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [
            {
                "prompt_token_ids": self.tokenizer.apply_chat_template(
                    c, add_generation_prompt=True, tokenize=True, return_dict=False
                )
            }
            for c in conversations
        ]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(
        self, encoded: list[tuple[str | None, list[int]]], params: list[SamplingParams], use_tqdm: bool
    ) -> list[RequestOutput]:
        from tqdm import tqdm

        req_ids = [f"offline-{next(_counter)}" for _ in encoded]
        detoks = {r: Detokenizer(self.tokenizer, list(p.stop or [])) for r, p in zip(req_ids, params)}
        logprobs: dict[str, list[dict[int, float]]] = {r: [] for r in req_ids}
        reasons: dict[str, FinishReason | None] = {}
        try:
            for req_id, (_, ids), sp in zip(req_ids, encoded, params):
                self.engine.add_request(req_id, ids, sp)
            with tqdm(
                total=len(req_ids), desc="generating", unit="req", disable=not use_tqdm or len(req_ids) < 2
            ) as bar:
                while len(reasons) < len(req_ids):
                    for update in self.engine.step():
                        req_id = update.request.req_id
                        detok = detoks[req_id]
                        detok.append(update.new_token_ids)
                        if update.new_logprobs:
                            logprobs[req_id] += [dict(entry) for entry in update.new_logprobs]
                        if detok.stop_reason is not None and not update.finished:
                            self.engine.finish(req_id, FinishReason.STOP)
                        if detok.stop_reason is not None:
                            reasons[req_id] = FinishReason.STOP  # a stop string wins over a length limit
                        elif update.finished:
                            reasons[req_id] = update.request.finish_reason
                        if req_id in reasons:
                            bar.update(1)
            while self.engine.has_work:  # send the last cache writes (pool write-through) to the workers
                self.engine.step()
        except BaseException:
            for req_id in req_ids:
                self.engine.abort(req_id)
            raise
        outputs = []
        for req_id, (text, ids), sp in zip(req_ids, encoded, params):
            detok = detoks[req_id]
            reason = reasons[req_id]
            completion = CompletionOutput(
                index=0,
                text=detok.text,
                token_ids=list(detok.token_ids),
                finish_reason=reason.value if reason else None,
                logprobs=logprobs[req_id] if sp.logprobs is not None else None,
                stop_reason=detok.stop_reason,
            )
            outputs.append(RequestOutput(req_id, text, ids, [completion], finished=True))
        return outputs

    def shutdown(self) -> None:
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
