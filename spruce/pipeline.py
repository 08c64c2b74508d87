"""`spruce run RECIPE.yaml`: baseline -> prune -> recover -> report, one stage at a time.

    spruce run recipes/smollm2-block16.yaml recover.max_steps=300
    spruce demo                       # the shipped smollm2-block16 recipe, sized for 2 CPU cores

Each stage writes its outputs into the run folder and then a marker `stages/<stage>.json` with
its results and the parts of the recipe it depends on. A stage finished with the same inputs is
not run again, so an interrupted run picks up where it stopped (training resumes from its last
checkpoint), and after editing one line of a recipe only the stages it touches run again. A
finished stage whose recipe changed only in how models are measured (EVAL_FIELDS: the evaluation
split, seqlen, windows, held-out corpus, zero-shot tasks) measures its saved model again instead:
a new evaluation never prunes or trains again. The resolved recipe is saved as config.yaml. Stages:

  baseline  perplexity of the dense model, on data.corpus and (held out) on data.heldout; every
            later model is measured on both
  reference (with a prune_reference section) a second prune recipe, one-shot -> reference/, its
            perplexity: the row that `prune` is compared against (nothing later reads it)
  prune     layer-by-layer pruning -> pruned/ (safetensors with zeros + sparsity.json), its perplexity;
            with prune.rounds, progressive rounds of prune -> recover, each round's zero set a
            superset of the last
  recover   fine-tuning (spruce finetune) -> recover/ (adapter or model, checkpoints, curves) and
            recover/merged/ (zero set kept), its perplexity
  report    report.md with the table, per-layer sparsity and training curves
"""

from __future__ import annotations

import json
import random
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import yaml

from . import data, generated
from .config import RunConfig
from .errors import SpruceError
from .evaluate import perplexity
from .masks import overall_sparsity, read_sparsity_json, zero_masks
from .models import load_model, resolve_device
from .outdir import write_json
from .report import MetricsLog, versions, write_run_report


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


@contextmanager
def reproducible(threads: int | None, deterministic: bool = True):
    """Settings under which a run gives the same numbers every time: `threads` CPU threads (a sum
    split over threads is added in an order that depends on their count), torch's deterministic
    algorithms where it has them (`deterministic`; warn_only: an op without one runs and warns),
    no cuDNN autotuning. The previous settings come back afterwards."""
    before = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled(), torch.backends.cudnn.benchmark)
    if threads:
        torch.set_num_threads(threads)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.set_num_threads(before[0])
        torch.use_deterministic_algorithms(before[1], warn_only=before[2])
        torch.backends.cudnn.benchmark = before[3]


