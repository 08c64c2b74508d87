"""`spruce finetune`: recovery fine-tuning of a pruned model with the run_clm / finetune_lm flags.

    spruce finetune --model_name_or_path out/pruned --dataset_name sotu --do_train --do_eval \\
        --num_train_epochs 1 --block_size 1024 --learning_rate 1e-4 --output_dir out/lora

Modes: `lora` (peft adapter on the frozen pruned model), `masked-lora` (the adapter's update is
masked to the kept weights, so merging keeps the sparsity exactly), `full` (every kept weight
trains, every pruned weight stays exactly zero). `--teacher_model` adds distillation from the
dense model. Writes the adapter (or model) into --output_dir the way run_clm + peft do, plus
metrics.jsonl, TensorBoard events, curves.png, summary.json and, with --merge, merged/.

Under torchrun or accelerate launch the same command trains with DDP, or FSDP2 with --fsdp (see
parallel.py); rank 0 alone writes. --device_map shards one model over the GPUs of a single
process for evaluation.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .. import data, generated
from ..errors import SpruceError
from ..card import write_model_card
from ..masks import copy_sparsity_json, overall_sparsity, zero_masks
from ..models import check_context, load_config, load_model, save_model
from ..outdir import atomic_dir, check_output_dir, check_writable, share_modes, write_json
from ..report import MetricsLog, write_config
from .args import LATEST, MODES, FinetuneArgs  # noqa: F401  (MODES: the public list of modes)
from .checkpoint import (LEGACY_ROOT, check_checkpoint_files, check_resumable, checkpoint_step, list_checkpoints,
                         run_checkpoints)
from .heldout import QualityColumns, resolve_heldout
from .lora import attach_lora, merge_keep_sparsity
from .monitor import plot_curves
from .parallel import Parallel, launch_env
from .train import TrainArgs, eval_loss, train

_WIKITEXT = {"wikitext-2-raw-v1": "wikitext2", "wikitext-2-v1": "wikitext2",
             "wikitext-103-raw-v1": "wikitext103", "wikitext-103-v1": "wikitext103"}
ADAPTER_MARKER = "spruce_adapter.json"


def corpus_spec(dataset_name: str | None, dataset_config_name: str | None, mix_weights: str | None) -> str:
    """run_clm's --dataset_name / --dataset_config_name (and a `+` mix with --mix_weights) as a spruce corpus spec."""
    if not dataset_name:
        raise SpruceError("no training data: pass --dataset_name (e.g. sotu, wikitext, c4) or --train_file")
    names = [n.strip() for n in dataset_name.split("+")]
    if dataset_config_name:
        if "wikitext" in names and dataset_config_name not in _WIKITEXT:
            raise SpruceError(f"--dataset_config_name {dataset_config_name} is not a WikiText configuration; use "
                              f"{' or '.join(_WIKITEXT)}")
        if "wikitext" not in names and not ("c4" in names and dataset_config_name == "en"):
            raise SpruceError(f"--dataset_config_name {dataset_config_name} does not apply to --dataset_name "
                              f"{dataset_name}; it names a WikiText configuration (or en for c4)")
        names = [_WIKITEXT[dataset_config_name] if n == "wikitext" else n for n in names]
    if mix_weights:
        weights = [w.strip() for w in mix_weights.split(",")]
        if len(weights) != len(names):
            raise SpruceError(f"--mix_weights has {len(weights)} values for {len(names)} datasets; give one per dataset")
        names = [f"{n}:{w}" for n, w in zip(names, weights)]
    spec = "+".join(names)
    data.parse_corpus(spec)
    return spec


def _resume_path(output_dir: Path, resume: str | None) -> Path | None:
    if not resume:
        return None
    if resume in LATEST:
        found = run_checkpoints(output_dir)
        if not found:
            raise SpruceError(f"no checkpoint (checkpoint-N folder) to resume from in {output_dir}; "
                              "drop --resume_from_checkpoint to start a new run")
        return found[-1]
    path = Path(resume)
    legacy = path.parent / LEGACY_ROOT / path.name
    return legacy if not path.exists() and legacy.is_dir() else path


