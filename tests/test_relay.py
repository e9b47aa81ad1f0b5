"""The session's raw-message relay (what the Jupyter kernels API stands on), on the real docker
sandbox: it shares a kernel with the JSON API without either losing messages, drops what a hostile
kernel forges, refuses what a client may not send, and ends with its kernel."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from sandbox import KernelMessage, KernelMessageRefused, KernelRelay, SessionManager
from sandbox.config import KernelWatch


def request(msg_type: str, content: dict, channel: str = "shell") -> KernelMessage:
    header = {"msg_id": uuid.uuid4().hex, "msg_type": msg_type, "session": "tests", "username": "tests",
              "version": "5.3", "date": "2026-01-01T00:00:00.000000Z"}
    return KernelMessage(channel, header, content=content)


async def replies_to(relay: KernelRelay, msg: KernelMessage) -> list[KernelMessage]:
    """The relay's messages for ``msg`` up to its execute reply and its idle."""
    seen, replied, idle = [], False, False
    while not (replied and idle):
        m = await relay.receive()
        assert m is not None, relay.end_reason
        if m.parent_id == msg.msg_id:
            seen.append(m)
            replied = replied or m.msg_type == "execute_reply"
            idle = idle or (m.msg_type == "status" and m.content.get("execution_state") == "idle")
    return seen


def execute(code: str) -> KernelMessage:
    return request("execute_request", {"code": code, "silent": False, "store_history": True,
                                       "user_expressions": {}, "allow_stdin": False})


async def test_a_relay_and_the_json_api_share_a_kernel(docker_manager: SessionManager) -> None:
    session = await docker_manager.create()
    relay = await session.attach()
    slow = execute("import time\ntime.sleep(0.5)\nprint('from the notebook')")
    await relay.send(slow)
    assert session.busy  # a notebook's running cell keeps the idle reaper away
    ex = await session.execute("print('from the API')")  # queued in the kernel behind the cell
    assert ex.ok and ex.stdout == "from the API\n"
    seen = await replies_to(relay, slow)
    assert [m.content["text"] for m in seen if m.msg_type == "stream"] == ["from the notebook\n"]
    assert not relay.running and not session.busy
    await docker_manager.close(session.id)
    assert relay.closed and relay.ended_by == "close"
    while await relay.receive() is not None:  # what was queued, then the end
        pass


async def test_a_request_on_a_channel_that_never_answers_does_not_keep_the_session_in_use(
        docker_manager: SessionManager) -> None:
    """An execute request sent on stdin is never answered: counted as running, it kept the idle
    reaper away from the session for ever."""
    session = await docker_manager.create()
    relay = await session.attach()
    try:
        for channel in ("stdin", "control"):
            await relay.send(request("execute_request", {"code": "1", "silent": False}, channel=channel))
        await relay.send(request("shutdown_request", {"restart": False}, channel="stdin"))
        assert not relay.running and not session.busy
        ex = await session.execute("print('still here')")  # the kernel was not shut down
        assert ex.ok and ex.stdout == "still here\n"
    finally:
        await docker_manager.close(session.id)


