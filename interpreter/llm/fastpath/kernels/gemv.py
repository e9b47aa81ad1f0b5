"""What the fast path's two matrix-vector kernels (``int4_gemv``, ``bf16_gemv``) share: the cache of
their timed launch shapes, the CUDA-graph timer that times them, programmatic dependent launch,
and the end of a split-K program that adds the splits' partial sums in the same launch."""

from __future__ import annotations

import json
import logging
import os
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

try:  # Triton ships with CUDA builds of PyTorch; without it the fast path keeps PyTorch's kernels
    import triton
    import triton.language as tl
    import triton.language.extra.cuda as tl_cuda
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None  # type: ignore[assignment]
    tl_cuda = None  # type: ignore[assignment]


# -- the launch shapes timed on this machine ----------------------------------------------------------
def _cache_file() -> Path:
    return Path(os.environ.get("JUPYBOX_HOME") or Path.home() / ".cache" / "jupybox") / "gemv.json"


def read_cache() -> dict[str, Any]:
    """The launch shapes timed earlier on this machine (``$JUPYBOX_HOME/gemv.json``)."""
    try:
        saved = json.loads(_cache_file().read_text())
    except (OSError, ValueError):
        return {}
    return saved if isinstance(saved, dict) else {}


def write_cache(key: str, value: Any) -> None:
    """Add one entry to the cache file (atomically); a read-only home only means timing again."""
    path = _cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        saved = read_cache()
        saved[key] = value
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(saved, indent=1, sort_keys=True))
        tmp.replace(path)
    except OSError as exc:
        log.info("could not cache the kernels' launch shapes in %s: %s", path, exc)


_TUNED: dict[str, Any] = {}


def tuned(key: str, read: Callable[[Any], Any], measure: Callable[[], tuple[Any, Any]]) -> Any:
    """The launch shape a kernel chose for ``key`` (``cache_key``): from memory, else from the
    cache file (its entry decoded by ``read``; an entry ``read`` cannot decode is stale and timed
    again), else timed now by ``measure``, which returns the choice and the entry to save (None:
    nothing worth saving). One helper for every kernel's tuning, so each only says what it times."""
    if key in _TUNED:
        return _TUNED[key]
    saved = read_cache()
    if key in saved:
        try:
            _TUNED[key] = read(saved[key])
            return _TUNED[key]
        except (TypeError, KeyError, AttributeError, ValueError):
            log.info("a stale launch shape for %s: timed again", key)
    choice, entry = measure()
    _TUNED[key] = choice
    if entry is not None:
        write_cache(key, entry)
    return choice


def cache_key(device: torch.device, what: str) -> str:
    """A cache entry's name: the GPU, the Triton version, whether kernels launch as programmatic
    dependents, and ``what`` was timed (the kernel, its version and the weight's shape): a new
    kernel version is timed afresh."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    pdl = " pdl" if programmatic_launch(device) else ""
    return f"{name}|triton {getattr(triton, '__version__', '-')}{pdl}|{what}"


def graph_seconds(calls: list[Callable[[], Any]], repeats: int = 5, replays: int = 3) -> float:
    """Seconds per call of ``calls``, captured ``repeats`` times over in one CUDA graph (as a
    decode step replays kernels), the median of ``replays`` replays (one replay alone picked a
    slower launch shape now and then); the first two calls run before, to compile."""
    for call in calls[:2]:
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeats):
            for call in calls:
                call()
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / (repeats * len(calls)))
    return statistics.median(times)


# -- programmatic dependent launch -------------------------------------------------------------------
_PDL: dict[int, bool] = {}


def programmatic_launch(device: torch.device) -> bool:
    """Whether the kernels launch as programmatic dependents on ``device``: on Hopper or later
    (unless ``JUPYBOX_PDL=0``) a kernel may start while the one before it drains, read its first
    weights, and wait (``griddepcontrol.wait``) only before it reads that kernel's output. A
    decode step is a chain of ~400 short kernels, so the gaps between them are worth hiding."""
    if tl_cuda is None or device.type != "cuda" or os.environ.get("JUPYBOX_PDL", "1") == "0":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _PDL:
        _PDL[index] = torch.cuda.get_device_capability(index) >= (9, 0) and hasattr(tl_cuda, "gdc_wait")
    return _PDL[index]


# -- split-K -----------------------------------------------------------------------------------------
def finish_chunk(splits: int, block_n: int, warps: int) -> int:
    """How many splits' partial sums the finishing program loads at once: as many as keep 32
    values a thread (all of them for small blocks), a power of two."""
    chunk = 1
    while chunk < splits and 2 * chunk * block_n <= 32 * 32 * warps:
        chunk *= 2
    return chunk


def counters(blocks: int, device: torch.device | str) -> torch.Tensor:
    """The arrival counts of a split-K launch, one per column block (zero between launches)."""
    return torch.zeros(blocks, dtype=torch.int32, device=device)


if triton is not None:

    @triton.jit
    def split_k_finish(acc, n, n_ok, part_ptr, count_ptr, out_ptr, N, SPLITS: tl.constexpr, CHUNK: tl.constexpr):
        """The end of a split-K program (grid ``(column blocks, SPLITS)``): with one split, store
        ``acc``; otherwise store it as this split's partial sums, and let the last program of the
        column block to arrive (an atomic count) add every split's partials and store the sum,
        then reset the count for the next launch. The partials are loaded ``CHUNK`` splits at a
        time and summed in a fixed order, so the bits do not depend on which program came last.
        One launch, no reduction kernel after it, and the partials never leave the L2."""
        if SPLITS == 1:
            tl.store(out_ptr + n, acc, mask=n_ok)
        else:
            block = tl.program_id(0)
            tl.store(part_ptr + tl.program_id(1) * N + n, acc, mask=n_ok)
            tl.debug_barrier()  # every thread's partials are written before the count says so
            arrived = tl.atomic_add(count_ptr + block, 1, sem="acq_rel", scope="gpu")
            tl.debug_barrier()
            if arrived == SPLITS - 1:
                total = tl.zeros_like(acc)
                for c in tl.static_range(0, SPLITS, CHUNK):
                    s = c + tl.arange(0, CHUNK)
                    parts = tl.load(part_ptr + s[:, None] * N + n[None, :], mask=(s < SPLITS)[:, None] & n_ok[None, :],
                                    other=0.0, cache_modifier=".cg")
                    total += tl.sum(parts, axis=0)
                tl.store(out_ptr + n, total, mask=n_ok)
                tl.atomic_xchg(count_ptr + block, 0, sem="relaxed", scope="gpu")

    @triton.jit
    def prefetch_l2(ptrs):
        """Ask for the memory lines at ``ptrs`` to be brought into the L2 cache: no register is
        loaded and nothing waits for them (a kernel's weights, while the kernel before it drains)."""
        tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                                  is_pure=False, pack=1)
