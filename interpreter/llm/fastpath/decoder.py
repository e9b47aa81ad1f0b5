"""A compact decoder for the Qwen/Llama family: the transformers backend's fast path.

Why it exists: ``model.generate`` on one GPU spends most of a decode step launching kernels (about
13 tokens/s for a 7B model with the default cache, where memory bandwidth allows ~195). This
decoder keeps the same arithmetic as the Hugging Face modules (RMSNorm in float32, rotary
embeddings, grouped-query attention) in a few fused projections, with

* a static KV cache held as module buffers, written in place;
* a prefill pass (causal SDPA attention over the prompt) and a one-token decode step compiled once
  with ``torch.compile`` (dynamic in the attended length) and replayed as CUDA graphs, one graph per
  512-token bucket of attended length, so a step reads only the cache it needs;
* 4-bit weight-only matrix products (``gptq_pack``) for GPTQ checkpoints, or for bf16 weights
  quantized at load time; embeddings and ``lm_head`` stay in 16 bits;
* a cache slot per stream, so that several streams share each decode step (``decode_batch``, one
  CUDA graph per batch size; ``scheduler`` drives it): weights read once a step serve them all.

On a CPU it runs the same modules eagerly (what CI tests). Weights come from a checkpoint folder
(safetensors or ``.bin``; Qwen2/Llama names, and Qwen v1's ``c_attn``/``w1``/``w2`` names, bf16 or
GPTQ 4-bit) or from any state dict with those names, so no modeling code or GPTQ library is needed.
Architectures or options it does not cover raise ``FastPathUnsupported`` and the caller falls back
to ``generate``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from interpreter.llm.fastpath.gptq_pack import DEQUANTIZE_MIN_ROWS, Int4Weight, PackedInt4, UnsupportedQuantization, fit_group, quantize
from interpreter.llm.fastpath.positions import logn_factors, ntk_alpha, rope_tables, rotate
from interpreter.llm.fastpath.sampling import Readback, penalize, pick
from interpreter.llm.fastpath.weights import (QWEN_7B, DecoderShape, FastPathUnsupported, TensorSource, layer_weights, outer_weights,
                                     random_weights)

__all__ = ["DecoderShape", "FastDecoder", "FastPathUnsupported", "QWEN_7B", "TensorSource", "load_checkpoint",
           "random_weights"]

log = logging.getLogger(__name__)

BUCKET = 512  # attended-length granularity of the decode step's CUDA graphs
BATCHES = (1, 2, 4, 8, 16, 32)  # batch sizes of the decode step's CUDA graphs: a batch is padded up to one


# -- modules ---------------------------------------------------------------------------------------
class Projection(torch.nn.Module):
    """``x @ W.T + b`` with W in the compute dtype or packed 4-bit. A ``glu`` projection's weight
    is ``[gate; up]`` and it is called through ``glu()``."""

    def __init__(self, w: torch.Tensor | Int4Weight, bias: torch.Tensor | None, device: torch.device,
                 dtype: torch.dtype, quantize_to: str | None = None, group: int = 128, own_kernel: bool = True,
                 glu: bool = False) -> None:
        super().__init__()
        if quantize_to == "int4" and isinstance(w, torch.Tensor):
            fitted = fit_group(int(w.shape[1]), group)
            if fitted is None:
                log.info("a %dx%d weight has no 4-bit group size that divides its input: kept in %s",
                         *w.shape, dtype)
            else:
                w = quantize(w.to(device), fitted)
        fuse = glu and os.environ.get("JUPYBOX_INT4_GLU", "1") != "0"  # see int4_layer
        self.packed = int4_layer(w, device, glu=fuse) if isinstance(w, Int4Weight) else None
        self.register_buffer("weight", None if self.packed is not None else w.to(device, dtype).contiguous())
        self.register_buffer("bias", None if bias is None else bias.to(device, dtype))
        self.gemv = bf16_kernel(self.weight) if own_kernel and self.weight is not None else None
        counts = None
        self.interleaved = False  # gate and up rows in turn: the decode kernel ends in silu(gate) * up
        if self.gemv is not None:
            from interpreter.llm.fastpath.kernels import bf16_gemv

            counts = bf16_gemv.counters(self.weight.shape[0], self.gemv, device)
            if glu and bias is None and bf16_gemv.glu_fits(self.weight, self.gemv):
                pairs = bf16_gemv.interleave(self.weight)
                if bf16_gemv.agrees(self.weight, self.gemv, glu_weight=pairs):
                    self.weight, self.interleaved = pairs, True
        self.register_buffer("counts", counts)  # the kernel's split-K arrival counts (zero between launches)

    def forward(self, x: torch.Tensor, add_bias: bool = True) -> torch.Tensor:
        """``x @ W.T``, plus the bias unless the caller adds it in its own kernel."""
        if self.interleaved:
            raise RuntimeError("an interleaved [gate; up] projection is called through glu()")
        bias = self.bias if add_bias else None
        if self.gemv is not None and x.numel() == x.shape[-1]:  # one row: the decode step
            y = self._own_kernel(x, glu=False)
        elif self.packed is None:
            return F.linear(x, self.weight, bias)
        else:
            y = self.packed(x)
        return y if bias is None else y + bias

    def glu(self, x: torch.Tensor) -> torch.Tensor:
        """``silu(gate) * up`` of a ``[gate; up]`` projection: on the decode step of an interleaved
        weight, inside the matrix-vector kernel."""
        if getattr(self.packed, "fuses_glu", False) and self.bias is None and (
                x.numel() == x.shape[-1] or self.packed.batched(x.numel() // x.shape[-1]) is not None):
            return self.packed.glu(x)  # one row, or a decode step's rows: the int4 tensor-core kernel's own ending
        if not self.interleaved:
            gate, up = self(x).chunk(2, dim=-1)
            return F.silu(gate) * up
        if x.numel() == x.shape[-1]:
            return self._own_kernel(x, glu=True)
        pairs = F.linear(x, self.weight).unflatten(-1, (-1, 2))
        return F.silu(pairs[..., 0]) * pairs[..., 1]

    def _own_kernel(self, x: torch.Tensor, glu: bool) -> torch.Tensor:
        """One row through this project's bf16 kernel (``bf16_gemv``), as the compiled step keeps it."""
        c = self.gemv
        return torch.ops.jupybox.bf16_gemv(x.reshape(-1), self.weight, self.counts, c.block_n, c.block_k, c.warps,
                                           c.splits, glu).to(x.dtype).view(*x.shape[:-1], -1)


