"""python -m bench.recover_sweep --pruned out/pruned --out /tmp/sweep --json sweep.json --budget_s 540

Recovery recipes for a 50% 16x16 model, measured one after another inside one time budget.
Each recipe is one `spruce finetune ... --merge` command (run as a subprocess, so the command in
the results is the one that ran) followed by `spruce eval` of the merged model on sotu/test,
seqlen 1024, all 146 windows. The zero set of every merged model is compared with the pruned
model's, bit for bit, from the safetensors files.

Recipes run in the order given (by default best expected first); `NAME@flag=value@...` runs a
recipe with some of its finetune flags changed (`kl-full-lr3e-3@learning_rate=2e-3`), and
`--parallel N` runs N recipes side by side (each then logs to OUT/NAME.log). A recipe starts only
when the budget left covers its estimated time: training tokens / tokens/s measured on the
previous recipe (scaled by its relative cost per token, and by N) plus the fixed costs measured
there. The JSON is rewritten after every step, so it is complete whenever the script stops; the
table prints last.

With --speed, bench/bench_train.py (HF Trainer + peft at batch 1 against spruce's loop, LoRA on
the real pruned model, same blocks) runs first and its rows go into the same JSON.
If --pruned does not exist, `spruce prune --prune_args ... --save_model PRUNED` makes it first.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SOTU_TRAIN_BLOCKS = 1842   # sotu/train in 1024-token blocks (SmolLM2 tokenizer)
MOBY_TRAIN_BLOCKS = 248    # moby/train likewise
EPOCHS = 3                 # the issue's budget: 3 epochs of sotu/train
BATCH = 16
HALF_EPOCH_STEPS = math.ceil(SOTU_TRAIN_BLOCKS / BATCH / 2)
DENSE_PPL = 22.715         # smollm2-135m fp32, sotu/test, seqlen 1024, 146 windows (docs/RESULTS.md)
PRUNE_ARGS = "--model smollm2-135m --sparsity_type 16x16 --sparsity_ratio 0.5 --nsamples 128 --seqlen 1024 --calib_dataset sotu"

# flags every recipe shares: bf16, half-epoch evaluations on 16 validation blocks, best model kept, merged
COMMON = {"dataset_name": "sotu", "do_train": None, "do_eval": None, "block_size": 1024,
          "per_device_train_batch_size": BATCH, "per_device_eval_batch_size": 16, "max_eval_samples": 16,
          "logging_steps": 10, "eval_steps": HALF_EPOCH_STEPS, "save_total_limit": 1,
          "load_best_model_at_end": None, "bf16": None, "merge": None, "overwrite_output_dir": None}
KL = {"distill_alpha": "1", "distill_temperature": "1"}   # pure KL to the dense teacher's distribution
COSINE = {"lr_scheduler_type": "cosine", "warmup_steps": 20}
HIDDEN = {"distill_hidden_weight": "1"}   # plus the per-layer hidden-state error to the teacher


@dataclass
class Recipe:
    what: str
    flags: dict                 # spruce finetune flags beyond model, output folder and teacher
    teacher: bool               # distill from --dense
    cost: float                 # seconds per token relative to masked full FT with a teacher
    train_blocks: int = SOTU_TRAIN_BLOCKS


# By expected perplexity, best first (the budget may cut the end of the list). Why this order:
# a teacher's full distribution is a far richer target than the next token and does not let the
# student memorise sotu/train; with bf16 weights an AdamW step smaller than half a bf16 ulp is
# lost, which favours 3e-4 over 1e-4 for full FT; the mix spends the same tokens partly off-domain;
# LoRA trains far fewer weights than full FT on a collapsed model; no teacher overfits (reference).
RECIPES = {
    "kl-full-lr3e-3": Recipe(
        "masked full FT, pure KL to the dense teacher (T=1), lr 3e-3 cosine, 3 epochs of sotu (best measured)",
        {**COMMON, "mode": "full", "num_train_epochs": EPOCHS, "learning_rate": "3e-3", **COSINE, **KL}, True, 1.0),
    "kl-full-lr3e-4": Recipe(
        "masked full FT, pure KL to the dense teacher (T=1), lr 3e-4 cosine, 3 epochs of sotu",
        {**COMMON, "mode": "full", "num_train_epochs": EPOCHS, "learning_rate": "3e-4", **COSINE, **KL}, True, 1.0),
    "kl-full-lr1e-3": Recipe(
        "masked full FT, pure KL to the dense teacher (T=1), lr 1e-3 cosine, 3 epochs of sotu",
        {**COMMON, "mode": "full", "num_train_epochs": EPOCHS, "learning_rate": "1e-3", **COSINE, **KL}, True, 1.0),
    "klh-full-lr3e-4": Recipe(
        "masked full FT, pure KL (T=1) + hidden states of every layer (weight 1), lr 3e-4 cosine, 3 epochs",
        {**COMMON, "mode": "full", "num_train_epochs": EPOCHS, "learning_rate": "3e-4", **COSINE, **KL, **HIDDEN},
        True, 1.05),
    "klh-full-lr1e-3": Recipe(
        "masked full FT, pure KL (T=1) + hidden states of every layer (weight 1), lr 1e-3 cosine, 3 epochs",
        {**COMMON, "mode": "full", "num_train_epochs": EPOCHS, "learning_rate": "1e-3", **COSINE, **KL, **HIDDEN},
        True, 1.05),
    "kl-full-b4-lr3e-4": Recipe(
        "masked full FT, pure KL (T=1), lr 3e-4 cosine, batch 4 (4x the steps), 3 epochs of sotu",
        {**COMMON, "mode": "full", "num_train_epochs": EPOCHS, "learning_rate": "3e-4", **COSINE, **KL,
         "per_device_train_batch_size": 4, "warmup_steps": 80, "eval_steps": math.ceil(SOTU_TRAIN_BLOCKS / 4 / 2)},
        True, 1.6),
    "kl-full-lr1e-4": Recipe(
        "masked full FT, pure KL to the dense teacher (T=1), lr 1e-4 cosine, 3 epochs of sotu",
        {**COMMON, "mode": "full", "num_train_epochs": EPOCHS, "learning_rate": "1e-4", **COSINE, **KL}, True, 1.0),
    "kl-full-mix-lr3e-4": Recipe(
        "masked full FT, pure KL (T=1), lr 3e-4 cosine, all of sotu+moby train, the tokens of 3 sotu epochs",
        {**COMMON, "dataset_name": "sotu+moby", "mix_weights": f"{SOTU_TRAIN_BLOCKS},{MOBY_TRAIN_BLOCKS}",
         "mode": "full", "max_steps": math.ceil(EPOCHS * SOTU_TRAIN_BLOCKS / BATCH), "learning_rate": "3e-4",
         **COSINE, **KL}, True, 1.0, SOTU_TRAIN_BLOCKS + MOBY_TRAIN_BLOCKS),
    "kl-lora64-lr5e-4": Recipe(
        "masked LoRA r=64 alpha 128 on all linears, pure KL (T=1), lr 5e-4 cosine, 3 epochs of sotu",
        {**COMMON, "mode": "masked-lora", "lora_r": 64, "lora_alpha": 128, "lora_dropout": "0",
         "lora_target_modules": "all-linear", "num_train_epochs": EPOCHS, "learning_rate": "5e-4", **COSINE, **KL},
        True, 0.9),
    "ft-lr5e-5-1ep": Recipe(
        "masked full FT without a teacher, lr 5e-5 linear, batch 4, 1 epoch of sotu (reference-like)",
        {**COMMON, "mode": "full", "num_train_epochs": 1, "learning_rate": "5e-5", "per_device_train_batch_size": 4,
         "eval_steps": math.ceil(SOTU_TRAIN_BLOCKS / 4 / 2)}, False, 0.9),
}


def flag_args(flags: dict) -> list[str]:
    out = []
    for key, value in flags.items():
        out.append(f"--{key}")
        if value is not None:
            out.append(str(value))
    return out


def apply_overrides(flags: dict, overrides: list[str]) -> dict:
    """`key=value` replaces (or adds) a flag, `key=` drops it, a bare `key` adds a switch."""
    flags = dict(flags)
    for item in overrides:
        key, eq, value = item.partition("=")
        key = key.strip().lstrip("-")
        if not eq:
            flags[key] = None
        elif value == "":
            flags.pop(key, None)
        else:
            flags[key] = value
    return flags


def tokens_per_step(flags: dict) -> int:
    return (int(flags.get("per_device_train_batch_size", 1)) * int(flags.get("gradient_accumulation_steps", 1))
            * int(flags.get("block_size", 1024)))


def finetune_args(recipe: Recipe, flags: dict, pruned: str, dense: str, folder: Path) -> list[str]:
    teacher = ["--teacher_model", dense] if recipe.teacher else []
    return ["finetune", "--model_name_or_path", str(pruned), *teacher, *flag_args(flags), "--output_dir", str(folder)]


def parse_problem(args: list[str]) -> str | None:
    """The error `spruce` would give for these arguments (a renamed flag, a bad value), or None."""
    import contextlib
    import io

    from spruce.cli import build_parser

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            build_parser().parse_args(args)
    except SystemExit:
        return err.getvalue().strip() or "the arguments do not parse"
    return None


def planned_steps_tokens(flags: dict, train_blocks: int) -> tuple[int, int]:
    batch = int(flags.get("per_device_train_batch_size", 1)) * int(flags.get("gradient_accumulation_steps", 1))
    if int(flags.get("max_steps", -1)) > 0:
        steps = int(flags["max_steps"])
    else:
        blocks = min(train_blocks, int(flags.get("max_train_samples", train_blocks)))
        steps = max(1, math.ceil(float(flags.get("num_train_epochs", 1)) * blocks / batch))
    return steps, steps * tokens_per_step(flags)


class Sweep:
    """Runs the steps, keeps the clock and the JSON."""

    def __init__(self, a):
        self.a = a
        self.start = time.monotonic()
        self.lock = threading.RLock()  # recipes side by side update one record list and one JSON
        self.procs: set[subprocess.Popen] = set()
        self.stopping = False
        self.out = Path(a.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.json_path = Path(a.json) if a.json else self.out / "recover_sweep.json"
        self.log_path = Path(a.log) if a.log else self.out / "recover_sweep.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path.write_text("")
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1",
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        self.result = {"pruned": a.pruned, "dense": a.dense, "dense_ppl": a.dense_ppl, "budget_s": a.budget_s,
                       "date": time.strftime("%Y-%m-%d %H:%M:%S"), "environment": environment(),
                       "prune": None, "pruned_eval": None, "speed": None, "recipes": []}
        self.write()

    def left(self) -> float:
        return self.a.budget_s - (time.monotonic() - self.start)

    def write(self) -> None:
        self.result["elapsed_s"] = round(time.monotonic() - self.start, 1)
        from spruce.outdir import write_json

        write_json(self.json_path, self.result)

    def run(self, argv: list[str], title: str, timeout: float, log_path: Path | None = None) -> dict:
        """Run a command with its output appended to the log; never longer than `timeout` seconds."""
        log_path = log_path or self.log_path
        with open(log_path, "a") as log:
            log.write(f"\n===== {title}: {shlex.join(argv)}\n")
            log.flush()
            started = time.monotonic()
            with self.lock:
                if self.stopping:
                    return {"rc": -1, "timed_out": False, "seconds": 0.0, "log_tail": "not started: the sweep stopped"}
                # same process group as this script, so that whatever stops the script stops the command too
                proc = subprocess.Popen(argv, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT)
                self.procs.add(proc)
            try:
                rc = proc.wait(timeout=max(1.0, timeout))
                timed_out = False
            except subprocess.TimeoutExpired:
                proc.kill()
                rc, timed_out = proc.wait(), True
            except BaseException:  # interrupted (Ctrl-C, SIGTERM): stop the command, then let the table print
                proc.kill()
                proc.wait()
                raise
            finally:
                with self.lock:
                    self.procs.discard(proc)
            seconds = time.monotonic() - started
            log.write(f"===== {title}: exit {rc}{' (timed out)' if timed_out else ''} after {seconds:.1f} s\n")
        return {"rc": rc, "timed_out": timed_out, "seconds": round(seconds, 1), "log_tail": "" if rc == 0 else
                self.log_tail(title, log_path)}

    def log_tail(self, title: str, log_path: Path, lines: int = 15) -> str:
        text = log_path.read_text(errors="replace")
        part = text[text.rfind(f"===== {title}: "):]
        return "\n".join(part.splitlines()[-lines:])

    def spruce(self, *args: str) -> tuple[list[str], str]:
        """(argv to run, the same command as a user types it)."""
        return [sys.executable, "-m", "spruce.cli", *args], shlex.join(["spruce", *args])

    # ---- steps ----
    def prune(self) -> bool:
        pruned = Path(self.a.pruned)
        if (pruned / "config.json").is_file():
            return True
        argv, command = self.spruce("prune", *shlex.split(self.a.prune_args), "--save_model", str(pruned))
        say(f"[prune] {command}")
        run = self.run(argv, "prune", self.left() - 30)
        self.result["prune"] = {"command": command, **run}
        self.write()
        ok = run["rc"] == 0 and (pruned / "config.json").is_file()
        say(f"[prune] {'done' if ok else 'FAILED'} in {run['seconds']:.0f} s")
        return ok

    def test_eval(self, model: str, json_path: Path, title: str, log_path: Path | None = None) -> dict:
        args = ["eval", "--model", model, "--dataset", self.a.eval_dataset, "--split", "test", "--seqlen", str(self.a.eval_seqlen),
                "--batch_size", "8", "--json", str(json_path)]
        if self.a.eval_windows:
            args += ["--max_windows", str(self.a.eval_windows)]
        argv, command = self.spruce(*args)
        run = self.run(argv, title, min(self.left(), 300), log_path)
        record = {"eval_command": command, "eval_seconds": run["seconds"]}
        if run["rc"] == 0 and json_path.is_file():
            got = json.loads(json_path.read_text())
            record.update({"test_ppl": got["ppl"], "test_windows": got["windows"], "test_seqlen": got["seqlen"],
                           "x_dense": got["ppl"] / self.a.dense_ppl})
        else:
            record["eval_error"] = run["log_tail"] or "no JSON written"
        return record

    def eval_pruned(self) -> None:
        say("[pruned] perplexity of the pruned model")
        record = self.test_eval(self.a.pruned, self.out / "pruned_test.json", "eval pruned")
        self.result["pruned_eval"] = record
        self.write()
        say(f"[pruned] perplexity {record.get('test_ppl', float('nan')):,.2f}")

    def speed(self) -> None:
        argv = [sys.executable, "bench/bench_train.py", "--model", self.a.dense, "--pruned", self.a.pruned,
                "--blocks", str(self.a.speed_blocks), "--eval_blocks", str(self.a.speed_eval_blocks), "--batches", self.a.speed_batches,
                "--json", str(self.out / "speed.json")]
        if self.a.speed_compile:
            argv.append("--compile")
        command = shlex.join(["python", *argv[1:]])
        say(f"[speed] {command}")
        run = self.run(argv, "speed", min(self.left() - 30, self.a.speed_timeout_s))
        record = {"command": command, **run}
        if run["rc"] == 0 and (self.out / "speed.json").is_file():
            record.update(json.loads((self.out / "speed.json").read_text()))
            rows = record["rows"]
            base = rows[0]["tokens_per_s"]
            for r in rows:
                r["x_reference"] = r["tokens_per_s"] / base
                say(f"[speed] {r['recipe']:<58} {r['tokens_per_s']:>9,.0f} tok/s {r['x_reference']:>6.2f}x "
                    f"val ppl {r['eval_ppl']:.2f}")
        else:
            say(f"[speed] FAILED (exit {run['rc']}{', timed out' if run['timed_out'] else ''}); see the log")
        self.result["speed"] = record
        self.write()

    def recipes(self, specs: list[str]) -> None:
        """Run the recipes (`NAME[@flag=value...]`), `--parallel` of them at a time on one device."""
        base_masks = zero_sets(self.a.pruned)
        pattern = block_pattern(self.a.pruned)
        self.measured = None  # (seconds per token at cost 1.0, fixed seconds) from the last finished recipe
        jobs = [self.plan(spec) for spec in specs]
        if self.a.parallel <= 1:
            for job in jobs:
                self.run_recipe(job, base_masks, pattern)
            return
        pool = ThreadPoolExecutor(max_workers=self.a.parallel)  # each job waits on its subprocesses
        try:
            for future in [pool.submit(self.run_recipe, job, base_masks, pattern) for job in jobs]:
                future.result()
        except BaseException:  # interrupted: stop every running command, start no new one, keep the table
            self.stop()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()

    def stop(self) -> None:
        with self.lock:
            self.stopping = True
            for proc in list(self.procs):
                proc.kill()

    def plan(self, spec: str) -> dict:
        name, overrides = parse_spec(spec)
        recipe = RECIPES[name]
        flags = apply_overrides(apply_overrides(recipe.flags, self.a.set or []), overrides)
        label = spec_label(spec)
        steps, tokens = planned_steps_tokens(flags, recipe.train_blocks)
        folder = self.out / label
        args = finetune_args(recipe, flags, self.a.pruned, self.a.dense, folder)
        argv, command = self.spruce(*args)
        record = {"name": label, "recipe": name, "what": recipe.what, "command": command, "planned_steps": steps,
                  "planned_tokens": tokens, "status": "planned"}
        with self.lock:
            self.result["recipes"].append(record)
            self.write()
        log = self.log_path if self.a.parallel <= 1 else self.out / f"{label}.log"
        return {"label": label, "recipe": recipe, "flags": flags, "args": args, "argv": argv, "command": command,
                "steps": steps, "tokens": tokens, "folder": folder, "record": record, "log": log}

    def run_recipe(self, job: dict, base_masks: dict, pattern) -> None:
        label, recipe, record, folder = job["label"], job["recipe"], job["record"], job["folder"]
        tokens, log = job["tokens"], job["log"]
        with self.lock:
            if self.measured:
                estimate = self.measured[0] * recipe.cost * tokens + self.measured[1]
            else:
                estimate = self.a.assumed_overhead_s + recipe.cost * tokens / self.a.assumed_tok_s
            estimate *= max(1, self.a.parallel)  # recipes side by side share the device
            record["estimated_s"] = round(estimate, 1)
            problem = parse_problem(job["args"])
            left = self.left()
            if problem:
                record.update(status="invalid", reason=problem)
            elif left < 1.1 * estimate:
                record.update(status="skipped", reason=f"estimated {estimate:.0f} s (+10%) > {left:.0f} s left")
            else:
                record["status"] = "running"
            self.write()
        if record["status"] == "invalid":
            say(f"[{label}] not run, its command does not parse: {problem}")
            return
        if record["status"] == "skipped":
            say(f"[{label}] skipped: {record['reason']}")
            return
        say(f"[{label}] {recipe.what}\n[{label}] {job['command']}\n[{label}] {job['steps']} steps, "
            f"{tokens / 1e6:.2f}M tokens, estimated {estimate:.0f} s, {left:.0f} s left")
        run = self.run(job["argv"], label, left - 5, log)
        with self.lock:
            record.update(status="ok" if run["rc"] == 0 else ("timed out" if run["timed_out"] else "failed"),
                          seconds=run["seconds"])
            if run["rc"] != 0:
                record["error"] = run["log_tail"]
                self.write()
        if run["rc"] != 0:
            say(f"[{label}] {record['status'].upper()} after {run['seconds']:.0f} s:\n{run['log_tail']}")
            return
        found = training_record(folder)
        found.update(zero_set_check(base_masks, pattern, folder / "merged"))
        if not self.a.keep_checkpoints:
            from spruce.recover.checkpoint import run_checkpoints

            for checkpoint in run_checkpoints(folder):
                shutil.rmtree(checkpoint, ignore_errors=True)
        with self.lock:
            record.update(found)
            if record.get("steps"):
                record["tokens"] = record["steps"] * tokens_per_step(job["flags"])
            self.write()
        evaluated = self.test_eval(str(folder / "merged"), folder / "test_eval.json", f"eval {label}", log)
        with self.lock:
            record.update(evaluated)
            self.write()
            train_s = record.get("train_seconds") or run["seconds"]
            done_tokens = record.get("tokens") or tokens
            fixed = run["seconds"] - train_s + record["eval_seconds"]
            self.measured = (train_s / done_tokens / recipe.cost / max(1, self.a.parallel), fixed)
        say(f"[{label}] test perplexity {record.get('test_ppl', float('nan')):,.2f} "
            f"({record.get('x_dense', float('nan')):.2f}x dense) | {record.get('tokens_per_s') or 0:,.0f} tok/s | "
            f"{run['seconds']:.0f} s + eval {record['eval_seconds']:.0f} s | zero set kept: "
            f"{record.get('zero_set_equal')}")


def parse_spec(spec: str) -> tuple[str, list[str]]:
    """`NAME@flag=value@flag=value` -> (NAME, ['flag=value', ...]): a recipe with its own overrides."""
    name, *overrides = spec.split("@")
    return name.strip(), [o.strip() for o in overrides if o.strip()]


def spec_label(spec: str) -> str:
    """A folder-safe name for a recipe spec: kl-full-lr1e-3@learning_rate=2e-3 -> kl-full-lr1e-3_learning_rate-2e-3."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", spec.replace("@", "_")).strip("-")


