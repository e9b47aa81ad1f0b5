"""The decode scheduler on a CPU: several generations sharing the fast path's decode steps, each
getting exactly the tokens it gets alone (the tiny random Qwen2 checkpoint in fp32, where a step's
rows run alone). Speed is measured by ``python -m bench.model --streams`` on a GPU, never here."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers", reason="the fast path's checkpoints load with `pip install 'jupybox[local]'`")

from interpreter.llm import fastpath  # noqa: E402
from interpreter.llm.fastpath.scheduler import DecodeScheduler, StreamHandle, StreamRequest, fit_slots  # noqa: E402
from tests.support.tiny_models import write_tiny_qwen2  # noqa: E402

CHUNK = 64  # small prompt chunks, so that a prompt of a few hundred tokens takes several turns


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_qwen2(tmp_path_factory.mktemp("tiny-qwen2-sched"))


def decoder(folder: Path, slots: int = 1) -> fastpath.FastDecoder:
    return fastpath.load_checkpoint(folder, device="cpu", dtype=torch.float32, max_seq=1024, slots=slots)


def alone(folder: Path, request: StreamRequest) -> StreamHandle:
    """The request run by itself, on a decoder of its own."""
    with DecodeScheduler(decoder(folder), chunk=CHUNK) as scheduler:
        handle = scheduler.submit(request)
        handle.result(60)
    return handle


def prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(5, 180) for _ in range(n)]


def stop_at(token: int) -> object:
    return lambda tokens: tokens[-1] == token


def test_streams_decoded_together_get_what_each_gets_alone(tiny_model: Path) -> None:
    """Five requests of different prompt lengths (one over several chunks) and sampling settings,
    one with a stop predicate and one with an end token, decoded together: each stream's tokens
    and ending are the ones it gets alone; greedy ones are also ``FastDecoder.generate``'s."""
    greedy = alone(tiny_model, StreamRequest(prompt(9, 1), 30)).tokens
    drawn = alone(tiny_model, StreamRequest(prompt(70, 4), 40, temperature=1.0, top_k=20, seed=7)).tokens
    requests = [
        StreamRequest(prompt(9, 1), 30),
        StreamRequest(prompt(200, 2), 25, repetition_penalty=1.3),  # prefilled in four chunks
        StreamRequest(prompt(3, 3), 40, temperature=0.8, top_p=0.9, seed=5),
        StreamRequest(prompt(70, 4), 40, temperature=1.0, top_k=20, seed=7, end_tokens=frozenset({drawn[10]})),
        StreamRequest(prompt(9, 1), 30, stop=stop_at(greedy[20])),  # stops where that token comes
    ]
    with DecodeScheduler(decoder(tiny_model, slots=5), chunk=CHUNK) as scheduler:
        handles = [scheduler.submit(r) for r in requests]
        for h in handles:
            h.result(120)
        widest = max(step.batch for step in scheduler.steps)
    assert widest == len(requests)  # all five shared steps
    for request, handle in zip(requests, handles):
        ref = alone(tiny_model, request)
        assert handle.tokens == ref.tokens and handle.finish_reason == ref.finish_reason, request
    assert handles[0].tokens == greedy and handles[0].finish_reason == "length"
    assert handles[3].tokens == drawn[:drawn.index(drawn[10]) + 1] and handles[3].finish_reason == "end"
    assert handles[4].tokens == greedy[:greedy.index(greedy[20]) + 1] and handles[4].finish_reason == "stop"
    assert len({tuple(h.tokens[:8]) for h in handles[:4]}) == 4  # different answers, not one repeated
    # a prompt within one chunk: greedy and sampled, the single-stream decoder's own output
    assert handles[0].tokens == list(decoder(tiny_model).generate(requests[0].prompt, 30))
    assert handles[2].tokens == list(decoder(tiny_model).generate(
        requests[2].prompt, 40, temperature=0.8, top_p=0.9, generator=torch.Generator().manual_seed(5)))


