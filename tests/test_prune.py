"""The layer-by-layer engine on a tiny Llama: exact patterns, Wanda's math, saving."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from spruce.errors import SpruceError
from spruce.evaluate import perplexity
from spruce.masks import block_pattern_holds, read_sparsity_json, weight_sparsity, write_sparsity_json
from spruce.models import prunable_linears, save_model
from spruce.prune import prune_model
from spruce.prune.methods import wanda_score
from spruce.prune.patterns import unstructured_row_mask


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
