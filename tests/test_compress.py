"""Compressed checkpoints: the format round trip is exact, plain from_pretrained loads block-sparse
layers with the dense model's logits, the files are about half the size, bad inputs get one line."""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import spruce  # noqa: F401  (registers the quantizer)
from spruce.cli import main
from spruce.compress import (
    FORMAT_VERSION,
    compress_state_dict,
    compress_weight,
    decompress_state_dict,
    decompress_weight,
    save_compressed,
    weights_bytes,
)
from spruce.errors import SpruceError
from spruce.kernels import BlockSparseLinear
from spruce.models import load_model, prunable_linears
from tests.conftest import build_model, build_tokenizer


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def block_prune(model, block: int = 16, keep: float = 0.5, seed: int = 0) -> None:
    """Zero a random (1 - keep) of the blocks of every decoder linear (in place)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for linear in prunable_linears(model).values():
            r, c = linear.weight.shape
            order = torch.randperm((r // block) * (c // block), generator=gen)
            gone = (order >= keep * order.numel()).reshape(r // block, c // block)
            linear.weight.masked_fill_(gone.repeat_interleave(block, 0).repeat_interleave(block, 1), 0)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(dense pruned folder, compressed folder) of one tiny Llama pruned to 50% 16x16 blocks."""
    tok = build_tokenizer()
    model = build_model(len(tok), seed=3)
    block_prune(model)
    root = tmp_path_factory.mktemp("compress")
    model.save_pretrained(root / "dense")
    tok.save_pretrained(root / "dense")
    code = main(["compress", str(root / "dense"), str(root / "compressed")])
    assert code == 0
    return root / "dense", root / "compressed"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block", [16, 32])
def test_weight_round_trip_is_bit_exact(dtype, block):
    weight = torch.randn(128, 192, dtype=dtype)
    mask = torch.rand(128 // block, 192 // block, generator=torch.Generator().manual_seed(1)) < 0.4
    weight.masked_fill_(~mask.repeat_interleave(block, 0).repeat_interleave(block, 1), 0)
    weight[1, 2] = 0.0 if mask[0, 0] else weight[1, 2]  # a zero inside a kept block stays stored
    tensors, entry = compress_weight(weight, block)
    assert tensors["values"].numel() == int(mask.sum()) * block * block  # only the kept blocks
    back = decompress_weight(tensors, entry, block)
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    assert back.dtype == dtype and torch.equal(back.view(bits), weight.view(bits))


def test_state_dict_round_trip_is_bit_exact(tokenizer):
    model = build_model(len(tokenizer))
    block_prune(model)
    state = model.state_dict()
    tensors, layers = compress_state_dict(state, list(prunable_linears(model)), 16)
    assert set(layers) == set(prunable_linears(model))
    assert not any(f"{name}.weight" in tensors for name in layers)
    qconfig = {"quant_method": "spruce_block_sparse", "format_version": FORMAT_VERSION, "block_size": 16,
               "layers": layers}
    back = decompress_state_dict(tensors, qconfig)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)


def test_plain_from_pretrained_builds_block_sparse_layers_with_the_dense_logits(folders):
    dense_dir, compressed_dir = folders
    dense = AutoModelForCausalLM.from_pretrained(dense_dir).eval()
    model = AutoModelForCausalLM.from_pretrained(compressed_dir).eval()
    swapped = [m for m in model.modules() if isinstance(m, BlockSparseLinear)]
    assert len(swapped) == len(prunable_linears(dense)) and not prunable_linears(model)
    ids = torch.randint(0, dense.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, dense(ids).logits, rtol=1e-5, atol=1e-5)
    out = model.generate(ids[:1, :8], max_new_tokens=6, do_sample=False)
    assert torch.equal(out, dense.generate(ids[:1, :8], max_new_tokens=6, do_sample=False))
    meta = json.loads((compressed_dir / "config.json").read_text())["quantization_config"]
    assert meta["format"] == "spruce-block-sparse" and meta["format_version"] == FORMAT_VERSION


def test_load_model_decompresses_to_the_exact_pruned_weights(folders):
    dense_dir, compressed_dir = folders
    dense, _ = load_model(str(dense_dir))
    model, _ = load_model(str(compressed_dir))
    assert not any(isinstance(m, BlockSparseLinear) for m in model.modules())
    assert getattr(model.config, "quantization_config", None) is None
    a, b = dense.state_dict(), model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sparse, _ = load_model(str(compressed_dir), block_sparse=True)
    assert any(isinstance(m, BlockSparseLinear) for m in sparse.modules())


def test_import_spruce_alone_lets_from_pretrained_load_the_folder(folders):
    """In a fresh process: the quantizer registers itself when transformers imports its registry."""
    code = ("import spruce, sys; assert 'torch' not in sys.modules\n"
            "from transformers import AutoModelForCausalLM\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(folders[1])!r})\n"
            "print(type(m.model.layers[0].mlp.down_proj).__name__)")
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == "BlockSparseLinear"


