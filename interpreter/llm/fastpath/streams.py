"""A stream of the decode scheduler as its caller sees it: the request, the handle its tokens
arrive on (from the scheduler's thread to a thread or an event loop), and the scheduler's records
of its turns and counters."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

__all__ = ["SchedulerStats", "StepRecord", "StreamHandle", "StreamRequest"]


@dataclass(frozen=True)
class StreamRequest:
    """One generation. ``stop(tokens)`` is called with the tokens so far after each one (in the
    scheduler's thread: keep it short); True ends the stream after that token, as an end token
    does. ``seed`` seeds the stream's own random generator (None: torch's global one)."""

    prompt: list[int]
    max_new: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    end_tokens: frozenset[int] = frozenset()
    stop: Callable[[list[int]], bool] | None = None
    owner: str | None = None  # whose it is: a free slot goes to the waiting owner with the fewest streams


@dataclass(frozen=True)
class StepRecord:
    """One loop turn: when it started, how many streams it stepped, the prompt tokens it
    prefilled, and how long each part took (``turn_s``: the whole turn, the gap the running
    streams saw between two tokens)."""

    at: float
    batch: int
    prefill_tokens: int
    prefill_s: float
    decode_s: float
    turn_s: float


@dataclass(frozen=True)
class SchedulerStats:
    streams: int  # how many streams may decode together
    active: int  # streams holding a slot (decoding, or their prompt being prefilled)
    queued: int  # requests waiting for a slot
    tokens: int  # tokens generated since the start
    tokens_per_s: float  # over the last RATE_WINDOW_S


class StreamHandle:
    """The caller's side of one stream: tokens as they come, thread-safe. Iterate it in a thread
    (``for token in handle``) or in an event loop (``async for token in handle``); ``cancel()``
    ends it at the next step. ``finish_reason`` once done: ``end`` (an end token), ``stop`` (the
    stop predicate), ``length``, ``cancelled`` or ``error`` (``error`` holds the exception)."""

    def __init__(self, request: StreamRequest, on_cancel: Callable[[], None]) -> None:
        self.request = request
        self.submitted_at = time.monotonic()
        self.admitted_at: float | None = None
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self.admission: int | None = None  # the order in which streams got a slot: 0, 1, 2...
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self._tokens: list[int] = []
        self._lock = threading.Condition()
        self._wakers: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._cancelled = threading.Event()
        self._on_cancel = on_cancel

    # -- the scheduler's side ------------------------------------------------------------------
    def _push(self, token: int) -> None:
        with self._lock:
            if self.first_token_at is None:
                self.first_token_at = time.monotonic()
            self._tokens.append(token)
            self._wake()

    def _finish(self, reason: str, error: BaseException | None = None) -> None:
        with self._lock:
            if self.finish_reason is not None:
                return
            self.finish_reason, self.error, self.finished_at = reason, error, time.monotonic()
            self._wake()

    def _wake(self) -> None:  # under the lock
        self._lock.notify_all()
        wakers, self._wakers = self._wakers, []
        for loop, event in wakers:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that loop is closed: no one waits there any more
                pass

    # -- the caller's side ---------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def tokens(self) -> list[int]:
        """The tokens so far (a copy)."""
        with self._lock:
            return list(self._tokens)

    def cancel(self) -> None:
        """End the stream at the next step (or take it off the queue); idempotent."""
        if not self._cancelled.is_set():
            self._cancelled.set()
            self._on_cancel()

    def __iter__(self) -> Iterator[int]:
        i = 0
        while True:
            with self._lock:
                self._lock.wait_for(lambda: len(self._tokens) > i or self.finish_reason is not None)
                new, done = self._tokens[i:], self.finish_reason is not None
            i += len(new)
            yield from new
            if done and not new:
                return

    async def __aiter__(self) -> AsyncIterator[int]:
        loop = asyncio.get_running_loop()
        i = 0
        while True:
            wake = asyncio.Event()
            with self._lock:
                new, done = self._tokens[i:], self.finish_reason is not None
                if not new and not done:
                    self._wakers.append((loop, wake))
            i += len(new)
            for token in new:
                yield token
            if new:
                continue
            if done:
                return
            await wake.wait()

    def wait(self, tokens: int | None = None, timeout: float | None = None) -> bool:
        """Block until the stream is done (or has ``tokens`` tokens); False if ``timeout`` came first."""
        with self._lock:
            return self._lock.wait_for(
                lambda: self.finish_reason is not None or (tokens is not None and len(self._tokens) >= tokens), timeout)

    def result(self, timeout: float | None = None) -> list[int]:
        """Every token, once the stream is done; raises its error, if it failed."""
        if not self.wait(timeout=timeout):
            raise TimeoutError(f"the stream is not done after {timeout} s")
        if self.error is not None:
            raise self.error
        return self.tokens
