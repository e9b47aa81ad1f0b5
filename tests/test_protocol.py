"""One session interface: the local ``Session`` and the cluster's ``ClusterSession`` both satisfy
``sandbox.protocol.SandboxSession`` (and their workspaces ``SessionFiles``), member by member and
signature by signature, so nothing above the sandbox needs to know which one it holds."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from sandbox import Limits, SandboxSettings
from sandbox.backends.docker import DockerBackend
from sandbox.cluster.link import SessionLink
from sandbox.cluster.session import ClusterSession
from sandbox.protocol import SandboxSession, SessionFiles
from sandbox.session import Session


def members(protocol: type) -> tuple[set[str], dict[str, Any]]:
    """The protocol's data members and its methods (properties included), by name."""
    data = set(protocol.__annotations__)
    methods = {name: value for name, value in vars(protocol).items()
               if not name.startswith("_") and (callable(value) or isinstance(value, property))}
    return data, methods


def shape(fn: Any) -> tuple[str, list[tuple[str, Any, Any]]]:
    """How a method is called: its kind (plain, coroutine, async iterator) and its parameters."""
    sig = inspect.signature(fn)
    if inspect.iscoroutinefunction(fn):
        kind = "async"
    elif inspect.isasyncgenfunction(fn) or "AsyncIterator" in str(sig.return_annotation):
        kind = "async iterator"
    else:
        kind = "plain"
    return kind, [(p.name, p.kind, p.default) for p in sig.parameters.values()]


def check(protocol: type, instance: Any) -> list[str]:
    """Every way ``instance`` falls short of ``protocol``, in words."""
    problems = []
    data, methods = members(protocol)
    for name in sorted(data):
        if not hasattr(instance, name):
            problems.append(f"{type(instance).__name__} has no attribute {name!r}")
    for name, wanted in methods.items():
        got = inspect.getattr_static(type(instance), name, None)
        if got is None:
            problems.append(f"{type(instance).__name__} has no {name!r}")
        elif isinstance(wanted, property) != isinstance(got, property):
            problems.append(f"{type(instance).__name__}.{name}: a property in one, not in the other")
        elif not isinstance(wanted, property) and shape(wanted) != shape(got):
            problems.append(f"{type(instance).__name__}.{name}: {shape(got)} where the protocol says {shape(wanted)}")
    return problems


def local_session(tmp_path: Path) -> Session:
    settings = SandboxSettings(backend="docker", home=tmp_path)
    return Session(DockerBackend(settings), settings, "owner", tmp_path / "s")


def cluster_session() -> ClusterSession:
    link = SessionLink(None, "s", "n", "id", lambda node_id, name: "")
    return ClusterSession(link, Limits(), SandboxSettings(backend="ray"), None, lambda session: None)


@pytest.mark.parametrize("make", ["local", "cluster"])
def test_both_sessions_and_their_workspaces_satisfy_the_one_protocol(make: str, tmp_path: Path) -> None:
    session = local_session(tmp_path) if make == "local" else cluster_session()
    assert check(SandboxSession, session) == []
    assert check(SessionFiles, session.workspace) == []


def test_the_check_sees_a_missing_member_and_a_changed_signature(tmp_path: Path) -> None:
    class Drifted:
        id = "x"

        async def execute(self, code: str) -> None: ...

        async def stream(self, code: str) -> AsyncIterator[Any]:
            yield None

    problems = check(SandboxSession, Drifted())
    assert any("no attribute 'limits'" in p for p in problems)
    assert any("Drifted.execute" in p for p in problems) and any("no 'restart'" in p for p in problems)
