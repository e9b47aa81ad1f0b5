"""Throughput of ``jupybox eval`` (records per minute) for 1 worker against 4, on the sample benchmark
that ships with the tests, answered by the scripted model on loopback. A benchmark: it prints figures
and asserts nothing.

    python -m bench.eval.throughput [--records 40] [--workers 1 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from interpreter.llm.openai import OpenAILLM
from sandbox import SandboxSettings

from .data import IM_END
from .runner import EvalSettings, run_eval

SAMPLE = Path(__file__).resolve().parents[2] / "tests" / "data" / "eval_sample"


def sample_reply(sample_dir: Path = SAMPLE) -> Callable[[dict[str, Any]], str]:
    """The scripted model's answers to the sample benchmark: the reply for the record whose question is
    in the prompt, at the step the prompt has reached (observations so far, less the query's own)."""
    replies: dict[str, list[str]] = json.loads((sample_dir / "replies.json").read_text(encoding="utf-8"))
    given: dict[str, int] = {}  # observations a query brings with its first code step
    for line in (sample_dir / "bench.jsonl").read_text(encoding="utf-8").splitlines():
        query = json.loads(line)["query"]
        given[query.split(IM_END, 1)[0]] = query.count("\nObservation:")

    def reply(body: dict[str, Any]) -> str:
        prompt = body.get("prompt") or ""
        for question, steps in replies.items():
            if question in prompt:
                step = prompt.split(question, 1)[1].count("\nObservation:") - given.get(question, 0)
                return steps[min(step, len(steps) - 1)]
        return "Final Answer: (no scripted reply for this question)"

    return reply


def repeated_sample(dest: Path, n: int, sample_dir: Path = SAMPLE) -> Path:
    """The sample benchmark repeated to ``n`` records (each copy's query made unique)."""
    lines = (sample_dir / "bench.jsonl").read_text(encoding="utf-8").splitlines()
    out = []
    for i in range(n):
        rec = json.loads(lines[i % len(lines)])
        rec["query"] = f"(copy {i}) {rec['query']}"
        out.append(json.dumps(rec, ensure_ascii=False))
    path = dest / "bench.jsonl"
    path.write_text("\n".join(out) + "\n", encoding="utf-8")
    return path


async def measure(records: int, workers: list[int], timeout: float) -> list[dict[str, Any]]:
    from bench.scripted_model import ScriptedModel

    model = ScriptedModel(default=sample_reply()).start()
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="jbe") as tmp:
            data = repeated_sample(Path(tmp), records)
            for n in workers:
                llm = OpenAILLM(model="scripted-qwen", base_url=model.url)
                s = EvalSettings(out=Path(tmp) / f"w{n}", data=data, input_dir=SAMPLE, workers=n, progress=False,
                                 model_name="scripted")
                s.generation.execution_timeout = timeout
                sandbox = SandboxSettings.from_env(home=Path(tmp) / "h", instance="eval-bench")
                t0 = time.monotonic()
                metrics, failed = await run_eval(s, sandbox, llm)
                wall = time.monotonic() - t0
                await llm.close()
                rows.append({"workers": n, "records": metrics["records"], "failed": failed, "wall_s": round(wall, 1),
                             "records_per_min": round(60 * metrics["records"] / wall, 1)})
    finally:
        model.stop()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", type=int, default=42)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 4])
    p.add_argument("--timeout", type=float, default=2.0, help="seconds per execution during generation")
    args = p.parse_args()
    rows = asyncio.run(measure(args.records, args.workers, args.timeout))
    print("| workers | records | failed | wall s | records/min |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['workers']} | {r['records']} | {r['failed']} | {r['wall_s']} | {r['records_per_min']} |")


if __name__ == "__main__":
    main()
