"""Executability, as the reference measures it: the code the model wrote, re-run on its own.

Per record and tag, in a FRESH sandbox session with the input files uploaded: the ``Action Input``
code of ``gen`` (visualization and general: the first block only; math: every block, each prefixed
``#concat``), with ``/mnt/data/`` and ``/path/to/`` removed from paths, the query's own first code step
prepended, a ``solution()`` call appended when the code defines one, and the reference's preamble of
imports on top. Executable = the execution's status is ok within the limit (10 s for math and
visualization; the reference sets none for general, we allow 60 s), counted after the preamble's
imports were warmed up (see ``generate.warm_up``). No code = missing code.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from interpreter.llm.base import Completion
from sandbox import SessionManager

from .data import Record, record_key
from .generate import FORMAT, PREAMBLE, first_step_code, warm_up

TIME_LIMIT_S = {"math": 10.0, "visualization": 10.0, "general": 60.0}
SOLUTION_RE = re.compile(r"^\s*def\s+solution\s*\(", re.M)


def action_codes(gen: str) -> list[str]:
    """The code of every ``Action Input`` in a transcript, in order. Each model output ends where an
    ``Observation:`` begins; the project's ReAct parser finds the action in each."""
    codes = []
    for piece in gen.split("\nObservation:"):
        step = FORMAT.parse(Completion(text=piece))
        codes.extend(a.code for a in step.actions if a.code)
    return codes


def _clean_paths(code: str) -> str:
    return code.replace("/mnt/data/", "").replace("/path/to/", "")


def executable_code(rec: Record, tag: str) -> str | None:
    """What the executability check runs for ``rec`` under ``tag``; None when the model wrote no code."""
    codes = action_codes(rec.get("gen") or "")
    if not codes:
        return None
    code = "\n".join("#concat\n" + c for c in codes) if tag == "math" else codes[0]
    code = _clean_paths(code)
    first = first_step_code(record_key(rec))
    if first:
        code = _clean_paths(first) + "\n" + code
    if SOLUTION_RE.search(code):
        code += "\nsolution()"
    return PREAMBLE + code


async def check_executable(manager: SessionManager, rec: Record, tag: str, files: list[Path]) -> dict[str, Any]:
    code = executable_code(rec, tag)
    if code is None:
        return {"executable": False, "missing_code": True, "status": None}
    session = await manager.create()
    try:
        for f in files:
            session.workspace.upload(f)
        await warm_up(session)  # the imports, before the clock starts (see generate.warm_up)
        execution = await session.execute(code, timeout=TIME_LIMIT_S[tag])
    finally:
        await manager.close(session.id)
    err = execution.error
    return {"executable": execution.ok, "missing_code": False, "status": execution.status.value,
            "error": f"{err.ename}: {err.evalue}" if err else execution.reason}
