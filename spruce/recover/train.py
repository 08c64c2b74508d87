"""One readable training loop: next-token loss on packed blocks, AdamW, warm-up + cosine."""

from __future__ import annotations

import math
import time
from typing import Callable

import torch
from tqdm.auto import tqdm


def cosine_with_warmup(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train(model, blocks: torch.Tensor, steps: int, lr: float, batch_size: int = 1,
          warmup: int = 10, seed: int = 0, log_every: int = 10,
          on_log: Callable[[dict], None] | None = None, progress: bool = True) -> list[dict]:
    """Train the trainable parameters of `model` on random batches of `blocks`; return log rows."""
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters")
    optim = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: cosine_with_warmup(s, steps, warmup))
    gen = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(blocks.shape[0], generator=gen)
                       for _ in range(math.ceil(steps * batch_size / blocks.shape[0]))])
    model.train()
    rows, window, start = [], [], time.time()
    bar = tqdm(range(steps), desc="training", unit="step", disable=not progress)
    for step in bar:
        ids = blocks[order[step * batch_size:(step + 1) * batch_size]].to(device)
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optim.step()
        sched.step()
        optim.zero_grad(set_to_none=True)
        window.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            elapsed = time.time() - start
            row = {"event": "train", "step": step + 1, "loss": sum(window) / len(window),
                   "lr": sched.get_last_lr()[0], "epoch": (step + 1) * batch_size / blocks.shape[0],
                   "tokens_per_s": (step + 1) * ids.numel() / elapsed}
            rows.append(row)
            window = []
            bar.set_postfix(loss=f"{row['loss']:.3f}")
            if on_log:
                on_log(row)
    model.eval()
    return rows
