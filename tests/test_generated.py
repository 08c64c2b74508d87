"""Training text sampled from the dense model: sampling, the cache, mixing, and recovery on it."""

import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

from spruce import data, generated
from spruce.cli import main
from spruce.errors import SpruceError
from spruce.generated import GeneratedSettings, generate_tokens, top_p_filter
from spruce.masks import zero_masks

SMALL = {"sequences": 8, "new_tokens": 12, "batch_size": 8}


def test_top_p_keeps_the_smallest_set_that_reaches_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]])
    kept = top_p_filter(probs, 0.7)
    assert torch.allclose(kept, torch.tensor([[0.625, 0.375, 0, 0], [0, 0, 0.375, 0.625]]))
    assert torch.equal(top_p_filter(probs, 1.0), probs)
    assert torch.equal(top_p_filter(probs, 1e-6).argmax(-1), probs.argmax(-1))
    assert (top_p_filter(probs, 1e-6) > 0).sum() == 2  # at least the most likely token


def test_top_p_among_the_candidates_keeps_what_a_full_sort_keeps():
    gen = torch.Generator().manual_seed(0)
    peaked = torch.softmax(torch.randn(6, 5000, generator=gen) * 6, dim=-1)   # 64 tokens hold 0.9 in each row
    flat = torch.full((1, 5000), 1 / 5000)
    for probs, sorted_rows in ((peaked, 0), (torch.cat([peaked, flat, peaked[:2]]), 1)):
        assert int((probs.topk(64, dim=-1).values.sum(-1) < 0.9).sum()) == sorted_rows  # rows sorted whole
        reference = top_p_filter(probs, 0.9, candidates=None)                       # whole rows sorted
        kept = top_p_filter(probs, 0.9, candidates=64)
        assert torch.equal(kept > 0, reference > 0)
        assert torch.allclose(kept, reference, atol=1e-7, rtol=0)
        assert torch.allclose(kept.sum(-1), torch.ones(len(probs)))
    assert (top_p_filter(flat, 0.9, candidates=64) > 0).sum() == 4500       # the flat row: 90% of its tokens


def test_sampling_is_reproducible_and_respects_lengths(tiny_model, tokenizer):
    prompts = [[5, 6, 7], [8]]

    def run(seed):
        gen = torch.Generator().manual_seed(seed)
        return generated.sample_continuations(tiny_model, prompts, 10, 1.0, 0.95, gen, 0, None)

    a, b = run(0), run(0)
    assert a == b and run(1) != a
    assert [len(r) for r in a] == [13, 11] and a[0][:3] == [5, 6, 7] and a[1][:1] == [8]
    # left padding does not change a row: the short prompt alone samples the same first token greedily
    greedy = generated.sample_continuations(tiny_model, prompts, 1, 1.0, 1e-9, torch.Generator(), 0, None)
    alone = generated.sample_continuations(tiny_model, [[8]], 1, 1.0, 1e-9, torch.Generator(), 0, None)
    assert greedy[1] == alone[0]


def test_the_static_cache_sampler_draws_what_the_dynamic_loop_draws(tiny_model):
    from spruce.generate import StaticGreedy

    prompts = [[5, 6, 7], [9, 4, 2], [3, 3, 8]]
    dynamic = generated.sample_continuations(tiny_model, prompts, 9, 1.0, 0.9, torch.Generator().manual_seed(3), 0, None)
    decoder = StaticGreedy(tiny_model, batch=3, max_len=12, logits=True)
    static = generated.sample_static(decoder, prompts, 9, 1.0, 0.9, torch.Generator().manual_seed(3), None)
    assert static == dynamic and len({tuple(r) for r in static}) == 3
    # the decoder serves a second batch of another length (a fresh cache each start)
    again = generated.sample_static(decoder, [[1, 2], [2, 1], [4, 4]], 9, 1.0, 0.9,
                                    torch.Generator().manual_seed(3), None)
    assert again == generated.sample_continuations(tiny_model, [[1, 2], [2, 1], [4, 4]], 9, 1.0, 0.9,
                                                   torch.Generator().manual_seed(3), 0, None)


