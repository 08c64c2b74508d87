"""Grouped block layout (16x16g4): the pattern, its in-sweep and OBS choices, the model the default
recipe machinery writes stored by `sparsify` in wide tiles, and dense dispatch in the kernels."""

from __future__ import annotations

import pytest
import torch

from spruce.errors import SpruceError
from spruce.prune.patterns import parse_pattern
from tests.conftest import build_model, served


def _group_tiles(mask: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """(groups, tile columns, rows, cols) view of a weight mask."""
    r, c = mask.shape
    return mask.reshape(r // rows, rows, c // cols, cols).transpose(1, 2)


def _is_grouped(mask: torch.Tensor, rows: int, cols: int) -> bool:
    tiles = _group_tiles(mask, rows, cols)
    return bool((tiles.all(dim=(2, 3)) | (~tiles).all(dim=(2, 3))).all())


def test_parse_grouped_names_block_and_group():
    p = parse_pattern("16x16g4")
    assert (p.kind, p.block_rows, p.group, p.rows, p.cols) == ("grouped", 16, 4, 64, 16)
    assert parse_pattern("16x16").kind == "block"
    with pytest.raises(SpruceError, match="must be positive"):
        parse_pattern("16x16g0")


def test_mask_is_whole_group_tiles_scored_over_the_group():
    torch.manual_seed(0)
    score = torch.rand(256, 128)
    p = parse_pattern("16x16g4")
    mask = p.mask(score, 0.5)
    assert mask.float().mean().item() == 0.5
    assert _is_grouped(mask, 64, 16)
    # the group tile's score is the mean over its 4 tiles of 16x16: the group whose tiles are
    # all mediocre loses to the group with one excellent tile
    score = torch.full((128, 32), 1.0)
    score[0:16, 0:16] = 10.0                  # group 0, column 0: one strong 16x16 tile
    score[64:128, 16:32] = 2.0                # group 1, column 1: four good tiles
    mask = parse_pattern("16x16g4").mask(score, 0.5)
    assert not mask[0:64, 0:16].any() and not mask[64:128, 16:32].any()
    assert mask[0:64, 16:32].all() and mask[64:128, 0:16].all()


def test_row_balanced_keeps_the_same_count_in_every_group():
    torch.manual_seed(1)
    score = torch.rand(256, 128)
    score[:64] *= 10                         # one group far more important than the others
    p = parse_pattern("16x16g4", selection="row-balanced")
    tiles = _group_tiles(p.mask(score, 0.5), 64, 16).all(dim=(2, 3))
    assert tiles.sum(1).tolist() == [4, 4, 4, 4]
    assert not p.in_sweep
    glob = _group_tiles(parse_pattern("16x16g4").mask(score, 0.5), 64, 16).all(dim=(2, 3))
    assert glob.sum(1).tolist() != [4, 4, 4, 4]   # global selection is free to differ per group


def test_sweep_mask_decides_the_group_jointly():
    p = parse_pattern("16x16g4")
    assert p.in_sweep and p.sweep_group == 16
    err = torch.ones(128, 16)
    err[0:16] = 100.0                        # one block-row of group 0 is costly to prune
    mask = p.sweep_mask_at(0, err, 0.5)
    assert mask.shape == err.shape
    assert not mask[0:64].any() and mask[64:128].all()


def test_sweep_quota_reaches_the_sparsity_with_few_groups():
    """A 192-row layer has 3 groups of 64: round(3 * 0.4) = 1 per column would prune 33%; the
    running quota prunes 40% of the group tiles over the columns."""
    p = parse_pattern("16x16g4")
    torch.manual_seed(0)
    cols = [p.sweep_mask_at(16 * j, torch.rand(192, 16), 0.4) for j in range(10)]
    assert torch.cat(cols, 1).float().mean().item() == pytest.approx(0.4)


def test_check_divides_names_the_layer_and_the_groups_that_fit():
    p = parse_pattern("16x16g4")
    p.check_divides({"ok": (128, 64)})
    with pytest.raises(SpruceError, match=r"16x16g4 needs out_features divisible by 64.*k_proj is 32x64.*16x16g2"):
        p.check_divides({"k_proj": (32, 64)})


def _pruned(method: str | None, pattern: str, **recipe_options):
    from spruce.prune.defaults import resolve_recipe
    from spruce.prune.run import prune_with_options

    model = build_model(256, hidden=128, num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    samples = torch.randint(0, 256, (4, 32))
    recipe = {**resolve_recipe(pattern, method=method, reconstruct_epochs=1 if method is None else None),
              **recipe_options}
    info, _, _ = prune_with_options(model, recipe, pattern, 0.5, lambda spec: samples, progress=False)
    return model, info


@pytest.mark.parametrize("method", [None, "sparsegpt", "wanda"])   # None: the default recipe (obs)
def test_pruned_model_is_stored_in_wide_tiles_with_no_zero_block(method):
    from spruce.kernels import BlockSparseLinear, sparsify
    from spruce.models import prunable_linears

    model, info = _pruned(method, "16x16g4")
    assert info["pattern"] == "16x16g4"
    linears = prunable_linears(model)
    for name, linear in linears.items():
        assert _is_grouped(linear.weight.detach() == 0, 64, 16), name
    report = sparsify(model, block_size=16, min_sparsity=0.2)
    sparse = [m for m in model.modules() if isinstance(m, BlockSparseLinear)]
    assert served(sparse) == len(linears) == len(report.swapped)
    for m in sparse:
        w = m.sparse_weight
        assert w.group >= 4 and w.group % 4 == 0
        assert w.values.shape[0] * w.group == w.nonzero_blocks   # no all-zero 16x16 block stored


def test_independent_blocks_are_stored_narrow():
    """The same machinery with 16x16: every block-row its own columns, stored in groups of one."""
    from spruce.kernels import BlockSparseLinear, sparsify

    model, _ = _pruned("sparsegpt", "16x16")
    sparsify(model, block_size=16, min_sparsity=0.2)
    groups = {m.group for m in model.modules() if isinstance(m, BlockSparseLinear)}
    assert groups == {1}


def test_default_block_group_turns_the_block_recipe_grouped():
    from spruce.prune.defaults import default_grouping, resolve_recipe

    recipe = resolve_recipe("16x16")
    assert default_grouping("16x16", recipe) == "16x16g4"          # the default: 64-row groups
    assert default_grouping("16x16", {**recipe, "block_group": 1}) == "16x16"
    assert default_grouping("16x16g1", recipe) == "16x16g1"        # the spelling that keeps rows independent
    assert default_grouping("16x16", resolve_recipe("16x16", method="obs")) == "16x16"   # a named method: plain
    assert default_grouping("16x16", {**recipe, "block_group": 4}) == "16x16g4"
    assert default_grouping("2:4", {**recipe, "block_group": 4}) == "2:4"
    assert resolve_recipe("16x16g4")["method"] == resolve_recipe("16x16")["method"] == "obs"
    _, info = _pruned("sparsegpt", "16x16", block_group=4)
    assert info["pattern"] == "16x16g4"


# ---------------------------------------------------------------- dense dispatch (simulated timings)

def _simulated(monkeypatch, dense_us: float, kernel_us: float):
    """Time every candidate with a fixed number instead of CUDA graphs: DENSE at dense_us, every
    kernel tile at kernel_us (the first tile a little faster than the rest)."""
    from spruce.kernels import bsr

    calls = []

    def fake_time(cfg, launch, copies):
        for c in copies:
            launch(cfg, c)             # the candidate still runs: a broken one would fail here
        calls.append(cfg)
        return dense_us if cfg == bsr.DENSE else kernel_us + len(calls) * 1e-3

    monkeypatch.setattr(bsr, "_time_candidate", fake_time)
    monkeypatch.setattr(bsr, "_rotation", lambda w: [w])
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)   # CPU-only builds
    monkeypatch.setattr(bsr, "_tuned", {})
    monkeypatch.setattr(bsr, "_tune_ms", {})
    monkeypatch.setattr(bsr, "_workspaces", {})
    monkeypatch.setattr(bsr, "DECODE_GEMV_CONFIGS", bsr.DECODE_GEMV_CONFIGS[:2])
    monkeypatch.setattr(bsr, "DECODE_DOT_CONFIGS", [])
    monkeypatch.setattr(bsr, "DECODE_SWAP_CONFIGS", [])
    return calls


def _grouped_weight(dtype=torch.float16):
    from spruce.kernels import BlockSparseWeight

    torch.manual_seed(0)
    w = torch.randn(128, 64)
    w = w.masked_fill(parse_pattern("16x16g4").mask(torch.rand(128, 64), 0.5), 0).to(dtype)
    sparse = BlockSparseWeight.from_dense(w, 16)
    sparse.dense = w.clone()
    return w, sparse


@pytest.mark.parametrize("dense_faster", [True, False])
def test_tuner_runs_dense_where_dense_is_timed_faster(monkeypatch, dense_faster):
    pytest.importorskip("triton")
    import os

    import torch.nn.functional as F

    from spruce.kernels import bsr

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs the Triton interpreter (conftest.py sets it without a GPU)")
    calls = _simulated(monkeypatch, dense_us=1.0 if dense_faster else 9.0, kernel_us=5.0)
    w, sparse = _grouped_weight()
    x, bias = torch.randn(1, 64).half(), torch.randn(128).half()
    y = torch.full((1, 128), float("nan"), dtype=torch.float16)
    bsr.launch_decode(x, sparse, bias, y)
    assert bsr.DENSE in calls and len(calls) >= 2          # dense timed beside the kernel tiles
    assert bsr.runs_dense("decode", sparse, 1, x.dtype) is dense_faster
    if dense_faster:
        assert torch.equal(y, F.linear(x, w, bias))          # exactly what dense computes
    else:
        ref = F.linear(x.double(), w.double(), bias.double())
        assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-2
    without = bsr.BlockSparseWeight.from_dense(w, 16)       # no dense copy: dense is no candidate
    calls.clear()
    bsr.launch_decode(x, without, bias, y)
    assert bsr.DENSE not in calls and bsr.runs_dense("decode", without, 1, x.dtype) is False


def test_release_dense_keeps_the_copy_only_where_dense_won(monkeypatch):
    from torch import nn

    from spruce.kernels import BlockSparseLinear, bsr, dispatch_summary, release_dense, sparsify

    monkeypatch.setattr(bsr, "_tuned", {})
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128, bias=False), nn.Linear(64, 64, bias=False))
    with torch.no_grad():
        for lin in model:
            lin.weight.masked_fill_(parse_pattern("16x16").mask(torch.rand_like(lin.weight), 0.5), 0)
    sparsify(model, dense_fallback=True)
    a, b = model[0], model[1]
    assert isinstance(a, BlockSparseLinear) and a.dense_weight is not None
    assert "dense_weight" not in a.state_dict()               # the saved model is unchanged
    assert "not tuned yet: 2" in dispatch_summary(model)
    # simulated tuning results: layer a ran dense at 2048 tokens, layer b the kernel everywhere
    bsr._tuned[bsr.tuning_key("prefill", a.sparse_weight, 2048, torch.float16)] = bsr.DENSE
    bsr._tuned[bsr.tuning_key("decode", a.sparse_weight, 1, torch.float16)] = (4, 1024, 4, 1, False, 1)
    bsr._tuned[bsr.tuning_key("decode", b.sparse_weight, 1, torch.float16)] = (4, 1024, 4, 1, False, 1)
    line = dispatch_summary(model)
    assert line.startswith("block-sparse kernel at every tuned launch: 1 of 2 layers")
    assert "dense cuBLAS at some: 0 (prefill 2048)" in line
    assert release_dense(model) == 64 * 64 * 4
    assert a.dense_weight is not None and b.dense_weight is None
    x = torch.randn(3, 64)
    assert torch.allclose(a(x), x @ a.dense_weight.T, atol=1e-5)   # CPU: the reference, same result


