"""Host time against GPU time of one compiled forward over a prompt: dense against block-sparse.

    python -m bench.prefill_time --json $OUT/prefill_time.json

A prefill runs outside CUDA graphs, so it is bound by whichever is slower: the GPU running its
kernels or the host issuing them. This bench builds the random Llama-2-7B-shaped bf16 model of
`bench.generate` (`--num-layers` decoder layers, the pruner's own masks, default 16x16g4), compiles
its forward over each prompt (`torch.compile`, static shapes, the logits of the last position
only), dense first, then block-sparse with the dense dispatch tuned for those prompts (siblings
fused unless `--no-fuse`). Per prompt and model it reports the host time until the call returns,
the total time after a device synchronisation (medians of `--repeats`), and the sum of the CUDA
kernels' times in one profiled call. Ratios are against dense in the same run: total x dense is
the prefill's speed-up, kernels x dense what it would be if the host never bound. A host time near
the total time says the host binds. On a machine without CUDA (`--check`) it runs a tiny model
through the torch reference, to check the bench itself (the numbers mean nothing there).
"""

from __future__ import annotations

import statistics
import time

import torch

from bench.common import cli_main, environment, require_cuda, write_json

PROMPTS = ["1x2048", "8x128", "8x2048"]


def add_arguments(p) -> None:
    p.add_argument("--prompts", nargs="+", default=PROMPTS, metavar="BATCHxTOKENS",
                   help="prompts to prefill (default: %(default)s)")
    p.add_argument("--num-layers", type=int, default=32, help="decoder layers (32 is Llama-2-7B)")
    p.add_argument("--layout", default=None, help="the pruner's block pattern (default: bench.generate's)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per prompt, the median reported")
    p.add_argument("--no-fuse", action="store_true", help="one launch per linear (no q/k/v, gate/up fusion)")
    p.add_argument("--check", action="store_true",
                   help="CPU, a tiny model and two short prompts (not --prompts): check the bench only")
    p.add_argument("--json")


def parse_prompts(prompts: list[str]) -> list[tuple[int, int]]:
    """["8x128"] -> [(8, 128)]; SpruceError for anything else."""
    from spruce.errors import SpruceError

    out = []
    for p in prompts:
        parts = p.lower().split("x")
        if len(parts) != 2 or not all(v.isdigit() and int(v) > 0 for v in parts):
            raise SpruceError(f"a prompt is BATCHxTOKENS, e.g. 8x128; got {p!r}")
        out.append((int(parts[0]), int(parts[1])))
    return out


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def host_and_total_ms(call, repeats: int, device: str) -> tuple[float, float]:
    """Medians over `repeats` calls: ms until `call` returns, and ms until the device is done."""
    host, total = [], []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        call()
        returned = time.perf_counter()
        _sync(device)
        done = time.perf_counter()
        host.append((returned - start) * 1e3)
        total.append((done - start) * 1e3)
    return statistics.median(host), statistics.median(total)


def kernel_ms(call, device: str) -> float | None:
    """The CUDA kernels' time of one call, summed from torch.profiler (None without CUDA)."""
    if device != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    return sum(e.self_device_time_total for e in prof.key_averages()
               if str(e.device_type).endswith("CUDA")) / 1e3


def time_prompts(model, prompts: list[tuple[int, int]], repeats: int, device: str, backend: str = "inductor") -> dict:
    """{(batch, tokens): {"host_ms", "total_ms", "kernels_ms"}} of the forward compiled by `backend`."""
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)

    def forward(ids):
        return model(input_ids=ids, use_cache=False, logits_to_keep=1).logits

    torch._dynamo.reset()
    compiled = torch.compile(forward, backend=backend, dynamic=False)
    out = {}
    with torch.no_grad():
        for batch, tokens in prompts:
            ids = torch.randint(0, vocab, (batch, tokens), generator=gen).to(device)
            call = lambda: compiled(ids)  # noqa: E731
            for _ in range(2):  # compile, then one warm call
                call()
            host, total = host_and_total_ms(call, repeats, device)
            out[batch, tokens] = {"host_ms": host, "total_ms": total, "kernels_ms": kernel_ms(call, device)}
    torch._dynamo.reset()
    return out