def test_prompts_of_mixed_lengths_come_back_in_their_order_cut_at_the_end_token(tiny_model):
    prompts = [[5, 6, 7], [8], [9, 9], [4, 5, 6], [7], [1, 2, 3]]
    assert generated.length_batches(prompts, 2) == [[1, 4], [0, 3], [2], [5]]   # full batches first
    s = GeneratedSettings(sequences=6, new_tokens=6, batch_size=2)
    rows = generated.sample_all(tiny_model, prompts, s, torch.Generator().manual_seed(0), 0, None)
    assert [r[:len(p)] for r, p in zip(rows, prompts)] == prompts and all(len(r) == len(p) + 6 for r, p in zip(rows, prompts))
    eos = rows[0][3 + 2]   # the third token sampled after the first prompt: that row ends before it
    cut = generated.sample_all(tiny_model, prompts, s, torch.Generator().manual_seed(0), 0, eos)
    assert cut[0] == rows[0][: rows[0].index(eos, 3)] and all(eos not in r[len(p):] for r, p in zip(cut, prompts))


def settings(tiny_model_dir, **extra):
    return GeneratedSettings(model=str(tiny_model_dir), **{**SMALL, **extra})


def test_the_cache_is_reused_and_a_changed_setting_samples_again(tiny_model_dir, tokenizer, tmp_path, monkeypatch):
    lines = []
    tokens, lengths = generate_tokens(settings(tiny_model_dir), tokenizer, tmp_path, say=lines.append, progress=False)
    assert lengths.numel() == 8 and int(lengths.sum()) == tokens.numel()
    assert (tmp_path / "generated.safetensors").is_file() and (tmp_path / "generated.json").is_file()
    assert not list(tmp_path.glob("*.partial"))

    def no_model(*_a, **_k):
        raise AssertionError("the model was loaded although the cache matches")

    monkeypatch.setattr("spruce.models.load_model", no_model)
    again = generate_tokens(settings(tiny_model_dir), tokenizer, tmp_path, say=lines.append, progress=False)
    assert torch.equal(again[0], tokens) and "from the cache" in lines[-1]
    with pytest.raises(AssertionError, match="was loaded"):   # temperature is part of the key
        generate_tokens(settings(tiny_model_dir, temperature=0.7), tokenizer, tmp_path, say=lines.append,
                        progress=False)
    assert "other settings" in lines[-1]


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_cache_is_never_used(damage, tiny_model_dir, tokenizer, tmp_path):
    first = generate_tokens(settings(tiny_model_dir), tokenizer, tmp_path, say=lambda _: None, progress=False)
    path = tmp_path / "generated.safetensors"
    raw = bytearray(path.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) - 40]
    else:
        raw[-3] ^= 0xFF     # same size, one token changed
    path.write_bytes(bytes(raw))
    key = generated.cache_key(settings(tiny_model_dir), tokenizer, "float32")
    assert generated.read_cache(path, key) is None
    lines = []
    second = generate_tokens(settings(tiny_model_dir), tokenizer, tmp_path, say=lines.append, progress=False)
    assert "sampling again" in lines[0] and torch.equal(second[0], first[0])  # the same seed, sampled anew
    assert generated.read_cache(path, key) is not None


def test_a_mix_with_a_corpus_takes_blocks_from_both(tiny_model_dir, tokenizer, corpus_file, tmp_path):
    found = generated.sources(settings(tiny_model_dir), tokenizer, tmp_path, say=lambda _: None, progress=False)
    gen_blocks = data.cut_blocks(found["generated"]("train"), 16)
    blocks = data.training_blocks(f"generated:0.5+{corpus_file}:0.5", tokenizer, 16, "train", max_samples=10,
                                  sources=found)
    rows = {tuple(r) for r in gen_blocks.tolist()}
    from_generated = [tuple(r) in rows for r in blocks.tolist()]
    assert blocks.shape == (10, 16) and sum(from_generated) == 5
    # validation is the last sequences, apart from train
    val = found["generated"]("validation")
    assert 0 < val.numel() < found["generated"]("train").numel()
    with pytest.raises(SpruceError, match="train and validation splits only"):
        found["generated"]("test")


