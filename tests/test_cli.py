"""The CLI: real runs on a tiny model folder, and one clear line (exit 2) for each bad input."""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from spruce.cli import main
from spruce.masks import block_pattern_holds
from spruce.models import prunable_linears


def run_cli(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        raise SystemExit(main(list(argv)))
    out, err = capsys.readouterr()
    return e.value.code, out, err


def test_prune_flags_reach_the_engine_and_sparsity_json(capsys, tiny_model_dir, corpus_file, tmp_path):
    out_dir = tmp_path / "pruned"
    code, out, _ = run_cli(capsys, "prune", "--model", str(tiny_model_dir), "--prune_method", "sparsegpt",
                           "--sparsity_type", "16x16", "--nsamples", "4", "--seqlen", "64",
                           "--calib_dataset", str(corpus_file), "--true_sequential", "--reconstruct_epochs", "2",
                           "--reconstruct_lr", "3e-4", "--reconstruct_target", "local", "--reconstruct_norms",
                           "--save_model", str(out_dir))
    assert code == 0
    info = json.loads((out_dir / "sparsity.json").read_text())
    assert info["sequential"] is True and info["reconstruct"] == {"epochs": 2, "lr": 3e-4, "target": "local", "norms": True}
    model = AutoModelForCausalLM.from_pretrained(out_dir)
    assert all(block_pattern_holds(m.weight, 16, 16) for m in prunable_linears(model).values())
    code, _, err = run_cli(capsys, "prune", "--model", str(tiny_model_dir), "--reconstruct_epochs", "-1",
                           "--save_model", str(tmp_path / "x"))
    assert code == 2 and "must be 0 or more" in err


def test_prune_then_eval_roundtrip(capsys, tiny_model_dir, corpus_file, tmp_path):
    out_dir = tmp_path / "pruned"
    code, out, _ = run_cli(capsys, "prune", "--model", str(tiny_model_dir), "--prune_method", "wanda",
                           "--sparsity_type", "16x16", "--sparsity_ratio", "0.5", "--nsamples", "4",
                           "--seqlen", "64", "--calib_dataset", str(corpus_file), "--save_model", str(out_dir))
    assert code == 0 and "measured sparsity 0.5000" in out
    info = json.loads((out_dir / "sparsity.json").read_text())
    assert info["pattern"] == "16x16" and info["measured_sparsity"] == 0.5
    model = AutoModelForCausalLM.from_pretrained(out_dir)
    assert all(block_pattern_holds(m.weight, 16, 16) for m in prunable_linears(model).values())

    result = tmp_path / "eval.json"
    code, out, _ = run_cli(capsys, "eval", "--model", str(out_dir), "--dataset", str(corpus_file),
                           "--seqlen", "64", "--max_windows", "4", "--json", str(result))
    assert code == 0 and out.startswith("perplexity ")
    record = json.loads(result.read_text())
    assert {"model", "dataset", "split", "seqlen", "windows", "tokens", "ppl", "seconds", "sparsity"} <= record.keys()
    assert record["windows"] == 4 and record["sparsity"] == 0.5


def test_wanda_style_block_flags(capsys, tiny_model_dir, corpus_file, tmp_path):
    code, out, _ = run_cli(capsys, "prune", "--model", str(tiny_model_dir), "--prune_method", "wanda",
                           "--sparsity_type", "block",
                           "--block_size", "32", "--nsamples", "2", "--seqlen", "64",
                           "--calib_dataset", str(corpus_file), "--save_model", str(tmp_path / "m"),
                           "--save", str(tmp_path / "log"))
    assert code == 0 and "32x32" in out
    assert (tmp_path / "log" / "log_wanda.txt").read_text().startswith("method\tactual_sparsity")


@pytest.fixture
def not_causal_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit"}))
    return tmp_path


@pytest.mark.parametrize("argv, message", [
    (["eval", "--model", "/no/such/folder"], "model path /no/such/folder does not exist"),
    (["eval", "--model", "{empty}"], "has no config.json"),
    (["eval", "--model", "{not_causal}"], "not a causal language model"),
    (["eval", "--model", "meta-llama/Llama-2-7b-hf"], "Hub cannot be reached (offline)"),
    (["eval", "--model", "{tiny}", "--dataset", "nosuch"], "unknown corpus 'nosuch'"),
    (["eval", "--model", "{tiny}", "--dataset", "{empty_txt}"], "holds no text"),
    (["eval", "--model", "{tiny}", "--seqlen", "4096"], "longer than the model's context"),
    (["prune", "--model", "{tiny}", "--sparsity_ratio", "1.0", "--save_model", "{out}"], "must be in [0, 1)"),
    (["prune", "--model", "{tiny}", "--sparsity_type", "48x48", "--save_model", "{out}",
      "--calib_dataset", "{corpus}", "--nsamples", "2", "--seqlen", "64"], "48x48 blocks do not divide"),
    (["prune", "--model", "{tiny}", "--sparsity_type", "diagonal", "--save_model", "{out}"], "unknown sparsity type"),
    (["prune", "--model", "{tiny}", "--calib_dataset", "nosuch", "--save_model", "{out}"], "unknown corpus"),
    (["prune", "--model", "{tiny}", "--nsamples", "0", "--save_model", "{out}"], "must be positive"),
    (["prune", "--model", "{tiny}", "--sparsity_type", "16x16", "--module_pattern", "gate_proj",
      "--save_model", "{out}"], "bad module pattern 'gate_proj'"),
    (["prune", "--model", "{tiny}", "--sparsity_type", "16x16", "--module_pattern", "router=16x16g8",
      "--prune_method", "magnitude", "--save_model", "{out}"], "module pattern key 'router' matches no decoder linear"),
])
def test_bad_input_one_line_exit_2(capsys, argv, message, tmp_path, tiny_model_dir, corpus_file, not_causal_dir):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty.txt").write_text("")
    fill = {"{empty}": str(tmp_path / "empty"), "{not_causal}": str(not_causal_dir), "{tiny}": str(tiny_model_dir),
            "{empty_txt}": str(tmp_path / "empty.txt"), "{out}": str(tmp_path / "out"), "{corpus}": str(corpus_file)}
    argv = [fill.get(a, a) for a in argv]
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    assert message in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()  # no output folder that looks complete


def test_existing_output_needs_overwrite(capsys, tiny_model_dir, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    code, _, err = run_cli(capsys, "prune", "--model", str(tiny_model_dir), "--prune_method", "magnitude",
                           "--save_model", str(tmp_path / "out"))
    assert code == 2 and "--overwrite_output_dir" in err
    assert (tmp_path / "out" / "keep.txt").exists()


def test_real_process_prints_no_traceback(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SPRUCE_HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "spruce.cli", "prune", "--model", str(tmp_path / "missing"),
                           "--save_model", str(tmp_path / "out")], capture_output=True, text=True, env=env)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_every_command_has_help(capsys):
    for command in ["demo", "eval", "prune", "finetune", "merge", "bench", "fetch"]:
        code, out, _ = run_cli(capsys, command, "--help")
        assert code == 0 and "usage: spruce " + command in out


def test_zero_shot_without_lm_eval_says_how_to_get_it(capsys, tiny_model_dir, corpus_file, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_lm_eval(name, *a, **k):
        if name.startswith("lm_eval"):
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    code, out, err = run_cli(capsys, "eval", "--model", str(tiny_model_dir), "--dataset", str(corpus_file),
                             "--seqlen", "64", "--max_windows", "2", "--tasks", "boolq,rte")
    assert code == 2 and "pip install lm-eval" in err and len(err.strip().splitlines()) == 1
    assert out == ""  # refused before any work
    # the reference evaluate script's flag asks for the same harness
    code, out, err = run_cli(capsys, "eval", "--model", str(tiny_model_dir), "--dataset", str(corpus_file),
                             "--ctx_length", "64", "--max_windows", "2", "--eval_zero_shot")
    assert code == 2 and "pip install lm-eval" in err and out == ""


@pytest.mark.parametrize("command,flag", [("finetune", "--per_device_train_batch_size"),
                                          ("prune", "--calib_batch_size"), ("eval", "--batch_size")])
def test_out_of_gpu_memory_names_the_commands_own_flags(command, flag, capsys, monkeypatch, tmp_path):
    import torch

    import spruce.cli as cli

    def out_of_memory(args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setitem(cli.COMMANDS, command, out_of_memory)
    argv = {"finetune": ["finetune", "--model_name_or_path", "m", "--output_dir", str(tmp_path / "o"), "--do_train"],
            "prune": ["prune", "--model", "m"], "eval": ["eval", "--model", "m"]}[command]
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and "ran out of memory" in err and flag in err and len(err.strip().splitlines()) == 1


def test_tqdm_disable_hides_every_bar(monkeypatch):
    from spruce.progress import progress_bar as bar

    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    assert not bar(range(3), show=True).disable
    assert bar(range(3), show=False).disable
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert bar(range(3), show=True).disable


def test_default_block_recipe_on_cpu_says_it_is_sized_for_a_gpu(capsys, tiny_model_dir, corpus_file, tmp_path):
    code, out, err = run_cli(capsys, "prune", "--model", str(tiny_model_dir), "--sparsity_type", "16x16",
                             "--nsamples", "2", "--seqlen", "32", "--calib_dataset", str(corpus_file),
                             "--device", "cpu", "--save_model", str(tmp_path / "p"))
    assert code == 0 and "sized for a GPU" in err and "--reconstruct_epochs 4" in err
    info = json.loads((tmp_path / "p" / "sparsity.json").read_text())
    from spruce.prune.defaults import DEFAULTS
    assert info["method"] == "obs" and info["reconstruct"]["epochs"] == DEFAULTS["block"]["reconstruct_epochs"] == 24
    _, _, err = run_cli(capsys, "prune", "--model", str(tiny_model_dir), "--sparsity_type", "16x16",
                        "--prune_method", "wanda", "--nsamples", "2", "--seqlen", "32",
                        "--calib_dataset", str(corpus_file), "--device", "cpu", "--save_model", str(tmp_path / "w"))
    assert "sized for a GPU" not in err  # a named method is the user's choice


def test_a_killed_prune_command_continues_when_run_again(capsys, tokenizer, corpus_file, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from spruce.prune.state import state_folder
    from tests.conftest import build_model
    from tests.test_prune import _interrupt_at

    model_dir = tmp_path / "four-layers"
    build_model(len(tokenizer), seed=4, num_hidden_layers=4).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    argv = ["prune", "--model", str(model_dir), "--prune_method", "sparsegpt", "--sparsity_type", "16x16",
            "--nsamples", "4", "--seqlen", "64", "--calib_dataset", str(corpus_file), "--reconstruct_epochs", "2"]
    straight, out = tmp_path / "straight", tmp_path / "pruned"
    assert run_cli(capsys, *argv, "--save_model", str(straight), "--state_every", "-1")[0] == 0
    assert not state_folder(straight).exists()

    restore = _interrupt_at(monkeypatch, 4)
    code, _, err = run_cli(capsys, *argv, "--save_model", str(out), "--state_every", "0")
    restore()
    assert code == 130 and "interrupted" in err
    assert not out.exists()  # nothing that looks finished
    assert (state_folder(out) / "carry.pt").is_file()
    code, out_text, err = run_cli(capsys, *argv, "--save_model", str(out), "--state_every", "0")
    assert code == 0 and "resuming the pruning from layer 4/4" in err
    assert not state_folder(out).exists()  # removed once the model is saved
    a, b = load_file(straight / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_flag_the_command_does_not_take_names_the_command_and_the_nearest_flag(capsys):
    code = main(["finetune", "--model_name_or_path", "m", "--output_dir", "o", "--learning-rate", "3e-4",
                 "--no_such_flag"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("spruce finetune: error: unrecognized arguments: --learning-rate 3e-4 --no_such_flag")
    assert "did you mean --learning-rate -> --learning_rate?" in err and "(see 'spruce finetune --help')" in err
    assert main(["bench", "kernels", "--nope"]) == 2
    assert "spruce bench kernels: error: unrecognized arguments: --nope" in capsys.readouterr().err


def test_bench_outside_a_source_checkout_says_where_to_run_it(capsys, monkeypatch):
    import sys

    for name in ("bench", "bench.kernels", "bench.generate"):   # as if the bench/ folder were not importable
        monkeypatch.setitem(sys.modules, name, None)
    assert main(["bench", "kernels", "--json", "k.json"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "python -m bench.kernels" in err
