"""Jupyter kernel messages as a client sends and receives them: the message model, strict JSON,
and the two wire formats of Jupyter Server's kernel channels websocket.

* ``v1.kernel.websocket.jupyter.org``, chosen by subprotocol (current JupyterLab and VS Code): each
  message is one binary frame: a little-endian uint64 count ``n`` of offsets, ``n`` uint64 offsets,
  then the parts, each running from its offset to the next: the channel name, the header, parent
  header, metadata and content (JSON), then the binary buffers. The last offset is the frame's end.
* legacy, without a subprotocol (what Jupyter Server's gateway client speaks): a text frame holding
  the message as one JSON object with a ``channel`` key (absent means shell); a message with binary
  buffers is a binary frame: a big-endian uint32 count ``n``, ``n`` uint32 offsets, the JSON, then
  the buffers.

Decoding is strict: offsets must lie inside the frame and never decrease, the parts must be JSON
objects (no NaN or Infinity, which browsers cannot parse); anything else is a ``WireError`` whose
message can be the websocket's close reason. The relay (``sandbox/relay.py``) decodes every
client frame here, once, and reads the kernel's JSON parts with the same ``loads_object``.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import KernelMessageRefused

V1_PROTOCOL = "v1.kernel.websocket.jupyter.org"
WireFormat = Literal["v1", "legacy"]  # the websocket's format: v1 when the client chose the subprotocol
PARTS = ("header", "parent_header", "metadata", "content")
MAX_BUFFERS = 64  # binary buffers one message may carry


@dataclass
class KernelMessage:
    """One Jupyter message, unsigned: what a client sends or receives on ``channel``."""

    channel: str  # shell | control | stdin | iopub
    header: dict[str, Any]
    parent_header: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    content: dict[str, Any] = field(default_factory=dict)
    buffers: list[bytes] = field(default_factory=list)
    wire_bytes: int = field(default=0, repr=False, compare=False)  # its size as the kernel sent it

    @property
    def msg_type(self) -> str:
        return str(self.header.get("msg_type", ""))

    @property
    def msg_id(self) -> str:
        return str(self.header.get("msg_id", ""))

    @property
    def parent_id(self) -> str:
        return str(self.parent_header.get("msg_id", ""))


class WireError(KernelMessageRefused):
    """A frame is not a kernel message in the connection's format (bad offsets, a part that is
    not a strict JSON object)."""


def _reject_constant(name: str) -> Any:
    raise WireError(f"{name} is not JSON")


def loads_object(raw: bytes | memoryview | str, what: str) -> dict[str, Any]:
    """Strict JSON (no NaN/Infinity) that must be an object; ``WireError`` otherwise."""
    try:
        value = json.loads(bytes(raw) if isinstance(raw, memoryview) else raw, parse_constant=_reject_constant)
    except WireError:
        raise WireError(f"the {what} is not valid JSON") from None
    except (ValueError, RecursionError) as exc:
        raise WireError(f"the {what} is not valid JSON") from exc
    if not isinstance(value, dict):
        raise WireError(f"the {what} is not a JSON object")
    return value


def dumps(value: Any) -> str:
    """Compact strict JSON; ``ValueError`` for NaN or Infinity, ``TypeError`` for what is not JSON."""
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def _offsets(frame: bytes, width: int, order: str, count: int) -> list[int]:
    """``count`` offsets after the count field, checked: inside the frame, never decreasing."""
    fmt = f"{order}{count}{'Q' if width == 8 else 'I'}"
    if len(frame) < width * (count + 1):
        raise WireError("the frame is shorter than its offset table")
    offsets = list(struct.unpack_from(fmt, frame, width))
    if offsets[0] != width * (count + 1) or any(b < a for a, b in zip(offsets, offsets[1:])) or offsets[-1] > len(frame):
        raise WireError("the frame's offsets do not describe its parts")
    return offsets


def decode(frame: bytes | str, wire: WireFormat) -> KernelMessage:
    """A websocket frame (``bytes`` for a binary frame, ``str`` for a text one) in the connection's format."""
    if wire == "v1":
        if not isinstance(frame, bytes):
            raise WireError("the v1 kernel protocol sends binary frames only")
        return decode_v1(frame)
    return decode_legacy_binary(frame) if isinstance(frame, bytes) else decode_legacy_text(frame)