class Run:
    """A run folder: config, stage markers, metrics."""

    def __init__(self, cfg: RunConfig, say=print, progress: bool = True):
        self.cfg, self.say, self.progress = cfg, say, progress
        self.dir = Path(cfg.output_dir)
        self.device = resolve_device(cfg.device)
        self._windows = None
        self._heldout_windows = None
        self.resume = False

    def start(self, fresh: bool) -> None:
        if self.cfg.data.zero_shot_tasks:
            from .evaluate import require_lm_eval

            require_lm_eval()
        saved = self.dir / "config.yaml"
        if fresh and self.dir.exists():
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "stages").mkdir(exist_ok=True)
        saved.write_text(yaml.safe_dump({**self.cfg.to_dict(), "versions": versions()}, sort_keys=False))
        self.log = MetricsLog(self.dir / "metrics.jsonl")

    def done(self, stage: str) -> dict | None:
        marker = self.dir / "stages" / f"{stage}.json"
        return json.loads(marker.read_text()) if marker.exists() else None

    def begin(self, stage: str, inputs: dict) -> bool:
        """Record that `stage` starts with `inputs`; True when an earlier attempt with the same
        inputs was interrupted (its partial outputs, such as checkpoints, may be resumed)."""
        path = self.dir / "stages" / f"{stage}.inputs.json"
        same = path.exists() and json.loads(path.read_text()) == inputs
        path.write_text(json.dumps(inputs, indent=2) + "\n")
        return same

    def mark(self, stage: str, result: dict) -> dict:
        write_json(self.dir / "stages" / f"{stage}.json", result)
        self.log.write({"event": "stage", "stage": stage, **{k: v for k, v in result.items() if not isinstance(v, dict)}})
        return result

    def windows(self, tok) -> torch.Tensor:
        d = self.cfg.data
        if self._windows is None:
            all_windows = data.eval_windows(d.corpus, d.eval_split, tok, d.eval_seqlen)
            self.total_windows = all_windows.shape[0]
            self._windows = all_windows[: d.eval_windows] if d.eval_windows else all_windows
        return self._windows

    def heldout_windows(self, tok) -> torch.Tensor | None:
        """Windows of data.heldout, cut like the in-domain ones (same split, seqlen and count)."""
        d = self.cfg.data
        if d.heldout and self._heldout_windows is None:
            self._heldout_windows = data.eval_windows(d.heldout, d.eval_split, tok, d.eval_seqlen, d.eval_windows)
        return self._heldout_windows

    def load(self, source: str, dtype: str | None = None):
        return load_model(source, device=self.device, dtype=dtype or self.cfg.dtype)

    def evaluate(self, stage: str, model, tok) -> dict:
        windows = self.windows(tok)
        result = perplexity(model, windows, progress=self.progress, desc=f"{stage} perplexity")
        result["sparsity"] = overall_sparsity(model)
        heldout = self.heldout_windows(tok)
        if heldout is not None:
            result["heldout"] = {"corpus": self.cfg.data.heldout, **perplexity(
                model, heldout, progress=self.progress, desc=f"{stage} held-out perplexity")}
        if self.cfg.data.zero_shot_tasks:
            from .evaluate import zero_shot

            result["zero_shot"] = zero_shot(model, tok, self.cfg.data.zero_shot_tasks)
        self.log.write({"event": "eval", "stage": stage, **result})
        return result


def stage_baseline(run: Run) -> dict:
    model, tok = run.load(run.cfg.model)
    windows = run.windows(tok)
    d = run.cfg.data
    run.say(f"[baseline] {run.cfg.model} on {run.device}: perplexity on {d.corpus}/{d.eval_split}, "
            f"{windows.shape[0]} of {run.total_windows} windows of {d.eval_seqlen} tokens"
            + (" (a full run uses all of them)" if windows.shape[0] < run.total_windows else ""))
    result = run.evaluate("dense", model, tok)
    run.say(f"[baseline] dense perplexity: {result['ppl']:.2f}" + _heldout_note(run, result))
    return {"dense": result}


def _heldout_note(run: Run, result: dict) -> str:
    """'; held-out moby/test: 41.2 (1.8x dense)' for a say line, or '' without data.heldout."""
    held = result.get("heldout")
    if not held:
        return ""
    dense = ((run.done("baseline") or {}).get("dense") or {}).get("heldout")
    ratio = f" ({held['ppl'] / dense['ppl']:.1f}x dense)" if dense and dense["corpus"] == held["corpus"] else ""
    return f"; held-out {held['corpus']}/{run.cfg.data.eval_split}: {held['ppl']:.2f}{ratio}"


