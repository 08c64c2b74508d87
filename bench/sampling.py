"""Top-p (nucleus) filtering of the `generated` corpus's sampler: the nucleus found among the
TOP_P_CANDIDATES most likely tokens of each row (a partial sort, spruce/generated.py) against whole
rows sorted, both measured in the same run, on one sampling step's probabilities: --rows sequences
sampled together (the generated recipe samples 1024) over a --vocab token vocabulary (SmolLM2:
49,152), from logits scaled so that the nucleus lies among the candidates, as in a language model's
next-token distribution. Prints milliseconds per call of each and the ratio; on CUDA, timed with
CUDA events after a warm-up, on CPU with the wall clock.

--loop times the whole sampler instead: one batch of --rows prompts (of one length) continued by
--new_tokens sampled tokens on a model of the embedded model's shape (SmolLM2-135M: 30 layers,
hidden 576, vocab 49,152) with random weights in bfloat16 (float32 on CPU), each path after an
untimed warm-up of 4 steps: `generated.sample_all` (what `--dataset_name generated` runs: a static KV
cache, each step a replayed CUDA graph on CUDA) against `generated.sample_continuations` (Hugging
Face's dynamic cache, a launch per operator), sequences/s of each and the ratio. Random weights
never end a row early, so every row runs all --new_tokens steps (the worst case), and their flat
next-token distributions send every row of the top-p step to the whole-row sort.

    python -m bench.sampling --rows 1024 --vocab 49152 --device cuda
    python -m bench.sampling --loop --rows 1024 --new_tokens 256 --device cuda
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import torch

from bench.common import cli_main, environment, median_ms, write_json
from spruce.cli.common import positive_int
from spruce.errors import SpruceError
from spruce.generated import TOP_P_CANDIDATES, GeneratedSettings, sample_all, sample_continuations, top_p_filter

# the embedded model's shape (SmolLM2-135M), for --loop
SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, head_dim=64, vocab_size=49152, max_position_embeddings=8192,
                    tie_word_embeddings=True)


def _ms(fn, device: torch.device, reps: int) -> float:
    if device.type == "cuda":
        return median_ms(fn, reps=reps)
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _profile(fn, device: torch.device, trace: str | None = None) -> dict:
    """The operators that take the most device (else CPU) time in `fn`, by torch.profiler, then
    the profiled call's wall time and, on CUDA, the device time of all its kernels (their sum
    over the wall time: how busy the device was). `trace`: also write a Chrome trace there."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        fn()
        _sync(device)
        wall_ms = (time.perf_counter() - start) * 1e3
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = prof.key_averages()
    print(events.table(sort_by=key, row_limit=15))
    out = {"wall_ms": round(wall_ms, 1)}
    if device.type == "cuda":
        from torch.autograd import DeviceType

        # the kernels' own rows: an operator's row repeats the time of the kernels it launched
        busy_ms = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA) / 1e3
        out.update(device_ms=round(busy_ms, 1), device_busy=round(busy_ms / wall_ms, 3))
        print(f"profiled call: {wall_ms:.1f} ms of wall time, {busy_ms:.1f} ms of kernels "
              f"(the device busy {busy_ms / wall_ms:.0%} of it)")
    else:
        print(f"profiled call: {wall_ms:.1f} ms of wall time")
    if trace:
        prof.export_chrome_trace(trace)
        print(f"trace: {trace}")
    return out


def run_loop(args, device: torch.device) -> dict:
    """Sequences/s of one batch of the whole sampler (`generated.sample_all`: a static cache, CUDA
    graphs) and of the dynamic-cache loop (`sample_continuations`) it replaced, in the same run, on
    a random model of the embedded model's shape."""
    from transformers import LlamaConfig, LlamaForCausalLM

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    config = LlamaConfig(**{**SMOLLM2_135M, "num_hidden_layers": args.layers})
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    prompts = [[3 + i % 7 + j for j in range(8)] for i in range(args.rows)]   # one length: full batches
    settings = GeneratedSettings(sequences=max(2, args.rows), new_tokens=args.new_tokens,
                                 temperature=args.temperature, top_p=args.top_p, batch_size=args.rows)

    def path(name: str, steps: int):
        if name == "static":   # the timed call captures its own graph, as every sample_all call does
            return lambda gen: sample_all(model, prompts, dataclasses.replace(settings, new_tokens=steps), gen, 0, None)
        return lambda gen: sample_continuations(model, prompts, steps, args.temperature, args.top_p, gen, 0, None)

    result = {"rows": args.rows, "new_tokens": args.new_tokens, "layers": args.layers, "dtype": str(dtype)}
    for name in ("dynamic", "static"):
        gen = torch.Generator(device=device).manual_seed(0)
        path(name, 4)(gen)   # warm-up: kernels, the allocator
        _sync(device)
        start = time.perf_counter()
        rows = path(name, args.new_tokens)(gen)
        _sync(device)
        seconds = time.perf_counter() - start
        assert all(len(r) == len(p) + args.new_tokens for r, p in zip(rows, prompts))
        result[name] = {"seconds": round(seconds, 3), "sequences_per_s": round(args.rows / seconds, 2),
                        "ms_per_step": round(seconds / args.new_tokens * 1e3, 3)}
        if args.profile:
            print(f"{name}:")
            trace = f"{args.trace}-{name}.json" if args.trace else None
            result[name]["profile"] = _profile(lambda: path(name, args.profile_steps)(gen), device, trace)
    result["speedup"] = round(result["dynamic"]["seconds"] / result["static"]["seconds"], 2)
    return result