async def test_a_kernel_that_outlives_a_shutdown_request_is_replaced(
        docker_manager: SessionManager, monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel that answers a client's shutdown request but never exits (ipykernel can hang on
    its way out; here an exit hook sleeps) is replaced once the grace has passed, as Jupyter's own
    kernel manager kills such a kernel: the client is told ``autorestarting``, the old container is
    removed and the session runs a fresh kernel."""
    import docker

    monkeypatch.setattr(docker_manager.settings, "kernel_watch", KernelWatch(shutdown_grace_s=1.0))
    session = await docker_manager.create()
    old = session._handle.ref.id
    relay = await session.attach()
    stuck = execute("import atexit, time\natexit.register(time.sleep, 600)")  # never gets out
    await relay.send(stuck)
    await replies_to(relay, stuck)
    await relay.send(request("shutdown_request", {"restart": False}, channel="control"))
    states, replies = [], []
    while (m := await asyncio.wait_for(relay.receive(), 30)) is not None:
        replies += [m.msg_type] if m.msg_type == "shutdown_reply" else []
        if m.msg_type == "status":
            states.append(m.content["execution_state"])
    assert replies, states  # the kernel answered (on control, and ipykernel also on iopub), then did not exit
    assert states[-1] == "autorestarting" and relay.ended_by == "restart", (states, relay.end_reason)
    assert relay.end_reason == "the kernel was shut down as asked; a fresh one was started"
    await session.supervisor.settled()  # the kernel is replaced in the background
    with pytest.raises(docker.errors.NotFound):
        docker.from_env().containers.get(old)
    ex = await session.execute("print(6 * 7)")  # the fresh kernel
    assert ex.ok and ex.stdout == "42\n"
    await docker_manager.close(session.id)


async def test_idle_connections_share_their_looks_at_the_kernel_and_still_see_it_die(
        docker_manager: SessionManager, monkeypatch: pytest.MonkeyPatch) -> None:
    """Twelve notebook connections to one session, idle for 2 s with a look due every 0.5 s, cost
    the backend one look per round in all (each asking alone: 48), and when the kernel exits they
    all end with it and the session restarts its kernel once."""
    monkeypatch.setattr(docker_manager.settings, "kernel_watch", KernelWatch(check_s=0.1, idle_check_s=0.5))
    session = await docker_manager.create()
    relays = [await session.attach() for _ in range(12)]
    looks: list[float] = []
    starts: list[object] = []
    is_alive, start = session.backend.is_alive, session.backend.start

    async def counted(handle):  # type: ignore[no-untyped-def]
        looks.append(asyncio.get_running_loop().time())
        return await is_alive(handle)

    async def counted_start(spec):  # type: ignore[no-untyped-def]
        starts.append(spec)
        return await start(spec)

    monkeypatch.setattr(session.backend, "is_alive", counted)
    monkeypatch.setattr(session.backend, "start", counted_start)
    generation = session.supervisor.generation
    await asyncio.sleep(2)
    assert 2 <= len(looks) <= 6, looks
    assert not any(r.closed for r in relays)
    exits = execute("import os, threading\nthreading.Timer(0.3, os._exit, (0,)).start()")
    await relays[0].send(exits)
    for relay in relays:
        while await asyncio.wait_for(relay.receive(), 30) is not None:
            pass
    assert all(r.ended_by == "restart" for r in relays), [(r.ended_by, r.end_reason) for r in relays]
    await session.supervisor.settled()
    assert len(starts) == 1 and session.supervisor.generation == generation + 1  # every connection saw it; one new kernel
    ex = await session.execute("print(6 * 7)")  # the fresh kernel
    assert ex.ok and ex.stdout == "42\n"
    await docker_manager.close(session.id)


async def test_a_killed_kernel_is_replaced_once_however_many_notice_it(
        docker_manager: SessionManager, monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel killed in the middle of an execution, with notebook clients attached: the execution
    sees it die (``crashed``), the clients' liveness watch sees it too, and the session still gets
    exactly one new kernel (generation + 1), whoever asked first. Asking again for a generation
    already replaced replaces nothing."""
    import docker

    from sandbox.supervisor import DIED

    monkeypatch.setattr(docker_manager.settings, "kernel_watch",
                        KernelWatch(check_s=0.05, idle_check_s=0.05, recheck_s=0.05))
    session = await docker_manager.create()
    sup = session.supervisor
    starts: list[object] = []
    start = session.backend.start

    async def counted_start(spec):  # type: ignore[no-untyped-def]
        starts.append(spec)
        return await start(spec)

    monkeypatch.setattr(session.backend, "start", counted_start)
    relays = [await session.attach() for _ in range(3)]
    generation = sup.generation
    started = asyncio.Event()
    running = asyncio.create_task(session.execute("import time\nprint('started', flush=True)\ntime.sleep(60)",
                                                  timeout=120, on_output=lambda out: started.set()))
    await asyncio.wait_for(started.wait(), 30)
    await asyncio.to_thread(lambda: docker.from_env().containers.get(sup.handle.ref.id).kill())
    ex = await asyncio.wait_for(running, 60)
    assert ex.status == "crashed", ex.text()
    for relay in relays:
        while await asyncio.wait_for(relay.receive(), 30) is not None:
            pass
    assert all(r.ended_by == "restart" for r in relays), [(r.ended_by, r.end_reason) for r in relays]
    await sup.settled()
    ex = await session.execute("print(6 * 7)")
    assert ex.ok and ex.stdout == "42\n"
    assert sup.generation == generation + 1 and len(starts) == 1, (sup.generation, generation, len(starts))
    assert await asyncio.gather(sup.replace(generation, DIED), sup.replace(generation, DIED)) == [False, False]
    both = await asyncio.gather(sup.replace(sup.generation, DIED), sup.replace(sup.generation, DIED))
    assert sorted(both) == [False, True] and sup.generation == generation + 2 and len(starts) == 2
    await docker_manager.close(session.id)


