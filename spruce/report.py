"""Run-folder records a person can read: metrics.jsonl, config.yaml, report.md with plots, and
`spruce compare` tables across runs."""

from __future__ import annotations

import json
import platform
import re
import time
from pathlib import Path

import yaml

from .errors import SpruceError


class MetricsLog:
    """Append-only JSON-lines log; every row gets a wall-clock timestamp."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def write(self, row: dict) -> dict:
        row = {"time": round(time.time(), 3), **row}
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


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_layer_sparsity(layers: dict[str, float], path: Path) -> bool:
    """Sparsity of every decoder linear, grouped by layer index, as a PNG."""
    if not layers:
        return False
    plt = _pyplot()
    by_kind: dict[str, list[tuple[int, float]]] = {}
    for name, ratio in layers.items():
        m = re.search(r"\.(\d+)\.(?:.*\.)?(\w+)$", name)
        if m:
            by_kind.setdefault(m.group(2), []).append((int(m.group(1)), ratio))
    fig, ax = plt.subplots(figsize=(8, 3.6))
    for kind, points in sorted(by_kind.items()):
        points.sort()
        ax.plot([p[0] for p in points], [100 * p[1] for p in points], marker=".", label=kind)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("zeros (%)")
    ax.set_title("sparsity per layer and module")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def perplexity_table(results: dict[str, dict], in_domain: str | None = None,
                     labels: dict[str, str] | None = None) -> str:
    """Markdown table of stage -> perplexity, ratio to dense, sparsity; with a held-out corpus
    (results carrying "heldout"), its perplexity and ratio to dense as two more columns.
    `in_domain` names the in-domain corpus/split in the header; `labels` names the rows
    (default: the stage keys)."""
    labels = labels or {}
    dense = results.get("dense", {}).get("ppl")
    dense_held = results.get("dense", {}).get("heldout", {}).get("ppl")
    held_name = next((r["heldout"]["corpus"] for r in results.values() if r.get("heldout")), None)
    split = f"/{in_domain.rpartition('/')[2]}" if in_domain and "/" in in_domain else ""
    head = f"{in_domain} perplexity" if in_domain else "perplexity"
    lines = [f"| model | {head} | x dense |", "| --- | ---: | ---: |"]
    if held_name:
        lines[0] += f" held-out {held_name}{split} perplexity | x dense |"
        lines[1] += " ---: | ---: |"
    lines[0] += " sparsity of decoder linears |"
    lines[1] += " ---: |"
    tasks = sorted({t for r in results.values() for t in r.get("zero_shot", {})})
    if tasks:
        lines[0] += "".join(f" {t} |" for t in tasks)
        lines[1] += " ---: |" * len(tasks)
    for stage, r in results.items():
        ratio = f"{r['ppl'] / dense:.2f}" if dense else "-"
        row = f"| {labels.get(stage, stage)} | {r['ppl']:,.2f} | {ratio} |"
        if held_name:
            held = r.get("heldout", {}).get("ppl")
            row += (f" {held:,.2f} | {held / dense_held:.2f} |" if held and dense_held else
                    f" {held:,.2f} | - |" if held else " - | - |")
        scores = "".join(f" {100 * r['zero_shot'][t]:.1f} |" if t in r.get("zero_shot", {}) else " - |" for t in tasks)
        lines.append(f"{row} {100 * r['sparsity']:.2f}% |{scores}")
    return "\n".join(lines)


def write_run_report(folder: Path, config: dict, results: dict[str, dict], sparsity: dict | None,
                     seconds: dict, labels: dict[str, str] | None = None) -> None:
    """report.md: what was done, the perplexity table (rows named by `labels`), plots, timings
    and the recipe."""
    d, p, r = config["data"], config["prune"], config["recover"]
    any_result = next(iter(results.values()), None)
    parts = [f"# spruce run: {Path(config['output_dir']).name}", ""]
    parts += [f"Model `{config['model']}` ({config['dtype']}); pruned to {p['sparsity']:.0%} in `{p['pattern']}` "
              f"with {sparsity['method'] if sparsity else p['method'] or 'the default recipe'}"
              + (f" in {len(p['rounds'])} progressive rounds" if p.get("rounds") else "")
              + f"; recovered with {r['mode']} on `{r['corpus'] or d['corpus']}`"
              + (", distilled from the dense model" if r["teacher"] else "") + ".", ""]
    ref = config.get("prune_reference")
    if ref and "reference" in results:
        parts += [f"For comparison, the same model pruned one-shot to {ref['sparsity']:.0%} in `{ref['pattern']}` "
                  f"with {ref['method'] or 'the default recipe'}"
                  + (f" ({', '.join(f'{k} {v}' for k, v in ref['options'].items() if v not in (None, {}))})"
                     if ref.get("options") else "") + ", not recovered.", ""]
    if results:
        parts += [perplexity_table(results, f"{d['corpus']}/{d['eval_split']}", labels), ""]
        parts += [f"Perplexity on `{d['corpus']}` split `{d['eval_split']}`, seqlen {any_result['seqlen']}, "
                  f"{any_result['windows']} windows ({any_result['tokens']:,} tokens). The recovered row is the "
                  "merged model (adapter folded in, zero set kept).", ""]
        held = any_result.get("heldout")
        if held:
            parts += [f"Held-out: `{held['corpus']}` split `{d['eval_split']}`, a corpus this recipe never calibrated "
                      f"or trained on, seqlen {held['seqlen']}, {held['windows']} windows ({held['tokens']:,} "
                      "tokens): in-domain numbers alone flatter recovery.", ""]
        if "reference" in results and "pruned" in results:
            parts += [f"One-shot, the reference recipe's perplexity is "
                      f"{results['reference']['ppl'] / results['pruned']['ppl']:,.1f}x that of the `prune` recipe.", ""]
        if "pruned" in results and "recovered" in results:
            held = [results[k].get("heldout", {}).get("ppl") for k in ("pruned", "recovered")]
            parts += [f"Recovery brought perplexity from {results['pruned']['ppl']:,.2f} to "
                      f"{results['recovered']['ppl']:,.2f} at the same sparsity"
                      + (f" (held out: from {held[0]:,.2f} to {held[1]:,.2f})" if all(held) else "") + ".", ""]
    if sparsity and plot_layer_sparsity(sparsity.get("layers", {}), folder / "plots" / "layer_sparsity.png"):
        parts += ["## Sparsity per layer", "", "![sparsity per layer](plots/layer_sparsity.png)", ""]
    if (folder / "recover" / "curves.png").exists():
        parts += ["## Training", "", "![training curves](recover/curves.png)", ""]
    timings = ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items() if v is not None)
    if timings:
        parts += ["## Timings", "", timings, ""]
    parts += ["## Recipe", "", "```yaml", yaml.safe_dump(config, sort_keys=False).rstrip(), "```", ""]
    (folder / "report.md").write_text("\n".join(parts))


def compare_runs(folders: list[str]) -> list[dict]:
    """One row per run folder: recipe essentials and the perplexities of its stages."""
    rows = []
    for folder in map(Path, folders):
        config_path = folder / "config.yaml"
        if not config_path.is_file():
            raise SpruceError(f"{folder} is not a spruce run folder (no config.yaml)")
        config = yaml.safe_load(config_path.read_text())
        row = {"run": str(folder), "model": config["model"], "pattern": config["prune"]["pattern"],
               "target_sparsity": config["prune"]["sparsity"], "recover": config["recover"]["mode"]}
        for stage in ("baseline", "prune", "recover"):
            marker = folder / "stages" / f"{stage}.json"
            if marker.is_file():
                for key, value in json.loads(marker.read_text()).items():
                    if key in ("dense", "pruned", "recovered"):
                        row[f"{key}_ppl"] = value["ppl"]
                        row[f"{key}_sparsity"] = value["sparsity"]
                        if value.get("heldout"):
                            row["heldout"] = value["heldout"]["corpus"]
                            row[f"{key}_heldout_ppl"] = value["heldout"]["ppl"]
        rows.append(row)
    return rows


def compare_markdown(rows: list[dict]) -> str:
    """One line per run: in-domain dense / pruned / recovered perplexity and recovered x dense, and
    the same on the held-out corpus when any run measured one."""
    held = any("heldout" in row for row in rows)
    lines = ["| run | model | pattern | recover | sparsity | dense | pruned | recovered | recovered x dense |",
             "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    if held:
        lines[0] += " held-out | held-out dense | held-out pruned | held-out recovered | held-out recovered x dense |"
        lines[1] += " --- | ---: | ---: | ---: | ---: |"

    def cell(row, key, fmt="{:,.2f}"):
        return fmt.format(row[key]) if key in row else "-"

    def ratio(row, key, base):
        return f"{row[key] / row[base]:.2f}" if key in row and base in row else "-"

    for row in rows:
        measured = row.get("recovered_sparsity", row.get("pruned_sparsity"))
        line = (f"| {row['run']} | {row['model']} | {row['pattern']} | {row['recover']} | "
                f"{'-' if measured is None else f'{100 * measured:.1f}%'} | {cell(row, 'dense_ppl')} | "
                f"{cell(row, 'pruned_ppl')} | {cell(row, 'recovered_ppl')} | {ratio(row, 'recovered_ppl', 'dense_ppl')} |")
        if held:
            line += (f" {row.get('heldout', '-')} | {cell(row, 'dense_heldout_ppl')} | {cell(row, 'pruned_heldout_ppl')} | "
                     f"{cell(row, 'recovered_heldout_ppl')} | {ratio(row, 'recovered_heldout_ppl', 'dense_heldout_ppl')} |")
        lines.append(line)
    return "\n".join(lines)
