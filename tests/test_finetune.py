"""Recovery fine-tuning: zero sets kept bit for bit, exact resume, diagnostics, bad input."""

import json
import os

import pytest
import yaml
import torch
from transformers import AutoModelForCausalLM

from spruce.cli import main
from spruce.errors import SpruceError
from spruce.masks import zero_masks
from spruce.models import load_model
from spruce.recover.monitor import Monitor
from tests.conftest import CORPUS, build_model, build_tokenizer


def finetune(capsys, pruned_dir, corpus_file, out, *extra):
    argv = ["finetune", "--model_name_or_path", str(pruned_dir), "--train_file", str(corpus_file),
            "--validation_file", str(corpus_file), "--block_size", "64", "--do_train", "--do_eval",
            "--per_device_train_batch_size", "2", "--max_eval_samples", "8", "--logging_steps", "1",
            "--output_dir", str(out), *extra]
    code = main(argv)
    out_text, err = capsys.readouterr()
    return code, out_text, err


def base_zero_sets(folder):
    model, _ = load_model(str(folder))
    return zero_masks(model)


def test_lora_recovers_and_merge_keeps_zero_set(capsys, pruned_dir, corpus_file, tmp_path):
    code, out, _ = finetune(capsys, pruned_dir, corpus_file, tmp_path / "lora", "--max_steps", "30",
                            "--learning_rate", "3e-3", "--lora_target_modules", "all-linear", "--merge")
    assert code == 0, out
    summary = json.loads((tmp_path / "lora" / "summary.json").read_text())
    assert summary["eval_after"]["eval_ppl"] < summary["eval_before"]["eval_ppl"]
    assert summary["merged_zero_set_unchanged"] is True
    for name in ["adapter_config.json", "adapter_model.safetensors", "metrics.jsonl", "curves.png", "merged/config.json",
                 "merged/sparsity.json" if (pruned_dir / "sparsity.json").exists() else "merged/config.json"]:
        assert (tmp_path / "lora" / name).exists(), name
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "lora" / "merged")
    before, after = base_zero_sets(pruned_dir), zero_masks(merged)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert "perplexity: pruned" in out and "=== summary ===" in out
    assert list((tmp_path / "lora" / "runs").glob("events.out.tfevents.*"))  # TensorBoard
    # what spruce writes gets the umask's modes, as config.json does (safetensors alone writes 0o600)
    mask = os.umask(0)
    os.umask(mask)
    for path in ["adapter_model.safetensors", "merged/model.safetensors", "merged", "checkpoint-30",
                 "checkpoint-30/trainable.safetensors"]:
        full = tmp_path / "lora" / path
        want = (0o777 if full.is_dir() else 0o666) & ~mask
        assert full.stat().st_mode & 0o777 == want, (path, oct(full.stat().st_mode))


def test_plain_peft_merge_would_fill_the_zeros(pruned_dir, corpus_file, tmp_path, capsys):
    finetune(capsys, pruned_dir, corpus_file, tmp_path / "lora", "--max_steps", "5", "--learning_rate", "1e-2")
    from peft import PeftModel

    base, _ = load_model(str(pruned_dir))
    before = zero_masks(base)
    plain = PeftModel.from_pretrained(base, str(tmp_path / "lora")).merge_and_unload()
    after = zero_masks(plain)
    assert not all(torch.equal(before[n], after[n]) for n in before)


def test_masked_lora_merge_is_lossless(capsys, pruned_dir, corpus_file, tmp_path):
    code, _, _ = finetune(capsys, pruned_dir, corpus_file, tmp_path / "m", "--mode", "masked-lora", "--max_steps", "10",
                          "--learning_rate", "1e-2", "--lora_dropout", "0", "--merge")
    assert code == 0
    summary = json.loads((tmp_path / "m" / "summary.json").read_text())
    assert summary["merged_zero_set_unchanged"] is True
    assert abs(summary["eval_merged"]["eval_loss"] - summary["eval_after"]["eval_loss"]) < 1e-4


def test_masked_full_finetuning_and_distillation_keep_zeros(capsys, pruned_dir, corpus_file, tmp_path, tiny_model_dir):
    for extra in (["--mode", "full"], ["--mode", "full", "--teacher_model", str(tiny_model_dir), "--distill_alpha", "0.7"]):
        out = tmp_path / extra[-1].replace("/", "_")
        code, _, _ = finetune(capsys, pruned_dir, corpus_file, out, "--max_steps", "6", "--learning_rate", "1e-3", *extra)
        assert code == 0
        trained = AutoModelForCausalLM.from_pretrained(out)
        before, after = base_zero_sets(pruned_dir), zero_masks(trained)
        assert all(torch.equal(before[n], after[n]) for n in before)
        base, _ = load_model(str(pruned_dir))
        assert not torch.equal(base.model.layers[0].mlp.up_proj.weight, trained.model.layers[0].mlp.up_proj.weight)