def say(line: str) -> None:
    print(line, flush=True)


def environment() -> dict:
    env = {"python": sys.version.split()[0]}
    for package in ("torch", "transformers", "peft", "accelerate"):
        try:
            env[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            env[package] = None
    try:
        env["gpu"] = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], check=False,
                                    capture_output=True, text=True, timeout=20).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["gpu"] = None
    return env


def training_record(folder: Path) -> dict:
    """What the finetune run wrote: summary.json and the train / eval rows of metrics.jsonl."""
    record = {}
    summary_path = folder / "summary.json"
    if summary_path.is_file():
        s = json.loads(summary_path.read_text())
        record.update({"steps": s.get("steps"), "train_seconds": s.get("train_seconds"),
                       "final_train_loss": s.get("final_train_loss"), "eval_before": s.get("eval_before"),
                       "best_eval": s.get("best_eval"), "eval_merged": s.get("eval_merged"),
                       "merged_zero_set_unchanged": s.get("merged_zero_set_unchanged"),
                       "stopped_early": s.get("stopped_early")})
    train, evals, notes = [], [], []
    metrics = folder / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            row = json.loads(line)
            if row.get("event") == "train":
                train.append({k: row[k] for k in ("step", "loss", "lr", "epoch", "tokens_per_s")})
            elif row.get("event") == "eval" and row.get("stage") not in ("before", "merged"):
                evals.append({k: row[k] for k in ("step", "eval_loss", "eval_ppl")})
            elif row.get("event") == "diagnostic":
                notes.append(f"step {row['step']}: {row['message']}")
    record.update({"train_curve": train, "eval_curve": evals, "diagnostics": notes})
    if train:
        record["tokens_per_s"] = train[-1]["tokens_per_s"]
    return record


