"""The grouped prefill kernel (spruce/kernels/prefill.py) against float64 math on the masked weight.

On CPU the kernel runs in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1) in
float16 (the interpreter's tl.dot cannot multiply bfloat16); on a GPU, bfloat16 at the Llama-2-7B
shapes. Every configuration of both input modes (x transposed, x as it is) is checked.
"""

import pytest
import torch
import torch.nn.functional as F

from spruce.errors import SpruceError
from spruce.kernels import BlockSparseWeight, bsr, prefill, prefill_gluon
from tests.test_kernels import gpu, irregular_weight, kernels_on, masked_weight, rel_err  # noqa: F401


def _check_all(x, sparse, bias, ref):
    configs = prefill.candidates(sparse)
    assert configs, "no configuration for this weight"
    for cfg in configs:
        y = torch.full((x.shape[0], sparse.shape[0]), float("nan"), dtype=x.dtype, device=x.device)
        prefill.launch(x, sparse, bias, y, cfg)
        err = rel_err(y, ref)
        assert err <= 1e-2, (cfg, err)  # NaN (an element never written) fails too
    return configs


@pytest.mark.parametrize("layout,group", [("grouped", 4), ("grouped128", 8)])
def test_every_configuration_matches_float64(layout, group, kernels_on, monkeypatch):
    device, dtype = kernels_on
    gen = torch.Generator().manual_seed(group)
    n, k = (1024, 2048) if device.type == "cuda" else (32 * group, 192)  # two groups on CPU
    if device.type == "cpu":  # bands of two 128-token tiles: 300 tokens end in a band of one
        monkeypatch.setattr(prefill, "L2_BAND_BYTES", 2 * 128 * k * 2)
        assert prefill.band_tiles(300, k, 128, 2) == 2
    w = masked_weight(n, k, 16, 0.5, layout, seed=group).to(dtype)
    sparse = BlockSparseWeight.from_dense(w, 16).to(device)
    assert sparse.group == group and sparse.uniform_count > 0
    bias = torch.randn(n, generator=gen).to(device, dtype)
    tokens = ((300, True), (64, False), (129, True)) if device.type == "cuda" else ((300, True), (64, False))
    for m, with_bias in tokens:  # ragged: 300 fills no tile
        x = torch.randn(m, k, generator=gen).to(device, dtype)
        b = bias if with_bias else None
        ref = F.linear(x.double(), w.double().to(device), None if b is None else b.double())
        configs = _check_all(x, sparse, b, ref)
    gluon = {prefill.TAG_GLUON} if prefill_gluon.available(device) else set()  # Hopper only
    assert {c[0] for c in configs} == {prefill.TAG, prefill.TAG_ROWS, prefill.TAG_TMA, prefill.TAG_ROWS_TMA} | gluon


def test_unequal_groups_and_an_empty_group(kernels_on):
    """Group-pointer loads (unequal counts, the global selection's layout), a group with no stored
    column (its outputs are the bias alone) and zeros inside stored blocks."""
    device, dtype = kernels_on
    gen = torch.Generator().manual_seed(7)
    n, k = 256, 160
    w = irregular_weight(n, k, 16, seed=3)
    w[:64] = 0  # the whole first group of 4 block-rows
    w = w.to(dtype)
    sparse = BlockSparseWeight.from_dense(w, 16, group=4).to(device)
    assert sparse.uniform_count == -1 and int(sparse.group_ptr[1]) == 0
    bias = torch.randn(n, generator=gen).to(device, dtype)
    x = torch.randn(77, k, generator=gen).to(device, dtype)
    ref = F.linear(x.double(), w.double().to(device), bias.double())
    _check_all(x, sparse, bias, ref)


def test_transpose_pads_with_zeros(kernels_on):
    device, dtype = kernels_on
    x = torch.randn(70, 48).to(device, dtype)
    xt = prefill.transpose_padded(x)
    assert xt.shape == (48, prefill.TOKEN_PAD)
    assert torch.equal(xt[:, :70], x.t()) and not xt[:, 70:].any()


def test_the_tuner_offers_it_for_wide_groups_only():
    wide = BlockSparseWeight.from_dense(masked_weight(256, 256, 16, 0.5, "grouped"), 16)
    narrow = BlockSparseWeight.from_dense(masked_weight(256, 256, 16, 0.5, "independent"), 16)
    tags = [c[0] for c in bsr.prefill_candidates(wide)]
    assert tags[:len(bsr.PREFILL_CONFIGS)] == [256, 256, 128, 128, 256, 128]  # the older kernel's first
    assert prefill.TAG in tags and prefill.TAG_ROWS in tags
    assert not any(isinstance(t, str) for t in (c[0] for c in bsr.prefill_candidates(narrow)))
    g8 = BlockSparseWeight.from_dense(masked_weight(256, 256, 16, 0.5, "grouped128"), 16)
    assert all(c[1] * 128 <= prefill.MAX_ACC for c in prefill.candidates(g8))  # no 512-token tile


