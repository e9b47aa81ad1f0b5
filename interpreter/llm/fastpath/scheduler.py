"""Several generations on one ``FastDecoder`` at once: a decode scheduler that owns the decoder.

Why: decoding one token is bound by reading the weights, which one step reads once for every stream
in it, so streams that share steps cost little more than one alone. The scheduler runs the decoder
in a thread of its own; callers ``submit`` a ``StreamRequest`` and read tokens from the
``StreamHandle`` it returns (from a thread or from an event loop), and may ``cancel`` it.

Each turn of its loop:

1. streams that were cancelled leave and free their cache slots;
2. the oldest waiting request of the owner with the fewest running streams takes a free slot
   (first come, first served between owners on a par: one user's many requests take free slots in
   turn with everyone else's) and one chunk of its prompt, ``chunk`` tokens at positions ``0, C, 2C...``,
   is prefilled: a long prompt delays the running streams by one chunk per turn, never by its whole
   length, and a stream's numbers do not depend on what else runs;
3. one ``decode_batch`` step for every running stream; each picks its next token with its own
   sampling settings, repetition-penalty state and random generator, on the device. The step is
   queued before the previous step's tokens are read back (as ``FastDecoder.generate`` queues its
   steps), so the GPU does not wait for the host's turn. A stream whose token is an end token,
   meets its stop predicate or its token limit leaves at once.

An exception in one request's prefill (a prompt too large for the memory left, say) fails that
request only; one in a decode step fails the streams of that step, and the loop goes on.

Qwen v1 past its training length rotates with a dynamic-NTK factor held in the decoder's global
tables (``FastDecoder.alpha_for``): a request whose factor differs from the running streams' waits
at the head of the queue until they are done.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from interpreter.llm.fastpath.decoder import BATCHES, FastDecoder
from interpreter.llm.fastpath.sampling import Readback, penalize, pick
from interpreter.llm.fastpath.errors import FastPathUnsupported
from interpreter.llm.fastpath.streams import SchedulerStats, StepRecord, StreamHandle, StreamRequest

__all__ = ["DecodeScheduler", "SchedulerStats", "StepRecord", "StreamHandle", "StreamRequest", "fit_slots"]

log = logging.getLogger(__name__)

CHUNK = 512  # prompt tokens prefilled per loop turn
RATE_WINDOW_S = 10.0  # tokens/s is measured over this much recent time
STEP_HISTORY = 4096  # per-turn records kept for benchmarks


@dataclass(eq=False)
class _Stream:
    """A stream holding a slot: what the loop keeps for it (compared by identity)."""

    handle: StreamHandle
    slot: int
    alpha: float
    generator: torch.Generator | None
    seen: torch.Tensor | None = None  # ids seen (prompt and answer), for the repetition penalty
    prefilled: int = 0  # prompt tokens in the slot so far
    fed: int = 0  # decode steps launched: the next one feeds ``generated[fed]``
    generated: list[int] = field(default_factory=list)  # tokens read back so far

    @property
    def request(self) -> StreamRequest:
        return self.handle.request

    @property
    def position(self) -> int:
        """Where the next step writes the token it feeds."""
        return len(self.request.prompt) + self.fed

    @property
    def needs_step(self) -> bool:
        """Whether a step is still needed: its limit is not reached by the tokens fed so far."""
        return self.fed + 1 < self.request.max_new


class _Launched:
    """A decode step's streams and their picks on the way to the host (``Readback``)."""

    def __init__(self, streams: list[_Stream], picks: torch.Tensor) -> None:
        self.streams, self.picks = streams, picks
        self._back = Readback(picks)

    def values(self) -> list[int]:
        return self._back.values()


