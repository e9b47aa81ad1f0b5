"""The fast path's decoder shape and weights: tensors by name from a checkpoint folder or a state dict, gathered into
the decoder's fused projections (Qwen2/Llama names and Qwen v1's), and random weights for benchmarks."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from interpreter.llm.fastpath.errors import FastPathUnsupported
from interpreter.llm.fastpath.gptq_pack import Int4Weight, cat_rows, from_gptq
from interpreter.llm.fastpath.positions import QWEN_LOGN_POSITIONS


# -- the decoder's shape ---------------------------------------------------------------------------
@dataclass(frozen=True)
class DecoderShape:
    vocab: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn: int
    rope_theta: float = 10000.0
    eps: float = 1e-6
    qkv_bias: bool = True
    tie_embeddings: bool = False
    max_context: int = 8192
    rope_fp32: bool = False  # Qwen v1 rotates in float32, Qwen2/Llama in the model's dtype
    naming: str = "qwen2"  # "qwen2" (also Llama, Mistral) or "qwen" (Qwen v1)
    # Qwen v1 past its training length (``positions``): rotary base scaled per prompt, log-n queries
    seq_length: int = 0
    dynamic_ntk: bool = False
    logn_attn: bool = False

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> DecoderShape:
        kind = str(cfg.get("model_type", ""))
        # transformers 5 writes rope_theta and the scaling type into rope_parameters; older configs
        # have rope_theta and rope_scaling at the top level
        rope = cfg.get("rope_parameters") or {}
        scaling = cfg.get("rope_scaling") or rope
        if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
            raise FastPathUnsupported(f"rope scaling {scaling} is not implemented by the fast path")
        theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
        if kind == "qwen":
            heads = int(cfg["num_attention_heads"])
            if float(cfg.get("rotary_pct", 1.0)) != 1.0:
                raise FastPathUnsupported("partial rotary embeddings (rotary_pct < 1) are not implemented by the fast path")
            trained = int(cfg.get("seq_length", 2048))
            ntk, logn = bool(cfg.get("use_dynamic_ntk")), bool(cfg.get("use_logn_attn"))
            return cls(vocab=int(cfg["vocab_size"]), d_model=int(cfg["hidden_size"]), n_layers=int(cfg["num_hidden_layers"]),
                       n_heads=heads, n_kv_heads=heads, head_dim=int(cfg.get("kv_channels") or cfg["hidden_size"] // heads),
                       ffn=int(cfg["intermediate_size"]) // 2, rope_theta=float(cfg.get("rotary_emb_base", 10000)),
                       eps=float(cfg.get("layer_norm_epsilon", 1e-6)), qkv_bias=True, tie_embeddings=False,
                       max_context=max(trained, QWEN_LOGN_POSITIONS) if ntk or logn else trained, rope_fp32=True,
                       naming="qwen", seq_length=trained, dynamic_ntk=ntk, logn_attn=logn)
        if kind in ("qwen2", "llama", "mistral"):
            if cfg.get("use_sliding_window") or (kind == "mistral" and cfg.get("sliding_window")):
                raise FastPathUnsupported("sliding-window attention is not implemented by the fast path")
            heads = int(cfg["num_attention_heads"])
            return cls(vocab=int(cfg["vocab_size"]), d_model=int(cfg["hidden_size"]), n_layers=int(cfg["num_hidden_layers"]),
                       n_heads=heads, n_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                       head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // heads), ffn=int(cfg["intermediate_size"]),
                       rope_theta=theta, eps=float(cfg.get("rms_norm_eps", 1e-6)),
                       qkv_bias=kind == "qwen2" or bool(cfg.get("attention_bias")),
                       tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                       max_context=int(cfg.get("max_position_embeddings", 8192)))
        raise FastPathUnsupported(f"model type {kind!r} is not one the fast path implements (qwen, qwen2, llama, mistral)")


# Qwen-7B (v1) and a Qwen2 model of the same size: 32 layers, d_model 4096, 32 heads, FFN 11008.
QWEN_7B = DecoderShape(vocab=151936, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, head_dim=128, ffn=11008)


# -- checkpoints ---------------------------------------------------------------------------------------
class TensorSource:
    """Tensors by name from a state dict or a checkpoint folder, read one at a time."""

    def __init__(self, tensors: Mapping[str, torch.Tensor] | None = None, folder: str | Path | None = None) -> None:
        self._tensors: dict[str, Any] = dict(tensors or {})
        if folder is not None:
            folder = Path(folder)
            files = sorted(folder.glob("*.safetensors"))
            if files:
                from safetensors import safe_open

                for f in files:
                    handle = safe_open(str(f), framework="pt", device="cpu")
                    self._tensors.update({k: (handle, k) for k in handle.keys()})
            else:
                for f in sorted(folder.glob("pytorch_model*.bin")):
                    self._tensors.update(torch.load(f, map_location="cpu", mmap=True, weights_only=True))
            if not self._tensors:
                raise FastPathUnsupported(f"no *.safetensors or pytorch_model*.bin weights in {folder}")

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def __getitem__(self, name: str) -> torch.Tensor:
        t = self._tensors[name]
        return t[0].get_tensor(t[1]) if isinstance(t, tuple) else t


def _linear(src: TensorSource, prefix: str, quant: Mapping[str, Any]) -> torch.Tensor | Int4Weight:
    if prefix + ".qweight" in src:
        if int(quant.get("bits", 4)) != 4:
            raise FastPathUnsupported(f"{quant.get('bits')}-bit GPTQ is not implemented by the fast path (4-bit is)")
        fmt = str(quant.get("checkpoint_format", "gptq"))
        g_idx = src[prefix + ".g_idx"] if prefix + ".g_idx" in src else None
        return from_gptq(src[prefix + ".qweight"], src[prefix + ".qzeros"], src[prefix + ".scales"],
                         group=int(quant.get("group_size", 128)), g_idx=g_idx, zero_offset=0 if fmt == "gptq_v2" else 1)
    return src[prefix + ".weight"]


def _fuse(parts: list[torch.Tensor | Int4Weight]) -> torch.Tensor | Int4Weight:
    if all(isinstance(p, Int4Weight) for p in parts):
        return cat_rows(parts)  # type: ignore[arg-type]
    if any(isinstance(p, Int4Weight) for p in parts):
        raise FastPathUnsupported("a fused projection mixes quantized and unquantized parts")
    return parts[0] if len(parts) == 1 else torch.cat(parts)  # type: ignore[arg-type]


def layer_weights(src: TensorSource, shape: DecoderShape, i: int, quant: Mapping[str, Any]) -> dict[str, Any]:
    """One layer's weights under the decoder's names: fused ``qkv`` and ``gate_up`` projections."""
    if shape.naming == "qwen":
        p = f"transformer.h.{i}."
        return {"attn_norm": src[p + "ln_1.weight"], "qkv": _linear(src, p + "attn.c_attn", quant),
                "qkv_bias": src[p + "attn.c_attn.bias"], "o": _linear(src, p + "attn.c_proj", quant),
                "mlp_norm": src[p + "ln_2.weight"],
                # Qwen v1's MLP is c_proj(w1(x) * silu(w2(x))): w2 is the gate, w1 the up projection
                "gate_up": _fuse([_linear(src, p + "mlp.w2", quant), _linear(src, p + "mlp.w1", quant)]),
                "down": _linear(src, p + "mlp.c_proj", quant)}
    p = f"model.layers.{i}."
    a = p + "self_attn."
    bias = [a + f"{n}_proj.bias" for n in "qkv"]
    return {"attn_norm": src[p + "input_layernorm.weight"],
            "qkv": _fuse([_linear(src, a + f"{n}_proj", quant) for n in "qkv"]),
            "qkv_bias": torch.cat([src[b] for b in bias]) if all(b in src for b in bias) else None,
            "o": _linear(src, a + "o_proj", quant), "mlp_norm": src[p + "post_attention_layernorm.weight"],
            "gate_up": _fuse([_linear(src, p + f"mlp.{n}_proj", quant) for n in ("gate", "up")]),
            "down": _linear(src, p + "mlp.down_proj", quant)}


def outer_weights(src: TensorSource, shape: DecoderShape) -> dict[str, torch.Tensor]:
    if shape.naming == "qwen":
        return {"embed": src["transformer.wte.weight"], "norm": src["transformer.ln_f.weight"], "lm_head": src["lm_head.weight"]}
    embed = src["model.embed_tokens.weight"]
    head = embed if shape.tie_embeddings or "lm_head.weight" not in src else src["lm_head.weight"]
    return {"embed": embed, "norm": src["model.norm.weight"], "lm_head": head}


def random_weights(shape: DecoderShape, device: str | torch.device, dtype: torch.dtype = torch.bfloat16,
                   seed: int = 0) -> TensorSource:
    """Qwen2-named random weights (std 0.02, norms 1) made on ``device``, lazily layer by layer:
    decode speed does not depend on the values."""
    return _RandomSource(shape, torch.device(device), dtype, seed)


class _RandomSource(TensorSource):
    def __init__(self, shape: DecoderShape, device: torch.device, dtype: torch.dtype, seed: int) -> None:
        super().__init__()
        self.shape, self.device, self.dtype, self.seed = shape, device, dtype, seed

    def _size(self, name: str) -> tuple[int, ...] | None:
        s = self.shape
        kv = s.n_kv_heads * s.head_dim
        sizes = {"q_proj.weight": (s.n_heads * s.head_dim, s.d_model), "k_proj.weight": (kv, s.d_model),
                 "v_proj.weight": (kv, s.d_model), "q_proj.bias": (s.n_heads * s.head_dim,), "k_proj.bias": (kv,),
                 "v_proj.bias": (kv,), "o_proj.weight": (s.d_model, s.n_heads * s.head_dim),
                 "gate_proj.weight": (s.ffn, s.d_model), "up_proj.weight": (s.ffn, s.d_model),
                 "down_proj.weight": (s.d_model, s.ffn), "layernorm.weight": (s.d_model,),
                 "embed_tokens.weight": (s.vocab, s.d_model), "lm_head.weight": (s.vocab, s.d_model),
                 "norm.weight": (s.d_model,)}
        return next((v for k, v in sizes.items() if name.endswith(k)), None)

    def __contains__(self, name: str) -> bool:
        return self._size(name) is not None and (self.shape.qkv_bias or not name.endswith("_proj.bias"))

    def __getitem__(self, name: str) -> torch.Tensor:
        size = self._size(name)
        if size is None:
            raise KeyError(name)
        if name.endswith("norm.weight"):
            return torch.ones(size, device=self.device, dtype=self.dtype)
        gen = torch.Generator(self.device).manual_seed(self.seed + sum(map(ord, name)) * 7919 + len(name))
        return (torch.randn(size, device=self.device, dtype=torch.float32, generator=gen) * 0.02).to(self.dtype)