def test_gluon_configurations_are_offered_on_hopper_for_16x16_blocks_in_wide_groups(monkeypatch):
    """The Gluon kernel joins the tuner's candidates where it can run (sm_90 with Gluon: simulated
    here), with its configurations for the weight's group width; never for narrow groups or other
    block sizes, never on a device without it."""
    g4 = BlockSparseWeight.from_dense(masked_weight(256, 256, 16, 0.5, "grouped"), 16)
    g8 = BlockSparseWeight.from_dense(masked_weight(256, 256, 16, 0.5, "grouped128"), 16)
    narrow = BlockSparseWeight.from_dense(masked_weight(256, 256, 16, 0.5, "independent"), 16)
    b32 = BlockSparseWeight.from_dense(masked_weight(256, 256, 32, 0.5, "grouped"), 32)
    assert not prefill_gluon.available(torch.device("cpu"))
    assert not any(c[0] == prefill.TAG_GLUON for c in prefill.candidates(g4))
    monkeypatch.setattr(prefill_gluon, "available", lambda device: True)
    gluon = lambda w: [c[1:] for c in prefill.candidates(w) if c[0] == prefill.TAG_GLUON]  # noqa: E731
    assert gluon(g4) == prefill_gluon.CONFIGS[64] and gluon(g8) == prefill_gluon.CONFIGS[128]
    assert gluon(narrow) == [] and gluon(b32) == []
    assert all(prefill.transposes((prefill.TAG_GLUON, *c)) for c in gluon(g4))


def test_gluon_configuration_runs_the_pointer_tile_where_descriptors_cannot_address(kernels_on):
    """A tensor descriptor needs 16-byte aligned rows: an output that starts one element into its
    storage runs the Triton pointer tile of the same token width, with the same result."""
    device, dtype = kernels_on
    gen = torch.Generator().manual_seed(4)
    w = masked_weight(128, 128, 16, 0.5, "grouped").to(dtype)
    sparse = BlockSparseWeight.from_dense(w, 16).to(device)
    x = torch.randn(40, 128, generator=gen).to(device, dtype)
    xt = prefill.transpose_padded(x)
    y = torch.full((40 * 128 + 1,), float("nan"), dtype=dtype, device=device)[1:].view(40, 128)
    assert not prefill_gluon.ready(xt, sparse, y) and prefill_gluon.ready(xt, sparse, y.clone())
    prefill.launch(x, sparse, None, y, (prefill.TAG_GLUON, *prefill_gluon.CONFIGS[64][0]), xt=xt)
    assert rel_err(y, F.linear(x.double(), w.double().to(device))) <= 1e-2


def test_launch_prefill_runs_a_tagged_configuration(kernels_on):
    device, dtype = kernels_on
    gen = torch.Generator().manual_seed(1)
    w = masked_weight(128, 128, 16, 0.5, "grouped").to(dtype)
    sparse = BlockSparseWeight.from_dense(w, 16).to(device)
    x = torch.randn(40, 128, generator=gen).to(device, dtype)
    ref = F.linear(x.double(), w.double().to(device))
    for cfg in (prefill.candidates(sparse)[0], prefill.candidates(sparse)[-1]):
        y = torch.full((40, 128), float("nan"), dtype=dtype, device=device)
        bsr.launch_prefill(x, sparse, None, y, cfg)
        assert rel_err(y, ref) <= 1e-2, cfg
    # a transpose made beforehand (as prefill.SHARED gives it) serves the configurations that read xt
    xt = prefill.transpose_padded(x)
    for cfg in [c for c in prefill.candidates(sparse) if prefill.transposes(c)][:2]:
        y = torch.full((40, 128), float("nan"), dtype=dtype, device=device)
        bsr.launch_prefill(x, sparse, None, y, cfg, xt=xt)
        assert rel_err(y, ref) <= 1e-2, cfg
    with pytest.raises(SpruceError, match="only with a forced configuration"):
        bsr.launch_prefill(x, sparse, None, torch.empty(40, 128, dtype=dtype, device=device), xt=xt)


