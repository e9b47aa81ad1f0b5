"""Local models through Hugging Face transformers, and Qwen v1 through this project's own decoder.

Targets Qwen-7B-Chat-Int4 (Qwen v1: GPTQ weights, a tiktoken tokenizer without a chat template)
and modern checkpoints (Qwen2/2.5 and any causal LM with a chat template, in bf16 or GPTQ/AWQ
quantized). A checkpoint is a local folder or a hub id found in the local Hugging Face cache
(``resolve_checkpoint``; nothing is downloaded unless ``JUPYBOX_ALLOW_DOWNLOADS=1``).

Qwen v1 (``model_type: "qwen"``) never runs the checkpoint's own Python files: its released code
does not work under transformers 5 (it reads no KV cache, leaves ``logn_tensor`` uninitialised and
re-randomises weights), and a checkpoint's code is code the server would execute as itself. Its
config is read as JSON, its weights by ``fastpath.FastDecoder`` (on the CPU in float32, on a GPU in
bfloat16 with 4-bit kernels for GPTQ), its tokenizer by ``qwen_tokenizer.QwenTokenizer``. Other
families keep transformers' own modeling code; ``trust_remote_code`` (off by default) lets theirs
run the checkpoint's code.

``model.generate`` blocks, so it runs in a thread and hands text back through transformers'
``AsyncTextIteratorStreamer``. A ``threading.Event`` read by a stopping criterion after every token
ends that thread on a stop word, on cancellation and when the caller stops iterating: no
generation outlives its stream. On that path one generation runs at a time per loaded model:
concurrent ``generate`` calls would only share the GPU badly and multiply KV-cache memory, so
callers queue on a lock instead.

On the fast path, concurrent generations run together: ``fastpath.scheduler.DecodeScheduler`` owns
the decoder and decodes up to ``max_streams`` of them in each step (one KV-cache slot each; as many
slots as fit the GPU memory left after the weights), the rest wait in a first-come queue. Stop
words, end tokens, limits, cancellation, usage and finish reasons behave as on the other path.

With ``fast`` (default ``"auto"``: on a CUDA GPU) a Qwen2/Llama-family checkpoint folder, bf16 or
GPTQ 4-bit, is served by ``fastpath.FastDecoder`` too: static KV cache, compiled decode step
replayed as CUDA graphs, int4 matrix products; no GPTQ library needed. Checkpoints it does not
cover fall back to ``generate`` (``fast=True`` refuses instead, ``fast=False`` never tries).

The checkpoint's ``generation_config.json`` (``repetition_penalty``, ``top_k``, ``top_p``) applies on
both paths alike (``Sampling``): the repetition penalty and top-k always, top-p unless the request
asks for a smaller one. Temperature is the request's: 0, jupybox's default, decodes greedily.

torch and transformers are imported when a model loads, so this module imports without them.
"""

from __future__ import annotations

import asyncio
import os
import gc
import importlib.util
import json
import logging
import re
import threading
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from interpreter.errors import ModelCancelled, ModelError, ModelUnavailable
from interpreter.llm.base import (GENERATION_OWNER, LLM, Chunk, GenerationRequest, StopCutter, StreamStats, Usage,
                                  model_family)

logger = logging.getLogger(__name__)

CHAT_END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|im_start|>")  # ChatML turn end, document end, a new turn (Qwen)
QWEN_DEFAULT_SYSTEM = "You are a helpful assistant."  # what Qwen v1 was tuned with
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
# quant_method in a checkpoint's config -> the import names transformers needs to load it
_QUANT_LIBS = {"gptq": ("gptqmodel", "optimum"), "awq": ("gptqmodel",)}
DEFAULT_MAX_STREAMS = 16  # generations decoded together on the fast path
SLOT_HEADROOM = 2 << 30  # GPU memory kept free beside the weights and the cache slots (graphs, prefill, logits)


