"""Generation by the reference protocol, reusing the project's Qwen ReAct prompt and parser.

Per record, in its own sandbox session with the input files uploaded: the ReAct prompt (upload
announced as ``[Upload file a.csv]``, ``[上传文件a.csv]`` for Chinese records); a query that already
holds a first code step has that step executed first (not counted, its observation not added) and the
prompt continues the query's open assistant turn. Then: model output → run the ``Action Input`` code →
append ``\\nObservation: …\\nThought:``, until the execution limit (3 for visualization, else 1), an
observation with an error, or an output without an action. ``gen`` is the concatenation.

This is a thin loop rather than ``Interpreter.run`` because the protocol differs in three places the
loop does not offer: the pre-executed first step, the continued ChatML query, and continuing after a
timeout (the reference stops only on errors). The session starts with the preamble's imports done,
as the reference's kernels do (``warm_up``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from interpreter.formats.base import announce_files
from interpreter.formats.react import IM_START, STOP, ReactFormat
from interpreter.llm.base import LLM, Completion, GenerationOptions, GenerationRequest, Message
from sandbox import JupyboxError, Session, SessionManager, Workspace
from sandbox.models import Execution, ExecutionStatus, clip

from .data import EvalError, Record, exec_limit, has_first_step, record_key

FORMAT = ReactFormat()
PREAMBLE = """import os
import seaborn as sns
import matplotlib
import matplotlib.pyplot as plt
plt.ion()
import numpy as np
import pandas as pd
from sympy import Eq, symbols, solve
import re
import json
import math
"""
WARMUP_S = 120.0
ERROR_MARKERS = ("error:", "Traceback")


@dataclass
class GenerationSettings(GenerationOptions):
    """The model's options (shared with every prompt format) plus what the protocol adds."""

    execution_timeout: float = 60.0
    observation_tokens: int = 1024


@dataclass
class Generation:
    gen: str
    steps: list[dict[str, Any]] = field(default_factory=list)  # one per model execution
    first_step: dict[str, Any] | None = None  # the query's own first code step, when it has one


def benchmark_prompt(query: str, files: list[str], lang: str) -> str:
    """The reference's prompt: ChatML with the ReAct instruction around the (announced) query. A query
    holding a first code step brings its own ``<|im_end|>`` and open assistant turn, so the prompt
    stops inside it."""
    return FORMAT.render([Message("user", announce_files(files, lang_zh=lang == "zh") + query)])


def first_step_code(query: str) -> str | None:
    """The code of the last ``Action Input`` in a query that carries a first code step."""
    if IM_START not in query:
        return None
    step = FORMAT.parse(Completion(text=query.split(IM_START + "assistant", 1)[-1]))
    return next((a.code for a in step.actions if a.code), None)


async def warm_up(session: Session) -> None:
    """Import the preamble's libraries before the record starts. The reference's kernels run an init
    script with these imports when they start, so neither the model's executions nor the 10 s limit
    of the executability check pay for a cold ``import pandas, seaborn, sympy`` (seconds in a fresh
    container)."""
    execution = await session.execute(PREAMBLE, timeout=WARMUP_S)
    if not execution.ok:
        raise EvalError(f"the sandbox image cannot import the benchmark's libraries ({execution.text(300)}): "
                        "rebuild it with `jupybox sandbox build-image --force`")


def is_error_observation(text: str) -> bool:
    return any(m in text for m in ERROR_MARKERS)


def _step_record(code: str, execution: Execution, observation: str) -> dict[str, Any]:
    return {"code": code, "status": execution.status.value, "duration_s": execution.duration_s,
            "images": [img.path for img in execution.images], "error": is_error_observation(observation)}


async def generate(llm: LLM, manager: SessionManager, rec: Record, files: list[Path],
                   settings: GenerationSettings, image_dir: Path) -> Generation:
    """Answer one record by the protocol; images are copied into ``image_dir`` before the session goes."""
    session = await manager.create()
    try:
        names = [session.workspace.upload(f).path for f in files]
        await warm_up(session)
        query = record_key(rec)
        prompt = benchmark_prompt(query, names, rec.get("lang", "en"))
        result = Generation(gen="")
        if has_first_step(rec):
            code = first_step_code(query)
            if code:
                ex = await session.execute(code, timeout=settings.execution_timeout)
                result.first_step = {"code": code, "status": ex.status.value}
        pad = [Message("assistant", "")]  # the scratchpad: ``gen``
        while len(result.steps) < exec_limit(rec):
            request = GenerationRequest.of(settings, prompt=prompt + pad[0].text(), stop=list(STOP))
            step = FORMAT.parse(await llm.complete(request))
            code = next((a.code for a in step.actions if a.code), None)
            if code is None:  # an answer, or an action without runnable code: the turn ends
                FORMAT.add_answer(pad, step)
                break
            execution = await session.execute(code, timeout=settings.execution_timeout)
            text = clip(execution.text(budget=settings.observation_tokens * 8), settings.observation_tokens,
                        llm.count_tokens)
            observation = FORMAT.observation(execution, text)
            FORMAT.add_step(pad, step, [observation])
            result.steps.append(_step_record(code, execution, observation))
            if execution.status in (ExecutionStatus.ERROR, ExecutionStatus.CRASHED) or is_error_observation(observation):
                break
        result.gen = pad[0].text()
        _keep_images(session.workspace, result, image_dir)
        return result
    finally:
        await manager.close(session.id)


def _keep_images(workspace: Workspace, result: Generation, image_dir: Path) -> None:
    """Copy the step's images out through the path-safe workspace (the code may have swapped a
    figure for a symlink; that is refused rather than followed)."""
    for step in result.steps:
        for path in step["images"]:
            try:
                data = workspace.read(path)
            except JupyboxError:
                continue
            image_dir.mkdir(parents=True, exist_ok=True)
            (image_dir / Path(path).name).write_bytes(data)
