"""bench/recover_sweep.py: every recipe is a valid `spruce finetune` command, and the sweep runs end to end."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("recover_sweep", ROOT / "bench" / "recover_sweep.py")
sweep = importlib.util.module_from_spec(spec)
sys.modules["recover_sweep"] = sweep  # dataclasses look their module up there
spec.loader.exec_module(sweep)


@pytest.mark.parametrize("name", list(sweep.RECIPES))
def test_every_recipe_is_a_spruce_finetune_command(name, tmp_path):
    from spruce.cli import build_parser

    recipe = sweep.RECIPES[name]
    args = sweep.finetune_args(recipe, recipe.flags, "pruned", "smollm2-135m", tmp_path / name)
    assert sweep.parse_problem(args) is None
    parsed = build_parser().parse_args(args)
    assert parsed.bf16 and parsed.merge and parsed.load_best_model_at_end and parsed.do_eval
    assert (parsed.teacher_model == "smollm2-135m") == recipe.teacher
    if recipe.teacher:
        assert parsed.distill_alpha == 1.0  # pure KL
    _, tokens = sweep.planned_steps_tokens(recipe.flags, recipe.train_blocks)
    assert tokens <= math.ceil(3 * sweep.SOTU_TRAIN_BLOCKS / parsed.per_device_train_batch_size) \
        * parsed.per_device_train_batch_size * 1024  # within 3 epochs of sotu/train


def test_a_renamed_flag_is_caught_before_anything_runs():
    assert "unrecognized arguments" in sweep.parse_problem(
        ["finetune", "--model_name_or_path", "m", "--output_dir", "o", "--no_such_flag"])


def test_overrides_replace_drop_and_add_flags():
    flags = sweep.apply_overrides({"max_steps": -1, "bf16": None, "mix_weights": "1,2"},
                                  ["max_steps=2", "mix_weights=", "do_eval"])
    assert flags == {"max_steps": "2", "bf16": None, "do_eval": None}
    assert sweep.flag_args(flags) == ["--max_steps", "2", "--bf16", "--do_eval"]


def _tiny_pruned(folder: Path, tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".layers." in name and p.ndim == 2:
                p[:16, :16] = 0  # one zero 16x16 tile per decoder linear
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder)
    (folder / "sparsity.json").write_text(json.dumps({"pattern": "16x16"}))


def test_zero_set_check_sees_one_filled_zero(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file, save_file

    base_dir, other_dir = tmp_path / "pruned", tmp_path / "merged"
    _tiny_pruned(base_dir, tiny_model_dir)
    base = sweep.zero_sets(base_dir)
    assert sweep.block_pattern(base_dir) == (16, 16)
    same = sweep.zero_set_check(base, (16, 16), base_dir)
    assert same["zero_set_equal"] is True and same["zero_tile_share"] > 0 and same["sparsity"] > 0
    other_dir.mkdir()
    for f in base_dir.iterdir():
        (other_dir / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(other_dir / "model.safetensors"))
    key = next(k for k in tensors if k.endswith("q_proj.weight"))
    tensors[key][0, 0] = 1.0
    save_file(tensors, str(other_dir / "model.safetensors"), metadata={"format": "pt"})
    assert sweep.zero_set_check(base, (16, 16), other_dir)["zero_set_equal"] is False


def test_a_recipe_spec_carries_its_own_flags_and_a_folder_name():
    assert sweep.parse_spec("kl-full-lr3e-3@learning_rate=2e-3@per_device_train_batch_size=8") == \
        ("kl-full-lr3e-3", ["learning_rate=2e-3", "per_device_train_batch_size=8"])
    assert sweep.parse_spec("kl-full-lr3e-3") == ("kl-full-lr3e-3", [])
    assert sweep.spec_label("kl-full-lr3e-3@learning_rate=2e-3") == "kl-full-lr3e-3_learning_rate-2e-3"
    flags = sweep.apply_overrides(sweep.RECIPES["kl-full-lr3e-3"].flags, ["learning_rate=2e-3"])
    assert flags["learning_rate"] == "2e-3" and flags["distill_alpha"] == "1"


def test_the_same_recipe_twice_is_refused(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "recover_sweep.py"), "--pruned", str(tmp_path / "p"),
                           "--out", str(tmp_path / "o"), "--recipes", "kl-full-lr3e-3,kl-full-lr3e-3"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2 and "named twice" in done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("parallel", [1, 2])
def test_the_sweep_runs_end_to_end_on_a_tiny_model(parallel, tmp_path, tiny_model_dir, corpus_file):
    pruned = tmp_path / "pruned"
    _tiny_pruned(pruned, tiny_model_dir)
    report = tmp_path / "report" / "sweep.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "recover_sweep.py"), "--pruned", str(pruned), "--dense",
         str(tiny_model_dir), "--out", str(tmp_path / "out"), "--json", str(report), "--budget_s", "600",
         "--recipes", "kl-full-lr3e-4@learning_rate=1e-3,kl-lora64-lr5e-4", "--parallel", str(parallel),
         "--no_pruned_eval", "--eval_dataset", str(corpus_file), "--eval_seqlen", "32", "--eval_windows", "2",
         "--set", f"dataset_name={corpus_file}", "--set", "block_size=32", "--set", "max_steps=2",
         "--set", "eval_steps=1", "--set", "max_eval_samples=2", "--set", "bf16=", "--set", "device=cpu"],
        capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(report.read_text())
    assert [r["status"] for r in result["recipes"]] == ["ok", "ok"], result["recipes"]
    for r in result["recipes"]:
        assert r["zero_set_equal"] is True and math.isfinite(r["test_ppl"]) and r["steps"] == 2
        assert r["eval_curve"] and r["command"].startswith("spruce finetune ")
    assert [r["name"] for r in result["recipes"]] == ["kl-full-lr3e-4_learning_rate-1e-3", "kl-lora64-lr5e-4"]
    assert "--learning_rate 1e-3" in result["recipes"][0]["command"]
    assert done.stdout.rstrip().splitlines()[-1].startswith("kl-lora64-lr5e-4")  # the table prints last