def test_hidden_state_loss_weighs_every_layer_by_its_scale():
    from spruce.recover.train import hidden_state_loss

    torch.manual_seed(0)
    teacher = tuple(torch.randn(2, 8, 16) * scale for scale in (1.0, 1.0, 50.0))
    student = tuple(t + 0.1 * torch.randn_like(t) * t.std() for t in teacher)
    assert hidden_state_loss(teacher, teacher).item() == 0
    loss = hidden_state_loss(student, teacher)
    # layer 2 is 50x larger but relatively as close as layer 1: both add about 0.01
    assert 0.005 < loss.item() < 0.02
    scaled = hidden_state_loss(tuple(3 * s for s in student), tuple(3 * t for t in teacher))
    assert torch.allclose(loss, scaled)


def test_hidden_state_distillation_pulls_the_layers_toward_the_teacher(capsys, pruned_dir, corpus_file, tmp_path):
    from spruce.recover.train import hidden_state_loss

    tok = build_tokenizer()
    dense = build_model(len(tok), seed=1)  # the model pruned_dir was pruned from
    dense.save_pretrained(tmp_path / "dense")
    tok.save_pretrained(tmp_path / "dense")
    ids = torch.tensor([tok(CORPUS)["input_ids"][:64]])
    with torch.no_grad():
        t = dense(input_ids=ids, output_hidden_states=True).hidden_states
    gaps = {}
    for weight in ("0", "1"):  # KL alone, then KL plus the hidden-state term
        out = tmp_path / f"hidden{weight}"
        code, _, err = finetune(capsys, pruned_dir, corpus_file, out, "--mode", "full", "--max_steps", "30",
                                "--learning_rate", "3e-3", "--teacher_model", str(tmp_path / "dense"),
                                "--distill_alpha", "1", "--distill_hidden_weight", weight)
        assert code == 0, err
        after = AutoModelForCausalLM.from_pretrained(out)
        with torch.no_grad():
            gaps[weight] = hidden_state_loss(after(input_ids=ids, output_hidden_states=True).hidden_states, t)
        zeros_before, zeros_after = base_zero_sets(pruned_dir), zero_masks(after)
        assert all(torch.equal(zeros_before[n], zeros_after[n]) for n in zeros_before)
    before, _ = load_model(str(pruned_dir))
    with torch.no_grad():
        gap_before = hidden_state_loss(before(input_ids=ids, output_hidden_states=True).hidden_states, t)
    assert gaps["1"] < 0.5 * gap_before and gaps["1"] < 0.5 * gaps["0"]


def test_bf16_full_finetuning_keeps_float32_master_weights(capsys, pruned_dir, corpus_file, tmp_path):
    # an update far below half a bf16 step of the weight still lands: the weights train in float32
    out = tmp_path / "mixed"
    code, _, _ = finetune(capsys, pruned_dir, corpus_file, out, "--mode", "full", "--bf16", "--max_steps", "2",
                         "--learning_rate", "1e-6", "--lr_scheduler_type", "constant")
    assert code == 0
    trained = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    base, _ = load_model(str(pruned_dir))
    w0, w1 = base.model.layers[0].mlp.up_proj.weight, trained.model.layers[0].mlp.up_proj.weight
    assert trained.config.dtype in (torch.float32, "float32")
    kept = w0 != 0
    moved = (w1 != w0) & kept
    half_ulp = w0.abs().to(torch.bfloat16).float().mul(2 ** -8)
    assert moved.any() and (w1 - w0).abs()[moved].max() < half_ulp[moved].max()
    assert torch.equal(w1 == 0, w0 == 0)


def _train_losses(folder):
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["event"] == "train"}


def test_resume_continues_exactly(capsys, pruned_dir, corpus_file, tmp_path):
    common = ["--max_steps", "8", "--save_steps", "4", "--learning_rate", "5e-3", "--lora_dropout", "0.1",
              "--eval_steps", "4"]
    assert finetune(capsys, pruned_dir, corpus_file, tmp_path / "full", *common)[0] == 0
    straight = _train_losses(tmp_path / "full")
    # a second run that stopped after its checkpoint at step 4: copy that checkpoint and resume
    import shutil

    # (where the Hugging Face Trainer puts it, so a script's --resume_from_checkpoint OUT/checkpoint-4 works)
    (tmp_path / "resumed").mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-4", tmp_path / "resumed" / "checkpoint-4")
    code, out, _ = finetune(capsys, pruned_dir, corpus_file, tmp_path / "resumed", *common,
                            "--resume_from_checkpoint", str(tmp_path / "resumed" / "checkpoint-4"))
    assert code == 0 and "resumed from" in out
    resumed = _train_losses(tmp_path / "resumed")
    assert sorted(resumed) == [5, 6, 7, 8]
    assert all(resumed[s] == straight[s] for s in resumed), (resumed, straight)


