"""python -m bench.prune_table --nsamples 128 --max_windows 146 --out prune_table.jsonl

The method x pattern table: prune the embedded model (SmolLM2-135M, float32) at 50% with each
recipe, measure perplexity on the SOTU test split (seqlen 1024) and print one row per recipe,
as a ratio to the dense perplexity measured in the same run. The model is loaded once; every
row starts again from the dense weights and the same calibration samples. Each row prints the
`spruce prune` command that makes the same model. `--rows` picks rows by exact name (else by prefix), in the order given (see ROWS).
The table prints last; `--out` also writes one JSON object per row.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch


from spruce import data
from spruce.evaluate import perplexity
from spruce.models import load_model, prunable_linears
from spruce.prune import prune_model
from spruce.prune import Reconstruct

REC = Reconstruct(epochs=4, lr=1e-4, target="dense")

# name: (method, pattern, extra prune_model options, extra CLI flags)
ROWS = {
    "magnitude-unstructured": ("magnitude", "unstructured", {}, ""),
    "wanda-unstructured": ("wanda", "unstructured", {}, ""),
    "sparsegpt-unstructured": ("sparsegpt", "unstructured-layer", {}, ""),
    "sparsegpt-unstructured-row": ("sparsegpt", "unstructured", {}, ""),
    "sparsegpt-unstructured-dense": ("sparsegpt", "unstructured-layer", {"dense_target": True}, "--dense_target"),
    "wanda-2:4": ("wanda", "2:4", {}, ""),
    "sparsegpt-2:4": ("sparsegpt", "2:4", {}, ""),
    "sparsegpt-2:4-dense": ("sparsegpt", "2:4", {"dense_target": True}, "--dense_target"),
    "wanda+update-2:4": ("wanda+update", "2:4", {}, ""),
    "sparsegpt-4:8": ("sparsegpt", "4:8", {}, ""),
    "wanda-16x16-global (reference)": ("wanda", "16x16", {}, "--block_selection global"),
    "wanda-16x16-row-balanced": ("wanda", "16x16", {"selection": "row-balanced"}, "--block_selection row-balanced"),
    "wanda-16x16-energy": ("wanda", "16x16", {"tile_score": "energy"}, "--tile_score energy"),
    "sparsegpt-16x16 (in-sweep)": ("sparsegpt", "16x16", {}, ""),
    "wanda+update-16x16-row-balanced": ("wanda+update", "16x16", {"selection": "row-balanced"},
                                        "--block_selection row-balanced"),
    "wanda+update-16x16-energy": ("wanda+update", "16x16", {"tile_score": "energy"}, "--tile_score energy"),
    "obs-16x16": ("obs", "16x16", {}, ""),
    "obs-16x16-row-balanced": ("obs", "16x16", {"selection": "row-balanced"}, "--block_selection row-balanced"),
    "obs-16x16-dense": ("obs", "16x16", {"dense_target": True}, "--dense_target"),
    "obs-16x16-dense-owl": ("obs", "16x16", {"dense_target": True, "allocation": "owl"},
                            "--dense_target --allocation owl"),
    "obs-16x16-dense-attn0.4": ("obs", "16x16", {"dense_target": True, "module_sparsity": {"self_attn": 0.4}},
                                "--dense_target --module_sparsity self_attn=0.4"),
    "obs-16x16-dense-kv0": ("obs", "16x16", {"dense_target": True,
                                              "module_sparsity": {"k_proj": 0.0, "v_proj": 0.0}},
                            "--dense_target --module_sparsity k_proj=0,v_proj=0"),
    "obs-16x16-dense-mlp0.4": ("obs", "16x16", {"dense_target": True, "module_sparsity": {"mlp": 0.4}},
                               "--dense_target --module_sparsity mlp=0.4"),
    "obs-16x16-attn0.4": ("obs", "16x16", {"module_sparsity": {"attn": 0.4}}, "--module_sparsity attn=0.4"),
    "obs-16x16-attn0.4-seq": ("obs", "16x16", {"module_sparsity": {"attn": 0.4}, "sequential": True},
                              "--module_sparsity attn=0.4 --true_sequential"),
    "obs-16x16-attn0.4-rec": ("obs", "16x16", {"module_sparsity": {"attn": 0.4}, "reconstruct": REC},
                              "--module_sparsity attn=0.4 --reconstruct_epochs 4"),
    "obs-16x16-attn0.4-rec-local": ("obs", "16x16", {"module_sparsity": {"attn": 0.4},
                                                     "reconstruct": Reconstruct(4, 1e-4, "local")},
                                    "--module_sparsity attn=0.4 --reconstruct_epochs 4 --reconstruct_target local"),
    "obs-16x16-attn0.4-rec-lr3e-4": ("obs", "16x16", {"module_sparsity": {"attn": 0.4},
                                                      "reconstruct": Reconstruct(4, 3e-4)},
                                     "--module_sparsity attn=0.4 --reconstruct_epochs 4 --reconstruct_lr 3e-4"),
    "obs-16x16-attn0.4-seq-rec": ("obs", "16x16", {"module_sparsity": {"attn": 0.4}, "sequential": True,
                                                   "reconstruct": REC},
                                  "--module_sparsity attn=0.4 --true_sequential --reconstruct_epochs 4"),
    "obs-16x16-dense-attn0.4-rec": ("obs", "16x16", {"dense_target": True, "module_sparsity": {"attn": 0.4},
                                                     "reconstruct": REC},
                                    "--dense_target --module_sparsity attn=0.4 --reconstruct_epochs 4"),
    "obs-16x16-attn0.3-rec": ("obs", "16x16", {"module_sparsity": {"attn": 0.3}, "reconstruct": REC},
                              "--module_sparsity attn=0.3 --reconstruct_epochs 4"),
    "sparsegpt-16x16-attn0.4-rec": ("sparsegpt", "16x16", {"module_sparsity": {"attn": 0.4}, "reconstruct": REC},
                                    "--module_sparsity attn=0.4 --reconstruct_epochs 4"),
    "wanda-16x16-global-rec": ("wanda", "16x16", {"reconstruct": REC},
                               "--block_selection global --reconstruct_epochs 4"),
    "sparsegpt-2:4-rec": ("sparsegpt", "2:4", {"reconstruct": REC}, "--reconstruct_epochs 4"),
    "sparsegpt-unstructured-row-rec": ("sparsegpt", "unstructured", {"reconstruct": REC}, "--reconstruct_epochs 4"),
    # the 16x16 default recipe (attention at 40%, 12 epochs of reconstruction at lr 3e-3) with each OBS
    # refit, and the fallback past --obs_max_inputs (what --obs_max_inputs 0 forces)
    "default-16x16-obs-exact": ("obs", "16x16", {"module_sparsity": {"attn": 0.4}, "obs_refit": "exact",
                                                 "reconstruct": Reconstruct(12, 3e-3)},
                                "--module_sparsity attn=0.4 --reconstruct_epochs 12 --reconstruct_lr 3e-3 --obs_refit exact"),
    "default-16x16-obs-iterative": ("obs", "16x16", {"module_sparsity": {"attn": 0.4}, "obs_refit": "iterative",
                                                     "reconstruct": Reconstruct(12, 3e-3)},
                                    "--module_sparsity attn=0.4 --reconstruct_epochs 12 --reconstruct_lr 3e-3 "
                                    "--obs_refit iterative"),
    "default-16x16-fallback": ("sparsegpt", "16x16", {"module_sparsity": {"attn": 0.4},
                                                      "reconstruct": Reconstruct(12, 3e-3)},
                               "--module_sparsity attn=0.4 --reconstruct_epochs 12 --reconstruct_lr 3e-3"),
    "wanda-hybrid:16x16": ("wanda", "hybrid:16x16", {}, ""),
    "sparsegpt-hybrid:16x16": ("sparsegpt", "hybrid:16x16", {}, ""),
}


def command(method, pattern, flags, args) -> str:
    return (f"spruce prune --model smollm2-135m --prune_method {method} --sparsity_type {pattern} "
            f"--sparsity_ratio {args.sparsity} --nsamples {args.nsamples} --seqlen {args.seqlen} "
            f"--calib_dataset sotu {flags} --eval_dataset sotu --save_model OUT").replace("  ", " ")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", help="comma list of row names or name prefixes (default: all)")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=1024)
    p.add_argument("--max_windows", type=int, help="first N evaluation windows (default: all 146)")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--device", default="auto")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--out", help="also write one JSON object per row here")
    p.add_argument("--save_best", metavar="DIR",
                   help="save the lowest-perplexity 16x16 model of the table here (with sparsity.json)")
    p.add_argument("--budget_s", type=float, help="start no row once the next one would end past this many seconds")
    args = p.parse_args()

    model, tok = load_model("smollm2-135m", args.device, "float32")
    device = next(model.parameters()).device
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or 'x86'}, {torch.get_num_threads()} threads)"
    dense = {n: m.weight.detach().clone() for n, m in prunable_linears(model).items()}
    windows = data.eval_windows("sotu", "test", tok, 1024, args.max_windows)
    samples = data.calibration_samples("sotu", tok, args.nsamples, args.seqlen, seed=0)
    eval_batch = 8 if device.type == "cuda" else 1
    base = perplexity(model, windows, eval_batch, progress=False)
    wanted = [r.strip() for r in args.rows.split(",")] if args.rows else None
    names = list(ROWS) if wanted is None else [n for w in wanted
                                               for n in ([w] if w in ROWS else [r for r in ROWS if r.startswith(w)])]
    results = [{"row": "dense", "ppl": base["ppl"], "ratio": 1.0, "seconds": 0.0,
                "command": f"spruce eval --model smollm2-135m --dataset sotu --split test --seqlen 1024"
                           f"{f' --max_windows {args.max_windows}' if args.max_windows else ''}"}]
    print(f"dense perplexity {base['ppl']:.3f} ({base['windows']} windows of {base['seqlen']}) on {card}", flush=True)
    out = open(args.out, "w") if args.out else None
    began, best, last_seconds = time.time(), float("inf"), 0.0
    for name in names:
        method, pattern, options, flags = ROWS[name]
        if args.budget_s and time.time() - began + 1.2 * last_seconds > args.budget_s:
            print(f"{name}: not run, the time budget ({args.budget_s:.0f} s) is spent", flush=True)
            continue
        row_start = time.time()
        for n, m in prunable_linears(model).items():
            m.weight.data.copy_(dense[n])
        t = time.time()
        info = prune_model(model, method, pattern, args.sparsity, samples=samples, device=device,
                           batch_size=args.batch_size, progress=False, **options)
        seconds = time.time() - t
        r = perplexity(model, windows, eval_batch, progress=False)
        row = {"row": name, "ppl": r["ppl"], "ratio": r["ppl"] / base["ppl"], "seconds": round(seconds, 1),
               "sparsity": info["measured_sparsity"], "command": command(method, pattern, flags, args)}
        results.append(row)
        print(f"{name}: ppl {row['ppl']:.2f} ({row['ratio']:.2f}x dense), sparsity {row['sparsity']:.4f}, "
              f"{seconds:.0f} s", flush=True)
        if args.save_best and pattern == "16x16" and r["ppl"] < best:
            best = r["ppl"]
            from spruce.masks import write_sparsity_json
            from spruce.models import save_model
            save_model(model, tok, args.save_best)
            write_sparsity_json(args.save_best, {**info, "row": name, "eval": r, "command": row["command"]})
            print(f"  saved as the best 16x16 model so far to {args.save_best}", flush=True)
        last_seconds = time.time() - row_start
        if out:
            out.write(json.dumps({**row, "card": card, "windows": r["windows"], "nsamples": args.nsamples,
                                  "date": time.strftime("%Y-%m-%d")}) + "\n")
            out.flush()
    print(f"\n{len(windows)} windows x 1024, {args.nsamples} calibration samples x {args.seqlen}, "
          f"sparsity {args.sparsity}, {card}, {time.strftime('%Y-%m-%d')}")
    print("| recipe | perplexity | x dense | sparsity | prune s |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for row in results:
        print(f"| {row['row']} | {row['ppl']:.2f} | {row['ratio']:.2f} | {row.get('sparsity', 0):.4f} | "
              f"{row['seconds']:.0f} |")


if __name__ == "__main__":
    main()
