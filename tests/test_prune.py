"""The layer-by-layer engine on a tiny Llama: exact patterns, Wanda's math, saving."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from spruce.errors import SpruceError
from spruce.evaluate import perplexity
from spruce.masks import block_pattern_holds, read_sparsity_json, weight_sparsity, write_sparsity_json
from spruce.models import prunable_linears, save_model
from spruce.prune import Reconstruct, prune_model
from spruce.prune.methods import wanda_score
from spruce.prune.patterns import unstructured_row_mask
from tests.conftest import build_model


def _samples(vocab, n=4, seqlen=32, seed=0):
    return torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def test_wanda_16x16_exact_pattern_and_sparsity(tiny_model):
    info = prune_model(tiny_model, "wanda", "16x16", 0.5, samples=_samples(tiny_model.config.vocab_size),
                       batch_size=2, progress=False)
    for name, m in prunable_linears(tiny_model).items():
        assert block_pattern_holds(m.weight, 16, 16), name
        assert (m.weight == 0).float().mean().item() == 0.5, name
    assert info["measured_sparsity"] == 0.5 and info["pattern"] == "16x16"


def test_wanda_matches_hand_computed_scores_on_first_layer(tiny_model):
    samples = _samples(tiny_model.config.vocab_size)
    q_proj = tiny_model.model.layers[0].self_attn.q_proj
    seen = []
    handle = q_proj.register_forward_hook(lambda m, i, o: seen.append(i[0].detach().reshape(-1, i[0].shape[-1])))
    with torch.no_grad():
        tiny_model(samples)
    handle.remove()
    x = torch.cat(seen)
    expected = unstructured_row_mask(wanda_score(q_proj.weight.data, (x * x).sum(0)), 0.5)
    prune_model(tiny_model, "wanda", "unstructured", 0.5, samples=samples, batch_size=3, progress=False)
    assert torch.equal(q_proj.weight == 0, expected)


def test_magnitude_needs_no_samples(tiny_model):
    prune_model(tiny_model, "magnitude", "unstructured", 0.25, progress=False)
    assert all(abs(s - 0.25) < 1e-9 for s in weight_sparsity(tiny_model).values())


def test_zero_sparsity_is_a_no_op(tiny_model):
    before = {n: m.weight.clone() for n, m in prunable_linears(tiny_model).items()}
    prune_model(tiny_model, "wanda", "16x16", 0.0, samples=_samples(tiny_model.config.vocab_size), progress=False)
    assert all(torch.equal(before[n], m.weight) for n, m in prunable_linears(tiny_model).items())


@pytest.mark.parametrize("sparsity", [1.0, -0.1])
def test_sparsity_out_of_range(tiny_model, sparsity):
    with pytest.raises(SpruceError, match=r"sparsity must be in \[0, 1\)"):
        prune_model(tiny_model, "magnitude", "unstructured", sparsity, progress=False)


def test_saved_then_loaded_keeps_zeros_and_perplexity(tiny_model, tokenizer, tmp_path):
    info = prune_model(tiny_model, "wanda", "16x16", 0.5, samples=_samples(tiny_model.config.vocab_size),
                       progress=False)
    save_model(tiny_model, tokenizer, tmp_path)
    write_sparsity_json(tmp_path, info)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # plain transformers
    windows = _samples(tiny_model.config.vocab_size, n=3, seqlen=64, seed=5)
    assert perplexity(loaded, windows, progress=False)["ppl"] == perplexity(tiny_model, windows, progress=False)["ppl"]
    for name, m in prunable_linears(loaded).items():
        assert torch.equal(m.weight == 0, prunable_linears(tiny_model)[name].weight == 0)
    assert read_sparsity_json(tmp_path)["measured_sparsity"] == 0.5
    assert json.loads((tmp_path / "sparsity.json").read_text())["layers"]


@pytest.mark.gpu
def test_engine_on_cuda(tiny_model):
    tiny_model.cuda()
    prune_model(tiny_model, "wanda", "16x16", 0.5, samples=_samples(tiny_model.config.vocab_size),
                device="cuda", progress=False)
    assert all(block_pattern_holds(m.weight, 16, 16) for m in prunable_linears(tiny_model).values())


@pytest.mark.parametrize("method, pattern, options", [
    ("sparsegpt", "16x16", {}),
    ("sparsegpt", "unstructured", {}),
    ("wanda+update", "16x16", {"selection": "row-balanced"}),
    ("obs", "16x16", {}),
    ("obs", "32x32", {"selection": "row-balanced"}),
])
def test_hessian_methods_exact_blocks_and_sparsity(tiny_model, method, pattern, options):
    info = prune_model(tiny_model, method, pattern, 0.5, samples=_samples(tiny_model.config.vocab_size),
                       batch_size=2, progress=False, **options)
    b = 16 if pattern == "unstructured" else int(pattern.split("x")[0])
    for name, m in prunable_linears(tiny_model).items():
        if pattern != "unstructured":
            assert block_pattern_holds(m.weight, b, b), name
        assert (m.weight == 0).float().mean().item() == 0.5, name
    assert info["method"] == method and info["measured_sparsity"] == 0.5


def test_nm_pattern_on_the_model(tiny_model):
    info = prune_model(tiny_model, "sparsegpt", "2:4", 0.5, samples=_samples(tiny_model.config.vocab_size),
                       batch_size=2, progress=False)
    for name, m in prunable_linears(tiny_model).items():
        assert ((m.weight == 0).view(m.weight.shape[0], -1, 4).sum(-1) >= 2).all(), name
    assert info["measured_sparsity"] == 0.5 and info["selection"] == "per-group"


def test_nm_fixes_the_sparsity(tiny_model):
    with pytest.warns(UserWarning, match="4:8 fixes the sparsity at 0.5"):
        info = prune_model(tiny_model, "magnitude", "4:8", 0.3, progress=False)
    assert info["measured_sparsity"] == 0.5


def test_owl_allocation_averages_to_the_target(tiny_model):
    info = prune_model(tiny_model, "wanda", "unstructured", 0.5, samples=_samples(tiny_model.config.vocab_size),
                       allocation="owl", owl_lambda=0.1, progress=False)
    sizes = {n: m.weight.numel() for n, m in prunable_linears(tiny_model).items()}
    assert len(info["owl"]["outlier_ratios"]) == 2
    assert len({round(v, 6) for v in info["target_layers"].values()}) == 2  # one sparsity per decoder block
    assert abs(info["measured_sparsity"] - 0.5) < 1 / 64  # to within one weight per row
    assert sum(info["target_layers"][n] * sizes[n] for n in sizes) / sum(sizes.values()) == pytest.approx(0.5)


def test_module_overrides_make_attention_denser(tiny_model):
    info = prune_model(tiny_model, "wanda", "16x16", 0.5, samples=_samples(tiny_model.config.vocab_size),
                       module_sparsity={"self_attn": 0.25}, progress=False)
    layers = info["layers"]
    assert all(v == 0.25 for n, v in layers.items() if "self_attn" in n)
    assert all(v > 0.5 for n, v in layers.items() if "mlp" in n)
    assert abs(info["measured_sparsity"] - 0.5) < 0.01  # to within one tile per matrix


def test_shared_inputs_share_statistics(tiny_model):
    from spruce.prune.engine import capture_layer_inputs, gather_statistics
    layer = tiny_model.model.layers[0]
    batches = capture_layer_inputs(tiny_model, _samples(tiny_model.config.vocab_size), torch.device("cpu"), 2)
    stats, groups = gather_statistics(layer, batches, ("sq_norm", "hessian"))
    assert groups == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                      ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
    assert stats["self_attn.q_proj"] is stats["self_attn.k_proj"] is stats["self_attn.v_proj"]
    assert stats["mlp.gate_proj"] is stats["mlp.up_proj"]
    assert stats["self_attn.o_proj"] is not stats["self_attn.q_proj"]
    h = stats["self_attn.q_proj"]["hessian"]
    assert torch.allclose(torch.diagonal(h), stats["self_attn.q_proj"]["sq_norm"], rtol=1e-5)


def test_obs_refuses_unstructured(tiny_model):
    with pytest.raises(SpruceError, match="method 'obs' prunes block patterns"):
        prune_model(tiny_model, "obs", "unstructured", 0.5, samples=_samples(tiny_model.config.vocab_size),
                    progress=False)


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["sparsegpt", "obs", "obs+reconstruct"])
def test_hessian_engine_on_cuda(tiny_model, method):
    from spruce.prune.engine import Reconstruct
    rec = Reconstruct(epochs=2, lr=3e-4) if method.endswith("+reconstruct") else None
    prune_model(tiny_model, method.split("+")[0], "16x16", 0.5, samples=_samples(tiny_model.config.vocab_size),
                device="cuda", progress=False, reconstruct=rec, sequential=rec is not None)
    assert all(block_pattern_holds(m.weight, 16, 16) and m.weight.device.type == "cpu"
               for m in prunable_linears(tiny_model).values())


def test_dense_target_statistics(tiny_model):
    import copy

    from spruce.prune.engine import capture_layer_inputs, gather_statistics
    layers = tiny_model.model.layers
    batches = capture_layer_inputs(tiny_model, _samples(tiny_model.config.vocab_size), torch.device("cpu"), 2)
    ref = copy.deepcopy(layers[0])
    stats, _ = gather_statistics(layers[0], batches, ("hessian",), (ref, batches))
    assert all(torch.count_nonzero(s["cross"]) == 0 for s in stats.values())  # same inputs: nothing to fix
    shifted = [(h + 0.1, kw) for h, kw in batches]
    stats, _ = gather_statistics(layers[0], shifted, ("hessian",), (ref, batches))
    assert torch.count_nonzero(stats["mlp.down_proj"]["cross"]) > 0


def test_dense_target_prunes_to_the_pattern(tiny_model):
    info = prune_model(tiny_model, "obs", "16x16", 0.5, samples=_samples(tiny_model.config.vocab_size),
                       dense_target=True, progress=False)
    assert info["dense_target"] and info["measured_sparsity"] == 0.5
    assert all(block_pattern_holds(m.weight, 16, 16) for m in prunable_linears(tiny_model).values())


def test_default_recipes_per_pattern():
    from spruce.prune.defaults import fit_to_model, resolve_recipe
    block = resolve_recipe("16x16")
    assert block["method"] == "obs" and not block["dense_target"] and block["module_sparsity"] == {"attn": 0.4}
    assert block["reconstruct_epochs"] == 24 and block["reconstruct_lr"] == 3e-3
    assert resolve_recipe("2:4")["reconstruct_epochs"] == 4
    # naming a method opts out of the pattern's default recipe: the reference command stays the reference
    named = resolve_recipe("16x16", method="wanda")
    assert named["module_sparsity"] is None and named["reconstruct_epochs"] == 0 and not named["dense_target"]
    assert resolve_recipe("2:4", method="sparsegpt")["reconstruct_epochs"] == 0
    assert resolve_recipe("16x16", method="obs", reconstruct_epochs=2)["reconstruct_epochs"] == 2
    assert resolve_recipe("16x16", selection="row-balanced")["selection"] == "row-balanced"
    assert resolve_recipe("unstructured")["method"] == "sparsegpt"
    assert resolve_recipe("2:4")["method"] == "sparsegpt"
    # a default override that names nothing in the model is dropped; a user's one is kept (and checked later)
    gpt2_like = {"h.0.mlp.c_fc": torch.nn.Linear(64, 256)}
    assert fit_to_model(block, gpt2_like)["module_sparsity"] is None
    user = resolve_recipe("16x16", module_sparsity={"attn": 0.3})
    assert user["method"] == "obs" and user["reconstruct_epochs"] == 24   # a flag changes one thing only
    assert fit_to_model(user, gpt2_like)["module_sparsity"] == {"attn": 0.3}


def test_default_block_reconstruction_is_sized_to_the_model(tiny_model):
    from spruce.prune.defaults import LARGE_RECONSTRUCT, LONG_RECONSTRUCT_MAX_PARAMS, resolve_recipe, spec_for_model

    small = prunable_linears(tiny_model)
    spec, fitted = spec_for_model(resolve_recipe("16x16"), "16x16", 0.5, small)
    assert spec.reconstruct_epochs == fitted["reconstruct_epochs"] == 24
    # a 7B-class linear (meta tensors: no memory) keeps the shorter reconstruction that fits its time budget
    seven_b = {**small, "model.layers.0.mlp.up_proj": torch.nn.Linear(4096, 11008, device="meta")}
    assert 4096 * 11008 > LONG_RECONSTRUCT_MAX_PARAMS
    spec, _ = spec_for_model(resolve_recipe("16x16"), "16x16", 0.5, seven_b)
    assert (spec.reconstruct_epochs, spec.reconstruct.lr) == (LARGE_RECONSTRUCT["reconstruct_epochs"],
                                                              LARGE_RECONSTRUCT["reconstruct_lr"])
    assert 12 < spec.reconstruct_epochs < 24
    # a reconstruction the user sets, or a named method, is kept as given
    spec, _ = spec_for_model(resolve_recipe("16x16", reconstruct_epochs=30), "16x16", 0.5, seven_b)
    assert spec.reconstruct_epochs == 30
    spec, _ = spec_for_model(resolve_recipe("16x16", method="obs", reconstruct_epochs=5), "16x16", 0.5, seven_b)
    assert spec.reconstruct_epochs == 5
    assert spec_for_model(resolve_recipe("2:4"), "2:4", 0.5, seven_b)[0].reconstruct_epochs == 4


def test_default_block_recipe_trades_obs_for_sparsegpt_on_wide_layers(tiny_model):
    from spruce.prune.defaults import fit_to_model, resolve_recipe

    linears = prunable_linears(tiny_model)
    default = resolve_recipe("16x16")
    assert default["method"] == "obs"
    assert fit_to_model(default, linears)["method"] == "obs"  # 64-128 inputs: obs is cheap
    with pytest.warns(UserWarning, match="does not scale"):   # every linear is wider: the whole recipe falls back
        wide = fit_to_model(default, linears, obs_max_inputs=32)
    assert wide["method"] == "sparsegpt" and wide["dense_target"] is False
    assert (wide["reconstruct_epochs"], wide["reconstruct_lr"]) == (12, 3e-3)  # the best measured there
    mine = fit_to_model(resolve_recipe("16x16", reconstruct_lr=1e-3), linears, obs_max_inputs=64)
    assert (mine["reconstruct_epochs"], mine["reconstruct_lr"]) == (24, 1e-3)  # a user's choice stays
    chosen = resolve_recipe("16x16", method="obs")
    assert fit_to_model(chosen, linears, obs_max_inputs=64)["method"] == "obs"  # the user's choice stays
    # the limit can come with the recipe (--obs_max_inputs, prune.obs_max_inputs); 0 falls back everywhere
    with pytest.warns(UserWarning, match="does not scale"):
        assert fit_to_model(resolve_recipe("16x16", obs_max_inputs=0), linears)["method"] == "sparsegpt"
    assert fit_to_model(resolve_recipe("16x16", obs_max_inputs=128), linears)["method"] == "obs"


def test_obs_max_inputs_forces_the_wide_layer_path_on_a_tiny_model(capsys, tiny_model_dir, corpus_file, tmp_path):
    from spruce.cli import main

    out = tmp_path / "pruned"
    code = main(["prune", "--model", str(tiny_model_dir), "--sparsity_type", "16x16", "--obs_max_inputs", "32",
                 "--nsamples", "4", "--seqlen", "64", "--calib_batch_size", "2", "--reconstruct_epochs", "1",
                 "--calib_dataset", str(corpus_file), "--device", "cpu", "--save_model", str(out)])
    assert code == 0 and "does not scale to layers with 128 inputs" in capsys.readouterr().err
    info = json.loads((out / "sparsity.json").read_text())
    assert info["method"] == "sparsegpt" and info["measured_sparsity"] == 0.5 and info["recipe"]["obs_max_inputs"] == 32
    model = AutoModelForCausalLM.from_pretrained(out)
    assert all(block_pattern_holds(m.weight, 16, 16) for m in prunable_linears(model).values())


def _layer_error(model, dense_model, samples, index):
    """Relative squared error of decoder layer `index`'s outputs against the dense model's."""
    outs = []
    for m in (model, dense_model):
        got = {}
        handle = m.model.layers[index].register_forward_hook(lambda _m, _i, o: got.setdefault("y", o[0] if
                                                                                            isinstance(o, tuple) else o))
        with torch.no_grad():
            m(samples)
        handle.remove()
        outs.append(got["y"])
    return ((outs[0] - outs[1]).square().mean() / outs[1].square().mean()).item()


def test_sequential_pruning_keeps_the_pattern_and_calibrates_later_groups_on_pruned_outputs(tiny_model):
    import copy

    from spruce.prune import engine
    samples = _samples(tiny_model.config.vocab_size)
    calls = []
    real = engine.gather_statistics

    def spy(layer, batches, needs, dense=None, only=None):
        calls.append(only)
        return real(layer, batches, needs, dense, only)

    other = copy.deepcopy(tiny_model)
    engine.gather_statistics = spy
    try:
        info = prune_model(tiny_model, "sparsegpt", "16x16", 0.5, samples=samples, sequential=True, progress=False)
    finally:
        engine.gather_statistics = real
    per_layer = calls
    layers = len(tiny_model.model.layers)
    assert per_layer.count(None) == layers and len(per_layer) == 4 * layers   # 1 full pass + 3 group passes
    assert {"self_attn.o_proj"} in per_layer and {"mlp.down_proj"} in per_layer
    # inputs left dead by pruned block-rows upstream (a v_proj block-row gone zeroes 16 inputs of
    # o_proj) are zeroed too, as SparseGPT does; they fall on whole tiles, so the pattern holds
    assert info["sequential"] and 0.5 <= info["measured_sparsity"] < 0.52
    assert all(block_pattern_holds(m.weight, 16, 16) for m in prunable_linears(tiny_model).values())
    prune_model(other, "sparsegpt", "16x16", 0.5, samples=samples, progress=False)
    assert any(not torch.equal(a.weight, b.weight) for a, b in
               zip(prunable_linears(tiny_model).values(), prunable_linears(other).values()))


@pytest.mark.parametrize("target", ["dense", "local"])
def test_reconstruction_lowers_the_layer_error_and_keeps_the_zeros(tiny_model, target):
    import copy

    from spruce.prune.engine import Reconstruct
    samples = _samples(tiny_model.config.vocab_size)
    dense_model = copy.deepcopy(tiny_model)
    plain = copy.deepcopy(tiny_model)
    prune_model(plain, "wanda", "16x16", 0.5, samples=samples, progress=False)
    info = prune_model(tiny_model, "wanda", "16x16", 0.5, samples=samples, progress=False,
                       reconstruct=Reconstruct(epochs=20, lr=1e-3, target=target))
    assert info["reconstruct"] == {"epochs": 20, "lr": 1e-3, "target": target, "norms": False}
    assert info["measured_sparsity"] == 0.5
    for name, a in prunable_linears(tiny_model).items():
        b = prunable_linears(plain)[name]
        assert block_pattern_holds(a.weight, 16, 16) and (a.weight == 0).float().mean() == 0.5
        assert not torch.equal(a.weight, b.weight)              # the kept weights moved
        assert a.weight.dtype == b.weight.dtype and a.weight.requires_grad == b.weight.requires_grad
        if ".layers.0." in name:                                # same inputs: the mask is the plain one
            assert torch.equal(a.weight == 0, b.weight == 0)
    last = len(tiny_model.model.layers) - 1
    assert _layer_error(tiny_model, dense_model, samples, last) < 0.8 * _layer_error(plain, dense_model, samples, last)


def test_reconstruction_can_train_the_norms_too(tiny_model):
    import copy

    from spruce.prune.engine import Reconstruct
    samples = _samples(tiny_model.config.vocab_size)
    dense_model = copy.deepcopy(tiny_model)
    weights_only = copy.deepcopy(tiny_model)
    prune_model(weights_only, "wanda", "16x16", 0.5, samples=samples, progress=False,
                reconstruct=Reconstruct(epochs=20, lr=1e-3))
    info = prune_model(tiny_model, "wanda", "16x16", 0.5, samples=samples, progress=False,
                       reconstruct=Reconstruct(epochs=20, lr=1e-3, norms=True))
    assert info["reconstruct"]["norms"] is True and info["measured_sparsity"] == 0.5
    for a, b, d in zip(tiny_model.model.layers, weights_only.model.layers, dense_model.model.layers):
        assert not torch.equal(a.input_layernorm.weight, d.input_layernorm.weight)       # the norms moved
        assert torch.equal(b.post_attention_layernorm.weight, d.post_attention_layernorm.weight)  # not without
    for m in prunable_linears(tiny_model).values():
        assert block_pattern_holds(m.weight, 16, 16) and (m.weight == 0).float().mean() == 0.5
    last = len(tiny_model.model.layers) - 1
    assert _layer_error(tiny_model, dense_model, samples, last) < _layer_error(weights_only, dense_model, samples, last) * 1.05


def test_reconstruction_options_are_checked(tiny_model):
    from spruce.prune.engine import Reconstruct
    with pytest.raises(SpruceError, match="target must be 'dense' or 'local'"):
        Reconstruct(target="teacher")
    with pytest.raises(SpruceError, match="layer reconstruction needs calibration samples"):
        prune_model(tiny_model, "magnitude", "16x16", 0.5, reconstruct=Reconstruct(), progress=False)


# ---------------------------------------------------------------- resuming after a kill


def _interrupt_at(monkeypatch, call: int):
    """Make the `call`-th layer reconstruction raise KeyboardInterrupt, as a kill mid-layer would end it."""
    from spruce.prune import engine

    real, count = engine.reconstruct_layer, {"n": 0}

    def reconstruct(*args, **kwargs):
        count["n"] += 1
        if count["n"] == call:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "reconstruct_layer", reconstruct)
    return lambda: monkeypatch.setattr(engine, "reconstruct_layer", real)


def test_a_killed_prune_resumes_from_its_state_bit_for_bit(tokenizer, tmp_path, monkeypatch, capsys):
    samples = _samples(len(tokenizer), seqlen=48)
    options = dict(samples=samples, batch_size=2, progress=False, reconstruct=Reconstruct(2, 1e-3),
                   module_sparsity={"self_attn": 0.4})

    def fresh():
        return build_model(len(tokenizer), seed=3, num_hidden_layers=4)

    straight = fresh()
    prune_model(straight, "sparsegpt", "16x16", 0.5, **options)
    state = tmp_path / "state"
    restore = _interrupt_at(monkeypatch, 3)  # layers 1 and 2 finished, layer 3 in progress
    with pytest.raises(KeyboardInterrupt):
        prune_model(fresh(), "sparsegpt", "16x16", 0.5, state_dir=state, state_every=0, **options)
    restore()
    assert sorted(p.name for p in state.iterdir()) == ["carry.pt", "layer-0.safetensors", "layer-1.safetensors"]
    capsys.readouterr()
    resumed = fresh()
    info = prune_model(resumed, "sparsegpt", "16x16", 0.5, state_dir=state, state_every=0, **options)
    assert "resuming the pruning from layer 3/4" in capsys.readouterr().err
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert info["measured_sparsity"] == 0.5

    # other settings never resume from that state: it is replaced
    other = fresh()
    prune_model(other, "sparsegpt", "16x16", 0.5, state_dir=state, state_every=0,
                **{**options, "reconstruct": Reconstruct(2, 2e-3)})
    assert "made with other settings" in capsys.readouterr().err
    assert not torch.equal(other.model.layers[0].mlp.up_proj.weight, straight.model.layers[0].mlp.up_proj.weight)

    # an unreadable state is replaced too, with a message
    (state / "carry.pt").write_bytes(b"not a checkpoint")
    unreadable = fresh()
    prune_model(unreadable, "sparsegpt", "16x16", 0.5, state_dir=state, state_every=0, **options)
    assert "cannot be read" in capsys.readouterr().err
    assert all(torch.equal(a, b) for a, b in zip(straight.state_dict().values(), unreadable.state_dict().values()))
