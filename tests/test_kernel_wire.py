"""The kernels websocket's wire formats against Jupyter Server's own encoder and decoder, and
hostile frames refused with a sentence (no container needed)."""

from __future__ import annotations

import json
import struct

import pytest
from jupyter_client.session import Session
from jupyter_server.services.kernels.connection.base import (
    deserialize_binary_message,
    deserialize_msg_from_ws_v1,
    serialize_binary_message,
    serialize_msg_to_ws_v1,
)

from sandbox.kernel_wire import (MAX_BUFFERS, KernelMessage, WireError, decode_legacy_binary, decode_legacy_text,
                                 decode_v1, encode_legacy, encode_v1)

SESSION = Session(username="tests")


def _message() -> dict:
    return SESSION.msg("comm_msg", {"comm_id": "c1", "data": {"x": "ünïcode"}}, metadata={"m": 1})


def test_v1_frames_read_by_jupyter_server_and_back() -> None:
    msg = _message()
    ours = decode_v1(serialize_msg_to_ws_v1(msg, "shell", SESSION.pack))
    assert (ours.channel, ours.msg_type, ours.content, ours.metadata) == ("shell", "comm_msg", msg["content"], {"m": 1})
    back = KernelMessage("iopub", ours.header, {"msg_id": "p"}, {}, {"text": "ünï"}, [b"\x00\x01", b"buf"])
    channel, parts = deserialize_msg_from_ws_v1(encode_v1(back))
    assert channel == "iopub" and json.loads(parts[3]) == {"text": "ünï"} and parts[4:] == [b"\x00\x01", b"buf"]
    assert json.loads(parts[1]) == {"msg_id": "p"}


def test_legacy_text_and_binary_frames_read_by_jupyter_server_and_back() -> None:
    msg = _message()
    text = json.dumps({**msg, "channel": "control"}, default=str)
    assert decode_legacy_text(text).channel == "control"
    assert decode_legacy_text(json.dumps({"header": msg["header"]}, default=str)).channel == "shell"  # the default
    binary = serialize_binary_message({**json.loads(json.dumps(msg, default=str)), "channel": "shell",
                                       "buffers": [b"abc", memoryview(b"de")]})
    ours = decode_legacy_binary(binary)
    assert ours.buffers == [b"abc", b"de"] and ours.content == msg["content"]
    out = KernelMessage("iopub", {"msg_id": "m", "msg_type": "stream"}, content={"text": "hi"}, buffers=[b"xyz"])
    theirs = deserialize_binary_message(encode_legacy(out))
    assert theirs["channel"] == "iopub" and theirs["buffers"] == [b"xyz"] and theirs["content"] == {"text": "hi"}
    assert json.loads(encode_legacy(KernelMessage("iopub", {"msg_id": "m", "msg_type": "status"})))["msg_type"] == "status"


def _v1(n: int, offsets: list[int], tail: bytes = b"") -> bytes:
    return struct.pack(f"<{len(offsets) + 1}Q", n, *offsets) + tail


@pytest.mark.parametrize(("frame", "says"), [
    (b"\x01", "too short"),
    (_v1(3, [32, 33, 34]), "6 to"),
    (_v1(7 + MAX_BUFFERS, [0] * 8), "6 to"),
    (_v1(6, [56, 57, 60, 59, 61, 62], b"s" * 6), "offsets"),  # decreasing
    (_v1(6, [56, 57, 59, 61, 63, 999], b"s" * 8), "offsets"),  # past the end
    (_v1(6, [48, 57, 59, 61, 63, 65], b"s" * 8), "offsets"),  # does not start after the table
    (_v1(6, [56, 61, 63, 65, 67, 69], b"shell" + b"{}" * 3 + b"[]"), "not a JSON object"),
    (_v1(6, [56, 61, 63, 65, 67, 70], b"shell" + b"{}" * 3 + b"NaN"), "not valid JSON"),
    (_v1(6, [56, 58, 60, 62, 64, 66], b"\xff\xfe" + b"{}" * 4), "UTF-8"),
])
def test_hostile_v1_frames_are_refused_with_a_reason(frame: bytes, says: str) -> None:
    with pytest.raises(WireError, match=says):
        decode_v1(frame)


@pytest.mark.parametrize(("text", "says"), [
    ("[1]", "not a JSON object"), ("{", "not valid JSON"), ('{"header": 1}', "header"),
    ('{"header": {}, "channel": 5}', "channel"), ('{"header": {}, "content": []}', "content"),
    ("[" * 100_000, "not valid JSON"),
])
def test_hostile_legacy_frames_are_refused_with_a_reason(text: str, says: str) -> None:
    with pytest.raises(WireError, match=says):
        decode_legacy_text(text)
    with pytest.raises(WireError):
        decode_legacy_binary(struct.pack("!2I", 1, 99) + text.encode())
