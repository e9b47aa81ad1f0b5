"""A session's workspace as the host sees it: names are checked, symlinks the sandbox may have made
are never followed, quotas hold, and files belong to the kernel's user. Real files in tmp_path;
no Docker needed."""

from __future__ import annotations

import hashlib
import io
import os
import re
import stat
import threading
from pathlib import Path

import pytest

from sandbox import Limits, QuotaExceeded, Workspace, WorkspaceError, WorkspacePathError
from sandbox.workspace import CHUNK


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    return Workspace(tmp_path / "ws", Limits())


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A host folder next to the workspace, holding a file the sandbox must never reach."""
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "secret.txt").write_bytes(b"host secret")
    return folder


def digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# -- names ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "problem"), [
    ("../escape.txt", "'..'"),
    ("a/../../escape.txt", "'..'"),
    ("/etc/passwd", "absolute"),
    ("bad\x00name.txt", "NUL"),
    ("", "required"),
    (".", "not a file name"),
    ("x" * 256, "longer than 255 bytes"),
])
def test_names_that_escape_or_mean_nothing_are_refused(ws: Workspace, name: str, problem: str) -> None:
    for operation in (lambda: ws.write(name, b"x"), lambda: ws.read(name), lambda: ws.delete(name),
                      lambda: ws.exists(name), lambda: ws.open(name)):
        with pytest.raises(WorkspacePathError, match=re.escape(problem)):
            operation()
    assert ws.list() == []
    assert not (ws.root.parent / "escape.txt").exists()


@pytest.mark.parametrize("name", ["a\\..\\escape.txt", "\\etc\\passwd", "C:\\Windows\\win.ini", "   ",
                                  "line\nbreak.txt", "tab\there", " lead and trail "])
def test_any_name_linux_allows_is_one_file_inside_the_workspace(ws: Workspace, name: str) -> None:
    """Code in the sandbox can make these names; the host handles them as they are, not as
    Windows paths, so each is listed, read and deleted like any other file."""
    ws.write(name, b"odd")
    assert [f.path for f in ws.list()] == [name] and ws.read(name) == b"odd" and ws.exists(name)
    ws.delete(name)
    assert ws.list() == [] and not (ws.root.parent / "escape.txt").exists()


# -- symlinks ---------------------------------------------------------------------------------
def test_a_symlinked_folder_pointing_outside_is_never_followed(ws: Workspace, outside: Path) -> None:
    os.symlink("/etc", ws.root / "etc")
    os.symlink(outside, ws.root / "out")
    before = digest(outside / "secret.txt")

    with pytest.raises(WorkspacePathError, match="'etc' is a symlink"):
        ws.read("etc/passwd")
    with pytest.raises(WorkspacePathError, match="symlink"):
        ws.open("etc/hostname")
    with pytest.raises(WorkspacePathError, match="symlink"):
        ws.write("etc/jupybox-test-escape", b"")
    assert not Path("/etc/jupybox-test-escape").exists()

    with pytest.raises(WorkspacePathError):
        ws.write("out/secret.txt", b"overwritten")
    with pytest.raises(WorkspacePathError):
        ws.write("out/new/deeper.txt", io.BytesIO(b"streamed"))
    with pytest.raises(WorkspacePathError):
        ws.delete("out/secret.txt")
    assert digest(outside / "secret.txt") == before
    assert sorted(p.name for p in outside.iterdir()) == ["secret.txt"]


def test_a_symlinked_file_pointing_outside_is_never_followed(ws: Workspace, outside: Path) -> None:
    os.symlink("/etc/hostname", ws.root / "link")
    os.symlink(outside / "secret.txt", ws.root / "secret-link")
    os.symlink(outside / "planted.txt", ws.root / "dangling")  # its target does not exist yet
    before = digest(outside / "secret.txt")

    with pytest.raises(WorkspacePathError, match="'link' is a symlink"):
        ws.read("link")
    with pytest.raises(WorkspacePathError):
        ws.open("secret-link")
    with pytest.raises(WorkspacePathError):
        ws.write("secret-link", b"overwritten")
    with pytest.raises(WorkspacePathError):
        ws.write("secret-link", io.BytesIO(b"overwritten"))
    with pytest.raises(WorkspacePathError):
        ws.write("dangling", b"planted")
    assert digest(outside / "secret.txt") == before
    assert not (outside / "planted.txt").exists()

    # a stray link can be removed; only the link goes, its target stays
    ws.delete("secret-link")
    assert not os.path.lexists(ws.root / "secret-link")
    assert (outside / "secret.txt").read_bytes() == b"host secret"


def test_a_fifo_made_in_the_workspace_does_not_hang_the_host(ws: Workspace) -> None:
    """The sandbox can mkfifo in its workspace. Host-side reads and checks must answer at once
    (refuse or report), not block forever waiting for a writer."""
    fifo = ws.root / "pipe"
    os.mkfifo(fifo)
    outcomes: dict[str, str] = {}

    def attempt(label: str, operation) -> None:
        try:
            operation()
            outcomes[label] = "returned"
        except WorkspaceError as exc:
            outcomes[label] = f"refused: {exc}"

    for label, operation in (("exists", lambda: ws.exists("pipe")), ("read", lambda: ws.read("pipe"))):
        worker = threading.Thread(target=attempt, args=(label, operation), daemon=True)
        worker.start()
        worker.join(timeout=1.5)
        if worker.is_alive():
            # unblock the stuck open() by playing the writer, so the thread ends and the test can go on
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            worker.join(timeout=3)
            outcomes[label] = "blocked"
    assert outcomes.get("exists") != "blocked" and outcomes.get("read") != "blocked", outcomes
    assert outcomes["read"].startswith("refused"), outcomes


# -- files and folders ------------------------------------------------------------------------
def test_nested_writes_create_folders_and_read_back(ws: Workspace) -> None:
    f = ws.write("reports/2024/q1/summary.txt", b"revenue up")
    assert f.path == "reports/2024/q1/summary.txt" and f.size == 10
    assert (ws.root / "reports" / "2024" / "q1").is_dir()
    assert ws.read("reports/2024/q1/summary.txt") == b"revenue up"
    assert ws.read("./reports//2024/q1/summary.txt") == b"revenue up"  # the same name, spelled loosely
    with ws.open("reports/2024/q1/summary.txt") as fh:
        assert fh.read() == b"revenue up"
    assert ws.exists("reports/2024/q1/summary.txt") and not ws.exists("reports/2024/q2/summary.txt")
    with pytest.raises(WorkspaceError, match="no such file"):
        ws.read("reports/2024/q2/summary.txt")
    with pytest.raises(WorkspaceError, match="not a regular file"):
        ws.read("reports/2024")


def test_list_recurses_reports_sizes_and_skips_symlinks(ws: Workspace, outside: Path) -> None:
    ws.write("b.csv", b"a,b\n1,2\n")
    ws.write("data/a.bin", b"\x00" * 1000)
    ws.write("data/deep/c.txt", b"")
    os.symlink(outside, ws.root / "data" / "outside-dir")
    os.symlink(outside / "secret.txt", ws.root / "secret-link")
    os.symlink("/etc", ws.root / "etc")

    listed = ws.list()
    assert [(f.path, f.size) for f in listed] == [("b.csv", 8), ("data/a.bin", 1000), ("data/deep/c.txt", 0)]
    assert all(f.modified > 0 for f in listed)
    assert ws.usage() == 1008


def test_upload_copies_a_host_file(ws: Workspace, tmp_path: Path) -> None:
    source = tmp_path / "sales.csv"
    source.write_bytes(b"region,amount\nnorth,10\n" * 1000)
    f = ws.upload(source)
    assert f.path == "sales.csv" and f.size == source.stat().st_size
    assert ws.read("sales.csv") == source.read_bytes()
    renamed = ws.upload(str(source), "inputs/renamed.csv")
    assert renamed.path == "inputs/renamed.csv" and ws.read("inputs/renamed.csv") == source.read_bytes()
    assert source.exists()  # copied, not moved


def test_delete_removes_files_and_refuses_folders(ws: Workspace) -> None:
    ws.write("keep/me.txt", b"1")
    ws.write("drop.txt", b"2")
    ws.delete("drop.txt")
    assert not ws.exists("drop.txt") and [f.path for f in ws.list()] == ["keep/me.txt"]
    with pytest.raises(WorkspaceError, match="folder"):
        ws.delete("keep")
    assert ws.read("keep/me.txt") == b"1"
    with pytest.raises(WorkspaceError, match="no such file"):
        ws.delete("drop.txt")
    ws.delete("drop.txt", missing_ok=True)


# -- quotas -----------------------------------------------------------------------------------
def test_one_file_over_the_per_file_quota_is_refused(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "ws", Limits(file_bytes=1000, workspace_bytes=10_000))
    ws.write("fits.bin", b"x" * 1000)
    with pytest.raises(QuotaExceeded, match="at most 1,000 bytes"):
        ws.write("big.bin", b"x" * 1001)
    with pytest.raises(QuotaExceeded, match="at most 1,000 bytes"):
        ws.write("big-stream.bin", io.BytesIO(b"x" * 1001))
    assert [f.path for f in ws.list()] == ["fits.bin"]


def test_the_workspace_total_quota_is_enforced(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "ws", Limits(file_bytes=1000, workspace_bytes=2500))
    ws.write("a.bin", b"a" * 1000)
    ws.write("b.bin", b"b" * 1000)
    with pytest.raises(QuotaExceeded, match="quota is 2,500 bytes"):
        ws.write("c.bin", b"c" * 600)
    with pytest.raises(QuotaExceeded, match="quota is 2,500 bytes"):
        ws.write("c.bin", io.BytesIO(b"c" * 600))
    assert ws.usage() == 2000 and not ws.exists("c.bin")
    ws.write("a.bin", b"A" * 1000)  # replacing a file counts its new size only
    ws.write("c.bin", b"c" * 500)
    assert ws.usage() == 2500
    ws.delete("b.bin")
    ws.write("d.bin", io.BytesIO(b"d" * 1000))
    assert ws.usage() == 2500


def test_a_refused_streamed_write_leaves_no_partial_file(tmp_path: Path) -> None:
    # the first chunk fits and is written before the second one breaks the quota
    ws = Workspace(tmp_path / "ws", Limits(file_bytes=CHUNK + CHUNK // 2, workspace_bytes=10 * CHUNK))
    ws.write("other.txt", b"unrelated")
    with pytest.raises(QuotaExceeded):
        ws.write("upload/huge.bin", io.BytesIO(b"z" * (2 * CHUNK)))
    assert not ws.exists("upload/huge.bin")
    assert [f.path for f in ws.list()] == ["other.txt"]

    ws = Workspace(tmp_path / "ws2", Limits(file_bytes=10 * CHUNK, workspace_bytes=CHUNK + 100))
    with pytest.raises(QuotaExceeded, match="quota"):
        ws.write("huge.bin", io.BytesIO(b"z" * (2 * CHUNK)))
    assert ws.list() == [] and ws.usage() == 0


# -- ownership --------------------------------------------------------------------------------
def test_files_and_folders_belong_to_the_given_owner(tmp_path: Path) -> None:
    # As root, jupybox hands files to the kernel's unprivileged user; as anyone else it can only
    # give them to itself, which exercises the same code.
    owner = (4321, 8765) if os.geteuid() == 0 else (os.getuid(), os.getgid())
    ws = Workspace(tmp_path / "ws", Limits(), owner=owner)
    ws.write("results/table.csv", b"a,b\n")
    ws.write("stream.bin", io.BytesIO(b"x" * 10))
    for path in (ws.root, ws.root / "results", ws.root / "results" / "table.csv", ws.root / "stream.bin"):
        st = path.stat()
        assert (st.st_uid, st.st_gid) == owner, path
    assert stat.S_IMODE((ws.root / "results" / "table.csv").stat().st_mode) & 0o600 == 0o600


def test_a_refused_replacement_keeps_the_previous_file(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "ws", Limits(file_bytes=3 * CHUNK, workspace_bytes=3 * CHUNK))
    ws.write("data.csv", b"a,b\n1,2\n")
    with pytest.raises(QuotaExceeded):
        ws.write("data.csv", io.BytesIO(b"x" * (4 * CHUNK)))
    assert ws.read("data.csv") == b"a,b\n1,2\n"
    assert [f.path for f in ws.list()] == ["data.csv"]  # no temporary file left


def test_a_deep_tree_made_by_the_sandbox_lists_without_recursion_errors(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "ws", Limits())
    (ws.root / "/".join(["d"] * 40)).mkdir(parents=True)
    (ws.root / "/".join(["d"] * 40) / "leaf.txt").write_text("x")
    fds = [os.open(ws.root, os.O_RDONLY)]
    for _ in range(1100):  # deeper than Python's recursion limit, as hostile code can make it
        os.mkdir("e", dir_fd=fds[-1])
        fds.append(os.open("e", os.O_RDONLY, dir_fd=fds[-1]))
    os.close(os.open("deep.txt", os.O_CREAT | os.O_WRONLY, dir_fd=fds[-1]))
    # listed iteratively; past MAX_DEPTH (64) levels nothing more is read
    try:
        assert [f.path for f in ws.list()] == ["/".join(["d"] * 40) + "/leaf.txt"]
        ws.write("new.txt", b"ok")  # writes (which measure usage) still work
    finally:  # remove the tree bottom-up without recursion (pytest's own cleanup would recurse)
        os.unlink("deep.txt", dir_fd=fds[-1])
        while len(fds) > 1:
            os.close(fds.pop())
            os.rmdir("e", dir_fd=fds[-1])
        os.close(fds[0])


def test_remove_tree_handles_depth_and_symlinks(tmp_path: Path, outside: Path) -> None:
    from sandbox.workspace import remove_tree

    before = digest(outside / "secret.txt")
    root = tmp_path / "session"
    root.mkdir()
    os.symlink(outside, root / "link")  # must be removed, not followed
    fds = [os.open(root, os.O_RDONLY)]
    for _ in range(1100):
        os.mkdir("e", dir_fd=fds[-1])
        fds.append(os.open("e", os.O_RDONLY, dir_fd=fds[-1]))
    os.close(os.open("f.txt", os.O_CREAT | os.O_WRONLY, dir_fd=fds[-1]))
    for fd in fds:
        os.close(fd)
    remove_tree(root)
    assert not root.exists() and digest(outside / "secret.txt") == before
