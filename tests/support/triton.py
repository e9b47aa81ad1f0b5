"""GPU kernels' own source run on a CPU, under Triton's interpreter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any


def run_under_triton_interpreter(script: str, arg: object) -> Any:
    """Run ``script`` (given ``arg`` as JSON in ``sys.argv[1]``) in a fresh Python under Triton's CPU
    interpreter, the only way a GPU kernel's own source runs here, and return the JSON it prints
    last. A fresh process, because Triton reads ``TRITON_INTERPRET`` when a kernel is defined."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", script, json.dumps(arg)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