class _StopWhen:
    """A stopping criterion that transformers calls after every token: ends generation when
    ``halt`` is set (cancelled, or the stream was closed) or a stop word appears in the decoded
    tail of the generated ids, so no tokens are wasted past it."""

    def __init__(self, tokenizer: Any, prompt_len: int, stop: list[str], halt: threading.Event) -> None:
        self.tokenizer, self.prompt_len, self.halt = tokenizer, prompt_len, halt
        self.stop = [s for s in stop if s]
        # a stop word of n characters spans at most n tokens; a few more cover leading-space merges
        self.window = max((len(s) for s in self.stop), default=0) + 4

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        done = self.halt.is_set() or self.hit(input_ids[0, self.prompt_len:].tolist())
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)

    def hit(self, generated: list[int]) -> bool:
        """Whether a stop word is in the decoded tail of the generated ids."""
        if not self.stop:
            return False
        text = self.tokenizer.decode(generated[-self.window:], skip_special_tokens=True)
        return any(s in text for s in self.stop)


@dataclass(frozen=True)
class Sampling:
    """A checkpoint's own sampling settings (its ``generation_config.json``), as both paths apply
    them: ``repetition_penalty`` and ``top_k`` (0: off) always, greedy decoding included; ``top_p``
    when the request leaves its own at 1."""

    repetition_penalty: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    @classmethod
    def of(cls, config: Mapping[str, Any]) -> Sampling:
        def number(key: str, default: float, low: float, high: float) -> float:
            value = config.get(key)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high
            return float(value) if ok else default  # absent, null or out of range: the neutral value

        return cls(repetition_penalty=number("repetition_penalty", 1.0, 1e-3, 100.0),
                   top_k=int(number("top_k", 0, 0, 1 << 30)), top_p=number("top_p", 1.0, 1e-6, 1.0))

    def top_p_for(self, requested: float) -> float:
        return requested if requested < 1.0 else self.top_p


