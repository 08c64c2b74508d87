"""Block-sparse format, torch reference, model swapping (CPU) and the Triton kernels (GPU marker)."""

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bench.common import expand_block_mask, random_block_mask
from spruce.generate import StaticGreedy
from spruce.errors import SpruceError
from spruce.kernels import (
    BlockSparseLinear,
    BlockSparseWeight,
    bsr,
    densify,
    reference_linear,
    sparsify,
)
from spruce.kernels import linear as linear_module
from spruce.kernels.linear import FusedBlockSparseLinear, FusedPart


def masked_weight(n, k, block, sparsity=0.5, layout="independent", dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mask = expand_block_mask(random_block_mask(n, k, block, sparsity, layout, gen), block)
    return (torch.randn(n, k, generator=gen, dtype=torch.float64) * mask).to(dtype)


def irregular_weight(n, k, block, seed=0):
    """Any zero pattern: random blocks kept, a fully empty and a fully dense block-row, zeros inside blocks."""
    gen = torch.Generator().manual_seed(seed)
    keep = torch.rand(n // block, k // block, generator=gen) < 0.4
    keep[0] = False
    keep[-1] = True
    w = torch.randn(n, k, generator=gen, dtype=torch.float64) * expand_block_mask(keep, block)
    return w * (torch.rand(n, k, generator=gen) > 0.3)


def rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


# ---------------------------------------------------------------- format and reference (CPU)


@pytest.mark.parametrize("block", [16, 32, 64])
@pytest.mark.parametrize("make", ["grouped", "independent", "irregular"])
def test_round_trip_is_exact(block, make):
    n, k = 256, 192
    w = irregular_weight(n, k, block) if make == "irregular" else masked_weight(n, k, block, layout=make)
    sparse = BlockSparseWeight.from_dense(w, block)
    assert torch.equal(sparse.to_dense(), w)
    assert sparse.nonzero_blocks == int(w.reshape(n // block, block, k // block, block).ne(0).any(3).any(1).sum())


def test_group_is_widest_without_padding():
    grouped = BlockSparseWeight.from_dense(masked_weight(256, 256, 16, 0.5, "grouped"), 16)
    independent = BlockSparseWeight.from_dense(masked_weight(256, 256, 16, 0.5, "independent"), 16)
    assert grouped.group == 4 and independent.group == 1
    assert grouped.stored_fraction == independent.stored_fraction == 0.5
    forced = BlockSparseWeight.from_dense(masked_weight(256, 256, 16, 0.5, "independent"), 16, group=4)
    assert forced.group == 4 and forced.stored_fraction > 0.5  # zeros of the other rows stored
    assert torch.equal(forced.to_dense(), masked_weight(256, 256, 16, 0.5, "independent"))


@pytest.mark.parametrize("block", [16, 32, 64])
@pytest.mark.parametrize("tokens", [1, 7, 33])
def test_reference_matches_dense_math(block, tokens):
    w = irregular_weight(128, 320, block, seed=tokens)
    bias = torch.randn(128, dtype=torch.float64)
    x = torch.randn(2, tokens, 320, dtype=torch.float64)
    sparse = BlockSparseWeight.from_dense(w, block)
    out = reference_linear(x, sparse, bias)
    assert out.shape == (2, tokens, 128)
    assert rel_err(out, F.linear(x, w, bias)) < 1e-12


@pytest.mark.parametrize("shape,block", [((100, 64), 16), ((64, 48), 32), ((64, 64), 24)])
def test_from_dense_refuses_what_the_block_does_not_cut(shape, block):
    with pytest.raises(SpruceError, match="block"):
        BlockSparseWeight.from_dense(torch.ones(shape), block)


# ---------------------------------------------------------------- tuning keys and candidates (CPU)


def test_tuning_key_separates_densities():
    half = BlockSparseWeight.from_dense(masked_weight(256, 512, 16, 0.5, "grouped"), 16)
    near = BlockSparseWeight.from_dense(masked_weight(256, 512, 16, 0.47, "grouped"), 16)  # 17 of 32 kept
    quarter = BlockSparseWeight.from_dense(masked_weight(256, 512, 16, 0.75, "grouped"), 16)
    assert (bsr.density_bucket(half), bsr.density_bucket(near), bsr.density_bucket(quarter)) == ("d0.5", "d0.5", "d0.25")
    key = bsr.tuning_key("decode", half, 8, torch.bfloat16)
    assert key == ("decode", 256, 512, 16, 64, "d0.5", 8, "torch.bfloat16")
    assert bsr.tuning_key("decode", near, 8, torch.bfloat16) == key
    assert bsr.tuning_key("decode", quarter, 8, torch.bfloat16) != key
    assert bsr.tuning_key("prefill", half, 300, torch.bfloat16)[-2] == 512  # prefill tokens: next power of two
    sparse = BlockSparseWeight.from_dense(masked_weight(256, 512, 16, 0.97, "grouped"), 16)  # 1 of 32 kept
    assert bsr.density_bucket(sparse) == "d0.125"  # never rounds to zero


@pytest.mark.parametrize("layout,width", [("grouped", 64), ("grouped128", 128), ("independent", 16)])
def test_decode_candidates(layout, width):
    w = BlockSparseWeight.from_dense(masked_weight(256, 512, 16, 0.5, layout), 16)
    assert w.group_features == width
    for m in (1, 2, 8, 9, 16):
        configs = bsr.decode_candidates(w, m)
        assert len(configs) == len(set(configs)) and configs[0][5] == 1  # split-free first, for graph capture
        assert all(c[0] <= width and width % c[0] == 0 for c in configs)
        assert all(c[4] for c in configs) == (m > bsr.GEMV_MAX_TOKENS)
        if m > 1 and width >= 64:  # past the v4 winner (32 features, split 2): wider tiles and splits 1-4
            dot = {c for c in configs if c[4]}
            assert {(64, 256, 8, 3, True, 1), (32, 256, 4, 3, True, 1), (32, 256, 4, 3, True, 4)} <= dot
            assert {c[1] for c in dot if c[0] == 32} == {128, 256, 512}
        swapped = [c for c in configs if c[4] == bsr.SWAP]   # weight-first dots: groups of 64+ features only
        assert len(swapped) == (len(bsr.DECODE_SWAP_CONFIGS) if m > 1 and width >= 64 else 0)


def test_bench_tables_show_configs_pdl_and_baseline(monkeypatch):
    import bench

    ceilings = {"copy_bytes_per_s": 4.17e12, "matmul_flop_per_s": 7.78e14}
    base = {"shape": "4096x4096", "tokens": 8, "speedup": 1.0, "GB_per_s": 1.0, "TFLOP_per_s": 1.0,
            "pct_of_floor": 0.5}
    rows = [{**base, "kernel": "dense cuBLAS", "us": 13.0},
            {**base, "kernel": "bsr b16 75% grouped", "us": 7.0, "rel_err": 1.6e-3, "config": "(64, 256, 8, 3, True, 2)",
             "v4_config": "(32, 256, 4, 3, True, 2)", "us_v4": 7.9, "us_pdl_off": 7.6},
            {**base, "kernel": "bsr b16 50% grouped", "us": 11.0, "rel_err": 1.6e-3, "config": "(32, 256, 4, 3, True, 2)",
             "v4_config": "(32, 256, 4, 3, True, 2)", "us_v4": 11.0}]
    table = bench.format_kernel_table(rows, ceilings).splitlines()
    assert "v4 us" in table[1] and "no-PDL" in table[1]
    assert table[3].endswith("7.9     7.6  (64, 256, 8, 3, True, 2)")
    assert " = " in table[4] and table[4].endswith("(32, 256, 4, 3, True, 2)")
    assert "v4 us" not in bench.format_kernel_table(rows[:1], ceilings)

    configs = [{"linear": "4096x4096 b16 g64 d0.5", "layers": 128, "decode": "(4, 1024, 4, 1, False, 1)",
                "decode_tuned_us": 6.5, "prefill": "(256, 64, 8, 3, True)", "prefill_tuned_us": None}]
    gen = {"batch": 1, "mode": "graph", "tokens_per_s": 170.0, "speedup": 1.2, "ms_per_step": 5.8,
           "weight_read_floor_ms": 1.7}
    rows = [{**gen, "kind": "dense"},
            {**gen, "kind": "bsr b16 50% grouped", "pdl": True, "configs": configs, "linears_tuned_ms": 0.83},
            {**gen, "kind": "bsr b16 50% grouped", "pdl": False, "configs": configs, "linears_tuned_ms": 0.83}]
    table = bench.format_generate_table(rows).splitlines()
    assert "pdl" in table[0] and " on " in table[2] and " off " in table[3] and "0.83" in table[3]
    listed = bench.format_linear_configs(rows).splitlines()
    assert len(listed) == 2 and "x128" in listed[1] and "6.5 us" in listed[1] and "(not tuned)" in listed[1]

    monkeypatch.setenv("SPRUCE_BENCH_PDL", "both")
    assert bench._pdl_choice(None) == "both" and bench._pdl_choice("off") == "off"
    monkeypatch.setenv("SPRUCE_BENCH_PDL", "sometimes")
    with pytest.raises(SpruceError, match="pdl must be one of"):
        bench._pdl_choice(None)
    monkeypatch.delenv("SPRUCE_BENCH_PDL")
    assert bench._pdl_choice(None) is None


def test_generate_bench_lists_each_linear_configuration(monkeypatch):
    import bench

    model = tiny_llama()
    sparsify(model)
    weights = {m.sparse_weight.shape: m.sparse_weight for m in model.modules() if isinstance(m, BlockSparseLinear)}
    w = weights[(64, 64)]
    key = bsr.tuning_key("decode", w, 2, torch.bfloat16)
    monkeypatch.setitem(bsr._tuned, key, (16, 256, 4, 3, True, 1))
    monkeypatch.setitem(bsr._tune_ms, key, {"(16, 256, 4, 3, True, 1)": 3.25})
    configs = {c["linear"].split()[0]: c for c in bench._linear_configs(model, 2, 9, torch.bfloat16)}
    assert set(configs) == {"192x64", "64x64", "256x64", "64x128"}  # q/k/v and gate/up run fused
    square = configs["64x64"]
    assert square["layers"] == 2  # o_proj of 2 layers
    assert square["decode"] == "(16, 256, 4, 3, True, 1)" and square["decode_tuned_us"] == 3.25
    assert square["prefill"] is None and configs["256x64"]["decode"] is None


# ---------------------------------------------------------------- model swapping (CPU)


def tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=96, max_position_embeddings=128)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and "lm_head" not in name:
                n, k = module.weight.shape
                mask = random_block_mask(n, k, 16, 0.5, "grouped", gen)
                module.weight.mul_(expand_block_mask(mask, 16))
    return model


def test_sparsify_swaps_decoder_linears_and_keeps_outputs():
    model = tiny_llama()
    dense_weights = {n: m.weight.clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        dense_logits = model(ids).logits
    dense_tokens = model.generate(ids, max_new_tokens=6, do_sample=False)

    report = sparsify(model, block_size=16, min_sparsity=0.4)
    assert len(report.swapped) == 14  # 7 linears in each of 2 layers
    assert [name for name, _ in report.kept] == ["lm_head"]
    assert "below min_sparsity" in report.kept[0][1]
    assert isinstance(model.model.layers[0].mlp.down_proj, BlockSparseLinear)
    with torch.no_grad():
        assert rel_err(model(ids).logits, dense_logits) < 1e-5
    assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), dense_tokens)

    assert densify(model) == 14
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            assert type(module) is nn.Linear and torch.equal(module.weight, dense_weights[name])


def _fused_modules(model):
    return [m for m in model.modules() if isinstance(m, FusedBlockSparseLinear)]


def test_sparsify_runs_siblings_as_one_launch_with_the_same_numbers(monkeypatch):
    model = tiny_llama(seed=3)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    dense = {n: (m.weight.clone(), m.bias) for n, m in linears.items()}
    keys = set(model.state_dict())
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        dense_logits = model(ids).logits

    report = sparsify(model, min_sparsity=0.4)
    assert report.fused == [f"model.layers.{i}.{s}" for i in (0, 1)
                            for s in ("self_attn.q_proj+k_proj+v_proj", "mlp.gate_proj+up_proj")]
    assert len(report.swapped) == 14 and "one launch with q_proj+k_proj+v_proj" in dict(report.swapped)[
        "model.layers.1.self_attn.v_proj"]
    attn = model.model.layers[0].self_attn
    qkv = getattr(attn, "q_proj+k_proj+v_proj")
    assert isinstance(attn.k_proj, FusedPart) and qkv.sparse_weight.shape == (192, 64) and qkv.splits == (64, 64, 64)
    launches = []
    monkeypatch.setattr(linear_module, "block_sparse_linear",
                        lambda x, w, *a, **k: launches.append(w.shape) or bsr.block_sparse_linear(x, w, *a, **k))
    with torch.no_grad():
        logits = model(ids).logits
    assert launches == [(192, 64), (64, 64), (256, 64), (64, 128)] * 2  # q/k/v, o, gate/up, down
    assert rel_err(logits, dense_logits) < 1e-5
    assert all(m._pending is None for m in _fused_modules(model))  # nothing is held past the siblings

    # a sibling called on an input of its own still gives its own output, every time
    w_v = dense["model.layers.0.self_attn.v_proj"][0]
    x = torch.randn(3, 64)
    with torch.no_grad():
        torch.testing.assert_close(attn.v_proj(x), x @ w_v.T)
        torch.testing.assert_close(attn.v_proj(x), x @ w_v.T)
        attn.q_proj(x)
        x.mul_(2)  # changed in place after q_proj kept k's and v's outputs: they are recomputed
        torch.testing.assert_close(attn.k_proj(x), x @ dense["model.layers.0.self_attn.k_proj"][0].T)

    assert densify(model) == 14
    assert set(model.state_dict()) == keys and not _fused_modules(model)
    for name, module in model.named_modules():
        if name in dense:
            assert type(module) is nn.Linear and torch.equal(module.weight, dense[name][0])


def test_siblings_of_unequal_widths_with_biases_fuse_in_whole_groups():
    # k/v of grouped-query attention are narrower than q: the group width must divide every sibling
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=96, max_position_embeddings=64)
    model = Qwen2ForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and "lm_head" not in name:
                n, k = module.weight.shape
                module.weight.mul_(expand_block_mask(random_block_mask(n, k, 16, 0.5, "grouped", gen), 16))
    ids = torch.randint(0, 96, (1, 7))
    with torch.no_grad():
        expected = model(ids).logits
    report = sparsify(model, min_sparsity=0.4)
    qkv = getattr(model.model.layers[0].self_attn, "q_proj+k_proj+v_proj")
    assert qkv.splits == (64, 32, 32) and qkv.bias is not None and 32 % qkv.sparse_weight.group_features == 0
    assert len(report.fused) == 2
    with torch.no_grad():
        assert rel_err(model(ids).logits, expected) < 1e-5


def test_sparsify_without_fusion_keeps_one_launch_per_linear():
    model = tiny_llama(seed=3)
    report = sparsify(model, fuse=False)
    assert not report.fused and not _fused_modules(model)
    assert isinstance(model.model.layers[0].self_attn.k_proj, BlockSparseLinear)


def test_static_greedy_matches_generate():
    model = tiny_llama(seed=1)
    ids = torch.randint(0, 96, (2, 5))
    expected = model.generate(ids, max_new_tokens=7, do_sample=False)
    sparsify(model)
    runner = StaticGreedy(model, batch=2, max_len=12)
    assert torch.equal(runner.generate(ids, 7), expected)
    assert torch.equal(runner.generate(ids, 7), expected)  # the cache is reused from the start


def test_compiled_model_keeps_every_block_sparse_layer_in_one_graph():
    # torch.compile sees each block-sparse layer as one custom op: no graph break, same numbers
    model = tiny_llama(seed=1)
    sparsify(model)
    ids = torch.randint(0, 96, (2, 9))
    ops = []

    def backend(gm, example_inputs):
        ops.extend(str(n.target) for n in gm.graph.nodes if "block_sparse_linear" in str(n.target))
        return gm.forward

    with torch.no_grad():
        expected = model(ids).logits
        compiled = torch.compile(model, backend=backend, fullgraph=True)
        assert torch.allclose(compiled(ids).logits, expected, atol=1e-5)
    assert len(ops) == 8  # each of 2 layers: q/k/v fused, o, gate/up fused, down
    assert all(m._pending is None for m in _fused_modules(model))
    torch._dynamo.reset()


def test_static_greedy_compiled_step_matches_generate():
    model = tiny_llama(seed=2)
    ids = torch.randint(0, 96, (2, 5))
    expected = model.generate(ids, max_new_tokens=6, do_sample=False)
    sparsify(model)
    runner = StaticGreedy(model, batch=2, max_len=11, compile_backend="aot_eager")
    assert torch.equal(runner.generate(ids, 6), expected)
    torch._dynamo.reset()


def test_static_greedy_compiles_the_prompt_forward_as_well_as_the_step():
    from torch._dynamo.testing import CompileCounter

    model = tiny_llama(seed=2)
    ids = torch.randint(0, 96, (2, 5))
    expected = model.generate(ids, max_new_tokens=4, do_sample=False)
    sparsify(model)
    counter = CompileCounter()
    runner = StaticGreedy(model, batch=2, max_len=9, compile_backend=counter)
    assert torch.equal(runner.generate(ids, 4), expected)
    assert counter.frame_count == 2  # one graph for the prompt's forward, one for the step
    assert runner.generate(ids, 4).equal(expected) and counter.frame_count == 2  # no recompile
    torch._dynamo.reset()


def test_layer_the_block_does_not_divide_is_kept_and_listed():
    model = nn.Sequential(nn.Linear(64, 100), nn.ReLU(), nn.Linear(100, 64), nn.Linear(64, 64))
    with torch.no_grad():
        model[3].weight.mul_(expand_block_mask(random_block_mask(64, 64, 16, 0.5), 16))
    report = sparsify(model)
    assert [name for name, _ in report.swapped] == ["3"]
    assert dict(report.kept) == {"0": "shape 100x64 is not divisible by block 16",
                                 "2": "shape 64x100 is not divisible by block 16"}
    assert "kept dense" in str(report)


def test_no_eligible_layer_is_a_clear_error():
    with pytest.raises(SpruceError, match="no layer was made block-sparse.*not divisible"):
        sparsify(nn.Sequential(nn.Linear(64, 100)))
    with pytest.raises(SpruceError, match="below min_sparsity"):
        sparsify(nn.Sequential(nn.Linear(64, 64)))
    with pytest.raises(SpruceError, match="no nn.Linear"):
        sparsify(nn.Sequential(nn.ReLU()))
    with pytest.raises(SpruceError, match="block size"):
        sparsify(nn.Sequential(nn.Linear(64, 64)), block_size=8)


# ---------------------------------------------------------------- Triton kernels (GPU, and the interpreter on CPU)

gpu = pytest.mark.skipif(not (torch.cuda.is_available() and bsr.triton_available()), reason="needs CUDA and triton")


@pytest.fixture
def few_configs(monkeypatch):
    """One candidate tile of each kind (two for prefill, one of each prefill.py mode), so that tests compile little;
    test_every_configuration runs the full lists."""
    monkeypatch.setattr(bsr, "DECODE_GEMV_CONFIGS", bsr.DECODE_GEMV_CONFIGS[:1])
    monkeypatch.setattr(bsr, "DECODE_DOT_CONFIGS", bsr.DECODE_DOT_CONFIGS[:1])
    monkeypatch.setattr(bsr, "DECODE_SWAP_CONFIGS", bsr.DECODE_SWAP_CONFIGS[:1])
    monkeypatch.setattr(bsr, "GEMV_MULTI_CONFIGS", 1)
    monkeypatch.setattr(bsr, "PREFILL_CONFIGS", [(128, 64, 8, 3, False), (128, 64, 4, 4, True)])
    for name in ("CONFIGS", "ROWS_CONFIGS", "TMA_CONFIGS", "ROWS_TMA_CONFIGS"):
        monkeypatch.setattr(bsr.grouped_prefill, name, getattr(bsr.grouped_prefill, name)[:1])


@pytest.fixture(params=[pytest.param("cuda", marks=[pytest.mark.gpu, gpu]), "interpreter"])
def kernels_on(request, monkeypatch):
    """(device, dtype) that the Triton kernels run on: the GPU in bfloat16, or, on any machine with
    triton installed, Triton's interpreter on the CPU in float16. The interpreter runs every
    program of the same kernel source one after another, so the index, mask, group and split-sum
    logic is checked on every CI run; its tl.dot does not support bfloat16 (it multiplies the raw
    bits), so bfloat16 there is checked on the FMA decode tiles alone (test below)."""
    if request.param == "cuda":
        return torch.device("cuda"), torch.bfloat16
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the interpreter runs when TRITON_INTERPRET=1 before triton is imported (conftest.py, no GPU)")
    monkeypatch.setattr(bsr, "_workspaces", {})
    return torch.device("cpu"), torch.float16


def _check_every_config(x, sparse, bias, ref, configs=None):
    """Run each candidate configuration on a poisoned output; all must write every element right."""
    m = x.shape[0]
    if m <= bsr.DECODE_MAX_TOKENS:
        launch, candidates = bsr.launch_decode, bsr.decode_candidates(sparse, m)
    else:
        launch, candidates = bsr.launch_prefill, bsr.prefill_candidates(sparse)
    for cfg in configs(candidates) if configs else candidates:
        y = torch.full((m, sparse.shape[0]), float("nan"), dtype=x.dtype, device=x.device)
        launch(x, sparse, bias, y, cfg)
        err = rel_err(y, ref)
        assert err <= 1e-2, (cfg, err)  # NaN fails too


def _check_shape(n, k, block, make, dtype, tokens, gen, trial=0, device="cuda", configs=None):
    w = irregular_weight(n, k, block, seed=trial) if make == "irregular" else \
        masked_weight(n, k, block, 0.5 + 0.25 * trial, make, seed=trial)
    w = w.to(dtype)
    sparse = BlockSparseWeight.from_dense(w, block).to(device)
    bias = torch.randn(n, generator=gen).to(device, dtype)
    for m in tokens:
        x = torch.randn(m, k, generator=gen).to(device, dtype)  # fresh inputs for every check
        ref = F.linear(x.double(), w.double().to(device), bias.double())
        _check_every_config(x, sparse, bias, ref, configs)
        assert rel_err(bsr.block_sparse_linear(x, sparse, bias), ref) <= 1e-2


@pytest.mark.parametrize("block", [16, 32, 64])
@pytest.mark.parametrize("make", ["grouped", "independent", "irregular"])
def test_kernels_match_float64(block, make, kernels_on, few_configs):
    device, dtype = kernels_on
    gen = torch.Generator().manual_seed(block)
    # random shapes; the interpreter runs programs one by one on the CPU, so it gets smaller ones
    trials, rows, tokens = (2, 5, (1, 3, 16, 17, 129, 300)) if device.type == "cuda" else (1, 3, (1, 3, 16, 17, 70))
    for trial in range(trials):
        n = 128 * int(torch.randint(1, rows, (1,), generator=gen))
        k = block * int(torch.randint(2, 40 if device.type == "cuda" else 12, (1,), generator=gen))
        _check_shape(n, k, block, make, dtype, tokens, gen, trial, device)


def test_every_configuration(kernels_on):
    device, _ = kernels_on
    gen = torch.Generator().manual_seed(0)
    shape = (384, 1040) if device.type == "cuda" else (128, 272)
    _check_shape(*shape, 16, "grouped", torch.float16, (1, 5, 16, 200), gen, device=device)


def test_bfloat16_fma_decode_tiles_in_the_interpreter(kernels_on):
    """bfloat16 in the interpreter on the decode tiles that need no tl.dot (1-8 tokens)."""
    device, _ = kernels_on
    if device.type == "cuda":
        pytest.skip("on the GPU test_kernels_match_float64 runs bfloat16 through every path")
    gen = torch.Generator().manual_seed(5)
    fma = lambda candidates: [c for c in candidates if not c[4]]  # noqa: E731
    _check_shape(128, 320, 16, "irregular", torch.bfloat16, (1, 7), gen, device=device, configs=fma)


def test_split_decode_resets_its_counters_and_repeats(kernels_on):
    """Split configurations sum partials through a workspace whose counters must be zero again
    after every launch, or the next launch (and a replayed CUDA graph) would sum the wrong ones."""
    device, dtype = kernels_on
    gen = torch.Generator().manual_seed(3)
    n, k, repeats = (256, 1024, 3) if device.type == "cuda" else (128, 384, 2)  # on CPU some splits get no columns
    w = masked_weight(n, k, 16, 0.5, "grouped").to(dtype)
    sparse = BlockSparseWeight.from_dense(w, 16).to(device)
    splits = [c for c in bsr.DECODE_GEMV_CONFIGS + bsr.DECODE_DOT_CONFIGS + bsr.DECODE_SWAP_CONFIGS if c[5] > 1]
    if device.type != "cuda":  # the interpreter: one tile per (features, kind, split), which is what the
        # workspace and its counters depend on; test_every_configuration checks each tile's sums
        first = {}
        for c in splits:
            first.setdefault((c[0], c[4], c[5]), c)
        splits = list(first.values())
    assert splits
    for m in (1, 16):
        x = torch.randn(m, k, generator=gen).to(device, dtype)
        ref = F.linear(x.double(), w.double().to(device))
        for cfg in splits:
            if m > bsr.GEMV_MAX_TOKENS and not cfg[4]:
                continue
            for _ in range(repeats):
                y = torch.full((m, n), float("nan"), dtype=dtype, device=device)
                bsr.launch_decode(x, sparse, None, y, cfg)
                assert rel_err(y, ref) <= 1e-2, cfg
    for _, locks in bsr._workspaces.values():
        assert int(locks.abs().sum()) == 0


@pytest.mark.gpu
@gpu
def test_pdl_off_gives_the_same_output(few_configs):
    gen = torch.Generator().manual_seed(4)
    w = masked_weight(256, 512, 16, 0.5, "grouped").to(torch.bfloat16)
    sparse = BlockSparseWeight.from_dense(w, 16).to("cuda")
    x = torch.randn(5, 512, generator=gen).to("cuda", torch.bfloat16)
    try:
        outs = []
        for state in (True, False):
            bsr.set_pdl(state)
            outs.append(bsr.block_sparse_linear(x, sparse))
    finally:
        bsr.set_pdl(None)
    assert torch.equal(outs[0], outs[1])


@pytest.mark.gpu
@gpu
def test_swapped_model_on_gpu_matches_dense(few_configs):
    model = tiny_llama(seed=2).to("cuda", torch.bfloat16)
    ids = torch.randint(0, 96, (3, 40), device="cuda")
    inputs = (ids, ids[:1, :5])  # 120 tokens run the prefill kernel, 5 the decode kernel
    with torch.no_grad():
        dense = [model(t).logits.double() for t in inputs]
        sparsify(model)
        for t, ref in zip(inputs, dense):
            assert rel_err(model(t).logits, ref) <= 1e-2


@pytest.mark.gpu
@gpu
def test_float32_on_gpu_is_refused_with_a_message():
    sparse = BlockSparseWeight.from_dense(masked_weight(64, 64, 16, dtype=torch.float32), 16).to("cuda")
    with pytest.raises(SpruceError, match="bfloat16"):
        bsr.block_sparse_linear(torch.randn(2, 64, device="cuda"), sparse)
    model = nn.Sequential(nn.Linear(64, 64)).cuda()
    with torch.no_grad():
        model[0].weight.mul_(expand_block_mask(random_block_mask(64, 64, 16, 0.5), 16).cuda())
    with pytest.raises(SpruceError, match="bfloat16"):
        sparsify(model)


@pytest.mark.gpu
@gpu
def test_compiled_graph_step_on_gpu_matches_the_plain_graph_step(few_configs):
    # inductor fuses the rest of the step; the Triton kernels run inside the captured graph
    model = tiny_llama(seed=3).to("cuda", torch.bfloat16)
    sparsify(model)
    ids = torch.randint(0, 96, (2, 6), device="cuda")
    with torch.no_grad():
        eager = model(ids).logits.double()
        assert rel_err(torch.compile(model)(ids).logits, eager) <= 2e-2
    torch._dynamo.reset()
    plain = StaticGreedy(model, batch=2, max_len=14).generate(ids, 8)
    compiled = StaticGreedy(model, batch=2, max_len=14, compile_backend="inductor").generate(ids, 8)
    torch._dynamo.reset()
    assert compiled.shape == plain.shape
    assert torch.equal(compiled[:, :8], plain[:, :8])  # the prompt, the prefill's token, one compiled step