def stage_prune(run: Run) -> dict:
    from .prune.defaults import resolve_recipe
    from .prune.run import run_prune

    p, cfg = run.cfg.prune, run.cfg
    rounds = p.round_plan()
    source = cfg.model
    results = {}
    for i, (sparsity, options) in enumerate(rounds, 1):
        tag = f"round {i}/{len(rounds)}: " if len(rounds) > 1 else ""
        model, tok = run.load(source)
        previous = zero_masks(model) if i > 1 else None
        run.say(f"[prune] {tag}{p.method or 'default recipe'}, {p.pattern}, {sparsity:.0%} sparsity, "
                f"{p.nsamples} calibration samples of {p.seqlen} tokens"
                + (f", options {options}" if options else ""))
        folder = run.dir / ("pruned" if i == len(rounds) else f"rounds/round{i}-pruned")
        given = p.given(options)
        if i > 1:   # round 1 ordered the MLP features; the earlier zeros (_keep_superset) are kept in that order
            given["permute"] = False
        recipe = resolve_recipe(p.pattern, **given)
        # a killed run continues from its last saved layer (the state folder beside `folder`)
        run_prune(model, tok, recipe, p.pattern, sparsity, cfg.data.corpus, cfg.seed, out_dir=folder,
                  device=run.device, progress=run.progress, recipe=cfg.to_dict(), seqlen_name="prune.seqlen",
                  adjust=None if previous is None else lambda m, info: _keep_superset(m, previous, info))
        result = run.evaluate("pruned" if i == len(rounds) else f"round{i}-pruned", model, tok)
        ratio = result["ppl"] / run.done("baseline")["dense"]["ppl"] if run.done("baseline") else None
        run.say(f"[prune] {tag}pruned perplexity: {result['ppl']:.2f}"
                + (f" ({ratio:.1f}x dense)" if ratio else "") + f" at {result['sparsity']:.1%} sparsity"
                + _heldout_note(run, result))
        results[f"round{i}" if len(rounds) > 1 else "pruned"] = result
        if i < len(rounds):
            summary = _recover(run, folder, run.dir / "rounds" / f"round{i}-recover", quiet=True)
            source = str(run.dir / "rounds" / f"round{i}-recover" / "merged")
            run.say(f"[prune] round {i} recovered: eval perplexity {summary['eval_after']['eval_ppl']:.2f}")
    results["pruned"] = results.get("pruned") or results[f"round{len(rounds)}"]
    return results


def stage_reference(run: Run) -> dict:
    """The prune_reference recipe, one-shot, saved to reference/ and evaluated."""
    from .prune.defaults import resolve_recipe
    from .prune.run import run_prune

    p, cfg = run.cfg.prune_reference, run.cfg
    model, tok = run.load(cfg.model)
    run.say(f"[reference] {p.method or 'default recipe'}, {p.pattern}, {p.sparsity:.0%} sparsity, "
            f"{p.nsamples} calibration samples of {p.seqlen} tokens" + (f", options {p.options}" if p.options else ""))
    recipe = resolve_recipe(p.pattern, **p.given(dict(p.options)))
    run_prune(model, tok, recipe, p.pattern, p.sparsity, cfg.data.corpus, cfg.seed, out_dir=run.dir / "reference",
              device=run.device, progress=run.progress, recipe=cfg.to_dict(), seqlen_name="prune_reference.seqlen")
    result = run.evaluate("reference", model, tok)
    baseline = run.done("baseline")
    ratio = f" ({result['ppl'] / baseline['dense']['ppl']:.1f}x dense)" if baseline else ""
    run.say(f"[reference] one-shot perplexity: {result['ppl']:.2f}{ratio} at {result['sparsity']:.1%} sparsity"
            + _heldout_note(run, result))
    return {"reference": result}


@torch.no_grad()
def _keep_superset(model, previous: dict[str, torch.Tensor], info: dict) -> None:
    """Progressive rounds only add zeros: weights pruned in an earlier round stay zero."""
    from .models import prunable_linears

    for name, module in prunable_linears(model).items():
        module.weight.masked_fill_(previous[name].to(module.weight.device), 0)
    info["measured_sparsity"] = overall_sparsity(model)


def _recover(run: Run, model_dir: Path, out_dir: Path, quiet: bool = False) -> dict:
    from .recover.args import FinetuneArgs
    from .recover.checkpoint import run_checkpoints
    from .recover.finetune import run_finetune

    r, cfg = run.cfg.recover, run.cfg
    resume = run.resume and bool(run_checkpoints(out_dir))
    if not resume and out_dir.exists():
        shutil.rmtree(out_dir)  # outputs of other inputs: never resume or mix with them
    args = FinetuneArgs(
        model_name_or_path=str(model_dir), output_dir=str(out_dir), device=cfg.device,
        dtype=r.dtype or cfg.dtype, bf16=r.bf16, dataset_name=r.corpus or cfg.data.corpus,
        heldout_dataset=cfg.data.heldout,
        block_size=r.block_size, max_train_samples=r.max_train_samples, max_eval_samples=r.max_eval_samples,
        do_train=True, do_eval=True, mode=r.mode, num_train_epochs=r.num_train_epochs,
        max_steps=r.max_steps or -1, per_device_train_batch_size=r.batch_size,
        gradient_accumulation_steps=r.gradient_accumulation_steps, learning_rate=r.learning_rate,
        warmup_steps=r.warmup_steps, lr_scheduler_type=r.lr_scheduler_type, seed=cfg.seed,
        lora_r=r.lora_r, lora_alpha=r.lora_alpha, lora_dropout=r.lora_dropout,
        lora_target_modules=r.lora_target_modules, teacher_model=cfg.model if r.teacher else None,
        distill_alpha=r.distill_alpha, distill_temperature=r.distill_temperature,
        distill_hidden_weight=r.distill_hidden, overwrite_output_dir=True, logging_steps=r.logging_steps,
        eval_steps=r.eval_steps, save_steps=r.save_steps, save_total_limit=2,
        resume_from_checkpoint="latest" if resume else None, merge=True,
        **generated.finetune_fields(r.generated, cfg.model, run.dir / "generated"))
    return run_finetune(args, say=(lambda *_: None) if quiet else (lambda line: run.say(f"[recover] {line}")))


