"""A kernel's variables saved into its workspace and loaded again (the kernel's side of pausing and
resuming a session), against a real kernel in a real container. A save is followed by ``%reset -f``
in the same kernel and a restore: the kernel then holds only what the saved state gives back."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator

import pytest

from sandbox import Session, SessionManager
from sandbox.state import MARKER, STATE_DIR, StateReport, parse_report, restore_code, save_code

WS = "/mnt/data"  # the workspace as the kernel sees it in a container
MANIFEST = f"{STATE_DIR}/manifest.json"
NAMES = "print(sorted(k for k in globals() if not k.startswith('_') and k not in ('In', 'Out', 'exit', 'quit', " \
        "'get_ipython', 'open')))"


@pytest.fixture(scope="module")
async def session(docker_manager: SessionManager) -> AsyncIterator[Session]:
    """One kernel for the module, with a workspace small enough to fill (300 MB)."""
    limits = dataclasses.replace(docker_manager.settings.limits, workspace_bytes=300_000_000)
    s = await docker_manager.create(limits=limits)
    yield s
    await docker_manager.close(s.id)


async def run(session: Session, code: str) -> str:
    ex = await session.execute(code, timeout=60)
    assert ex.ok, ex.text()
    return ex.stdout


async def save(session: Session, **kw: int) -> StateReport:
    kw.setdefault("max_var_bytes", 150_000_000)
    stdout = await run(session, save_code(WS, **kw))
    assert stdout.count(MARKER) == 1 and stdout.strip().startswith(MARKER.strip()), stdout  # one line, nothing else
    report = parse_report(stdout)
    assert report.action == "save"
    return report


async def reset_and_restore(session: Session) -> StateReport:
    await run(session, "%reset -f")
    assert await run(session, NAMES) == "[]\n"
    report = parse_report(await run(session, restore_code(WS)))
    assert report.action == "restore"
    return report


async def test_values_functions_and_instances_survive_a_save_and_a_fresh_namespace(session: Session) -> None:
    await run(session, "%reset -f")
    await run(session, """
import numpy as np
import pandas as pd
n, text, nothing = 42, 'héllo', None
arr = np.arange(1_000_000, dtype=np.float64)
df = pd.DataFrame({'a': range(1000), 'b': ['x'] * 1000})
same = arr                      # one object under two names
scale = 3
def times(v):                   # uses a global: it must see the restored one
    return v * scale
inc = lambda v: v + 1
class Point:
    def __init__(self, x): self.x = x
    def double(self): return Point(self.x * 2)
p = Point(5)
points = [p, p]
""")
    before = await run(session, NAMES)
    every_name = "import re as _re\nprint(sorted(k for k in globals() if not _re.fullmatch(r'_i+[0-9]*', k)))"
    all_before = await run(session, every_name)
    report = await save(session)
    assert report.error is None, report.words()
    assert set(report.saved) == {"n", "text", "nothing", "arr", "df", "same", "scale", "times", "inc", "Point", "p",
                                 "points"}
    assert report.modules == {"np": "numpy", "pd": "pandas"} and report.skipped == {}
    assert 8_000_000 < report.bytes < 9_000_000  # the array once, not twice
    assert await run(session, every_name) == all_before  # the save left no name behind, hidden ones included

    restored = await reset_and_restore(session)
    assert restored.error is None and restored.skipped == {}, restored.words()
    assert set(restored.restored) == set(report.saved) and restored.modules == report.modules
    assert "restored" in restored.words() and "np, pd imported again" in restored.words()
    assert await run(session, NAMES) == before
    check = """
import json as _json
print(_json.dumps([n, text, nothing, float(arr.sum()), same is arr, df.shape, df['b'][3], times(2), inc(1),
                   isinstance(p, Point), p.double().x, points[0] is points[1] is p, np.__name__, pd.__name__]))
