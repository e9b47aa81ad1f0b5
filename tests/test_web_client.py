"""The UI's named API endpoints, driven with ``gradio_client`` against the real server on
loopback: what a script (or the browser) can do, each call in the caller's own session."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx

import nbformat
from gradio_client import Client, handle_file

from bench.scripted_model import last_observation
from tests.support.replies import fenced
from tests.support.server import EXAMPLE_CSV, WebServer


def chat_text(history: list[dict]) -> str:
    parts = []
    for message in history:
        content = message["content"] if isinstance(message["content"], list) else [message["content"]]
        parts += [c.get("text", "") if isinstance(c, dict) else str(c) for c in content]
    return "\n".join(parts)


def test_api_upload_ask_files_notebook_and_new_session(web_server: WebServer) -> None:
    client = Client(web_server.url, verbose=False)
    endpoints = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert {"/ask", "/upload", "/stop", "/new_session", "/files", "/notebook"} <= endpoints

    files, notice = client.predict([handle_file(str(EXAMPLE_CSV))], "fenced", api_name="/upload")
    assert [Path(f).name for f in files] == ["sales.csv"] and "announced" in notice

    web_server.model.enqueue(
        fenced("import pandas as pd\ndf = pd.read_csv('sales.csv')\nprint(len(df), df.units.sum())"),
        lambda body: "销售表共有 {} 行，总销量 {} 件。".format(*last_observation(body).split()))
    job = client.submit({"text": "表里有多少行？总销量是多少？", "files": []}, "scripted-model", "fenced", 0.0, 6, 30,
                        api_name="/ask")
    streamed = [out for out in job]  # every repaint of the chat, the last one the finished turn
    history, box, files = streamed[-1]
    rows = EXAMPLE_CSV.read_text().strip().splitlines()[1:]
    units = sum(int(r.split(",")[5]) for r in rows)
    text = chat_text(history)
    assert f"销售表共有 {len(rows)} 行，总销量 {units} 件。" in text
    assert "pd.read_csv('sales.csv')" in text
    assert "sales.csv" in json.dumps(web_server.model.history[-2], ensure_ascii=False)  # announced
    metrics = httpx.get(web_server.url + "metrics", timeout=30).text  # the page's turns are counted too
    assert re.search(r'^jupybox_chat_turns_total\{outcome="answer",source="web"\} [1-9]', metrics, re.M), metrics
    assert re.search(r'^jupybox_model_tokens_total\{kind="completion"\} [1-9]', metrics, re.M)

    notebook_path = client.predict(api_name="/notebook")
    nb = nbformat.read(notebook_path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code[0].outputs[0]["text"] == f"{len(rows)} {units}\n"

    assert [Path(f).name for f in client.predict(api_name="/files")] == ["sales.csv"]
    history, files, notice = client.predict(api_name="/new_session")
    assert history == [] and files == [] and "New session" in notice
    assert client.predict(api_name="/files") in ([], None)
    assert client.predict(api_name="/stop") == "Nothing is running."