def test_overwrite_output_dir_clears_the_earlier_run(capsys, pruned_dir, corpus_file, tmp_path):
    out = tmp_path / "lora"
    assert finetune(capsys, pruned_dir, corpus_file, out, "--max_steps", "6", "--save_steps", "2")[0] == 0
    assert [p.name for p in sorted(out.glob("checkpoint-*"))] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    # a shorter run in the same folder: the old checkpoint-6 must neither outlive the new ones in
    # the rotation nor be what --resume_from_checkpoint latest finds
    code, text, _ = finetune(capsys, pruned_dir, corpus_file, out, "--max_steps", "3", "--save_steps", "1",
                             "--save_total_limit", "2", "--overwrite_output_dir")
    assert code == 0 and "removed the earlier run's" in text
    assert [p.name for p in sorted(out.glob("checkpoint-*"))] == ["checkpoint-2", "checkpoint-3"]
    assert max(json.loads(line).get("step", 0) for line in (out / "metrics.jsonl").read_text().splitlines()) == 3


def test_the_reference_script_flags_run_unchanged(capsys, pruned_dir, tiny_model_dir, corpus_file, tmp_path):
    """The flags of the reference run_lora_finetune_block.sh (Hugging Face Trainer flags included),
    with a local corpus instead of WikiText and small numbers."""
    out = tmp_path / "lora"
    out.mkdir()  # the script makes the folder first, then passes --overwrite_output_dir
    argv = ["finetune", "--model_name_or_path", str(pruned_dir), "--config_name", str(tiny_model_dir),
            "--train_file", str(corpus_file), "--validation_file", str(corpus_file), "--num_train_epochs", "2",
            "--block_size", "64", "--per_device_train_batch_size", "1", "--per_device_eval_batch_size", "8",
            "--do_train", "--do_eval", "--max_train_samples", "5", "--max_eval_samples", "4", "--learning_rate", "1e-3",
            "--overwrite_output_dir", "--output_dir", str(out), "--logging_steps", "4", "--eval_steps", "3",
            "--save_steps", "3", "--logging_first_step", "--evaluation_strategy", "steps", "--save_strategy", "steps",
            "--load_best_model_at_end", "--metric_for_best_model", "eval_loss", "--save_total_limit", "3"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["event"] == "train"] == [1, 4, 8, 10]  # first step, every 4, last
    assert [r["step"] for r in rows if r["event"] == "eval" and r.get("stage") != "before"] == [3, 6, 9, 10]
    assert len(list(out.glob("checkpoint-*"))) <= 3 and "=== summary ===" in text
    # resuming as the script does, from OUTPUT_DIR/checkpoint-N
    code = main(argv + ["--resume_from_checkpoint", str(out / "checkpoint-9")])
    assert code == 0 and "resumed from" in capsys.readouterr().out


def test_dataset_config_names():
    from spruce.recover.finetune import corpus_spec

    assert corpus_spec("wikitext", "wikitext-103-raw-v1", None) == "wikitext103"
    assert corpus_spec("wikitext+c4", "wikitext-2-raw-v1", "0.5,0.5") == "wikitext2:0.5+c4:0.5"
    assert corpus_spec("c4", "en", None) == "c4"
    with pytest.raises(SpruceError, match="wikitext-3 is not a WikiText configuration; use wikitext-2-raw-v1"):
        corpus_spec("wikitext", "wikitext-3", None)
    with pytest.raises(SpruceError, match="does not apply to --dataset_name sotu"):
        corpus_spec("sotu", "wikitext-2-raw-v1", None)


def test_fp16_runs_as_bf16(capsys, pruned_dir, corpus_file, tmp_path):
    code, out, err = finetune(capsys, pruned_dir, corpus_file, tmp_path / "o", "--max_steps", "2", "--fp16",
                              "--report_to", "wandb")
    assert code == 0 and "--fp16 runs as --bf16" in err
    assert "--report_to wandb: spruce logs to TensorBoard and metrics.jsonl only" in out
    config = yaml.safe_load((tmp_path / "o" / "config.yaml").read_text())
    assert config["bf16"] is True and config["dtype"] == "bfloat16"  # LoRA: the frozen base in bf16


