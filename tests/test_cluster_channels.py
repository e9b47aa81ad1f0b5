"""The direct data path of the cluster backend, refusals first: a node's relay exposes a real
kernel's channels over TCP with CurveZMQ, and only the server's key, from the server's address,
gets through. Real kernel (the docker backend), real ZMQ on loopback, jupyter_client's own client."""

from __future__ import annotations

import asyncio
import queue
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import zmq
import zmq.asyncio

from sandbox import SandboxError, SessionManager
from sandbox.cluster.channels import KeyPair, NodeRelays
from sandbox.kernel import KernelClient, OutputCollector, RawResult
from sandbox.session import Session

LOOPBACK = "127.0.0.1"


@pytest.fixture
async def kernel(docker_manager: SessionManager) -> AsyncIterator[Session]:
    session = await docker_manager.create()
    yield session
    await docker_manager.close(session.id)


@pytest.fixture
async def node(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[NodeRelays, KeyPair]]:
    monkeypatch.setenv("JUPYBOX_RELAY_PORTS", "47600-47699")
    server = KeyPair.new()
    relays = NodeRelays(LOOPBACK, KeyPair.new(), server.public, LOOPBACK)
    yield relays, server
    relays.shutdown()


def client_for(info: dict[str, Any], keys: KeyPair | None, server_key: str | None = None) -> KernelClient:
    curve = None if keys is None else (keys.public, keys.secret, (server_key or info["server_key"]).encode())
    return KernelClient(info, curve)


async def run(client: KernelClient, code: str) -> RawResult:
    raw = RawResult()

    async def alive() -> bool:
        return True

    msg_id = client.send_execute(code)
    await client.collect(msg_id, OutputCollector(raw, 1 << 20, 0, 0, None), time.monotonic() + 30, alive)
    return raw


async def test_the_servers_key_reaches_the_kernel_and_the_ports_close_with_the_session(
        kernel: Session, node: tuple[NodeRelays, KeyPair]) -> None:
    relays, server = node
    info = await relays.open(kernel.id, kernel.connection or {})
    assert info["transport"] == "tcp" and info["ip"] == LOOPBACK
    ports = [info[f"{c}_port"] for c in ("shell", "control", "stdin", "iopub")]
    assert all(47600 <= p <= 47699 for p in ports)
    client = client_for(info, server)
    await client.connect(30)
    raw = await run(client, "print(6 * 7)")
    assert raw.done and raw.outputs[0].text == "42\n"
    client.close()
    relays.close(kernel.id)
    deadline = time.monotonic() + 10  # ZMQ's I/O thread lets go of them a moment after the close
    while listening := [p for p in ports if _listens(p)]:
        assert time.monotonic() < deadline, f"ports still open after the session ended: {listening}"
        await asyncio.sleep(0.05)


def _listens(port: int) -> bool:
    try:
        socket.create_connection((LOOPBACK, port), timeout=2).close()
    except ConnectionRefusedError:
        return False
    return True


@pytest.mark.parametrize("who", ["a wrong key", "the right key for the wrong node"])
async def test_a_client_without_the_servers_key_is_refused(
        who: str, kernel: Session, node: tuple[NodeRelays, KeyPair]) -> None:
    relays, server = node
    info = await relays.open(kernel.id, kernel.connection or {})
    if who == "a wrong key":  # a stranger's pair: the node refuses it in the handshake
        client = client_for(info, KeyPair.new())
    else:  # our pair, but expecting another node's key: the client refuses the node
        client = client_for(info, server, KeyPair.new().public.decode())
    with pytest.raises(SandboxError, match="did not answer"):
        await client.connect(3)
    client.close()
    if who == "a wrong key":
        assert relays.allow_list.refused > 0


async def test_no_key_and_plain_tcp_garbage_get_nothing_and_break_nothing(
        kernel: Session, node: tuple[NodeRelays, KeyPair]) -> None:
    relays, server = node
    info = await relays.open(kernel.id, kernel.connection or {})
    ctx = zmq.asyncio.Context()
    plain = ctx.socket(zmq.DEALER)  # a ZMQ client with no curve at all
    plain.linger = 0
    plain.connect(f"tcp://{LOOPBACK}:{info['shell_port']}")
    await plain.send_multipart([b"<IDS|MSG>", b"", b"{}", b"{}", b"{}", b"{}"])
    assert await plain.poll(1500) == 0
    plain.close()
    ctx.term()
    for port in (info["shell_port"], info["iopub_port"]):
        with socket.create_connection((LOOPBACK, port), timeout=2) as raw:
            raw.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(range(256)) * 64)
            raw.settimeout(2)
            with pytest.raises((TimeoutError, ConnectionResetError, OSError)):
                data = raw.recv(4096)
                assert data == b"" or b"kernel" not in data  # never a kernel's message
                raise ConnectionResetError  # the peer closed: refused too
    client = client_for(info, server)  # the relay still serves the server
    await client.connect(30)
    assert (await run(client, "1 + 1")).done
    client.close()


async def test_a_message_with_a_bad_signature_is_dropped_by_the_kernel(
        kernel: Session, node: tuple[NodeRelays, KeyPair]) -> None:
    relays, server = node
    info = await relays.open(kernel.id, kernel.connection or {})
    forged = client_for({**info, "key": "0" * 32}, server)  # through the relay, but without the kernel's key
    forged._client.start_channels(hb=False)
    deadline = time.monotonic() + 30
    while True:  # sent once the relay's handshake is through
        try:
            forged._client.execute("open('/mnt/data/forged', 'w').write('x')")
            break
        except zmq.Again:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
    with pytest.raises(queue.Empty):  # no reply: the kernel dropped the message
        await forged._client.get_shell_msg(timeout=3)
    forged.close()
    client = client_for(info, server)  # the same relay, the kernel's own key: answered
    await client.connect(30)
    assert (await run(client, "import os; print(os.path.exists('/mnt/data/forged'))")).outputs[0].text == "False\n"
    client.close()


async def test_a_connection_from_another_address_is_refused(kernel: Session, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JUPYBOX_RELAY_PORTS", "47700-47799")
    server = KeyPair.new()
    relays = NodeRelays(LOOPBACK, KeyPair.new(), server.public, "10.255.255.1")  # the server is elsewhere
    try:
        info = await relays.open(kernel.id, kernel.connection or {})
        client = client_for(info, server)  # the right key, from the wrong address
        with pytest.raises(SandboxError, match="did not answer"):
            await client.connect(3)
        client.close()
    finally:
        relays.shutdown()
