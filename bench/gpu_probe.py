"""What the GPU probes (``bench.int4_gemv``, ``bench.attention``) share once their flags are read:
a clear answer where there is no GPU or no Triton, then the measurement, its JSON and its table."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def run_probe(prog: str, measure: Callable[[], dict[str, Any]], render: Callable[[dict[str, Any]], str],
              out: Path | None) -> int:
    """``measure()`` on the GPU, the report written to ``out`` if given and printed by ``render``;
    exit status 2 with a sentence where it cannot run here."""
    import torch

    if not torch.cuda.is_available():
        print(f"{prog} measures a CUDA GPU and none is visible here: run it on a GPU host.")
        return 2
    try:
        import triton  # noqa: F401
    except ImportError:
        print(f"{prog} needs Triton (it comes with CUDA builds of PyTorch).")
        return 2
    report = measure()
    if out:
        out.write_text(json.dumps(report, indent=1))
    print(render(report))
    return 0
