"""The error contract under broken models, files, disks and interrupted runs: one line on stderr,
exit status 2, no traceback, no output folder that looks complete, no silent wrong answer."""

import errno
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from spruce.cli import main
from tests.conftest import build_model, build_tokenizer


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, err, *expected):
    """Exit 2 and one error line, the last on stderr (progress lines may come before it)."""
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("spruce ") and ": error: " in lines[-1], err
    assert len([line for line in lines if "error" in line.lower()]) == 1, err
    for text in expected:
        assert text in lines[-1], err


def eval_argv(model, corpus, *extra):
    return ["eval", "--model", model, "--dataset", corpus, "--seqlen", "32", "--max_windows", "2", *extra]


def finetune_argv(model, corpus, out, *extra):
    return ["finetune", "--model_name_or_path", model, "--train_file", corpus, "--validation_file", corpus,
            "--block_size", "32", "--do_train", "--max_eval_samples", "2", "--max_steps", "2",
            "--output_dir", out, *extra]


def copy_model(src, dst, edit=None):
    shutil.copytree(src, dst)
    if edit:
        tensors = load_file(dst / "model.safetensors")
        edit(tensors)
        save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


# 1. weights that do not cover the model are refused, not filled with random values

def _drop(t):
    t.pop("model.layers.0.mlp.up_proj.weight")
    t.pop("model.layers.1.self_attn.q_proj.weight")


def _extra(t):
    t["model.layers.0.mlp.extra.weight"] = torch.zeros(2)


def _reshape(t):
    t["model.norm.weight"] = torch.ones(3)


@pytest.mark.parametrize("edit, expected", [
    (_drop, ["2 tensors missing", "model.layers.0.mlp.up_proj.weight"]),
    (_extra, ["not in the model", "model.layers.0.mlp.extra.weight"]),
    (_reshape, ["another shape"]),
])
def test_weights_that_do_not_fit_the_config_stop_eval(edit, expected, capsys, tiny_model_dir, corpus_file, tmp_path):
    broken = copy_model(tiny_model_dir, tmp_path / "broken", edit)
    code, out, err = run(capsys, *eval_argv(broken, corpus_file))
    one_line_error(code, err, "do not fit its config", *expected)
    assert "perplexity" not in out


def test_prune_saves_nothing_from_a_model_with_missing_weights(capsys, tiny_model_dir, tmp_path):
    broken = copy_model(tiny_model_dir, tmp_path / "broken", _drop)
    code, out, err = run(capsys, "prune", "--model", broken, "--prune_method", "magnitude",
                         "--save_model", tmp_path / "out")
    one_line_error(code, err, "2 tensors missing")
    assert not (tmp_path / "out").exists()


# 2. an encoder is not a causal LM

@pytest.mark.parametrize("config", [
    {"model_type": "bert", "architectures": ["BertForMaskedLM"], "vocab_size": 320, "hidden_size": 32,
     "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64},
    {"model_type": "bert", "vocab_size": 320, "hidden_size": 32, "num_hidden_layers": 1,
     "num_attention_heads": 2, "intermediate_size": 64},
])
def test_an_encoder_is_refused(config, capsys, corpus_file, tmp_path):
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps(config))
    code, out, err = run(capsys, *eval_argv(tmp_path / "bert", corpus_file))
    one_line_error(code, err, "'bert' model", "not a causal language model")


# 3. an interrupted run's folder: resuming is the first advice, not overwriting

def test_a_folder_with_checkpoints_names_resume_first(capsys, pruned_dir, corpus_file, tmp_path):
    out = tmp_path / "o"
    (out / "checkpoint-2").mkdir(parents=True)
    (out / "metrics.jsonl").write_text("")
    code, _, err = run(capsys, *finetune_argv(pruned_dir, corpus_file, out))
    one_line_error(code, err, "--resume_from_checkpoint latest", "checkpoint-2")
    assert err.index("--resume_from_checkpoint latest") < err.index("--overwrite_output_dir")
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "metrics.jsonl"]


# 4. the output location is checked before the work; a full disk leaves nothing behind