def decoder_weights(folder: str | Path):
    """(name, tensor) of every decoder linear weight in a safetensors folder."""
    from safetensors import safe_open

    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for key in f.keys():  # noqa: SIM118 (a safetensors file, not a dict)
                if re.search(r"layers\.\d+\..+\.weight$", key):
                    tensor = f.get_tensor(key)
                    if tensor.ndim == 2:
                        yield key, tensor


def zero_sets(folder: str | Path) -> dict:
    return {k: t == 0 for k, t in decoder_weights(folder)}


def block_pattern(folder: str | Path):
    from spruce.masks import parse_block, read_sparsity_json

    info = read_sparsity_json(folder) or {}
    return parse_block(str(info.get("pattern", "")))


def zero_set_check(base: dict, pattern, merged: Path) -> dict:
    """Measured sparsity of the merged model's decoder linears, the share of its tiles that are all zero
    (a block pattern; kept tiles may hold the dense model's own stray zeros), and whether its zero set
    is the pruned model's, bit for bit."""
    from spruce.masks import tile_zero_fraction

    if not (merged / "config.json").is_file():
        return {"zero_set_equal": None, "sparsity": None, "check_error": f"no merged model in {merged}"}
    zeros = total = zero_tiles = tiles = 0
    equal, seen = True, set()
    for key, tensor in decoder_weights(merged):
        mask = tensor == 0
        zeros += int(mask.sum())
        total += mask.numel()
        seen.add(key)
        equal = equal and key in base and base[key].shape == mask.shape and bool((base[key] == mask).all())
        if pattern:
            fraction = tile_zero_fraction(tensor, *pattern)
            zero_tiles += int((fraction == 1).sum())
            tiles += fraction.numel()
    equal = equal and seen == set(base)
    return {"sparsity": zeros / max(total, 1), "zero_set_equal": equal,
            "zero_tile_share": zero_tiles / tiles if pattern else None}


