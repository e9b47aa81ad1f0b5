"""`jupybox eval` as a user runs it: the real console script and docker sandbox, the sample benchmark
written for this project (tests/data/eval_sample), a scripted model and a scripted vision judge on
loopback. The expected metrics are computed by hand from the scripted replies."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bench.eval.scoring import extract_number
from bench.eval.throughput import sample_reply
from bench.scripted_model import ScriptedModel

JUPYBOX = str(Path(sys.executable).parent / "jupybox")
SAMPLE = Path(__file__).parent / "data" / "eval_sample"
JUDGE_EN = ('Please judge whether the image is consistent with the [Question] below, if it is consistent then reply '
            '"right", if not then reply "wrong".\n[Question]: ')

# Hand-computed from replies.json (each line: record → outcome of the executability check).
EXPECTED_EXECUTABLE = {
    # math (6): 15% of 240 defines solution() → solution() appended, ok ✓; sum of squares NameError ✗;
    # 2**10 answered without code (missing) ✗; sleep(11) past the 10 s limit ✗; solution() returning an
    # undefined name fails only once called ✗; sales.csv total via /mnt/data/ path (stripped) ✓ → 2/6
    "math": 33.33,
    # visualization (5): bar chart ✓; line chart KeyError ✗; pie chart (first of 3 blocks ok) ✓;
    # histogram after the given first step (df defined by the prepended step) ✓; scatter, no code ✗ → 3/5
    "visualization": 60.0,
    # general (3): to_json ✓; SyntaxError ✗; Chinese record counting rows ✓ → 2/3
    "general": 66.67,
}
EXPECTED_MISSING = {"math": 16.67, "visualization": 20.0, "general": 0.0}  # 1/6, 1/5, 0/3
# Judge says "wrong" for the pie chart, "right" otherwise; records without an image are wrong unasked.
# hard: bar ✓, line (error, no image) ✗, pie ✗ → 1/3; easy: histogram ✓, scatter (no code) ✗ → 1/2
EXPECTED_VIS = {"visualization_hard": 33.33, "visualization_easy": 50.0}
# GSM8K: 72 from the observation ✓; "1,234 pens." vs "#### 1,234" ✓; 4 vs 3 ✗; no number ✗ → 2/4
EXPECTED_GSM8K = 50.0


def judge_reply(body: dict) -> str:
    text = " ".join(p.get("text", "") for p in body["messages"][0]["content"] if p["type"] == "text")
    return "wrong" if "pie chart" in text else "right"


def run_eval(model: ScriptedModel, out: Path, home: Path, *extra: str, judge: ScriptedModel | None = None,
             wait: bool = True) -> subprocess.CompletedProcess | subprocess.Popen:
    # 10 s a step: a fresh kernel's first pandas and matplotlib imports took over 5 s on a loaded 2-core host
    cmd = [JUPYBOX, "eval", "--data", str(SAMPLE / "bench.jsonl"), "--out", str(out), "--timeout", "10",
           "--openai-base-url", model.url, "--openai-model", "scripted-qwen", "--no-progress", *extra]
    if judge is not None:
        cmd += ["--judge-base-url", judge.url, "--judge-model", "scripted-judge"]
    env = dict(os.environ, JUPYBOX_HOME=str(home), JUPYBOX_INSTANCE=instance(home))
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)


def instance(home: Path) -> str:
    """Each home its own instance: a run's start-up removes what its instance left, never another's."""
    return f"eval-tests-{home.name}"


def _home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    folder = tmp_path_factory.mktemp("ev")  # short: Unix socket paths are limited to 107 bytes
    yield folder
    # a run killed by a test leaves its containers and mounted workspaces: removed as a user would
    subprocess.run([JUPYBOX, "sandbox", "cleanup"], env=dict(os.environ, JUPYBOX_HOME=str(folder),
                   JUPYBOX_INSTANCE=instance(folder)), capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    yield from _home(tmp_path_factory)


@pytest.fixture(scope="module")
def killed_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    yield from _home(tmp_path_factory)


def kill_once_answered(proc: subprocess.Popen, results: Path, records: int, timeout: float = 240) -> None:
    """SIGKILL ``proc`` once ``results`` holds ``records`` lines (or at ``timeout``), as a user's ^C^C
    or a lost machine would stop it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if results.exists() and len(results.read_text().splitlines()) >= records:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@dataclass