def test_tma_configurations_fall_back_on_unaligned_input(kernels_on):
    """A tensor descriptor needs a 16-byte aligned base: an input that starts one element into its
    storage runs the pointer kernel with the same tile, and gives the same result."""
    device, dtype = kernels_on
    gen = torch.Generator().manual_seed(2)
    w = masked_weight(128, 128, 16, 0.5, "grouped").to(dtype)
    sparse = BlockSparseWeight.from_dense(w, 16).to(device)
    x = torch.randn(33 * 128 + 1, generator=gen).to(device, dtype)[1:].view(33, 128)
    assert not prefill.tma_ready(x, sparse) and prefill.tma_ready(x.clone(), sparse)
    ref = F.linear(x.double(), w.double().to(device))
    for cfg in [c for c in prefill.candidates(sparse) if c[0] == prefill.TAG_ROWS_TMA][:1]:
        y = torch.full((33, 128), float("nan"), dtype=dtype, device=device)
        prefill.launch(x, sparse, None, y, cfg)
        assert rel_err(y, ref) <= 1e-2


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("shape", [(4096, 4096), (11008, 4096), (4096, 11008)])
def test_llama_shapes_on_gpu(shape):
    """Every configuration at 2048 tokens on the Llama-2-7B shapes, bfloat16, 64- and 128-feature groups."""
    n, k = shape
    gen = torch.Generator().manual_seed(0)
    for layout in ("grouped", "grouped128"):
        w = masked_weight(n, k, 16, 0.5, layout, dtype=torch.bfloat16).cuda()
        sparse = BlockSparseWeight.from_dense(w, 16)
        x = torch.randn(2048, k, generator=gen).to("cuda", torch.bfloat16)
        bias = torch.randn(n, generator=gen).to("cuda", torch.bfloat16)
        _check_all(x, sparse, bias, F.linear(x.double(), w.double(), bias.double()))


def test_prefill_bench_runs_every_candidate_and_summarises(monkeypatch):
    """The device bench's flow on the CPU: timing stubbed (1 us per call), kernels in the interpreter."""
    import bench.prefill as bp

    pytest.importorskip("triton")
    if bsr.triton_available() and not torch.cuda.is_available():
        monkeypatch.setattr(bp, "DEVICE", "cpu")
        monkeypatch.setattr(bp, "DTYPE", torch.float16)
    def one_us(calls):
        calls[0]()
        return 1.0

    monkeypatch.setattr(bp, "graph_time_us", one_us)
    monkeypatch.setattr(bp, "copies_for", lambda nbytes: 1)
    monkeypatch.setattr(bsr, "_rotation", lambda w: [w])
    monkeypatch.setattr(bsr, "PREFILL_CONFIGS", bsr.PREFILL_CONFIGS[:1])
    monkeypatch.setattr(prefill, "CONFIGS", prefill.CONFIGS[:1])
    for name in ("ROWS_CONFIGS", "TMA_CONFIGS", "ROWS_TMA_CONFIGS"):
        monkeypatch.setattr(prefill, name, getattr(prefill, name)[:1])
    rows = []
    gen = torch.Generator().manual_seed(0)
    w = bp.emitted_weight(128, 128, "16x16g4", "global", 0.5, gen, bp.DEVICE).to(bp.DTYPE)
    bp.bench_case(w, "16x16g4", "global", 40, gen, rows, None, {})
    kinds = [r["kernel"] for r in rows]
    assert kinds == ["dense cuBLAS", "transpose", "bsr"] + ["grouped"] * 4 + ["tuned"]
    assert rows[2]["config"] == str(bsr.PREFILL_CONFIGS[0]) and rows[0]["group"] == 4
    assert all(r["rel_err"] <= 1e-2 for r in rows if "rel_err" in r)
    assert ["us_kernel" in r for r in rows[3:7]] == [True, False, True, False]  # xt, xr, xt-tma, xr-tma
    table = bp.summary(rows).splitlines()
    assert len(table) == 2 and "16x16g4" in table[1] and "1.00x" in table[1]


def test_shared_transpose_is_reused_only_for_the_same_unchanged_input(kernels_on):
    """q, k and v (gate and up) read one input: the transpose made for the first is given to the
    next only while the input is the same tensor with the same version, and goes with it."""
    import gc

    device, dtype = kernels_on
    shared = prefill.SharedTranspose()
    x = torch.randn(40, 128, generator=torch.Generator().manual_seed(3)).to(device, dtype)
    first = shared.get(x, x)
    assert torch.equal(first[:, :40], x.t()) and shared.get(x, x) is first
    assert shared.get(x.clone(), x.clone()) is not first            # equal values, another tensor
    again = shared.get(x, x)
    assert again is not first and torch.equal(again, first)         # the clone's entry replaced x's
    x.mul_(2)                                                        # an in-place write: a new version
    changed = shared.get(x, x)
    assert changed is not again and torch.equal(changed[:, :40], x.t())
    lead = x.view(1, 40, 128)                                        # a view is another tensor
    assert shared.get(lead, lead.reshape(-1, 128)) is not changed
    del lead
    gc.collect()
    assert shared._entry is None                                     # the entry went with its input


