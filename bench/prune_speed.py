"""python -m bench.prune_speed --runs wanda:16x16,sparsegpt:16x16 --nsamples 128 --seqlen 2048

Pruning time on a Llama-2-7B-shaped model (32 layers, hidden 4096, MLP 11008, random float16
weights built on the GPU, so no download), with random calibration tokens. The clock runs from
the call of prune_model to its return: calibration capture, statistics, masks, weight updates.
`--layers N` builds fewer layers (quick checks); the table prints last.
"""

from __future__ import annotations

import argparse
import time

import torch


from bench.common import llama2_7b_config
from spruce.masks import overall_sparsity
from spruce.prune import prune_model
from spruce.prune import Reconstruct


def build_llama7b_shape(layers: int, dtype: torch.dtype, device: str):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(llama2_7b_config(layers)).to(dtype)
    return model.eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="wanda:16x16,sparsegpt:16x16", help="comma list of METHOD:PATTERN")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    p.add_argument("--offload", action="store_true",
                   help="keep the model in CPU memory; only the layer being pruned sits on the GPU")
    p.add_argument("--reconstruct_epochs", type=int, default=0, help="layer reconstruction epochs (default: 0)")
    p.add_argument("--device", default="cuda", help="cuda (default), or cpu for a quick check of the script")
    args = p.parse_args()
    device = args.device
    gpu = device == "cuda"
    card = torch.cuda.get_device_name(0) if gpu else "cpu"
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    samples = torch.randint(0, 32000, (args.nsamples, args.seqlen), generator=torch.Generator().manual_seed(0))
    rows = []
    for run in args.runs.split(","):
        method, pattern = run.split(":", 1)
        t = time.time()
        model = build_llama7b_shape(args.layers, getattr(torch, args.dtype), device)
        if args.offload:
            model.to("cpu")
        sync()
        built = time.time() - t
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        t = time.time()
        prune_model(model, method, pattern, 0.5, samples=samples, device=device, batch_size=args.batch_size,
                    progress=False, reconstruct=Reconstruct(args.reconstruct_epochs) if args.reconstruct_epochs else None)
        sync()
        seconds = time.time() - t
        rows.append((method, pattern, seconds, overall_sparsity(model), (torch.cuda.max_memory_allocated() if gpu else 0) / 2**30))
        print(f"{method} {pattern}: {seconds:.1f} s (model built in {built:.0f} s), peak "
              f"{rows[-1][4]:.1f} GiB", flush=True)
        del model
        if gpu:
            torch.cuda.empty_cache()
    print(f"\nLlama-2-7B shape, {args.layers} layers, {args.dtype}, {args.nsamples} x {args.seqlen} calibration "
          f"tokens, batch {args.batch_size}, {'model in CPU memory, one layer on the GPU, ' if args.offload else ''}"
          f"reconstruction epochs {args.reconstruct_epochs}, {card}, {time.strftime('%Y-%m-%d')}")
    print("| method | pattern | seconds | sparsity | peak GiB |")
    print("| --- | --- | ---: | ---: | ---: |")
    for method, pattern, seconds, sparsity, peak in rows:
        print(f"| {method} | {pattern} | {seconds:.1f} | {sparsity:.4f} | {peak:.1f} |")


if __name__ == "__main__":
    main()
