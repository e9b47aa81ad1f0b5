"""The default model's path end to end, as a server runs it: ``Qwen/Qwen-7B-Chat-Int4`` found in a
local Hugging Face cache (made here, under a temporary ``HF_HOME``), loaded by the transformers
backend on jupybox's own decoder and tokenizer, its checkpoint's Python files never run. Figures,
never assertions.

    python -m bench.default_model [--shape tiny,7b] [--tokens 512] [--json]

* ``tiny``: the fitted ReAct checkpoint (``bench.qwen_v1``, GPTQ v1 4-bit): does greedy decoding
  through the backend write the scripted code step and answer?
* ``7b``: Qwen-7B-Chat-Int4's exact shapes and layout (GPTQ v1, group 128, ``seq_length`` 2048,
  dynamic NTK and log-n), random weights and a made-up 151,643-entry vocabulary (~5.5 GB written
  first; a GPU host): load time; decode tokens/s through the backend's ``stream`` (the streamer,
  stop words and end ids included) against the decoder's own ``generate`` in the same run, each as a
  fraction of the bandwidth bound (weights read once per token at the measured copy bandwidth); whether a
  prompt 1.5x past ``seq_length`` gives finite logits; peak GPU memory.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = "Qwen/Qwen-7B-Chat-Int4"
QWEN_7B = {"hidden": 4096, "layers": 32, "heads": 32, "ffn": 11008, "ranks": 151643, "group": 128}


def _use_cache(hf_home: Path) -> None:
    """Point the hub library at ``hf_home`` (it reads ``HF_HOME`` when first imported)."""
    os.environ["HF_HOME"], os.environ["HF_HUB_OFFLINE"] = str(hf_home), "1"
    from huggingface_hub import constants

    constants.HF_HUB_CACHE = str(hf_home / "hub")


def _llm(**kw: Any) -> Any:
    from interpreter.llm.transformers import TransformersLLM

    return TransformersLLM(REPO, **kw)


async def tiny(root: Path) -> dict[str, Any]:
    from bench.qwen_v1 import ANSWER, STEP, executed, into_hub_cache, react_model
    from interpreter.llm.base import GenerationRequest

    made = react_model(root / "tiny")
    snapshot = into_hub_cache(made.gptq, root / "tiny-hf", REPO)
    _use_cache(root / "tiny-hf")
    llm = _llm()
    started = time.perf_counter()
    await llm.load()
    loaded = time.perf_counter() - started
    texts = [(await llm.complete(GenerationRequest(prompt=p, stop=["Observation:"], max_tokens=80))).text
             for p in made.prompts]
    device = str(llm._fast.device)
    await llm.close()
    return {"shape": "tiny", "device": device, "load_s": round(loaded, 2), "step_as_scripted": texts[0] == STEP,
            "answer_as_scripted": texts[1] == ANSWER, "checkpoint_code_ran": executed(snapshot)}


def write_7b(folder: Path) -> None:
    """Qwen-7B-Chat-Int4's files with random 4-bit weights and a made-up vocabulary."""
    import torch
    from safetensors.torch import save_file

    from bench.qwen_v1 import POISON, QWEN_CODE, qwen_config, write_checkpoint

    s = QWEN_7B
    folder.mkdir(parents=True, exist_ok=True)
    ranks = {bytes([b]): b for b in range(256)}
    ranks.update({f"<t{i}>".encode(): i for i in range(256, s["ranks"])})
    cfg = qwen_config(ranks, hidden=s["hidden"], layers=s["layers"], heads=s["heads"], ffn=s["ffn"],
                      seq_length=2048, gptq_group=s["group"])
    cfg["vocab_size"] = 151936
    write_checkpoint(folder, ranks, {}, cfg)  # every file but the weights
    gen = torch.Generator().manual_seed(0)
    d, f, g = s["hidden"], s["ffn"], s["group"]

    def int4(n_in: int, n_out: int) -> dict[str, torch.Tensor]:
        return {"qweight": torch.randint(-2**31, 2**31 - 1, (n_in // 8, n_out), generator=gen, dtype=torch.int32),
                "qzeros": torch.full((n_in // g, n_out // 8), 0x77777777, dtype=torch.int32),
                "scales": (torch.rand(n_in // g, n_out, generator=gen) * 0.004 + 0.001).half(),
                "g_idx": (torch.arange(n_in) // g).to(torch.int32)}

    tensors = {"transformer.wte.weight": (torch.randn(151936, d, generator=gen) * 0.02).half(),
               "lm_head.weight": (torch.randn(151936, d, generator=gen) * 0.02).half(),
               "transformer.ln_f.weight": torch.ones(d, dtype=torch.float16)}
    for i in range(s["layers"]):
        p = f"transformer.h.{i}."
        tensors[p + "ln_1.weight"], tensors[p + "ln_2.weight"] = torch.ones(2, d, dtype=torch.float16)
        tensors[p + "attn.c_attn.bias"] = (torch.randn(3 * d, generator=gen) * 0.02).half()
        for name, (n_in, n_out) in {"attn.c_attn": (d, 3 * d), "attn.c_proj": (d, d), "mlp.w1": (d, f),
                                    "mlp.w2": (d, f), "mlp.c_proj": (f, d)}.items():
            tensors.update({f"{p}{name}.{k}": v for k, v in int4(n_in, n_out).items()})
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    assert all((folder / name).read_text() == POISON for name in QWEN_CODE)


async def seven_b(root: Path, tokens: int) -> dict[str, Any]:
    import torch

    from bench.qwen_v1 import executed, into_hub_cache
    from interpreter.llm.base import GenerationRequest

    started = time.perf_counter()
    write_7b(root / "7b")
    snapshot = into_hub_cache(root / "7b", root / "7b-hf", REPO)
    written = time.perf_counter() - started
    _use_cache(root / "7b-hf")
    llm = _llm()
    started = time.perf_counter()
    await llm.load()
    loaded = time.perf_counter() - started
    fast = llm._fast
    prompt = "Write a Python function that parses a CSV file and prints the mean of every numeric column. " * 4
    ids = llm._tokenizer.encode(prompt)
    async def backend(n: int) -> int:
        request = GenerationRequest(prompt=prompt, max_tokens=n, stop=["Observation:"])
        return (await llm.complete(request)).usage.completion_tokens

    async def decoder(n: int) -> int:
        return len(list(fast.generate(ids, n)))

    rates = {}
    for label, generate in (("backend stream", backend), ("decoder generate", decoder), ("backend stream (again)", backend)):
        await generate(2)
        start = time.perf_counter()
        await generate(1)
        first = time.perf_counter() - start
        start = time.perf_counter()
        n = await generate(tokens)
        total = time.perf_counter() - start
        rates[label] = {"tokens": n, "first_token_ms": round(first * 1e3, 1),
                        "decode_tokens_per_s": round((n - 1) / max(total - first, 1e-9), 1)}
    bound = None
    if fast.device.type == "cuda":
        from bench.model import bound_tokens_per_s, copy_bandwidth

        bandwidth = copy_bandwidth()
        bound = {"copy_bandwidth_tb_s": round(bandwidth / 1e12, 2),
                 "tokens_per_s": round(bound_tokens_per_s(fast, bandwidth, len(ids) + tokens // 2), 1)}
        for rate in rates.values():
            rate["of_bound"] = round(rate["decode_tokens_per_s"] / bound["tokens_per_s"], 3)
    long_ids = (ids * (3072 // len(ids) + 1))[:3072]  # 1.5x seq_length 2048
    logits = fast.prefill(torch.tensor(long_ids, device=fast.device))
    finite = bool(torch.isfinite(logits).all())
    out = {"shape": "7b", "device": str(fast.device), "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
           "write_s": round(written, 1), "load_s": round(loaded, 1), "max_context": llm.max_context, "rates": rates,
           "bandwidth_bound": bound,
           "stream_over_decoder": round(rates["backend stream (again)"]["decode_tokens_per_s"]
                                        / rates["decoder generate"]["decode_tokens_per_s"], 3),
           "long_prompt": {"tokens": len(long_ids), "ntk_alpha": fast._alpha, "finite_logits": finite},
           "peak_gpu_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2) if torch.cuda.is_available() else None,
           "checkpoint_code_ran": executed(snapshot)}
    await llm.close()
    return out


async def run(shapes: list[str], tokens: int, root: Path) -> list[dict[str, Any]]:
    results = []
    if "tiny" in shapes:
        results.append(await tiny(root))
    if "7b" in shapes:
        results.append(await seven_b(root, tokens))
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.default_model", description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="tiny", help="tiny, 7b or both (comma-separated)")
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--dir", type=Path, help="where to write the checkpoints (default: a temporary folder)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        results = asyncio.run(run(args.shape.split(","), args.tokens, Path(tmp)))
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
