"""Scheduler driven by fake ForwardOutput messages: no model, milliseconds per test."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from pdserve.config import SchedulerConfig
from pdserve.kvcache import KVCacheManager
from pdserve.messages import ForwardOutput, ScheduledSeq, StepPlan
from pdserve.request import FinishReason, Request, RequestState, RequestStatus, SamplingParams
from pdserve.scheduler.scheduler import RequestUpdate, Scheduler, SchedulerOutput


def make_scheduler(
    num_blocks: int,
    block_size: int = 4,
    max_num_seqs: int = 64,
    max_num_batched_tokens: int = 2048,
    max_model_len: int = 1024,
    **kv_options: object,
) -> Scheduler:
    """Prefix caching is off unless asked for: these prompts share prefixes (range(n))."""
    kv_options.setdefault("enable_prefix_caching", False)
    kv = KVCacheManager(num_blocks, block_size, **kv_options)  # type: ignore[arg-type]
    return Scheduler(SchedulerConfig(max_num_seqs, max_num_batched_tokens), kv, max_model_len)


def make_request(
    req_id: str,
    num_prompt: int,
    max_tokens: int = 16,
    eos_token_id: int | None = None,
    first_token: int = 0,
    **sampling: object,
) -> Request:
    prompt = tuple(range(first_token, first_token + num_prompt))
    return Request(req_id, prompt, SamplingParams(max_tokens=max_tokens, temperature=0, **sampling), eos_token_id)  # type: ignore[arg-type]


def next_token(request: Request) -> int:
    """The fake model's choice: 1000 + index of the output token, never an eos here."""
    return 1000 + len(request.output_token_ids)


def run_step(
    s: Scheduler, choose: Callable[[Request], int] = next_token
) -> tuple[SchedulerOutput, list[RequestUpdate]]:
    sched = s.schedule()
    s.check_integrity()
    sampled = [seq.req_id for seq in sched.plan.seqs if seq.sample]
    output = ForwardOutput(
        step_id=sched.plan.step_id, req_ids=sampled, token_ids=[choose(s.requests[r]) for r in sampled]
    )
    updates = s.update(sched, output)
    s.check_integrity()
    return sched, updates


def seqs_of(plan: StepPlan) -> dict[str, ScheduledSeq]:
    return {seq.req_id: seq for seq in plan.seqs}


def assert_all_free(s: Scheduler) -> None:
    assert not s.has_unfinished
    assert not s.running and not s.waiting
    assert s.kv.num_free_blocks == s.kv.num_blocks
    s.check_integrity()


# ---- chunked prefill ------------------------------------------------------------


def test_chunked_prefill_exact_chunks_positions_blocks_and_sample_flag() -> None:
    s = make_scheduler(num_blocks=8, block_size=4, max_num_batched_tokens=8)
    r = make_request("a", num_prompt=20, max_tokens=3)
    s.add_request(r)
    prompt = list(r.prompt_token_ids)

    sched, updates = run_step(s)
    (seq,) = sched.plan.seqs
    assert (seq.token_ids, seq.start_pos, seq.block_ids, seq.sample) == (prompt[0:8], 0, [0, 1], False)
    assert sched.num_new_tokens == {"a": 8}
    assert updates == []
    assert r.num_computed_tokens == 8 and r.output_token_ids == []

    sched, updates = run_step(s)
    (seq,) = sched.plan.seqs
    assert (seq.token_ids, seq.start_pos, seq.block_ids, seq.sample) == (prompt[8:16], 8, [0, 1, 2, 3], False)
    assert updates == []

    sched, updates = run_step(s)  # catches up: 4 tokens left, sampled
    (seq,) = sched.plan.seqs
    assert (seq.token_ids, seq.start_pos, seq.block_ids, seq.sample) == (prompt[16:20], 16, [0, 1, 2, 3, 4], True)
    assert [(u.request.req_id, u.new_token_ids, u.finished) for u in updates] == [("a", [1000], False)]
    assert r.num_computed_tokens == 20

    sched, updates = run_step(s)  # decode: one token at position 20, a sixth block
    (seq,) = sched.plan.seqs
    assert (seq.token_ids, seq.start_pos, seq.block_ids, seq.sample) == ([1000], 20, [0, 1, 2, 3, 4, 5], True)
    assert [u.new_token_ids for u in updates] == [[1001]]

    sched, updates = run_step(s)
    (seq,) = sched.plan.seqs
    assert (seq.token_ids, seq.start_pos, seq.block_ids, seq.sample) == ([1001], 21, [0, 1, 2, 3, 4, 5], True)
    assert [(u.new_token_ids, u.finished) for u in updates] == [([1002], True)]
    assert r.finish_reason is FinishReason.LENGTH
    assert r.output_token_ids == [1000, 1001, 1002]
    assert s.stats.num_prompt_tokens == 20
    assert s.stats.num_generation_tokens == 3
    assert s.stats.num_steps == 5
    assert_all_free(s)