def bench_prefill_time(prompts, num_layers: int = 32, layout: str | None = None, repeats: int = 5,
                       fuse: bool = True, device: str = "cuda", config_overrides: dict | None = None,
                       backend: str = "inductor") -> list[dict]:
    """One row per prompt and model (dense, then block-sparse): host, total and kernel ms, and the
    ratios of dense's total and kernel ms to this row's. device / config_overrides / backend: for a
    CPU check on a tiny model."""
    from bench.generate import _random_llama, default_layout, default_module_sparsity, emit_masks
    from spruce.kernels import densify, sparsify
    from spruce.kernels.dispatch import dispatch_table, dispatch_text, prepare_dispatch
    from spruce.models import prunable_linears

    layout = layout or default_layout()
    torch.manual_seed(0)
    model = _random_llama(num_layers, device, config_overrides)
    originals = {n: m.weight.detach().clone() for n, m in prunable_linears(model).items()}
    emit_masks(model, originals, layout, "global", 0.5, default_module_sparsity(), 0)
    del originals
    dense = time_prompts(model, prompts, repeats, device, backend)
    report = sparsify(model, dense_fallback=True, fuse=fuse)
    try:
        dispatch = prepare_dispatch(model, decode_tokens=[], prefill_tokens=[b * t for b, t in prompts],
                                    progress=False)
        text = dispatch_text(dispatch_table(model, dispatch.launches), len(report.kept))
        sparse = time_prompts(model, prompts, repeats, device, backend)
    finally:
        densify(model)
    rows = []
    for kind, times in (("dense", dense), (f"bsr {layout}" + ("" if fuse else " unfused"), sparse)):
        for (batch, tokens), t in times.items():
            base = dense[batch, tokens]
            row = {"kind": kind, "batch": batch, "tokens": tokens, "num_layers": num_layers, **t,
                   "total_x_dense": base["total_ms"] / t["total_ms"],
                   "kernels_x_dense": (base["kernels_ms"] / t["kernels_ms"]) if t["kernels_ms"] else None}
            if kind != "dense":
                row["dispatch"] = text
            rows.append(row)
    return rows


def format_rows(rows: list[dict]) -> str:
    lines = [f"{'kind':<24} {'prompt':>8} {'host ms':>8} {'total ms':>9} {'x dense':>7} {'kernels ms':>10} "
             f"{'x dense':>7}  (x dense: dense's time over this row's, same run)"]
    for r in rows:
        kernels = "" if r["kernels_ms"] is None else f"{r['kernels_ms']:10.2f} {r['kernels_x_dense']:7.2f}"
        lines.append(f"{r['kind']:<24} {str(r['batch']) + 'x' + str(r['tokens']):>8} {r['host_ms']:8.2f} "
                     f"{r['total_ms']:9.2f} {r['total_x_dense']:7.2f} {kernels}")
    dispatch = next((r["dispatch"] for r in rows if "dispatch" in r), None)
    if dispatch:
        lines.append(f"dense dispatch: {dispatch}")
    return "\n".join(lines)


def run(args) -> None:
    prompts = parse_prompts(args.prompts)
    if args.check:
        tiny = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4,
                    vocab_size=96, max_position_embeddings=64)
        rows = bench_prefill_time([(1, 24), (2, 12)], num_layers=1, layout=args.layout, repeats=1,
                                  fuse=not args.no_fuse, device="cpu", config_overrides=tiny, backend="eager")
    else:
        require_cuda()
        rows = bench_prefill_time(prompts, args.num_layers, args.layout, args.repeats, not args.no_fuse)
    print(format_rows(rows))
    if args.json:
        write_json(args.json, {"environment": environment(), "rows": rows})


if __name__ == "__main__":
    raise SystemExit(cli_main(add_arguments, run, __doc__))