@pytest.mark.gpu
@gpu
def test_linears_on_one_input_transpose_it_once_on_gpu():
    """Three block-sparse linears on one 2048-token input (as q, k, v): with the tuner on a
    transposing tile, the second and third take the first's transpose; outputs equal the unshared ones."""
    from spruce.kernels.linear import BlockSparseLinear

    gen = torch.Generator().manual_seed(5)
    layers = []
    for _ in range(3):
        lin = torch.nn.Linear(4096, 4096, bias=False).to("cuda", torch.bfloat16)
        with torch.no_grad():
            lin.weight.copy_(masked_weight(4096, 4096, 16, 0.5, "grouped", dtype=torch.bfloat16).cuda())
        layers.append(BlockSparseLinear.from_linear(lin))
    x = torch.randn(1, 2048, 4096, generator=gen).to("cuda", torch.bfloat16)
    w = layers[0].sparse_weight
    cfg = next(c for c in bsr.prefill_candidates(w) if prefill.transposes(c))
    key = bsr.tuning_key("prefill", w, 2048, torch.bfloat16)
    saved = bsr._tuned.get(key)
    bsr._tuned[key] = cfg   # every layer has the same shape and density: one key
    try:
        with torch.no_grad():
            alone = [bsr.block_sparse_linear(x, layer.sparse_weight) for layer in layers]
            prefill.SHARED.clear()
            shared = [layers[0](x)]
            made = prefill.SHARED._entry[2]
            shared += [layer(x) for layer in layers[1:]]
            assert prefill.SHARED._entry[2] is made
    finally:
        bsr._tuned.pop(key)
        if saved is not None:
            bsr._tuned[key] = saved
        prefill.SHARED.clear()
    for a, b in zip(alone, shared):
        assert torch.equal(a, b)