def test_chunked_prefill_shares_the_budget_in_admission_order() -> None:
    s = make_scheduler(num_blocks=8, block_size=4, max_num_batched_tokens=8)
    a = make_request("a", 6, max_tokens=2)
    b = make_request("b", 10, max_tokens=2, first_token=50)
    s.add_request(a)
    s.add_request(b)

    sched, _ = run_step(s)
    assert sched.num_new_tokens == {"a": 6, "b": 2}
    seqs = seqs_of(sched.plan)
    assert [q.req_id for q in sched.plan.seqs] == ["a", "b"]
    assert (seqs["a"].start_pos, len(seqs["a"].token_ids), seqs["a"].sample, seqs["a"].block_ids) == (
        0,
        6,
        True,
        [0, 1],
    )
    assert (seqs["b"].token_ids, seqs["b"].start_pos, seqs["b"].sample, seqs["b"].block_ids) == (
        [50, 51],
        0,
        False,
        [2],
    )

    sched, _ = run_step(s)  # a decodes 1, b gets the remaining 7 of its 8 left
    assert sched.num_new_tokens == {"a": 1, "b": 7}
    seqs = seqs_of(sched.plan)
    assert (seqs["a"].token_ids, seqs["a"].start_pos, seqs["a"].sample) == ([1000], 6, True)
    assert (seqs["b"].token_ids, seqs["b"].start_pos, seqs["b"].sample) == (list(range(52, 59)), 2, False)
    assert seqs["b"].block_ids == [2, 3, 4]
    assert a.is_finished and a.finish_reason is FinishReason.LENGTH

    sched, _ = run_step(s)  # b catches up with its last prompt token
    assert sched.plan.finished_req_ids == ["a"]
    (seq,) = sched.plan.seqs
    assert (seq.token_ids, seq.start_pos, seq.sample) == ([59], 9, True)

    sched, _ = run_step(s)
    assert sched.plan.finished_req_ids == []
    assert b.finish_reason is FinishReason.LENGTH and b.output_token_ids == [1000, 1001]
    assert_all_free(s)


def test_budget_exhausted_by_running_requests_admits_nothing() -> None:
    s = make_scheduler(num_blocks=8, block_size=4, max_num_batched_tokens=4)
    s.add_request(make_request("a", 12, max_tokens=1))
    s.add_request(make_request("b", 2, max_tokens=1))
    for expected in ({"a": 4}, {"a": 4}, {"a": 4}, {"b": 2}):
        sched, _ = run_step(s)
        assert sched.num_new_tokens == expected
    assert_all_free(s)


# ---- admission limits -----------------------------------------------------------