# what an earlier run leaves in its output folder; a fresh run with --overwrite_output_dir
# removes it, so that old checkpoints are neither rotated against the new ones nor resumed
RUN_OUTPUTS = ("metrics.jsonl", "summary.json", "curves.png", "runs", "merged", LEGACY_ROOT)


def clear_previous_run(output_dir: Path, say) -> None:
    old = list_checkpoints(output_dir) + [output_dir / n for n in RUN_OUTPUTS if (output_dir / n).exists()]
    for path in old:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    if old:
        say(f"--overwrite_output_dir: removed the earlier run's {', '.join(sorted(p.name for p in old))} "
            f"from {output_dir}")


HF_SAVE_STEPS = 500  # the Trainer's default --save_steps


def _every(strategy: str | None, given: int | None, default: int, epoch_steps: int) -> int | None:
    """Steps between evaluations or checkpoints for a Trainer strategy (None: only at the end)."""
    if strategy is None:
        return given
    return {"steps": given or default, "epoch": epoch_steps, "no": None}[strategy]


def trainer_schedule(a: FinetuneArgs, epoch_steps: int) -> tuple[int | None, int | None]:
    """(evaluate every N steps, checkpoint every N steps) from --eval_steps / --save_steps and the
    Trainer's --evaluation_strategy / --save_strategy; the Trainer's --eval_steps defaults to
    --logging_steps, its --save_steps to 500."""
    return (_every(a.eval_strategy, a.eval_steps, a.logging_steps, epoch_steps),
            _every(a.save_strategy, a.save_steps, HF_SAVE_STEPS, epoch_steps))


def report_tensorboard(report_to: list[str] | None, say) -> bool:
    """Whether to write TensorBoard events, from the Trainer's --report_to."""
    names = {n.lower() for n in (report_to or ["tensorboard"])}
    others = names - {"tensorboard", "all", "none"}
    if others:
        say(f"note: --report_to {' '.join(sorted(others))}: spruce logs to TensorBoard and metrics.jsonl only")
    return "none" not in names and bool(names & {"tensorboard", "all"})


def grad_accum_steps(global_batch: int | None, per_device: int, grad_accum: int | None, world: int) -> int:
    """Micro-batches per step so that global batch = per-device batch x accumulation x processes."""
    if global_batch is None:
        return grad_accum or 1
    unit = per_device * world
    if global_batch % unit:
        raise SpruceError(f"--global_batch_size {global_batch} is not a multiple of --per_device_train_batch_size "
                          f"{per_device} x {world} process{'es' if world > 1 else ''} = {unit}; use a multiple of {unit}")
    steps = global_batch // unit
    if grad_accum and grad_accum != steps:
        raise SpruceError(f"--global_batch_size {global_batch} needs --gradient_accumulation_steps {steps} with "
                          f"{world} process{'es' if world > 1 else ''} of batch {per_device}, not {grad_accum}; "
                          "give one of the two")
    return steps


class _NoLog:
    def write(self, row: dict) -> None:
        pass


