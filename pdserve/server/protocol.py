"""OpenAI request bodies (pydantic): exactly the fields pdserve honours.

A field that would change what is generated and that pdserve does not honour
(OpenAI's or vLLM's, `UNSUPPORTED_FIELDS`) is a 400 naming it, as is a field
nobody defines; only fields that change nothing (`IGNORED_FIELDS`) are
accepted and dropped. docs/server.md lists both. Validation here is the first
line of defence: a body that fails it is a 400 with a message naming the field.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, Strict, field_validator, model_validator

from pdserve.http.limits import json_type

# strict: a JSON true, 1.0 or "1" is not a token id (lax pydantic would take them as 1)
TokenId = Annotated[int, Strict(), Field(ge=0, le=2**31 - 1)]


# accepted and dropped: they change nothing pdserve generates (bookkeeping for OpenAI's platform)
IGNORED_FIELDS = frozenset({"user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier"})

# refused with a 400 when present and not null: field -> what to do instead
UNSUPPORTED_FIELDS: dict[str, str] = {
    # OpenAI chat completions
    "audio": "audio output is not supported",
    "modalities": "only text output is supported",
    "prediction": "predicted outputs are not supported",
    "reasoning_effort": "reasoning controls are not supported",
    "verbosity": "verbosity is not supported",
    "web_search_options": "web search is not supported",
    "functions": "the deprecated functions API is not supported; send tools",
    "function_call": "the deprecated functions API is not supported; send tool_choice",
    # OpenAI completions
    "best_of": "best_of is not supported; send n and pick yourself",
    "suffix": "suffix (insertion) is not supported",
    # vLLM's extensions
    "use_beam_search": "beam search is not supported",
    "length_penalty": "length_penalty (beam search) is not supported",
    "include_stop_str_in_output": "stop strings are never included in the output",
    "skip_special_tokens": "special tokens are always skipped in the text",
    "spaces_between_special_tokens": "special tokens are always skipped in the text",
    "truncate_prompt_tokens": "prompts are never truncated; shorten the prompt",
    "allowed_token_ids": "allowed_token_ids is not supported; use logit_bias or a guided_* constraint",
    "add_generation_prompt": "the generation prompt is always added",
    "continue_final_message": "continue_final_message is not supported",
    "add_special_tokens": "add_special_tokens is not supported",
    "documents": "documents are not supported",
    "chat_template": "a per-request chat template is not supported",
    "mm_processor_kwargs": "multimodal input is not supported",
    "guided_decoding_backend": "the structured-output backend is always xgrammar",
    "guided_whitespace_pattern": "guided_whitespace_pattern is not supported",
    "structural_tag": "structural_tag is not supported; use guided_grammar",
    "priority": "request priorities are not supported",
    "request_id": "request ids are assigned by the server",
    "logits_processors": "custom logits processors are not supported",
    "return_tokens_as_token_ids": "return_tokens_as_token_ids is not supported",
    "return_token_ids": "return_token_ids is not supported",
    "cache_salt": "cache_salt is not supported",
    "vllm_xargs": "vllm_xargs is not supported",
    "include_reasoning": "reasoning parsing is not supported",
}


# unsupported fields sent with the value that asks for what pdserve does anyway (vLLM clients send its defaults)
SAME_AS_PDSERVE: dict[str, Any] = {
    "best_of": 1,
    "use_beam_search": False,
    "length_penalty": 1.0,
    "include_stop_str_in_output": False,
    "skip_special_tokens": True,
    "spaces_between_special_tokens": True,
    "add_generation_prompt": True,
    "continue_final_message": False,
    "return_tokens_as_token_ids": False,
    "return_token_ids": False,
}


def _same(value: Any, expected: Any) -> bool:
    """JSON equality that keeps true apart from 1."""
    return value == expected and isinstance(value, bool) == isinstance(expected, bool)


def _check_fields(model: type[BaseModel], data: Any) -> Any:
    """The 400 for a field pdserve does not honour; IGNORED_FIELDS are dropped."""
    if not isinstance(data, dict):
        return data
    for key, value in data.items():
        if key in model.model_fields or key in IGNORED_FIELDS:
            continue
        if key in UNSUPPORTED_FIELDS:
            if value is None:
                continue  # a null is the same as leaving it out
            if key in SAME_AS_PDSERVE and _same(value, SAME_AS_PDSERVE[key]):
                continue
            raise ValueError(f"`{key}` is not supported by pdserve: {UNSUPPORTED_FIELDS[key]}")
        shown = key.encode("utf-8", "backslashreplace").decode()  # a lone surrogate cannot go into an error
        raise ValueError(f"`{shown}` is not a field pdserve knows; remove it (docs/server.md lists the fields)")
    return {k: v for k, v in data.items() if k in model.model_fields}


MAX_CHOICES = 64  # choices of one request: n times the prompts of a completion


class StreamOptions(BaseModel):
    include_usage: bool = False


class KVTransferParams(BaseModel):
    """Set by the router on the two halves of a PD request (docs/disaggregation.md); clients leave it out."""

    model_config = ConfigDict(extra="forbid")

    room: str = Field(min_length=1, max_length=128)
    peer: str = Field(pattern=r"^tcp://[^\s/]+:\d+$")
    peer_incarnation: str = ""
    mode: Literal["direct", "storage"] = "direct"


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(default="schema", max_length=64)
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs`: exactly one of its constraints."""

    model_config = ConfigDict(extra="forbid")

    json_: Union[dict[str, Any], str, None] = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # a float field refuses NaN and +-inf

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=-1, ge=-1, le=2**31 - 1)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stop: Union[str, list[str], None] = None
    stop_token_ids: list[TokenId] | None = None
    ignore_eos: bool = False
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    kv_transfer_params: KVTransferParams | None = None
    # set by the router (docs/server.md, "Migration"); clients leave them out:
    # a streamed chunk's choice carries the `token_ids` of its delta
    stream_token_ids: bool = False
    # the completion so far of a request that moved here from a failed instance: generation resumes after it
    resume_token_ids: list[TokenId] | None = None
    # logits processors (layers.sampler)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=10.0)
    logit_bias: dict[str, float] | None = None
    min_tokens: int = Field(default=0, ge=0)
    bad_words: list[str] | None = Field(default=None, max_length=64)
    # structured output (engine.grammar): at most one of these
    response_format: ResponseFormat | None = None
    guided_json: Union[dict[str, Any], str, None] = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = Field(default=None, min_length=1)
    guided_grammar: str | None = None
    structured_outputs: StructuredOutputs | None = None
    prompt_logprobs: int | None = Field(default=None, ge=0, le=20)  # vLLM's: each prompt token scored, top k

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, data: Any) -> Any:
        return _check_fields(cls, data)

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (v or {}).items():
            if not key.isdigit():
                raise ValueError(f"logit_bias keys are token ids (strings of digits), got {key!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias of token {key} is {bias}; biases are in [-100, 100]")
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: Union[str, list[str], None]) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops


class CompletionRequest(SamplingFields):
    prompt: Union[str, list[TokenId], list[str], list[list[TokenId]]]
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False  # the prompt before the completion (with logprobs: the prompt's tokens scored too)

    @field_validator("prompt", mode="before")
    @classmethod
    def _int_token_ids(cls, v: Any) -> Any:
        """A clearer message than the union's for the common mistake: a list of numbers that are not all ints."""
        ids = v[0] if isinstance(v, list) and len(v) == 1 and isinstance(v[0], list) else v
        if isinstance(ids, list) and any(isinstance(t, (int, float)) for t in ids):
            for i, t in enumerate(ids):
                if isinstance(t, bool) or not isinstance(t, int):
                    raise ValueError(f"token id {i} is {json_type(t)}; token ids must be JSON integers")
        return v

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, v: Any) -> list[Union[str, list[int]]]:
        """Always a list of prompts (each a string or token ids): a completion has a choice per prompt."""
        prompts = v if isinstance(v, list) and v and isinstance(v[0], (str, list)) else [v]
        if len(prompts) > MAX_CHOICES:
            raise ValueError(f"{len(prompts)} prompts; at most {MAX_CHOICES} in one request")
        for i, p in enumerate(prompts):
            where = "the prompt" if len(prompts) == 1 else f"prompt {i}"
            if isinstance(p, str) and not p:
                raise ValueError(f"{where} is empty")
            if isinstance(p, list) and not p:
                raise ValueError(f"{where} is an empty list of token ids")
        return prompts

    @model_validator(mode="after")
    def _num_choices(self) -> CompletionRequest:
        if len(self.prompt) * self.n > MAX_CHOICES:
            raise ValueError(f"{len(self.prompt)} prompts times n={self.n} is more than {MAX_CHOICES} choices")
        return self


class ToolCallFunction(BaseModel):
    name: str
    arguments: str


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Union[str, list[dict[str, Any]], None] = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool's answer to one of them
    refusal: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            parts = [p.get("text") for p in self.content if p.get("type") == "text"]
            if len(parts) != len(self.content):
                raise ValueError("only text content parts are supported")
            texts = [p for p in parts if isinstance(p, str)]
            if len(texts) != len(parts):
                raise ValueError('every text content part needs a string "text"')
            return "".join(texts)
        return self.content or ""


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[dict[str, Any]] | None = Field(default=None, max_length=128)
    tool_choice: Union[Literal["none", "auto", "required"], dict[str, Any], None] = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: a prompt, or chat messages through the chat template."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    add_special_tokens: bool = True  # a prompt's BOS and the like
    add_generation_prompt: bool = True  # messages: end with the assistant's turn opening
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send `prompt` or `messages` (one of them)")
        return self


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    tokens: list[TokenId] = Field(max_length=1 << 20)