async def test_what_a_hostile_kernel_forges_is_dropped(docker_manager: SessionManager) -> None:
    session = await docker_manager.create()
    relay = await session.attach()
    forge = execute(
        "import hmac, hashlib, json\n"
        "k = get_ipython().kernel\n"
        "parent = json.dumps(k.get_parent('shell')['header'], default=str).encode()\n"
        "def signed(content):\n"
        "    parts = [json.dumps({'msg_id': 'f', 'msg_type': 'stream', 'session': 'k'}).encode(), parent, b'{}', content]\n"
        "    sig = hmac.new(k.session.key, b''.join(parts), hashlib.sha256).hexdigest().encode()\n"
        "    return [b'stream', b'<IDS|MSG>', sig, *parts]\n"
        "k.iopub_socket.send_multipart([b'stream', b'<IDS|MSG>', b'0' * 64, b'{}', parent, b'{}', b'{}'])\n"
        "k.iopub_socket.send_multipart(signed(b'[1, 2]'))\n"
        "k.iopub_socket.send_multipart(signed(b'{\"name\": \"stdout\", \"text\": NaN}'))\n"
        "k.iopub_socket.send_multipart(signed(b'{\"name\": \"stdout\", \"text\": \"signed and sound\\\\n\"}'))\n")
    await relay.send(forge)
    seen = await replies_to(relay, forge)
    assert [m.content["text"] for m in seen if m.msg_type == "stream"] == ["signed and sound\n"]
    assert relay.dropped_messages == 3
    await docker_manager.close(session.id)


async def test_a_client_cannot_send_what_it_should_not(docker_manager: SessionManager) -> None:
    session = await docker_manager.create()
    relay = await session.attach(allow_stdin=False)
    bad = [request("stream", {}, channel="iopub"), request("execute_request", {}, channel="hb"),
           KernelMessage("shell", {"msg_type": "execute_request"}),
           KernelMessage("shell", {"msg_id": "x" * 300, "msg_type": "kernel_info_request", "session": "s"}),
           KernelMessage("shell", request("kernel_info_request", {}).header, content=[]),  # type: ignore[arg-type]
           KernelMessage("shell", request("kernel_info_request", {}).header, buffers=[b""] * 65),
           request("execute_request", {"code": "x", "n": float("nan")})]
    for msg in bad:
        with pytest.raises(KernelMessageRefused):
            await relay.send(msg)
    asks = execute("input('name? ')")
    asks.content["allow_stdin"] = True  # this relay was opened without stdin: input() fails at once
    await relay.send(asks)
    seen = await replies_to(relay, asks)
    assert any(m.msg_type == "error" and "StdinNotImplementedError" in m.content["ename"] for m in seen)
    await session.restart()  # a fresh kernel: this relay's client must reconnect
    assert relay.closed and relay.ended_by == "restart"
    await docker_manager.close(session.id)
