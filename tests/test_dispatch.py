"""Dense dispatch for a whole model (spruce/kernels/dispatch.py) and the time-to-first-token /
decode report of generation (spruce/generate.py), on CPU with simulated kernel timings."""

import os

import pytest
import torch
from torch import nn

from spruce.prune.patterns import parse_pattern
from tests.conftest import build_model


class TwoKinds(nn.Module):
    """Two linears named as a decoder's modules are, so the summary counts them by kind."""

    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(64, 64, bias=False)
        self.down_proj = nn.Linear(64, 128, bias=False)
        with torch.no_grad():
            for lin in (self.q_proj, self.down_proj):
                lin.weight.masked_fill_(parse_pattern("16x16g4").mask(torch.rand_like(lin.weight), 0.5), 0)


def _simulate(monkeypatch, dense_wins, host_us=lambda cfg: 0.0):
    """Replace the tuner's timing: dense cuBLAS takes 1 us where dense_wins(kind, shape) says, else 9 us;
    every kernel tile 5 us; issuing a launch host_us(candidate). Returns the list of (kind, shape,
    candidate) timed."""
    from spruce.kernels import bsr

    timed = []

    def fake_time(cfg, launch, copies):
        shape = copies[0].shape
        if cfg == bsr.DENSE:
            kind = timed[-1][0]  # dense is timed after the kernel tiles of the same launch
        else:
            kind = "decode" if len(cfg) == len(bsr.DECODE_GEMV_CONFIGS[0]) else "prefill"
        timed.append((kind, shape, cfg))
        if cfg == bsr.DENSE:
            return 1.0 if dense_wins(kind, shape) else 9.0
        return 5.0 + len(timed) * 1e-3

    monkeypatch.setattr(bsr, "_time_candidate", fake_time)
    monkeypatch.setattr(bsr, "_host_us", lambda cfg, launch, weight: host_us(cfg))
    monkeypatch.setattr(bsr, "_rotation", lambda w: [w])
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(bsr, "_tuned", {})
    monkeypatch.setattr(bsr, "_tune_ms", {})
    monkeypatch.setattr(bsr, "_workspaces", {})
    return timed


