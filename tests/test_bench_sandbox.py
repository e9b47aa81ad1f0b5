"""The sandbox benchmark runs end to end on real containers and a real bare kernel, prints every
figure, and leaves nothing running. It never asserts timings: those are figures, not promises."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from bench.sandbox import run_sandbox_bench
from sandbox.manager import make_owner
from tests.support.sandboxes import docker_settings


@pytest.mark.slow
async def test_bench_prints_every_figure_and_leaves_no_container(
        sandbox_image: str, jb_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings = docker_settings(jb_home, instance="bench-test")
    assert await run_sandbox_bench(settings, runs=2, max_sessions=2, as_json=True) == 0

    result = json.loads(capsys.readouterr().out)
    figures = result["figures"]
    for name in ("cold_start_p50_s", "cold_start_p95_s", "cold_start_min_s", "warm_acquire_p50_ms",
                 "warm_acquire_p95_ms", "roundtrip_p50_ms", "roundtrip_p95_ms", "bare_roundtrip_p50_ms",
                 "bare_roundtrip_p95_ms", "roundtrip_ratio_p50", "idle_memory_mib", "capacity_sessions",
                 "capacity_s", "kernel_idle_rss_mib", "kernel_soak_rss_mib", "soak_printed_mb", "pause_p50_s",
                 "resume_p50_s", "resume_max_s", "variables_mb", "state_mb", "paused_disk_mb", "pip_install_import_p50_s",
                 "pip_install_import_max_s", "pip_install_import_first_s"):
        assert isinstance(figures[name], (int, float)) and figures[name] > 0, (name, figures.get(name))
    assert set(result["targets"]) == {"cold_start_p50_s", "warm_acquire_p50_ms", "roundtrip_ratio_p50", "resume_p50_s",
                                      "pip_install_import_p50_s"}
    assert figures["variables_mb"] == 100 and figures["state_mb"] >= 100  # what was paused was saved
    assert figures["paused_disk_mb"] >= figures["state_mb"]
    assert all(isinstance(t["met"], bool) for t in result["targets"].values())
    assert figures["capacity_sessions"] == 2
    assert figures["soak_printed_mb"] == 80  # 40 cells of 2 MB

    owner = make_owner("bench-test")
    left = subprocess.run(["docker", "ps", "-aq", "--filter", f"label=jupybox.owner={owner}"],
                          capture_output=True, text=True, check=True).stdout.split()
    assert left == []
    pause_owner = make_owner("bench-test-pause")
    left = subprocess.run(["docker", "ps", "-aq", "--filter", f"label=jupybox.owner={pause_owner}"],
                          capture_output=True, text=True, check=True).stdout.split()
    assert left == [] and not list((jb_home / "sessions").glob("*/data.img"))