def test_max_num_seqs_and_fifo_admission() -> None:
    s = make_scheduler(num_blocks=8, block_size=4, max_num_seqs=2)
    for i, max_tokens in enumerate((1, 3, 3, 1)):
        s.add_request(make_request(f"r{i}", 3, max_tokens=max_tokens))

    sched, _ = run_step(s)
    assert [q.req_id for q in sched.plan.seqs] == ["r0", "r1"]
    assert [q.block_ids for q in sched.plan.seqs] == [[0], [1]]
    assert [r.req_id for r in s.waiting] == ["r2", "r3"]
    assert s.requests["r1"].status is RequestStatus.RUNNING

    sched, _ = run_step(s)  # r0 finished last step: r2 takes its seat, r3 still waits
    assert [q.req_id for q in sched.plan.seqs] == ["r1", "r2"]
    assert sched.plan.finished_req_ids == ["r0"]
    assert seqs_of(sched.plan)["r2"].block_ids == [2]
    assert len(s.running) == 2

    sched, _ = run_step(s)  # r1 finishes (3 tokens); at 5 tokens it took a second block
    assert [q.req_id for q in sched.plan.seqs] == ["r1", "r2"]
    assert {q.req_id: q.block_ids for q in sched.plan.seqs} == {"r1": [1, 3], "r2": [2]}
    assert [r.req_id for r in s.waiting] == ["r3"]
    assert s.requests.get("r1") is None

    sched, _ = run_step(s)
    assert [q.req_id for q in sched.plan.seqs] == ["r2", "r3"]
    assert sched.plan.finished_req_ids == ["r1"]
    # free list was [4..7, 0, 1, 3]: r2 grows into 4, r3 gets 5
    assert {q.req_id: q.block_ids for q in sched.plan.seqs} == {"r2": [2, 4], "r3": [5]}
    assert not s.has_unfinished
    assert [s.stats.num_generation_tokens, s.stats.num_preemptions, s.stats.num_steps] == [8, 0, 4]
    assert_all_free(s)


def test_admission_is_head_of_line_fifo() -> None:
    """A waiting request that does not fit blocks the ones behind it, even if they would fit."""
    s = make_scheduler(num_blocks=4, block_size=4)
    s.add_request(make_request("a", 7, max_tokens=2))
    s.add_request(make_request("big", 12, max_tokens=1))
    s.add_request(make_request("small", 2, max_tokens=1))
    sched, _ = run_step(s)  # a: 2 blocks; big needs 3 of the 2 left, small waits behind it
    assert [q.req_id for q in sched.plan.seqs] == ["a"]
    assert [r.req_id for r in s.waiting] == ["big", "small"]
    sched, _ = run_step(s)
    assert [q.req_id for q in sched.plan.seqs] == ["a"]
    assert [r.req_id for r in s.waiting] == ["big", "small"]
    sched, _ = run_step(s)
    assert {q.req_id: q.block_ids for q in sched.plan.seqs} == {"big": [2, 3, 1], "small": [0]}  # a freed tail first
    assert [q.req_id for q in sched.plan.seqs] == ["big", "small"]
    assert_all_free(s)


def test_admission_reserve_with_more_than_eight_blocks() -> None:
    s = make_scheduler(num_blocks=10, block_size=4)
    s.add_request(make_request("a", 16, max_tokens=5))  # 4 blocks; the first admission needs no reserve
    s.add_request(make_request("b", 24, max_tokens=1))  # 6 blocks + 1 reserve > 6 free
    sched, _ = run_step(s)
    assert [q.req_id for q in sched.plan.seqs] == ["a"]
    assert s.kv.num_free_blocks == 6
    assert [r.req_id for r in s.waiting] == ["b"]
    while s.has_unfinished:
        run_step(s)
    assert_all_free(s)


# ---- preemption -----------------------------------------------------------------


