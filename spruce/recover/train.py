"""One readable training loop for recovery: LoRA, masked full fine-tuning, distillation.

    loop: batch -> (teacher logits) -> loss -> backward -> mask gradients -> step -> re-zero pruned
          weights -> log / evaluate / checkpoint

Data order is a seeded permutation per epoch, so a run resumed from a checkpoint sees the same
batches, optimizer and scheduler states and RNG states as one that never stopped.

Several processes (torchrun, accelerate launch): `Parallel` wraps the model with DDP (through
accelerate) or FSDP2 (torch's fully_shard, one unit per decoder layer). Every optimizer step
takes one global batch of batch_size x grad_accum x world_size blocks from the same seeded order,
rank r reading its slice of each micro-batch, so the data a step sees does not depend on how
many processes share it and a resumed run continues exactly. Masks are applied to each process's
shard of the weights and gradients, so pruned weights stay exactly zero under FSDP too. Only
rank 0 logs and writes.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import SpruceError
from ..progress import progress_bar
from .checkpoint import list_checkpoints, load_checkpoint, prune_checkpoints, save_checkpoint
from .monitor import Monitor, TensorBoard
from .parallel import Parallel, local_part, local_view


SCHEDULERS = ("linear", "cosine", "constant")   # learning-rate decay after the warm-up


@dataclass
class TrainArgs:
    steps: int                        # optimizer steps in total
    lr: float = 1e-4                  # peak learning rate
    batch_size: int = 1               # blocks per micro-batch
    grad_accum: int = 1               # micro-batches per optimizer step
    eval_batch_size: int = 8          # blocks per evaluation forward pass
    warmup_steps: int = 0             # linear warm-up steps
    scheduler: str = "linear"         # linear | cosine | constant (decay after warm-up)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    logging_steps: int = 10           # log the mean train loss every N steps
    logging_first_step: bool = False  # also log after the first step
    tensorboard: bool = True          # write TensorBoard events under OUTPUT_DIR/runs
    eval_steps: int | None = None     # evaluate every N steps (and at the end)
    save_steps: int | None = None     # checkpoint every N steps
    save_total_limit: int | None = None  # keep at most N checkpoints (the best is never deleted)
    load_best_model_at_end: bool = False
    early_stopping_patience: int | None = None  # stop after N evaluations without a new best
    seed: int = 42
    bf16: bool = False                # autocast matmuls to bfloat16
    distill_alpha: float = 0.0        # weight of the KL-to-teacher term (needs a teacher)
    distill_temperature: float = 2.0
    distill_hidden: float = 0.0       # weight of the hidden-state term (needs a teacher)

    def __post_init__(self):
        if self.steps <= 0:
            raise SpruceError(f"training needs at least one step, got {self.steps}")
        if self.scheduler not in SCHEDULERS:
            raise SpruceError(f"unknown lr scheduler '{self.scheduler}'; use linear, cosine or constant")
        if not 0 <= self.distill_alpha <= 1:
            raise SpruceError(f"distill alpha must be in [0, 1], got {self.distill_alpha}")
        if self.distill_hidden < 0:
            raise SpruceError(f"the hidden-state distillation weight must be >= 0, got {self.distill_hidden}")


@dataclass
class TrainResult:
    steps: int
    seconds: float
    final_train_loss: float | None
    monitor: Monitor
    best_checkpoint: str | None = None
    stopped_early: bool = False
    notes: list[str] = field(default_factory=list)
    loaded_best: bool = False         # the model holds the best checkpoint's weights, not the last step's


def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress


@functools.lru_cache(maxsize=4)
def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))


def batch_indices(step: int, micro: int, n: int, batch_size: int, grad_accum: int, seed: int,
                  rank: int = 0, world: int = 1) -> torch.Tensor:
    """Indices of the blocks in micro-batch `micro` of optimizer step `step` (seeded per epoch).
    With `world` processes the global micro-batch holds batch_size x world blocks; rank r reads
    its slice, so the blocks a step sees do not depend on the number of processes."""
    first = ((step * grad_accum + micro) * world + rank) * batch_size
    return torch.stack([epoch_order(n, seed, i // n)[i % n] for i in range(first, first + batch_size)])


def hidden_state_loss(student: tuple, teacher: tuple) -> torch.Tensor:
    """Mean over decoder layers of the squared error between the student's and the teacher's
    outputs, each divided by the variance of the teacher's: every layer weighs the same whatever
    the scale of its residual stream. `student` and `teacher` are the models' `hidden_states`
    (the embeddings first, which carry no error and are skipped)."""
    terms = []
    for s, t in zip(student[1:], teacher[1:]):
        t = t.float()
        terms.append(F.mse_loss(s.float(), t) / t.var().clamp_min(1e-6))
    return torch.stack(terms).mean()


def _loss(model, ids, teacher, args: TrainArgs):
    hidden = teacher is not None and args.distill_hidden > 0
    out = model(input_ids=ids, labels=ids, use_cache=False, output_hidden_states=hidden)
    if teacher is None or (args.distill_alpha == 0 and not hidden):
        return out.loss
    with torch.no_grad():
        t_out = teacher(input_ids=ids, use_cache=False, output_hidden_states=hidden)
    loss = out.loss
    if args.distill_alpha > 0:
        t = args.distill_temperature
        kl = F.kl_div(F.log_softmax(out.logits.float() / t, -1).flatten(0, 1),
                      F.log_softmax(t_out.logits.float() / t, -1).flatten(0, 1),
                      log_target=True, reduction="batchmean") * t * t
        loss = args.distill_alpha * kl + (1 - args.distill_alpha) * out.loss
    if hidden:
        loss = loss + args.distill_hidden * hidden_state_loss(out.hidden_states, t_out.hidden_states)
    return loss


@torch.no_grad()
def eval_loss(model, blocks: torch.Tensor, batch_size: int, bf16: bool = False,
              parallel: Parallel | None = None) -> float:
    """Mean next-token loss over `blocks` (every block weighs the same). With `parallel` each
    process evaluates every world-th block (all run the same number of forward passes, which
    FSDP needs; padding blocks weigh nothing) and the sums are added up."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, weights = 0.0, torch.ones(blocks.shape[0])
    if parallel is not None:
        n, world = blocks.shape[0], parallel.world
        index = torch.arange(parallel.rank, math.ceil(n / world) * world, world)
        weights = (index < n).float()
        blocks = blocks[index.clamp(max=n - 1)]
    for i in range(0, blocks.shape[0], batch_size):
        ids = blocks[i:i + batch_size].to(device)
        w = weights[i:i + batch_size]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(input_ids=ids, labels=ids, use_cache=False)
        if parallel is None or bool((w == 1).all()):
            total += out.loss.item() * ids.shape[0]
        else:  # padding blocks: the per-block loss, weighed
            logits = out.logits[:, :-1].float()
            per_block = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").mean(1)
            total += float((per_block.cpu() * w).sum())
    model.train(was_training)
    if parallel is None:
        return total / blocks.shape[0]
    sums = parallel.all_sum(torch.tensor([total, float(weights.sum())], dtype=torch.float64))
    return float(sums[0] / sums[1])