def run(args) -> None:
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SpruceError("--device cuda needs a CUDA GPU")
    if not 0 < args.top_p <= 1:
        raise SpruceError(f"--top_p must be in (0, 1], got {args.top_p}")
    if not args.temperature > 0:
        raise SpruceError(f"--temperature must be positive, got {args.temperature}")
    device = torch.device(args.device)
    if args.loop:
        loop = run_loop(args, device)
        print("| rows | new tokens | layers | sampler | seconds | sequences/s | ms per step |")
        print("| ---: | ---: | ---: | --- | ---: | ---: | ---: |")
        for name in ("dynamic", "static"):
            r = loop[name]
            print(f"| {loop['rows']} | {loop['new_tokens']} | {loop['layers']} | {name} | {r['seconds']:.2f} | "
                  f"{r['sequences_per_s']:.1f} | {r['ms_per_step']:.2f} |")
        print(f"static (the sampler spruce runs) against dynamic (the old loop), same run: {loop['speedup']:.2f}x")
        if args.json:
            write_json(args.json, {"environment": environment(), "loop": [loop]})
        return
    gen = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(args.rows, args.vocab, generator=gen, device=device) * args.scale
    probs = torch.softmax(logits, dim=-1)
    covered = (probs.topk(min(TOP_P_CANDIDATES, args.vocab), dim=-1).values.sum(-1) >= args.top_p).float().mean()
    full = _ms(lambda: top_p_filter(probs, args.top_p, candidates=None), device, args.reps)
    partial = _ms(lambda: top_p_filter(probs, args.top_p), device, args.reps)
    same = torch.equal(top_p_filter(probs, args.top_p) > 0, top_p_filter(probs, args.top_p, candidates=None) > 0)
    row = {"rows": args.rows, "vocab": args.vocab, "top_p": args.top_p, "candidates": TOP_P_CANDIDATES,
           "rows_covered": round(covered.item(), 4), "full_sort_ms": round(full, 3), "candidates_ms": round(partial, 3),
           "speedup": round(full / partial, 2), "same_nucleus": same}
    print("| rows | vocab | rows whose nucleus lies among the candidates | whole rows sorted ms | "
          "candidates ms | speedup | same nucleus |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    print(f"| {args.rows} | {args.vocab} | {covered.item():.0%} | {full:.2f} | {partial:.2f} | "
          f"{full / partial:.2f}x | {same} |")
    if args.json:
        write_json(args.json, {"environment": environment(), "rows": [row]})


def add_arguments(p) -> None:
    p.add_argument("--rows", type=positive_int, default=1024)
    p.add_argument("--vocab", type=positive_int, default=49152)
    p.add_argument("--top_p", type=float, default=0.95)
    p.add_argument("--scale", type=float, default=6.0, help="logit scale: larger is more peaked (default: 6)")
    p.add_argument("--reps", type=positive_int, default=10)
    p.add_argument("--loop", action="store_true",
                   help="time the whole sampler (one batch of --rows sequences) on a random model of the "
                        "embedded model's shape instead of one top-p step")
    p.add_argument("--new_tokens", type=positive_int, default=256, help="--loop: tokens sampled per row (default: 256)")
    p.add_argument("--layers", type=positive_int, default=30, help="--loop: decoder layers (default: 30, as SmolLM2-135M)")
    p.add_argument("--temperature", type=float, default=1.0, help="--loop: sampling temperature (default: 1.0)")
    p.add_argument("--profile", action="store_true",
                   help="--loop: also profile one call of --profile_steps steps of each path (torch.profiler): "
                        "the operators that take the most time, the call's wall time and how busy the device was")
    p.add_argument("--profile_steps", type=positive_int, default=64,
                   help="--profile: steps of the profiled call, its prefill and graph capture included (default: 64)")
    p.add_argument("--trace", metavar="PREFIX",
                   help="--profile: also write each path's Chrome trace to PREFIX-dynamic.json and PREFIX-static.json")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", help="also write the row and the environment as JSON")


def main(argv=None) -> int:
    return cli_main(add_arguments, run, __doc__, argv)


if __name__ == "__main__":
    raise SystemExit(main())