def stage_recover(run: Run) -> dict:
    r = run.cfg.recover
    pruned = run.dir / "pruned"
    if not (pruned / "config.json").exists():
        raise SpruceError(f"{pruned} is missing: run the prune stage first")
    run.say(f"[recover] {r.mode}" + (f" r={r.lora_r} on {r.lora_target_modules}" if r.mode != "full" else "")
            + f", lr {r.learning_rate:g}, blocks of {r.block_size} tokens"
            + (f", {r.max_steps} steps" if r.max_steps else f", {r.num_train_epochs:g} epochs")
            + (", distilled from the dense model" if r.teacher else ""))
    summary = _recover(run, pruned, run.dir / "recover")
    merged, tok = run.load(str(run.dir / "recover" / "merged"))
    kept = summary["merged_zero_set_unchanged"]  # checked against the pruned weights at merge time
    result = run.evaluate("recovered", merged, tok)
    run.say(f"[recover] recovered perplexity: {result['ppl']:.2f} (merged model, zero set unchanged: {kept})"
            + _heldout_note(run, result))
    return {"recovered": result, "zero_set_unchanged": kept, "train": {k: summary.get(k) for k in
            ("steps", "train_seconds", "final_train_loss", "eval_before", "eval_after", "best_eval")}}


RESULT_STAGES = {"dense": "baseline", "reference": "reference", "pruned": "prune", "recovered": "recover"}


def row_labels(cfg: RunConfig) -> dict[str, str]:
    """Row names of the table: a prune section's label where it has one."""
    recovered = cfg.recover.label or (f"recovered ({cfg.recover.mode}" + (", distilled" if cfg.recover.teacher else "")
                                      + ", merged)")
    return {"dense": "dense", "reference": (cfg.prune_reference.label if cfg.prune_reference else None) or "reference",
            "pruned": cfg.prune.label or "pruned", "recovered": recovered}


def stage_report(run: Run) -> dict:
    results = {}
    for key, stage in RESULT_STAGES.items():  # the table's row order
        marker = run.done(stage) or {}
        if key in marker and (stage != "reference" or run.cfg.prune_reference is not None):
            results[key] = marker[key]
    labels = row_labels(run.cfg)
    sparsity = read_sparsity_json(run.dir / "pruned") if (run.dir / "pruned").exists() else None
    write_run_report(run.dir, run.cfg.to_dict(), results, sparsity, _stage_seconds(run), labels=labels)
    run.say(f"[report] {run.dir / 'report.md'}")
    return {"results": results, "labels": {k: labels[k] for k in results}}


def _stage_seconds(run: Run) -> dict:
    return {s: (run.done(s) or {}).get("seconds") for s in ("baseline", "reference", "prune", "recover")}


STAGE_FUNCTIONS = {"baseline": stage_baseline, "reference": stage_reference, "prune": stage_prune,
                   "recover": stage_recover, "report": stage_report}
# stages whose outputs no later stage reads: running one again does not run the later ones again
SIDE_STAGES = {"reference"}
# data fields that only say how a stage's model is measured: a finished stage whose other inputs are
# the same measures its saved model again instead of running again (for recover, the held-out corpus
# also gives its validation blocks, so there it stays an input of the work)
EVAL_FIELDS = ("eval_split", "eval_seqlen", "eval_windows", "zero_shot_tasks", "heldout")
# the stages that can be measured again: the saved model's folder and the result's key
SAVED_MODELS = {"reference": ("reference", "reference"), "prune": ("pruned", "pruned"),
                "recover": ("recover/merged", "recovered")}


