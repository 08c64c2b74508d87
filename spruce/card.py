"""Model cards: the README.md that every model folder spruce saves carries, so that a folder
pushed to the Hugging Face Hub says what it is.

The card is built from what the folder holds: config.json (architecture, and the compressed
format when there is one) and sparsity.json (base model, method, pattern, measured sparsity,
calibration data, the perplexity measured after pruning, the command). It is written whenever
sparsity.json is (`spruce.masks.write_sparsity_json` / `copy_sparsity_json`), so pruned, merged,
fine-tuned and compressed folders all get one.
"""

from __future__ import annotations

import json
import re
import shlex
from collections import Counter
from pathlib import Path

CARD_FILE = "README.md"

# the command line of the running spruce command (set by spruce.cli.main); None outside the CLI
COMMAND: list[str] | None = None


def set_command(argv: list[str]) -> None:
    global COMMAND
    COMMAND = ["spruce", *argv]


def current_command() -> str | None:
    return shlex.join(COMMAND) if COMMAND else None


def _display_name(folder: Path) -> str:
    """The folder's final name (cards are written inside outdir.atomic_dir's `.NAME.partial-XXXX`)."""
    m = re.match(r"^\.(.+)\.partial-[^.]*$", folder.name)
    return m.group(1) if m else folder.name


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _calibration(info: dict) -> str | None:
    calib = info.get("calibration")
    if not calib:
        return None
    recipe = info.get("recipe") or {}
    corpus = recipe.get("calib_dataset") or (recipe.get("data") or {}).get("corpus")
    seed = recipe.get("seed")
    text = f"{calib.get('nsamples')} samples x {calib.get('seqlen')} tokens"
    if corpus:
        text += f" of {corpus} (train split)"
    return text + (f", seed {seed}" if seed is not None else "")


def _method(info: dict) -> str | None:
    method = info.get("method")
    if not method:
        return None
    parts = [method]
    used = Counter((info.get("linear_methods") or {}).values())
    if set(used) - {method}:    # obs with its refit per linear, or the sparsegpt fallback on some
        parts[0] += " (" + ", ".join(f"{m} on {n} linears" for m, n in sorted(used.items())) + ")"
    if info.get("reconstruct"):
        r = info["reconstruct"]
        parts.append(f"layer reconstruction ({r.get('epochs')} epochs, lr {r.get('lr')})")
    if info.get("permute"):
        parts.append("MLP features reordered for the block tiles first (same function)")
    if info.get("module_patterns"):
        parts.append("module patterns " + ", ".join(f"{k} {v}" for k, v in info["module_patterns"].items()))
    if info.get("module_sparsity"):
        parts.append("module sparsity " + ", ".join(f"{k} {v:.0%}" for k, v in info["module_sparsity"].items()))
    if info.get("allocation") not in (None, "uniform"):
        parts.append(f"{info['allocation']} allocation")
    return ", ".join(parts)


def model_card(folder: str | Path, perplexities: list[dict] | None = None) -> str:
    """The Markdown card of a saved model folder.

    perplexities: extra rows {"model", "dataset", "split", "seqlen", "windows", "ppl"} measured
    in the run, beside the one sparsity.json holds."""
    folder = Path(folder)
    config = _read_json(folder / "config.json")
    info = _read_json(folder / "sparsity.json")
    recipe = info.get("recipe") or {}
    base = recipe.get("model")
    quant = config.get("quantization_config") or {}
    compressed = quant.get("quant_method") == "spruce_block_sparse"
    arch = (config.get("architectures") or [config.get("model_type", "causal LM")])[0]
    this_command = current_command()
    made_by = info.get("command")

    tags = ["spruce", "pruned", "sparse"] + (["block-sparse"] if "x" in str(info.get("pattern", "")) else [])
    front = ["---", "library_name: transformers", "pipeline_tag: text-generation",
             "tags:", *[f"- {t}" for t in tags]]
    if base and "/" in base and not Path(base).exists():  # a Hub id
        front.append(f"base_model: {base}")
    front.append("---")

    name = _display_name(folder)
    lines = [*front, "", f"# {name}", ""]
    if info:
        lines.append(f"{arch} pruned by spruce to {info.get('measured_sparsity', 0):.2%} sparsity of its "
                     f"decoder linear weights in the `{info.get('pattern')}` pattern.")
    else:
        lines.append(f"{arch} saved by spruce.")
    lines += ["", "| | |", "| --- | --- |"]
    rows = [("base model", f"`{base}`" if base else None), ("method", _method(info)),
            ("pattern", f"`{info['pattern']}` ({info.get('selection')} selection)" if info.get("pattern") else None),
            ("sparsity", f"{info['measured_sparsity']:.4f} measured (target {info.get('target_sparsity')})"
             if "measured_sparsity" in info else None),
            ("calibration data", _calibration(info)),
            ("storage", f"compressed: {quant.get('format')} version {quant.get('format_version')}, "
                        f"{len(quant.get('layers', {}))} block-sparse layers in {quant.get('block_size')}x"
                        f"{quant.get('block_size')} blocks (values + block indices)" if compressed
             else "dense safetensors with the pruned weights as zeros")]
    lines += [f"| {k} | {v} |" for k, v in rows if v]

    results = []
    if info.get("eval"):
        results.append({"model": "pruned", **info["eval"]})
    results += perplexities or []
    if results:
        lines += ["", "## Perplexity", "", "| model | corpus / split | seqlen x windows | perplexity |",
                  "| --- | --- | --- | --- |"]
        lines += [f"| {r.get('model', '')} | {r.get('dataset')} / {r.get('split')} | {r.get('seqlen')} x "
                  f"{r.get('windows')} | {r['ppl']:.3f} |" for r in results if "ppl" in r]

    commands = [c for c in dict.fromkeys([made_by, this_command]) if c]
    if commands:
        lines += ["", "## How it was made", "", "```", *commands, "```"]
    load = ["import spruce  # registers the block-sparse loader", ""] if compressed else []
    lines += ["", "## Use", "", "```python", *load, "from transformers import AutoModelForCausalLM", "",
              f'model = AutoModelForCausalLM.from_pretrained("{name}")', "```"]
    if compressed:
        lines += ["", "The block-sparse layers load as `spruce.kernels.BlockSparseLinear` (Triton kernels on "
                  "CUDA in bfloat16 / float16, a torch reference on the CPU); `model.dequantize()` gives back "
                  "the dense pruned weights exactly."]
    elif info:
        lines += ["", "`spruce compress` stores it as block values plus block indices, and "
                  "`spruce generate` runs it on block-sparse kernels."]
    return "\n".join(lines) + "\n"


def write_model_card(folder: str | Path, perplexities: list[dict] | None = None) -> None:
    Path(folder, CARD_FILE).write_text(model_card(folder, perplexities))
