"""MLP channel permutation in the prune path (PruneSpec.permute, prune/permute.py): the function is
unchanged, the pruned model keeps its exact sparsity and grouped pattern, `sparsify` stores it in
64-feature tiles, the saved folder loads with plain transformers, and the recipe decides it."""

from __future__ import annotations

import pytest
import torch

from spruce.errors import SpruceError
from spruce.models import decoder_layers, prunable_linears
from spruce.prune.permute import feature_order, mlp_parts, permute_layer
from tests.conftest import build_model, served


def _model(**overrides):
    return build_model(256, hidden=128, num_attention_heads=4, num_key_value_heads=2, **overrides)


def _is_grouped(mask: torch.Tensor, rows: int, cols: int) -> bool:
    r, c = mask.shape
    tiles = mask.reshape(r // rows, rows, c // cols, cols).transpose(1, 2)
    return bool((tiles.all(dim=(2, 3)) | (~tiles).all(dim=(2, 3))).all())


def _tiny(arch: str):
    import transformers

    common = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=128)
    if arch == "phi3":       # gate and up stacked in one gate_up_proj
        config = transformers.Phi3Config(**common, num_key_value_heads=2, pad_token_id=0)
    else:                    # OPT: fc1 / fc2 with biases
        config = transformers.OPTConfig(**{**common, "intermediate_size": None}, ffn_dim=128,
                                        word_embed_proj_dim=64, pad_token_id=1)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("arch", ["llama", "phi3", "opt"])
def test_permutation_preserves_the_dense_logits(arch):
    model = _model() if arch == "llama" else _tiny(arch)
    ids = torch.randint(3, 96, (2, 24), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    with torch.no_grad():
        before = model(ids).logits
        writer = mlp_parts(decoder_layers(model)[0])[0][0][0].weight.clone()
        for layer in decoder_layers(model):
            def norms(names, layer=layer):     # stand-in calibration statistics
                return {n: torch.rand(layer.get_submodule(n).in_features) for n in names}
            assert permute_layer(layer, 32, 16, norms if arch == "llama" else None)
        after = model(ids).logits
    assert not torch.equal(writer, mlp_parts(decoder_layers(model)[0])[0][0][0].weight)   # rows did move
    assert torch.allclose(before, after, rtol=0, atol=1e-5)


def test_second_level_orders_each_run_for_the_reader_and_keeps_the_runs():
    torch.manual_seed(0)
    writer, reader = torch.rand(128, 64), torch.rand(64, 128)
    first = feature_order(writer, None, 64, 16)
    both = feature_order(writer, reader, 64, 16)
    assert sorted(both.tolist()) == list(range(128))
    # the writers' runs of 64 hold the same features (the order inside a run is free for them) ...
    assert [set(r.tolist()) for r in both.view(-1, 64)] == [set(r.tolist()) for r in first.view(-1, 64)]
    assert not torch.equal(both, first)                  # ... and the reader's 16-wide runs were reordered
    # a reader whose 16-column runs each favour one tile row is sorted back into them
    kinds = torch.arange(128) % 4
    reader = torch.full((64, 128), 0.1)
    for k in range(4):
        reader[16 * k:16 * k + 16, kinds == k] = 1.0
    order = feature_order(torch.ones(128, 64), reader, 64, 16, reader_group_rows=16)
    assert all(len(set(kinds[r].tolist())) == 1 for r in order.view(-1, 16))


def _prune(pattern: str, method: str | None = None, layers: int = 2, **given):
    from spruce.prune.defaults import resolve_recipe
    from spruce.prune.run import prune_with_options

    model = _model(num_hidden_layers=layers)
    torch.manual_seed(0)
    samples = torch.randint(0, 256, (4, 32))
    recipe = resolve_recipe(pattern, method=method, reconstruct_epochs=1 if method is None else None, **given)
    info, spec, _ = prune_with_options(model, recipe, pattern, 0.5, lambda spec: samples, progress=False)
    return model, info, spec


def test_default_grouped_recipe_permutes_and_keeps_exact_grouped_sparsity(tmp_path):
    from transformers import AutoModelForCausalLM

    from spruce.card import model_card
    from spruce.kernels import BlockSparseLinear, sparsify
    from spruce.prune.run import save_pruned

    model, info, spec = _prune("16x16g4", layers=1)     # OBS and the reconstruction: one layer shows it
    assert spec.permute and info["permute"] is True and info["pattern"] == "16x16g4"
    for name, linear in prunable_linears(model).items():
        zero = linear.weight.detach() == 0
        tiles = zero.numel() // (64 * 16)           # the nearest whole number of group tiles to the target
        assert zero.float().mean().item() * tiles == round(info["target_layers"][name] * tiles), name
        assert _is_grouped(zero, 64, 16), name
    # the saved folder is an ordinary Hugging Face model with the same logits
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))
    save_pruned(model, None, tmp_path / "p", info)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "p").eval()
    assert "MLP features reordered for the block tiles first" in model_card(tmp_path / "p")
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, loaded(ids).logits, rtol=0, atol=1e-5)
    sparsify(model, block_size=16, min_sparsity=0.2)
    sparse = [m for m in model.modules() if isinstance(m, BlockSparseLinear)]
    assert served(sparse) == len(prunable_linears(loaded))
    for m in sparse:
        w = m.sparse_weight
        assert w.group == 4
        assert w.values.shape[0] * w.group == w.nonzero_blocks    # no all-zero 16x16 block stored