"""
    assert json.loads(await run(session, check)) == [42, "héllo", None, 499999500000.0, True, [1000, 2], "x", 6, 2,
                                                     True, 10, True, "numpy", "pandas"]
    await run(session, "scale = 10")
    assert await run(session, "print(times(2))") == "20\n"  # the function reads the namespace, not a copy


async def test_what_cannot_outlive_the_kernel_is_named_not_saved(session: Session) -> None:
    await run(session, "%reset -f")
    await run(session, """
import socket, threading
conn = socket.socket()
gen = (i for i in range(3))
fh = open('notes.txt', 'w')
lock = threading.Lock()
blob = b'x' * 3_000_000
kept = [1, 2, 3]
""")
    report = await save(session, max_var_bytes=1_000_000)
    assert report.error is None
    assert report.saved == ["kept"]
    assert report.skipped["conn"] == "a socket" and report.skipped["gen"] == "a generator"
    assert report.skipped["fh"] == "an open file" and report.skipped["lock"] == "a lock"
    assert report.skipped["blob"].startswith("too large: over the 1.0 MB")
    words = report.words()
    assert words.startswith("kept saved") and "conn (a socket)" in words and "gen (a generator)" in words
    assert "socket, threading to import again on resume" in words

    restored = await reset_and_restore(session)
    assert restored.restored == ["kept"] and restored.skipped["conn"] == "a socket", restored.words()
    assert "conn (a socket)" in restored.words() and "not restored" in restored.words()
    assert await run(session, "print(kept, socket.socket.__name__)") == "[1, 2, 3] socket\n"


async def test_a_corrupt_file_or_a_missing_class_skips_that_variable_only(session: Session) -> None:
    await run(session, "%reset -f")
    session.workspace.write("shapes.py", b"class Square:\n    side = 2\n")
    await run(session, "from shapes import Square\nsq = Square()\ngood = {'k': 1}\nbad = [1, 2]")
    assert (await save(session)).error is None
    manifest = json.loads(session.workspace.read(MANIFEST))
    files = {v["name"]: v["file"] for v in manifest["variables"]}
    session.workspace.write(f"{STATE_DIR}/{manifest['folder']}/{files['bad']}", b"\x80\x05not a pickle")
    session.workspace.delete("shapes.py")
    await run(session, "import sys\nsys.modules.pop('shapes', None)")

    restored = await reset_and_restore(session)
    assert restored.error is None
    assert restored.restored == ["good"], restored.words()
    assert "ModuleNotFoundError" in restored.skipped["Square"] and "shapes" in restored.skipped["Square"]
    assert restored.skipped["sq"] == "could not be loaded (needs Square, which was not restored)"
    assert restored.skipped["bad"].startswith("could not be loaded (")
    assert await run(session, "print(good)") == "{'k': 1}\n"


@pytest.mark.parametrize("manifest", [None, b"{not json", b'{"format": 1}'])
async def test_a_missing_or_corrupt_manifest_gives_a_fresh_kernel_in_words(session: Session,
                                                                          manifest: bytes | None) -> None:
    await run(session, "%reset -f\nx = 1")
    assert (await save(session)).error is None
    if manifest is None:
        session.workspace.delete(MANIFEST)
    else:
        session.workspace.write(MANIFEST, manifest)
    restored = await reset_and_restore(session)
    assert restored.restored == [] and restored.error is not None
    assert restored.error.startswith("the saved state could not be read (")
    assert restored.error.endswith("): a fresh kernel, no variables restored")
    assert restored.words() == restored.error
    assert await run(session, NAMES) == "[]\n"


async def test_a_save_the_quota_cannot_hold_fails_whole_and_keeps_the_previous_state(session: Session) -> None:
    await run(session, "%reset -f\nsmall = 'previous'")
    assert (await save(session)).saved == ["small"]
    before = session.workspace.read(MANIFEST)
    # fill the workspace's filesystem but for ~3 MB (in files under the 100 MB file limit), then ask
    # for a 20 MB save
    await run(session, """
