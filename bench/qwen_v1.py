"""Small Qwen v1 models for the tests and the CPU benchmark, made here: no Qwen code, no network.

A checkpoint has the released Qwen-7B-Chat(-Int4) layout: ``config.json`` (``model_type: "qwen"``,
Qwen's key names, ``auto_map`` pointing at its Python files), ``generation_config.json``,
``tokenizer_config.json``, ``qwen.tiktoken`` (a byte-level BPE table made from the text the test
will use), and ``model.safetensors`` with Qwen v1's tensor names, either plain or in the GPTQ v1
layout (``qweight``/``qzeros``/``scales``/``g_idx``, zeros stored minus one). The Python files the
config names are there too, and each one, if anything imports it, writes ``EXECUTED`` beside itself
and raises: a test reads that file to prove none ran.

Qwen v1 is Qwen2's arithmetic inside its training length (fused ``c_attn``, ``w2`` the gate, ``w1``
the up projection, multi-head attention): ``qwen2_model`` holds the same weights as transformers'
Qwen2 model, so ``generate`` on them is the reference the fast path is held to. ``trained_state``
fits the weights to given token sequences through it, so greedy decoding of a prompt it learnt
writes the scripted reply.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from interpreter.llm.qwen_tokenizer import PATTERN, SPECIALS

QWEN_CODE = ("configuration_qwen.py", "modeling_qwen.py", "tokenization_qwen.py", "qwen_generation_utils.py",
             "cpp_kernels.py")
POISON = ("import pathlib\n(pathlib.Path(__file__).parent / 'EXECUTED').write_text(__file__)\n"
          "raise RuntimeError('a checkpoint file was executed: ' + __file__)\n")
SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"  # the commit a hub cache's refs/main names

# The exchange the ReAct checkpoints learn: a question, a code step, and the answer after the
# observation ``42``.
QUESTION = "What is 6 times 7?"
STEP = "Thought: I should compute it.\nAction: code_interpreter\nAction Input:\n```py\nprint(6 * 7)\n```\n"
ANSWER = " I now know the final answer.\nFinal Answer: 6 times 7 is 42."


def react_prompts() -> tuple[str, str]:
    """The prompts the interpreter loop writes for QUESTION: before the code step, and after its
    observation (``42``), built by the ReAct format itself."""
    from interpreter.formats.react import ReactFormat
    from interpreter.llm.base import Completion, Message

    fmt = ReactFormat()
    messages: list[Message] = []
    fmt.add_user(messages, QUESTION, [])
    first = fmt.render(messages)
    fmt.add_step(messages, fmt.parse(Completion(text=STEP)), ["42"])
    return first, fmt.render(messages)


@dataclass
class ReactModel:
    """A tiny Qwen v1 model that answers QUESTION in the ReAct format, as checkpoint folders."""

    ranks: dict[bytes, int]
    plain: Path  # float32 weights
    gptq: Path  # the same weights as GPTQ v1 4-bit (group 32)
    prompts: tuple[str, str]


def react_model(root: Path) -> ReactModel:
    """Fit and write the ReAct checkpoints under ``root`` (seconds on two cores)."""
    from interpreter.llm.qwen_tokenizer import QwenTokenizer

    first, second = react_prompts()
    replies = (STEP + "Observation:", ANSWER + "<|im_end|>")
    ranks = qwen_vocab([first, second, *replies])
    tok = QwenTokenizer(ranks)
    state = trained_state(qwen_config(ranks), [(tok.encode(p), tok.encode(r)) for p, r in zip((first, second), replies)])
    plain = write_checkpoint(root / "plain", ranks, state, qwen_config(ranks))
    gptq = write_checkpoint(root / "gptq", ranks, state, qwen_config(ranks, gptq_group=32))
    return ReactModel(ranks, plain, gptq, (first, second))


def qwen_vocab(texts: Iterable[str], merges: int = 4000) -> dict[bytes, int]:
    """A byte-level BPE table whose merges build the pieces of ``texts`` (Qwen v1's pre-tokenizer):
    the 256 bytes, then each piece's prefixes, shortest first, so common words become one token."""
    import regex

    ranks = {bytes([b]): b for b in range(256)}
    prefixes: dict[bytes, int] = {}
    for text in texts:
        for piece in regex.findall(PATTERN, text):
            raw = piece.encode()
            for n in range(2, len(raw) + 1):
                prefixes[raw[:n]] = prefixes.get(raw[:n], 0) + 1
    for token in sorted(prefixes, key=lambda t: (len(t), -prefixes[t], t))[:merges]:
        ranks[token] = len(ranks)
    return ranks


def vocab_size(ranks: Mapping[bytes, int]) -> int:
    """The model's vocabulary: the table, Qwen's special tokens, padded to a multiple of 64 as Qwen's is."""
    n = len(ranks) + len(SPECIALS)
    return (n + 63) // 64 * 64


def qwen_config(ranks: Mapping[bytes, int], *, hidden: int = 64, layers: int = 2, heads: int = 4, ffn: int = 128,
                seq_length: int = 2048, gptq_group: int | None = None) -> dict:
    """config.json as Qwen v1 writes it (``intermediate_size`` is twice the MLP width)."""
    cfg = {
        "architectures": ["QWenLMHeadModel"], "auto_map": {
            "AutoConfig": "configuration_qwen.QWenConfig", "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"},
        "model_type": "qwen", "vocab_size": vocab_size(ranks), "hidden_size": hidden, "num_hidden_layers": layers,
        "num_attention_heads": heads, "kv_channels": hidden // heads, "intermediate_size": 2 * ffn,
        "seq_length": seq_length, "max_position_embeddings": 8192, "rotary_emb_base": 10000, "rotary_pct": 1.0,
        "layer_norm_epsilon": 1e-6, "use_dynamic_ntk": True, "use_logn_attn": True, "use_flash_attn": "auto",
        "no_bias": True, "tie_word_embeddings": False, "bf16": False, "fp16": gptq_group is not None, "fp32": False,
        "initializer_range": 0.02, "scale_attn_weights": True, "use_cache": True, "tokenizer_class": "QWenTokenizer",
        "torch_dtype": "float16" if gptq_group is not None else "float32", "transformers_version": "4.32.0",
    }
    if gptq_group is not None:
        cfg["quantization_config"] = {"bits": 4, "group_size": gptq_group, "damp_percent": 0.01, "desc_act": False,
                                      "static_groups": False, "sym": True, "true_sequential": True,
                                      "model_name_or_path": None, "model_file_base_name": "model",
                                      "quant_method": "gptq"}
    return cfg


GENERATION_CONFIG = {"chat_format": "chatml", "eos_token_id": None, "pad_token_id": None, "max_window_size": 6144,
                     "max_new_tokens": 512, "do_sample": True, "top_k": 0, "top_p": 0.8, "repetition_penalty": 1.1,
                     "transformers_version": "4.31.0"}


def random_state(cfg: Mapping, seed: int = 0, scale: float = 0.3) -> dict[str, torch.Tensor]:
    """Random float32 weights under Qwen v1's names."""
    gen = torch.Generator().manual_seed(seed)
    d, f, v = cfg["hidden_size"], cfg["intermediate_size"] // 2, cfg["vocab_size"]
    rand = lambda *shape: torch.randn(*shape, generator=gen) * scale  # noqa: E731
    state = {"transformer.wte.weight": rand(v, d), "transformer.ln_f.weight": 1 + rand(d) * 0.1, "lm_head.weight": rand(v, d)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"transformer.h.{i}."
        state.update({p + "ln_1.weight": 1 + rand(d) * 0.1, p + "ln_2.weight": 1 + rand(d) * 0.1,
                      p + "attn.c_attn.weight": rand(3 * d, d), p + "attn.c_attn.bias": rand(3 * d),
                      p + "attn.c_proj.weight": rand(d, d), p + "mlp.w1.weight": rand(f, d),
                      p + "mlp.w2.weight": rand(f, d), p + "mlp.c_proj.weight": rand(d, f)})
    return state


def qwen2_model(cfg: Mapping, state: Mapping[str, torch.Tensor] | None = None) -> Any:
    """transformers' Qwen2 model of ``cfg``'s shape, holding ``state`` (Qwen v1 names) if given."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    heads = cfg["num_attention_heads"]
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"] // 2,
        num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=cfg["seq_length"], rms_norm_eps=cfg["layer_norm_epsilon"], rope_theta=10000.0,
        tie_word_embeddings=False, attn_implementation="eager"))
    if state is not None:
        model.load_state_dict(qwen2_names(state, cfg["num_hidden_layers"]))
    return model.eval()


def trained_state(cfg: Mapping, sequences: list[tuple[list[int], list[int]]], steps: int = 400,
                  seed: int = 0) -> dict[str, torch.Tensor]:
    """Weights (Qwen v1 names, float32) fitted so that each ``prompt`` continues with its ``reply``,
    the loss on the reply's tokens only. On one CPU thread: the model's operations are too small to
    share, and on a busy host each one would wait for a second thread to get a core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        model = qwen2_model(cfg)
        batch = []
        for prompt, reply in sequences:
            ids = torch.tensor(prompt + reply)
            labels = ids.clone()
            labels[:len(prompt)] = -100
            batch.append((ids[None], labels[None]))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
        model.train()
        for _ in range(steps):
            opt.zero_grad()
            loss = sum(model(input_ids=ids, labels=labels).loss for ids, labels in batch)
            loss.backward()
            opt.step()
            if float(loss.detach()) < 2e-3 * len(batch):
                break
        return qwen_v1_names(model.state_dict(), cfg["num_hidden_layers"])
    finally:
        torch.set_num_threads(threads)


def qwen_v1_names(hf: Mapping[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """A Qwen2 state dict under Qwen v1's names (q, k, v fused into ``c_attn``; gate is ``w2``)."""
    out = {"transformer.wte.weight": hf["model.embed_tokens.weight"], "transformer.ln_f.weight": hf["model.norm.weight"],
           "lm_head.weight": hf["lm_head.weight"]}
    for i in range(layers):
        a, p = f"model.layers.{i}.self_attn.", f"transformer.h.{i}."
        m = f"model.layers.{i}.mlp."
        out.update({
            p + "ln_1.weight": hf[f"model.layers.{i}.input_layernorm.weight"],
            p + "ln_2.weight": hf[f"model.layers.{i}.post_attention_layernorm.weight"],
            p + "attn.c_attn.weight": torch.cat([hf[a + f"{n}_proj.weight"] for n in "qkv"]),
            p + "attn.c_attn.bias": torch.cat([hf[a + f"{n}_proj.bias"] for n in "qkv"]),
            p + "attn.c_proj.weight": hf[a + "o_proj.weight"], p + "mlp.w1.weight": hf[m + "up_proj.weight"],
            p + "mlp.w2.weight": hf[m + "gate_proj.weight"], p + "mlp.c_proj.weight": hf[m + "down_proj.weight"]})
    return {k: v.detach().float().contiguous() for k, v in out.items()}


def qwen2_names(state: Mapping[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """The inverse of ``qwen_v1_names``."""
    d = state["transformer.wte.weight"].shape[1]
    out = {"model.embed_tokens.weight": state["transformer.wte.weight"], "model.norm.weight": state["transformer.ln_f.weight"],
           "lm_head.weight": state["lm_head.weight"]}
    for i in range(layers):
        p, a, m = f"transformer.h.{i}.", f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        for n, w, b in zip("qkv", state[p + "attn.c_attn.weight"].split(d), state[p + "attn.c_attn.bias"].split(d)):
            out[a + f"{n}_proj.weight"], out[a + f"{n}_proj.bias"] = w, b
        out.update({a + "o_proj.weight": state[p + "attn.c_proj.weight"], m + "up_proj.weight": state[p + "mlp.w1.weight"],
                    m + "gate_proj.weight": state[p + "mlp.w2.weight"], m + "down_proj.weight": state[p + "mlp.c_proj.weight"],
                    f"model.layers.{i}.input_layernorm.weight": state[p + "ln_1.weight"],
                    f"model.layers.{i}.post_attention_layernorm.weight": state[p + "ln_2.weight"]})
    return out


def gptq_v1(weight: torch.Tensor, group: int) -> dict[str, torch.Tensor]:
    """One linear weight ``[out, in]`` as a symmetric 4-bit GPTQ v1 layer (round to nearest)."""
    n_out, n_in = weight.shape
    w = weight.float().t().reshape(n_in // group, group, n_out)  # [groups, group, out]
    scale = (w.abs().amax(dim=1) * 2 / 15).clamp(min=1e-8)  # [groups, out]
    q = (torch.round(w / scale[:, None]) + 8).clamp(0, 15).to(torch.int64).reshape(n_in, n_out)
    shifts = torch.arange(0, 32, 4)
    as_int32 = lambda t: t.where(t < 2**31, t - 2**32).to(torch.int32)  # noqa: E731
    qweight = (q.view(n_in // 8, 8, n_out) << shifts.view(1, 8, 1)).sum(1)
    zeros = torch.full((n_in // group, n_out), 8 - 1, dtype=torch.int64)  # v1 stores the zero minus one
    qzeros = (zeros.view(n_in // group, n_out // 8, 8) << shifts.view(1, 1, 8)).sum(2)
    return {"qweight": as_int32(qweight), "qzeros": as_int32(qzeros), "scales": scale.half(),
            "g_idx": (torch.arange(n_in) // group).to(torch.int32)}


def write_checkpoint(folder: Path, ranks: Mapping[bytes, int], state: Mapping[str, torch.Tensor], cfg: Mapping,
                     generation: Mapping | None = None) -> Path:
    """The folder a released Qwen v1 checkpoint would be; GPTQ v1 tensors when ``cfg`` says so."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    special = {tok: len(ranks) + i for i, tok in enumerate(SPECIALS)}
    (folder / "qwen.tiktoken").write_text(
        "".join(f"{base64.b64encode(tok).decode()} {rank}\n" for tok, rank in sorted(ranks.items(), key=lambda x: x[1])))
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    gen = {**GENERATION_CONFIG, **(generation or {})}
    gen["eos_token_id"] = gen["pad_token_id"] = special["<|endoftext|>"]
    (folder / "generation_config.json").write_text(json.dumps(gen, indent=2))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "model_max_length": 8192, "tokenizer_class": "QWenTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]}}, indent=2))
    for name in QWEN_CODE:
        (folder / name).write_text(POISON)
    quant = cfg.get("quantization_config")
    tensors: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        linear = name.endswith(".weight") and t.dim() == 2 and ".h." in name
        if quant and linear:
            for key, value in gptq_v1(t, int(quant["group_size"])).items():
                tensors[name.removesuffix("weight") + key] = value
        else:
            tensors[name] = t.half() if quant else t.float()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    return folder


def into_hub_cache(folder: Path, hf_home: Path, repo_id: str) -> Path:
    """A copy of ``folder`` where transformers' cache keeps ``repo_id`` under ``HF_HOME``: files in
    ``snapshots/<commit>/`` and ``refs/main`` naming that commit."""
    import shutil

    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(SNAPSHOT)
    snapshot = repo / "snapshots" / SNAPSHOT
    shutil.copytree(folder, snapshot, dirs_exist_ok=True)
    return snapshot


def executed(folder: Path) -> bool:
    """Whether any of the checkpoint's Python files ran."""
    return (folder / "EXECUTED").exists()