@pytest.mark.parametrize("flags, expected", [
    (["--evaluation_strategy", "epoch", "--save_strategy", "epoch"], ([5, 10], [5, 10])),
    (["--eval_strategy", "no", "--save_strategy", "no", "--eval_steps", "2"], ([10], [10])),
])
def test_trainer_strategies(capsys, pruned_dir, corpus_file, tmp_path, flags, expected):
    code, _, _ = finetune(capsys, pruned_dir, corpus_file, tmp_path / "o", "--num_train_epochs", "2",
                          "--max_train_samples", "10", "--per_device_train_batch_size", "2", "--report_to", "none",
                          *flags)
    assert code == 0
    rows = [json.loads(line) for line in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    evals = [r["step"] for r in rows if r["event"] == "eval" and r.get("stage") != "before"]
    saved = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "o").glob("checkpoint-*"))
    assert (evals, saved) == expected
    assert not (tmp_path / "o" / "runs").exists()  # --report_to none: no TensorBoard events


def test_summary_reports_the_best_checkpoint_it_loaded(capsys, pruned_dir, corpus_file, tmp_path):
    # a learning rate far too high: the last evaluation is worse than an earlier one
    code, text, _ = finetune(capsys, pruned_dir, corpus_file, tmp_path / "o", "--mode", "full", "--max_steps", "6",
                             "--eval_steps", "2", "--save_steps", "2", "--learning_rate", "0.2",
                             "--lr_scheduler_type", "constant", "--load_best_model_at_end")
    assert code == 0
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    best, last = summary["best_eval"], summary["eval_last_step"]
    assert best["step"] < last["step"] and best["eval_loss"] < last["eval_loss"]
    assert summary["loaded_best"] is True and summary["eval_after"] == best  # what the saved model scores
    assert f"best checkpoint's (step {best['step']}, loaded at the end) eval loss" in text
    assert f"-> recovered {best['eval_ppl']:.2f}" in text


def test_overfitting_diagnostic_fires():
    m = Monitor()
    for step, (train_loss, eval_loss) in enumerate([(3.0, 2.5), (2.0, 2.4), (1.0, 2.6), (0.5, 2.9)], 1):
        m.on_train({"step": step * 10, "loss": train_loss})
        _, notes = m.on_eval({"step": step * 10, "eval_loss": eval_loss, "eval_ppl": 2.718 ** eval_loss})
    assert any("overfitting" in n and "lower --learning_rate" in n for n in notes)
    assert m.best["step"] == 20


def test_a_wide_train_eval_gap_is_called_overfitting_at_the_first_evaluation():
    # the reference notes' case: train loss 0.5, eval loss 2.5, and a single evaluation
    m = Monitor()
    m.on_train({"step": 10, "loss": 3.1})
    m.on_train({"step": 100, "loss": 0.5})
    _, notes = m.on_eval({"step": 100, "eval_loss": 2.5, "eval_ppl": 12.18})
    assert len(notes) == 1 and "overfitting: eval loss 2.500 is 2.00 above train loss 0.500" in notes[0]
    assert "lower --learning_rate" in notes[0]
    close = Monitor()
    close.on_train({"step": 100, "loss": 3.0})
    assert close.on_eval({"step": 100, "eval_loss": 3.2, "eval_ppl": 24.5})[1] == []
    diverging = Monitor()  # eval far above train, but the train loss never fell: not overfitting
    diverging.on_train({"step": 10, "loss": 5.8})
    diverging.on_train({"step": 20, "loss": 6.3})
    assert diverging.on_eval({"step": 20, "eval_loss": 10.3, "eval_ppl": 3e4})[1] == []
    distilled = Monitor(compare_losses=False)  # a KL training loss is not comparable with the eval loss
    distilled.on_train({"step": 10, "loss": 3.1})
    distilled.on_train({"step": 100, "loss": 0.5})
    assert distilled.on_eval({"step": 100, "eval_loss": 2.5, "eval_ppl": 12.18})[1] == []


