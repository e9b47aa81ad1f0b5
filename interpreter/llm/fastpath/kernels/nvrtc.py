"""CUDA C++ compiled at run time (NVRTC) and launched on PyTorch's current stream: for kernels
Triton cannot express (``int4_mma``'s tensor-core operands, built in registers).

No CUDA toolkit is needed: CUDA builds of PyTorch bring NVRTC (``nvidia-cuda-nvrtc``), and the
driver loads the compiled code. Launches go through ``cuLaunchKernelEx``, so a kernel can start as
a programmatic dependent of the one before it (``gemv.programmatic_launch``), and a CUDA graph
captures them like any other launch.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from interpreter.llm.fastpath.errors import KernelUnavailable

log = logging.getLogger(__name__)


class NvrtcError(KernelUnavailable):
    """No NVRTC or driver library here, or the source did not compile or load."""


def _load(names: Sequence[str], what: str) -> ctypes.CDLL:
    errors = []
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError as exc:
            errors.append(str(exc))
    raise NvrtcError(f"no {what} library could be loaded ({'; '.join(errors)})")


_LIBS: dict[str, ctypes.CDLL] = {}


def nvrtc_library() -> ctypes.CDLL:
    """NVRTC: ``$JUPYBOX_NVRTC`` if set, else the one matching PyTorch's CUDA (already loaded by
    PyTorch), else any on the loader's path or in an ``nvidia-cuda-nvrtc`` wheel."""
    if "nvrtc" not in _LIBS:
        names = [os.environ["JUPYBOX_NVRTC"]] if os.environ.get("JUPYBOX_NVRTC") else []
        if torch.version.cuda:
            names.append(f"libnvrtc.so.{torch.version.cuda.split('.')[0]}")
        names += ["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"]
        try:
            import nvidia  # the namespace of NVIDIA's wheels (nvidia-cuda-nvrtc-cu12 and the like)

            names += sorted(str(p) for root in nvidia.__path__ for p in Path(root).glob("*/lib/libnvrtc.so.*[0-9]")
                            if "builtins" not in p.name and ".alt." not in p.name)
        except ImportError:
            pass
        _LIBS["nvrtc"] = _load(names, "NVRTC")
    return _LIBS["nvrtc"]


def _driver() -> ctypes.CDLL:
    if "cuda" not in _LIBS:
        _LIBS["cuda"] = _load(["libcuda.so.1", "libcuda.so"], "CUDA driver")
    return _LIBS["cuda"]


def compile_cubin(source: str, name: str, arch: str, options: Sequence[str] = ()) -> bytes:
    """The cubin of ``source`` for ``sm_<arch>`` (e.g. ``"90"``), with kernel ``name`` kept."""
    lib = nvrtc_library()
    prog = ctypes.c_void_p()

    def check(status: int, step: str) -> None:
        if status != 0:
            lib.nvrtcGetErrorString.restype = ctypes.c_char_p
            raise NvrtcError(f"NVRTC {step} failed: {lib.nvrtcGetErrorString(status).decode()}")

    check(lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), f"{name}.cu".encode(), 0, None, None), "create")
    try:
        check(lib.nvrtcAddNameExpression(prog, name.encode()), "name")
        opts = [f"--gpu-architecture=sm_{arch}".encode(), b"--std=c++17", *(o.encode() for o in options)]
        status = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        text = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, text)
        if status != 0:
            raise NvrtcError(f"{name} did not compile for sm_{arch}:\n{text.value.decode(errors='replace')}")
        if text.value.strip():
            log.info("NVRTC on %s: %s", name, text.value.decode(errors="replace"))
        check(lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "cubin size")
        cubin = ctypes.create_string_buffer(size.value)
        check(lib.nvrtcGetCUBIN(prog, cubin), "cubin")
        return cubin.raw
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


class _LaunchAttribute(ctypes.Structure):  # CUlaunchAttribute: an id, then a 64-byte value union
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_int), ("value", ctypes.c_int * 16)]


class _LaunchConfig(ctypes.Structure):  # CUlaunchConfig
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("shared", ctypes.c_uint),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(_LaunchAttribute)), ("n_attrs", ctypes.c_uint)]


PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION


class Kernel:
    """One kernel of a loaded cubin, on one device."""

    def __init__(self, cubin: bytes, name: str, device: torch.device) -> None:
        cuda = _driver()
        self.device = device
        self._module, self._function = ctypes.c_void_p(), ctypes.c_void_p()
        with torch.cuda.device(device):  # the device's primary context, current on this thread
            torch.cuda.current_stream(device)
            status = cuda.cuModuleLoadData(ctypes.byref(self._module), cubin)
            if status == 0:
                status = cuda.cuModuleGetFunction(ctypes.byref(self._function), self._module, name.encode())
        if status != 0:
            raise NvrtcError(f"the driver did not load {name} (CUresult {status})")

    def __call__(self, grid: tuple[int, int, int], block: tuple[int, int, int], args: Sequence[Any],
                 programmatic: bool = False) -> None:
        """Launch on the current stream; ``args`` are tensors (their data pointers) and ints."""
        values: list[Any] = [ctypes.c_void_p(a.data_ptr()) if isinstance(a, torch.Tensor) else ctypes.c_int(a)
                             for a in args]
        params = (ctypes.c_void_p * len(values))(*(ctypes.cast(ctypes.byref(v), ctypes.c_void_p) for v in values))
        attr = _LaunchAttribute(PROGRAMMATIC_STREAM_SERIALIZATION, 0)
        attr.value[0] = 1
        config = _LaunchConfig((ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(*block), 0,
                               ctypes.c_void_p(torch.cuda.current_stream(self.device).cuda_stream),
                               ctypes.pointer(attr) if programmatic else None, 1 if programmatic else 0)
        status = _driver().cuLaunchKernelEx(ctypes.byref(config), self._function, params, None)
        if status != 0:
            raise NvrtcError(f"kernel launch failed (CUresult {status})")
