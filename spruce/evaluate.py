"""Perplexity by the Wanda / SparseGPT protocol, and the sparsity a model actually has.

The test split is joined with blank lines, tokenized once and cut into non-overlapping
windows of `seqlen` tokens (the tail dropped); perplexity = exp(mean next-token NLL over all
windows). Numbers are reported with their seqlen and window count so they compare with
published tables.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from .progress import progress_bar


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 1, progress: bool = True,
               desc: str = "perplexity") -> dict:
    """Perplexity of `model` over `windows` (n, seqlen); returns ppl, nll, windows, tokens, seconds."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll_sum, count = 0.0, 0
    start = time.time()
    with progress_bar(total=windows.shape[0], desc=desc, unit="win", show=progress) as bar:
        for i in range(0, windows.shape[0], batch_size):
            ids = windows[i:i + batch_size].to(device)
            logits = model(ids, use_cache=False).logits[:, :-1].float()
            targets = ids[:, 1:]
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
            nll_sum += nll.item()
            count += targets.numel()
            bar.update(ids.shape[0])
            bar.set_postfix(ppl=f"{math.exp(nll_sum / count):.2f}")
    model.train(was_training)
    mean = nll_sum / max(count, 1)
    return {
        "ppl": math.exp(mean) if math.isfinite(mean) else float("inf"),
        "nll": mean,
        "windows": int(windows.shape[0]),
        "seqlen": int(windows.shape[1]),
        "tokens": int(windows.numel()),
        "seconds": round(time.time() - start, 2),
    }



ZERO_SHOT_TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")


def require_lm_eval():
    """The lm-eval entry points, or one clear error when the harness is not installed."""
    from .errors import SpruceError

    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise SpruceError("zero-shot tasks need lm-evaluation-harness: pip install lm-eval "
                          "(its task data also needs the Hugging Face Hub or a local cache)") from None
    return simple_evaluate, HFLM


def zero_shot(model, tokenizer, tasks: list[str], batch_size: int = 8, limit: int | None = None) -> dict:
    """Zero-shot accuracy per task through lm-evaluation-harness, on the in-memory model."""
    from .errors import SpruceError

    simple_evaluate, HFLM = require_lm_eval()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        out = simple_evaluate(model=lm, tasks=list(tasks), limit=limit)
    except (OSError, ConnectionError, ValueError) as e:
        raise SpruceError(f"lm-eval could not run {', '.join(tasks)} ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:120]}); offline, its task data cannot be fetched") from None
    scores = {}
    for task, metrics in out["results"].items():
        acc = metrics.get("acc_norm,none", metrics.get("acc,none"))
        if acc is not None:
            scores[task] = acc
    return scores
