"""The fast path: this project's own decoder for the Qwen/Llama family, behind the transformers
backend (``decoder``), with what it is made of in rooms of their own:

* ``weights`` (checkpoint names and shapes), ``gptq_pack`` (4-bit weights), ``positions`` (rotary
  and log-n tables): the model's arithmetic, on any device;
* ``scheduler`` (``DecodeScheduler``: several generations sharing each decode step, the decoder
  owned by one thread) and ``streams`` (a stream's request and the handle its tokens arrive on);
* ``kernels/``: the GPU kernels of the decode step (int4 and bf16 matrix products, decode
  attention), their run-time compiler and the timing of their launch shapes.
"""

from interpreter.llm.fastpath.decoder import (BUCKET, DecoderShape, FastDecoder, FastPathUnsupported, QWEN_7B,
                                              TensorSource, decode_attention_kernel, load_checkpoint,
                                              random_weights)

__all__ = ["BUCKET", "DecoderShape", "FastDecoder", "FastPathUnsupported", "QWEN_7B", "TensorSource",
           "decode_attention_kernel", "load_checkpoint", "random_weights"]