# ---------------------------------------------------------------- MLP channel permutation

def test_mlp_permutation_preserves_the_function_exactly():
    from spruce.prune.permute import permute_model_mlps

    model = build_model(256, hidden=128, num_attention_heads=4, num_key_value_heads=2).double()
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        before = model(ids).logits
        up = model.model.layers[0].mlp.up_proj.weight.clone()
        assert permute_model_mlps(model, group_rows=64) == 2
        after = model(ids).logits
    assert not torch.equal(up, model.model.layers[0].mlp.up_proj.weight)   # the rows did move
    assert torch.allclose(before, after, rtol=0, atol=1e-12)


def test_permutation_groups_rows_with_similar_columns():
    from spruce.prune.permute import block_column_importance, similar_rows_order

    torch.manual_seed(0)
    # 4 kinds of rows, each important on its own 2 of 8 block-columns, shuffled
    kinds = torch.arange(256) % 4
    score = torch.rand(256, 128) * 0.1
    for k in range(4):
        score[kinds == k, 32 * k:32 * k + 32] += 1.0
    score = score[torch.randperm(256)]
    pattern = parse_pattern("16x16g4")

    def kept(s):
        return (s * ~pattern.mask(s, 0.75)).sum() / s.sum()

    perm = similar_rows_order(block_column_importance(score, 16), 64)
    assert sorted(perm.tolist()) == list(range(256))
    assert kept(score[perm]) > 0.85 > kept(score)   # 0.875 is the most any mask keeps here
    assert _is_grouped(pattern.mask(score[perm], 0.75), 64, 16)