import os
left = os.statvfs('.').f_bavail * os.statvfs('.').f_frsize - 3_000_000
for i in range(10):
    with open(f'filler{i}.bin', 'wb') as f:
        for _ in range(min(90, max(0, left >> 20))):
            f.write(bytes(1 << 20))
            left -= 1 << 20
del f, i, left
big = bytes(20_000_000)
small = 'new'
""")
    report = await save(session)
    assert report.saved == [] and report.error is not None
    assert report.error.startswith("no space left in the workspace (its quota): ")
    assert report.words().startswith("variables not saved: no space left")
    assert session.workspace.read(MANIFEST) == before
    leftovers = await run(session, f"import os\nprint(sorted(os.listdir('{STATE_DIR}')))")
    assert leftovers == f"['manifest.json', '{json.loads(before)['folder']}']\n"  # no partial save left
    await run(session, "import glob\nfor name in glob.glob('filler*.bin'): os.remove(name)")

    restored = await reset_and_restore(session)
    assert restored.restored == ["small"] and await run(session, "print(small)") == "previous\n"


async def test_100_mb_of_variables_restore_quickly(session: Session) -> None:
    """A 96 MB array (the sandbox's files stop at 100 MB) and a 16 MB DataFrame. Not a benchmark:
    the bound is far from the goal (well under 1 s); the time is in the report."""
    await run(session, "%reset -f")
    await run(session, "import numpy as np, pandas as pd\nbig = np.random.rand(12_000_000)\n"
                       "frame = pd.DataFrame({'a': np.arange(1_000_000), 'b': np.random.rand(1_000_000)})\n"
                       "over = np.zeros(13_000_000)")
    report = await save(session, max_var_bytes=150_000_000, max_total_bytes=250_000_000)
    assert report.saved == ["big", "frame"] and report.bytes > 112_000_000
    assert report.skipped == {"over": "too large: over the 100.0 MB file size limit"}  # the sandbox's, not a failure
    restored = await reset_and_restore(session)
    assert restored.restored == ["big", "frame"]
    print(f"save {report.bytes / 1e6:.0f} MB in {report.seconds:.3f} s; restore in {restored.seconds:.3f} s")
    assert restored.seconds < 5
    assert await run(session, "print(big.shape, frame.shape)") == "(12000000,) (1000000, 2)\n"


def test_the_report_line_is_found_among_noise_and_round_trips() -> None:
    report = StateReport(action="restore", restored=["x", "df"], skipped={"conn": "a socket"},
                         modules={"np": "numpy"}, bytes=1_200_000, seconds=0.25)
    assert StateReport.from_dict(json.loads(json.dumps(report.to_dict()))) == report
    line = MARKER + json.dumps(report.to_dict())
    assert parse_report(f"warning: something\n{line}\ntrailing noise") == report
    assert parse_report(f"partial line without newline{line}") == report
    assert report.words() == "x, df restored (1.2 MB); np imported again; conn (a socket) not restored"

    assert "printed no report" in (parse_report("just noise\n").error or "")
    assert "could not be read" in (parse_report(MARKER + "{broken\n").error or "")
    assert "could not be read" in (parse_report(MARKER + '{"saved": "x"}\n').error or "")
    assert "could not be read" in (parse_report(MARKER + '{"sneaky": 1}\n').error or "")


def test_words_stay_short_with_many_names() -> None:
    many = StateReport(action="save", saved=[f"v{i}" for i in range(30)],
                       skipped={f"{'s' * 500}{i}": "r" * 500 for i in range(25)}, unlisted={"saved": 970})
    words = many.words()
    assert "v19, and" not in words and "v19 and 980 more saved" in words and "and 5 more not saved" in words
    assert len(words) < 3_000
    assert StateReport(action="restore").words() == "no variables restored"
    with pytest.raises(ValueError):
        save_code(WS, max_var_bytes=0)
