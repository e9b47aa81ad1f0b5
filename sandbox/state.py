"""Saving a kernel's variables into its workspace and loading them into a fresh kernel: the kernel's
side of pausing and resuming a session.

The session runs the code these functions return as one silent execution and hands what it printed
to ``parse_report``. The work happens in the kernel (``state_kernel.py``, sent as source): the
host never unpickles anything the sandbox wrote. What a caller may rely on:

* the state lives in the workspace, under ``STATE_DIR``, so it counts against the workspace's quota;
* a save either completes or leaves the previous state as it was (one rename makes it count), and
  a save that fails as a whole (the quota is full) says so in ``StateReport.error``;
* neither code leaves a name in the user's namespace, and each prints one marker line, which
  ``parse_report`` finds among whatever else the kernel printed;
* a restore never raises in the kernel: what could not be loaded is named in the report.

Variables that cannot outlive their process (sockets, generators, open files) and variables over
``max_var_bytes`` are skipped and named. Modules are not pickled: their import aliases (``np``,
``pd``) are recorded and imported again on restore.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from functools import cache
from pathlib import Path, PurePath
from typing import Any

STATE_DIR = ".jupybox-state"
MARKER = "\x1ejupybox-state "
MAX_VARS = 10_000
REPORT_CHARS = 8_000  # the printed report stays well under any session's output budget
WORDS_NAMES = 20  # names listed per part of ``StateReport.words()``
WORDS_NAME_CHARS = 40

__all__ = ["MARKER", "STATE_DIR", "StateReport", "parse_report", "restore_code", "save_code"]


@dataclass
class StateReport:
    """What a save or a restore did. ``skipped`` maps a name to why it was not saved (or not
    restored); ``modules`` maps an import alias to its module (recorded, or imported again);
    ``unlisted`` counts names the kernel left out of a list to keep its report short."""

    action: str = ""  # "save" | "restore"; empty when no report came back
    saved: list[str] = field(default_factory=list)
    restored: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    modules: dict[str, str] = field(default_factory=dict)
    unlisted: dict[str, int] = field(default_factory=dict)
    bytes: int = 0
    seconds: float = 0.0
    error: str | None = None
    interrupted: bool = False  # a running cell was interrupted before the save

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StateReport:
        """The report ``to_dict`` gave (or the kernel printed); ``ValueError`` on an unknown key or
        a value of the wrong type, since the data comes from the sandbox."""
        if not isinstance(data, dict):
            raise ValueError("a state report is a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown keys in a state report: {', '.join(sorted(map(str, unknown)))}")
        checks = {
            "action": lambda v: isinstance(v, str),
            "saved": _is_names, "restored": _is_names,
            "skipped": lambda v: isinstance(v, dict) and all(isinstance(k, str) and isinstance(x, str)
                                                             for k, x in v.items()),
            "modules": lambda v: isinstance(v, dict) and all(isinstance(k, str) and isinstance(x, str)
                                                             for k, x in v.items()),
            "unlisted": lambda v: isinstance(v, dict) and all(isinstance(x, int) for x in v.values()),
            "bytes": lambda v: isinstance(v, int) and not isinstance(v, bool),
            "seconds": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
            "error": lambda v: v is None or isinstance(v, str),
            "interrupted": lambda v: isinstance(v, bool),
        }
        for key, value in data.items():
            if not checks[key](value):
                raise ValueError(f"a state report's {key!r} has the wrong type")
        return cls(**data)

    def words(self) -> str:
        """One line for a model and a person: what was saved or restored, and what was not and why.
        At most ``WORDS_NAMES`` names per part, each clipped."""
        note = "a running cell was interrupted first; " if self.interrupted else ""
        if self.error is not None:
            prefix = "variables not saved: " if self.action == "save" else ""
            return note + prefix + self.error
        done, verb = (self.restored, "restored") if self.action == "restore" else (self.saved, "saved")
        parts = []
        if done or self.unlisted.get(verb):
            size = f" ({_human(self.bytes)})" if self.bytes else ""
            parts.append(f"{_names(done, self.unlisted.get(verb, 0))} {verb}{size}")
        if self.modules or self.unlisted.get("modules"):
            when = "to import again on resume" if self.action == "save" else "imported again"
            parts.append(f"{_names(list(self.modules), self.unlisted.get('modules', 0))} {when}")
        if self.skipped or self.unlisted.get("skipped"):
            named = [f"{_clip(n)} ({_clip(why, 60)})" for n, why in self.skipped.items()]
            parts.append(f"{_names(named, self.unlisted.get('skipped', 0), clip=False)} not {verb}")
        return note + ("; ".join(parts) if parts else f"no variables {verb}")


def save_code(kernel_workspace: str | PurePath, max_var_bytes: int, max_total_bytes: int | None = None,
              max_vars: int = MAX_VARS) -> str:
    """Code that saves the kernel's variables into ``<kernel_workspace>/STATE_DIR``, the workspace
    as the kernel sees it. A variable over ``max_var_bytes`` pickled is skipped; so is whatever
    would take the state past ``max_total_bytes`` (default: ``max_var_bytes``, since the previous
    state stays on disk until the new one is complete), or past ``max_vars`` variables."""
    total = max_var_bytes if max_total_bytes is None else max_total_bytes
    for name, value in (("max_var_bytes", max_var_bytes), ("max_total_bytes", total), ("max_vars", max_vars)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, not {value}")
    return _code("save", {"workspace": str(kernel_workspace), "max_var_bytes": int(max_var_bytes),
                          "max_total_bytes": int(total), "max_vars": int(max_vars)})


def restore_code(kernel_workspace: str | PurePath) -> str:
    """Code that loads what ``save_code`` saved into the (fresh) kernel's namespace."""
    return _code("restore", {"workspace": str(kernel_workspace)})


def parse_report(stdout: str) -> StateReport:
    """The report in what the state code printed: the last marker line, whatever surrounds it.
    No marker, or a line that is not a report, gives a report with ``error`` set (never raises)."""
    at = stdout.rfind(MARKER)
    if at < 0:
        return StateReport(error="the kernel printed no report of its variables (the state code did not finish)")
    line = stdout[at + len(MARKER):].split("\n", 1)[0]
    try:
        return StateReport.from_dict(json.loads(line))
    except ValueError as exc:
        return StateReport(error=f"the kernel's report of its variables could not be read ({_clip(str(exc), 120)})")


@cache
def _kernel_source() -> str:
    return (Path(__file__).with_name("state_kernel.py")).read_text()


def _code(action: str, params: dict[str, Any]) -> str:
    # exec in a private dict: the kernel-side functions never become the user's names; the cell's
    # own globals() is the user's namespace.
    params = {**params, "report_chars": REPORT_CHARS}
    call = f"\nrun({action!r}, user_ns, {params!r})\n"
    return (f"exec(compile({_kernel_source() + call!r}, '<jupybox-state>', 'exec'), "
            "{'__name__': '__jupybox_state__', 'user_ns': globals()})\n")


def _is_names(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _clip(text: str, limit: int = WORDS_NAME_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _names(names: list[str], more: int = 0, clip: bool = True) -> str:
    shown = [_clip(n) if clip else n for n in names[:WORDS_NAMES]]
    more += len(names) - len(shown)
    return ", ".join(shown) + (f" and {more} more" if more else "")


def _human(n: float) -> str:
    for unit in ("bytes", "kB", "MB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"
