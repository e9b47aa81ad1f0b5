"""The fast path's int4 tensor-core kernel (``interpreter/llm/fastpath/kernels/int4_mma.py``) on a machine without a
GPU: its weight layout against the PTX operand layout of ``mma.m16n8k16``, the kernel's arithmetic
read through that layout against the dequantized weight, and its CUDA source compiled by the real
NVRTC for Ampere and Hopper with the compiler's resource report checked. That it runs correctly is
checked on a GPU, at every load (``MmaInt4._check``), and its speed by ``python -m bench.int4_gemv``."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from interpreter.llm.fastpath.kernels import int4_mma, nvrtc  # noqa: E402
from interpreter.llm.fastpath.gptq_pack import PackedInt4, quantize  # noqa: E402

SHAPES = [(48, 576, 64), (32, 256, 128), (16, 512, 256), (64, 1024, 128)]


@pytest.mark.parametrize("n_out,n_in,group", SHAPES)
def test_packing_round_trips_and_the_kernels_arithmetic_gives_the_dequantized_product(n_out: int, n_in: int,
                                                                                   group: int) -> None:
    gen = torch.Generator().manual_seed(n_out + n_in)
    w = quantize(torch.randn(n_out, n_in, generator=gen) * 0.02, group)
    packed = int4_mma.pack(w.q, w.scales_zeros, group)
    assert packed.shape == (n_out, n_in)
    q, scales_zeros = int4_mma.unpack(packed)
    assert torch.equal(q, w.q) and torch.equal(scales_zeros, w.scales_zeros)
    assert torch.equal(int4_mma.dequantize(packed.words, packed.sz, group, torch.float32), w.dequantize(torch.float32))
    x = (torch.randn(n_in, generator=gen) * 3).to(torch.bfloat16)
    ref = w.dequantize(torch.float64) @ x.double()
    got = int4_mma.emulate(x, packed)
    assert float((got - ref).norm() / ref.norm()) < 1e-12
    # the same words read with the activation's inputs in plain order would be wrong: the
    # permutation inside a chunk is part of what is checked
    shuffled = int4_mma.emulate(x.view(-1, 64).flip(1).reshape(-1), packed)
    assert float((shuffled - ref).norm() / ref.norm()) > 1e-2


def test_each_word_holds_the_operand_registers_the_ptx_fragment_layout_names() -> None:
    """For ``mma.m16n8k16`` with 16-bit inputs, PTX gives lane ``4g + t`` the A registers
    (row g, k 2t..2t+1), (row g+8, same k), (row g, k 2t+8..2t+9), (row g+8, k 2t+8..2t+9), each pair's
    lower k in the lower half, and the B registers (k 2t..2t+1) and (k 2t+8..2t+9). The kernel feeds
    B from the activation's 16 inputs ``16t..16t+15`` of the chunk, step ``j`` taking words ``2j``
    and ``2j+1`` of them; so A's k ``2t + e`` at step j is input ``16t + 4j + e`` and ``2t + 8 + e``
    is ``16t + 4j + 2 + e``. The kernel's register ``r`` is ``(word >> 4r) & 0x000F000F``."""
    gen = torch.Generator().manual_seed(7)
    n_out, n_in, group = 32, 128, 64
    q = torch.randint(0, 16, (n_out, n_in), generator=gen, dtype=torch.uint8)
    sz = torch.rand(n_in // group, n_out, 2, generator=gen).to(torch.bfloat16)
    words = int4_mma.pack(q, sz, group).words.long() & 0xFFFFFFFF
    for tile in range(n_out // 16):
        for chunk in range(n_in // 64):
            for lane in range(32):
                g, t = divmod(lane, 4)
                for j in range(4):
                    word = int(words[tile, chunk, lane, j])
                    for r, (row, hi_k) in enumerate([(g, False), (g + 8, False), (g, True), (g + 8, True)]):
                        for e, bits in ((0, 4 * r), (1, 16 + 4 * r)):  # lower k in the lower half
                            k = 64 * chunk + 16 * t + 4 * j + (2 if hi_k else 0) + e
                            assert (word >> bits) & 0xF == int(q[16 * tile + row, k])


def test_a_gate_up_weight_packs_in_tile_pairs_and_unpacks_to_its_own_rows() -> None:
    gen = torch.Generator().manual_seed(3)
    n_out, n_in = 96, 256  # gate and up of 48 rows each: three tile pairs
    w = quantize(torch.randn(n_out, n_in, generator=gen) * 0.02, 64)
    order = int4_mma.glu_order(n_out)
    assert order[:32].tolist() == list(range(16)) + list(range(48, 64))  # gate rows 0-15, then up rows 0-15
    assert sorted(order.tolist()) == list(range(n_out))
    packed = int4_mma.pack(w.q, w.scales_zeros, 64, glu=True)
    q, scales_zeros = int4_mma.unpack(packed)
    assert torch.equal(q, w.q) and torch.equal(scales_zeros, w.scales_zeros)
    x = torch.randn(n_in, generator=gen).to(torch.bfloat16)
    ref = w.dequantize(torch.float64) @ x.double()
    assert float((int4_mma.emulate(x, packed) - ref[order]).norm() / ref.norm()) < 1e-12  # rows as stored
    # a prompt multiplies by the weight unpacked to its own row order, by the compiled unpacker a GPU runs
    from interpreter.llm.fastpath.gptq_pack import compiled_unpacker

    unpacked = compiled_unpacker(int4_mma.dequantize)(packed.words, packed.sz, 64, torch.float32, True)
    assert torch.equal(unpacked, w.dequantize(torch.float32))
    assert not int4_mma.glu_fits(80)  # 40 gate rows do not fill whole tiles
    with pytest.raises(int4_mma.Int4MmaUnavailable):
        int4_mma.pack(w.q[:80], w.scales_zeros[:, :80], 64, glu=True)
    assert all(c.tiles % 2 == 0 for c in int4_mma.candidates(glu=True))


def test_the_load_time_check_passes_the_kernels_arithmetic_and_refuses_a_wrong_product() -> None:
    """``gptq_pack.product_error``, which every 4-bit kernel's check at load runs, fed the kernel's
    own arithmetic read through its layout (plain and SiLU-fused) and two wrong products."""
    from interpreter.llm.fastpath.gptq_pack import product_error

    w = quantize(torch.randn(128, 512, generator=torch.Generator().manual_seed(3)), 64)
    plain, fused = int4_mma.pack(w.q, w.scales_zeros, 64), int4_mma.pack(w.q, w.scales_zeros, 64, glu=True)

    def silu_ending(x: torch.Tensor) -> torch.Tensor:  # the kernel's ending on rows stored in tile pairs
        pairs = int4_mma.emulate(x, fused).float().view(-1, 2, 16).to(torch.bfloat16).float()
        return (torch.nn.functional.silu(pairs[:, 0]).to(torch.bfloat16).float() * pairs[:, 1]).reshape(-1)

    assert product_error(w, lambda x: int4_mma.emulate(x, plain)) < 1e-6
    assert product_error(w, silu_ending, glu=True) < 1e-2
    assert product_error(w, lambda x: int4_mma.emulate(x, plain).flip(0)) > 0.5  # rows out of order
    assert product_error(w, lambda x: silu_ending(x).view(-1, 16).flip(1).reshape(-1), glu=True) > 0.5


def test_weights_the_kernel_cannot_take_are_refused_with_the_reason() -> None:
    assert int4_mma.supports(4096, 11008, 128) and int4_mma.supports(576, 576, 64)
    assert not int4_mma.supports(40, 256, 128)  # rows not in whole tiles of 16
    assert not int4_mma.supports(64, 256, 32)  # groups smaller than a 64-input chunk
    w = quantize(torch.randn(40, 256), 128)
    with pytest.raises(int4_mma.Int4MmaUnavailable, match="40x256"):
        int4_mma.pack(w.q, w.scales_zeros, 128)


def test_without_a_gpu_the_layer_refuses_and_the_fast_path_keeps_pytorchs_kernel(monkeypatch) -> None:
    from interpreter.llm.fastpath import decoder as fastpath

    w = quantize(torch.randn(64, 256) * 0.02, 128)
    with pytest.raises(int4_mma.Int4MmaUnavailable, match="CUDA GPU"):
        int4_mma.MmaInt4(w.q, w.scales_zeros, 128, "cpu")
    with pytest.raises(fastpath.FastPathUnsupported):  # the one base every "cannot serve" of the fast path has
        int4_mma.MmaInt4(w.q, w.scales_zeros, 128, "cpu")
    monkeypatch.setenv("JUPYBOX_INT4_KERNEL", "mma")
    assert isinstance(fastpath.int4_layer(w, torch.device("cpu")), PackedInt4)


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _compiled_report(source: str, arch: str, folder: Path, name: str = int4_mma.KERNEL_NAME) -> str:
    """The compiler's resource report and the disassembly of ``source``'s kernel for ``sm_<arch>``."""
    path = folder / f"{hashlib.sha256(source.encode()).hexdigest()[:16]}.cubin"
    path.write_bytes(nvrtc.compile_cubin(source, name, arch))
    return subprocess.run([_tool("cuobjdump"), "-res-usage", "-sass", str(path)], capture_output=True, text=True,
                          check=True).stdout


@pytest.mark.parametrize("arch", ["80", "90"])
def test_every_launch_shape_compiles_with_nvrtc_into_tensor_core_code_without_spilling(arch: str, tmp_path) -> None:
    """The real compiler on every candidate the tuner may time on a GPU (and a group of 64 inputs):
    no compile error, no local memory (registers spilled to memory would cost bandwidth), and the
    multiplies on tensor cores (HMMA); on Hopper the programmatic-launch instructions are in. The
    SiLU-fused ending is compiled for the shapes a gate/up weight may take. The compiles and
    disassemblies run on every core at once (NVRTC and cuobjdump release the interpreter)."""
    cases = ([(config, 2, False) for config in int4_mma.candidates()] + [(int4_mma.MmaConfig(), 1, False)]
             + [(config, 2, True) for config in int4_mma.candidates(glu=True)])
    sources = [int4_mma.source(config, cpg, pdl=arch == "90", glu=glu) for config, cpg, glu in cases]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        reports = list(pool.map(lambda source: _compiled_report(source, arch, tmp_path), sources))
    for (config, cpg, _), report in zip(cases, reports):
        usage, _, sass = report.partition("code for sm_")  # the resource report comes first
        assert re.search(r"LOCAL:0\b", usage), (config, cpg, usage)
        assert len(re.findall(r"\bHMMA\.16816\.F32\.BF16\b", sass)) >= 8 * cpg, (config, cpg)
        assert ("ACQBULK" in sass) == (arch == "90"), (config, cpg)


@pytest.mark.parametrize("arch", ["80", "90"])
def test_every_batched_launch_shape_compiles_into_tensor_core_code_without_spilling(arch: str, tmp_path) -> None:
    """The batched kernel (8 activation rows a column tile, 1, 2 or 4 tiles) on the candidates the
    tuner may time with the fewest registers a thread (the most warps a block: the launch bound caps
    each thread's registers by it): no local memory, and per group of 128 inputs one mma a (weight
    tile, column tile) for each of 8 steps, plus one for the rows' sums per column tile."""
    cases = []
    for nt in (1, 2, 4):
        for glu in (False, True):
            configs = int4_mma.candidates(glu, nt)
            most = max(c.warps for c in configs)
            cases += [(c, nt, glu) for c in configs if c.warps == most]
    assert {nt for _, nt, _ in cases} == {1, 2, 4}
    sources = [int4_mma.source(config, 2, pdl=arch == "90", glu=glu, nt=nt) for config, nt, glu in cases]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        reports = list(pool.map(lambda source: _compiled_report(source, arch, tmp_path, int4_mma.BATCH_KERNEL_NAME),
                                sources))
    for (config, nt, glu), report in zip(cases, reports):
        usage, _, sass = report.partition("code for sm_")
        assert re.search(r"LOCAL:0\b", usage), (config, nt, glu, usage)
        assert len(re.findall(r"\bHMMA\.16816\.F32\.BF16\b", sass)) >= 8 * nt * (config.tiles + 1), (config, nt)
        assert ("ACQBULK" in sass) == (arch == "90"), (config, nt)


def test_the_batched_kernel_refuses_more_rows_than_it_takes_before_any_launch() -> None:
    q = quantize(torch.randn(32, 256) * 0.02, 128)
    w = int4_mma.pack(q.q, q.scales_zeros, 128)
    with pytest.raises(int4_mma.Int4MmaUnavailable, match="1 to 32 rows"):
        int4_mma.launch_batch(torch.zeros(33, 256), w.words, w.sz, 128, int4_mma.MmaConfig())
    assert [int4_mma.column_tiles(r) for r in (1, 8, 9, 16, 17, 32)] == [1, 1, 2, 2, 4, 4]


def test_a_source_that_does_not_compile_is_a_typed_error_with_the_compilers_message() -> None:
    with pytest.raises(nvrtc.NvrtcError, match="undefined|identifier"):
        nvrtc.compile_cubin('extern "C" __global__ void broken() { undefined_name(); }', "broken", "90")
