"""Disk size and peak loading memory of a compressed checkpoint against the dense one (CPU).

    python bench/compress_memory.py --layers 2 --json out/compress_memory.json

Builds a Llama-2-7B-shaped model (hidden 4096, MLP 11008, vocabulary 32000) with --layers decoder
layers and random float16 weights, prunes every decoder linear to 50% zero 16x16 blocks (the
half of the blocks with the smallest L1 norm in each matrix: cheap, and the stored bytes do not
depend on which blocks go), saves it dense and compressed, and loads each in a fresh process with
plain `AutoModelForCausalLM.from_pretrained` (after `import spruce`) followed by a one-token
forward pass (safetensors maps the file, so only the pass reads every weight in). The peak
resident memory of that process (VmHWM) above its resident memory before the load is reported.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import sys, torch, transformers, spruce

def status(key):  # this process's own counters (ru_maxrss would carry the parent's peak over)
    for line in open('/proc/self/status'):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

before = status('VmRSS')
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float16)
with torch.no_grad():  # safetensors maps the file: a forward pass reads every weight into memory
    model(torch.tensor([[1]]))
kinds = sorted({type(m).__name__ for m in model.modules() if 'Linear' in type(m).__name__})
print(before, status('VmHWM'), ','.join(kinds))
"""


def build(folder: Path, layers: int) -> dict:
    import torch
    from transformers import LlamaForCausalLM

    from bench.common import llama2_7b_config
    from spruce.compress import dense_size, save_compressed, weights_bytes
    from spruce.kernels import BlockSparseLinear
    from spruce.models import prunable_linears

    config = llama2_7b_config(layers, dtype="float16")
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(torch.float16)
    model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02, generator=gen)
        for linear in prunable_linears(model).values():
            w = linear.weight
            r, c = w.shape
            norms = w.float().abs().reshape(r // 16, 16, c // 16, 16).sum((1, 3))
            keep = norms > norms.flatten().median()
            w.mul_(keep.repeat_interleave(16, 0).repeat_interleave(16, 1).to(w.dtype))
    model.save_pretrained(folder / "dense")
    dense = dense_size(model)
    linears = sum(m.weight.numel() * m.weight.element_size() for m in prunable_linears(model).values())
    save_compressed(model, None, folder / "compressed", 16)
    stored = sum(m.sparse_weight.nbytes for m in model.modules() if isinstance(m, BlockSparseLinear))
    return {"dense_bytes_in_memory": dense, "dense_file_bytes": weights_bytes(folder / "dense"),
            "compressed_file_bytes": weights_bytes(folder / "compressed"),
            "decoder_linear_dense_bytes": linears, "decoder_linear_compressed_bytes": stored}


def peak_load(folder: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(folder)], capture_output=True, text=True, check=True)
    before, peak, kinds = out.stdout.split()[-3:]
    return {"rss_before": int(before), "peak_rss": int(peak), "load_peak_bytes": int(peak) - int(before),
            "linear_types": kinds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        row = {"layers": args.layers, **build(tmp, args.layers)}
        row["dense_load"] = peak_load(tmp / "dense")
        row["compressed_load"] = peak_load(tmp / "compressed")
    row["compressed_fraction"] = row["compressed_file_bytes"] / row["dense_file_bytes"]
    row["decoder_linear_fraction"] = row["decoder_linear_compressed_bytes"] / row["decoder_linear_dense_bytes"]
    gib = 2 ** 30
    print(f"files: dense {row['dense_file_bytes'] / gib:.3f} GiB, compressed {row['compressed_file_bytes'] / gib:.3f} GiB "
          f"({row['compressed_fraction']:.1%}); decoder linears {row['decoder_linear_fraction']:.2%} of their dense bytes")
    for kind in ("dense_load", "compressed_load"):
        r = row[kind]
        print(f"{kind}: peak resident memory (VmHWM) above the start {r['load_peak_bytes'] / gib:.3f} GiB ({r['linear_types']})")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(row, indent=2) + "\n")


if __name__ == "__main__":
    main()
