"""Watching a training run: log lines, best-so-far tracking, plain-word diagnostics, curves.

The diagnostics say what users of recovery fine-tuning look for by eye: eval loss rising while
train loss falls (overfitting), a flat loss (nothing learns), a jumping loss (learning rate too
high). Each fires once, as a warning line, with what to try.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

OVERFIT = ("overfitting: eval loss rose {n} evaluations in a row while train loss fell; try a lower "
           "--learning_rate, more --lora_dropout, fewer epochs, more data (e.g. a mix with a second corpus) "
           "or --load_best_model_at_end")
GAP_NATS = 0.5  # eval perplexity 1.65x the train perplexity
GAP = ("overfitting: eval loss {eval:.3f} is {gap:.2f} above train loss {train:.3f} (eval perplexity {ratio:.1f}x "
       "train): the model is learning its training text by heart; try a lower --learning_rate, more "
       "--lora_dropout, fewer epochs, more data (e.g. a mix with a second corpus) or --load_best_model_at_end")
FLAT = ("loss is flat: it changed less than 1% over {n} logged steps; the learning rate may be too low, "
        "or nothing is trainable")
STALLED = ("loss is not falling: the mean of the last {n} logged losses ({late:.3f}) is no lower than of the "
           "first {n} ({early:.3f}); the learning rate may be too high (the updates overshoot) or the data may not "
           "suit (check the corpus and --block_size)")
JUMPING = ("loss is jumping: it rose to {ratio:.1f}x its lowest value; the learning rate may be too high")


@dataclass
class Monitor:
    """Keeps the history of one run and decides what to say about it."""

    overfit_patience: int = 2
    train: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    best: dict | None = None
    said: set = field(default_factory=set)
    compare_losses: bool = True       # train loss is the LM loss (no distillation), comparable with eval loss

    def on_train(self, row: dict) -> list[str]:
        self.train.append(row)
        losses = [r["loss"] for r in self.train]
        notes = []
        if len(losses) >= 5 and "flat" not in self.said:
            recent = losses[-5:]
            if abs(recent[0] - recent[-1]) < 0.01 * abs(recent[0]) and max(recent) - min(recent) < 0.01 * abs(recent[0]):
                notes.append(self._say("flat", FLAT.format(n=5)))
        n = 5
        if len(losses) >= 2 * n and not self.said & {"flat", "stalled"}:
            early, late = sum(losses[:n]) / n, sum(losses[-n:]) / n
            if late >= early:
                notes.append(self._say("stalled", STALLED.format(n=n, early=early, late=late)))
        low = min(losses[:-1], default=math.inf)
        if len(losses) >= 3 and losses[-1] > 1.5 * low and "jumping" not in self.said:
            notes.append(self._say("jumping", JUMPING.format(ratio=losses[-1] / low)))
        return notes

    def on_eval(self, row: dict) -> tuple[bool, list[str]]:
        """Record an evaluation; return (is it the best so far, notes)."""
        previous_best = self.best
        self.evals.append(row)
        improved = previous_best is None or row["eval_loss"] < previous_best["eval_loss"]
        if improved:
            self.best = row
        notes = []
        k = self.overfit_patience
        if len(self.evals) > k and "overfit" not in self.said:
            last = [e["eval_loss"] for e in self.evals[-(k + 1):]]
            rising = all(b > a for a, b in zip(last, last[1:]))
            train_then = self._train_loss_at(self.evals[-(k + 1)]["step"])
            train_now = self._train_loss_at(row["step"])
            if rising and train_then is not None and train_now is not None and train_now < train_then:
                notes.append(self._say("overfit", OVERFIT.format(n=k)))
        train_now = self._train_loss_at(row["step"])
        # the train loss fell by more than the gap since the start (a diverging run's eval loss is
        # far above its train loss too, but its train loss has not fallen)
        fell = train_now is not None and train_now < self.train[0]["loss"] - GAP_NATS
        if self.compare_losses and fell and "gap" not in self.said and "overfit" not in self.said \
                and row["eval_loss"] - train_now > GAP_NATS:
            gap = row["eval_loss"] - train_now
            notes.append(self._say("gap", GAP.format(eval=row["eval_loss"], gap=gap, train=train_now,
                                                     ratio=math.exp(gap))))
        return improved, notes

    def evals_since_best(self) -> int:
        if self.best is None:
            return 0
        return len(self.evals) - 1 - self.evals.index(self.best)

    def _train_loss_at(self, step: int) -> float | None:
        rows = [r for r in self.train if r["step"] <= step]
        return rows[-1]["loss"] if rows else None

    def _say(self, key: str, text: str) -> str:
        self.said.add(key)
        return text

    def state(self) -> dict:
        return {"train": self.train, "evals": self.evals, "best": self.best, "said": sorted(self.said)}

    @classmethod
    def from_state(cls, state: dict, overfit_patience: int = 2) -> "Monitor":
        return cls(overfit_patience, state.get("train", []), state.get("evals", []), state.get("best"),
                   set(state.get("said", [])))


def plot_curves(monitor: Monitor, path: Path, title: str = "recovery fine-tuning") -> bool:
    """Train and eval loss, and eval perplexity, as one PNG; False when there is nothing to plot."""
    if not monitor.train and not monitor.evals:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    if monitor.train:
        ax1.plot([r["step"] for r in monitor.train], [r["loss"] for r in monitor.train], label="train loss")
    if monitor.evals:
        steps = [r["step"] for r in monitor.evals]
        ax1.plot(steps, [r["eval_loss"] for r in monitor.evals], marker="o", label="eval loss")
        ax2.plot(steps, [r["eval_ppl"] for r in monitor.evals], marker="o", color="tab:red")
        ax2.set_yscale("log")
    ax1.set_xlabel("step")
    ax1.set_ylabel("loss")
    ax1.legend()
    ax1.grid(alpha=0.3)
    ax2.set_xlabel("step")
    ax2.set_ylabel("eval perplexity (log)")
    ax2.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


class TensorBoard:
    """TensorBoard event files when the tensorboard package is present; silent otherwise."""

    def __init__(self, folder: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            self.writer = None
        else:
            self.writer = SummaryWriter(str(folder))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.writer:
            self.writer.close()