def encode(msg: KernelMessage, wire: WireFormat) -> bytes | str:
    return encode_v1(msg) if wire == "v1" else encode_legacy(msg)


# -- v1 ----------------------------------------------------------------------------------------
def decode_v1(frame: bytes) -> KernelMessage:
    if len(frame) < 8:
        raise WireError("the frame is too short for the v1 kernel protocol")
    n = int.from_bytes(frame[:8], "little")
    if not 6 <= n <= 6 + MAX_BUFFERS:
        raise WireError(f"a v1 frame has 6 to {6 + MAX_BUFFERS} offsets, this one says {n}")
    offsets = _offsets(frame, 8, "<", n)
    chunks = [frame[a:b] for a, b in zip(offsets, offsets[1:])]
    try:
        channel = chunks[0].decode()
    except UnicodeDecodeError as exc:
        raise WireError("the channel name is not UTF-8") from exc
    parts = [loads_object(c, what) for c, what in zip(chunks[1:5], PARTS)]
    return KernelMessage(channel, *parts, buffers=chunks[5:])


def encode_v1(msg: KernelMessage) -> bytes:
    chunks = [msg.channel.encode(), *(dumps(getattr(msg, p)).encode() for p in PARTS), *msg.buffers]
    n = len(chunks) + 1
    offsets = [8 * (n + 1)]
    for c in chunks:
        offsets.append(offsets[-1] + len(c))
    return b"".join([struct.pack(f"<{n + 1}Q", n, *offsets), *chunks])


# -- legacy ------------------------------------------------------------------------------------
def _from_dict(value: dict[str, Any], buffers: list[bytes]) -> KernelMessage:
    channel = value.get("channel", "shell")
    if not isinstance(channel, str):
        raise WireError("the message's channel is not a string")
    parts = []
    for p in PARTS:
        part = value.get(p, {} if p != "header" else None)
        if not isinstance(part, dict):
            raise WireError(f"the message's {p} is missing or not a JSON object")
        parts.append(part)
    return KernelMessage(channel, *parts, buffers=buffers)


def decode_legacy_text(text: str) -> KernelMessage:
    return _from_dict(loads_object(text, "message"), [])


def decode_legacy_binary(frame: bytes) -> KernelMessage:
    if len(frame) < 4:
        raise WireError("the frame is too short for a binary kernel message")
    n = struct.unpack_from("!I", frame)[0]
    if not 1 <= n <= 1 + MAX_BUFFERS:
        raise WireError(f"a binary message has 1 to {1 + MAX_BUFFERS} parts, this one says {n}")
    offsets = _offsets(frame, 4, "!", n) + [len(frame)]
    chunks = [frame[a:b] for a, b in zip(offsets, offsets[1:])]
    return _from_dict(loads_object(chunks[0], "message"), chunks[1:])


def encode_legacy(msg: KernelMessage) -> str | bytes:
    body = {"channel": msg.channel, "msg_id": msg.msg_id, "msg_type": msg.msg_type, "buffers": [],
            **{p: getattr(msg, p) for p in PARTS}}
    text = dumps(body)
    if not msg.buffers:
        return text
    chunks = [text.encode(), *msg.buffers]
    offsets = [4 * (len(chunks) + 1)]
    for c in chunks[:-1]:
        offsets.append(offsets[-1] + len(c))
    return b"".join([struct.pack(f"!{len(chunks) + 1}I", len(chunks), *offsets), *chunks])
