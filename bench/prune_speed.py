"""python -m bench.prune_speed --runs default:16x16 --layers 3 --offload

Pruning time on a Llama-2-7B-shaped model (32 layers, hidden 4096, MLP 11008, random float16
weights built on the GPU, so no download), with random calibration tokens. The clock runs from
the call of prune_model to its return: calibration capture, statistics, masks, weight updates.
A run is METHOD:PATTERN (that method plainly) or default:PATTERN (what `spruce prune
--sparsity_type PATTERN` runs: the pattern's default recipe fitted to the model, e.g. for 16x16
gradual block OBS with its refit chosen per linear and the layer reconstruction; `--obs_refit`
and `--obs_max_inputs` change it as the prune options of those names do). `--layers N` builds
fewer layers (quick checks). Each run prints its seconds per layer, split into the pruning
methods, the layer reconstruction and the rest (capture, statistics, forward passes), its peak
GPU memory, and from the per-layer seconds a projection to the full 7B, 13B and 70B shapes (the
methods' seconds scaled by the sum of out x in^2 over a layer's linears, the work of one step of
the iterative OBS refit, the rest by the parameters per layer). The table prints last.
"""

from __future__ import annotations

import argparse
import time

import torch


from bench.common import random_llama
from spruce.masks import overall_sparsity
from spruce.models import decoder_layers, prunable_linears
from spruce.prune import Reconstruct, engine, methods, prune_model
from spruce.prune.defaults import resolve_recipe, spec_for_model

# (layers, hidden, MLP, key/value heads x head dim): the decoder layers of the Llama-2 shapes
SHAPES = {"7B": (32, 4096, 11008, 4096), "13B": (40, 5120, 13824, 5120), "70B": (80, 8192, 28672, 1024)}


def layer_linears(hidden: int, mlp: int, kv: int) -> list[tuple[int, int]]:
    """(out, in) of a Llama decoder layer's linears: q, k, v, o, gate, up, down."""
    return [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden), (mlp, hidden), (mlp, hidden), (hidden, mlp)]


def projection(method_s: float, rest_s: float, measured: tuple[int, int, int]) -> dict[str, float]:
    """{shape: projected seconds for all its layers} from one layer's method and other seconds,
    measured on a layer of (hidden, MLP, key/value width) `measured`."""
    def work(dims):
        return sum(o * i * i for o, i in layer_linears(*dims))

    def params(dims):
        return sum(o * i for o, i in layer_linears(*dims))

    return {s: layers * (method_s * work(dims) / work(measured) + rest_s * params(dims) / params(measured))
            for s, (layers, *dims) in SHAPES.items()}


def build_llama7b_shape(layers: int, dtype: torch.dtype, device: str, **overrides):
    torch.manual_seed(0)
    return random_llama(layers, dtype, device, **overrides)


class Clock:
    """Seconds spent in the pruning methods and in the layer reconstruction, by wrapping the
    engine's two calls (synchronised on the GPU)."""

    def __init__(self, sync, verbose: bool = False):
        self.sync, self.verbose, self.seconds = sync, verbose, {"methods": 0.0, "reconstruct": 0.0}
        self.saved = engine._prune_weight, engine.reconstruct_layer
        engine._prune_weight = self.timed("methods", engine._prune_weight)
        engine.reconstruct_layer = self.timed("reconstruct", engine.reconstruct_layer)

    def timed(self, key, fn):
        def call(*args, **kwargs):
            self.sync()
            t = time.time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.sync()
                self.seconds[key] += time.time() - t
                if self.verbose:
                    what = tuple(args[0].weight.shape) if key == "methods" else ""
                    print(f"  {key} {what}: {time.time() - t:.1f} s", flush=True)
        return call

    def close(self):
        engine._prune_weight, engine.reconstruct_layer = self.saved


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="wanda:16x16,sparsegpt:16x16",
                   help="comma list of METHOD:PATTERN, or default:PATTERN for the pattern's default recipe")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    p.add_argument("--offload", action="store_true",
                   help="keep the model in CPU memory; only the layer being pruned sits on the GPU")
    p.add_argument("--reconstruct_epochs", type=int,
                   help="layer reconstruction epochs (default: 0 for a named method, the recipe's for default)")
    p.add_argument("--obs_refit", choices=["auto", "exact", "iterative"], help="default runs: the OBS refit")
    p.add_argument("--obs_max_inputs", type=int, help="default runs: sparsegpt on linears with more inputs")
    p.add_argument("--cg_tol", type=float,
                   help="the iterative OBS refit's conjugate-gradient tolerance (default: spruce's, methods.CG_TOL)")
    p.add_argument("--hidden_size", type=int, default=4096, help="another shape: hidden size (default: 4096)")
    p.add_argument("--intermediate_size", type=int, default=11008, help="another shape: MLP size (default: 11008)")
    p.add_argument("--per_linear", action="store_true", help="print the seconds of each pruned linear as it finishes")
    p.add_argument("--device", default="cuda", help="cuda (default), or cpu for a quick check of the script")
    return p.parse_args()


