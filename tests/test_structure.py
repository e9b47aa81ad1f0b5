"""The drawn structure holds: imports between jupybox's modules go down the floors and never in a
circle, a package's modules never import their own package root, and test modules never import
each other. Read from the source with ``ast``, so imports inside functions count as much as those
at the top (an import deferred to call time is still a dependency), and the rules apply to whatever
modules exist: moving a file keeps them checked.

The floors, lowest first:

* ``store``: records on disk; imports none of the others.
* ``sandbox`` and ``interpreter``: ``sandbox`` runs kernels and knows nothing of models;
  ``interpreter`` may use ``sandbox`` (a session, its data types), never the other way round.
* ``ui`` (front ends) and ``bench`` (benchmarks) beside each other, above both. ``bench`` never
  imports ``ui``; of ``ui`` only the command line (``ui.cli``, which offers ``jupybox bench``)
  imports ``bench``.

No package module imports ``tests``. Imports guarded by ``if TYPE_CHECKING:`` count too: a type
named across a circle is the same knowledge of each other as an import that runs.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("store", "sandbox", "interpreter", "ui", "bench")
# package -> the packages its modules may import (besides its own)
MAY_IMPORT: dict[str, frozenset[str]] = {
    "store": frozenset(),
    "sandbox": frozenset({"store"}),
    "interpreter": frozenset({"store", "sandbox"}),
    "ui": frozenset({"store", "sandbox", "interpreter"}),
    "bench": frozenset({"store", "sandbox", "interpreter"}),
}
# module -> further packages it may import: the command line names every runnable thing
ENTRY_POINTS: dict[str, frozenset[str]] = {"ui.cli": frozenset({"bench"})}
SHARED_TEST_CODE = "tests.support"


@dataclass(frozen=True)
class Import:
    """One import statement's target, resolved to a module of the tree where it names one."""

    source: str  # the importing module, dotted
    target: str  # the imported module (or the nearest package whose name it starts with)
    path: str  # the importing file, relative to the tree's root
    line: int
    type_checking: bool  # under ``if TYPE_CHECKING:``: never runs

    def __str__(self) -> str:
        return f"{self.source} -> {self.target} ({self.path}:{self.line})"


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules_of(folders: Iterable[str], root: Path = ROOT) -> dict[str, Path]:
    """Every module under the given top-level folders that exist, by dotted name."""
    found: dict[str, Path] = {}
    for folder in folders:
        for path in sorted((root / folder).rglob("*.py")) if (root / folder).is_dir() else ():
            found[module_name(path, root)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _statements(tree: ast.AST, guarded: bool = False) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement, anywhere (functions included), with whether TYPE_CHECKING guards it."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, guarded
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                yield from _statements(ast.Module(body=[child], type_ignores=[]), True)
            for child in node.orelse:
                yield from _statements(ast.Module(body=[child], type_ignores=[]), guarded)
        else:
            yield from _statements(node, guarded)


def imports_of(name: str, path: Path, known: set[str], root: Path = ROOT) -> list[Import]:
    """The imports of one module whose targets lie in ``known``'s top-level names; ``from P import x``
    points at ``P.x`` where that is a module, else at ``P``."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tops = {k.split(".")[0] for k in known}
    found: list[Import] = []
    for node, guarded in _statements(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif node.module == "conftest" and not node.level:  # pytest puts tests/ on the path
            targets = ["tests.conftest"]
        else:
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            targets = [f"{stem}.{a.name}" if f"{stem}.{a.name}" in known else stem for a in node.names]
        for target in dict.fromkeys(targets):
            if target.split(".")[0] not in tops:
                continue
            while target not in known and "." in target:
                target = target.rpartition(".")[0]
            found.append(Import(name, target, str(path.relative_to(root)), node.lineno, guarded))
    return found


def import_graph(folders: Iterable[str], root: Path = ROOT) -> list[Import]:
    mods = modules_of(folders, root)
    known = set(mods)
    return [imp for name, path in mods.items() for imp in imports_of(name, path, known, root)]


def cycles(edges: Iterable[Import]) -> list[list[Import]]:
    """One circle per strongly connected group of modules (Tarjan), each as the imports that close it."""
    graph: dict[str, dict[str, Import]] = {}
    for e in edges:
        if e.source != e.target:
            graph.setdefault(e.source, {}).setdefault(e.target, e)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    found = []
    for group in groups:
        start = min(group)
        path, seen = [start], {start: 0}
        while True:  # walk inside the group until a module repeats: that stretch is a circle
            step = next(w for w in sorted(graph[path[-1]]) if w in group)
            if step in seen:
                loop = path[seen[step]:] + [step]
                found.append([graph[a][b] for a, b in zip(loop, loop[1:])])
                break
            seen[step] = len(path)
            path.append(step)
    return found


def floor_violations(edges: Iterable[Import]) -> list[Import]:
    """Imports that go up or sideways against ``MAY_IMPORT``, and any package module importing ``tests``."""
    bad = []
    for e in edges:
        src, dst = e.source.split(".")[0], e.target.split(".")[0]
        if src == dst or src not in MAY_IMPORT:
            continue
        if dst not in MAY_IMPORT[src] | ENTRY_POINTS.get(e.source, frozenset()):
            bad.append(e)
    return bad


def own_root_imports(edges: Iterable[Import]) -> list[Import]:
    """A module importing a package that contains it: its own root, or a root above it."""
    return [e for e in edges if e.source != e.target and e.source.startswith(e.target + ".")]


def imports_of_test_code(edges: Iterable[Import]) -> list[Import]:
    """Imports of a module under ``tests/`` other than ``tests/support``, by anything."""
    return [e for e in edges if e.target.split(".")[0] == "tests" and e.target != "tests"
            and not (e.target == SHARED_TEST_CODE or e.target.startswith(SHARED_TEST_CODE + "."))]


def _edges(with_tests: bool = False) -> list[Import]:
    return import_graph(PACKAGES + (("tests",) if with_tests else ()))


def _render(found: list[Import]) -> str:
    return "\n".join(f"  {e}" for e in found)


def test_no_import_circle() -> None:
    found = cycles(_edges())
    assert not found, "import circles (each closes on its first module):\n" + "\n".join(
        " -> ".join([c[0].source] + [e.target for e in c]) + "\n" + _render(c) for c in found)


def test_imports_go_down_the_floors() -> None:
    found = floor_violations(_edges(with_tests=True))
    assert not found, "imports against the floors (store < sandbox < interpreter < ui | bench):\n" + _render(found)


def test_no_module_imports_its_own_package_root() -> None:
    found = own_root_imports(_edges())
    assert not found, ("modules importing their own package root (import the module that defines the name, "
                       "so the package's __init__ stays a list of exports):\n" + _render(found))


def test_test_modules_do_not_import_each_other() -> None:
    found = imports_of_test_code(_edges(with_tests=True))
    assert not found, ("imports of test modules or conftest (shared test code belongs in tests/support/, "
                       "fixtures in conftest.py):\n" + _render(found))


def _plant(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_each_rule_names_a_planted_offence(tmp_path: Path) -> None:
    """The checks above pass on a clean tree only if they can fail: each offence planted in a small
    tree of the same packages is found, named by its edge, and nothing clean is reported."""
    _plant(tmp_path, {
        "store/__init__.py": "",
        "store/records.py": "import sandbox.models\n",  # store is the lowest floor
        "sandbox/__init__.py": "from .models import Output\n",
        "sandbox/models.py": "class Output: ...\n",
        "sandbox/session.py": ("from typing import TYPE_CHECKING\nfrom .models import Output\n"
                               "if TYPE_CHECKING:\n    from .relay import Relay\n"),
        "sandbox/relay.py": "from .session import Output\n",  # closes through TYPE_CHECKING: a circle too
        "sandbox/backends/__init__.py": "",
        "sandbox/backends/docker.py": "def start():\n    from sandbox import Output\n",  # its own root
        "interpreter/__init__.py": "",
        "interpreter/loop.py": "from sandbox.session import Output\nfrom interpreter import events\nimport interpreter\n",
        "interpreter/events.py": "from . import loop\n",  # loop -> events -> loop
        "ui/__init__.py": "",
        "ui/cli.py": "def bench():\n    from bench import sandbox\n",  # the command line may
        "ui/web.py": "from bench.sandbox import run\n",  # another front end may not
        "bench/__init__.py": "",
        "bench/sandbox.py": "from ui.kernel_wire import x\nfrom tests.scripted_model import Model\n",
        "ui/kernel_wire.py": "x = 1\n",
        "tests/conftest.py": "",
        "tests/support/__init__.py": "",
        "tests/support/servers.py": "",
        "tests/scripted_model.py": "",
        "tests/test_a.py": "from tests.support.servers import x\nfrom tests.test_b import y\n",
        "tests/test_b.py": "from conftest import fixture\nfrom tests.conftest import other\n",
    })
    edges = import_graph(PACKAGES + ("tests",), tmp_path)
    seen = {(e.source, e.target) for e in edges}
    assert ("interpreter.loop", "sandbox.session") in seen and ("ui.cli", "bench.sandbox") in seen

    found = cycles(edges)
    assert sorted([(e.source, e.target) for e in c] for c in found) == [
        [("interpreter.events", "interpreter.loop"), ("interpreter.loop", "interpreter.events")],
        [("sandbox.relay", "sandbox.session"), ("sandbox.session", "sandbox.relay")]]
    assert any(e.type_checking for e in edges if (e.source, e.target) == ("sandbox.session", "sandbox.relay"))

    assert sorted((e.source, e.target) for e in floor_violations(edges)) == [
        ("bench.sandbox", "tests.scripted_model"), ("bench.sandbox", "ui.kernel_wire"),
        ("store.records", "sandbox.models"), ("ui.web", "bench.sandbox")]

    assert sorted((e.source, e.target) for e in own_root_imports(edges)) == [
        ("interpreter.loop", "interpreter"), ("sandbox.backends.docker", "sandbox")]
    docker = next(e for e in own_root_imports(edges) if e.source == "sandbox.backends.docker")
    assert str(docker) == f"sandbox.backends.docker -> sandbox ({Path('sandbox/backends/docker.py')}:2)"

    assert sorted((e.source, e.target) for e in imports_of_test_code(edges)) == [
        ("bench.sandbox", "tests.scripted_model"), ("tests.test_a", "tests.test_b"),
        ("tests.test_b", "tests.conftest"), ("tests.test_b", "tests.conftest")]  # both spellings