def test_preemption_picks_most_recent_and_recomputes_prompt_plus_output() -> None:
    s = make_scheduler(num_blocks=6, block_size=4)
    a = make_request("a", 8, max_tokens=4, first_token=0)
    b = make_request("b", 7, max_tokens=4, first_token=100)
    c = make_request("c", 7, max_tokens=3, first_token=200)
    for r in (a, b, c):
        s.add_request(r)

    sched, _ = run_step(s)
    assert {q.req_id: q.block_ids for q in sched.plan.seqs} == {"a": [0, 1], "b": [2, 3], "c": [4, 5]}
    assert s.kv.num_free_blocks == 0

    # a now holds 9 tokens and needs a third block: c, the most recently admitted, is preempted
    sched, _ = run_step(s)
    assert s.stats.num_preemptions == 1
    assert [q.req_id for q in sched.plan.seqs] == ["a", "b"]
    assert seqs_of(sched.plan)["a"].block_ids == [0, 1, 5]  # c freed its blocks tail first
    assert [r.req_id for r in s.running] == ["a", "b"]
    assert list(s.waiting) == [c]
    assert c.status is RequestStatus.WAITING
    assert c.num_computed_tokens == 0
    assert c.num_preemptions == 1
    assert c.output_token_ids == [1000]
    assert s.kv.block_ids("c") == []
    assert s.kv.num_free_blocks == 1

    sched, _ = run_step(s)  # b grows into block 4; c still does not fit (9 tokens, 3 blocks)
    assert seqs_of(sched.plan)["b"].block_ids == [2, 3, 4]
    assert [q.req_id for q in sched.plan.seqs] == ["a", "b"]
    assert list(s.waiting) == [c]

    sched, _ = run_step(s)  # a and b both sample their 4th token and finish
    assert a.finish_reason is FinishReason.LENGTH and b.finish_reason is FinishReason.LENGTH
    assert s.kv.num_free_blocks == 6

    sched, updates = run_step(s)  # c is readmitted and recomputes prompt + its one output token
    (seq,) = sched.plan.seqs
    assert seq.req_id == "c"
    assert seq.token_ids == [*range(200, 207), 1000]
    assert (seq.start_pos, seq.sample) == (0, True)
    assert sched.plan.finished_req_ids == ["a", "b"]
    # free list after: [5, 1, 0] (a, tail first) then [4, 3, 2] (b)
    assert seq.block_ids == [5, 1]
    assert [u.new_token_ids for u in updates] == [[1001]]
    assert c.prompt_token_ids == tuple(range(200, 207))  # the prompt is never mutated

    while s.has_unfinished:
        run_step(s)
    assert c.output_token_ids == [1000, 1001, 1002]
    assert c.finish_reason is FinishReason.LENGTH
    assert s.stats.num_preemptions == 1
    assert_all_free(s)


def test_preempted_request_goes_before_earlier_waiting_requests() -> None:
    s = make_scheduler(num_blocks=4, block_size=4, max_num_seqs=2)
    a = make_request("a", 8, max_tokens=3)
    b = make_request("b", 7, max_tokens=3)
    w = make_request("w", 1, max_tokens=1)
    for r in (a, b, w):
        s.add_request(r)
    run_step(s)
    assert [r.req_id for r in s.waiting] == ["w"]
    sched, _ = run_step(s)  # a needs a third block: b is preempted to the front of the queue
    assert s.stats.num_preemptions == 1
    assert [r.req_id for r in s.waiting] == ["b", "w"]
    assert [q.req_id for q in sched.plan.seqs] == ["a"]
    # no admission in a step that preempted, even though w would fit
    assert s.kv.num_free_blocks == 1
    sched, _ = run_step(s)
    assert [q.req_id for q in sched.plan.seqs] == ["a"]  # b needs 9 tokens = 3 blocks, 1 free; w waits behind it
    assert a.is_finished
    sched, _ = run_step(s)
    assert [q.req_id for q in sched.plan.seqs] == ["b", "w"]
    assert seqs_of(sched.plan)["b"].token_ids == [*range(7), 1000]
    while s.has_unfinished:
        run_step(s)
    assert_all_free(s)


def test_request_that_cannot_grow_preempts_itself_when_it_is_the_most_recent() -> None:
    s = make_scheduler(num_blocks=4, block_size=4)
    a = make_request("a", 5, max_tokens=2)
    b = make_request("b", 8, max_tokens=2)
    s.add_request(a)
    s.add_request(b)
    sched, _ = run_step(s)
    assert {q.req_id: q.block_ids for q in sched.plan.seqs} == {"a": [0, 1], "b": [2, 3]}
    sched, _ = run_step(s)  # b needs 9 tokens = 3 blocks; it is the victim itself
    assert [q.req_id for q in sched.plan.seqs] == ["a"]
    assert s.stats.num_preemptions == 1
    assert b.status is RequestStatus.WAITING and b.num_computed_tokens == 0 and b.num_preemptions == 1
    assert s.kv.block_ids("b") == []
    assert a.is_finished
    sched, _ = run_step(s)
    (seq,) = sched.plan.seqs
    assert (seq.req_id, seq.token_ids, seq.start_pos, seq.sample) == ("b", [*range(8), 1000], 0, True)
    assert seq.block_ids == [3, 2, 1]  # blocks are freed tail first
    assert b.finish_reason is FinishReason.LENGTH
    assert b.output_token_ids == [1000, 1001]
    assert_all_free(s)