def resolve_checkpoint(model: str, allow_download: bool) -> Path | None:
    """The folder that holds ``model``: itself when it is a folder, else a hub id's snapshot in the
    local Hugging Face cache (fetched first only when ``allow_download``). None: a hub id that is
    not in the cache. Raises ``ModelUnavailable`` for a name that is neither."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if not _HUB_ID.match(model):
        raise ModelUnavailable(f"No model folder at {model}: pass a local checkpoint folder or a hub id.")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
    except ImportError:
        return None
    try:
        return Path(snapshot_download(model, local_files_only=not allow_download))
    except (LocalEntryNotFoundError, HFValidationError, OSError, ValueError):
        return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def chatml(messages: list[dict[str, str]]) -> str:
    """ChatML as Qwen v1 was trained on it, for tokenizers that carry no chat template."""
    if not messages or messages[0]["role"] != "system":
        messages = [{"role": "system", "content": QWEN_DEFAULT_SYSTEM}, *messages]
    turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return turns + "<|im_start|>assistant\n"


class TransformersLLM(LLM):
    """A causal LM loaded in this process. ``model`` is a local checkpoint folder or a hub id
    (served from the local cache: nothing is downloaded where there is no network)."""

    name = "transformers"
    supports_prompt = True  # raw continuation: the Qwen ReAct format writes the ChatML itself
    supports_chat = True
    supports_tools = False
    slow_to_load = True  # minutes for a 7B checkpoint

    def __init__(self, model: str, *, device_map: str | dict[str, Any] = "auto", dtype: str = "auto",
                 trust_remote_code: bool = False, max_context: int | None = None,
                 allow_download: bool | None = None, fast: bool | str = "auto", max_streams: int | None = None) -> None:
        self.model_id, self.device_map, self.dtype = model, device_map, dtype
        self.fast = fast
        self.max_streams = max_streams or DEFAULT_MAX_STREAMS  # generations decoded together (fast path)
        # Never reach a model hub unless asked: a self-hosted server may have no (or watched) egress.
        self.allow_download = (os.environ.get("JUPYBOX_ALLOW_DOWNLOADS") == "1") if allow_download is None else allow_download
        self.trust_remote_code = trust_remote_code
        self.max_context = max_context
        self._folder: Path | None = None  # resolved by _checkpoint()
        self._resolved = False
        self._model_config: dict[str, Any] = {}  # config.json as JSON
        self.model_family = model_family(model.rsplit("/", 1)[-1])
        self._tokenizer: Any = None
        self._model: Any = None
        self._fast: Any = None  # a fastpath.FastDecoder when the fast path serves this model
        self._scheduler: Any = None  # and the fastpath.scheduler.DecodeScheduler that owns it
        self._eos_ids: list[int] = []
        self.sampling = Sampling()
        self._load_lock = asyncio.Lock()
        self._queue = asyncio.Lock()  # callers wait here, cancellably
        self._device_lock = threading.Lock()  # and generate threads here, so one runs even if a join was cut short
        try:
            self._checkpoint()  # the family (for the prompt format's default) from config.json, before loading
        except ModelUnavailable:  # a bad name: said again when the model is used
            pass

    @property
    def context_tokens(self) -> int | None:
        return self.max_context if (self._model is not None or self._fast is not None) else None

    @property
    def qwen_v1(self) -> bool:
        """A Qwen v1 checkpoint: served by this project's own decoder and tokenizer, never its code."""
        self._checkpoint()
        return self._model_config.get("model_type") == "qwen"

    def _checkpoint(self) -> Path | None:
        """The checkpoint's folder (None: a hub id only transformers can resolve), read once."""
        if not self._resolved:
            self._folder = resolve_checkpoint(self.model_id, self.allow_download)
            if self._folder is not None:
                self._model_config = _read_json(self._folder / "config.json")
                self.model_family = model_family(str(self._model_config.get("model_type", ""))) or self.model_family
            self._resolved = True
        return self._folder

    # -- loading ---------------------------------------------------------------------------
    async def load(self) -> None:
        """Load tokenizer and weights in a thread (minutes for a 7B model); idempotent."""
        async with self._load_lock:
            if self._model is None and self._fast is None:
                await asyncio.to_thread(self._load)

    def _load(self) -> None:
        if self.qwen_v1:
            self._load_qwen_v1()
            return
        started = time.monotonic()
        cfg = self._config()
        if self._load_fast(cfg):
            return
        quant = getattr(cfg, "quantization_config", None)
        method = (quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None))
        method = str(getattr(method, "value", method) or "")
        missing = [lib for lib in _QUANT_LIBS.get(method, ()) if importlib.util.find_spec(lib) is None]
        if missing:
            raise ModelUnavailable(
                f"{self.model_id} is a {method.upper()} checkpoint: install {' and '.join(missing)} "
                f"(`pip install {' '.join(missing)}`; see the README's section on local models).")
        from transformers import AutoModelForCausalLM

        tokenizer = self._load_tokenizer()
        try:
            model = AutoModelForCausalLM.from_pretrained(
                self._source, device_map=self.device_map, dtype=self.dtype, trust_remote_code=self.trust_remote_code,
                local_files_only=not self.allow_download)
        except ImportError as exc:
            raise ModelUnavailable(_import_failure(self.model_id, exc)) from exc
        except RuntimeError as exc:
            if "GPU" in str(exc) or "CUDA" in str(exc):
                raise ModelUnavailable(
                    f"{self.model_id} ({method or 'this checkpoint'}) needs a CUDA GPU and none is visible here: "
                    "run it on a GPU host or serve it with the openai backend.") from exc
            raise ModelError(f"Could not load {self.model_id}: {_first_line(exc)}") from exc
        except (OSError, ValueError) as exc:
            raise ModelUnavailable(f"Could not load the weights of {self.model_id}: {_first_line(exc)}") from exc
        model.eval()
        self.max_context = self.max_context or _context_length(cfg)
        self.model_family = model_family(str(getattr(cfg, "model_type", ""))) or self.model_family
        self.sampling = Sampling.of(model.generation_config.to_dict())
        self._finish_load(tokenizer, getattr(model.generation_config, "eos_token_id", None), model=model)
        logger.info("loaded %s (%s, quantization %s) on %s in %.1f s", self.model_id, getattr(cfg, "model_type", "?"),
                    method or "none", getattr(model, "device", "?"), time.monotonic() - started)

    def _load_qwen_v1(self) -> None:
        """Qwen v1 on this project's decoder and tokenizer, from the folder's files read as data."""
        import torch

        from interpreter.llm import fastpath

        folder = self._checkpoint()
        assert folder is not None
        if self.fast is False:
            raise ModelUnavailable(
                f"{self.model_id} is a Qwen v1 checkpoint, which jupybox serves with its own decoder only "
                "(Qwen v1's released modeling code does not work under transformers 5): leave fast at its default.")
        started = time.monotonic()
        on_cpu = self.device_map == "cpu" or not torch.cuda.is_available()
        dtypes = {"auto": torch.float32 if on_cpu else torch.bfloat16, "float32": torch.float32,
                  "bfloat16": torch.bfloat16, "float16": torch.float16}
        if str(self.dtype) not in dtypes:
            raise ModelUnavailable(f"dtype {self.dtype!r} is not one of {', '.join(dtypes)}.")
        tokenizer = self._load_tokenizer()
        try:
            device, dtype = torch.device("cpu" if on_cpu else "cuda"), dtypes[str(self.dtype)]
            fast = fastpath.load_checkpoint(folder, device=device, dtype=dtype, max_seq=self.max_context or 8192,
                                            slots=self._slots(folder, device, dtype))
            fast.warm_up()
        except fastpath.FastPathUnsupported as exc:
            raise ModelUnavailable(f"{self.model_id} is a Qwen v1 checkpoint jupybox's decoder cannot serve: {exc}. "
                                   "Serve it with an OpenAI-compatible server (--openai-base-url).") from exc
        except (OSError, RuntimeError) as exc:
            raise ModelUnavailable(f"Could not load the weights of {self.model_id}: {_first_line(exc)}") from exc
        self.max_context = fast.max_seq
        self.sampling = Sampling.of(_read_json(folder / "generation_config.json"))
        self._finish_load(tokenizer, self._model_config.get("eos_token_id"), fast=fast)
        logger.info("loaded %s (Qwen v1) on jupybox's decoder (%s, %s) in %.1f s", self.model_id, fast.device,
                    str(fast.dtype).removeprefix("torch."), time.monotonic() - started)

    def _load_fast(self, cfg: Any) -> bool:
        """Serve the model with the fast path where asked and possible; False: use ``generate``."""
        import torch

        on_cpu = self.device_map == "cpu" or not torch.cuda.is_available()
        folder = self._checkpoint()
        if self.fast is False or (self.fast == "auto" and (on_cpu or folder is None)):
            return False
        from interpreter.llm import fastpath

        started = time.monotonic()
        try:
            if folder is None:
                raise fastpath.FastPathUnsupported("the fast path reads local checkpoint folders only")
            device, dtype = torch.device("cpu" if on_cpu else "cuda"), torch.float32 if on_cpu else torch.bfloat16
            fast = fastpath.load_checkpoint(folder, device=device, dtype=dtype, max_seq=self.max_context or 8192,
                                            slots=self._slots(folder, device, dtype))
            fast.warm_up()  # compile and capture at load, not during the first answer
        except Exception as exc:  # unsupported, or the compiler or graph capture failed on this machine
            if self.fast is True:
                raise ModelUnavailable(f"The fast path cannot serve {self.model_id}: {_first_line(exc)} "
                                       "(pass fast=False).") from exc
            log = logger.info if isinstance(exc, fastpath.FastPathUnsupported) else logger.warning
            log("fast path not used for %s: %s", self.model_id, exc)
            fast = None
            gc.collect()
            if not on_cpu:
                torch.cuda.empty_cache()
            return False
        tokenizer = self._load_tokenizer()
        self.max_context = fast.max_seq
        self.model_family = model_family(fast.shape.naming) or self.model_family
        assert folder is not None
        self.sampling = Sampling.of(_read_json(folder / "generation_config.json"))
        self._finish_load(tokenizer, getattr(cfg, "eos_token_id", None), fast=fast)
        logger.info("loaded %s on the fast path (%s) in %.1f s", self.model_id, fast.device, time.monotonic() - started)
        return True

    def _slots(self, folder: Path, device: Any, dtype: Any) -> int:
        """KV-cache slots for the fast path: ``max_streams``, or as many as fit the memory left
        (the GPU's, or the host's on a CPU) once the weights (their files' size) are loaded,
        keeping ``SLOT_HEADROOM`` free; at least one."""
        import torch

        from interpreter.llm.fastpath import DecoderShape
        from interpreter.llm.fastpath.scheduler import fit_slots

        shape = DecoderShape.from_config(self._model_config)
        max_seq = min(self.max_context or 8192, shape.max_context)
        slot_bytes = 2 * shape.n_layers * shape.n_kv_heads * max_seq * shape.head_dim * dtype.itemsize
        weights = sum(f.stat().st_size for f in folder.iterdir() if f.suffix in (".safetensors", ".bin"))
        if device.type == "cuda":
            free, where = torch.cuda.mem_get_info(device)[0], "on the GPU"
        else:
            free, where = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "in the host's memory"
        slots = fit_slots(self.max_streams, slot_bytes, free - weights, SLOT_HEADROOM)
        logger.info("the fast path decodes up to %d streams together (--max-streams %d; %.2f GiB of KV cache per "
                    "stream of %d positions, %.1f GiB free %s before %.1f GiB of weights)", slots, self.max_streams,
                    slot_bytes / 2**30, max_seq, free / 2**30, where, weights / 2**30)
        return slots

    def _finish_load(self, tokenizer: Any, config_eos: Any, *, model: Any = None, fast: Any = None) -> None:
        """Keep what a load made; generation ends on the config's end ids and the chat end tokens.
        A fast-path decoder gets its scheduler, which serves every generation from now on."""
        eos: list[int] = []
        for ids in (config_eos, tokenizer.eos_token_id, *(_single_token(tokenizer, t) for t in CHAT_END_TOKENS)):
            eos += [i for i in (ids if isinstance(ids, list) else [ids]) if isinstance(i, int) and i not in eos]
        scheduler = None
        if fast is not None:
            from interpreter.llm.fastpath.scheduler import DecodeScheduler

            scheduler = DecodeScheduler(fast, max_streams=self.max_streams).start()
        self._tokenizer, self._model, self._fast, self._eos_ids = tokenizer, model, fast, eos
        self._scheduler = scheduler

    def streams(self) -> StreamStats | None:
        """The fast path's streams now (None on the ``generate`` path or before loading)."""
        scheduler = self._scheduler
        if scheduler is None:
            return None
        s = scheduler.stats()
        return StreamStats(slots=s.streams, active=s.active, queued=s.queued, tokens=s.tokens,
                           tokens_per_s=s.tokens_per_s)

    @property
    def _source(self) -> str:
        """What transformers loads from: the resolved folder, or the hub id it resolves itself."""
        folder = self._checkpoint()
        return str(folder) if folder is not None else self.model_id

    def _config(self) -> Any:
        folder = self._checkpoint()
        try:
            from transformers import AutoConfig
        except ImportError as exc:
            raise ModelUnavailable("The transformers backend needs torch and transformers: "
                                   "`pip install 'jupybox[local]'`.") from exc
        try:
            return AutoConfig.from_pretrained(self._source, trust_remote_code=self.trust_remote_code,
                                              local_files_only=not self.allow_download)
        except ImportError as exc:
            raise ModelUnavailable(_import_failure(self.model_id, exc)) from exc
        except (OSError, ValueError) as exc:
            if folder is not None and self._model_config.get("auto_map") and not self.trust_remote_code:
                raise ModelUnavailable(
                    f"{self.model_id} is a model transformers does not know, defined by Python files inside the "
                    "checkpoint: jupybox runs them only with --trust-remote-code (they execute as the server "
                    "itself, outside any sandbox), or serve it with an OpenAI-compatible server.") from exc
            where = "is not a checkpoint folder" if folder is not None else "is neither a local folder nor in the local hub cache"
            raise ModelUnavailable(f"{self.model_id} {where}: download the checkpoint and pass its folder (or set JUPYBOX_ALLOW_DOWNLOADS=1 to fetch it).") from exc

    def _load_tokenizer(self) -> Any:
        if self._tokenizer is None:
            if self.qwen_v1:
                from interpreter.llm.qwen_tokenizer import QwenTokenizer

                assert self._folder is not None
                self._tokenizer = QwenTokenizer.from_folder(self._folder)
                return self._tokenizer
            from transformers import AutoTokenizer

            try:
                self._tokenizer = AutoTokenizer.from_pretrained(self._source, trust_remote_code=self.trust_remote_code,
                                                                local_files_only=not self.allow_download)
            except ImportError as exc:
                raise ModelUnavailable(_import_failure(self.model_id, exc, "tokenizer")) from exc
            except (OSError, ValueError) as exc:
                raise ModelUnavailable(f"No tokenizer could be loaded from {self.model_id}.") from exc
        return self._tokenizer

    def count_tokens(self, text: str) -> int:
        if self._tokenizer is None:
            if not self.qwen_v1:
                self._config()
            self._load_tokenizer()
        return len(self._tokenizer.encode(text, add_special_tokens=False))

    async def close(self) -> None:
        if self._model is None and self._fast is None:
            return  # nothing loaded (maybe torch is not even installed)
        if self._scheduler is not None:
            await asyncio.to_thread(self._scheduler.close)
        self._model = self._fast = self._scheduler = None
        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # -- generation ------------------------------------------------------------------------
    def render(self, request: GenerationRequest) -> str:
        """The text the model continues: the raw prompt, or the messages through the tokenizer's chat
        template (hand-built ChatML where it has none, as for Qwen v1)."""
        if request.prompt is not None:
            return request.prompt
        messages = [{"role": m.role, "content": m.text()} for m in request.messages or []]
        if getattr(self._tokenizer, "chat_template", None):
            return str(self._tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        return chatml(messages)

    async def stream(self, request: GenerationRequest, cancel: asyncio.Event | None = None) -> AsyncIterator[Chunk]:
        from transformers import AsyncTextIteratorStreamer, StoppingCriteriaList

        await self.load()
        tok = self._tokenizer
        device = self._fast.device if self._fast is not None else self._model.device
        # a rendered chat template already has its BOS; a raw prompt gets the tokenizer's usual one
        enc = tok(self.render(request), return_tensors="pt", add_special_tokens=request.prompt is not None)
        prompt_len = int(enc["input_ids"].shape[1])
        max_new = request.max_tokens
        if self.max_context:
            if prompt_len >= self.max_context:
                raise ModelError(f"The prompt is {prompt_len} tokens and {self.model_id} takes at most "
                                 f"{self.max_context}: shorten the conversation or pass max_context=.")
            max_new = min(max_new, self.max_context - prompt_len)
        if self._scheduler is not None:
            async for chunk in self._scheduled(request, enc["input_ids"][0].tolist(), max_new, cancel):
                yield chunk
            return
        sampling = request.temperature > 0
        halt = threading.Event()
        async with self._queue:
            streamer = AsyncTextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
            pad = tok.pad_token_id if tok.pad_token_id is not None else (self._eos_ids or [0])[0]
            kwargs: dict[str, Any] = {
                "input_ids": enc["input_ids"].to(device),
                "attention_mask": enc["attention_mask"].to(device),
                "streamer": streamer, "max_new_tokens": max_new, "do_sample": sampling,
                "stopping_criteria": StoppingCriteriaList([_StopWhen(tok, prompt_len, request.stop, halt)]),
                "eos_token_id": self._eos_ids, "pad_token_id": pad,
                "repetition_penalty": self.sampling.repetition_penalty,
            }
            if sampling:
                kwargs.update(temperature=request.temperature, top_p=self.sampling.top_p_for(request.top_p),
                              top_k=self.sampling.top_k)
            result: dict[str, Any] = {}
            thread = threading.Thread(target=self._generate, args=(kwargs, request.seed, halt, streamer, result),
                                      name="jupybox-generate", daemon=True)
            watcher = asyncio.create_task(_set_when(cancel, halt)) if cancel is not None else None
            thread.start()
            text = StopCutter(request.stop)
            try:
                async for piece in streamer:
                    if shown := text.add(piece):
                        yield Chunk(text=shown)
                    if text.stopped or halt.is_set():
                        break
            finally:
                halt.set()
                if watcher is not None:
                    watcher.cancel()
                if thread.is_alive():
                    await asyncio.shield(asyncio.to_thread(thread.join))
        if "error" in result:
            exc = result["error"]
            raise ModelError(f"Generation with {self.model_id} failed: {_first_line(exc)}") from exc
        if cancel is not None and cancel.is_set() and not text.stopped:
            raise ModelCancelled("Generation was cancelled.")
        ids: list[int] = result.get("ids", [])
        if text.stopped or (ids and ids[-1] in self._eos_ids) or len(ids) < max_new:
            reason = "stop"
        else:
            reason = "length"
        yield Chunk(text=text.rest(), finish_reason=reason,
                    usage=Usage(prompt_tokens=prompt_len, completion_tokens=len(ids)))

    async def _scheduled(self, request: GenerationRequest, prompt: list[int], max_new: int,
                         cancel: asyncio.Event | None) -> AsyncIterator[Chunk]:
        """``stream`` on the fast path: the request joins the decode scheduler's streams; its text
        is detokenized as transformers' streamer does it, and cut at stop words the same way."""
        from interpreter.llm.fastpath.scheduler import StreamRequest

        tok = self._tokenizer
        sampling = request.temperature > 0
        words = _StopWhen(tok, 0, request.stop, threading.Event())
        handle = self._scheduler.submit(StreamRequest(
            prompt=prompt, max_new=max_new, temperature=request.temperature if sampling else 0.0,
            top_p=self.sampling.top_p_for(request.top_p) if sampling else 1.0,
            top_k=self.sampling.top_k if sampling else 0, repetition_penalty=self.sampling.repetition_penalty,
            seed=request.seed if sampling else None, end_tokens=frozenset(self._eos_ids),
            stop=words.hit if words.stop else None, owner=GENERATION_OWNER.get()))
        pieces = _text_pieces(tok, prompt)
        watcher = asyncio.create_task(_cancel_when(cancel, handle)) if cancel is not None else None
        text = StopCutter(request.stop)
        try:
            async for token in handle:
                if shown := text.add("".join(pieces.add(token))):
                    yield Chunk(text=shown)
                if text.stopped:
                    break
            if not text.stopped and (shown := text.add("".join(pieces.end()))):
                yield Chunk(text=shown)
            handle.cancel()  # a stop word seen here first: the stream ends at the scheduler's next turn
            async for _ in handle:  # its last tokens, so that usage counts what was generated
                pass
        finally:
            handle.cancel()  # no-op once it is done; otherwise the caller left early
            if watcher is not None:
                watcher.cancel()
        if handle.finish_reason == "error":
            exc = handle.error
            raise ModelError(f"Generation with {self.model_id} failed: {_first_line(exc)}") from exc
        if cancel is not None and cancel.is_set() and not text.stopped:
            raise ModelCancelled("Generation was cancelled.")
        ids = handle.tokens
        reason = "stop" if text.stopped or (ids and ids[-1] in self._eos_ids) or len(ids) < max_new else "length"
        yield Chunk(text=text.rest(), finish_reason=reason,
                    usage=Usage(prompt_tokens=len(prompt), completion_tokens=len(ids)))

    def _generate(self, kwargs: dict[str, Any], seed: int | None, halt: threading.Event, streamer: Any,
                  result: dict[str, Any]) -> None:
        """The generate thread: waits its turn on the device, then decodes until a criterion stops it."""
        import torch

        try:
            with self._device_lock:
                if halt.is_set():
                    return
                if seed is not None:
                    torch.manual_seed(seed)
                out = self._model.generate(**kwargs)
                result["ids"] = out[0, kwargs["input_ids"].shape[1]:].tolist()
        except Exception as exc:  # reported by stream(), which owns the caller
            logger.exception("generation failed")
            result["error"] = exc
        finally:
            try:
                streamer.on_finalized_text("", stream_end=True)  # never leave the reader waiting
            except RuntimeError:  # the reader's event loop is already closed
                pass


async def _set_when(cancel: asyncio.Event, halt: threading.Event) -> None:
    await cancel.wait()
    halt.set()


async def _cancel_when(cancel: asyncio.Event, handle: Any) -> None:
    await cancel.wait()
    handle.cancel()


def _text_pieces(tokenizer: Any, prompt: list[int]) -> Any:
    """Text from token ids as ``generate``'s streamer makes it (whole words, a line at a time, the
    prompt skipped): ``add(token)`` and ``end()`` return the pieces finished by then."""
    import torch
    from transformers import TextStreamer

    class Pieces(TextStreamer):
        def __init__(self) -> None:
            super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
            self.ready: list[str] = []

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if text:
                self.ready.append(text)

        def add(self, token: int) -> list[str]:
            self.put(torch.tensor([token]))
            return self.take()

        def end(self) -> list[str]:  # type: ignore[override]
            super().end()
            return self.take()

        def take(self) -> list[str]:
            ready, self.ready = self.ready, []
            return ready

    pieces = Pieces()
    pieces.put(torch.tensor([prompt]))  # skipped, as generate's first put is
    return pieces


def _single_token(tokenizer: Any, text: str) -> int | None:
    """The id of ``text`` when the tokenizer holds it as one token (special tokens of Qwen v1's
    tiktoken tokenizer are found this way too: it has no ``eos_token`` set)."""
    try:
        ids = tokenizer.encode(text, add_special_tokens=False)
    except (ValueError, TypeError, KeyError):  # a tokenizer that refuses special text
        return None
    return int(ids[0]) if len(ids) == 1 else None


def _context_length(cfg: Any) -> int | None:
    for key in ("max_position_embeddings", "seq_length", "n_positions"):
        if isinstance(getattr(cfg, key, None), int):
            return int(getattr(cfg, key))
    return None


def _import_failure(model: str, exc: ImportError, what: str = "model") -> str:
    """What an import failure while loading means: a library that is not installed, or code (the
    checkpoint's, or a library's) that fails to import with what is installed."""
    missing = getattr(exc, "name", None) if isinstance(exc, ModuleNotFoundError) else None
    text = _first_line(exc)
    if missing or "following packages that were not found" in text:
        return f"Loading the {what} of {model} needs a library that is not installed: {text}"
    return (f"Loading the {what} of {model} failed while importing code (nothing is missing: the code does not work "
            f"with the installed libraries): {text}")


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