def test_a_stream_cancelled_mid_generation_leaves_the_others_unchanged(tiny_model: Path) -> None:
    requests = [StreamRequest(prompt(12, 10), 40), StreamRequest(prompt(30, 11), 40, temperature=0.7, seed=2),
                StreamRequest(prompt(5, 12), 40)]
    handles: list[StreamHandle] = []

    def cancel_after_five(tokens: list[int]) -> bool:
        if len(tokens) == 5:  # the caller cancels as its fifth token arrives
            handles[1].cancel()
        return False

    cancelled = StreamRequest(requests[1].prompt, 40, temperature=0.7, seed=2, stop=cancel_after_five)
    with DecodeScheduler(decoder(tiny_model, slots=3), chunk=CHUNK) as scheduler:
        handles += [scheduler.submit(requests[0]), scheduler.submit(cancelled), scheduler.submit(requests[2])]
        for h in handles:
            h.result(60)
    assert handles[1].finish_reason == "cancelled" and len(handles[1].tokens) == 5
    assert handles[1].tokens == alone(tiny_model, requests[1]).tokens[:5]
    for b in (0, 2):
        assert handles[b].tokens == alone(tiny_model, requests[b]).tokens and handles[b].finish_reason == "length"


def test_a_slot_reused_after_a_stop_holds_no_trace_of_its_previous_stream(tiny_model: Path) -> None:
    first = alone(tiny_model, StreamRequest(prompt(300, 20), 20)).tokens
    long = StreamRequest(prompt(300, 20), 200, stop=stop_at(first[15]))  # stops early, 300 positions written
    short = StreamRequest(prompt(4, 21), 30, repetition_penalty=1.2)
    with DecodeScheduler(decoder(tiny_model, slots=1), chunk=CHUNK) as scheduler:  # one slot: both use it
        a, b = scheduler.submit(long), scheduler.submit(short)
        b.result(60)
    assert a.finish_reason == "stop" and len(a.tokens) < 200
    assert b.tokens == alone(tiny_model, short).tokens and len(set(b.tokens)) > 5


def test_more_requests_than_streams_queue_and_complete_in_order_of_arrival(tiny_model: Path) -> None:
    requests = [StreamRequest(prompt(10 + 20 * i, 30 + i), 12 + 3 * i) for i in range(5)]
    scheduler = DecodeScheduler(decoder(tiny_model, slots=4), max_streams=2, chunk=CHUNK)
    assert scheduler.streams == 2
    handles = [scheduler.submit(r) for r in requests]  # before the loop starts: all wait
    stats = scheduler.stats()
    assert (stats.queued, stats.active, stats.tokens) == (5, 0, 0)
    with scheduler:
        for h in handles:
            h.result(60)
        stats = scheduler.stats()
    assert [h.admission for h in handles] == [0, 1, 2, 3, 4]  # first come, first served
    assert max(step.batch for step in scheduler.steps) == 2
    assert (stats.queued, stats.active) == (0, 0) and stats.tokens == sum(len(h.tokens) for h in handles)
    for request, handle in zip(requests, handles):
        assert handle.tokens == alone(tiny_model, request).tokens and handle.finish_reason == "length"
        assert handle.first_token_at is not None and handle.admitted_at is not None


def test_a_free_slot_goes_to_the_owner_with_the_fewest_streams(tiny_model: Path) -> None:
    """One owner's many requests do not keep another waiting behind all of them: with two streams,
    alice's first request takes one slot and bob's (he has none running) the other, though it came
    after all four of alice's; her others follow as slots free, in her order."""
    short, long = 6, 40
    alice = [StreamRequest(prompt(10 + i, 20), short if i == 0 else long, owner="alice") for i in range(4)]
    bob = StreamRequest(prompt(99, 20), long, owner="bob")
    scheduler = DecodeScheduler(decoder(tiny_model, slots=2), max_streams=2, chunk=CHUNK)
    handles = [scheduler.submit(r) for r in alice] + [scheduler.submit(bob)]  # all wait: the loop has not started
    with scheduler:
        for h in handles:
            h.result(120)
    assert [h.admission for h in handles] == [0, 2, 3, 4, 1]  # bob's went second, before alice's second
    assert [h.tokens for h in handles] == [alone(tiny_model, r).tokens for r in [*alice, bob]]