def test_many_requests_under_pressure_all_finish_and_free_everything() -> None:
    s = make_scheduler(num_blocks=8, block_size=4, max_num_batched_tokens=16, max_num_seqs=4)
    reqs = [make_request(f"r{i}", 3 + (i * 5) % 9, max_tokens=4 + i % 5, first_token=10 * i) for i in range(12)]
    for r in reqs:
        s.add_request(r)
    for _ in range(500):
        if not s.has_unfinished:
            break
        sched, _ = run_step(s)
        assert len(sched.plan.seqs) <= 4
        assert sum(len(q.token_ids) for q in sched.plan.seqs) <= 16
    assert s.stats.num_preemptions > 0
    for r in reqs:
        assert r.finish_reason is FinishReason.LENGTH
        assert r.output_token_ids == [1000 + i for i in range(r.sampling.max_tokens)]
    assert_all_free(s)


# ---- finishing ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("eos", "sampling", "tokens", "reason", "num_out"),
    [
        (None, {"stop_token_ids": [7]}, [5, 7, 9], FinishReason.STOP, 2),
        (2, {}, [5, 2, 9], FinishReason.STOP, 2),
        (2, {"ignore_eos": True}, [5, 2, 9, 9, 9], FinishReason.LENGTH, 4),
        (2, {"ignore_eos": True, "stop_token_ids": [2]}, [5, 2, 9], FinishReason.STOP, 2),
        (None, {}, [5, 6, 7, 8, 9], FinishReason.LENGTH, 4),
        (3, {}, [5, 6, 7, 3], FinishReason.STOP, 4),  # eos on the last allowed token is a stop
    ],
)
def test_finish_reasons(eos: int | None, sampling: dict, tokens: list[int], reason: FinishReason, num_out: int) -> None:
    s = make_scheduler(num_blocks=4, block_size=4)
    r = make_request("a", 3, max_tokens=4, eos_token_id=eos, **sampling)
    s.add_request(r)
    feed = iter(tokens)
    finished_flags = []
    while s.has_unfinished:
        _, updates = run_step(s, lambda _req: next(feed))
        finished_flags += [u.finished for u in updates]
    assert r.finish_reason is reason
    assert r.output_token_ids == tokens[:num_out]
    assert finished_flags == [False] * (num_out - 1) + [True]
    assert_all_free(s)


def test_max_model_len_finishes_with_length() -> None:
    s = make_scheduler(num_blocks=4, block_size=4, max_model_len=6)
    r = make_request("a", 4, max_tokens=100)
    s.add_request(r)
    while s.has_unfinished:
        run_step(s)
    assert r.output_token_ids == [1000, 1001]
    assert r.finish_reason is FinishReason.LENGTH
    assert_all_free(s)


def test_external_finish_frees_blocks() -> None:
    s = make_scheduler(num_blocks=4, block_size=4)
    r = make_request("a", 3, max_tokens=10)
    s.add_request(r)
    run_step(s)
    s.finish("a", FinishReason.STOP)
    assert r.finish_reason is FinishReason.STOP
    s.finish("a", FinishReason.LENGTH)  # already finished: ignored
    assert r.finish_reason is FinishReason.STOP
    assert_all_free(s)


def test_logprobs_from_the_forward_output_reach_the_update() -> None:
    s = make_scheduler(num_blocks=4, block_size=4)
    s.add_request(make_request("a", 3, max_tokens=1, logprobs=1))
    sched = s.schedule()
    assert sched.plan.seqs[0].sampling.num_logprobs == 1
    out = ForwardOutput(step_id=sched.plan.step_id, req_ids=["a"], token_ids=[5], logprobs=[[(5, -0.5), (6, -0.1)]])
    (update,) = s.update(sched, out)
    assert update.new_logprobs == [[(5, -0.5), (6, -0.1)]]  # the sampled token first, order kept
    assert_all_free(s)


# ---- abort and finished ids -----------------------------------------------------


