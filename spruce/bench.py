"""Dense-versus-sparse timing, measured in the same run and reported as ratios.

`bench_kernels`: y = x W^T at Llama-2-7B shapes, dense cuBLAS against the block-sparse kernels
(and torch's 2:4 semi-structured path). `bench_generate`: greedy generation of a random
Llama-2-7B-shaped model, dense against block-sparse against 2:4. Both count the bytes and FLOPs of
each case and set them against the card's ceilings measured in the same run (a large device copy,
a large bf16 matmul), so the distance to the limit is visible. Each prints a table and can write JSON.
"""

from __future__ import annotations

import datetime
import functools
import json
import math
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from spruce.errors import SpruceError

LLAMA2_7B_SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008))  # (out, in) of the decoder linears
LAYOUTS = ("grouped", "grouped128", "independent")
# "grouped": 64 output features (4 block-rows of 16) share their block-columns; "grouped128": 128.
LAYOUT_GROUP_FEATURES = {"grouped": 64, "grouped128": 128, "independent": 0}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
# Programmatic dependent launch in the benches: "on" / "off" for every sparse launch, "both" to time
# the sparse cases with it on and again with it off (same tuned tiles). Unset: as SPRUCE_PDL says.
PDL_CHOICES = ("on", "off", "both")
BASELINES = ("v4",)


# ---------------------------------------------------------------- patterns for benchmarks and tests