def test_a_prompt_that_fails_to_prefill_fails_alone(tiny_model: Path) -> None:
    """A prefill that raises (here a token outside the vocabulary; on a GPU, out of memory for a
    huge prompt) ends that request with its error; the running streams carry on."""
    good = StreamRequest(prompt(20, 40), 30)
    bad = StreamRequest([5, 6, 10_000_000, 7], 10)
    with DecodeScheduler(decoder(tiny_model, slots=2), chunk=CHUNK) as scheduler:
        a, b, c = scheduler.submit(good), scheduler.submit(bad), scheduler.submit(good)
        assert a.result(60) == c.result(60) == alone(tiny_model, good).tokens
        with pytest.raises(IndexError):
            b.result(60)
        assert b.finish_reason == "error" and b.tokens == []
        too_long = scheduler.submit(StreamRequest(prompt(1000, 41), 100))
    assert too_long.finish_reason == "error" and "ask for fewer new tokens" in str(too_long.error)


async def test_tokens_arrive_in_an_event_loop_as_they_come(tiny_model: Path) -> None:
    request = StreamRequest(prompt(15, 50), 25)
    with DecodeScheduler(decoder(tiny_model, slots=2), chunk=CHUNK) as scheduler:
        handle = scheduler.submit(request)
        got = [t async for t in handle]
    assert got == alone(tiny_model, request).tokens and handle.finish_reason == "length"


def test_slots_fit_the_memory_left_and_at_least_one() -> None:
    gib = 1 << 30
    assert fit_slots(16, gib, 40 * gib, 4 * gib) == 16
    assert fit_slots(16, gib, 10 * gib, 4 * gib) == 6
    assert fit_slots(16, gib, 3 * gib, 4 * gib) == 1


def test_a_long_prompt_among_running_streams_is_measured_per_turn(tiny_model: Path) -> None:
    """What ``bench.model --streams`` reports on a GPU: a prompt's time to first token while streams
    decode, and the running streams' slowest turn while it was prefilled (in chunks, here 5)."""
    long_prompt = prompt(300, 60)
    with DecodeScheduler(decoder(tiny_model, slots=3), chunk=CHUNK) as scheduler:
        alone_s = scheduler.time_to_first_token(long_prompt)
        loaded, slowest = scheduler.loaded_first_token(long_prompt, running=2, repeats=2, running_prompt=8)
        stats = scheduler.stats()
        chunked = [s for s in scheduler.steps if s.prefill_tokens > 8 and s.batch == 2]  # not the running ones
    assert alone_s > 0 and len(loaded) == 2 and slowest > 0
    assert len(chunked) == 2 * 5 and {s.prefill_tokens for s in chunked} == {CHUNK, 300 - 4 * CHUNK}
    assert (stats.active, stats.queued) == (0, 0)  # the running streams were cancelled at the end


def test_a_prompt_rotated_with_another_ntk_factor_waits_for_the_running_streams(tiny_model: Path) -> None:
    """Qwen v1 past its training length rotates with a per-prompt factor held in the decoder's
    global tables: a long prompt waits until the short ones running are done (and those behind it
    wait for it, first come first served), and every stream gets what it gets alone."""
    import dataclasses

    shape = dataclasses.replace(fastpath.DecoderShape(vocab=180, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                                      head_dim=16, ffn=128, max_context=1024),
                                rope_fp32=True, seq_length=32, dynamic_ntk=True, logn_attn=True)

    def qwen_v1_like() -> fastpath.FastDecoder:
        return fastpath.FastDecoder(shape, fastpath.random_weights(shape, "cpu", torch.float32, seed=4), max_seq=512,
                                    device="cpu", dtype=torch.float32, slots=3)

    short, long_one, behind = (StreamRequest(prompt(10, 70), 20), StreamRequest(prompt(150, 71), 10),
                               StreamRequest(prompt(12, 72), 10))
    dec = qwen_v1_like()
    assert dec.alpha_for(10) == dec.alpha_for(12) == 1.0 and dec.alpha_for(150) > 1.0
    with DecodeScheduler(dec, chunk=CHUNK) as scheduler:
        handles = [scheduler.submit(r) for r in (short, long_one, behind)]
        for h in handles:
            h.result(60)
    a, b, c = handles
    assert [h.admission for h in handles] == [0, 1, 2]
    assert b.admitted_at is not None and a.finished_at is not None and b.admitted_at >= a.finished_at
    assert c.admitted_at is not None and b.finished_at is not None and c.admitted_at >= b.finished_at
    for request, handle in zip((short, long_one, behind), handles):
        with DecodeScheduler(qwen_v1_like(), chunk=CHUNK) as alone_scheduler:
            assert handle.tokens == alone_scheduler.submit(request).result(60)