def train(model, blocks: torch.Tensor, args: TrainArgs, eval_blocks: torch.Tensor | None = None,
          output_dir: Path | None = None, masks: dict[str, torch.Tensor] | None = None, teacher=None,
          resume_from: Path | None = None, on_event: Callable[[dict], None] | None = None,
          say: Callable[[str], None] = print, progress: bool = True,
          parallel: Parallel | None = None) -> TrainResult:
    """Train the parameters of `model` that require grad.

    `masks` maps parameter names to bool tensors, True where a weight is pruned: those weights get
    no gradient and are set back to exactly zero after every step (masked full fine-tuning).
    With `parallel`, `model` is the wrapped model (DDP or FSDP2) of one of several processes.
    """
    device = next(model.parameters()).device
    core = parallel.unwrap(model) if parallel else model
    rank, world = (parallel.rank, parallel.world) if parallel else (0, 1)
    main = rank == 0
    named = {n: p for n, p in core.named_parameters() if p.requires_grad}
    if not named:
        raise SpruceError("nothing to train: no parameter requires grad")
    # on FSDP each process masks its own rows of every weight and gradient
    masks = {n: local_part(named[n], m) for n, m in (masks or {}).items() if n in named}
    sharded = any(local_view(p) is not p for p in named.values())
    fused = device.type == "cuda" and not sharded and \
        all(p.dtype in (torch.float32, torch.bfloat16, torch.float16) for p in named.values())
    optimizer = torch.optim.AdamW(named.values(), lr=args.lr, weight_decay=args.weight_decay, fused=fused or None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, args.steps, args.warmup_steps, args.scheduler))
    ckpt_root = output_dir  # OUTPUT_DIR/checkpoint-N, as the Hugging Face Trainer writes them
    board = TensorBoard(output_dir / "runs") if output_dir and main and args.tensorboard else None
    monitor, step, best_ckpt = Monitor(), 0, None
    if resume_from is not None:
        state = load_checkpoint(resume_from, core, optimizer, scheduler, parallel)
        step, monitor = state["step"], Monitor.from_state(state["monitor"])
        best_ckpt = state.get("best_checkpoint")
        say(f"resumed from {resume_from} at step {step}")
    monitor.compare_losses = args.distill_alpha == 0 and args.distill_hidden == 0  # else the train loss has KL in it
    emit = (on_event or (lambda row: None)) if main else (lambda row: None)
    if not main:
        say = lambda *_: None  # noqa: E731

    def tell(line: str) -> None:
        with tqdm.external_write_mode():  # print above the progress bar, not through it
            say(line)

    n = blocks.shape[0]
    tokens_per_step = args.batch_size * args.grad_accum * world * blocks.shape[1]

    def evaluate() -> dict:
        loss = eval_loss(model, eval_blocks, args.eval_batch_size, args.bf16, parallel)
        row = {"event": "eval", "step": step, "eval_loss": loss, "eval_ppl": math.exp(min(loss, 700))}
        previous = monitor.best
        improved, notes = monitor.on_eval(row)
        row["best"] = improved
        emit(row)
        if board:
            board.scalars(step, {"eval/loss": loss, "eval/perplexity": row["eval_ppl"]})
        if improved:
            verdict = "best so far" if previous is None else \
                f"best so far ({row['eval_ppl'] - previous['eval_ppl']:+.2f} vs previous best {previous['eval_ppl']:.2f})"
        else:
            verdict = f"best {monitor.best['eval_ppl']:.2f} at step {monitor.best['step']}"
        tell(f"step {step}/{args.steps} | eval loss {loss:.4f} | perplexity {row['eval_ppl']:.2f} | {verdict}")
        for note in notes:
            tell(f"warning: {note}")
            emit({"event": "diagnostic", "step": step, "message": note})
        return row

    def checkpoint(is_best: bool) -> None:
        nonlocal best_ckpt
        folder = ckpt_root / f"checkpoint-{step}"
        if is_best:
            best_ckpt = str(folder)
        state = {"step": step, "monitor": monitor.state(), "best_checkpoint": best_ckpt, "args": asdict(args)}
        if parallel is not None:
            state["world_size"] = world
        save_checkpoint(folder, core, optimizer, scheduler, state, parallel)
        if main:
            prune_checkpoints(ckpt_root, args.save_total_limit, Path(best_ckpt) if best_ckpt else None)
        emit({"event": "checkpoint", "step": step, "path": str(folder)})

    model.train()
    start, window, stopped_early, last_loss = time.time(), [], False, None
    first_step = step
    bar = progress_bar(total=args.steps, initial=step, desc="training", unit="step", show=progress and main)
    while step < args.steps:
        losses = []
        for micro in range(args.grad_accum):
            ids = blocks[batch_indices(step, micro, n, args.batch_size, args.grad_accum, args.seed,
                                       rank, world)].to(device)
            last_micro = micro == args.grad_accum - 1
            with parallel.sync_gradients(model, last_micro) if parallel else contextlib.nullcontext():
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
                    loss = _loss(model, ids, teacher, args) / args.grad_accum
                loss.backward()
            losses.append(loss.item() * args.grad_accum)
        if parallel is not None:  # the mean over all processes: the same log and NaN verdict everywhere
            losses = (parallel.all_sum(torch.tensor(losses, dtype=torch.float64)) / world).tolist()
        window.extend(losses)
        if not math.isfinite(window[-1]):
            last = list_checkpoints(ckpt_root) if ckpt_root else []
            raise SpruceError(f"the loss became {window[-1]} at step {step + 1}; training stopped "
                              f"(last good checkpoint: {last[-1] if last else 'none'}); lower --learning_rate")
        for name, mask in masks.items():
            if named[name].grad is not None:
                local_view(named[name].grad).masked_fill_(mask, 0)
        torch.nn.utils.clip_grad_norm_(named.values(), args.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for name, mask in masks.items():
                local_view(named[name]).masked_fill_(mask, 0)
        step += 1
        bar.update(1)
        if step % args.logging_steps == 0 or step == args.steps or (step == 1 and args.logging_first_step):
            elapsed = time.time() - start
            last_loss = sum(window) / len(window)
            rate = (step - first_step) * tokens_per_step / max(elapsed, 1e-9)
            row = {"event": "train", "step": step, "loss": last_loss, "lr": scheduler.get_last_lr()[0],
                   "epoch": step * args.batch_size * args.grad_accum / n, "tokens_per_s": rate,
                   "eta_s": (args.steps - step) * tokens_per_step / max(rate, 1e-9)}
            window = []
            emit(row)
            if board:
                board.scalars(step, {"train/loss": last_loss, "train/lr": row["lr"]})
            bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{row['lr']:.2e}")
            tell(f"step {step}/{args.steps} | loss {last_loss:.4f} | lr {row['lr']:.2e} | epoch {row['epoch']:.2f} "
                f"| {rate:,.0f} tok/s | ETA {row['eta_s'] / 60:.1f} min")
            for note in monitor.on_train(row):
                tell(f"warning: {note}")
                emit({"event": "diagnostic", "step": step, "message": note})
        improved = False
        if eval_blocks is not None and args.eval_steps and (step % args.eval_steps == 0 or step == args.steps):
            improved = evaluate()["best"]
            if args.early_stopping_patience and monitor.evals_since_best() >= args.early_stopping_patience:
                tell(f"early stopping: no new best eval loss in {args.early_stopping_patience} evaluations")
                stopped_early = True
        if ckpt_root and ((args.save_steps and step % args.save_steps == 0) or step == args.steps
                          or stopped_early or (improved and args.load_best_model_at_end)):
            checkpoint(improved)
        if stopped_early:
            break
    bar.close()
    if board:
        board.close()
    loaded_best = False
    if args.load_best_model_at_end and best_ckpt and Path(best_ckpt).is_dir() and best_ckpt != str(ckpt_root / f"checkpoint-{step}"):
        from safetensors.torch import load_file

        with torch.no_grad():
            for name, value in load_file(str(Path(best_ckpt) / "trainable.safetensors")).items():
                local_view(named[name]).copy_(local_part(named[name], value))
        tell(f"loaded the best model from {best_ckpt}")
        loaded_best = True
    model.eval()
    return TrainResult(step, time.time() - start, last_loss, monitor, best_ckpt, stopped_early,
                       loaded_best=loaded_best)
