"""Which instance serves a request: the policies, the prefix-affinity key, and the P/D pairing rule.

Pure Python over `Instance` records; no I/O, no clock, no randomness, so every
choice is exact and unit-tested. This module knows nothing about HTTP.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pdserve.config import ROLES
from pdserve.router.registry import Instance

PREFIX_KEY_CHARS = 256  # of the prompt (or the concatenated chat messages) that pick a P under cache_aware
PREFIX_KEY_TOKENS = 64  # of a token-id prompt, the same idea
DEFAULT_LOAD_THRESHOLD = 4


class RouterPolicy(ABC):
    """Picks one instance among candidates.

    Contract of `choose(candidates, request_key)`:
    - `candidates` is non-empty, every one healthy and of one role (the caller filters);
    - `request_key` is a prefix-affinity key (see `request_key()`), or None where affinity does not matter
      (the router passes None when it picks a D: D's work does not depend on cached prefixes);
    - returns one of `candidates`; never blocks, never does I/O, never raises for a non-empty list;
    - may update the policy's own state (round-robin position, kept per role); mutates no instance.
    Load is `Instance.num_in_flight`: requests this router has open on the instance now.
    """

    name: str = ""

    @abstractmethod
    def choose(self, candidates: Sequence[Instance], request_key: str | None) -> Instance: ...


class RoundRobin(RouterPolicy):
    """Each role's instances in URL order, one after another; a newcomer or a leaver keeps the order of the rest."""

    name = "round_robin"

    def __init__(self) -> None:
        self._last_url: dict[str, str] = {}  # role -> URL of the last choice

    def choose(self, candidates: Sequence[Instance], request_key: str | None) -> Instance:
        if not candidates:
            raise ValueError("choose() needs at least one candidate")
        ordered = sorted(candidates, key=lambda i: i.url)
        role = ordered[0].role
        last = self._last_url.get(role)
        chosen = next((i for i in ordered if last is not None and i.url > last), ordered[0])
        self._last_url[role] = chosen.url
        return chosen


class LeastLoaded(RouterPolicy):
    """The fewest router in-flight requests; ties go round robin."""

    name = "least_loaded"

    def __init__(self) -> None:
        self._tie_break = RoundRobin()

    def choose(self, candidates: Sequence[Instance], request_key: str | None) -> Instance:
        if not candidates:
            raise ValueError("choose() needs at least one candidate")
        least = min(i.num_in_flight for i in candidates)
        return self._tie_break.choose([i for i in candidates if i.num_in_flight == least], None)


class CacheAware(RouterPolicy):
    """One prompt prefix, one instance: rendezvous hashing of the request key over the candidates' URLs.

    Rendezvous (highest random weight) hashing moves only the keys of an instance
    that leaves or joins. The hashed choice yields to least_loaded when its load
    exceeds the least loaded candidate's by more than `load_threshold`; a request
    with no key (a D choice) is least_loaded.
    """

    name = "cache_aware"

    def __init__(self, load_threshold: int = DEFAULT_LOAD_THRESHOLD) -> None:
        if load_threshold < 0:
            raise ValueError(f"load_threshold must be >= 0, got {load_threshold}")
        self.load_threshold = load_threshold
        self._least_loaded = LeastLoaded()

    def choose(self, candidates: Sequence[Instance], request_key: str | None) -> Instance:
        if not candidates:
            raise ValueError("choose() needs at least one candidate")
        if request_key is None:
            return self._least_loaded.choose(candidates, None)
        chosen = max(candidates, key=lambda i: (rendezvous_score(request_key, i.url), i.url))
        least = min(i.num_in_flight for i in candidates)
        if chosen.num_in_flight - least > self.load_threshold:
            return self._least_loaded.choose(candidates, None)
        return chosen


POLICIES: dict[str, type[RouterPolicy]] = {p.name: p for p in (RoundRobin, LeastLoaded, CacheAware)}


def make_policy(name: str) -> RouterPolicy:
    if name not in POLICIES:
        raise ValueError(f"unknown router policy {name!r}; choose one of {', '.join(POLICIES)}")
    return POLICIES[name]()


def rendezvous_score(key: str, url: str) -> int:
    """A stable 64-bit weight of (key, instance): the same in every process and Python version."""
    digest = hashlib.blake2b(f"{key}\x00{url}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def scores_prompt(body: dict[str, Any]) -> bool:
    """Whether the request asks for its prompt's logprobs (echo with logprobs, vLLM's prompt_logprobs)."""
    echo_scored = body.get("echo") is True and body.get("logprobs") is not None
    return echo_scored or body.get("prompt_logprobs") is not None


def request_key(body: dict[str, Any]) -> str | None:
    """The prefix-affinity key of an OpenAI body: the head of its prompt or of its chat messages; None if neither."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        return prompt[:PREFIX_KEY_CHARS]
    if isinstance(prompt, list):
        return "ids:" + ",".join(str(t) for t in prompt[:PREFIX_KEY_TOKENS])
    messages = body.get("messages")
    if not isinstance(messages, list):
        return None
    parts: list[str] = []
    size = 0
    for m in messages:
        if size >= PREFIX_KEY_CHARS:
            break
        text = _message_text(m)
        parts.append(text)
        size += len(text)
    return "".join(parts)[:PREFIX_KEY_CHARS]


def _message_text(message: Any) -> str:
    if not isinstance(message, dict):
        return ""
    content = message.get("content")
    if isinstance(content, list):
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return f"{message.get('role', '')}:{content if isinstance(content, str) else ''}\n"


@dataclass(frozen=True)
class Route:
    """Where one request goes: `primary` answers the client (D, or a mixed instance); `prefill` is P in PD mode."""

    primary: Instance
    prefill: Instance | None = None
    mode: str | None = None  # KV transfer mode of a PD pair: direct | storage


class RouteError(Exception):
    """No route: an OpenAI error with this status and code."""

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


def pair_problem(p: Instance, d: Instance) -> str | None:
    """Why P and D cannot serve one request together, or None."""
    if p.info is None or d.info is None:
        missing = p if p.info is None else d
        return f"{missing.role} {missing.url} has not reported /v1/pd/info yet"
    if p.info.tp_size != d.info.tp_size:
        return (
            f"prefill {p.url} has tensor-parallel size {p.info.tp_size} and decode {d.url} has "
            f"{d.info.tp_size}; P and D must have the same tensor-parallel size for now"
        )
    if p.info.fingerprint != d.info.fingerprint:
        return (
            f"prefill {p.url} (fingerprint {p.info.fingerprint}) and decode {d.url} (fingerprint "
            f"{d.info.fingerprint}) serve different models or KV layouts; start both with the same --model, "
            "--dtype and --block-size"
        )
    if p.info.kv_transfer != d.info.kv_transfer:
        return (
            f"prefill {p.url} uses kv_transfer {p.info.kv_transfer} and decode {d.url} uses "
            f"{d.info.kv_transfer}; start both with the same KV transfer mode"
        )
    return None


def plan_route(
    instances: Sequence[Instance], policy: RouterPolicy, key: str | None, scores_prompt: bool = False
) -> Route:
    """PD when a healthy P and D exist (D among those compatible with the chosen P), else a healthy mixed one.
    A request that scores its prompt (`scores_prompt`: echo with logprobs, prompt_logprobs) needs every prompt
    position's logits, which only the instance that computes the prompt has: it runs whole on a P.

    Raises RouteError: 500 pd_mismatch when no healthy D can pair with the chosen P;
    503 instance_unavailable when no role combination is healthy.
    """
    healthy = {role: [i for i in instances if i.is_healthy and i.role == role] for role in ROLES}
    if scores_prompt and healthy["prefill"]:
        return Route(policy.choose(healthy["prefill"], key))
    if healthy["prefill"] and healthy["decode"]:
        p = policy.choose(healthy["prefill"], key)
        compatible = [d for d in healthy["decode"] if pair_problem(p, d) is None]
        if not compatible:
            problem = pair_problem(p, policy.choose(healthy["decode"], None))
            raise RouteError(500, f"cannot pair P and D: {problem}", "pd_mismatch")
        d = policy.choose(compatible, None)
        return Route(d, p, d.info.kv_transfer if d.info else None)
    if healthy["mixed"]:
        return Route(policy.choose(healthy["mixed"], key))
    raise RouteError(503, _unavailable_message(instances, healthy), "instance_unavailable")


def _unavailable_message(instances: Sequence[Instance], healthy: dict[str, list[Instance]]) -> str:
    counts = ", ".join(f"{role} {len(healthy[role])}/{sum(1 for i in instances if i.role == role)}" for role in ROLES)
    if not instances:
        return "no instance is registered; start instances with --register-with or list them on the command line"
    has_pd = any(i.role in ("prefill", "decode") for i in instances)
    missing = [r for r in ("prefill", "decode") if not healthy[r]] if has_pd else ["mixed"]
    what = " or ".join(missing)
    return f"no healthy {what} instance (healthy/known: {counts}); retry when one is up"