@pytest.fixture
def not_a_folder(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")
    return blocker


@pytest.mark.parametrize("argv", [
    ["prune", "--model", "{tiny}", "--prune_method", "magnitude", "--save_model", "{bad}/out"],
    ["merge", "--model", "{tiny}", "--lora_weights", "{tiny}", "--output_dir", "{bad}/out"],
    ["eval", "--model", "{tiny}", "--dataset", "{corpus}", "--seqlen", "32", "--json", "{bad}/r.json"],
    ["finetune", "--model_name_or_path", "{tiny}", "--train_file", "{corpus}", "--do_train",
     "--output_dir", "{bad}/out"],
    ["run", "{recipe}", "output_dir={bad}/run"],
])
def test_an_unwritable_output_fails_before_the_model_loads(argv, capsys, tiny_model_dir, corpus_file, not_a_folder,
                                                           monkeypatch, tmp_path):
    import spruce.models

    def no_loading(*a, **k):
        raise AssertionError("the model was loaded before the output location was checked")

    monkeypatch.setattr(spruce.models, "load_model", no_loading)
    from spruce.config import recipes_dir

    fill = {"{tiny}": str(tiny_model_dir), "{corpus}": str(corpus_file), "{bad}": str(not_a_folder),
            "{recipe}": str(recipes_dir() / "smollm2-block16.yaml")}
    for key, value in fill.items():
        argv = [a.replace(key, value) for a in argv]
    code, _, err = run(capsys, *argv)
    one_line_error(code, err, "is a file, not a folder")


def test_a_full_disk_says_how_much_space_and_leaves_no_partial_folder(capsys, tiny_model_dir, corpus_file,
                                                                      tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    def fill_the_disk(self, folder, **kwargs):
        (folder / "model.safetensors").write_bytes(b"\0" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", fill_the_disk)
    code, out, err = run(capsys, "prune", "--model", tiny_model_dir, "--prune_method", "wanda",
                         "--calib_dataset", corpus_file, "--nsamples", "2", "--seqlen", "32", "--state_every", "0",
                         "--save_model", tmp_path / "out")
    one_line_error(code, err, "no space left", "kB needed", "prune state .out.prune-state", "is kept")
    # no partial folder; the prune state holds every pruned layer, so the rerun saves without pruning
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.prune-state"]


def test_a_disk_that_fills_while_the_prune_state_is_written(capsys, tiny_model_dir, corpus_file, tmp_path,
                                                            monkeypatch):
    from safetensors import SafetensorError

    import spruce.prune.state

    def full(*args, **kwargs):  # what safetensors raises on a full disk (not an OSError)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(spruce.prune.state, "save_file", full)
    code, _, err = run(capsys, "prune", "--model", tiny_model_dir, "--prune_method", "wanda",
                       "--calib_dataset", corpus_file, "--nsamples", "2", "--seqlen", "32", "--state_every", "0",
                       "--save_model", tmp_path / "out")
    one_line_error(code, err, "no space left", "kB needed", "--state_every -1")
    assert list(tmp_path.iterdir()) == []


# 5. corrupt inputs

def _pickle_model(folder):
    import os

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    (folder / "model.safetensors").unlink()
    torch.save({"x": Evil()}, folder / "pytorch_model.bin")


@pytest.mark.parametrize("damage, expected", [
    (lambda f: (f / "config.json").write_text("{not json"), "cannot read the config"),
    (lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:5000]),
     "truncated or corrupt"),
    (lambda f: (f / "model.safetensors").unlink(), "cannot load the weights"),
    (_pickle_model, "weights_only=True"),
])
def test_a_corrupt_model_folder(damage, expected, capsys, tiny_model_dir, corpus_file, tmp_path):
    folder = copy_model(tiny_model_dir, tmp_path / "m")
    damage(folder)
    code, _, err = run(capsys, *eval_argv(folder, corpus_file))
    one_line_error(code, err, expected)


def test_a_binary_corpus_file(capsys, tiny_model_dir, tmp_path):
    binary = tmp_path / "data.txt"
    binary.write_bytes(bytes(range(256)) * 20)
    code, _, err = run(capsys, *eval_argv(tiny_model_dir, binary))
    one_line_error(code, err, "is not UTF-8 text")


@pytest.fixture(scope="module")
def adapter_dir(pruned_dir, corpus_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("adapter") / "a"
    assert main([str(a) for a in finetune_argv(pruned_dir, corpus_file, out, "--save_steps", "1",
                                                                 "--logging_steps", "1")]) == 0
    return out


@pytest.mark.parametrize("damage, expected", [
    (lambda f: (f / "adapter_model.safetensors").write_bytes((f / "adapter_model.safetensors").read_bytes()[:900]),
     "truncated or corrupt"),
    (lambda f: (f / "adapter_config.json").write_text("{broken"), "is not valid JSON"),
])
def test_a_corrupt_adapter(damage, expected, capsys, adapter_dir, pruned_dir, corpus_file, tmp_path):
    adapter = tmp_path / "a"
    shutil.copytree(adapter_dir, adapter)
    damage(adapter)
    code, _, err = run(capsys, *eval_argv(pruned_dir, corpus_file, "--lora_weights", adapter))
    one_line_error(code, err, expected)
    assert "another base model" not in err


# 6. bad finetune values fail before anything is written

@pytest.mark.parametrize("extra, expected", [
    (["--learning_rate", "-1"], "--learning_rate must be a positive number"),
    (["--lora_dropout", "1.5"], "--lora_dropout must be in [0, 1)"),
    (["--num_train_epochs", "0", "--max_steps", "-1"], "--num_train_epochs must be positive"),
    (["--lora_target_modules", "no_such_proj"], "check --lora_target_modules"),
    (["--resume_from_checkpoint", "/no/such/checkpoint-9"], "does not exist"),
    (["--warmup_steps", "-3"], "--warmup_steps must be 0 or more"),
    (["--distill_alpha", "2", "--teacher_model", "{tiny}"], "--distill_alpha must be in [0, 1]"),
    (["--lora_alpha", "0"], "--lora_alpha must be a positive"),
])
def test_bad_finetune_values_write_nothing(extra, expected, capsys, pruned_dir, tiny_model_dir, corpus_file, tmp_path):
    out = tmp_path / "o"
    extra = [str(tiny_model_dir) if e == "{tiny}" else e for e in extra]
    code, _, err = run(capsys, *finetune_argv(pruned_dir, corpus_file, out, *extra))
    one_line_error(code, err, expected)
    assert not out.exists()
    if extra[0] == "--learning_rate":
        code, _, _ = run(capsys, *finetune_argv(pruned_dir, corpus_file, out, "--max_steps", "1"))
        assert code == 0  # the corrected run is not blocked by leftovers


def test_a_mismatched_resume_fails_before_writing(capsys, adapter_dir, pruned_dir, corpus_file, tmp_path):
    out = tmp_path / "o"
    shutil.copytree(adapter_dir, out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    code, _, err = run(capsys, *finetune_argv(pruned_dir, corpus_file, out, "--lora_r", "4",
                                              "--resume_from_checkpoint", "latest"))
    one_line_error(code, err, "does not fit this run", "--lora_r")
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before  # no row appended, no config rewritten


# 7. recipe values of the wrong type are refused at load time, naming the key

@pytest.mark.parametrize("override, expected", [
    ("prune.pattern=16", "prune.pattern must be a string, got 16"),
    ("data.eval_windows=2.5", "data.eval_windows must be a whole number or null, got 2.5"),
    ("recover.lr_scheduler_type=exponential", "recover.lr_scheduler_type must be one of linear, cosine"),
    ("recover.lora_r=eight", "recover.lora_r must be a whole number"),
    ("seed=yes", "seed must be a whole number"),
])
def test_recipe_values_are_checked_at_load_time(override, expected, capsys, tmp_path, monkeypatch):
    import spruce.pipeline

    monkeypatch.setattr(spruce.pipeline, "run_recipe", lambda *a, **k: pytest.fail("a stage ran"))
    from spruce.config import recipes_dir

    code, _, err = run(capsys, "run", recipes_dir() / "smollm2-block16.yaml", f"output_dir={tmp_path / 'r'}",
                       override)
    one_line_error(code, err, expected)


# 8. --trust_remote_code reaches the tokenizer loader

def test_trust_remote_code_reaches_the_tokenizer(tiny_model_dir, monkeypatch):
    from transformers import AutoTokenizer

    from spruce.models import load_model

    seen = {}
    real = AutoTokenizer.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.update(kwargs)
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", classmethod(spy))
    load_model(str(tiny_model_dir), trust_remote_code=True)
    assert seen.get("trust_remote_code") is True
    load_model(str(tiny_model_dir))
    assert seen.get("trust_remote_code") is False


# 9. a killed save's temporary folder is removed by the next successful save

def test_a_stale_partial_folder_is_removed_after_a_successful_save(capsys, tiny_model_dir, tmp_path):
    stale = tmp_path / ".out.partial-k1ll3d"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 100)
    other = tmp_path / ".other.partial-keep"
    other.mkdir()
    code, _, err = run(capsys, "prune", "--model", tiny_model_dir, "--prune_method", "magnitude",
                       "--save_model", tmp_path / "out")
    assert code == 0, err
    assert not stale.exists() and other.exists() and (tmp_path / "out" / "config.json").exists()


# 10. no carriage returns when stderr is not a terminal

def test_progress_is_plain_lines_off_a_terminal(capsys):
    from tqdm.auto import tqdm

    from spruce.progress import progress_bar

    bar = progress_bar(total=40, desc="training", unit="step")
    for i in range(40):
        bar.update(1)
        with tqdm.external_write_mode():
            print(f"step {i + 1}/40 | loss 1.0")
    bar.close()
    out, err = capsys.readouterr()
    assert "\r" not in out + err
    assert len([line for line in out.splitlines() if line.startswith("step")]) == 40
    assert 1 <= len(err.splitlines()) <= 3 and "40/40" in err.splitlines()[-1]


# 11. metrics.jsonl after a resume: one row per step

def test_metrics_have_one_row_per_step_after_a_resume(capsys, adapter_dir, pruned_dir, corpus_file, tmp_path):
    out = tmp_path / "o"
    shutil.copytree(adapter_dir, out)
    code, _, err = run(capsys, *finetune_argv(pruned_dir, corpus_file, out, "--save_steps", "1",
                                              "--max_steps", "3", "--resume_from_checkpoint", out / "checkpoint-1",
                                              "--do_eval", "--logging_steps", "1"))
    assert code == 0, err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in rows if r["event"] == "train"]
    assert train_steps == [1, 2, 3]
    assert [r["step"] for r in rows if r["event"] == "checkpoint"] == [1, 2, 3]
    assert len([r for r in rows if r.get("stage") == "before"]) <= 1
    assert len([r for r in rows if r["event"] == "summary"]) == 1


# 12. hints that name the real problem, checks before the model loads

@pytest.mark.parametrize("extra, expected", [
    (["--train_file", "/no/such/corpus.txt"], "corpus file /no/such/corpus.txt does not exist"),
    (["--resume_from_checkpoint", "/no/such/checkpoint-3"], "--resume_from_checkpoint /no/such/checkpoint-3 does not exist"),
    (["--num_train_epochs", "0"], "--num_train_epochs must be positive"),
])
def test_late_checks_come_before_the_model_loads(extra, expected, capsys, pruned_dir, corpus_file, tmp_path,
                                                 monkeypatch):
    import spruce.recover.finetune

    monkeypatch.setattr(spruce.recover.finetune, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    argv = ["finetune", "--model_name_or_path", pruned_dir, "--train_file", corpus_file, "--do_train",
            "--output_dir", tmp_path / "o", *extra]
    code, _, err = run(capsys, *argv)
    one_line_error(code, err, expected)
    assert not (tmp_path / "o").exists()


# beyond the list

def test_a_model_folder_without_tokenizer(capsys, corpus_file, tmp_path):
    tok = build_tokenizer()
    build_model(len(tok)).save_pretrained(tmp_path / "m")
    code, _, err = run(capsys, *eval_argv(tmp_path / "m", corpus_file))
    one_line_error(code, err, "no tokenizer found")


def test_ctrl_c_during_eval(capsys, tiny_model_dir, corpus_file, tmp_path, monkeypatch):
    import spruce.evaluate

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(spruce.evaluate, "perplexity", interrupted)
    code, _, err = run(capsys, *eval_argv(tiny_model_dir, corpus_file, "--json", tmp_path / "r.json"))
    assert code == 130 and err.strip() == "spruce eval: interrupted"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, expected", [
    (["finetune", "--model_name_or_path", "m", "--output_dir", "o", "--do_train", "--learning_rate", "fast"],
     "invalid float value: 'fast'"),
    (["finetune", "--model_name_or_path", "m", "--output_dir", "o", "--do_train", "--lora_r", "2.5"],
     "'2.5' is not a whole number"),
    (["eval", "--model", "m", "--seqlen", "-5"], "must be positive"),
])
def test_wrong_flag_types(argv, expected, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and expected in err and len(err.strip().splitlines()) == 1


def test_an_eval_json_path_that_is_a_folder(capsys, tiny_model_dir, corpus_file, tmp_path):
    code, _, err = run(capsys, *eval_argv(tiny_model_dir, corpus_file, "--json", tmp_path))
    one_line_error(code, err, "is a folder; give a file path")