def _two_kinds_interpreted(dense_fallback: bool = True) -> nn.Module:
    """TwoKinds in float16, sparsified, for tests that tune through the Triton interpreter."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs the Triton interpreter (conftest.py sets it without a GPU)")
    from spruce.kernels import sparsify

    torch.manual_seed(0)
    model = TwoKinds().half()
    sparsify(model, dense_fallback=dense_fallback)
    return model


def test_dispatch_runs_dense_exactly_where_the_timing_says(monkeypatch, capsys):
    from spruce.kernels import BlockSparseLinear
    from spruce.kernels.dispatch import dispatch_table, dispatch_text, prepare_dispatch

    model = _two_kinds_interpreted()
    # dense wins only for the 128-row layer at prefill
    timed = _simulate(monkeypatch, lambda kind, shape: kind == "prefill" and shape == (128, 64))
    report = prepare_dispatch(model, decode_tokens=[1], prefill_tokens=[24], tune=True)
    assert report.launches == ["decode 1", "prefill 32"]
    err = capsys.readouterr().err
    assert "tuning kernels" in err and "4/4" in err   # two weights, two token counts: four cases
    assert {(k, s) for k, s, c in timed if c == ("dense",)} == {("decode", (64, 64)), ("prefill", (64, 64)),
                                                              ("decode", (128, 64)), ("prefill", (128, 64))}
    table = dispatch_table(model, report.launches)
    assert table == {"decode 1": {"q_proj": [1, 1], "down_proj": [1, 1]},
                     "prefill 32": {"q_proj": [1, 1], "down_proj": [0, 1]}}
    assert dispatch_text(table, kept_linears=1) == (
        "sparse: 2 of 2 linears at decode 1, 1 of 2 at prefill 32 (q_proj 1/1, down_proj 0/1); dense elsewhere "
        "(and 1 linear never block-sparse)")
    # the copy stays only where dense runs: memory of the sparse layer is its block-sparse size
    assert isinstance(model.q_proj, BlockSparseLinear) and model.q_proj.dense_weight is None
    assert model.down_proj.dense_weight is not None
    assert report.freed_bytes == 64 * 64 * 2 and report.kept_dense_bytes == 128 * 64 * 2
    # without its copy the released layer keeps the kernel tiles it was tuned to: nothing is tuned again
    from spruce.kernels import bsr

    for kind, tokens in (("decode", 1), ("prefill", 24)):
        assert bsr.runs_dense(kind, model.q_proj.sparse_weight, tokens, torch.float16) is False
        key = "/".join(map(str, bsr.tuning_key(kind, model.q_proj.sparse_weight, tokens, torch.float16)))
        assert bsr.tuning_times()[key]   # and the timings behind the choice, for the benches' reports
    assert bsr.runs_dense("prefill", model.down_proj.sparse_weight, 24, torch.float16) is True
    assert bsr.runs_dense("decode", model.down_proj.sparse_weight, 1, torch.float16) is False


@pytest.mark.parametrize("kernel_host_us, prefill_sparse", [(30.0, 0), (4.0, 1)])
def test_a_prefill_kernel_slower_to_issue_than_dense_runs_dense(monkeypatch, kernel_host_us, prefill_sparse):
    """The kernel wins on the GPU everywhere (5 against 9 us); dense takes 3 us to issue. A prefill
    costs the longer of the two times: a kernel that takes 30 us to issue loses it, one that takes
    4 keeps it. Decode (run in CUDA graphs) goes by the GPU time alone."""
    from spruce.kernels import bsr
    from spruce.kernels.dispatch import dispatch_table, prepare_dispatch

    model = _two_kinds_interpreted()
    _simulate(monkeypatch, lambda kind, shape: False, host_us=lambda cfg: 3.0 if cfg == bsr.DENSE else kernel_host_us)
    report = prepare_dispatch(model, decode_tokens=[1], prefill_tokens=[24], tune=True)
    assert dispatch_table(model, report.launches) == {
        "decode 1": {"q_proj": [1, 1], "down_proj": [1, 1]},
        "prefill 32": {"q_proj": [prefill_sparse, 1], "down_proj": [prefill_sparse, 1]}}
    key = "/".join(map(str, bsr.tuning_key("prefill", model.down_proj.sparse_weight, 24, torch.float16)))
    times = bsr.tuning_times()[key]   # the host times are reported next to the GPU times
    assert times["host ('dense',)"] == 3.0 and kernel_host_us in times.values()


def test_dispatch_without_dense_copies_runs_the_kernel_everywhere(monkeypatch):
    from spruce.kernels.dispatch import dispatch_table, dispatch_text, prepare_dispatch

    model = _two_kinds_interpreted(dense_fallback=False)
    timed = _simulate(monkeypatch, lambda kind, shape: True)   # dense would win, but there is no copy
    report = prepare_dispatch(model, decode_tokens=[1], tune=True)
    assert timed and all(c != ("dense",) for _, _, c in timed)
    assert dispatch_text(dispatch_table(model, report.launches)) == "sparse: 2 of 2 linears at decode 1; dense elsewhere"


def test_dispatch_on_cpu_releases_every_copy_and_counts_the_reference_as_sparse():
    from spruce.kernels import sparsify
    from spruce.kernels.dispatch import dispatch_table, prepare_dispatch

    model = TwoKinds()
    sparsify(model, dense_fallback=True)
    report = prepare_dispatch(model, decode_tokens=[1, 8], prefill_tokens=[2048])
    assert report.freed_bytes == (64 * 64 + 128 * 64) * 4 and report.kept_dense_bytes == 0
    assert list(dispatch_table(model, report.launches)) == ["decode 1", "decode 8", "prefill 2048"]
    assert all(c == [1, 1] for row in dispatch_table(model, report.launches).values() for c in row.values())


def _pruned_tiny():
    from spruce.prune import prune_model

    model = build_model(96, seed=3)
    samples = torch.randint(0, 96, (2, 32), generator=torch.Generator().manual_seed(0))
    prune_model(model, "wanda", "16x16", 0.5, samples=samples, progress=False)
    return model


@pytest.mark.parametrize("mode", ["graph", "hf-static"])
def test_speed_report_has_ttft_and_decode_for_every_batch(mode):
    from spruce.generate import format_speed_rows, measure_speeds, speed_prompts, speed_rows
    from spruce.kernels import BlockSparseLinear

    model = _pruned_tiny()
    model.generation_config.eos_token_id = None
    prompts = list(speed_prompts(torch.tensor([[5, 6, 7]]), 8, [1, 2]).values())
    assert [p.shape for p in prompts] == [(1, 8), (2, 8)] and prompts[1][0, :4].tolist() == [5, 6, 7, 5]
    speeds = measure_speeds(model, prompts, new_tokens=4, mode=mode, block_size=16, ttft_repeats=2)
    assert not any(isinstance(m, BlockSparseLinear) for m in model.modules())   # dense again afterwards
    assert speeds["dispatch"]["text"].startswith("sparse: 14 of 14 linears at decode 1, 14 of 14 at decode 2")
    rows = speed_rows(speeds)
    assert [(r["batch"], r["prompt_tokens"], r["new_tokens"]) for r in rows] == [(1, 8, 4), (2, 8, 4)]
    for r in rows:
        for side in ("dense", "sparse"):
            assert r[side]["ttft_ms"] > 0 and "decode_tokens_per_second" in r[side]
            if mode == "graph":   # timed apart in one run; HF generate's decode is a difference of runs (noisy on CPU)
                # a step of even this model takes more than 100 us on a CPU: the steps were timed, not an empty loop
                assert 0 < r[side]["decode_tokens_per_second"] < r["batch"] * 1e4
        assert r["ttft_speedup"] > 0 and "decode_speedup" in r and r["same_tokens"] is True
    table = format_speed_rows(rows, mode)
    assert "ttft dense ms" in table and "decode sparse tok/s" in table and len(table.splitlines()) == 4


def test_hf_static_generate_gives_the_tokens_of_plain_generate():
    from spruce.generate import hf_generate

    model = build_model(96, seed=4)
    ids = torch.randint(0, 96, (2, 6))
    assert torch.equal(hf_generate(model, ids, 5, static=True), hf_generate(model, ids, 5))


def test_generate_compare_reports_ttft_decode_and_dispatch(pruned_dir):
    from spruce.generate import run_generate
    from spruce.models import load_model

    model, tok = load_model(str(pruned_dir), "cpu", "float32")
    lines = []
    record = run_generate(model, tok, "The quick brown fox", 4, kernels="on", compare=True, say=lines.append,
                          prompt_tokens=24, batch_sizes=[2])
    out = "\n".join(lines)
    assert "time to first token" in out and "tokens/s decode" in out
    assert "dense dispatch: sparse: 14 of 14 linears at decode 1, 14 of 14 at decode 2" in out
    assert record["ttft_ms"] > 0 and record["dense"]["ttft_ms"] > 0 and record["dense"]["decode_tokens_per_second"] > 0
    assert record["dispatch"]["dense_dispatch"] is True and record["dispatch"]["table"]
    assert [(r["batch"], r["prompt_tokens"]) for r in record["speed"]] == [(2, 24)]
    assert all(r["same_tokens"] is True for r in record["speed"])
    assert "ttft dense ms" in out


def test_generation_bench_runs_emitted_layouts_on_cpu(capsys, tmp_path):
    import json

    from bench.generate import bench_generate, default_layout
    from spruce.errors import SpruceError

    assert default_layout() == "16x16g4"   # what the default 16x16 recipe emits on 7B shapes
    tiny = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4,
                vocab_size=96, max_position_embeddings=64)
    rows = bench_generate(batch_sizes=[2], new_tokens=3, prompt_tokens=8, layouts=["16x16", "16x16g4"],
                          modes=["graph"], num_layers=1, device="cpu", config_overrides=tiny, ttft_repeats=1,
                          json_path=str(tmp_path / "g.json"))
    out = capsys.readouterr().out
    # the layout as stored: independent 16x16 in 16-feature groups, 16x16g4 in 64-feature groups
    assert "layout 16x16 (global selection): q_proj 40% zero, 16-feature groups" in out
    assert "layout 16x16g4 (global selection): q_proj 40% zero, 64-feature groups" in out
    assert "up_proj 57% zero" in out      # attention at 40%, the MLP what keeps the total at 50%
    assert "bsr 16x16g4 +dense graph: dense dispatch: sparse: 7 of 7 linears at decode 2, 7 of 7 at decode 16" in out
    kinds = [(r["layout"], r["kind"], r["batch"]) for r in rows]
    assert kinds == [("16x16", "dense", 2), ("16x16", "bsr 16x16 +dense", 2), ("16x16g4", "dense", 2),
                     ("16x16g4", "bsr 16x16g4 +dense", 2), ("16x16", "bsr 16x16", 2), ("16x16g4", "bsr 16x16g4", 2)]
    for r in rows:
        assert r["ttft_ms"] > 0 and r["tokens_per_s"] > 0 and r["prompt_tokens"] == 8
        assert r["speedup"] > 0 and r["ttft_speedup"] > 0 and 0 <= r["tokens_equal_to_dense"] <= 1
    sparse = [r for r in rows if r["kind"] != "dense"]
    assert all(r["dispatch"].startswith("sparse: 7 of 7 linears at decode") for r in sparse)
    assert {r["dense_dispatch"] for r in sparse} == {True, False}
    saved = json.loads((tmp_path / "g.json").read_text())
    assert len(saved["rows"]) == 6 and set(saved["layouts"]) == {"16x16", "16x16g4"}
    assert "ttft ms" in out and "same new" in out

    wide_mlp = "16x16g4,mlp.gate_proj=16x16g8,mlp.up_proj=16x16g8"   # as spruce prune --module_pattern
    rows = bench_generate(batch_sizes=[2], new_tokens=3, prompt_tokens=8, layouts=[wide_mlp], modes=["graph"],
                          dense_dispatch="on", fuse="both", num_layers=1, device="cpu", config_overrides=tiny,
                          ttft_repeats=1)
    out = capsys.readouterr().out
    assert "q_proj 40% zero, 64-feature groups" in out and "gate_proj 57% zero, 128-feature groups" in out
    assert [r["kind"] for r in rows] == ["dense", f"bsr {wide_mlp} +dense", f"bsr {wide_mlp} +dense unfused"]
    assert all(r["tokens_equal_to_dense"] == 1 for r in rows)
    with pytest.raises(SpruceError, match="fuse must be one of"):
        bench_generate(layouts=["16x16g4"], fuse="sometimes", device="cpu")


def test_generation_bench_refuses_a_layout_the_pruner_does_not_emit_as_blocks():
    from bench.generate import bench_generate
    from spruce.errors import SpruceError

    with pytest.raises(SpruceError, match="block patterns the pruner emits"):
        bench_generate(layouts=["2:4"], device="cpu")


def test_step_weight_bytes_count_what_one_decode_step_reads(monkeypatch):
    """The generation bench's floor: an untied embedding table counts only its looked-up rows, a tied
    one (the LM head reads it) whole, and a block-sparse linear its kept blocks and indices, or its
    dense copy where the dispatch runs dense at that batch."""
    from bench.generate import step_weight_bytes
    from spruce.kernels import bsr
    from spruce.kernels.linear import BlockSparseLinear
    from tests.test_kernels import masked_weight

    def total(model):
        return sum(t.numel() * t.element_size() for t in {id(t): t for t in
                   [*model.parameters(), *model.buffers()]}.values())

    untied, tied = build_model(96, hidden=64), build_model(96, hidden=64, tie_word_embeddings=True)
    table = 96 * 64 * 4   # float32 embedding
    assert step_weight_bytes(untied, 2) == total(untied) - table + 2 * 64 * 4
    assert step_weight_bytes(tied, 2) == total(tied)

    lin = torch.nn.Linear(128, 64, bias=False)
    with torch.no_grad():
        lin.weight.copy_(masked_weight(64, 128, 16, 0.5, "grouped"))
    layer = BlockSparseLinear.from_linear(lin, keep_dense=True)
    sparse_bytes = sum(t.numel() * t.element_size() for t in (layer.values, layer.cols, layer.group_ptr))
    model = torch.nn.Sequential(layer)
    assert step_weight_bytes(model, 1) == sparse_bytes          # not tuned yet: counted as sparse
    key = bsr.tuning_key("decode", layer.sparse_weight, 1, torch.bfloat16)
    monkeypatch.setitem(bsr._tuned, key, bsr.DENSE)
    assert step_weight_bytes(model, 1) == 64 * 128 * 4          # runs dense at batch 1: the dense copy
    assert step_weight_bytes(model, 2) == sparse_bytes



@pytest.mark.parametrize("tokens", [2, 24])
def test_a_tuned_launch_builds_no_candidate_list(monkeypatch, tokens):
    """Once a launch shape is tuned, a launch runs its configuration (dense: cuBLAS on the copy; a
    tile: the kernel) without listing the candidates again: that host work bounds an eager prefill."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs the Triton interpreter (conftest.py sets it without a GPU)")
    from spruce.kernels import bsr
    from spruce.kernels.bsr import BlockSparseWeight
    from tests.test_kernels import masked_weight

    decode = tokens <= bsr.DECODE_MAX_TOKENS
    name = "decode_candidates" if decode else "prefill_candidates"
    real, listed = getattr(bsr, name), []
    monkeypatch.setattr(bsr, name, lambda *a: listed.append(a) or real(*a)[:1])
    _simulate(monkeypatch, lambda kind, shape: True)   # dense wins the tuning
    dense = masked_weight(64, 128, 16, 0.5, "grouped", dtype=torch.float16)
    w = BlockSparseWeight.from_dense(dense, 16)
    w.dense = dense.clone()
    x = torch.randn(tokens, 128, generator=torch.Generator().manual_seed(1)).half()
    launch = bsr.launch_decode if decode else bsr.launch_prefill
    key = bsr.tuning_key("decode" if decode else "prefill", w, tokens, x.dtype)
    ref = x.double() @ dense.double().t()
    for tile in (False, True):
        if tile:   # the same launch shape tuned to a kernel tile instead
            bsr._tuned[key] = real(*listed[0])[0]
        for _ in range(2):
            y = torch.full((tokens, 64), float("nan"), dtype=torch.float16)
            launch(x, w, None, y)
            torch.testing.assert_close(y.double(), ref, rtol=2e-3, atol=2e-2)
        assert len(listed) == 1   # listed for the first launch's tuning only
        assert (bsr._tuned[key] == bsr.DENSE) != tile


