"""Every supported architecture runs the whole path on a tiny random config built in-process:
prune (Wanda, and the default 16x16 recipe: OBS + layer reconstruction) -> masked-LoRA fine-tuning
on all linears -> merge -> eval -> sparsify (same logits) -> compressed checkpoint round trip.

Phi-3 fuses q/k/v into one qkv_proj and gate/up into gate_up_proj; OPT has biases and a
`model.decoder.layers` list; Gemma3 ties its embeddings; Llama 3 scales its rope.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from spruce.compress import decompress_model, save_compressed
from spruce.evaluate import perplexity
from spruce.kernels import BlockSparseLinear, sparsify
from spruce.masks import tile_zero_fraction, zero_masks
from spruce.models import prunable_linears
from spruce.prune import prune_model
from spruce.prune.defaults import resolve_recipe
from spruce.prune.run import prune_with_options
from spruce.recover.lora import attach_lora, merge_keep_sparsity
from spruce.recover.train import TrainArgs, train

VOCAB, HIDDEN = 96, 64
COMMON = {"vocab_size": VOCAB, "hidden_size": HIDDEN, "intermediate_size": 2 * HIDDEN, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}
ARCHITECTURES = {
    "llama": ("LlamaConfig", {"tie_word_embeddings": False}),
    "llama3": ("LlamaConfig", {"rope_scaling": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                "original_max_position_embeddings": 64}}),
    "qwen2": ("Qwen2Config", {}),
    "mistral": ("MistralConfig", {"sliding_window": 32}),
    "gemma3": ("Gemma3TextConfig", {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 32}),
    "phi3": ("Phi3Config", {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}),
    "opt": ("OPTConfig", {"ffn_dim": 2 * HIDDEN, "word_embed_proj_dim": HIDDEN, "intermediate_size": None,
                          "num_key_value_heads": None, "pad_token_id": 1}),
}
FUSED = {"phi3": ("qkv_proj", "gate_up_proj")}


def build(arch: str, seed: int = 0, **overrides):
    import transformers

    name, extra = ARCHITECTURES[arch]
    options = {k: v for k, v in {**COMMON, **extra, **overrides}.items() if v is not None}
    config = getattr(transformers, name)(**options)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def ids(n: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def assert_blocks(model, sparsity: float = 0.5, tolerance: float = 1e-6) -> None:
    """Whole 16x16 tiles are zero, `sparsity` of them over all decoder linears. (A Hessian method
    also zeroes the column of an input that is never active on the calibration tokens, such as
    a dead ReLU of OPT, inside a kept tile: a kept tile may hold a few zeros.)"""
    linears = prunable_linears(model)
    tiles = [tile_zero_fraction(m.weight, 16, 16).flatten() for m in linears.values()]
    tiles = torch.cat(tiles)
    assert linears and bool(((tiles == 1) | (tiles < 0.5)).all())
    assert (tiles == 1).float().mean().item() == pytest.approx(sparsity, abs=tolerance)


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def recovered(request, tmp_path_factory):
    """arch, wanda-pruned model's zero set, the merged model after masked LoRA, its folder."""
    arch = request.param
    model = build(arch)
    names = prunable_linears(model)
    for fused in FUSED.get(arch, ()):
        assert any(n.endswith(fused) for n in names), f"{arch} has no {fused}"
    prune_model(model, "wanda", "16x16", 0.5, samples=ids(4, 32, 1), progress=False)
    assert_blocks(model)
    before = zero_masks(model)
    peft_model = attach_lora(model, r=4, target_modules="all-linear", masked=True)
    wrapped = sum(1 for n, _ in peft_model.named_modules() if n.endswith(".lora_A"))
    assert wrapped == len(names)  # every decoder linear, fused ones included
    train(peft_model, ids(8, 32, 2), TrainArgs(steps=3, lr=1e-2, logging_steps=100, tensorboard=False),
          say=lambda *_: None, progress=False)
    merged = merge_keep_sparsity(peft_model).eval()
    after = zero_masks(merged)
    assert all(torch.equal(before[n], after[n]) for n in before)
    folder = tmp_path_factory.mktemp(f"{arch}-merged")
    merged.save_pretrained(folder)
    return arch, merged, folder


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_default_block_recipe_prunes_exact_blocks(arch):
    model = build(arch, seed=1, num_hidden_layers=1)  # OBS is the slow part: one layer shows it
    recipe = resolve_recipe("16x16", reconstruct_epochs=2)  # the default recipe, a shorter reconstruction
    info, _, used = prune_with_options(model, recipe, "16x16", 0.5, lambda spec: ids(2, 16, 3), progress=False)
    assert used["method"] == "obs" and used["module_sparsity"]
    # attention is pruned less (40%) and the rest more; a 64x64 matrix has only 16 tiles to share it out
    assert_blocks(model, tolerance=0.02)


def test_masked_lora_changes_the_model_and_eval_is_finite(recovered):
    arch, merged, _ = recovered
    pruned = build(arch)
    prune_model(pruned, "wanda", "16x16", 0.5, samples=ids(4, 32, 1), progress=False)
    pairs = zip(prunable_linears(pruned).values(), prunable_linears(merged).values())
    assert any(not torch.equal(a.weight, b.weight) for a, b in pairs)  # the adapter trained and was merged
    result = perplexity(merged, ids(2, 32, 4), progress=False)
    assert torch.isfinite(torch.tensor(result["ppl"])) and result["windows"] == 2


def test_sparsify_keeps_the_logits(recovered):
    arch, merged, folder = recovered
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    x = ids(2, 16, 5)
    with torch.no_grad():
        dense = model(x).logits
        report = sparsify(model)
        assert len(report.swapped) == len(prunable_linears(merged))
        torch.testing.assert_close(model(x).logits, dense, rtol=1e-4, atol=1e-5)


def test_compressed_round_trip(recovered, tmp_path):
    arch, _, folder = recovered
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    x = ids(2, 16, 6)
    with torch.no_grad():
        dense = model(x).logits
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    qconfig = save_compressed(model, None, tmp_path / "c")
    assert len(qconfig["layers"]) == len(prunable_linears(build(arch)))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "c").eval()
    assert sum(isinstance(m, BlockSparseLinear) for m in loaded.modules()) == len(qconfig["layers"])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, dense, rtol=1e-4, atol=1e-5)
    decompress_model(loaded)
    state = loaded.state_dict()
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in expected)
