"""What the fast path says when it cannot serve: one base, so a caller catches one thing.

``FastPathUnsupported``: this model, option or cache is outside what the fast path implements; the
transformers backend then serves the model with ``model.generate``. ``KernelUnavailable``, one kind
of it: one of the fast path's own GPU kernels cannot run here (no GPU, compiler or Triton, a launch
shape the GPU refuses, a check at load that failed); the layer then keeps a slower kernel, and only
where none is left does the whole fast path step aside.
"""

from __future__ import annotations


class FastPathUnsupported(ValueError):
    """This model or option is outside what the fast path implements (the plain path still works)."""


class KernelUnavailable(FastPathUnsupported, RuntimeError):
    """One of the fast path's own kernels cannot run here; a slower one serves instead."""