def random_block_mask(n: int, k: int, block: int, sparsity: float, layout: str = "independent",
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """A row-balanced random block mask [n // block, k // block] (True = kept block).

    Every block-row keeps the same number of block-columns. "independent": each block-row draws
    its own; "grouped" / "grouped128": the block-rows of each 64- / 128-feature group share one draw.
    """
    if layout not in LAYOUTS:
        raise SpruceError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    nbr, nbc = n // block, k // block
    rows_per_draw = max(1, LAYOUT_GROUP_FEATURES[layout] // block)
    if nbr % rows_per_draw:
        rows_per_draw = 1
    keep = max(1, round((1.0 - sparsity) * nbc))
    scores = torch.rand(nbr // rows_per_draw, nbc, generator=generator)
    mask = torch.zeros(nbr // rows_per_draw, nbc, dtype=torch.bool)
    mask.scatter_(1, scores.topk(keep, dim=1).indices, True)
    return mask.repeat_interleave(rows_per_draw, dim=0)


def expand_block_mask(block_mask: torch.Tensor, block: int) -> torch.Tensor:
    return block_mask.repeat_interleave(block, dim=0).repeat_interleave(block, dim=1)


def prune_2_4(weight: torch.Tensor) -> torch.Tensor:
    """Keep the 2 largest-magnitude of every 4 consecutive inputs (the pattern 2:4 kernels need)."""
    groups = weight.reshape(weight.shape[0], -1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, groups.abs().topk(2, dim=2).indices, True)
    return (groups * keep).reshape(weight.shape)


# ---------------------------------------------------------------- timing


def _require_cuda() -> None:
    if not torch.cuda.is_available():
        raise SpruceError("benchmarks need a CUDA GPU; none is visible to torch")
    from spruce.kernels.bsr import triton_available

    if not triton_available():
        raise SpruceError("benchmarks need triton (pip install triton) for the block-sparse kernels")


def _median_ms(fn, reps: int = 10, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def graph_time_us(calls: list, calls_per_replay: int = 64, replays: int = 15) -> float:
    """Median microseconds per call, from CUDA-graph replays that cycle through `calls`.

    Each call works on its own copy of the data, and the copies together exceed L2, so every call
    reads its weight from device memory as in generation; the graph removes launch gaps.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (and kernel tuning) outside the capture
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    sequence = [calls[i % len(calls)] for i in range(max(calls_per_replay, len(calls)))]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in sequence:
            call()
    ms = _median_ms(graph.replay, reps=replays, warmup=2)
    del graph
    return ms * 1e3 / len(sequence)


def measure_ceilings() -> dict:
    """Copy bandwidth (bytes read + written per second) and bf16 matmul FLOP/s on this card."""
    n = 1 << 29  # 1 GiB of bf16 per buffer
    src = torch.randn(n, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = _median_ms(lambda: dst.copy_(src))
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    mm_ms = _median_ms(lambda: a @ b)
    return {
        "copy_bytes_per_s": 2 * n * 2 / (copy_ms / 1e3),
        "matmul_flop_per_s": 2 * 8192**3 / (mm_ms / 1e3),
    }


def environment() -> dict:
    import transformers
    import triton

    return {
        "card": torch.cuda.get_device_name(),
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def _copies_for(nbytes: int) -> int:
    """How many copies of a weight make the rotation exceed L2 three times over."""
    l2 = torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size
    return max(2, min(64, math.ceil(3 * l2 / max(nbytes, 1))))


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


def _pdl_choice(pdl: str | None) -> str | None:
    """The bench's PDL setting: the argument, else SPRUCE_BENCH_PDL, else None (SPRUCE_PDL decides)."""
    pdl = pdl or os.environ.get("SPRUCE_BENCH_PDL") or None
    if pdl is not None and pdl not in PDL_CHOICES:
        raise SpruceError(f"pdl must be one of {PDL_CHOICES}, got {pdl!r}")
    return pdl


def _baseline_choice(baseline: str | None) -> str | None:
    baseline = baseline or os.environ.get("SPRUCE_BENCH_BASELINE") or None
    if baseline is not None and baseline not in BASELINES:
        raise SpruceError(f"baseline must be one of {BASELINES}, got {baseline!r}")
    return baseline


def v4_config(weight, m: int) -> tuple:
    """The configuration the v4 tuner chose in run 4 (H200) at the Llama-2-7B shapes with grouped
    layouts: keyed without density, it was tuned on the 50% weights and reused for 75%."""
    if m == 1:
        return (4, 1024, 4, 1, False, 1)
    if m <= 16:
        return (min(32, weight.group_features), 256, 4, 3, True, 2)
    if weight.block == 32 and weight.group_features == 128:
        return (128, 64, 8, 3, False)
    return (256, 64, 8, 3, True)


def _forced(launch, cfg, m: int, n: int, dtype):
    """fn(x, weight) running one fixed configuration into a reused output."""
    y = torch.empty(m, n, dtype=dtype, device="cuda")
    return lambda x, w: launch(x, w, None, y, cfg)


# ---------------------------------------------------------------- kernels


def _rotating_calls(fn, weights: list, inputs: list) -> list:
    """fn(input, weight) over every copy, the shorter list cycled, each call on its own data."""
    count = max(len(weights), len(inputs))
    return [functools.partial(fn, inputs[i % len(inputs)], weights[i % len(weights)]) for i in range(count)]


def _parse_shapes(shapes) -> list[tuple[int, int]]:
    parsed = []
    for shape in shapes:
        if isinstance(shape, str):
            try:
                n, k = (int(v) for v in shape.lower().split("x"))
            except ValueError:
                raise SpruceError(f"shape {shape!r} must be OUTxIN, for example 4096x11008") from None
            shape = (n, k)
        parsed.append(tuple(shape))
    return parsed


def bench_kernels(shapes=LLAMA2_7B_SHAPES, tokens=(1, 8, 16, 2048), blocks=(16, 32), sparsities=(0.5, 0.75),
                  layouts=LAYOUTS, dtype: str = "bfloat16", semi_structured: bool = True,
                  json_path: str | None = None, seed: int = 0, pdl: str | None = None,
                  baseline: str | None = None) -> list[dict]:
    """Time y = x W^T, dense cuBLAS against block-sparse, for every shape, token count and pattern.

    shapes: (out, in) pairs or "OUTxIN" strings. tokens: rows of x (<= 16 runs the decode kernel,
    more the prefill kernel). blocks: block sizes (16, 32, 64). sparsities: fractions of zero
    blocks. layouts: "grouped" (64-feature groups of block-rows share their columns) and/or
    "independent" (each block-row its own). dtype: "bfloat16" or "float16". semi_structured: also
    time torch's 2:4 path. json_path: where to write rows and environment. Every sparse output is
    checked against float64 math on the masked weight (rel_err). Every sparse row names the tuned
    configuration it ran (config). pdl (else the environment's SPRUCE_BENCH_PDL): "on" / "off"
    sets programmatic dependent launch for all sparse launches; "both" times the decode rows again
    with it off, same configuration (us_pdl_off); unset, SPRUCE_PDL decides. baseline (else
    SPRUCE_BENCH_BASELINE): "v4" also times, where it differs from the tuned one, the configuration
    v4 ran in run 4 (`v4_config`; us_v4). Returns the rows.
    """
    from spruce.kernels.bsr import (
        BlockSparseWeight,
        block_sparse_linear,
        chosen_config,
        launch_decode,
        launch_prefill,
        pdl_enabled,
        set_pdl,
        tuned_configs,
        tuning_times,
    )

    _require_cuda()
    pdl = _pdl_choice(pdl)
    baseline = _baseline_choice(baseline)
    if pdl is not None:
        set_pdl(pdl != "off")
    if dtype not in DTYPES:
        raise SpruceError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    torch_dtype = DTYPES[dtype]
    shapes = _parse_shapes(shapes)
    for b in blocks:
        for n, k in shapes:
            if n % b or k % b:
                raise SpruceError(f"shape {n}x{k} is not divisible by block {b}")
    gen = torch.Generator().manual_seed(seed)
    ceilings = measure_ceilings()
    esize = torch.tensor([], dtype=torch_dtype).element_size()
    rows = []

    def row(n, k, m, kernel, us, nbytes, flops, **extra):
        floor_us = max(nbytes / ceilings["copy_bytes_per_s"], flops / ceilings["matmul_flop_per_s"]) * 1e6
        rows.append({"shape": f"{n}x{k}", "out": n, "in": k, "tokens": m, "kernel": kernel, "us": us,
                     "bytes": nbytes, "flops": flops, "GB_per_s": nbytes / us / 1e3,
                     "TFLOP_per_s": flops / us / 1e6, "floor_us": floor_us, "pct_of_floor": floor_us / us,
                     **extra})

    def report():
        return {"environment": environment(), "ceilings": ceilings, "tuned": tuned_configs(),
                "tuning_us": tuning_times(), "pdl": pdl_enabled(torch.device("cuda")), "pdl_setting": pdl,
                "baseline": baseline, "rows": rows}

    for n, k in shapes:
        weight = (torch.randn(n, k, generator=gen) * 0.02).to("cuda", torch_dtype)
        dense = [weight] + [weight.clone() for _ in range(_copies_for(weight.numel() * esize) - 1)]
        variants = []
        for b in blocks:
            for s in sparsities:
                for layout in layouts:
                    if 0 < LAYOUT_GROUP_FEATURES[layout] <= b:
                        continue  # a block this wide is already such a group
                    mask = expand_block_mask(random_block_mask(n, k, b, s, layout, gen), b).to("cuda")
                    masked = weight * mask
                    sparse = BlockSparseWeight.from_dense(masked, b)
                    copies = [sparse] + [sparse.clone() for _ in range(_copies_for(sparse.nbytes) - 1)]
                    variants.append((f"bsr b{b} {s:.0%} {layout}", b, s, layout, masked, copies))
        semi_copies = None
        if semi_structured:
            from torch.sparse import to_sparse_semi_structured

            pruned24 = prune_2_4(weight)
            try:
                semi_copies = [to_sparse_semi_structured(pruned24.clone())
                               for _ in range(_copies_for(n * k * esize // 2))]
            except Exception as exc:  # noqa: BLE001 - the 2:4 path is torch's; report why it could not run
                rows.append({"shape": f"{n}x{k}", "tokens": 0, "kernel": "2:4 torch",
                             "error": f"{type(exc).__name__}: {exc}"})
        for m in tokens:
            x_bytes = m * k * esize
            xs = [torch.randn(m, k, generator=gen).to("cuda", torch_dtype) for _ in range(_copies_for(x_bytes))]
            io_bytes = x_bytes + m * n * esize

            dense_us = graph_time_us(_rotating_calls(F.linear, dense, xs))
            row(n, k, m, "dense cuBLAS", dense_us, n * k * esize + io_bytes, 2 * m * n * k, speedup=1.0)
            for name, b, s, layout, masked, copies in variants:
                x = torch.randn(m, k, generator=gen).to("cuda", torch_dtype)
                y = torch.full((m, n), float("nan"), dtype=torch_dtype, device="cuda")
                kind, launch = ("decode", launch_decode) if m <= 16 else ("prefill", launch_prefill)
                launch(x, copies[0], None, y)
                err = _rel_err(y, F.linear(x.double(), masked.double()))
                us = graph_time_us(_rotating_calls(block_sparse_linear, copies, xs))
                sp = copies[0]
                cfg = chosen_config(kind, sp, m, torch_dtype)
                extra = {"config": str(cfg)}
                if pdl == "both" and kind == "decode":  # the same tiles without PDL
                    set_pdl(False)
                    extra["us_pdl_off"] = graph_time_us(_rotating_calls(block_sparse_linear, copies, xs))
                    set_pdl(True)
                if baseline == "v4" and layout != "independent" and cfg is not None:
                    v4 = v4_config(sp, m)
                    extra["v4_config"] = str(v4)
                    extra["us_v4"] = us if v4 == cfg else graph_time_us(
                        _rotating_calls(_forced(launch, v4, m, n, torch_dtype), copies, xs))
                row(n, k, m, name, us, sp.nbytes + io_bytes, 2 * m * n * k * sp.stored_fraction,
                    speedup=dense_us / us, block=b, sparsity=s, layout=layout, group=sp.group, rel_err=err,
                    **extra)
            if semi_copies is not None:
                try:
                    x = torch.randn(m, k, generator=gen).to("cuda", torch_dtype)
                    err = _rel_err(F.linear(x, semi_copies[0]), F.linear(x.double(), pruned24.double()))
                    us = graph_time_us(_rotating_calls(F.linear, semi_copies, xs))
                except Exception as exc:  # noqa: BLE001 - torch's 2:4 path has its own limits; report them
                    rows.append({"shape": f"{n}x{k}", "tokens": m, "kernel": "2:4 torch",
                                 "error": f"{type(exc).__name__}: {exc}"})
                    continue
                # values plus 4 bits of metadata per 4 inputs
                row(n, k, m, "2:4 torch", us, n * k * esize // 2 + n * k // 8 + io_bytes, m * n * k,
                    speedup=dense_us / us, sparsity=0.5, rel_err=err)
        del dense, variants
        torch.cuda.empty_cache()
        print(format_kernel_table([r for r in rows if r["shape"] == f"{n}x{k}"], ceilings), flush=True)
        if json_path:  # after every shape, so that an interrupted run keeps what it measured
            _write_json(json_path, report(), quiet=True)

    if pdl is not None:
        set_pdl(None)
    print(format_kernel_table(rows, ceilings))
    if json_path:
        _write_json(json_path, report())
    return rows


def format_kernel_table(rows: list[dict], ceilings: dict) -> str:
    """The rows as a table; "v4 us" / "no-PDL us" columns appear when some row has them, and the
    last column is the tuned configuration (decode: features, inputs per tile, warps, stages,
    tl.dot, split; prefill: tokens, K step, warps, stages, swapped)."""
    v4 = any("us_v4" in r for r in rows)
    off = any("us_pdl_off" in r for r in rows)
    lines = [(f"ceilings: copy {ceilings['copy_bytes_per_s'] / 1e12:.2f} TB/s, "
              f"bf16 matmul {ceilings['matmul_flop_per_s'] / 1e12:.0f} TFLOP/s"),
             (f"{'shape':>11} {'tokens':>6} {'kernel':<28} {'us':>9} {'x dense':>8} {'GB/s':>7} "
              f"{'TFLOP/s':>8} {'%floor':>6} {'rel err':>8}" + (f" {'v4 us':>7}" if v4 else "")
              + (f" {'no-PDL':>7}" if off else "") + "  config")]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['shape']:>11} {r['tokens']:>6} {r['kernel']:<28} failed: {r['error'][:80]}")
            continue
        err = f"{r['rel_err']:.1e}" if "rel_err" in r else ""
        line = (f"{r['shape']:>11} {r['tokens']:>6} {r['kernel']:<28} {r['us']:9.1f} {r['speedup']:8.2f} "
                f"{r['GB_per_s']:7.0f} {r['TFLOP_per_s']:8.1f} {r['pct_of_floor']:6.0%} {err:>8}")
        if v4:
            same = "us_v4" in r and r.get("v4_config") == r.get("config")
            line += f" {'=' if same else (format(r['us_v4'], '7.1f') if 'us_v4' in r else ''):>7}"
        if off:
            line += f" {format(r['us_pdl_off'], '7.1f') if 'us_pdl_off' in r else '':>7}"
        lines.append((line + (f"  {r['config']}" if r.get("config") not in (None, "None") else "")).rstrip())
    return "\n".join(lines)


def _write_json(path: str, report: dict, quiet: bool = False) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1, default=str))
    if not quiet:
        print(f"wrote {path}")


# ---------------------------------------------------------------- generation


class StaticGreedy:
    """Greedy decoding with a static KV cache; on CUDA the one-token step is a replayed CUDA graph.

    Replaying a captured step removes the per-layer Python and launch overhead that otherwise
    hides the kernels' time at batch 1-8. The cache keeps its own fill count on the device, so
    the captured step writes at the right place on every replay; positions are passed explicitly.
    """

    def __init__(self, model, batch: int, max_len: int, compile_backend: str | None = None):
        from transformers import StaticCache

        self.model = model
        self.device = next(model.parameters()).device
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        self.position = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        self.use_graph = self.device.type == "cuda"
        self.graph = None
        self.next_token = None
        # compile: torch.compile fuses what lies between the linears (norms, rotary embedding,
        # residual adds, the MLP's activation) before the step is captured; block-sparse layers
        # enter the compiled graph as one opaque op each (spruce::block_sparse_linear)
        self.step = self._step
        if compile_backend is not None:
            torch._dynamo.reset()
            self.step = torch.compile(self._step, backend=compile_backend)

    def _step(self) -> torch.Tensor:
        logits = self.model(input_ids=self.token, past_key_values=self.cache, position_ids=self.position,
                            use_cache=True).logits
        return logits[:, -1].argmax(-1)

    def _prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        self.cache.reset()
        prompt = input_ids.shape[1]
        positions = torch.arange(prompt, device=self.device)[None]
        logits = self.model(input_ids=input_ids, past_key_values=self.cache, position_ids=positions,
                            use_cache=True, logits_to_keep=1).logits
        self.position.fill_(prompt)
        return logits[:, -1].argmax(-1)

    def _capture(self) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the capture (kernel tuning, cuBLAS handles)
            for _ in range(2):
                self.step()
        torch.cuda.current_stream().wait_stream(side)
        try:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.next_token = self.step()
        except Exception:
            from spruce.kernels.bsr import disable_pdl, pdl_enabled

            if not pdl_enabled(self.device):
                raise
            disable_pdl()  # capture without programmatic dependent launches
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.next_token = self.step()

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
        token = self._prefill(input_ids)
        if self.use_graph and self.graph is None:
            self._capture()
            token = self._prefill(input_ids)  # the warm-up steps wrote into the cache
        out = [token]
        for _ in range(new_tokens - 1):
            self.token.copy_(token[:, None])
            if self.use_graph:
                self.graph.replay()
                token = self.next_token.clone()
            else:
                token = self.step()
            out.append(token)
            self.position += 1
        return torch.cat([input_ids, torch.stack(out, dim=1)], dim=1)


GENERATE_MODES = ("graph", "compile", "eager")


def greedy_generator(model, mode: str, batch: int, prompt_tokens: int, new_tokens: int):
    """A function of the prompt ids that generates `new_tokens` greedily in the given mode."""
    if mode in ("graph", "compile"):
        greedy = StaticGreedy(model, batch, prompt_tokens + new_tokens,
                              compile_backend="inductor" if mode == "compile" else None)
        return functools.partial(greedy.generate, new_tokens=new_tokens)

    def hf_generate(ids):
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False)

    return hf_generate


def llama2_7b_config(num_layers: int = 32):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=num_layers,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                       max_position_embeddings=4096)


DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _decoder_linears(model):
    return [(name, module) for name, module in model.named_modules()
            if name.rsplit(".", 1)[-1] in DECODER_LINEARS and isinstance(module, torch.nn.Linear)]


def _linear_configs(model, batch: int, prompt_tokens: int, dtype) -> list[dict]:
    """Per distinct sparse linear (shape, density bucket): the tuned decode configuration for `batch`
    tokens and prefill configuration for the prompt, the tuner's us per call for each, and how many
    layers share them."""
    from spruce.kernels import BlockSparseLinear
    from spruce.kernels.bsr import (
        chosen_config,
        density_bucket,
        tuning_key,
        tuning_times,
    )

    times = tuning_times()
    out = {}
    for module in model.modules():
        if not isinstance(module, BlockSparseLinear):
            continue
        w = module.sparse_weight
        name = f"{w.shape[0]}x{w.shape[1]} b{w.block} g{w.group_features} {density_bucket(w)}"
        if name in out:
            out[name]["layers"] += 1
            continue
        entry = {"linear": name, "layers": 1}
        for kind, m in (("decode", batch), ("prefill", batch * prompt_tokens)):
            key = tuning_key(kind, w, m, dtype)
            cfg = chosen_config(kind, w, m, dtype)
            entry[kind] = str(cfg) if cfg is not None else None
            entry[f"{kind}_tuned_us"] = times.get("/".join(map(str, key)), {}).get(str(cfg))
        out[name] = entry
    return list(out.values())


def format_linear_configs(rows: list[dict]) -> str:
    """One line per batch and sparse linear: the configurations the generation runs used."""
    lines = [("kernel configurations (decode: features, inputs per tile, warps, stages, tl.dot, split; "
              "prefill: tokens, K step, warps, stages, swapped; us per call as the tuner timed it)")]
    seen = set()
    for r in rows:
        for c in r.get("configs", ()):
            line = (f"  batch {r['batch']:>2} {c['linear']:<26} x{c['layers']:<3} decode {c['decode']} "
                    f"{_us(c['decode_tuned_us'])}  prefill {c['prefill']} {_us(c['prefill_tuned_us'])}")
            if line not in seen:
                seen.add(line)
                lines.append(line)
    return "\n".join(lines) if len(lines) > 1 else ""


def _us(value) -> str:
    return f"{value:.1f} us" if isinstance(value, (int, float)) else "(not tuned)"


def bench_generate(batch_sizes=(1, 8), new_tokens: int = 128, prompt_tokens: int = 128, sparsity: float = 0.5,
                   block_size: int = 16, layout: str = "grouped", modes=("graph", "eager"),
                   semi_structured: bool = True, num_layers: int = 32, json_path: str | None = None,
                   seed: int = 0, pdl: str | None = None) -> list[dict]:
    """Greedy generation tokens/s of a random Llama-2-7B-shaped bf16 model: dense, block-sparse, 2:4.

    Every decoder linear gets `sparsity` zero blocks of `block_size` in `layout` ("grouped" or
    "independent", see `random_block_mask`); the dense model is the same masked model run by cuBLAS.
    batch_sizes: prompts per batch. new_tokens / prompt_tokens: generated and prompt lengths.
    modes: any of "graph" (static cache, the one-token step replayed as a CUDA graph), "compile"
    (the same, the step compiled with torch.compile's inductor before capture) and "eager"
    (Hugging Face `generate` with its default cache). semi_structured: also run torch's 2:4 on the
    same layers (pruned 2:4 by magnitude). num_layers: decoder layers (32 is Llama-2-7B).
    json_path: where to write rows and environment. pdl (else the environment's SPRUCE_BENCH_PDL):
    "on" / "off" sets programmatic dependent launch for the sparse kernels, "both" runs the sparse
    model with it on and then off (same tuned configurations); unset, SPRUCE_PDL decides. Each
    sparse row records whether PDL was on (after capture, which turns it off if it fails), the
    tuned configuration of every sparse linear shape (configs) and the sum of the tuner's times
    over the step's sparse linears (linears_tuned_ms). Returns the rows.
    """
    from transformers import LlamaForCausalLM

    from spruce.kernels import densify, sparsify
    from spruce.kernels.bsr import pdl_enabled, set_pdl

    _require_cuda()
    pdl = _pdl_choice(pdl)
    pdl_states = {None: [None], "on": [True], "off": [False], "both": [True, False]}[pdl]
    unknown = set(modes) - set(GENERATE_MODES)
    if unknown:
        raise SpruceError(f"modes must be among {', '.join(GENERATE_MODES)}, got {sorted(unknown)}")
    if not 0.0 < sparsity < 1.0:
        raise SpruceError(f"sparsity must be between 0 and 1, got {sparsity}")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    ceilings = measure_ceilings()
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(llama2_7b_config(num_layers)).eval()
    finally:
        torch.set_default_dtype(default_dtype)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    with torch.no_grad():
        for _, linear in _decoder_linears(model):
            n, k = linear.weight.shape
            mask = random_block_mask(n, k, block_size, sparsity, layout, gen)
            linear.weight.mul_(expand_block_mask(mask, block_size).to("cuda"))
    prompts = {b: torch.randint(0, 32000, (b, prompt_tokens), generator=gen).to("cuda") for b in batch_sizes}
    rows, outputs = [], {}

    def run(kind: str, weight_bytes: int, sparse: bool = False):
        for b in batch_sizes:
            for mode in modes:
                extra = {}
                try:
                    generate = greedy_generator(model, mode, b, prompt_tokens, new_tokens)
                    generate(prompts[b])  # warm-up: kernel tuning, graph capture
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                    tokens = generate(prompts[b])
                    torch.cuda.synchronize()
                    seconds = time.perf_counter() - start
                    if sparse:
                        extra["pdl"] = pdl_enabled(torch.device("cuda"))
                        extra["configs"] = _linear_configs(model, b, prompt_tokens, torch.bfloat16)
                        extra["linears_tuned_ms"] = sum(
                            c["layers"] * c["decode_tuned_us"] for c in extra["configs"]
                            if c["decode_tuned_us"] is not None) / 1e3
                except Exception as exc:  # noqa: BLE001 - report the failure of one case and go on with the others
                    rows.append({"kind": kind, "batch": b, "mode": mode, **extra,
                                 "error": f"{type(exc).__name__}: {exc}"})
                    continue
                outputs[kind, b, mode, extra.get("pdl")] = tokens.cpu()
                per_token_ms = seconds / new_tokens * 1e3
                rows.append({"kind": kind, "batch": b, "mode": mode, "seconds": seconds,
                             "tokens_per_s": b * new_tokens / seconds, "ms_per_step": per_token_ms,
                             "weight_bytes": weight_bytes,
                             "weight_read_floor_ms": weight_bytes / ceilings["copy_bytes_per_s"] * 1e3, **extra})

    def model_bytes():
        total = 0
        for t in list(model.parameters()) + list(model.buffers()):
            if t.layout == torch.strided and type(t) in (torch.Tensor, torch.nn.Parameter):
                total += t.numel() * t.element_size()
        return total

    run("dense", model_bytes())
    report = sparsify(model, block_size=block_size, min_sparsity=min(sparsity, 0.3))
    try:
        for state in pdl_states:
            if state is not None:
                set_pdl(state)
            run(f"bsr b{block_size} {sparsity:.0%} {layout}", model_bytes(), sparse=True)
    finally:
        if pdl is not None:
            set_pdl(None)
    densify(model)
    if semi_structured:
        from torch.sparse import to_sparse_semi_structured

        with torch.no_grad():
            for _, linear in _decoder_linears(model):
                linear.weight = torch.nn.Parameter(to_sparse_semi_structured(prune_2_4(linear.weight)),
                                                   requires_grad=False)
        dense_bytes = rows[0].get("weight_bytes", 0)
        linear_elems = sum(m.weight.shape[0] * m.weight.shape[1] for _, m in _decoder_linears(model))
        run("2:4 torch", dense_bytes - linear_elems * 2 + linear_elems + linear_elems // 8)

    for r in rows:
        base = next((d for d in rows if d["kind"] == "dense" and d["batch"] == r["batch"]
                     and d["mode"] == r["mode"] and "error" not in d), None)
        if base is not None and "error" not in r:
            r["speedup"] = r["tokens_per_s"] / base["tokens_per_s"]
            dense_out = outputs.get(("dense", r["batch"], r["mode"], None))
            if r["kind"].startswith("bsr") and dense_out is not None:
                new = outputs[r["kind"], r["batch"], r["mode"], r.get("pdl")][:, prompt_tokens:]
                r["tokens_equal_to_dense"] = (new == dense_out[:, prompt_tokens:]).float().mean().item()
    summary = {"environment": environment(), "ceilings": ceilings, "num_layers": num_layers,
               "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "sparsify_report": str(report),
               "pdl_setting": pdl, "rows": rows}
    configs = format_linear_configs(rows)
    if configs:
        print(configs)
    print(format_generate_table(rows))
    if json_path:
        _write_json(json_path, summary)
    return rows


def format_generate_table(rows: list[dict]) -> str:
    """The rows as a table. pdl: whether the sparse kernels ran with programmatic dependent launch;
    lin ms: the tuner's times summed over one step's sparse linears (what the kernels alone take)."""
    lines = [(f"{'kind':<24} {'pdl':<3} {'batch':>5} {'mode':<6} {'tokens/s':>9} {'x dense':>8} {'ms/step':>8} "
              f"{'floor ms':>8} {'lin ms':>7} {'same new':>8}")]
    for r in rows:
        pdl = {True: "on", False: "off"}.get(r.get("pdl"), "")
        if "error" in r:
            lines.append(f"{r['kind']:<24} {pdl:<3} {r['batch']:>5} {r['mode']:<6} failed: {r['error'][:90]}")
            continue
        same = f"{r['tokens_equal_to_dense']:.0%}" if "tokens_equal_to_dense" in r else ""
        lin = f"{r['linears_tuned_ms']:.2f}" if r.get("linears_tuned_ms") else ""
        lines.append(f"{r['kind']:<24} {pdl:<3} {r['batch']:>5} {r['mode']:<6} {r['tokens_per_s']:9.1f} "
                     f"{r.get('speedup', float('nan')):8.2f} {r['ms_per_step']:8.2f} "
                     f"{r['weight_read_floor_ms']:8.2f} {lin:>7} {same:>8}".rstrip())
    return "\n".join(lines)