class KilledRun:
    model: ScriptedModel
    judge: ScriptedModel
    out: Path
    home: Path
    killer: threading.Thread


@pytest.fixture(scope="module")
def killed_run(sandbox_image: str, killed_home: Path, tmp_path_factory) -> Iterator[KilledRun]:
    """The visualization task on 1 worker, killed once 3 records are answered. Started before the full
    run and running beside it (its own home, instance and models): both spend most of their time
    waiting on kernels, so together they take little longer than the full run alone."""
    model = ScriptedModel(default=sample_reply(SAMPLE)).start()
    judge = ScriptedModel(default=judge_reply).start()
    out = tmp_path_factory.mktemp("killed") / "out"
    proc = run_eval(model, out, killed_home, "--task", "visualization", "--workers", "1", wait=False)
    assert isinstance(proc, subprocess.Popen)
    killer = threading.Thread(target=kill_once_answered, args=(proc, out / "results.jsonl", 3), daemon=True)
    killer.start()
    try:
        yield KilledRun(model, judge, out, killed_home, killer)
    finally:
        killer.join()
        model.stop()
        judge.stop()


@pytest.fixture(scope="module")
def full_run(sandbox_image: str, home: Path, killed_run: KilledRun,
             tmp_path_factory) -> Iterator[tuple[Path, ScriptedModel, ScriptedModel]]:
    """The whole sample plus the GSM8K sample, 4 workers, with a judge (the killed run started first)."""
    model = ScriptedModel(default=sample_reply(SAMPLE)).start()
    judge = ScriptedModel(default=judge_reply).start()
    out = tmp_path_factory.mktemp("out")
    try:
        proc = run_eval(model, out, home, "--gsm8k", str(SAMPLE / "gsm8k.jsonl"), "--workers", "4", judge=judge)
        assert proc.returncode == 0, proc.stderr
        yield out, model, judge
    finally:
        model.stop()
        judge.stop()


def prompts_with(model: ScriptedModel, text: str) -> list[str]:
    return [b["prompt"] for b in model.history if text in b["prompt"]]


def test_metrics_equal_the_hand_computed_values(full_run) -> None:
    out, _, _ = full_run
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["records"] == 18 and metrics["failed_records"] == 0
    assert metrics["executable_rate"] == EXPECTED_EXECUTABLE
    assert metrics["missing_code_rate"] == EXPECTED_MISSING
    assert metrics["accuracy"] == {"math_gsm8k": EXPECTED_GSM8K, **EXPECTED_VIS}
    assert "visualization_accuracy" not in metrics  # measured
    report = (out / "report.md").read_text()
    assert "| **this run** (scripted-qwen) | 50.0 | 33.3 | 50.0 | 33.3 | 60.0 | 66.7 |" in report
    assert "| Qwen-7B-Chat (published) | 41.9 | 40.5 | 54.4 | 82.4 | 64.4 | 67.2 |" in report
    assert "| GPT-4 (as published) | 82.8 | 66.7 | 60.8 | 91.9 | 85.9 | 82.8 |" in report
    assert (out / "comparison.png").read_bytes().startswith(b"\x89PNG")


def test_generation_follows_the_reference_protocol(full_run) -> None:
    out, model, _ = full_run
    results = {r.get("query", r.get("question")): r for r in map(json.loads, (out / "results.jsonl").open())}
    # at most 3 executions for visualization (the pie chart's 4th reply is never asked for) ...
    assert len(prompts_with(model, "Draw a pie chart")) == 3
    # ... and a visualization record stops after its error
    assert len(prompts_with(model, "Plot a line chart")) == 1
    # at most 1 for the others; the scripted "Observation: made up" is cut at the stop word
    gen = results["What is 15% of 240?"]["gen"]
    assert len(prompts_with(model, "What is 15% of 240?")) == 1
    assert "\nObservation: 36.0\nThought:" in gen and "made up" not in gen
    # uploads announced; Chinese records in Chinese
    assert "[Upload file sales.csv]Draw a bar chart" in prompts_with(model, "Draw a bar chart")[0]
    assert "[上传文件scores.csv]统计" in prompts_with(model, "统计scores.csv")[0]
    # a query with a first code step: the ReAct instruction around it, continued inside its assistant turn
    easy = prompts_with(model, "Draw a histogram")[0]
    assert "Begin!\n\nQuestion: [Upload file scores.csv]Draw a histogram" in easy
    assert easy.endswith("Observation: (the code ran and printed nothing)\nThought:")
    assert easy.count("<|im_start|>assistant") == 1
    hist = results[next(k for k in results if k.startswith("Draw a histogram"))]
    assert hist["first_step"]["status"] == "ok" and hist["steps"][0]["status"] == "ok"  # df came from the first step
    assert results["Wait a little, then print the number 7."]["exec"]["math"]["status"] == "timeout"


