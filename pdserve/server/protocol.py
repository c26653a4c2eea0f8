"""OpenAI request bodies (pydantic). Unknown fields are ignored, as OpenAI clients send many.

Validation here is the first line of defence: a body that fails it is a 400
with a message naming the field.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, Strict, field_validator

from pdserve.http.limits import json_type

# strict: a JSON true, 1.0 or "1" is not a token id (lax pydantic would take them as 1)
TokenId = Annotated[int, Strict(), Field(ge=0, le=2**31 - 1)]


class StreamOptions(BaseModel):
    include_usage: bool = False


class KVTransferParams(BaseModel):
    """Set by the router on the two halves of a PD request (docs/disaggregation.md); clients leave it out."""

    model_config = ConfigDict(extra="forbid")

    room: str = Field(min_length=1, max_length=128)
    peer: str = Field(pattern=r"^tcp://[^\s/]+:\d+$")
    peer_incarnation: str = ""
    mode: Literal["direct", "storage"] = "direct"


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)  # a float field refuses NaN and +-inf

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
    n: int = Field(default=1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    kv_transfer_params: KVTransferParams | None = None
    # set by the router (docs/server.md, "Migration"); clients leave them out:
    # a streamed chunk's choice carries the `token_ids` of its delta
    stream_token_ids: bool = False
    # the completion so far of a request that moved here from a failed instance: generation resumes after it
    resume_token_ids: list[TokenId] | None = None

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
    echo: bool = False

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
    def _one_prompt(cls, v: Any) -> Union[str, list[int]]:
        if isinstance(v, list) and v and isinstance(v[0], (str, list)):
            if len(v) != 1:
                raise ValueError("one prompt per request is supported; send a string or one list of token ids")
            v = v[0]
        if isinstance(v, str) and not v:
            raise ValueError("the prompt is empty")
        if isinstance(v, list) and not v:
            raise ValueError("the prompt is an empty list of token ids")
        return v


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Union[str, list[dict[str, Any]], None] = None

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