def test_default_group_shrinks_to_what_the_model_divides_into():
    from spruce.prune.defaults import default_grouping, resolve_recipe

    recipe = resolve_recipe("16x16")
    rows = lambda *outs, i=1024: {f"l{k}": torch.nn.Linear(i, o, bias=False) for k, o in enumerate(outs)}  # noqa: E731
    assert default_grouping("16x16", recipe, rows(128, 192)) == "16x16g4"
    assert default_grouping("16x16", recipe, rows(128, 96)) == "16x16g2"     # 96 rows: groups of 32
    assert default_grouping("16x16", recipe, rows(128, 48)) == "16x16"       # 48 rows: one block-row each
    assert default_grouping("16x16", recipe, rows(128, i=256)) == "16x16g2"  # g4: 2 x 16 tiles, too coarse
    assert default_grouping("16x16", recipe, rows(64, i=64)) == "16x16"      # a tiny model: independent
    assert default_grouping("16x16", {**recipe, "block_group": 4}, rows(48)) == "16x16g4"   # asked: kept (and checked)


@pytest.mark.parametrize("method", [None, "wanda"])   # None: the default recipe (obs, permuted MLP)
def test_module_patterns_prune_the_mlp_in_wider_groups(method, tmp_path):
    """gate/up in 128-row groups (16x16g8), the rest in 64-row ones: each linear gets its own
    pattern, the MLP is reordered for the wider tiles, the report and card say so, and sparsify
    stores each linear in its pattern's width."""
    from spruce.card import model_card
    from spruce.kernels import BlockSparseLinear, sparsify
    from spruce.models import prunable_linears
    from spruce.prune.run import save_pruned

    wide = {"mlp.gate_proj": "16x16g8", "mlp.up_proj": "16x16g8"}
    model, info = _pruned(method, "16x16g4", module_patterns=wide)
    assert info["pattern"] == "16x16g4" and info["module_patterns"] == wide
    for name, linear in prunable_linears(model).items():
        zero = linear.weight.detach() == 0
        rows = 128 if "gate_proj" in name or "up_proj" in name else 64
        assert _is_grouped(zero, rows, 16), name
    save_pruned(model, None, tmp_path / "p", info)
    assert "module patterns mlp.gate_proj 16x16g8, mlp.up_proj 16x16g8" in model_card(tmp_path / "p")
    sparsify(model, block_size=16, min_sparsity=0.2)
    sparse = {n.rsplit(".", 1)[-1]: m.sparse_weight for n, m in model.named_modules()
              if isinstance(m, BlockSparseLinear)}
    assert sparse["gate_proj+up_proj"].group == 8 and sparse["q_proj+k_proj+v_proj"].group == 4
    for w in sparse.values():   # the widest group that stores no zero block (down: 4, or 8 where it happens to fit)
        assert w.group % 4 == 0 and w.values.shape[0] * w.group == w.nonzero_blocks