def _load_device_map(a: FinetuneArgs, tokenizer_source):
    """One model sharded over the visible GPUs (accelerate's big-model loading), for evaluation."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..models import check_causal_lm, load_config, resolve_dtype

    config, source, _ = load_config(a.model_name_or_path, a.trust_remote_code)
    check_causal_lm(config, a.model_name_or_path, a.trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(source, device_map=a.device_map, dtype=resolve_dtype(a.dtype),
                                                 trust_remote_code=a.trust_remote_code).eval()
    try:
        tok = AutoTokenizer.from_pretrained(tokenizer_source or source, trust_remote_code=a.trust_remote_code)
    except (OSError, ValueError, TypeError):
        raise SpruceError(f"no tokenizer found in {tokenizer_source or source}; pass --tokenizer_name") from None
    return model, tok


@dataclass
class FinetuneRun:
    """What the steps of run_finetune hand on: the options and what was decided from them."""
    args: FinetuneArgs
    say: Callable[[str], None]
    parallel: Parallel | None
    world: int
    grad_accum: int
    output_dir: Path
    resume: Path | None
    train_spec: str
    eval_spec: str | None
    tokenizer_source: str | None
    sampling: generated.GeneratedSettings | None   # settings of the `generated` corpus, when one is read
    heldout: str | None                             # the held-out corpus measured before and after

    @property
    def main(self) -> bool:
        return self.parallel is None or self.parallel.is_main

    @property
    def bf16(self) -> bool:
        return self.args.dtype == "bfloat16" or self.args.autocast_bf16


def prepare(a: FinetuneArgs, say=print) -> FinetuneRun:
    """Every check that needs no model: output folder, data sources, batch arithmetic. Reads and
    writes nothing but a probe of the output folder."""
    world = launch_env()[1]
    grad_accum = grad_accum_steps(a.global_batch_size, a.per_device_train_batch_size,
                                  a.gradient_accumulation_steps, world)
    output_dir = Path(a.output_dir)
    resume = _resume_path(output_dir, a.resume_from_checkpoint)
    if resume is None:
        check_output_dir(output_dir, a.overwrite_output_dir)
    else:
        check_checkpoint_files(resume)
        check_writable(output_dir)
    train_spec = a.train_file or corpus_spec(a.dataset_name, a.dataset_config_name, a.mix_weights)
    eval_spec = a.validation_file or (train_spec if not a.train_file else None)
    for spec in filter(None, (train_spec, eval_spec)):
        data.check_corpus(spec)
    sampling = generated.finetune_settings(a, train_spec, eval_spec)
    prompts = sampling.prompts if sampling and sampling.prompts != "diverse" else None
    heldout = resolve_heldout(a.heldout_dataset, train_spec, prompts) if a.do_eval else None
    if a.teacher_model:
        load_config(a.teacher_model, a.trust_remote_code)  # a missing teacher fails before the student loads
    tokenizer_source = a.tokenizer_name
    if not tokenizer_source and a.config_name and Path(a.model_name_or_path).is_dir() \
            and not (Path(a.model_name_or_path) / "tokenizer_config.json").exists():
        tokenizer_source = a.config_name  # the reference passes the dense model here
    parallel = None if a.device_map else Parallel.from_env(a.device, a.fsdp, a.fsdp_transformer_layer_cls_to_wrap)
    if parallel is not None and not parallel.is_main:
        say = lambda *_: None  # noqa: E731
    if parallel is not None:
        parallel.barrier()  # every process has checked the output folder before rank 0 writes into it
    return FinetuneRun(a, say, parallel, world, grad_accum, output_dir, resume, train_spec, eval_spec,
                       tokenizer_source, sampling, heldout)


def load_student_model(run: FinetuneRun):
    """(model, tokenizer) of the model to fine-tune, on the device this process trains on."""
    a, parallel = run.args, run.parallel
    torch.manual_seed(a.seed)
    # FSDP loads on the CPU and moves only each process's shard to its GPU
    load_device = a.device if parallel is None else ("cpu" if parallel.kind == "fsdp" else parallel.device)
    if a.device_map:
        model, tok = _load_device_map(a, run.tokenizer_source)
    else:
        model, tok = load_model(a.model_name_or_path, load_device, a.dtype, a.trust_remote_code, run.tokenizer_source)
    if parallel is not None:
        parallel.check_wrapping(model)  # before anything is written
    check_context(model, a.block_size, "--block_size")
    return model, tok


def read_blocks(run: FinetuneRun, tok) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(training blocks, evaluation blocks), each None when that part is not asked for."""
    a = run.args
    sources = generated.finetune_sources(a, run.sampling, tok, run.parallel, run.say)  # text the dense model writes
    train_blocks = data.training_blocks(run.train_spec, tok, a.block_size, "train", a.max_train_samples, a.seed,
                                        sources=sources) if a.do_train else None
    eval_split = "train" if a.validation_file else "validation"
    eval_blocks = data.training_blocks(run.eval_spec, tok, a.block_size, eval_split, a.max_eval_samples, a.seed,
                                       limit_flag="max_eval_samples", sources=sources) if a.do_eval else None
    return train_blocks, eval_blocks