def test_generated_text_is_a_training_source_only(capsys, tiny_model_dir):
    code = main(["eval", "--model", str(tiny_model_dir), "--dataset", "generated", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "for training only" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("extra, message", [
    ([], "pass --teacher_model"),
    (["--teacher_model", "{teacher}", "--generated_top_p", "1.5"], "top_p must be in (0, 1]"),
    (["--teacher_model", "{teacher}", "--generated_prompts", "nosuch"], "unknown corpus 'nosuch'"),
])
def test_bad_generated_settings_end_in_one_line(extra, message, capsys, pruned_dir, tiny_model_dir, tmp_path):
    argv = ["finetune", "--model_name_or_path", str(pruned_dir), "--dataset_name", "generated", "--do_train",
            "--device", "cpu", "--output_dir", str(tmp_path / "ft"),
            *[e.format(teacher=tiny_model_dir) for e in extra]]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "ft").exists()


def test_finetune_on_generated_text_lowers_its_loss_and_keeps_the_zero_set(capsys, pruned_dir, tiny_model_dir,
                                                                            tmp_path):
    out = tmp_path / "ft"
    argv = ["finetune", "--model_name_or_path", str(pruned_dir), "--teacher_model", str(tiny_model_dir),
            "--dataset_name", "generated", "--generated_sequences", "32", "--generated_new_tokens", "40",
            "--generated_batch_size", "32", "--generated_temperature", "0.5", "--mode", "full", "--do_train",
            "--do_eval", "--max_steps", "20",
            "--learning_rate", "3e-3", "--block_size", "32", "--per_device_train_batch_size", "4",
            "--max_eval_samples", "4", "--merge", "--device", "cpu", "--report_to", "none", "--output_dir", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dataset"] == "generated" and "sampled 32 sequences" in text
    assert re.search(r"temperature 0.5, top-p 0.95, in \d+ s \([\d.]+ sequences/s\); cached in", text)
    assert summary["eval_after"]["eval_loss"] < summary["eval_before"]["eval_loss"]
    assert summary["merged_zero_set_unchanged"] is True
    before = zero_masks(AutoModelForCausalLM.from_pretrained(pruned_dir))
    after = zero_masks(AutoModelForCausalLM.from_pretrained(out / "merged"))
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert (out / "generated" / "generated.safetensors").is_file()

    # run again (evaluation only): the text comes from the cache
    assert main([a for a in argv if a != "--do_train"] + ["--overwrite_output_dir"]) == 0
    assert "from the cache" in capsys.readouterr().out


def test_a_recipe_recovers_on_generated_text_cached_in_the_run(tiny_model_dir, corpus_file, tmp_path):
    from spruce.config import load_recipe, recipes_dir
    from spruce.pipeline import run_recipe

    from .test_pipeline import quiet, tiny_overrides

    out = tmp_path / "run"
    cfg = load_recipe(recipes_dir() / "smollm2-block16.yaml", tiny_overrides(
        tiny_model_dir, corpus_file, out, "stages=[prune, recover]", "recover.max_steps=2",
        f"recover.corpus=generated:0.5+{corpus_file}:0.5", "recover.generated={sequences: 32, new_tokens: 32, batch_size: 32}"))
    lines = []
    results = run_recipe(cfg, say=quiet(lines), progress=False)
    assert results["recover"]["zero_set_unchanged"] is True
    assert (out / "generated" / "generated.safetensors").is_file()
    assert json.loads((out / "generated" / "generated.json").read_text())["settings"]["model"] == str(tiny_model_dir)
    with pytest.raises(SpruceError, match="unknown recover.generated setting"):
        load_recipe(None, ["recover.generated={nosuch: 1}"])
    # prompts drawn from the held-out corpus would train on it
    with pytest.raises(SpruceError, match="is also in recover.generated.prompts"):
        load_recipe(None, ["recover.corpus=generated", "recover.generated={prompts: moby}", "data.heldout=moby"])


def test_sampling_bench_times_the_whole_sampler_and_refuses_a_bad_temperature(capsys):
    from bench import sampling

    assert sampling.main(["--loop", "--rows", "2", "--new_tokens", "3", "--layers", "1"]) in (0, None)
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("| rows | new tokens | layers | sampler |")
    assert table[2].startswith("| 2 | 3 | 1 | dynamic |") and table[3].startswith("| 2 | 3 | 1 | static |")
    assert table[4].startswith("static (the sampler spruce runs) against dynamic")
    assert sampling.main(["--loop", "--temperature", "0"]) == 2
    assert "temperature must be positive" in capsys.readouterr().err


def test_sampling_bench_profiles_each_path_and_writes_its_trace(capsys, tmp_path):
    from bench import sampling

    args = ["--loop", "--rows", "2", "--new_tokens", "3", "--layers", "1", "--profile", "--profile_steps", "2",
            "--trace", str(tmp_path / "t"), "--json", str(tmp_path / "r.json")]
    assert sampling.main(args) in (0, None)
    out = capsys.readouterr().out
    assert out.count("profiled call: ") == 2
    loop = json.loads((tmp_path / "r.json").read_text())["loop"][0]
    assert loop["static"]["profile"]["wall_ms"] > 0 and loop["dynamic"]["profile"]["wall_ms"] > 0
    for name in ("dynamic", "static"):
        assert json.loads((tmp_path / f"t-{name}.json").read_text())["traceEvents"]


@pytest.mark.gpu
def test_the_graph_replayed_sampler_on_the_gpu_draws_what_the_same_steps_draw_eagerly(tiny_model):
    # the same kernels with and without the graph: the draws must be identical. (Against the
    # dynamic-cache loop, the GPU's other attention kernels may flip a near-tied draw.)
    from spruce.generate import StaticGreedy

    model = tiny_model.cuda()
    prompts = [[5, 6, 7], [9, 4, 2], [3, 3, 8], [1, 1, 1]]
    draws = []
    for graph in (True, False):
        decoder = StaticGreedy(model, batch=4, max_len=3 + 24, logits=True)
        decoder.use_graph = graph
        draws.append(generated.sample_static(decoder, prompts, 24, 1.0, 0.9,
                                             torch.Generator(device="cuda").manual_seed(3), None))
    assert draws[0] == draws[1] and decoder.graph is None


def test_a_stopped_sampling_run_continues_from_its_checkpoint_and_draws_the_same_text(
        tiny_model_dir, tokenizer, tmp_path, monkeypatch):
    import shutil

    s = settings(tiny_model_dir, batch_size=2)
    whole, lengths = generate_tokens(s, tokenizer, tmp_path / "whole", say=lambda m: None, progress=False)
    monkeypatch.setattr(generated, "PARTIAL_EVERY", 0.0)   # a checkpoint after every batch
    real, calls = generated.sample_static, []

    def stop_at_the_third_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(generated, "sample_static", stop_at_the_third_batch)
    with pytest.raises(KeyboardInterrupt):
        generate_tokens(s, tokenizer, tmp_path / "cut", say=lambda m: None, progress=False)
    monkeypatch.setattr(generated, "sample_static", real)
    partial = tmp_path / "cut" / generated.PARTIAL_FILE
    assert partial.is_file() and not (tmp_path / "cut" / generated.CACHE_FILE).exists()
    done, _ = generated.read_partial(partial, generated.cache_key(s, tokenizer, "float32"))
    assert 0 < len(done) < 8
    # other settings never continue from it; a damaged checkpoint is never read
    shutil.copytree(tmp_path / "cut", tmp_path / "other")
    lines = []
    generate_tokens(settings(tiny_model_dir, batch_size=2, temperature=0.7), tokenizer, tmp_path / "other",
                    say=lines.append, progress=False)
    assert not any("continuing" in line for line in lines)
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(partial.read_bytes()[:-9])
    assert generated.read_partial(damaged, generated.cache_key(s, tokenizer, "float32")) is None
    lines = []
    again, again_lengths = generate_tokens(s, tokenizer, tmp_path / "cut", say=lines.append, progress=False)
    assert f"({len(done)} of 8 sequences sampled)" in lines[0]
    assert torch.equal(again, whole) and torch.equal(again_lengths, lengths) and not partial.exists()


def test_a_checkpoint_that_cannot_be_written_is_said_once_and_sampling_goes_on(tiny_model_dir, tokenizer, tmp_path,
                                                                               monkeypatch):
    import errno

    import safetensors.torch

    monkeypatch.setattr(generated, "PARTIAL_EVERY", 0.0)
    real_save = safetensors.torch.save_file

    def full_disk(tensors, filename, metadata=None):
        if str(filename).endswith(".partial.safetensors.tmp"):
            open(filename, "wb").close()
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    lines = []
    tokens, _ = generate_tokens(settings(tiny_model_dir, batch_size=2), tokenizer, tmp_path, say=lines.append,
                                progress=False)
    assert sum("could not save a checkpoint" in line for line in lines) == 1 and tokens.numel() > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["generated.json", "generated.safetensors"]


def test_models_without_a_static_cache_sample_consecutive_left_padded_batches(tiny_model, monkeypatch):
    monkeypatch.setattr(generated, "static_cache_ok", lambda model: False)
    prompts = [[5, 6, 7], [8], [9, 9], [4, 5, 6], [7]]
    s = GeneratedSettings(sequences=5, new_tokens=4, batch_size=2)
    assert generated.sampling_batches(tiny_model, prompts, 2) == [[0, 1], [2, 3], [4]]
    rows = generated.sample_all(tiny_model, prompts, s, torch.Generator().manual_seed(0), 0, None)
    gen = torch.Generator().manual_seed(0)
    expected = [r for i in range(0, 5, 2)
                for r in generated.sample_continuations(tiny_model, prompts[i:i + 2], 4, 1.0, 0.95, gen, 0, None)]
    assert rows == expected
