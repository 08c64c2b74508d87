"""`spruce run` / `spruce demo`: shipped recipes, stages, resume, progressive rounds, reports."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from spruce.cli import main
from spruce.config import load_recipe, recipes_dir
from spruce.errors import SpruceError
from spruce.masks import zero_masks
from spruce.pipeline import run_recipe

RECIPES = sorted(recipes_dir().glob("*.yaml"))


def test_recipes_are_shipped():
    names = {p.name for p in RECIPES}
    assert {"smollm2-block16.yaml", "llama2-7b-block16-wikitext.yaml", "llama2-7b-block16-c4.yaml",
            "llama2-7b-block16-mix.yaml", "smollm2-hybrid-progressive.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_validates_and_names_its_command(path):
    cfg = load_recipe(path)
    assert path.read_text().splitlines()[0] == f"# spruce run recipes/{path.name}"
    assert cfg.prune.round_plan()[-1][0] == cfg.prune.sparsity


def tiny_overrides(tiny_model_dir, corpus_file, out, *extra, reference: bool = False):
    """Overrides that shrink a recipe to the tiny model; without `reference`, no prune_reference
    section (no reference stage)."""
    shrink_reference = ["prune_reference.nsamples=4", "prune_reference.seqlen=64", "prune_reference.batch_size=2"]
    return [f"model={tiny_model_dir}", f"output_dir={out}", "device=cpu", f"data.corpus={corpus_file}",
            "data.eval_seqlen=64", "data.eval_windows=6", "prune.nsamples=4", "prune.seqlen=64",
            "prune.batch_size=2", "recover.block_size=64", "recover.max_steps=40", "recover.learning_rate=0.003",
            "recover.batch_size=2", "recover.warmup_steps=4", "recover.max_eval_samples=4", "recover.lora_dropout=0",
            *(shrink_reference if reference else ["prune_reference=null"]), *extra]


def quiet(lines):
    return lambda line: lines.append(line)


def test_demo_recipe_end_to_end_on_a_tiny_model(tiny_model_dir, corpus_file, tmp_path):
    out = tmp_path / "run"
    cfg = load_recipe(recipes_dir() / "smollm2-block16.yaml",
                      tiny_overrides(tiny_model_dir, corpus_file, out, reference=True))
    assert cfg.prune_reference.method == "wanda" and cfg.prune.method != "wanda" and cfg.threads == 2
    lines = []
    results = run_recipe(cfg, say=quiet(lines), progress=False)
    for name in ["config.yaml", "metrics.jsonl", "report.md", "pruned/sparsity.json", "pruned/config.json",
                 "reference/sparsity.json", "reference/config.json",
                 "recover/adapter_config.json", "recover/merged/config.json", "recover/curves.png",
                 "plots/layer_sparsity.png", "stages/recover.json", "stages/reference.json"]:
        assert (out / name).exists(), name
    table = results["report"]["results"]
    assert list(table) == ["dense", "reference", "pruned", "recovered"]  # the table's rows, in order
    assert table["reference"]["sparsity"] == 0.5
    assert table["pruned"]["sparsity"] == 0.5 and table["recovered"]["sparsity"] == 0.5
    assert table["recovered"]["ppl"] < table["pruned"]["ppl"]
    assert results["recover"]["zero_set_unchanged"] is True
    merged = AutoModelForCausalLM.from_pretrained(out / "recover" / "merged")
    pruned = AutoModelForCausalLM.from_pretrained(out / "pruned")
    assert all(torch.equal(a, b) for a, b in zip(zero_masks(pruned).values(), zero_masks(merged).values()))
    reference = AutoModelForCausalLM.from_pretrained(out / "reference")
    assert not all(torch.equal(a, b) for a, b in zip(zero_masks(pruned).values(), zero_masks(reference).values()))
    labels = results["report"]["labels"]
    report = (out / "report.md").read_text()
    for key in table:
        assert f"| {labels[key]} |" in report
    assert "layer_sparsity.png" in report and "reference recipe's perplexity is" in report
    assert yaml.safe_load((out / "config.yaml").read_text())["prune"]["pattern"] == "16x16"

    # started again: every finished stage is skipped
    again = []
    run_recipe(cfg, say=quiet(again), progress=False)
    assert sum("skipped" in line for line in again) == 4

    # the reference is a side branch: changing it runs it alone again
    again = []
    cfg = load_recipe(recipes_dir() / "smollm2-block16.yaml",
                      tiny_overrides(tiny_model_dir, corpus_file, out, "prune_reference.sparsity=0.25", reference=True))
    results = run_recipe(cfg, say=quiet(again), progress=False)
    assert [line.split()[0] for line in again if "skipped" in line] == ["[baseline]", "[prune]", "[recover]"]
    assert results["report"]["results"]["reference"]["sparsity"] == 0.25


def test_the_demo_prune_stages_give_the_same_weights_in_two_fresh_processes(tiny_model_dir, corpus_file, tmp_path):
    # two processes started with different thread settings: the recipe's `threads` decides
    from safetensors.torch import load_file

    root = Path(__file__).resolve().parents[1]
    recipe = str(recipes_dir() / "smollm2-block16.yaml")
    procs = []
    for name, threads in (("a", "1"), ("b", "2")):
        argv = [sys.executable, "-m", "spruce.cli", "run", recipe,
                *tiny_overrides(tiny_model_dir, corpus_file, tmp_path / name, reference=True), "--stages", "reference",
                "prune"]
        env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": threads, "TQDM_DISABLE": "1"}
        procs.append(subprocess.Popen(argv, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    for folder in ("reference", "pruned"):
        a, b = (load_file(tmp_path / name / folder / "model.safetensors") for name in ("a", "b"))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), folder
    # and the same rows of the table, to the last bit
    for stage, row in (("reference", "reference"), ("prune", "pruned")):
        a, b = (json.loads((tmp_path / name / "stages" / f"{stage}.json").read_text())[row] for name in ("a", "b"))
        assert (a["ppl"], a["sparsity"]) == (b["ppl"], b["sparsity"]), stage


def test_distill_recipe_end_to_end_on_a_tiny_model(tiny_model_dir, corpus_file, tmp_path):
    # the shipped GPU recipe, shrunk: default 16x16 prune (obs + reconstruction), then masked full
    # fine-tuning distilled from the dense model under bf16 mixed precision
    out = tmp_path / "run"
    cfg = load_recipe(recipes_dir() / "smollm2-block16-distill.yaml",
                      tiny_overrides(tiny_model_dir, corpus_file, out, "recover.max_steps=6", "recover.eval_steps=3",
                                     "prune.options.permute=false", "prune.options.reconstruct_epochs=12",
                                     reference=True))
    # (permute off, and 12 epochs of reconstruction rather than the default 24: with either default this random
    # model's prune lands within 0.1 of dense, which leaves recovery nothing to do)
    assert cfg.prune.method is None and cfg.recover.bf16 and cfg.recover.distill_temperature == 1.0
    results = run_recipe(cfg, say=quiet([]), progress=False)
    info = yaml.safe_load((out / "pruned" / "sparsity.json").read_text())
    assert info["method"] == "obs" and info["reconstruct"]["lr"] == 3e-3 and info["reconstruct"]["epochs"] == 12
    assert results["recover"]["zero_set_unchanged"] is True
    merged = AutoModelForCausalLM.from_pretrained(out / "recover" / "merged")
    assert merged.dtype == torch.float32                    # float32 master weights, bf16 autocast
    table = results["report"]["results"]
    # pure KL pulls the student toward the teacher (a random tiny teacher is near uniform)
    dense = table["dense"]["ppl"]
    assert abs(table["recovered"]["ppl"] - dense) < abs(table["pruned"]["ppl"] - dense)


def test_interrupted_run_resumes_with_the_missing_stages(tiny_model_dir, corpus_file, tmp_path):
    out = tmp_path / "run"
    cfg = load_recipe(recipes_dir() / "smollm2-block16.yaml",
                      tiny_overrides(tiny_model_dir, corpus_file, out, "recover.max_steps=4"))
    run_recipe(cfg, say=quiet([]), progress=False, only=["baseline", "prune"])
    assert not (out / "stages" / "recover.json").exists()
    lines = []
    run_recipe(cfg, say=quiet(lines), progress=False)
    assert any(line.startswith("[baseline] done earlier") for line in lines)
    assert any(line.startswith("[prune] done earlier") for line in lines)
    assert (out / "stages" / "recover.json").exists()


def test_a_run_killed_while_saving_its_pruned_model_does_not_prune_again(tiny_model_dir, corpus_file, tmp_path,
                                                                         monkeypatch, capsys):
    from spruce.prune import run as prune_run  # the prune stage saves through run_prune
    from spruce.prune.state import state_folder

    out = tmp_path / "run"
    cfg = load_recipe(recipes_dir() / "smollm2-block16.yaml",
                      tiny_overrides(tiny_model_dir, corpus_file, out, "stages=[baseline, prune]"))

    def killed(*_args):
        raise KeyboardInterrupt

    real = prune_run.write_sparsity_json
    monkeypatch.setattr(prune_run, "write_sparsity_json", killed)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(cfg, say=quiet([]), progress=False)
    monkeypatch.setattr(prune_run, "write_sparsity_json", real)
    assert not (out / "pruned").exists() and (state_folder(out / "pruned") / "carry.pt").is_file()
    capsys.readouterr()
    run_recipe(cfg, say=quiet([]), progress=False)
    assert "all 2 layers were pruned before" in capsys.readouterr().err
    assert (out / "pruned" / "sparsity.json").is_file() and not state_folder(out / "pruned").exists()


def test_progressive_rounds_only_add_zeros(tiny_model_dir, corpus_file, tmp_path):
    out = tmp_path / "run"
    cfg = load_recipe(None, tiny_overrides(tiny_model_dir, corpus_file, out, "prune.pattern=hybrid:16x16",
                                           "prune.method=wanda", "prune.sparsity=0.3", "recover.max_steps=4",
                                           "prune.rounds=[{sparsity: 0.15, tiers: [0.6, 0.2]}, "
                                           "{sparsity: 0.3, tiers: [0.3, 0.4]}]", "stages=[baseline, prune]"))
    run_recipe(cfg, say=quiet([]), progress=False)
    first = zero_masks(AutoModelForCausalLM.from_pretrained(out / "rounds" / "round1-pruned"))
    final = zero_masks(AutoModelForCausalLM.from_pretrained(out / "pruned"))
    for name in first:
        assert torch.all(final[name] | ~first[name]), name  # every earlier zero is still zero
    assert sum(int(m.sum()) for m in final.values()) > sum(int(m.sum()) for m in first.values())


def test_compare_runs(capsys, tiny_model_dir, corpus_file, tmp_path):
    for name, extra in [("a", []), ("b", ["prune.pattern=unstructured"])]:
        cfg = load_recipe(recipes_dir() / "smollm2-block16.yaml",
                          tiny_overrides(tiny_model_dir, corpus_file, tmp_path / name, "recover.max_steps=2", *extra))
        run_recipe(cfg, say=quiet([]), progress=False)
    code = main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--json", str(tmp_path / "c.json")])
    out = capsys.readouterr().out
    assert code == 0 and out.count("\n| ") >= 3 and "16x16" in out and "unstructured" in out
    assert len(json.loads((tmp_path / "c.json").read_text())["runs"]) == 2


@pytest.mark.parametrize("override, message", [
    ("prune.sparsity=1.5", "prune.sparsity must be in [0, 1)"),
    ("prune.nosuch=1", "unknown key(s) prune.nosuch"),
    ("stages=[prune, deploy]", "unknown stage(s)"),
    ("recover.mode=qlora", "recover.mode must be"),
    ("prune.rounds=[0.3, 0.2]", "must not lower the sparsity"),
    ("prune.obs_max_inputs=-1", "prune.obs_max_inputs must be a whole number >= 0"),
    ("novalue", "is not key.sub=value"),
])
def test_bad_recipes(override, message):
    with pytest.raises(SpruceError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        load_recipe(recipes_dir() / "smollm2-block16.yaml", [override])


def test_editing_one_line_reruns_only_what_it_touches(tiny_model_dir, corpus_file, tmp_path):
    recipe = recipes_dir() / "smollm2-block16.yaml"
    base = tiny_overrides(tiny_model_dir, corpus_file, tmp_path / "run", "recover.max_steps=4")
    run_recipe(load_recipe(recipe, base), say=quiet([]), progress=False)
    lines = []
    results = run_recipe(load_recipe(recipe, [*base, "recover.learning_rate=0.01"]), say=quiet(lines), progress=False)
    assert any(line.startswith("[baseline] done earlier") for line in lines)
    assert any(line.startswith("[prune] done earlier") for line in lines)
    assert not any(line.startswith("[recover] done earlier") for line in lines)
    assert results["recover"]["inputs"]["recover"]["learning_rate"] == 0.01
    lines = []
    run_recipe(load_recipe(recipe, [*base, "recover.learning_rate=0.01", "prune.sparsity=0.25"]),
               say=quiet(lines), progress=False)
    assert sum("done earlier" in line for line in lines) == 1  # only the baseline is kept


def test_changing_only_the_evaluation_measures_the_saved_models_again(tiny_model_dir, corpus_file, tmp_path):
    recipe = recipes_dir() / "smollm2-block16.yaml"
    out = tmp_path / "run"
    base = tiny_overrides(tiny_model_dir, corpus_file, out, "recover.max_steps=4")
    first = run_recipe(load_recipe(recipe, base), say=quiet([]), progress=False)
    weights = sorted((out / "pruned").glob("*.safetensors")) + sorted((out / "recover" / "merged").glob("*.safetensors"))
    stamps = [p.stat().st_mtime_ns for p in weights]
    lines = []
    again = run_recipe(load_recipe(recipe, [*base, "data.eval_windows=3"]), say=quiet(lines), progress=False)
    for stage in ("prune", "recover"):
        assert any(line.startswith(f"[{stage}] done earlier with other evaluation settings") for line in lines)
    assert len(weights) >= 2 and [p.stat().st_mtime_ns for p in weights] == stamps  # nothing pruned or trained again
    assert (first["prune"]["pruned"]["windows"], again["prune"]["pruned"]["windows"]) == (6, 3)
    assert again["recover"]["recovered"]["windows"] == again["baseline"]["dense"]["windows"] == 3
    assert again["recover"]["train"] == first["recover"]["train"]
    assert again["prune"]["inputs"]["data"]["eval_windows"] == 3
    report = (out / "report.md").read_text()
    assert f"{again['prune']['pruned']['ppl']:.2f}" in report and f"{again['recover']['recovered']['ppl']:.2f}" in report
    # the same settings again: every stage is skipped; the calibration corpus is a work input
    lines = []
    run_recipe(load_recipe(recipe, [*base, "data.eval_windows=3"]), say=quiet(lines), progress=False)
    assert sum("done earlier; skipped" in line for line in lines) == 3
    lines = []
    run_recipe(load_recipe(recipe, [*base, "data.eval_windows=3", "prune.nsamples=2"]), say=quiet(lines),
               progress=False)
    assert not any("[prune] done earlier" in line or "[recover] done earlier" in line for line in lines)


def test_interrupted_recovery_resumes_from_its_checkpoint(tiny_model_dir, corpus_file, tmp_path):
    recipe = recipes_dir() / "smollm2-block16.yaml"
    cfg = load_recipe(recipe, tiny_overrides(tiny_model_dir, corpus_file, tmp_path / "run",
                                             "recover.max_steps=6", "recover.save_steps=3"))
    run_recipe(cfg, say=quiet([]), progress=False)
    # as if killed after the checkpoint at step 3: no marker, no final outputs, no later checkpoint
    import shutil

    (tmp_path / "run" / "stages" / "recover.json").unlink()
    shutil.rmtree(tmp_path / "run" / "recover" / "checkpoint-6")
    lines = []
    run_recipe(cfg, say=quiet(lines), progress=False)
    assert any("resumed from" in line and "checkpoint-3" in line for line in lines), lines


def test_fresh_starts_over(capsys, tiny_model_dir, corpus_file, tmp_path):
    base = tiny_overrides(tiny_model_dir, corpus_file, tmp_path / "run", "stages=[baseline]")
    recipe = str(recipes_dir() / "smollm2-block16.yaml")
    assert main(["run", recipe, *base]) == 0
    assert main(["run", recipe, *base]) == 0 and "done earlier" in capsys.readouterr().out
    assert main(["run", recipe, *base, "--fresh"]) == 0 and "done earlier" not in capsys.readouterr().out


def test_prune_obs_max_inputs_reaches_the_default_block_recipe(tiny_model_dir, corpus_file, tmp_path):
    out = tmp_path / "run"
    cfg = load_recipe(None, tiny_overrides(tiny_model_dir, corpus_file, out, "stages=[prune]",
                                           "prune.obs_max_inputs=0", "prune.options={reconstruct_epochs: 1}"))
    with pytest.warns(UserWarning, match="does not scale"):
        run_recipe(cfg, say=quiet([]), progress=False)
    info = json.loads((out / "pruned" / "sparsity.json").read_text())
    assert info["method"] == "sparsegpt" and info["measured_sparsity"] == 0.5


def test_a_run_computes_with_the_recipes_thread_count_and_restores_it(tmp_path, monkeypatch):
    from spruce import pipeline

    seen = {}

    def stage(run):
        seen.update(threads=torch.get_num_threads(), deterministic=torch.are_deterministic_algorithms_enabled())
        return {}

    monkeypatch.setitem(pipeline.STAGE_FUNCTIONS, "baseline", stage)
    before = torch.get_num_threads()
    want = 1 if before != 1 else 2
    cfg = load_recipe(None, [f"output_dir={tmp_path / 'run'}", "device=cpu", f"threads={want}", "stages=[baseline]"])
    run_recipe(cfg, say=quiet([]), progress=False)
    assert seen == {"threads": want, "deterministic": True}
    assert torch.get_num_threads() == before and not torch.are_deterministic_algorithms_enabled()


@pytest.mark.parametrize("device, recipe, says", [("cpu", "smollm2-block16.yaml", "CPU-sized"),
                                                  ("cuda", "smollm2-block16-distill.yaml", "full-size")])
def test_demo_runs_the_full_size_recipe_on_a_gpu(device, recipe, says, monkeypatch, capsys):
    from spruce import models
    from spruce.cli import demo as cli_demo

    seen = {}
    monkeypatch.setattr(models, "resolve_device", lambda name: torch.device(device))
    monkeypatch.setattr(cli_demo, "run_and_show", lambda cfg, fresh: seen.update(cfg=cfg))
    assert main(["demo"]) == 0
    cfg = seen["cfg"]
    assert cfg.output_dir == load_recipe(recipes_dir() / recipe).output_dir and says in capsys.readouterr().out
    assert cfg.prune_reference is not None and cfg.prune_reference.method == "wanda"
    if device == "cuda":
        assert cfg.prune.nsamples == 128 and cfg.data.eval_windows is None and cfg.recover.teacher