def test_flat_and_jumping_loss_diagnostics():
    flat = Monitor()
    notes = [n for s in range(6) for n in flat.on_train({"step": s, "loss": 2.0})]
    assert any("flat" in n for n in notes)
    jump = Monitor()
    notes = [n for s, loss in enumerate([3.0, 2.0, 1.9, 4.5]) for n in jump.on_train({"step": s, "loss": loss})]
    assert any("too high" in n for n in notes)
    # noisy but not falling: neither flat nor jumping, still said once
    stalled = Monitor()
    noisy = [3.0, 3.3, 2.9, 3.2, 3.1, 3.0, 3.4, 2.95, 3.25, 3.15, 3.2, 3.1]
    notes = [n for s, loss in enumerate(noisy) for n in stalled.on_train({"step": s, "loss": loss})]
    assert len(notes) == 1 and "loss is not falling" in notes[0] and "learning rate may be too high" in notes[0]
    falling = Monitor()
    assert not [n for s in range(12) for n in falling.on_train({"step": s, "loss": 3.0 - 0.1 * s + 0.05 * (s % 2)})]


def test_max_train_samples_warning(capsys, pruned_dir, corpus_file, tmp_path):
    code, _, err = finetune(capsys, pruned_dir, corpus_file, tmp_path / "w", "--max_steps", "1",
                            "--max_train_samples", "30000")
    assert code == 0 and "max_train_samples (30000) is larger than dataset size" in err


@pytest.mark.parametrize("case", ["existing_output", "block_size", "offline", "corrupt", "no_action",
                                  "hidden_without_teacher", "metric"])
def test_finetune_bad_input(case, capsys, pruned_dir, corpus_file, tmp_path):
    out = tmp_path / "o"
    extra = ["--max_steps", "1"]
    if case == "existing_output":
        out.mkdir()
        (out / "x").write_text("x")
        expected = "--overwrite_output_dir"
    elif case == "block_size":
        extra += ["--block_size", "4096"]
        expected = "longer than the model's context"
    elif case == "offline":
        argv = ["finetune", "--model_name_or_path", str(pruned_dir), "--dataset_name", "wikitext",
                "--dataset_config_name", "wikitext-2-raw-v1", "--do_train", "--output_dir", str(out)]
        code = main(argv)
        err = capsys.readouterr().err
        # no datasets package (CI), or datasets without the Hub: one line that names the way out
        assert code == 2 and ("pip install 'datasets==5.2.0'" in err or "Hub is unreachable" in err)
        assert len(err.strip().splitlines()) == 1
        return
    elif case == "metric":
        extra += ["--metric_for_best_model", "accuracy"]
        expected = "--metric_for_best_model accuracy: spruce picks the best checkpoint by evaluation loss"
    elif case == "hidden_without_teacher":
        extra += ["--mode", "full", "--distill_hidden_weight", "1"]
        expected = "--distill_hidden_weight needs --teacher_model"
    elif case == "corrupt":
        (out / "checkpoint-3").mkdir(parents=True)
        (out / "checkpoint-3" / "state.json").write_text("{")
        extra += ["--resume_from_checkpoint", "latest"]
        expected = "not a complete checkpoint"
    else:
        argv = ["finetune", "--model_name_or_path", str(pruned_dir), "--train_file", str(corpus_file),
                "--output_dir", str(out)]
        code = main(argv)
        assert code == 2 and "pass --do_train" in capsys.readouterr().err
        return
    code, _, err = finetune(capsys, pruned_dir, corpus_file, out, *extra)
    assert code == 2 and expected in err, err
    assert len(err.strip().splitlines()) == 1


def test_adapter_for_another_base_model(capsys, corpus_file, tmp_path, tiny_model_dir):
    tok = build_tokenizer()
    other = build_model(len(tok), hidden=32)
    other.save_pretrained(tmp_path / "other")
    tok.save_pretrained(tmp_path / "other")
    assert finetune(capsys, tmp_path / "other", corpus_file, tmp_path / "a", "--max_steps", "1")[0] == 0
    code = main(["eval", "--model", str(tiny_model_dir), "--lora_weights", str(tmp_path / "a"),
                 "--dataset", str(corpus_file), "--seqlen", "64"])
    err = capsys.readouterr().err
    assert code == 2 and "another base model" in err and len(err.strip().splitlines()) == 1


def test_every_finetune_flag_maps_onto_finetune_args_with_its_one_default():
    import dataclasses

    from spruce.cli import build_parser, finetune_args
    from spruce.recover.args import FinetuneArgs

    parser = build_parser()
    args = parser.parse_args(["finetune", "--model_name_or_path", "m", "--output_dir", "o", "--do_train"])
    mapped = finetune_args(args)
    for f in dataclasses.fields(FinetuneArgs):
        if f.name in ("model_name_or_path", "output_dir", "do_train", "autocast_bf16"):
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        assert getattr(args, f.name) == default, f.name  # the parser's default is the dataclass's
        assert getattr(mapped, f.name) == default, f.name