def _layer_tuned_dense(device, dtype, tokens):
    """A BlockSparseLinear with its dense copy whose launch at `tokens` is tuned to dense cuBLAS."""
    from spruce.kernels import bsr
    from spruce.kernels.linear import BlockSparseLinear
    from tests.test_kernels import masked_weight

    lin = torch.nn.Linear(128, 64, bias=True).to(device, dtype)
    with torch.no_grad():
        lin.weight.copy_(masked_weight(64, 128, 16, 0.5, "grouped", dtype=dtype))
    layer = BlockSparseLinear.from_linear(lin, keep_dense=True)
    kind = "decode" if tokens <= bsr.DECODE_MAX_TOKENS else "prefill"
    key = bsr.tuning_key(kind, layer.sparse_weight, tokens, dtype)
    return lin, layer, key


def test_a_dense_route_is_dropped_with_the_copy_or_the_tuning_table(monkeypatch):
    """A remembered dense route serves only the copy and the tuning table it was learned with, and
    only while that table still says dense for its key."""
    from spruce.kernels import bsr
    from spruce.kernels.linear import release_dense

    monkeypatch.setattr(bsr, "_tuned", {})
    lin, layer, key = _layer_tuned_dense("cpu", torch.float32, 24)
    x = torch.randn(2, 12, 128)
    ref = torch.nn.functional.linear(x.double(), lin.weight.double(), lin.bias.double()).float()
    bsr._tuned[key] = bsr.DENSE
    bogus = torch.zeros(64, 128)
    layer._dense_routes[24] = (bsr._tuned, key, id(bogus))   # learned for another tensor: not taken
    torch.testing.assert_close(layer(x), ref)
    layer.dense_weight.zero_()                               # marks which path ran: the copy gives zeros
    layer._dense_routes[24] = (bsr._tuned, key, id(layer.dense_weight))
    assert layer(x).abs().max() == layer.bias.abs().max()    # the route: F.linear on the copy
    bsr._tuned.clear()                                       # the table no longer says dense
    torch.testing.assert_close(layer(x), ref)
    bsr._tuned[key] = bsr.DENSE
    monkeypatch.setattr(bsr, "_tuned", {key: bsr.DENSE})     # another tuning table: the route is stale
    torch.testing.assert_close(layer(x), ref)
    layer._dense_routes[24] = (bsr._tuned, key, id(layer.dense_weight))
    assert release_dense(torch.nn.Sequential(layer)) == 0    # dense won a tuned shape: the copy stays
    layer.dense_weight = None                                # dropped (as on CPU): the block-sparse weight
    torch.testing.assert_close(layer(x), ref)