def time_run(run: str, args, shape: dict, samples: torch.Tensor, device: str, sync) -> tuple:
    """Build the model, prune it as `run` says and time it: the table row of one run."""
    gpu = device == "cuda"
    method, pattern = run.split(":", 1)
    t = time.time()
    model = build_llama7b_shape(args.layers, getattr(torch, args.dtype), device, **shape)
    if args.offload:
        model.to("cpu")
    sync()
    built = time.time() - t
    if method == "default":
        recipe = resolve_recipe(pattern, nsamples=args.nsamples, seqlen=args.seqlen, batch_size=args.batch_size,
                                reconstruct_epochs=args.reconstruct_epochs, obs_refit=args.obs_refit,
                                obs_max_inputs=args.obs_max_inputs)
        spec, _ = spec_for_model(recipe, pattern, 0.5, prunable_linears(model))
        call = dict(spec=spec)
    else:
        epochs = args.reconstruct_epochs
        call = dict(spec=method, pattern=pattern, sparsity=0.5, batch_size=args.batch_size,
                    reconstruct=Reconstruct(epochs) if epochs else None)
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    clock = Clock(sync, args.per_linear)
    t = time.time()
    try:
        if method == "default":
            info = prune_model(model, call["spec"], samples, device=device, progress=False)
        else:
            info = prune_model(model, call.pop("spec"), samples=samples, device=device, progress=False, **call)
    finally:
        clock.close()
    sync()
    seconds = time.time() - t
    used = sorted(set(info["linear_methods"].values()))
    per_layer = {k: v / args.layers for k, v in clock.seconds.items()}
    per_layer["rest"] = seconds / args.layers - per_layer["methods"] - per_layer["reconstruct"]
    proj = projection(per_layer["methods"], per_layer["reconstruct"] + per_layer["rest"],
                      (args.hidden_size, args.intermediate_size, args.hidden_size))
    peak = (torch.cuda.max_memory_allocated() if gpu else 0) / 2**30
    # the layers this run did not build would sit on the GPU too, unless offloaded
    layer_gib = sum(t.numel() * t.element_size() for t in decoder_layers(model)[0].parameters()) / 2**30
    peak_full = peak + (0 if args.offload else (SHAPES["7B"][0] - args.layers) * layer_gib)
    row = (run, "+".join(used), info.get("reconstruct"), seconds, seconds / args.layers, per_layer,
           overall_sparsity(model), peak, peak_full, proj)
    print(f"{run} ({', '.join(used)}): {seconds:.1f} s for {args.layers} layers = {seconds / args.layers:.1f} s per "
          f"layer (methods {per_layer['methods']:.1f}, reconstruction {per_layer['reconstruct']:.1f}, rest "
          f"{per_layer['rest']:.1f}); model built in {built:.0f} s; peak {peak:.1f} GiB "
          f"({peak_full:.1f} GiB with 32 layers); projected "
          + ", ".join(f"{s} {v / 60:.1f} min" for s, v in proj.items()), flush=True)
    del model
    if gpu:
        torch.cuda.empty_cache()
    return row


def print_table(rows: list[tuple], args, card: str) -> None:
    print(f"\nLlama-2 shape (hidden {args.hidden_size}, MLP {args.intermediate_size}), {args.layers} layers, {args.dtype}, {args.nsamples} x {args.seqlen} calibration "
          f"tokens, batch {args.batch_size}, {'model in CPU memory, one layer on the GPU, ' if args.offload else ''}"
          f"{f'CG tolerance {args.cg_tol:g}, ' if args.cg_tol is not None else ''}"
          f"{card}, {time.strftime('%Y-%m-%d')}")
    print("| run | linears pruned by | reconstruction | seconds | s / layer (methods, reconstruction, rest) "
          "| sparsity | peak GiB (with 32 layers) | projected 7B / 13B / 70B min |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for run, used, rec, seconds, per, parts, sparsity, peak, peak_full, proj in rows:
        rec = f"{rec['epochs']} epochs, lr {rec['lr']:g}" if rec else "off"
        print(f"| {run} | {used} | {rec} | {seconds:.1f} | {per:.1f} ({parts['methods']:.1f}, {parts['reconstruct']:.1f}, "
              f"{parts['rest']:.1f}) | {sparsity:.4f} | {peak:.1f} ({peak_full:.1f}) | "
              + " / ".join(f"{v / 60:.1f}" for v in proj.values()) + " |")


def main() -> None:
    args = parse_args()
    if args.cg_tol is not None:  # every iterative refit of the runs stops at this tolerance
        solve = methods.refit_block_rows_iterative
        methods.refit_block_rows_iterative = lambda *a, **k: solve(*a, **{**k, "tol": args.cg_tol})
    shape = dict(hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
                 num_attention_heads=args.hidden_size // 128, num_key_value_heads=args.hidden_size // 128)
    device = args.device
    gpu = device == "cuda"
    card = torch.cuda.get_device_name(0) if gpu else "cpu"
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    samples = torch.randint(0, 32000, (args.nsamples, args.seqlen), generator=torch.Generator().manual_seed(0))
    rows = [time_run(run, args, shape, samples, device, sync) for run in args.runs.split(",")]
    print_table(rows, args, card)


if __name__ == "__main__":
    main()