def build_student(run: FinetuneRun, model):
    """(what trains, masks of the pruned weights keyed by its parameter names, the zero sets
    before training). Adapter options that do not fit the model fail here, before any write."""
    a = run.args
    if a.gradient_checkpointing and a.do_train:
        model.config.use_cache = False
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    before = zero_masks(model) if a.do_train else None
    if a.do_train and a.mode == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        masks = {f"{name}.weight": mask for name, mask in before.items()}
        student = model
    elif a.do_train:
        student = attach_lora(model, a.lora_r, a.lora_alpha, a.lora_dropout, a.lora_target_modules,
                              masked=a.mode == "masked-lora")
        masks = None
    else:
        student, masks = model, None
    if run.resume is not None and a.do_train:
        check_resumable(run.resume, student)
    return student, _param_masks(student, masks), before


def load_teacher(run: FinetuneRun):
    a, parallel = run.args, run.parallel
    if not (a.do_train and a.teacher_model):
        return None
    device = a.device if parallel is None else ("cpu" if parallel.kind == "fsdp" else parallel.device)
    rng = torch.get_rng_state()  # loading must not move the seeded stream that training draws from
    teacher, _ = load_model(a.teacher_model, device, "bfloat16" if run.bf16 else a.dtype, a.trust_remote_code)
    torch.set_rng_state(rng)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def start_outputs(run: FinetuneRun):
    """The first writes of the run, once every check passed: the earlier run's outputs removed
    (--overwrite_output_dir), config.yaml, and metrics.jsonl (cut back to the resumed step)."""
    a = run.args
    if not run.main:
        return _NoLog(), False
    if run.resume is None and a.overwrite_output_dir and run.output_dir.is_dir():
        clear_previous_run(run.output_dir, run.say)
    run.output_dir.mkdir(parents=True, exist_ok=True)
    path = run.output_dir / "metrics.jsonl"
    kept = truncate_metrics(path, checkpoint_step(run.resume)) if run.resume is not None else []
    write_config(run.output_dir, a.to_dict())
    return MetricsLog(path), any(r.get("stage") == "before" for r in kept)


def truncate_metrics(path: Path, step: int) -> list[dict]:
    """Keep the rows of metrics.jsonl up to `step` (a resumed run writes the later ones again)."""
    if not path.is_file():
        return []
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step \
                and row.get("event") != "summary":
            kept.append(row)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    tmp.replace(path)
    return kept


def _eval_row(loss: float) -> dict:
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 700))}


def shard_teacher(run: FinetuneRun, teacher):
    """The teacher as this process holds it: sharded like the student under FSDP, whole under DDP."""
    parallel = run.parallel
    if teacher is None or parallel is None:
        return teacher
    teacher = parallel.shard_teacher(teacher)
    if parallel.kind == "fsdp":
        run.say(f"teacher sharded over {run.world} processes: each holds "
                f"{parallel.local_fraction(teacher):.0%} of its parameters")
    return teacher


def train_student(run: FinetuneRun, student, masks, teacher, train_blocks, eval_blocks, log):
    a, parallel, say = run.args, run.parallel, run.say
    per_step = a.per_device_train_batch_size * run.grad_accum * run.world
    steps = a.max_steps if a.max_steps > 0 else max(1, math.ceil(a.num_train_epochs * train_blocks.shape[0] / per_step))
    epoch_steps = max(1, math.ceil(train_blocks.shape[0] / per_step))
    eval_every, save_every = trainer_schedule(a, epoch_steps)
    hidden = a.distill_hidden_weight
    args = TrainArgs(
        steps=steps, lr=a.learning_rate, batch_size=a.per_device_train_batch_size,
        grad_accum=run.grad_accum, eval_batch_size=a.per_device_eval_batch_size,
        warmup_steps=a.warmup_steps, scheduler=a.lr_scheduler_type, weight_decay=a.weight_decay,
        logging_steps=a.logging_steps, logging_first_step=a.logging_first_step,
        tensorboard=report_tensorboard(a.report_to, say),
        eval_steps=(eval_every or steps) if a.do_eval else None,
        save_steps=save_every, save_total_limit=a.save_total_limit,
        load_best_model_at_end=a.load_best_model_at_end, early_stopping_patience=a.early_stopping_patience,
        seed=a.seed, bf16=run.bf16, distill_alpha=a.distill_alpha if teacher is not None else 0.0,
        distill_temperature=a.distill_temperature, distill_hidden=hidden if teacher is not None else 0.0)
    procs = f" ({run.world} processes x {a.per_device_train_batch_size} x {run.grad_accum}, {parallel.kind})" \
        if parallel is not None else ""
    say(f"training {a.mode} on {run.train_spec}: {train_blocks.shape[0]} blocks of {a.block_size} tokens, "
        f"{steps} steps of {per_step} blocks{procs} ({steps * per_step / train_blocks.shape[0]:.2f} epochs)")
    return train(student, train_blocks, args, eval_blocks, run.output_dir, masks=masks,
                 teacher=teacher, resume_from=run.resume, on_event=log.write, say=say, parallel=parallel)