@pytest.mark.gpu
def test_a_launch_tuned_to_dense_learns_its_route_and_matches_dense():
    from spruce.kernels import bsr

    lin, layer, key = _layer_tuned_dense("cuda", torch.bfloat16, 24)
    saved = bsr._tuned.get(key)
    bsr._tuned[key] = bsr.DENSE
    try:
        x = torch.randn(2, 12, 128, device="cuda", dtype=torch.bfloat16)
        first, again = layer(x), layer(x)
        assert layer._dense_routes == {24: (bsr._tuned, key, id(layer.dense_weight))}
        expected = torch.nn.functional.linear(x, layer.dense_weight, layer.bias)
        assert torch.equal(first, expected) and torch.equal(again, expected)
    finally:
        if saved is None:
            bsr._tuned.pop(key)
        else:
            bsr._tuned[key] = saved


def test_host_time_bench_times_the_emitted_layer_against_nn_linear(capsys, tmp_path):
    """bench.host_time on CPU (--check): a row per token count, both block-sparse modules timed
    against the nn.Linear they replace; without a GPU the real run says why in one line."""
    import json

    from bench import host_time

    out = tmp_path / "host.json"
    assert host_time.cli_main(host_time.add_arguments, host_time.run, "",
                              ["--check", "--calls", "3", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["tokens"] for r in rows] == [1, 24] and {r["pattern"] for r in rows} == {"16x16g4"}
    for r in rows:
        assert r["dense_us"] > 0 and r["kernel_us"] > 0
        assert r["dispatch_x_dense"] == pytest.approx(r["dispatch_us"] / r["dense_us"], rel=0.01)
    assert "nn.Linear us" in capsys.readouterr().out
    if not torch.cuda.is_available():
        assert host_time.cli_main(host_time.add_arguments, host_time.run, "", []) == 2
        assert capsys.readouterr().err.startswith("error: benchmarks need a CUDA GPU")


def test_a_compiled_graph_runs_a_launch_tuned_to_dense_as_a_plain_matmul(monkeypatch):
    """Traced at a token count tuned to dense, the layer is F.linear on its copy in the graph (no
    opaque op to dispatch on every call); at another count, and once the copy is gone, the op."""
    from spruce.kernels import bsr

    monkeypatch.setattr(bsr, "_tuned", {})
    lin, layer, key = _layer_tuned_dense("cpu", torch.float32, 24)
    bsr._tuned[key] = bsr.DENSE
    graphs = []

    def backend(gm, example_inputs):
        graphs.append({str(n.target) for n in gm.graph.nodes if n.op == "call_function"})
        return gm.forward

    for tokens, expect_op in ((24, False), (12, True)):
        torch._dynamo.reset()
        x = torch.randn(2, tokens // 2, 128)
        out = torch.compile(nn.Sequential(layer), backend=backend, dynamic=False)(x)  # inside a model
        torch.testing.assert_close(out, lin(x))
        assert any("spruce.block_sparse_linear" in t for t in graphs[-1]) == expect_op, graphs[-1]
    torch._dynamo.reset()  # compiled for any token count: the op, which reads the route when it runs
    x = torch.randn(2, 12, 128)
    torch.testing.assert_close(torch.compile(nn.Sequential(layer), backend=backend, dynamic=True, fullgraph=True)(x), lin(x))
    assert any("spruce.block_sparse_linear" in t for t in graphs[-1])
    layer.dense_weight = None
    torch._dynamo.reset()
    torch.compile(nn.Sequential(layer), backend=backend, dynamic=False)(torch.randn(2, 12, 128))
    assert any("spruce.block_sparse_linear" in t for t in graphs[-1])
    torch._dynamo.reset()


def test_prefill_time_bench_reports_host_and_total_time_against_dense(capsys, tmp_path):
    """bench.prefill_time on CPU (--check): dense and block-sparse rows for each prompt, ratios
    against dense of the same run; a malformed prompt is a one-line error."""
    import json

    from bench import prefill_time

    path = tmp_path / "p.json"
    assert prefill_time.cli_main(prefill_time.add_arguments, prefill_time.run, "",
                                 ["--check", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    rows = json.loads(path.read_text())["rows"]
    assert [(r["kind"], r["batch"], r["tokens"]) for r in rows] == [
        ("dense", 1, 24), ("dense", 2, 12), ("bsr 16x16g4", 1, 24), ("bsr 16x16g4", 2, 12)]
    for r in rows:
        assert 0 < r["host_ms"] <= r["total_ms"] * 1.01 and r["kernels_ms"] is None
        dense = next(d for d in rows if d["kind"] == "dense" and d["tokens"] == r["tokens"])
        assert r["total_x_dense"] == pytest.approx(dense["total_ms"] / r["total_ms"])
    assert "sparse: 7 of 7 linears at prefill 32" in out and "total ms" in out
    assert prefill_time.cli_main(prefill_time.add_arguments, prefill_time.run, "", ["--prompts", "8by128"]) == 2
    assert "a prompt is BATCHxTOKENS" in capsys.readouterr().err


def test_a_tuning_candidate_that_faults_is_skipped_with_a_warning(monkeypatch):
    """A tile that does not fit the card (Triton's OutOfResources) is skipped quietly; any other
    failure is skipped with a warning naming it, so that a broken kernel does not hide behind the
    others (or behind dense)."""
    import warnings

    from spruce.kernels import bsr

    class OutOfResources(Exception):
        pass

    def fake_time(cfg, launch, copies):
        if cfg == "broken":
            raise TypeError("this launcher takes other arguments")
        if cfg == "too big":
            raise OutOfResources("shared memory")
        return 5.0

    monkeypatch.setattr(bsr, "_rotation", lambda w: [w])
    monkeypatch.setattr(bsr, "_time_candidate", fake_time)
    bsr._warn_candidate_failed.cache_clear()
    with pytest.warns(UserWarning, match="configuration broken failed and is skipped .TypeError: this launcher"):
        best, times = bsr._fastest(["broken", "too big", "fits"], None, None)
    assert best == "fits" and times == {"fits": 5.0}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bsr._warn_candidate_failed.cache_clear()
        assert bsr._fastest(["too big", "fits"], None, None)[0] == "fits"
