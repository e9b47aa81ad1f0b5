"""Scores: GSM8K's number extraction, the vision judge, and the metrics over a results file."""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any

from interpreter.formats.base import image_parts
from interpreter.llm.base import LLM, GenerationRequest, Message

from .data import BENCH_TAGS, IM_END, Record, is_easy, is_gsm8k, record_key, tags_of
from .generate import is_error_observation

NUMBER_RE = re.compile(r"(?:^|(?<=[\s$%#{]))([+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?)(?=[\s.,}]|$)")
JUDGE_PROMPT_EN = ('Please judge whether the image is consistent with the [Question] below, if it is consistent '
                   'then reply "right", if not then reply "wrong".\n[Question]: {query}')
JUDGE_PROMPT_ZH = "请判断图片是否与下面的[问题]一致，如果一致则回复“right”，不一致则回复“wrong”。\n[问题]：{query}"
IMAGE_REF_RE = re.compile(r"!\[fig-[^\]]*\]\(([^)\s]+)\)")
NOT_MEASURED = "not measured: no judge model (pass --judge-base-url and --judge-model)"


# -- GSM8K -------------------------------------------------------------------------------------
def extract_number(text: str) -> float | None:
    """The last number of ``text`` (trailing periods of the whole text stripped first): an optional
    sign, digits with optional thousands commas and decimals, after whitespace or one of ``$%#{``,
    before whitespace, ``.``, ``,``, ``}`` or the end. None when there is none."""
    found = NUMBER_RE.findall(text.rstrip().rstrip("."))
    if not found:
        return None
    return float(found[-1].replace(",", "").replace("+", ""))


def gsm8k_correct(rec: Record) -> bool:
    pred, gold = extract_number(rec.get("gen") or ""), extract_number(rec["answer"])
    return pred is not None and gold is not None and abs(pred - gold) < 1e-6


# -- the vision judge ---------------------------------------------------------------------------
def judge_prompt(rec: Record) -> str:
    query = record_key(rec).split(IM_END, 1)[0]
    return (JUDGE_PROMPT_ZH if rec.get("lang") == "zh" else JUDGE_PROMPT_EN).format(query=query)


def judged_images(gen: str) -> list[str]:
    """Image paths referenced by observations that report no error."""
    paths = []
    for piece in gen.split("\nObservation:")[1:]:
        observation = piece.split("\nThought:", 1)[0]
        if not is_error_observation(observation):
            paths.extend(IMAGE_REF_RE.findall(observation))
    return paths


async def judge(llm: LLM, rec: Record, image_dir: Path) -> dict[str, Any]:
    """Ask the judge about the record's images; no image is a wrong answer without asking."""
    files = [image_dir / Path(p).name for p in judged_images(rec.get("gen") or "")]
    files = [f for f in files if f.is_file()]
    if not files:
        return {"right": False, "reply": None, "images": 0}
    urls = [f"data:image/png;base64,{base64.b64encode(f.read_bytes()).decode()}" for f in files]
    request = GenerationRequest(messages=[Message("user", image_parts(judge_prompt(rec), urls))],
                                temperature=0.0, max_tokens=256)
    reply = (await llm.complete(request)).text
    return {"right": "right" in reply.lower(), "reply": reply, "images": len(files)}


# -- metrics ------------------------------------------------------------------------------------
def _pct(part: int, whole: int) -> float | None:
    return round(100.0 * part / whole, 2) if whole else None


def compute_metrics(records: list[Record]) -> dict[str, Any]:
    """The reference's figures. Rates are percentages of all records of the tag; a figure with no
    record behind it is null; visualization accuracy is null unless every record was judged."""
    bench = [r for r in records if not is_gsm8k(r)]
    gsm = [r for r in records if is_gsm8k(r)]
    counts: dict[str, dict[str, int]] = {}
    for tag in BENCH_TAGS:
        of_tag = [r for r in bench if tag in tags_of(r)]
        checks = [(r.get("exec") or {}).get(tag) or {} for r in of_tag]
        counts[tag] = {"all": len(of_tag), "executable": sum(bool(c.get("executable")) for c in checks),
                       "missing_code": sum(bool(c.get("missing_code")) for c in checks)}
    vis = [r for r in bench if "visualization" in tags_of(r)]
    judged = bool(vis) and all("judge" in r for r in vis)
    split = {"hard": [r for r in vis if not is_easy(r)], "easy": [r for r in vis if is_easy(r)]}
    vis_counts = {k: {"all": len(v), "right": sum(bool((r.get("judge") or {}).get("right")) for r in v)}
                  for k, v in split.items()}
    gsm_correct = sum(gsm8k_correct(r) for r in gsm)
    metrics: dict[str, Any] = {
        "records": len(records),
        "executable_rate": {t: _pct(c["executable"], c["all"]) for t, c in counts.items()},
        "missing_code_rate": {t: _pct(c["missing_code"], c["all"]) for t, c in counts.items()},
        "accuracy": {
            "math_gsm8k": _pct(gsm_correct, len(gsm)),
            "visualization_hard": _pct(vis_counts["hard"]["right"], vis_counts["hard"]["all"]) if judged else None,
            "visualization_easy": _pct(vis_counts["easy"]["right"], vis_counts["easy"]["all"]) if judged else None,
        },
        "counts": {**counts, "visualization_hard": vis_counts["hard"], "visualization_easy": vis_counts["easy"],
                   "gsm8k": {"all": len(gsm), "correct": gsm_correct,
                             "no_number": sum(extract_number(r.get("gen") or "") is None for r in gsm)}},
        "time_limits_s": {"math": 10, "visualization": 10, "general": 60},
    }
    if vis and not judged:
        metrics["visualization_accuracy"] = NOT_MEASURED
    return metrics
