"""Running the benchmark: N workers (each one sandbox session and one model request at a time), a
progress bar with ETA, results appended per record, ``--resume`` and ``--eval-only``."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from interpreter.errors import ModelError
from interpreter.llm.base import LLM
from sandbox import JupyboxError, SandboxSettings, SessionManager

from .data import (BENCH_TAGS, TASKS, EvalError, Record, ResultsFile, input_files, is_gsm8k, load_benchmark,
                   load_gsm8k, record_id, record_key, tags_of)
from .execute import check_executable
from .generate import GenerationSettings, generate
from .report import write_chart, write_report
from .scoring import compute_metrics, judge

log = logging.getLogger(__name__)


@dataclass
class EvalSettings:
    out: Path
    data: Path | None = None  # the benchmark's JSONL
    input_dir: Path | None = None  # its folder of input files (default: the JSONL's folder)
    gsm8k: Path | None = None
    task: str = "all"
    workers: int = 1
    limit: int | None = None
    resume: bool = False
    eval_only: bool = False
    progress: bool = True
    model_name: str = ""
    generation: GenerationSettings = field(default_factory=GenerationSettings)


def add_eval_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, help="the benchmark's JSONL (query, tags, lang, input_file_path)")
    p.add_argument("--input-dir", type=Path, help="folder of the benchmark's input files (default: the JSONL's folder)")
    p.add_argument("--gsm8k", type=Path, help="a local GSM8K JSONL (question, answer ending '#### <number>')")
    p.add_argument("--task", choices=TASKS, default="all", help="which records to run (default: all given)")
    p.add_argument("--workers", type=int, default=1, help="records in flight: sandbox sessions and model requests")
    p.add_argument("--limit", type=int, help="only the first N records of each input")
    p.add_argument("--out", type=Path, default=Path("eval-output"), help="results.jsonl, metrics.json, report, chart")
    p.add_argument("--resume", action="store_true", help="keep the records already in results.jsonl, answer the rest")
    p.add_argument("--eval-only", action="store_true", help="recompute the metrics from an existing results.jsonl")
    p.add_argument("--judge-base-url", help="OpenAI-compatible vision model that judges plots (visualization accuracy)")
    p.add_argument("--judge-model", help="the judge's model name")
    p.add_argument("--judge-api-key", help="the judge's API key (env OPENAI_API_KEY)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def load_records(s: EvalSettings) -> list[Record]:
    if s.task == "gsm8k" and s.gsm8k is None:
        raise EvalError("--task gsm8k needs --gsm8k FILE.jsonl")
    if s.task in BENCH_TAGS and s.data is None:
        raise EvalError(f"--task {s.task} needs --data, the benchmark's JSONL file")
    if s.data is None and s.gsm8k is None:
        raise EvalError("nothing to evaluate: pass --data BENCHMARK.jsonl and/or --gsm8k GSM8K.jsonl")
    records: list[Record] = []
    if s.data is not None and s.task != "gsm8k":
        records += load_benchmark(s.data, s.task)[: s.limit]
    if s.gsm8k is not None and s.task in ("all", "gsm8k"):
        records += load_gsm8k(s.gsm8k)[: s.limit]
    return records


async def _in_pool(items: list[Record], workers: int, fn: Callable[[Record], Awaitable[None]], progress: bool,
                   desc: str) -> int:
    """Run ``fn`` over ``items`` with ``workers`` at a time; returns how many failed."""
    from tqdm import tqdm

    queue: asyncio.Queue[Record] = asyncio.Queue()
    for item in items:
        queue.put_nowait(item)
    failed = 0
    bar = tqdm(total=len(items), desc=desc, unit="rec", disable=not progress, file=sys.stderr, dynamic_ncols=True)

    async def worker() -> None:
        nonlocal failed
        while not queue.empty():
            rec = queue.get_nowait()
            try:
                await fn(rec)
            except (JupyboxError, ModelError) as exc:  # this record is left out; --resume retries it
                failed += 1
                log.warning("record %s failed: %s", record_id(rec), exc)
                bar.write(f"record {record_id(rec)} failed: {exc}", file=sys.stderr)
            bar.update(1)

    try:
        await asyncio.gather(*(worker() for _ in range(max(workers, 1))))
    finally:
        bar.close()
    return failed


async def score_record(rec: Record, files: list[Path], manager: SessionManager, judge_llm: LLM | None,
                       image_dir: Path) -> None:
    """Executability per tag (fresh sessions) and, with a judge, the visualization verdict."""
    rec.pop("judge", None)
    if is_gsm8k(rec):
        return
    rec["exec"] = {tag: await check_executable(manager, rec, tag, files) for tag in tags_of(rec) if tag in BENCH_TAGS}
    if judge_llm is not None and "visualization" in tags_of(rec):
        rec["judge"] = await judge(judge_llm, rec, image_dir)


async def run_eval(s: EvalSettings, sandbox: SandboxSettings, llm: LLM | None,
                   judge_llm: LLM | None = None) -> tuple[dict[str, Any], int]:
    """Run (or with ``eval_only`` re-score) the benchmark; writes results.jsonl, metrics.json, report.md
    and comparison.png into ``s.out``. Returns the metrics and the number of failed records."""
    results = ResultsFile(s.out / "results.jsonl")
    done = results.load()
    input_dir = s.input_dir or (s.data.parent if s.data else None)
    if s.eval_only:
        if not done:
            raise EvalError(f"{results.path} has no results to evaluate: run without --eval-only first")
        todo, keep = [], list(done.values())
    else:
        records = load_records(s)
        if done and not s.resume:
            raise EvalError(f"{results.path} already holds results: pass --resume to continue it, "
                            "--eval-only to re-score it, or another --out")
        todo = [r for r in records if record_key(r) not in done]
        keys = {record_key(r) for r in records}
        keep = [r for k, r in done.items() if k in keys]
    files = {record_key(r): input_files(r, input_dir) for r in todo + (keep if s.eval_only else [])}
    sandbox = dataclasses.replace(sandbox, pool_size=max(sandbox.pool_size, s.workers),
                                  max_sessions=max(sandbox.max_sessions, 2 * s.workers + 2))
    s.out.mkdir(parents=True, exist_ok=True)
    async with SessionManager(sandbox) as manager:
        if s.eval_only:
            async def rescore(rec: Record) -> None:
                await score_record(rec, files[record_key(rec)], manager, judge_llm, s.out / "images" / record_id(rec))

            failed = await _in_pool(keep, s.workers, rescore, s.progress, "re-scoring")
            results.rewrite(keep)
        else:
            assert llm is not None

            async def answer(rec: Record) -> None:
                image_dir = s.out / "images" / record_id(rec)
                g = await generate(llm, manager, rec, files[record_key(rec)], s.generation, image_dir)
                out = {**rec, "id": record_id(rec), "gen": g.gen, "steps": g.steps, "first_step": g.first_step}
                await score_record(out, files[record_key(rec)], manager, judge_llm, image_dir)
                results.append(out)
                keep.append(out)

            failed = await _in_pool(todo, s.workers, answer, s.progress, "eval")
    metrics = compute_metrics(keep)
    metrics["model"] = s.model_name
    metrics["failed_records"] = failed
    (s.out / "metrics.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    chart = write_chart(s.out, metrics, s.model_name)
    write_report(s.out, metrics, s.model_name, chart)
    return metrics, failed


def _previous_model(out: Path) -> str:
    try:
        return json.loads((out / "metrics.json").read_text()).get("model", "")
    except (OSError, ValueError):
        return ""


async def run_eval_command(args: argparse.Namespace, sandbox: SandboxSettings) -> int:
    """``jupybox eval``: the settings from the flags, the models, the run, a summary on stdout."""
    from interpreter.llm import ModelSettings
    from interpreter.llm.openai import OpenAILLM

    if args.format not in (None, "react"):
        raise EvalError("the benchmark's protocol is the Qwen ReAct format: leave --format out or pass --format react")
    if args.workers < 1:
        raise EvalError("--workers must be at least 1")
    if bool(args.judge_base_url) != bool(args.judge_model):
        raise EvalError("a judge needs both --judge-base-url and --judge-model")
    gen = GenerationSettings(temperature=args.temperature, max_tokens=args.max_new_tokens, seed=args.seed,
                             execution_timeout=args.timeout)
    llm = None if args.eval_only else ModelSettings.from_args(args).create()
    name = args.openai_model or args.model or getattr(llm, "model", "") or _previous_model(args.out) or "model"
    s = EvalSettings(out=args.out, data=args.data, input_dir=args.input_dir, gsm8k=args.gsm8k, task=args.task,
                     workers=args.workers, limit=args.limit, resume=args.resume, eval_only=args.eval_only,
                     progress=not args.no_progress, model_name=str(name), generation=gen)
    judge_llm = (OpenAILLM(model=args.judge_model, base_url=args.judge_base_url, api_key=args.judge_api_key,
                           supports_images=True) if args.judge_base_url else None)
    try:
        metrics, failed = await run_eval(s, sandbox, llm, judge_llm)
    finally:
        for m in (llm, judge_llm):
            if m is not None:
                await m.close()
    print(json.dumps({k: metrics[k] for k in ("executable_rate", "missing_code_rate", "accuracy")}, indent=2))
    print(f"results: {s.out / 'results.jsonl'}\nmetrics: {s.out / 'metrics.json'}\nreport:  {s.out / 'report.md'}")
    if failed:
        print(f"{failed} record(s) failed and are not in the results: rerun with --resume to retry them",
              file=sys.stderr)
        return 1
    return 0
