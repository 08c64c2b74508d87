"""`spruce demo`: dense perplexity -> 16x16 Wanda pruning -> LoRA recovery -> perplexity.

    spruce demo                       # the embedded model and corpus, about 10 minutes on 2 CPU cores

Writes a run folder (config.yaml, metrics.jsonl, report.md, plots/, pruned/, adapter/) that
appears only once the run has finished.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch

from . import data
from .config import RunConfig
from .evaluate import perplexity
from .masks import overall_sparsity, write_sparsity_json, zero_masks
from .models import load_model, resolve_device, save_model
from .outdir import atomic_dir
from .prune import prune_model
from .recover.lora import attach_lora
from .recover.train import TrainArgs, train
from .report import MetricsLog, write_config, write_report


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def run_demo(cfg: RunConfig, out_dir: str | Path, progress: bool = True, say=print) -> dict:
    """Run the whole demo path; return {stage: perplexity result}."""
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    d, p, lo = cfg.data, cfg.prune, cfg.lora
    results: dict[str, dict] = {}
    t0 = time.time()
    with atomic_dir(out_dir) as run:
        write_config(run, cfg.to_dict())
        log = MetricsLog(run / "metrics.jsonl")

        say(f"[1/5] loading {cfg.model} on {device} ({cfg.dtype})")
        model, tok = load_model(cfg.model, device=device, dtype=cfg.dtype)
        windows = data.eval_windows(d.corpus, d.eval_split, tok, d.eval_seqlen)
        total_windows = windows.shape[0]
        windows = windows[: d.eval_windows] if d.eval_windows else windows
        say(f"      evaluating on {d.corpus}/{d.eval_split}: the first {windows.shape[0]} of "
            f"{total_windows} windows of {d.eval_seqlen} tokens (a full run uses all of them)")

        def evaluate(stage: str, m) -> dict:
            r = perplexity(m, windows, progress=progress, desc=f"{stage} perplexity")
            r["sparsity"] = overall_sparsity(m)
            results[stage] = r
            log.write({"event": "eval", "stage": stage, **r})
            return r

        r = evaluate("dense", model)
        say(f"      dense perplexity: {r['ppl']:.2f}")

        say(f"[2/5] pruning: {p.method}, {p.pattern} blocks chosen by mean block score with one "
            f"threshold per matrix (the reference recipe), {p.sparsity:.0%} sparsity, "
            f"{p.nsamples} calibration samples of {p.seqlen} tokens (a full run uses 128)")
        samples = data.calibration_samples(d.corpus, tok, p.nsamples, p.seqlen, seed=cfg.seed)
        info = prune_model(model, p.method, p.pattern, p.sparsity, samples=samples, device=device,
                           batch_size=p.batch_size, progress=progress)
        info["recipe"] = cfg.to_dict()
        log.write({"event": "prune", **{k: v for k, v in info.items() if k not in ("layers", "recipe")}})
        with atomic_dir(run / "pruned") as folder:
            save_model(model, tok, folder)
            write_sparsity_json(folder, info)
        r = evaluate("pruned", model)
        say(f"      pruned perplexity: {r['ppl']:.2f} ({r['ppl'] / results['dense']['ppl']:.0f}x dense) "
            f"at {r['sparsity']:.1%} sparsity: the block pattern collapses the model")

        say(f"[3/5] LoRA recovery: r={lo.r} on {lo.target_modules}, {lo.steps} steps of "
            f"{lo.batch_size}x{lo.block_size} tokens, lr {lo.lr:g} (a full run trains an epoch of 1024-token blocks)")
        before = zero_masks(model)
        blocks = data.training_blocks(d.corpus, tok, lo.block_size, seed=cfg.seed)
        peft_model = attach_lora(model, lo.r, lo.alpha, lo.dropout, lo.target_modules)
        args = TrainArgs(steps=lo.steps, lr=lo.lr, batch_size=lo.batch_size, warmup_steps=lo.warmup,
                         scheduler="cosine", seed=cfg.seed, logging_steps=20)
        result = train(peft_model, blocks, args, on_event=log.write, say=lambda line: say(f"      {line}"),
                       progress=progress)
        rows = result.monitor.train
        peft_model.save_pretrained(run / "adapter")

        say("[4/5] evaluating the recovered model (pruned base + adapter)")
        r = evaluate("recovered (LoRA)", peft_model)
        after = zero_masks(peft_model)
        unchanged = before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)
        say(f"      recovered perplexity: {r['ppl']:.2f}; pruned base weights unchanged: {unchanged}")

        say(f"[5/5] writing the run folder {out_dir}")
        notes = [
            f"Pruned with {p.method}, {p.pattern}, target {p.sparsity:.0%}, {p.nsamples} calibration "
            f"samples x {p.seqlen} tokens of {d.corpus}/train (seed {cfg.seed}).",
            f"LoRA r={lo.r}, alpha={lo.alpha}, dropout={lo.dropout} on {lo.target_modules}; "
            f"{lo.steps} steps of {lo.batch_size}x{lo.block_size} tokens at lr {lo.lr:g}.",
            "The adapter is kept separate: the pruned base weights (and their zeros) stay frozen "
            f"(zero set unchanged: {unchanged}).",
            f"Demo sizes: {windows.shape[0]} of {total_windows} evaluation windows; numbers are "
            "not comparable with full runs. The dense baseline is a dequantized Q4_1 model.",
            f"Total time {time.time() - t0:.0f} s on {device}.",
        ]
        write_report(run, "spruce demo: 16x16 block pruning and LoRA recovery", cfg.to_dict(),
                     results, rows, notes)
    return results