class DecodeScheduler:
    """Up to ``max_streams`` generations sharing each decode step of ``decoder`` (at most its
    slots, and at most the largest step it runs: ``streams``). ``start()`` starts the loop's thread;
    requests submitted before it wait in the queue. ``close()`` ends the thread and every stream."""

    def __init__(self, decoder: FastDecoder, *, max_streams: int | None = None, chunk: int = CHUNK) -> None:
        if chunk < 1:
            raise ValueError("a prefill chunk holds at least one token")
        self.decoder = decoder
        self.streams = max(1, min(max_streams or decoder.slots, decoder.slots, BATCHES[-1]))
        self.chunk = chunk
        self.steps: deque[StepRecord] = deque(maxlen=STEP_HISTORY)
        self._cond = threading.Condition()
        self._queue: deque[StreamHandle] = deque()
        self._admitting: _Stream | None = None  # the stream whose prompt is being prefilled
        self._running: list[_Stream] = []
        self._launched: _Launched | None = None  # the last step, not read back yet
        self._free = list(range(self.streams))
        self._admitted = 0
        self._tokens = 0
        self._recent: deque[tuple[float, int]] = deque()  # (when, tokens) of recent steps
        self._closed = False
        self._thread: threading.Thread | None = None

    # -- the callers' side ---------------------------------------------------------------------
    def start(self) -> DecodeScheduler:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="jupybox-decode", daemon=True)
            self._thread.start()
        return self

    def submit(self, request: StreamRequest) -> StreamHandle:
        """Queue a request; its tokens arrive on the handle. A request the decoder cannot hold
        fails at once (the handle's error), without waiting in the queue."""
        handle = StreamHandle(request, self._poke)
        problem = self._refusal(request)
        if problem is not None:
            handle._finish("error", problem)
            return handle
        with self._cond:
            if self._closed:
                handle._finish("error", RuntimeError("the decode scheduler is closed"))
                return handle
            self._queue.append(handle)
            self._cond.notify_all()
        return handle

    def stats(self) -> SchedulerStats:
        with self._cond:
            active = len(self._running) + (self._admitting is not None)
            now = time.monotonic()
            recent = sum(n for at, n in self._recent if at >= now - RATE_WINDOW_S)
            return SchedulerStats(streams=self.streams, active=active, queued=len(self._queue), tokens=self._tokens,
                                  tokens_per_s=recent / RATE_WINDOW_S)

    def close(self, timeout: float = 30.0) -> None:
        """Stop the loop after its current turn; streams still running or queued end as cancelled."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        with self._cond:
            for handle in self._queue:
                handle._finish("cancelled")
            self._queue.clear()
        for stream in [*self._running, *([self._admitting] if self._admitting else [])]:
            stream.handle._finish("cancelled")

    def __enter__(self) -> DecodeScheduler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- for benchmarks ------------------------------------------------------------------------
    def time_to_first_token(self, prompt: list[int]) -> float:
        """Seconds from submitting ``prompt`` to its first token, with whatever else runs now."""
        handle = self.start().submit(StreamRequest(prompt, 1))
        handle.result()
        assert handle.first_token_at is not None
        return handle.first_token_at - handle.submitted_at

    def loaded_first_token(self, prompt: list[int], *, running: int = 16, repeats: int = 5,
                           running_prompt: int = 64) -> tuple[list[float], float]:
        """``prompt``'s time to first token while ``running`` greedy streams decode (fewer where
        the scheduler has fewer streams to spare), ``repeats`` times; and the running streams'
        slowest turn while it was prefilled (seconds)."""
        running = max(0, min(running, self.streams - 1))
        vocab, max_seq = self.decoder.shape.vocab, self.decoder.max_seq
        gen = torch.Generator().manual_seed(0)
        handles = [self.start().submit(StreamRequest(torch.randint(0, vocab, (running_prompt,), generator=gen).tolist(),
                                                     max_seq - running_prompt)) for _ in range(running)]
        try:
            for h in handles:  # all of them decoding
                h.wait(tokens=1)
            ttfts, slowest = [], 0.0
            for _ in range(repeats):
                handle = self.submit(StreamRequest(prompt, 1))
                handle.result()
                assert handle.first_token_at is not None and handle.admitted_at is not None
                ttfts.append(handle.first_token_at - handle.submitted_at)
                self._turn_recorded(handle.first_token_at)
                # the turns that overlap its prefill: the first of them began before it was admitted
                during = [s.turn_s for s in list(self.steps)
                          if s.at <= handle.first_token_at and s.at + s.turn_s >= handle.admitted_at and s.batch > 0]
                slowest = max([slowest, *during])
            if any(h.done for h in handles):
                log.warning("running streams ended before the measurement did: the load was lighter than asked")
            return ttfts, slowest
        finally:
            for h in handles:
                h.cancel()
            for h in handles:
                h.wait()

    def _turn_recorded(self, when: float, timeout: float = 10.0) -> None:
        """Wait until the turn running at ``when`` is in ``steps`` (its record is written when it
        ends, after its tokens went out)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            latest = self.steps[-1] if self.steps else None
            if latest is not None and latest.at + latest.turn_s >= when:
                return
            time.sleep(0.001)

    def _poke(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _refusal(self, request: StreamRequest) -> Exception | None:
        if not request.prompt:
            return ValueError("a generation needs at least one prompt token")
        if request.max_new < 1:
            return ValueError("a generation makes at least one token")
        if len(request.prompt) + request.max_new > self.decoder.max_seq:
            return FastPathUnsupported(f"{len(request.prompt)} + {request.max_new} tokens exceed the fast path's cache "
                                       f"of {self.decoder.max_seq}: ask for fewer new tokens")
        return None

    # -- the loop ------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closed or self._queue or self._running or self._admitting)
                if self._closed:
                    return
            try:
                self._turn()
            except Exception:  # noqa: BLE001 - the loop must outlive any one turn
                log.exception("a decode scheduler turn failed")

    def _turn(self) -> None:
        started = time.monotonic()
        self._reap()
        self._admit()
        prefill_tokens, prefill_s = self._prefill_chunk()
        decode_started = time.monotonic()
        batch = self._step() if self._running else 0
        ended = time.monotonic()
        self.steps.append(StepRecord(at=started, batch=batch, prefill_tokens=prefill_tokens, prefill_s=prefill_s,
                                     decode_s=ended - decode_started if batch else 0.0, turn_s=ended - started))

    def _reap(self) -> None:
        """Cancelled streams leave: queued ones, the one being admitted, running ones."""
        with self._cond:
            for handle in [h for h in self._queue if h.cancelled]:
                self._queue.remove(handle)
                handle._finish("cancelled")
        if self._admitting is not None and self._admitting.handle.cancelled:
            self._leave(self._admitting, "cancelled")
        for stream in [s for s in self._running if s.handle.cancelled]:
            self._leave(stream, "cancelled")

    def _next(self) -> StreamHandle:
        """Whose turn it is (the queue is not empty): the oldest request of the owner with the fewest
        streams running, so that one owner's many requests take the free slots in turn with
        everyone else's, not all of them first; requests of no owner count as one each."""
        running: dict[str, int] = {}
        for stream in self._running:
            if stream.request.owner is not None:
                running[stream.request.owner] = running.get(stream.request.owner, 0) + 1
        return min(self._queue, key=lambda h: running.get(h.request.owner, 0) if h.request.owner is not None else 0)

    def _admit(self) -> None:
        """The next request (``_next``) takes a free slot, unless its rotary factor differs from the
        running streams' (then it waits, and so does everyone behind it)."""
        if self._admitting is not None or not self._free:
            return
        with self._cond:
            if not self._queue:
                return
            handle = self._next()
            alpha = self.decoder.alpha_for(len(handle.request.prompt))
            if self._running and self._running[0].alpha != alpha:
                return
            self._queue.remove(handle)
            slot = min(self._free)
            self._free.remove(slot)
            handle.admission, self._admitted = self._admitted, self._admitted + 1
        handle.admitted_at = time.monotonic()
        r = handle.request
        generator = None if r.seed is None else torch.Generator(self.decoder.device).manual_seed(r.seed)
        self._admitting = _Stream(handle, slot, alpha, generator)

    def _prefill_chunk(self) -> tuple[int, float]:
        """One chunk of the admitted stream's prompt; after the last one it picks its first token
        and joins the running streams (or leaves, done already)."""
        stream = self._admitting
        if stream is None:
            return 0, 0.0
        started = time.monotonic()
        prompt = stream.request.prompt
        start = stream.prefilled
        piece = prompt[start:start + self.chunk]
        try:
            tokens = torch.tensor(piece, dtype=torch.long, device=self.decoder.device)
            logits = self.decoder.prefill(tokens, slot=stream.slot, start=start, prompt_length=len(prompt))[0]
            stream.prefilled += len(piece)
            if stream.prefilled < len(prompt):
                return len(piece), time.monotonic() - started
            r = stream.request
            if r.repetition_penalty != 1.0:
                ids = torch.tensor(prompt, dtype=torch.long, device=self.decoder.device)
                seen = torch.zeros(logits.shape[-1], dtype=torch.bool, device=self.decoder.device)
                stream.seen = seen.index_fill_(0, ids, True)
            token = self._pick(stream, logits)
        except Exception as exc:  # noqa: BLE001 - this request fails; the running streams carry on
            log.warning("a prompt of %d tokens could not be prefilled: %s", len(prompt), exc)
            self._leave(stream, "error", exc)
            return len(piece), time.monotonic() - started
        self._admitting = None
        self._running.append(stream)
        self._count(1)
        self._emit(stream, int(token.item()))
        return len(piece), time.monotonic() - started

    def _step(self) -> int:
        """One decode step for every running stream that needs one, queued before the last step's
        tokens are read back (its inputs are those tokens, picked on the device): the device never
        waits for the host's turn. A stream whose token read back here ends it was in the step just
        queued too; that row's result is dropped (it wrote its slot one position further, which the
        next prefill of that slot rewrites before anything reads it). Returns the step's rows."""
        before = self._launched
        streams = [s for s in self._running if s.needs_step]
        launched, failure = None, None
        if streams:
            try:
                tokens = self._inputs(streams, before)
                logits = self.decoder.decode_batch(tokens, [s.position for s in streams], [s.slot for s in streams])
                launched = _Launched(streams, self._picks(streams, logits))
                for stream in streams:
                    stream.fed += 1
            except Exception as exc:  # noqa: BLE001 - the streams of this step fail; the loop goes on
                log.exception("a decode step of %d streams failed", len(streams))
                failure = exc
        if before is not None:
            self._read_back(before)
        if failure is not None:
            for stream in streams:
                self._leave(stream, "error", failure)
        self._launched = launched
        return len(streams)

    def _inputs(self, streams: list[_Stream], before: _Launched | None) -> list[int] | torch.Tensor:
        """Each stream's next input: read back already (a prompt's first token), or still on the
        device among the last step's picks."""
        if all(s.fed < len(s.generated) for s in streams):
            return self._on_device([s.generated[s.fed] for s in streams])
        assert before is not None
        rows = {id(s): b for b, s in enumerate(before.streams)}
        order = [rows.get(id(s), 0) for s in streams]
        tokens = before.picks if order == list(range(len(before.streams))) else (
            before.picks.index_select(0, self._on_device(order)))
        known = [b for b, s in enumerate(streams) if s.fed < len(s.generated)]
        if known:
            tokens = tokens.index_copy(0, self._on_device(known),
                                       self._on_device([streams[b].generated[streams[b].fed] for b in known]))
        return tokens

    def _on_device(self, values: list[int]) -> torch.Tensor:
        """Small long tensors for the device without waiting for the work queued there (a
        blocking copy would: pinned memory, copied asynchronously)."""
        host = torch.tensor(values, dtype=torch.long)
        if self.decoder.device.type != "cuda":
            return host
        return host.pin_memory().to(self.decoder.device, non_blocking=True)

    def _picks(self, streams: list[_Stream], logits: torch.Tensor) -> torch.Tensor:
        """Every row's next token, on the device: greedy rows without a penalty in one argmax."""
        plain = [b for b, s in enumerate(streams) if s.request.temperature <= 0 and s.request.repetition_penalty == 1.0]
        if len(plain) == len(streams):
            return logits.argmax(-1)
        picks: list[torch.Tensor | None] = [None] * len(streams)
        if plain:
            index = self._on_device(plain)
            for b, token in zip(plain, logits.index_select(0, index).argmax(-1)):
                picks[b] = token.view(1)
        for b, stream in enumerate(streams):
            if picks[b] is None:
                picks[b] = self._pick(stream, logits[b])
        return torch.cat(picks)  # type: ignore[arg-type]

    def _read_back(self, launched: _Launched) -> None:
        """A step's tokens to their streams (those that left since, cancelled, get none)."""
        values = launched.values()
        live = [(s, v) for s, v in zip(launched.streams, values) if s in self._running]
        self._count(len(live))
        for stream, token in live:
            self._emit(stream, token)

    def _count(self, tokens: int) -> None:
        with self._cond:
            self._tokens += tokens
            now = time.monotonic()
            self._recent.append((now, tokens))
            while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
                self._recent.popleft()

    def _pick(self, stream: _Stream, logits: torch.Tensor) -> torch.Tensor:
        """The next token from one stream's ``[vocab]`` logits, as ``FastDecoder.generate`` picks it."""
        r = stream.request
        if stream.seen is not None:
            logits = penalize(logits, stream.seen, r.repetition_penalty)
        token = pick(logits, r.temperature, r.top_p, r.top_k, stream.generator)
        if stream.seen is not None:
            stream.seen.index_fill_(0, token, True)
        return token

    def _emit(self, stream: _Stream, token: int) -> None:
        """Hand a token to the caller; the stream leaves if that token ends it."""
        stream.generated.append(token)
        stream.handle._push(token)
        r = stream.request
        reason = None
        if token in r.end_tokens:
            reason = "end"
        else:
            try:
                if r.stop is not None and r.stop(stream.generated):
                    reason = "stop"
            except Exception as exc:  # noqa: BLE001 - the caller's predicate failed: its stream ends
                self._leave(stream, "error", exc)
                return
        if reason is None and len(stream.generated) >= r.max_new:
            reason = "length"
        if reason is not None:
            self._leave(stream, reason)

    def _leave(self, stream: _Stream, reason: str, error: BaseException | None = None) -> None:
        """The stream gives its slot back (what the slot holds is overwritten by the next prefill
        before anything reads it)."""
        if stream is self._admitting:
            self._admitting = None
        elif stream in self._running:
            self._running.remove(stream)
        else:
            return
        with self._cond:
            self._free.append(stream.slot)
        stream.handle._finish(reason, error)


def fit_slots(wanted: int, slot_bytes: int, free_bytes: int, headroom_bytes: int) -> int:
    """How many cache slots of ``slot_bytes`` to allocate: ``wanted`` where ``free_bytes`` less
    ``headroom_bytes`` hold them, fewer where not, and at least one."""
    room = max(0, free_bytes - headroom_bytes) // max(1, slot_bytes)
    return max(1, min(wanted, room))