def test_the_judge_sees_the_png_and_the_reference_prompt(full_run) -> None:
    out, _, judge = full_run
    texts = []
    for body in judge.history:
        parts = body["messages"][0]["content"]
        texts.append(next(p["text"] for p in parts if p["type"] == "text"))
        url = next(p["image_url"]["url"] for p in parts if p["type"] == "image_url")
        assert url.startswith("data:image/png;base64,")
        assert base64.b64decode(url.split(",", 1)[1]).startswith(b"\x89PNG")
    assert len(judge.history) == 3  # bar, pie, histogram: the others produced no image
    assert JUDGE_EN + "Draw a bar chart of the total amount per region in sales.csv." in texts
    assert JUDGE_EN + "Draw a histogram of the math scores in scores.csv." in texts  # cut at <|im_end|>
    assert len(list((out / "images").glob("*/fig-*.png"))) == 3


def test_a_killed_run_resumes_to_the_same_metrics_and_eval_only_agrees(full_run, killed_run: KilledRun) -> None:
    full = json.loads((full_run[0] / "metrics.json").read_text())
    model, judge, out, home = killed_run.model, killed_run.judge, killed_run.out, killed_run.home
    results = out / "results.jsonl"
    killed_run.killer.join()
    answered = [json.loads(line)["query"] for line in results.read_text().splitlines()]
    assert 3 <= len(answered) < 5
    asked_before = len(model.history)
    resumed = run_eval(model, out, home, "--task", "visualization", "--workers", "4", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    # answered records are not asked again
    assert not any(q.split("<|im_end|>")[0] in b["prompt"] for b in model.history[asked_before:] for q in answered)
    lines = [json.loads(line) for line in results.read_text().splitlines()]
    assert len(lines) == 5 and len({r["query"] for r in lines}) == 5
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["counts"]["visualization"] == full["counts"]["visualization"]
    assert metrics["executable_rate"]["visualization"] == EXPECTED_EXECUTABLE["visualization"]
    assert metrics["missing_code_rate"]["visualization"] == EXPECTED_MISSING["visualization"]
    # without a judge: not measured, never guessed
    assert metrics["accuracy"]["visualization_hard"] is None and metrics["accuracy"]["visualization_easy"] is None
    assert metrics["visualization_accuracy"].startswith("not measured")
    assert "not measured" in (out / "report.md").read_text()
    # --eval-only re-runs the checks from results.jsonl alone (no generation) and, with a judge, scores plots
    asked = len(model.history)
    again = run_eval(model, out, home, "--task", "visualization", "--workers", "4", "--eval-only", judge=judge)
    assert again.returncode == 0, again.stderr
    assert len(model.history) == asked
    rescored = json.loads((out / "metrics.json").read_text())
    assert rescored["executable_rate"] == metrics["executable_rate"]
    assert rescored["counts"]["visualization"] == full["counts"]["visualization"]
    assert {k: rescored["accuracy"][k] for k in EXPECTED_VIS} == EXPECTED_VIS


def test_existing_results_are_not_overwritten(full_run, home: Path) -> None:
    out, model, _ = full_run
    proc = run_eval(model, out, home)
    assert proc.returncode == 2 and "--resume" in proc.stderr


@pytest.mark.parametrize("text, number", [
    ("The answer is 1,234", 1234.0), ("so it is -5", -5.0), ("change: +3", 3.0), ("It costs 2.50", 2.5),
    ("The total is 18.", 18.0), ("She paid $18", 18.0), ("#### 72", 72.0), ("100%", None), ("\\boxed{42}", 42.0),
    ("that is 50% of {12}", 12.0), ("12 then 1,000,000.", 1000000.0), ("No idea.", None),
    ("version3 is 4", 4.0), ("18", 18.0),
])
def test_gsm8k_number_extraction(text: str, number: float | None) -> None:
    assert extract_number(text) == number


def test_gsm8k_compares_numbers_not_strings() -> None:
    assert extract_number("Final Answer: 18.0") == extract_number("#### 18")
