"""Run-folder records: metrics.jsonl (one JSON object per event), config.yaml, report.md, plots."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import yaml


class MetricsLog:
    """Append-only JSON-lines log; every row gets a wall-clock timestamp."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.rows: list[dict] = []

    def write(self, row: dict) -> dict:
        row = {"time": round(time.time(), 3), **row}
        self.rows.append(row)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        return row


def versions() -> dict:
    import peft
    import torch
    import transformers

    from . import __version__

    return {"spruce": __version__, "python": platform.python_version(), "torch": str(torch.__version__),
            "transformers": transformers.__version__, "peft": peft.__version__}


def write_config(folder: Path, config: dict) -> None:
    payload = {**config, "versions": versions()}
    (folder / "config.yaml").write_text(yaml.safe_dump(payload, sort_keys=False))


def plot_training(train_rows: list[dict], path: Path) -> bool:
    """Training-loss curve as PNG; False when there is nothing to plot."""
    if not train_rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in train_rows], [r["loss"] for r in train_rows], marker=".")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    ax.set_title("LoRA recovery: training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def perplexity_table(results: dict[str, dict]) -> str:
    """Markdown table of stage -> perplexity, ratio to dense, sparsity."""
    dense = results.get("dense", {}).get("ppl")
    lines = ["| model | perplexity | x dense | sparsity of decoder linears |",
             "| --- | ---: | ---: | ---: |"]
    for stage, r in results.items():
        ratio = f"{r['ppl'] / dense:.2f}" if dense else "-"
        lines.append(f"| {stage} | {r['ppl']:,.2f} | {ratio} | {100 * r['sparsity']:.1f}% |")
    return "\n".join(lines)


def write_report(folder: Path, title: str, config: dict, results: dict[str, dict],
                 train_rows: list[dict], notes: list[str]) -> None:
    """report.md: the perplexity table, how it was measured, the loss curve and the config."""
    any_result = next(iter(results.values()))
    has_plot = plot_training(train_rows, folder / "plots" / "train_loss.png")
    parts = [
        f"# {title}", "",
        perplexity_table(results), "",
        f"Perplexity on `{config['data']['corpus']}` split `{config['data']['eval_split']}`, "
        f"seqlen {any_result['seqlen']}, {any_result['windows']} windows "
        f"({any_result['tokens']:,} tokens), model `{config['model']}` in {config['dtype']}.", "",
    ]
    parts += [f"- {n}" for n in notes] + [""]
    if has_plot:
        parts += ["![training loss](plots/train_loss.png)", ""]
    parts += ["## Configuration", "", "```yaml", yaml.safe_dump(config, sort_keys=False).rstrip(), "```", ""]
    (folder / "report.md").write_text("\n".join(parts))
