"""The benchmark's inputs (its JSONL and folder of input files, a local GSM8K JSONL) and the results
file, which is appended to and flushed per record so a killed run loses only the records in flight."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from sandbox import JupyboxError

BENCH_TAGS = ("math", "visualization", "general")
TASKS = ("all", *BENCH_TAGS, "gsm8k")
IM_START, IM_END = "<|im_start|>", "<|im_end|>"

Record = dict[str, Any]


class EvalError(JupyboxError):
    """A benchmark input or option is unusable; the message says which and what to pass instead."""


def record_key(rec: Record) -> str:
    """What identifies a record across runs (and for ``--resume``): its query, or its GSM8K question."""
    return rec["query"] if "query" in rec else rec["question"]


def record_id(rec: Record) -> str:
    """A short stable name for a record's folder of images."""
    return hashlib.sha1(record_key(rec).encode()).hexdigest()[:12]


def is_gsm8k(rec: Record) -> bool:
    return rec.get("task") == "gsm8k"


def tags_of(rec: Record) -> list[str]:
    tags = rec.get("tags") or []
    if isinstance(tags, str):
        tags = tags.split(",")
    return [t.strip().lower() for t in tags if t.strip()]


def exec_limit(rec: Record) -> int:
    """Executions the model may ask for: 3 for visualization records, 1 otherwise (the reference's)."""
    return 3 if "visualization" in tags_of(rec) else 1


def has_first_step(rec: Record) -> bool:
    """The query already carries a first code step (ChatML with an open assistant turn)."""
    return IM_START in record_key(rec)


def is_easy(rec: Record) -> bool:
    """Visualization-Easy: the question comes with a first code step; Hard: it does not."""
    return IM_END in record_key(rec)


def read_jsonl(path: Path) -> list[Record]:
    if not path.is_file():
        raise EvalError(f"{path}: no such file; pass the benchmark's JSONL file")
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise EvalError(f"{path}:{n}: not a JSON object ({exc.msg})") from None
    return records


def load_benchmark(path: Path, task: str) -> list[Record]:
    """The benchmark's records whose tags match ``task`` (all of them for ``all``)."""
    records = read_jsonl(path)
    for rec in records:
        if "query" not in rec:
            raise EvalError(f"{path}: a record has no 'query' field; is this the code-interpreter benchmark file?")
        rec.setdefault("lang", "en")
    if task in BENCH_TAGS:
        records = [r for r in records if task in tags_of(r)]
    return records


def load_gsm8k(path: Path) -> list[Record]:
    records = []
    for rec in read_jsonl(path):
        if "question" not in rec or "answer" not in rec:
            raise EvalError(f"{path}: GSM8K records need 'question' and 'answer' fields")
        records.append({"question": rec["question"], "answer": rec["answer"], "task": "gsm8k", "lang": "en"})
    return records


def input_files(rec: Record, input_dir: Path | None) -> list[Path]:
    """The record's input files on the host, checked to exist."""
    names = rec.get("input_file_path") or []
    if isinstance(names, str):
        names = [names]
    paths = []
    for name in names:
        path = Path(name)
        if not path.is_absolute():
            candidates = [(input_dir or Path.cwd()) / path, (input_dir or Path.cwd()) / path.name]
            path = next((c for c in candidates if c.is_file()), candidates[0])
        if not path.is_file():
            raise EvalError(f"input file {name!r} of a record was not found under {input_dir}: pass --input-dir")
        paths.append(path)
    return paths


class ResultsFile:
    """``results.jsonl``: one finished record per line, keyed by ``record_key``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict[str, Record]:
        """The finished records; a line cut short by a killed run is ignored (that record is redone)."""
        done: dict[str, Record] = {}
        if not self.path.exists():
            return done
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[record_key(rec)] = rec
        return done

    def append(self, rec: Record) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as fh:
            if fh.tell() and not self._ends_with_newline():
                fh.write("\n")  # a previous run was killed mid-line
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
            fh.flush()

    def _ends_with_newline(self) -> bool:
        with self.path.open("rb") as fh:
            fh.seek(-1, os.SEEK_END)
            return fh.read(1) == b"\n"

    def rewrite(self, records: list[Record]) -> None:
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        tmp.replace(self.path)