def work_inputs(inputs: dict, stage: str) -> dict:
    """A stage's inputs (stage_inputs) without the data fields that only choose its evaluation."""
    fields = [f for f in EVAL_FIELDS if not (stage == "recover" and f == "heldout")]
    return {**inputs, "data": {k: v for k, v in (inputs.get("data") or {}).items() if k not in fields}}


def measure_again(run: Run, stage: str, done: dict) -> dict | None:
    """The finished stage's result with its saved model measured under the recipe's evaluation
    settings; None where that cannot stand in for running the stage (the baseline, which is only a
    measurement, progressive rounds, a saved model that is missing)."""
    if stage not in SAVED_MODELS or (stage == "prune" and run.cfg.prune.rounds):
        return None
    folder, key = SAVED_MODELS[stage]
    if not (run.dir / folder / "config.json").exists():
        return None
    run.say(f"[{stage}] done earlier with other evaluation settings; measuring {run.dir / folder} again")
    model, tok = run.load(str(run.dir / folder))
    result = run.evaluate(key, model, tok)
    run.say(f"[{stage}] {key} perplexity: {result['ppl']:.2f}" + _heldout_note(run, result))
    return {**{k: v for k, v in done.items() if k not in ("seconds", "inputs")}, key: result}


def stage_inputs(cfg: RunConfig, stage: str) -> dict:
    """The parts of the recipe a stage's result depends on: change one and the stage (and every
    later stage) runs again; change nothing and a finished stage is skipped."""
    c = cfg.to_dict()
    for section in ("prune", "prune_reference", "recover"):   # a row's name changes no result
        if c[section]:
            c[section].pop("label")
    inputs = {"model": c["model"], "dtype": c["dtype"], "data": c["data"]}
    if stage == "reference":
        inputs.update(seed=c["seed"], prune_reference=c["prune_reference"])
    if stage in ("prune", "recover"):
        inputs.update(seed=c["seed"], prune=c["prune"])
        if stage == "recover" or c["prune"]["rounds"]:
            inputs["recover"] = c["recover"]
    return inputs


def run_recipe(cfg: RunConfig, fresh: bool = False, say=print, progress: bool = True,
               only: list[str] | None = None) -> dict:
    """Run the stages of `cfg` in order, skipping those finished with the same inputs; return
    {stage: result}. Every stage starts from the seed, under `reproducible(cfg.threads)`, so a
    stage gives the same result whether it runs alone or after the others."""
    # on a GPU, deterministic kernels are left to the user: several (index_add, scatter) would warn
    # on every run, and none of them is needed for the CPU demo's numbers
    with reproducible(cfg.threads, deterministic=resolve_device(cfg.device).type == "cpu"):
        run = Run(cfg, say, progress)
        run.start(fresh)
        results, rerun = {}, False
        for stage in cfg.active_stages(only):
            inputs = stage_inputs(cfg, stage)
            done = run.done(stage)
            if stage != "report" and not rerun and done and done.get("inputs") == inputs:
                say(f"[{stage}] done earlier; skipped (results in {run.dir / 'stages' / (stage + '.json')})")
                results[stage] = done
                continue
            same_work = bool(done) and work_inputs(done.get("inputs") or {}, stage) == work_inputs(inputs, stage)
            again = measure_again(run, stage, done) if same_work and not rerun else None
            if again is not None:
                again.update(seconds=done.get("seconds"), inputs=inputs)
                results[stage] = run.mark(stage, again)
                continue
            # a stage that runs again makes the later ones run again, unless it only measures anew
            rerun = rerun or (stage not in SIDE_STAGES and not (same_work and stage == "baseline"))
            run.resume = run.begin(stage, inputs) and done is None
            seed_everything(cfg.seed)
            start = time.time()
            result = STAGE_FUNCTIONS[stage](run)
            result.update(seconds=round(time.time() - start, 1), inputs=inputs)
            results[stage] = run.mark(stage, result)
    return results