def test_abort_running_waiting_unknown_and_finished() -> None:
    s = make_scheduler(num_blocks=4, block_size=4, max_num_seqs=1)
    a = make_request("a", 6, max_tokens=10)
    b = make_request("b", 2, max_tokens=10)
    s.add_request(a)
    s.add_request(b)
    run_step(s)
    assert s.kv.block_ids("a") == [0, 1]
    assert s.abort("a") is a
    assert a.finish_reason is FinishReason.ABORT and a.is_finished
    assert s.kv.block_ids("a") == []
    assert s.kv.num_free_blocks == 4
    s.check_integrity()
    assert s.abort("a") is None
    assert s.abort("nobody") is None
    assert s.abort("b") is b  # waiting
    assert b.finish_reason is FinishReason.ABORT
    assert_all_free(s)
    sched = s.schedule()
    assert sched.plan.seqs == []
    assert sched.plan.finished_req_ids == ["a", "b"]


def test_abort_while_a_step_runs_drops_its_output() -> None:
    s = make_scheduler(num_blocks=4, block_size=4)
    a = make_request("a", 3, max_tokens=2)
    b = make_request("b", 3, max_tokens=2)
    s.add_request(a)
    s.add_request(b)
    sched = s.schedule()
    s.abort("a")
    out = ForwardOutput(step_id=sched.plan.step_id, req_ids=["a", "b"], token_ids=[11, 12])
    updates = s.update(sched, out)
    assert [(u.request.req_id, u.new_token_ids) for u in updates] == [("b", [12])]
    assert a.output_token_ids == []
    sched, _ = run_step(s)
    assert sched.plan.finished_req_ids == ["a"]
    assert [q.req_id for q in sched.plan.seqs] == ["b"]
    assert_all_free(s)


def test_finished_ids_ride_on_the_next_non_empty_plan() -> None:
    s = make_scheduler(num_blocks=4, block_size=4)
    s.add_request(make_request("a", 3, max_tokens=1))
    sched, _ = run_step(s)
    assert sched.plan.finished_req_ids == []
    empty = s.schedule()
    assert empty.plan.seqs == []
    assert list(empty.plan.finished_req_ids) == ["a"]
    empty2 = s.schedule()
    assert list(empty2.plan.finished_req_ids) == ["a"]
    s.add_request(make_request("b", 3, max_tokens=1))
    sched, _ = run_step(s)
    assert sched.plan.finished_req_ids == ["a"]
    assert [q.req_id for q in sched.plan.seqs] == ["b"]
    sched = s.schedule()
    assert sched.plan.finished_req_ids == ["b"]
    assert_all_free(s)


def test_step_ids_increase_and_duplicate_ids_are_rejected() -> None:
    s = make_scheduler(num_blocks=4, block_size=4)
    s.add_request(make_request("a", 3, max_tokens=2))
    with pytest.raises(ValueError, match="'a' is already in use"):
        s.add_request(make_request("a", 3))
    first, _ = run_step(s)
    second, _ = run_step(s)
    assert second.plan.step_id == first.plan.step_id + 1
    assert_all_free(s)


def test_check_integrity_catches_request_computed_beyond_its_blocks() -> None:
    s = make_scheduler(num_blocks=4, block_size=4)
    r = make_request("a", 3, max_tokens=4)
    s.add_request(r)
    run_step(s)
    r.num_computed_tokens = 5  # corrupt: one block holds at most 4
    with pytest.raises(AssertionError, match="a computed more tokens than its blocks hold"):
        s.check_integrity()


def test_state_of_names_every_lifecycle_state() -> None:
    s = make_scheduler(num_blocks=4, block_size=4)
    a = make_request("a", 8, max_tokens=2)
    b = make_request("b", 7, max_tokens=4, first_token=100)
    remote = make_request("remote", 4, max_tokens=2, first_token=200)
    s.add_request(a)
    s.add_request(b)
    s.park(remote)
    assert [s.state_of(r) for r in (a, b, remote)] == [
        RequestState.WAITING,
        RequestState.WAITING,
        RequestState.WAITING_FOR_REMOTE_KV,
    ]
    run_step(s)
    assert s.state_of(a) is RequestState.RUNNING and s.state_of(b) is RequestState.RUNNING
    run_step(s)  # a needs a third block: b, the most recently admitted, is preempted
    assert s.state_of(b) is RequestState.PREEMPTED
    while s.has_unfinished:
        run_step(s)
    assert s.state_of(a) is RequestState.FINISHED and s.state_of(b) is RequestState.FINISHED
    s.finish_parked(remote, FinishReason.ABORT)
    assert s.state_of(remote) is RequestState.FINISHED
    assert_all_free(s)