def save_outputs(run: FinetuneRun, student, tok, before, eval_blocks, summary: dict, log, result):
    """The adapter (or model) into OUTPUT_DIR, and with --merge OUTPUT_DIR/merged, zero set checked;
    returns the merged model (None without --merge)."""
    a, output_dir = run.args, run.output_dir
    summary["sparsity_after"] = overall_sparsity(student)
    if a.mode == "full":
        save_model(student, tok, output_dir)
        copy_sparsity_json(a.model_name_or_path, output_dir)
    else:
        student.save_pretrained(output_dir)
        share_modes(output_dir)
        (output_dir / ADAPTER_MARKER).write_text(json.dumps({"mode": a.mode}) + "\n")
    if a.merge:
        merged = student if a.mode == "full" else merge_keep_sparsity(student)
        after = zero_masks(merged)
        summary["merged_zero_set_unchanged"] = all(torch.equal(before[n], after[n]) for n in before)
        with atomic_dir(output_dir / "merged") as folder:
            save_model(merged, tok, folder)
            copy_sparsity_json(a.model_name_or_path, folder)
        if eval_blocks is not None:
            summary["eval_merged"] = _eval_row(eval_loss(merged, eval_blocks, a.per_device_eval_batch_size, run.bf16))
            log.write({"event": "eval", "step": result.steps, "stage": "merged", **summary["eval_merged"]})
            write_model_card(output_dir / "merged", [{
                "model": f"merged ({a.mode})", "dataset": run.eval_spec, "split": "validation", "seqlen": a.block_size,
                "windows": eval_blocks.shape[0], "ppl": summary["eval_merged"]["eval_ppl"]}])
    plot_curves(result.monitor, output_dir / "curves.png", f"spruce finetune ({a.mode}) on {run.train_spec}")
    return merged if a.merge else None


def run_finetune(a: FinetuneArgs, say=print) -> dict:
    """Entry function of `spruce finetune`: check -> load -> data -> (adapter) -> write -> train ->
    save (+ merge) -> summary. Nothing is written before every check has passed."""
    run = prepare(a, say)
    model, tok = load_student_model(run)
    train_blocks, eval_blocks = read_blocks(run, tok)
    student, masks, before = build_student(run, model)
    teacher = load_teacher(run)
    log, logged_before = start_outputs(run)
    summary: dict = {"model": a.model_name_or_path, "mode": a.mode, "dataset": run.train_spec,
                     "block_size": a.block_size, "sparsity_before": overall_sparsity(model)}
    parallel, say = run.parallel, run.say
    if parallel is not None:
        summary["processes"] = {"world_size": parallel.world, "kind": parallel.kind}
        student = parallel.wrap(student)
    if eval_blocks is not None:
        summary["eval_before"] = _eval_row(eval_loss(student, eval_blocks, a.per_device_eval_batch_size, run.bf16,
                                                     parallel))
        if not logged_before:
            log.write({"event": "eval", "step": 0, "stage": "before", **summary["eval_before"]})
        say(f"before training: eval loss {summary['eval_before']['eval_loss']:.4f} | perplexity "
            f"{summary['eval_before']['eval_ppl']:.2f} ({eval_blocks.shape[0]} blocks of {a.block_size} tokens)")
    columns = QualityColumns.build(run.heldout, tok, a.block_size, a.max_eval_samples, a.seed, eval_blocks,
                                   a.per_device_eval_batch_size, run.bf16)
    columns.measure(student, summary, "heldout_before", parallel)
    teacher = shard_teacher(run, teacher)
    if teacher is not None:
        columns.measure(teacher, summary, "dense_eval", parallel, teacher=True)
    if not a.do_train:
        if run.main:
            _finish(run.output_dir, summary, log, None, say)
        _close(parallel)
        return summary
    result = train_student(run, student, masks, teacher, train_blocks, eval_blocks, log)
    if parallel is not None:
        student = _gather_for_rank0(a, student, parallel, run.tokenizer_source)
        if not run.main:
            _close(parallel)
            return summary
    summary.update({"steps": result.steps, "train_seconds": round(result.seconds, 1),
                    "final_train_loss": result.final_train_loss, "best_checkpoint": result.best_checkpoint,
                    "stopped_early": result.stopped_early})
    if result.monitor.evals:
        # what the saved model scores: the best evaluation when its weights were loaded at the end
        summary["eval_after"] = result.monitor.best if result.loaded_best else result.monitor.evals[-1]
        summary["eval_last_step"] = result.monitor.evals[-1]
        summary["best_eval"] = result.monitor.best
        summary["loaded_best"] = result.loaded_best
    merged = save_outputs(run, student, tok, before, eval_blocks, summary, log, result)
    columns.measure(merged if merged is not None else student, summary, "heldout_after")
    _finish(run.output_dir, summary, log, result, say)
    _close(parallel)
    return summary