def bf16_kernel(weight: torch.Tensor) -> Any:
    """The launch shape of this project's bf16 matrix-vector kernel (``bf16_gemv``) for a 16-bit
    weight on a GPU, where it beat cuBLAS for this shape when timed; None keeps cuBLAS (also on a
    CPU, without Triton, or with ``JUPYBOX_BF16_KERNEL=cublas``)."""
    if weight.device.type != "cuda" or os.environ.get("JUPYBOX_BF16_KERNEL", "auto") == "cublas":
        return None
    from interpreter.llm.fastpath.kernels import bf16_gemv

    config = bf16_gemv.tune(weight) if bf16_gemv.supports(weight) else None
    return config if config is not None and bf16_gemv.agrees(weight, config) else None


def decode_attention_kernel(shape: DecoderShape, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether decode steps attend with this project's kernel (``decode_attention``: bias, rotary,
    the cache's write and the attention in one launch) rather than separate kernels and SDPA: on a
    GPU with Triton, where it agrees with the unfused step when checked at load, unless
    ``JUPYBOX_DECODE_ATTENTION=sdpa``."""
    if device.type != "cuda" or os.environ.get("JUPYBOX_DECODE_ATTENTION", "auto") == "sdpa":
        return False
    from interpreter.llm.fastpath.kernels import decode_attention

    rope_dtype = torch.float32 if shape.rope_fp32 else dtype
    return decode_attention.available() and decode_attention.agrees(
        shape.n_heads, shape.n_kv_heads, shape.head_dim, shape.qkv_bias, shape.logn_attn, device, dtype, rope_dtype)


def int4_layer(w: Int4Weight, device: torch.device, glu: bool = False) -> torch.nn.Module:
    """The layer that runs a 4-bit weight, by ``JUPYBOX_INT4_KERNEL``: ``auto`` (default) or ``mma``,
    this project's tensor-core kernel (``int4_mma``: 1.6-1.7x PyTorch's kernel alone on an H200);
    ``triton``, its Triton kernel (``int4_gemv``); ``torch``, PyTorch's own int4 kernel
    (``gptq_pack.PackedInt4``). Ours run where the GPU, the weight's shape and their check at load
    allow; otherwise PyTorch's kernel does. With ``glu`` (a ``[gate; up]`` weight; unless
    ``JUPYBOX_INT4_GLU=0``) the tensor-core kernel ends in ``silu(gate) * up``."""
    kernel = os.environ.get("JUPYBOX_INT4_KERNEL", "auto")
    if device.type == "cuda" and kernel in ("auto", "mma"):
        from interpreter.llm.fastpath.kernels import int4_mma

        if int4_mma.available(device) and int4_mma.supports(*w.shape, w.group):
            try:
                return int4_mma.MmaInt4(w.q, w.scales_zeros, w.group, device, glu=glu)
            except int4_mma.Int4MmaUnavailable as exc:
                log.warning("%s: PyTorch's int4 kernel runs this weight instead", exc)
    if device.type == "cuda" and kernel == "triton":
        from interpreter.llm.fastpath.kernels import int4_gemv

        if int4_gemv.available() and int4_gemv.supports(*w.shape, w.group):
            try:
                return int4_gemv.TritonInt4(w.q, w.scales_zeros, w.group, device)
            except int4_gemv.Int4GemvUnavailable as exc:
                log.warning("%s: PyTorch's int4 kernel runs this weight instead", exc)
    return PackedInt4(w, device)


class Layer(torch.nn.Module):
    """One decoder layer's weights and its KV cache: one slot of ``max_seq`` positions per stream
    (``[slots, kv_heads, max_seq, head_dim]``)."""

    def __init__(self, w: Mapping[str, Any], shape: DecoderShape, max_seq: int, device: torch.device,
                 dtype: torch.dtype, quantize_to: str | None, group: int, slots: int = 1) -> None:
        super().__init__()
        self.register_buffer("attn_norm", w["attn_norm"].to(device, dtype))
        self.register_buffer("mlp_norm", w["mlp_norm"].to(device, dtype))
        self.qkv = Projection(w["qkv"], w["qkv_bias"], device, dtype, quantize_to, group)
        self.o = Projection(w["o"], None, device, dtype, quantize_to, group)
        self.gate_up = Projection(w["gate_up"], None, device, dtype, quantize_to, group, glu=True)
        self.down = Projection(w["down"], None, device, dtype, quantize_to, group)
        cache = (slots, shape.n_kv_heads, max_seq, shape.head_dim)
        self.register_buffer("k_cache", torch.zeros(cache, device=device, dtype=dtype))
        self.register_buffer("v_cache", torch.zeros(cache, device=device, dtype=dtype))


class FastDecoder(torch.nn.Module):
    """Greedy/sampled decoding with a static cache of ``max_seq`` positions per slot. ``generate``
    runs one stream in slot 0; ``prefill(slot=, start=)`` and ``decode_batch`` let a scheduler
    (``fastpath.scheduler``) run up to ``slots`` streams in one step each."""

    def __init__(self, shape: DecoderShape, src: TensorSource, *, max_seq: int, device: str | torch.device = "cuda",
                 dtype: torch.dtype = torch.bfloat16, quant: Mapping[str, Any] | None = None,
                 quantize_to: str | None = None, group: int = 128, compile: bool | None = None, slots: int = 1) -> None:
        super().__init__()
        self.shape, self.device, self.dtype = shape, torch.device(device), dtype
        self.max_seq = min(max_seq, shape.max_context)
        if slots < 1:
            raise ValueError("a decoder needs at least one cache slot")
        self.slots = slots
        outer = outer_weights(src, shape)
        self.register_buffer("embed", outer["embed"].to(self.device, dtype))
        self.register_buffer("norm", outer["norm"].to(self.device, dtype))
        # the lm_head keeps cuBLAS: it streams 1.2 GB a token at the copy bandwidth already
        self.lm_head = Projection(outer["lm_head"], None, self.device, dtype, own_kernel=False)
        self.layers = torch.nn.ModuleList(
            Layer(layer_weights(src, shape, i, quant or {}), shape, self.max_seq, self.device, dtype, quantize_to, group,
                  slots)
            for i in range(shape.n_layers))
        if slots > 1:  # a decode step of several streams: the 4-bit kernel's batched launches, timed and checked now
            for module in self.modules():
                if hasattr(module, "prepare_batches"):
                    module.prepare_batches(min(slots, BATCHES[-1]))
        self._alpha = 1.0  # the dynamic-NTK factor the rotary tables hold (Qwen v1)
        cos, sin = rope_tables(shape.rope_theta, shape.head_dim, self.max_seq, self.device, self._rope_dtype)
        self.register_buffer("cos", cos)
        self.register_buffer("sin", sin)
        self.register_buffer("logn", logn_factors(self.max_seq, shape.seq_length, self.device, dtype)
                             if shape.logn_attn else None)
        self.register_buffer("positions", torch.arange(self.max_seq, device=self.device))
        self.register_buffer("attn_counts", torch.zeros(BATCHES[-1] * shape.n_heads, dtype=torch.int32, device=self.device)
                             if decode_attention_kernel(shape, self.device, dtype) else None)
        self.use_graphs = self.device.type == "cuda" if compile is None else compile
        self._step: Callable[..., torch.Tensor] = self._decode
        if self.use_graphs:
            # the step's own kernels launch as programmatic dependents too where this project's
            # matrix-vector kernels do (``gemv.programmatic_launch``): each starts early and waits
            # for the one before ahead of its first access to memory that one may use
            import torch._inductor.config as inductor

            from interpreter.llm.fastpath.kernels import gemv

            pdl = gemv.programmatic_launch(self.device) and hasattr(inductor.triton, "enable_pdl")
            self._step = torch.compile(self._decode, fullgraph=True, dynamic=False,
                                       options={"triton.enable_pdl": True} if pdl else None)
        self._graphs: dict[tuple[int, int], tuple[Any, torch.Tensor]] = {}  # (batch, attended length) -> graph, logits
        self._pool: Any = None
        # a captured step's inputs, one set per batch size: tokens, positions, slots; and how many rows are streams
        self._inputs = {n: tuple(torch.zeros(n, dtype=torch.long, device=self.device) for _ in range(3)) for n in BATCHES}
        self._tok, self._pos, self._slot0 = self._inputs[1]
        self._rows = torch.ones(1, dtype=torch.int32, device=self.device)

    @property
    def _rope_dtype(self) -> torch.dtype:
        return torch.float32 if self.shape.rope_fp32 else self.dtype

    def _use_alpha(self, prompt_length: int) -> None:
        """Qwen v1's dynamic NTK: rotate this prompt, and the tokens decoded after it, with the base
        its length asks for; the tables are rewritten in place, so captured graphs read them."""
        alpha = ntk_alpha(prompt_length, self.shape.seq_length) if self.shape.dynamic_ntk else 1.0
        if alpha != self._alpha:
            cos, sin = rope_tables(self.shape.rope_theta, self.shape.head_dim, self.cos.shape[0], self.device,
                                   self._rope_dtype, alpha)
            self.cos.copy_(cos)
            self.sin.copy_(sin)
            self._alpha = alpha

    def set_max_seq(self, max_seq: int) -> None:
        """Reallocate the KV cache for ``max_seq`` positions (captured graphs are dropped)."""
        if max_seq > self.cos.shape[0]:
            raise FastPathUnsupported(f"the rotary tables were built for {self.cos.shape[0]} positions")
        self._graphs.clear()
        for layer in self.layers:
            layer.k_cache = layer.v_cache = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        for layer in self.layers:
            cache = (self.slots, self.shape.n_kv_heads, max_seq, self.shape.head_dim)
            layer.k_cache = torch.zeros(cache, device=self.device, dtype=self.dtype)
            layer.v_cache = torch.zeros(cache, device=self.device, dtype=self.dtype)
        self.max_seq = max_seq

    def slot_bytes(self) -> int:
        """The KV cache's bytes per slot (one stream's share of the decoder's memory)."""
        s = self.shape
        return 2 * s.n_layers * s.n_kv_heads * self.max_seq * s.head_dim * self.dtype.itemsize

    def warm_up(self) -> None:
        """Compile the decode step, capture every attended-length graph and compile the 4-bit
        weights' unpacking for prompts now rather than on a user's first request (each writes
        garbage K/V that a real prefill or step rewrites before use)."""
        if not self.use_graphs:
            return
        self.prefill(self._tok.repeat(min(DEQUANTIZE_MIN_ROWS, self.max_seq)))
        for length in range(BUCKET, self.max_seq + BUCKET, BUCKET):
            self.decode(self._tok, min(length, self.max_seq) - 1)
            for batch in BATCHES[1:]:
                if batch // 2 < self.slots:  # a batch of this size can occur
                    self.decode_batch([0] * min(batch, self.slots), [min(length, self.max_seq) - 1] * min(batch, self.slots),
                                      list(range(min(batch, self.slots))))
        torch.cuda.synchronize(self.device)

    # -- the model's arithmetic ------------------------------------------------------------
    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.shape.eps)
        return w * h.to(x.dtype)

    def _qkv(self, layer: Layer, x: torch.Tensor, pos: torch.Tensor,
             slot: int | torch.Tensor = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values of rows ``x`` at positions ``pos``, the keys and values also
        written to the cache: all rows into ``slot`` (an int: a prompt), or row ``b`` into slot
        ``slot[b]`` (a tensor: a batch of streams, one row each)."""
        s = self.shape
        qkv = layer.qkv(self._rms(x, layer.attn_norm))
        q, k, v = qkv.split([s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim, s.n_kv_heads * s.head_dim], dim=-1)
        cos, sin = self.cos[pos].unsqueeze(1), self.sin[pos].unsqueeze(1)
        q = rotate(q.view(-1, s.n_heads, s.head_dim), cos, sin)
        if self.logn is not None:  # Qwen v1 past its training length: log-n scaled queries
            q = q * self.logn[pos].view(-1, 1, 1)
        k = rotate(k.view(-1, s.n_kv_heads, s.head_dim), cos, sin)
        v = v.view(-1, s.n_kv_heads, s.head_dim)
        if isinstance(slot, int):
            layer.k_cache[slot].index_copy_(1, pos, k.transpose(0, 1))
            layer.v_cache[slot].index_copy_(1, pos, v.transpose(0, 1))
        else:
            layer.k_cache[slot, :, pos] = k
            layer.v_cache[slot, :, pos] = v
        return q, k, v

    def _mlp(self, layer: Layer, x: torch.Tensor) -> torch.Tensor:
        return x + layer.down(layer.gate_up.glu(self._rms(x, layer.mlp_norm)))

    def alpha_for(self, prompt_length: int) -> float:
        """The dynamic-NTK factor a prompt of this length rotates with (1 unless Qwen v1 past its
        training length): streams of different factors cannot share a step."""
        return ntk_alpha(prompt_length, self.shape.seq_length) if self.shape.dynamic_ntk else 1.0

    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor, all_logits: bool = False, *, slot: int = 0, start: int = 0,
                prompt_length: int | None = None) -> torch.Tensor:
        """Run ``tokens`` at positions ``start..start + T - 1`` into cache slot ``slot``, attending
        to what the slot holds before ``start`` (a prompt in chunks: the first chunk at 0, each
        next one where the last ended); float32 logits of the last position (or of every position).
        The rotary tables are set for ``prompt_length`` (default: this chunk's end) on a first chunk."""
        s = self.shape
        if not 0 <= slot < self.slots:
            raise ValueError(f"slot {slot} of a decoder with {self.slots}")
        end = start + int(tokens.shape[0])
        if end > self.max_seq:
            raise FastPathUnsupported(f"{end} positions exceed the fast path's cache of {self.max_seq}")
        if start == 0:
            self._use_alpha(prompt_length or end)
        pos = self.positions[start:end]
        x = F.embedding(tokens, self.embed)
        causal = None if start == 0 else (self.positions[:end].view(1, -1) <= pos.view(-1, 1)).view(1, 1, -1, end)
        for layer in self.layers:
            q, k, v = self._qkv(layer, x, pos, slot)
            if start:  # earlier chunks' keys and values from the cache
                k, v = layer.k_cache[slot, :, :end], layer.v_cache[slot, :, :end]
            else:
                k, v = k.transpose(0, 1), v.transpose(0, 1)
            attn = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k[None], v[None], attn_mask=causal,
                                                  is_causal=causal is None, enable_gqa=s.n_kv_heads != s.n_heads)
            x = x + layer.o(attn[0].transpose(0, 1).reshape(x.shape[0], -1))
            x = self._mlp(layer, x)
        x = self._rms(x if all_logits else x[-1:], self.norm)
        return self.lm_head(x).float()

    def _decode(self, token: torch.Tensor, pos: torch.Tensor, span: torch.Tensor, slot: torch.Tensor | None = None,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """One token per row (``token``, ``pos`` and ``slot`` ``[batch]``; slot 0 by default), each
        attending to its slot's first ``len(span)`` positions up to its own; ``rows`` (a one-element
        tensor) says how many rows are streams, the rest pad a captured batch. Float32 logits
        ``[batch, vocab]``."""
        s = self.shape
        length, batch = span.shape[0], token.shape[0]
        slot = self._slot0[:1].expand(batch) if slot is None else slot
        x = F.embedding(token, self.embed)
        for layer in self.layers:
            if self.attn_counts is not None:  # this project's kernel (``decode_attention``): bias,
                # rotary, log-n, the cache's write and the attention in one launch
                qkv = layer.qkv(self._rms(x, layer.attn_norm), add_bias=False)
                attn = torch.ops.jupybox.decode_attention(qkv, layer.qkv.bias, self.cos, self.sin, self.logn,
                                                          layer.k_cache, layer.v_cache, pos, slot,
                                                          self._rows if rows is None else rows, length,
                                                          self.attn_counts)
            else:  # SDPA, as the prefill and the plain path use: scores and softmax accumulate in float32
                q, _, _ = self._qkv(layer, x, pos, slot)
                if batch == 1 and not self.use_graphs:  # a view of the slot, not a copy
                    keys, values = layer.k_cache[int(slot[0])][None, :, :length], layer.v_cache[int(slot[0])][None, :, :length]
                else:
                    keys, values = layer.k_cache[slot, :, :length], layer.v_cache[slot, :, :length]
                visible = (span.view(1, -1) <= pos.view(-1, 1)).view(batch, 1, 1, length)
                attn = F.scaled_dot_product_attention(q.unsqueeze(2), keys, values, attn_mask=visible,
                                                      enable_gqa=s.n_kv_heads != s.n_heads)
            x = x + layer.o(attn.reshape(batch, -1))
            x = self._mlp(layer, x)
        return self.lm_head(self._rms(x, self.norm)).float()

    @torch.no_grad()
    def decode(self, token: torch.Tensor, pos: int) -> torch.Tensor:
        """Float32 logits ``[vocab]`` for ``token`` (a one-element long tensor) at position ``pos``
        of slot 0."""
        length = min(self.max_seq, (pos // BUCKET + 1) * BUCKET)
        if not self.use_graphs:
            return self._decode(token, self.positions[pos:pos + 1], self.positions[:length])[0]
        self._tok.copy_(token)
        self._pos.fill_(pos)
        self._slot0.zero_()
        self._rows.fill_(1)
        return self._replay(1, length)[0]

    @torch.no_grad()
    def decode_batch(self, tokens: list[int] | torch.Tensor, positions: list[int], slots: list[int]) -> torch.Tensor:
        """Float32 logits ``[batch, vocab]``: row ``b`` is token ``tokens[b]`` at position
        ``positions[b]`` of slot ``slots[b]`` (distinct slots), one step for all. On a GPU the batch
        runs as the CUDA graph of the next size in ``BATCHES`` (padded rows do nothing). On a CPU
        each row runs alone, so a stream's numbers do not depend on its neighbours (a matrix
        product's summation order can change with its row count)."""
        batch = len(positions)
        if (not 0 < batch <= min(self.slots, BATCHES[-1]) or len(slots) != batch or len(set(slots)) != batch
                or len(tokens) != batch):
            raise ValueError(f"a step takes 1 to {min(self.slots, BATCHES[-1])} rows in distinct slots")
        if max(positions) >= self.max_seq or min(positions) < 0 or not all(0 <= s < self.slots for s in slots):
            raise ValueError("a row's position or slot is outside the cache")
        tokens = torch.as_tensor(tokens, dtype=torch.long, device=self.device).view(batch)
        if not self.use_graphs:
            return torch.cat([self._decode(tokens[b:b + 1], self.positions[p:p + 1],
                                           self.positions[:min(self.max_seq, (p // BUCKET + 1) * BUCKET)],
                                           torch.tensor([s], device=self.device))
                              for b, (p, s) in enumerate(zip(positions, slots))])
        size = next(n for n in BATCHES if n >= batch)
        tok, pos, slot = self._inputs[size]
        pad = size - batch  # padded rows repeat row 0 (the attention skips them; their products are dropped)
        tok.copy_(torch.cat([tokens, tokens[:1].expand(pad)]) if pad else tokens)
        pos.copy_(torch.tensor(positions + positions[:1] * pad), non_blocking=True)
        slot.copy_(torch.tensor(slots + slots[:1] * pad), non_blocking=True)
        self._rows.fill_(batch)
        length = min(self.max_seq, (max(positions) // BUCKET + 1) * BUCKET)
        return self._replay(size, length)[:batch]

    def _replay(self, batch: int, length: int) -> torch.Tensor:
        """Replay (capturing it first) the step's graph for this batch size and attended length."""
        key = (batch, length)
        if key not in self._graphs:
            span = self.positions[:length]
            torch._dynamo.maybe_mark_dynamic(span, 0)  # one compiled step for every length
            if batch > 1:  # and one for every batch size above 1
                for t in self._inputs[batch]:
                    torch._dynamo.maybe_mark_dynamic(t, 0)
            self._graphs[key] = self._capture(batch, span)
        graph, logits = self._graphs[key]
        graph.replay()
        return logits

    def _capture(self, batch: int, span: torch.Tensor) -> tuple[Any, torch.Tensor]:
        """A CUDA graph of the compiled step for one batch size and attended length. Its warm-up
        runs write the current tokens' K/V at the current positions, which the replay then writes
        again."""
        tok, pos, slot = self._inputs[batch]
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._step(tok, pos, span, slot, self._rows)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self._step(tok, pos, span, slot, self._rows)
        return graph, logits

    # -- the loop ----------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompt: list[int], max_new: int, *, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, repetition_penalty: float = 1.0, generator: torch.Generator | None = None,
                 stop: Callable[[int], bool] | None = None) -> Iterator[int]:
        """Yield up to ``max_new`` token ids; ``stop(token)`` returning True ends after that token.
        ``repetition_penalty`` (greedy decoding too) and ``top_k`` (0: off) act as transformers'
        ``generate`` applies them: the penalty over every token of the prompt and of the answer so
        far, then the temperature, top-k and top-p."""
        if not prompt:
            raise ValueError("the fast path needs at least one prompt token")
        if len(prompt) + max_new > self.max_seq:
            raise FastPathUnsupported(f"{len(prompt)} + {max_new} tokens exceed the fast path's cache of {self.max_seq}")
        tokens = torch.tensor(prompt, dtype=torch.long, device=self.device)
        logits = self.prefill(tokens)[0]
        seen = None
        if repetition_penalty != 1.0:  # which ids were seen, kept on the device so picking never waits
            seen = torch.zeros(logits.shape[-1], dtype=torch.bool, device=self.device).index_fill_(0, tokens, True)

        def choose(logits: torch.Tensor) -> torch.Tensor:
            if seen is not None:
                logits = penalize(logits, seen, repetition_penalty)
            token = pick(logits, temperature, top_p, top_k, generator)
            if seen is not None:
                seen.index_fill_(0, token, True)
            return token

        if os.environ.get("JUPYBOX_PIPELINE", "1") != "0":
            yield from self._queued(prompt, choose(logits), max_new, stop, choose)
            return
        for i in range(max_new):  # one token at a time: each read back before the next step is queued
            token = choose(logits)
            value = int(token.item())
            yield value
            if i + 1 == max_new or (stop is not None and stop(value)):
                return
            logits = self.decode(token, len(prompt) + i)

    def _queued(self, prompt: list[int], token: torch.Tensor, max_new: int, stop: Callable[[int], bool] | None,
                pick: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[int]:
        """Decoding with one step queued ahead: the next step's input is this step's pick (the
        argmax, or a sample), made on the GPU, so that step is queued before this token is read
        back. The GPU then never waits for the host's turn (the read-back, the caller's work on the
        token, the next launch). A step queued after the last token (``stop``) is wasted work: it
        writes the cache one position further, which the next prompt's prefill or step rewrites
        before reading."""
        pending = Readback(token)
        for i in range(max_new):
            if i + 1 < max_new:  # queued behind this token's copy to the host
                token = pick(self.decode(token, len(prompt) + i))
                queued = Readback(token)
            value = pending.value()
            yield value
            if i + 1 == max_new or (stop is not None and stop(value)):
                return
            pending = queued


# -- entry points ------------------------------------------------------------------------------------
def load_checkpoint(folder: str | Path, *, device: str | torch.device, dtype: torch.dtype, max_seq: int = 8192,
                    quantize_to: str | None = None, group: int = 128, compile: bool | None = None,
                    slots: int = 1) -> FastDecoder:
    """A decoder from a checkpoint folder (config.json + weights), bf16/fp16/fp32 or GPTQ 4-bit,
    with ``slots`` cache slots (streams decoded together)."""
    folder = Path(folder).expanduser()
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise FastPathUnsupported(f"no readable config.json in {folder}") from exc
    shape = DecoderShape.from_config(cfg)
    quant = cfg.get("quantization_config") or {}
    if quant and str(quant.get("quant_method", "gptq")) != "gptq":
        raise FastPathUnsupported(f"{quant.get('quant_method')} quantization is not implemented by the fast path (GPTQ is)")
    if quant and quant.get("desc_act"):
        raise FastPathUnsupported("act-order (desc_act) GPTQ checkpoints are not supported by the fast path")
    try:
        return FastDecoder(shape, TensorSource(folder=folder), max_seq=max_seq, device=device, dtype=dtype,
                           quant=quant, quantize_to=quantize_to, group=group, compile=compile, slots=slots)
    except (KeyError, UnsupportedQuantization) as exc:
        raise FastPathUnsupported(f"{folder} does not have the weights the fast path expects: {exc}") from exc
