"""The decode step's GPU kernels: ``int4_mma`` (4-bit weights on tensor cores, CUDA through
``nvrtc``), ``int4_gemv`` and ``bf16_gemv`` (Triton matrix-vector products), ``decode_attention``
(flash decoding with the rotary and cache write fused), and ``gemv``, what they share (the cache of
timed launch shapes, the CUDA-graph timer, programmatic launch)."""