def table(result: dict) -> str:
    lines = [(f"{'recipe':<20} {'status':<9} {'test ppl':>10} {'x dense':>8} {'sparsity':>9} {'zeros kept':>10} "
              f"{'tok/s':>8} {'train s':>8} {'best val':>9} {'train':>7}")]
    pe = result.get("pruned_eval") or {}
    if pe.get("test_ppl"):
        lines.append(f"{'(pruned, no FT)':<20} {'':<9} {pe['test_ppl']:>10,.2f} {pe['x_dense']:>8.2f}")
    for r in result["recipes"]:
        best = (r.get("best_eval") or {}).get("eval_loss")
        lines.append(
            f"{r['name']:<20} {r.get('status', ''):<9} {fmt(r.get('test_ppl'), '10,.2f')} {fmt(r.get('x_dense'), '8.2f')} "
            f"{fmt(r.get('sparsity'), '9.2%')} {r.get('zero_set_equal', '')!s:>10} {fmt(r.get('tokens_per_s'), '8,.0f')} "
            f"{fmt(r.get('train_seconds'), '8.0f')} {fmt(best, '9.4f')} {fmt(r.get('final_train_loss'), '7.4f')}")
    return "\n".join(lines)


def fmt(value, spec: str) -> str:
    width = int(re.match(r"\d*", spec).group() or 0)
    return format(value, spec) if isinstance(value, (int, float)) else " " * (width - 1) + "-"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="recipes, in the default order:\n" + "\n".join(
                                    f"  {n}: {r.what}" for n, r in RECIPES.items()))
    p.add_argument("--pruned", required=True, help="pruned model folder (made with --prune_args if missing)")
    p.add_argument("--dense", default="smollm2-135m", help="dense teacher and tokenizer (default: smollm2-135m)")
    p.add_argument("--out", required=True, help="folder for the fine-tuned and merged models (large)")
    p.add_argument("--json", help="results JSON (default: OUT/recover_sweep.json)")
    p.add_argument("--log", help="all command output in one file (default: OUT/recover_sweep.log)")
    p.add_argument("--budget_s", type=float, default=540, help="wall-clock budget of the whole script (default: 540)")
    p.add_argument("--recipes", default=",".join(RECIPES),
                   help="comma list, run in this order (default: all); NAME@flag=value@... gives one recipe its own "
                        "finetune flags, e.g. kl-full-lr3e-3@learning_rate=2e-3")
    p.add_argument("--parallel", type=int, default=1, metavar="N",
                   help="run N recipes side by side on the device (a small model leaves most of a large GPU "
                        "idle; each needs its own memory) (default: 1)")
    p.add_argument("--set", action="append", metavar="FLAG=VALUE",
                   help="override a finetune flag in every recipe (repeatable; FLAG= drops it), e.g. max_steps=2")
    p.add_argument("--prune_args", default=PRUNE_ARGS, help=f"spruce prune flags if --pruned is missing "
                                                            f"(default: '{PRUNE_ARGS}')")
    p.add_argument("--no_pruned_eval", action="store_true", help="skip the test perplexity of the pruned model")
    p.add_argument("--eval_dataset", default="sotu", help="test split of this corpus (default: sotu)")
    p.add_argument("--eval_seqlen", type=int, default=1024)
    p.add_argument("--eval_windows", type=int, help="first N test windows only (default: all 146)")
    p.add_argument("--dense_ppl", type=float, default=DENSE_PPL, help=f"for the x dense column (default: {DENSE_PPL})")
    p.add_argument("--assumed_tok_s", type=float, default=60000,
                   help="tokens/s assumed for the first recipe's estimate (default: 60000)")
    p.add_argument("--assumed_overhead_s", type=float, default=45,
                   help="fixed seconds (loads, merge, test eval) assumed for the first recipe (default: 45)")
    p.add_argument("--keep_checkpoints", action="store_true", help="keep each recipe's checkpoints/ folder")
    p.add_argument("--speed", action="store_true", help="first run bench/bench_train.py on the pruned model")
    p.add_argument("--speed_blocks", type=int, default=256, help="speed: training blocks per recipe (default: 256)")
    p.add_argument("--speed_eval_blocks", type=int, default=16, help="speed: validation blocks (default: 16)")
    p.add_argument("--speed_batches", default="8,16", help="speed: spruce micro-batches (default: 8,16)")
    p.add_argument("--speed_compile", action="store_true", help="speed: also time torch.compile")
    p.add_argument("--speed_timeout_s", type=float, default=240, help="speed: time limit (default: 240)")
    a = p.parse_args()
    names = [n.strip() for n in a.recipes.split(",") if n.strip() and n.strip() != "none"]
    unknown = [n for n in names if parse_spec(n)[0] not in RECIPES]
    if unknown:
        p.error(f"unknown recipe(s) {', '.join(unknown)}; choose from {', '.join(RECIPES)}")
    if a.parallel < 1:
        p.error(f"--parallel must be at least 1, got {a.parallel}")
    labels = [spec_label(n) for n in names]
    if len(set(labels)) != len(labels):
        p.error("the same recipe is named twice; give each its own @flag=value")

    sweep = Sweep(a)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a `timeout` still gets the JSON and the table
    try:
        if sweep.prune():
            if a.speed:
                sweep.speed()
            if not a.no_pruned_eval:
                sweep.eval_pruned()
            if names:
                sweep.recipes(names)
        else:
            say("no pruned model; nothing else runs")
    finally:
        sweep.write()
        say(f"\nresults: {sweep.json_path} | log: {sweep.log_path} | {time.monotonic() - sweep.start:.0f} s of "
            f"{a.budget_s:.0f} s")
        say(f"recovery of {a.pruned}: {a.eval_dataset}/test perplexity, seqlen {a.eval_seqlen}, "
            f"{a.eval_windows or 'all'} windows; dense {a.dense_ppl}")
        say(table(sweep.result))


if __name__ == "__main__":
    main()