def test_a_module_pattern_that_names_nothing_or_does_not_tile_is_refused():
    from spruce.prune.spec import PruneSpec, parse_module_patterns

    assert parse_module_patterns("mlp.gate_proj=16x16g8, up_proj=16x16g8") == {"mlp.gate_proj": "16x16g8",
                                                                              "up_proj": "16x16g8"}
    with pytest.raises(SpruceError, match="bad module pattern 'gate_proj'"):
        parse_module_patterns("gate_proj")
    with pytest.raises(SpruceError, match="unknown|pattern"):
        PruneSpec(method="wanda", pattern="16x16", module_patterns={"gate_proj": "17by3"})
    with pytest.raises(SpruceError, match="sparsity is free"):
        PruneSpec(method="wanda", pattern="16x16", module_patterns={"gate_proj": "2:4"})
    spec = PruneSpec(method="wanda", pattern="16x16g4", module_patterns={"gate": "16x16g8"})
    with pytest.raises(SpruceError, match="module pattern key 'gate' matches no decoder linear"):
        spec.check_divides({"model.layers.0.mlp.up_proj": (128, 64)})
    with pytest.raises(SpruceError, match="16x16g8 needs out_features divisible by 128"):
        spec.check_divides({"model.layers.0.mlp.gate_proj": (64, 64)})