def test_files_are_below_55_percent_of_dense(tmp_path):
    model = build_model(32, tie_word_embeddings=True)  # small vocabulary: the decoder linears dominate
    block_prune(model)
    model.save_pretrained(tmp_path / "dense")
    save_compressed(model, None, tmp_path / "compressed")
    assert weights_bytes(tmp_path / "compressed") < 0.55 * weights_bytes(tmp_path / "dense")


def test_compressed_folder_saved_again_stays_compressed_and_exact(folders, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(folders[1])
    model.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"]["layers"]
    again, _ = load_model(str(tmp_path / "again"), tokenizer=str(folders[0]))
    dense, _ = load_model(str(folders[0]))
    assert all(torch.equal(a, b) for a, b in zip(dense.state_dict().values(), again.state_dict().values()))


def test_prune_save_compressed_writes_a_compressed_folder(capsys, tiny_model_dir, corpus_file, tmp_path):
    out = tmp_path / "pruned"
    code, _, err = run_cli(capsys, "prune", "--model", tiny_model_dir, "--prune_method", "magnitude",
                           "--sparsity_type", "16x16", "--calib_dataset", corpus_file, "--nsamples", "2",
                           "--seqlen", "32", "--save_model", out, "--save_compressed")
    assert code == 0, err
    assert json.loads((out / "sparsity.json").read_text())["pattern"] == "16x16"
    assert json.loads((out / "config.json").read_text())["quantization_config"]["block_size"] == 16
    model, _ = load_model(str(out))
    assert abs(sum(int((m.weight == 0).sum()) for m in prunable_linears(model).values())
               / sum(m.weight.numel() for m in prunable_linears(model).values()) - 0.5) < 1e-6


def test_not_block_sparse_model_is_one_line(capsys, tiny_model_dir, tmp_path):
    code, _, err = run_cli(capsys, "compress", tiny_model_dir, tmp_path / "c")
    assert code == 2 and "not block-sparse" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "c").exists()


def test_unknown_format_version_is_one_line(capsys, folders, corpus_file, tmp_path):
    import shutil

    bad = tmp_path / "future"
    shutil.copytree(folders[1], bad)
    config = json.loads((bad / "config.json").read_text())
    config["quantization_config"]["format_version"] = FORMAT_VERSION + 1
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(SpruceError, match="format version"):
        load_model(str(bad))
    code, _, err = run_cli(capsys, "eval", "--model", bad, "--dataset", corpus_file, "--max_windows", "1")
    assert code == 2 and "format version 2" in err and len(err.strip().splitlines()) == 1


def test_save_compressed_with_a_pattern_without_whole_blocks_is_one_line(capsys, tiny_model_dir, tmp_path):
    code, _, err = run_cli(capsys, "prune", "--model", tiny_model_dir, "--sparsity_type", "2:4",
                           "--save_model", tmp_path / "p", "--save_compressed")
    assert code == 2 and "--save_compressed" in err and len(err.strip().splitlines()) == 1


def test_finetune_and_merge_accept_a_compressed_folder(capsys, folders, corpus_file, tmp_path):
    dense_dir, compressed_dir = folders
    out = tmp_path / "ft"
    code, _, err = run_cli(capsys, "finetune", "--model_name_or_path", compressed_dir, "--train_file", corpus_file,
                           "--block_size", "32", "--do_train", "--mode", "masked-lora", "--max_steps", "2",
                           "--learning_rate", "1e-2", "--report_to", "none", "--output_dir", out)
    assert code == 0, err
    merged = tmp_path / "merged"
    code, _, err = run_cli(capsys, "merge", "--model", compressed_dir, "--lora_weights", out, "--output_dir", merged)
    assert code == 0, err
    pruned, _ = load_model(str(dense_dir))
    after, _ = load_model(str(merged))
    for name, m in prunable_linears(pruned).items():
        assert torch.equal(m.weight == 0, prunable_linears(after)[name].weight == 0)
    assert any(not torch.equal(m.weight, prunable_linears(after)[n].weight) for n, m in prunable_linears(pruned).items())


@pytest.mark.gpu
def test_compressed_folder_on_the_gpu_runs_the_kernels(folders):
    dense_dir, compressed_dir = folders
    dense = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.bfloat16, device_map="cuda").eval()
    model = AutoModelForCausalLM.from_pretrained(compressed_dir, dtype=torch.bfloat16, device_map="cuda").eval()
    layer = model.model.layers[0].mlp.down_proj
    assert isinstance(layer, BlockSparseLinear) and layer.values.is_cuda and layer.values.dtype == torch.bfloat16
    ids = torch.randint(0, dense.config.vocab_size, (1, 40), device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits.float(), dense(ids).logits.float(), rtol=2e-2, atol=2e-2)
    assert model.generate(ids[:, :8], max_new_tokens=4, do_sample=False).shape == (1, 12)