def test_gluon_prefill_compiles_for_hopper_without_spills(tmp_path):
    """The Gluon kernel (no interpreter) compiles for sm_90 here with no GPU, one configuration of
    each variant and group width the tuner offers: KB m64n256k16 wgmmas a step, no spilled
    registers, shared memory within an H100/H200 SM's. In a fresh process without the interpreter
    (conftest.py turns it on) and a cache of its own."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton.experimental.gluon.language.nvidia.hopper")
    configs = {gb: [next(c for c in offered if c[-1] == v) for v in ("", "ws")]
               for gb, offered in prefill_gluon.CONFIGS.items()}
    code = ("import json, sys; from bench.gluon_prefill import compile_only; "
            "print(json.dumps([r for gb, c in json.loads(sys.argv[1]).items() for r in compile_only(c, int(gb))]))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    done = subprocess.run([sys.executable, "-c", code, json.dumps(configs)], capture_output=True, text=True,
                          env=env, cwd=Path(__file__).resolve().parent.parent, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    for row, kb in zip(rows, [c[1] for offered in configs.values() for c in offered], strict=True):
        assert "error" not in row, row
        assert row["wgmma"] == kb and row["local_bytes"] == 0 and row["shared_KiB"] <= 227, row


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("group,dtype", [(4, torch.bfloat16), (8, torch.bfloat16), (4, torch.float16)])
def test_gluon_prefill_matches_float64(group, dtype):
    """The Gluon kernel against float64 on the GPU, every configuration: unequal groups, an empty
    group (bias alone), a token count that is no multiple of the tile, and a group whose kept
    blocks are no multiple of KB (the out-of-bounds weight boxes must add zeros)."""
    if not prefill_gluon.available(torch.device("cuda")):
        pytest.skip("the Gluon kernel runs on sm_90 with a Triton that has Gluon")
    gen = torch.Generator().manual_seed(11)
    n, k, gb = 512, 400, 16 * group
    w = irregular_weight(n, k, 16, seed=5)
    w[:gb] = 0
    w = w.to(dtype)
    sparse = BlockSparseWeight.from_dense(w, 16, group=group).to("cuda")
    assert sparse.uniform_count == -1 and int(sparse.group_ptr[1]) == 0
    bias = torch.randn(n, generator=gen).to("cuda", dtype)
    x = torch.randn(300, k, generator=gen).to("cuda", dtype)
    ref = F.linear(x.double(), w.double().cuda(), bias.double())
    assert prefill_gluon.configs(sparse) == prefill_gluon.CONFIGS[gb]
    for cfg in prefill_gluon.CONFIGS[gb]:
        y = torch.full((300, n), float("nan"), device="cuda", dtype=dtype)
        assert prefill_gluon.ready(prefill.transpose_padded(x), sparse, y)
        prefill.launch(x, sparse, bias, y, (prefill.TAG_GLUON, *cfg))
        assert rel_err(y, ref) < 1e-2, cfg


class _FakeKernel:
    """A JIT kernel's launch surface: `kernel[grid](...)` compiles once per signature and returns
    the binary, whose `binary[grid](*all arguments)` launches it."""

    arg_names = ["x_ptr", "M", "K", "BLOCK"]
    constexprs = [3]

    def __init__(self):
        self.jit_calls, self.launches = [], []

    def __getitem__(self, grid):
        def jit(*args, **kwargs):
            self.jit_calls.append((args, kwargs))
            return _FakeBinary(self)
        return jit


class _FakeBinary:
    def __init__(self, kernel):
        self.kernel, self.run = kernel, object()

    def __getitem__(self, grid):
        assert len(grid) == 3  # as Triton's CompiledKernel launches: grid[0], grid[1], grid[2]
        return lambda *args: self.kernel.launches.append((grid, args))


def test_a_launch_of_a_known_signature_runs_the_kept_binary(monkeypatch):
    monkeypatch.setattr(prefill, "_COMPILED", {})
    monkeypatch.setattr(prefill, "LAUNCH_CACHE", True)
    kernel = _FakeKernel()
    x = torch.zeros(64)
    prefill.launch_compiled(kernel, (2,), x, 5, 4096, BLOCK=64, num_warps=4)
    prefill.launch_compiled(kernel, (3,), x, 7, 4096, BLOCK=64, num_warps=4)  # M 7: the same specialisation
    assert len(kernel.jit_calls) == 1 and kernel.launches == [((3, 1, 1), (x, 7, 4096, 64))]
    # what Triton specialises on picks another binary: a constexpr, divisibility by 16, 1, alignment,
    # dtype, an option
    for args, kw in (((x, 7, 4096), {"BLOCK": 32}), ((x, 16, 4096), {"BLOCK": 64}), ((x, 1, 4096), {"BLOCK": 64}),
                     ((x[1:], 7, 4096), {"BLOCK": 64}), ((x.double(), 7, 4096), {"BLOCK": 64})):
        prefill.launch_compiled(kernel, (1,), *args, **kw, num_warps=4)
    prefill.launch_compiled(kernel, (1,), x, 7, 4096, BLOCK=64, num_warps=8)
    assert len(kernel.jit_calls) == 7 and len(kernel.launches) == 1
    prefill.launch_compiled(kernel, (1,), x, 7, 4096)  # BLOCK left to a default: always the JIT
    prefill.launch_compiled(kernel, (1,), x, 7, 4096)
    assert len(kernel.jit_calls) == 9
    # a binary that refuses its arguments: this launch and every later one go through the JIT
    prefill.launch_compiled(kernel, (1,), x, 7, 4096, BLOCK=64, num_warps=4)
    assert len(kernel.launches) == 2
    monkeypatch.setattr(_FakeBinary, "__getitem__", lambda self, grid: _refuse)
    prefill.launch_compiled(kernel, (1,), x, 7, 4096, BLOCK=64, num_warps=4)
    assert len(kernel.jit_calls) == 10 and not prefill.LAUNCH_CACHE and not prefill._COMPILED
    prefill.launch_compiled(kernel, (1,), x, 7, 4096, BLOCK=64, num_warps=4)
    assert len(kernel.jit_calls) == 11


def _refuse(*args):
    raise TypeError("this launcher takes other arguments")


def test_the_launch_cache_is_off_unless_asked_for(monkeypatch):
    import os

    assert prefill.LAUNCH_CACHE is (os.environ.get("SPRUCE_LAUNCH_CACHE") == "1")
    monkeypatch.setattr(prefill, "_COMPILED", {})
    monkeypatch.setattr(prefill, "LAUNCH_CACHE", False)
    kernel = _FakeKernel()
    for _ in range(2):
        prefill.launch_compiled(kernel, (1,), torch.zeros(64), 7, 4096, BLOCK=64)
    assert len(kernel.jit_calls) == 2 and not kernel.launches and not prefill._COMPILED