def _gather_for_rank0(a, student, parallel: Parallel, tokenizer_source):
    """The trained model, whole, on rank 0 (None elsewhere). DDP keeps a full copy per process;
    under FSDP every process gathers the trained tensors and rank 0 puts them into a freshly
    loaded copy of the base model (with the same adapter), on its own device."""
    if parallel.kind == "ddp":
        return parallel.unwrap(student) if parallel.is_main else None
    trained = parallel.full_tensors({n: p for n, p in student.named_parameters() if p.requires_grad})
    if not parallel.is_main:
        return None
    model, _ = load_model(a.model_name_or_path, "cpu", a.dtype, a.trust_remote_code, tokenizer_source)
    if a.mode != "full":
        model = attach_lora(model, a.lora_r, a.lora_alpha, a.lora_dropout, a.lora_target_modules,
                            masked=a.mode == "masked-lora")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in trained.items():
            params[name].copy_(value)
    del student
    if parallel.device.type == "cuda":
        torch.cuda.empty_cache()
    return model.to(parallel.device)


def _close(parallel) -> None:
    if parallel is not None:
        parallel.close()


def _param_masks(model, masks):
    """Masks keyed by the parameter names of `model` (None when nothing is masked)."""
    if not masks:
        return None
    names = {n for n, _ in model.named_parameters()}
    return {n: m for n, m in masks.items() if n in names}


def _finish(output_dir: Path, summary: dict, log: MetricsLog, result, say) -> None:
    lines = ["", "=== summary ==="]
    if result is not None:
        lines.append(f"steps {result.steps} | time {result.seconds / 60:.1f} min | final train loss "
                     f"{result.final_train_loss:.4f}" if result.final_train_loss is not None else f"steps {result.steps}")
    before, after = summary.get("eval_before"), summary.get("eval_after")
    if after:
        which = f"best checkpoint's (step {after['step']}, loaded at the end)" if summary.get("loaded_best") else "final"
        lines.append(f"{which} eval loss {after['eval_loss']:.4f} | perplexity {after['eval_ppl']:.2f}")
    if summary.get("best_eval"):
        best = summary["best_eval"]
        lines.append(f"best eval perplexity {best['eval_ppl']:.2f} at step {best['step']}"
                     + (f" ({summary['best_checkpoint']})" if summary.get("best_checkpoint") else ""))
    if before and after:
        lines.append(f"perplexity: pruned {before['eval_ppl']:.2f} -> recovered {after['eval_ppl']:.2f} "
                     "(validation blocks; spruce eval gives the test-split number)")
    lines += QualityColumns.lines(summary)
    if summary.get("eval_merged"):
        lines.append(f"merged model perplexity {summary['eval_merged']['eval_ppl']:.2f} "
                     f"(zero set unchanged: {summary['merged_zero_set_unchanged']})")
    for line in lines:
        say(line)
    log.write({"event": "summary", **{k: v for k, v in summary.items() if not isinstance(v, dict)}})
    write_json(output_dir / "summary.json", summary)