def test_permuted_prune_moves_gate_up_rows_and_down_columns_together():
    """Wanda changes no kept weight, so the pruned MLP is the dense one reordered, then masked: the
    order found from gate's rows is the order of up's rows and of down's columns."""
    dense = _model()
    model, info, _ = _prune("16x16g4", method="wanda", permute=True)
    assert info["permute"] is True
    for layer, ref in zip(decoder_layers(model), decoder_layers(dense)):
        gate, ref_gate = layer.mlp.gate_proj.weight, ref.mlp.gate_proj.weight
        kept = gate != 0
        perm = torch.tensor([int(((ref_gate[:, k] - gate[r, k]).abs().sum(1) == 0).nonzero()[0])
                             for r, k in enumerate(kept)])
        assert sorted(perm.tolist()) == list(range(gate.shape[0])) and not torch.equal(perm, torch.arange(len(perm)))
        up, down = layer.mlp.up_proj.weight, layer.mlp.down_proj.weight
        assert torch.equal(up, ref.mlp.up_proj.weight[perm] * (up != 0))
        assert torch.equal(down, ref.mlp.down_proj.weight[:, perm] * (down != 0))


def test_the_recipe_decides_permute():
    from spruce.prune import defaults
    from spruce.prune.defaults import resolve_recipe, spec_for_model
    from spruce.prune.spec import PruneSpec

    linears = prunable_linears(_model())

    def spec(pattern, **given):
        return spec_for_model(resolve_recipe(pattern, **given), pattern, 0.5, linears)[0]

    assert spec("16x16g4").permute is True                        # grouped, default recipe
    assert spec("16x16g4", permute=False).permute is False        # the recipe's word wins
    assert spec("16x16g4", method="sparsegpt").permute is False   # a named method runs plainly
    assert spec("16x16").permute is True                          # independent blocks: permuted as well
    assert spec("16x16", permute=True).permute is True
    # switching the default grouping turns the default 16x16 recipe grouped and permuted
    recipe = {**resolve_recipe("16x16"), "block_group": 4}
    got = spec_for_model(recipe, "16x16", 0.5, linears)[0]
    assert (got.pattern, got.permute) == ("16x16g4", defaults.DEFAULT_PERMUTE["grouped"])
    with pytest.raises(SpruceError, match="permute reorders MLP features into block-rows; 2:4"):
        PruneSpec(method="sparsegpt", pattern="2:4", permute=True)
    with pytest.raises(SpruceError, match="permute must be true or false, got 'yes'"):
        PruneSpec(pattern="16x16", permute="yes")


def test_progressive_rounds_keep_the_first_rounds_order(tiny_model_dir, corpus_file, tmp_path):
    """Round 2 prunes the recovered round-1 model: a second permutation would move the round-1
    zeros away from the positions that round keeps zero, breaking the pattern and the sparsity."""
    from spruce.config import load_recipe
    from spruce.masks import zero_masks
    from spruce.pipeline import run_recipe
    from tests.test_pipeline import quiet, tiny_overrides
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    cfg = load_recipe(None, tiny_overrides(tiny_model_dir, corpus_file, out, "prune.pattern=16x16g2",
                                           "prune.method=wanda", "prune.sparsity=0.5", "prune.options={permute: true}",
                                           "recover.max_steps=2", "prune.rounds=[0.25, 0.5]", "stages=[baseline, prune]"))
    run_recipe(cfg, say=quiet([]), progress=False)
    first = zero_masks(AutoModelForCausalLM.from_pretrained(out / "rounds" / "round1-pruned"))
    final = zero_masks(AutoModelForCausalLM.from_pretrained(out / "pruned"))
    for name, zero in final.items():
        assert torch.all(zero | ~first[name]), name
        assert _is_grouped(zero, 32, 16), name
        assert zero.float().mean().item() == 0.5, name
