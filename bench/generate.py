"""python -m bench.generate --json runs/bench/generate.json

Greedy generation of a random Llama-2-7B-shaped bf16 model (random weights measure speed
honestly) whose decoder linears are pruned by spruce's own pattern functions in the layouts the
pruner emits (`--layout 16x16 16x16g4`; default: the layout the default 16x16 recipe emits), at
the default block recipe's sparsities (attention 40%, the MLP what keeps the total at
--sparsity), with a Wanda-like score (|W| times random log-normal input norms, so global
selection gives groups unequal counts as real layers do). For each layout and mode: the dense
model, then block-sparse with the dense dispatch (every layer runs dense cuBLAS at the launch
shapes where the tuner timed dense faster on this device) and without it; each timed as time to
first token of a --prompt-tokens prompt (prefill) and decode tokens/s at every batch size, with
the fraction of new tokens equal to dense's. Prints each layout as stored, which layers run
sparse, a table of ratios against dense in the same mode, and can write JSON. The same as
`spruce bench generate`; `--help` lists the flags.
"""

from __future__ import annotations

import sys
import time

import torch

from spruce.errors import SpruceError
from spruce.generate import MODES as GENERATE_MODES
from spruce.generate import dispatch_line, measure_speeds, speed_prompts
from spruce.models import prunable_linears

from .common import _pdl_choice, cli_main, environment, measure_ceilings, prune_2_4, random_llama, require_cuda, write_json

SWITCH_CHOICES = {"both": [True, False], "on": [True], "off": [False]}
# Prefills per time to first token (the median): with 3, batch 1 on an H200 read 1.05, 0.90 and
# 1.00x dense in three runs with the same kernels (docs/RESULTS.md, 2026-12-04).
BENCH_TTFT_REPEATS = 10


def default_layout() -> str:
    """The block layout `spruce prune --sparsity_type 16x16` emits under the default recipe."""
    from spruce.prune.defaults import default_grouping, resolve_recipe

    return default_grouping("16x16", resolve_recipe("16x16"))


def default_module_sparsity() -> str:
    """The default block recipe's per-module sparsities, as NAME=RATIO pairs (`attn=0.4`)."""
    from spruce.prune.defaults import DEFAULTS

    return ",".join(f"{k}={v:g}" for k, v in DEFAULTS["block"]["module_sparsity"].items())


def add_arguments(b) -> None:
    """The flags of `spruce bench generate` and `python -m bench.generate`."""
    b.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    b.add_argument("--new-tokens", type=int, default=128)
    b.add_argument("--prompt-tokens", type=int, default=2048, help="prompt length for time to first token")
    b.add_argument("--sparsity", type=float, default=0.5, help="fraction of zero weights over all decoder linears")
    b.add_argument("--module-sparsity", default=default_module_sparsity(),
                   help="NAME=RATIO per module kind, the rest balances the total (default: the block recipe's, "
                        "%(default)s); '' for the same sparsity everywhere")
    b.add_argument("--block-size", type=int, default=16)
    b.add_argument("--layout", nargs="+", default=[default_layout()],
                   help="pruner block patterns to emit and run, e.g. 16x16 (independent block-rows), 16x16g4 "
                        "(4 block-rows share their columns), 16x16g8 (default: %(default)s, the default recipe's); "
                        "16x16g4,mlp.gate_proj=16x16g8,mlp.up_proj=16x16g8 gives those linears their own pattern "
                        "(spruce prune --module_pattern)")
    b.add_argument("--selection", default="global", help="block selection, as the pruner's (default: global)")
    b.add_argument("--modes", nargs="+", choices=list(GENERATE_MODES), default=["compile"],
                   help="graph: static cache + CUDA graph per step; compile: the same step compiled with "
                        "torch.compile (inductor) first; eager: Hugging Face generate; hf-static: Hugging Face "
                        "generate with a static cache, its decode step compiled (default: compile)")
    b.add_argument("--dense-dispatch", choices=list(SWITCH_CHOICES), default="both",
                   help="on: layers run dense where the tuner timed dense faster; off: the kernel everywhere; "
                        "both: each (default)")
    b.add_argument("--fuse", choices=list(SWITCH_CHOICES), default="on",
                   help="on: q/k/v and gate/up run as one launch each; off: one launch per linear; both: "
                        "each (default: %(default)s)")
    b.add_argument("--semi-structured", action="store_true", help="also run torch's 2:4 path")
    b.add_argument("--num-layers", type=int, default=32, help="decoder layers (32 is Llama-2-7B)")
    b.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="start no new case after this many seconds (the rest are listed as skipped)")
    b.add_argument("--ttft-repeats", type=int, default=BENCH_TTFT_REPEATS, metavar="N",
                   help="prefills timed per time to first token, the median reported (default: %(default)s)")
    b.add_argument("--json", help="write rows, ceilings and environment to this file")


def run(args) -> None:
    bench_generate(batch_sizes=args.batch_sizes, new_tokens=args.new_tokens, prompt_tokens=args.prompt_tokens,
                   sparsity=args.sparsity, module_sparsity=args.module_sparsity, block_size=args.block_size,
                   layouts=args.layout, selection=args.selection, modes=args.modes,
                   dense_dispatch=args.dense_dispatch, fuse=args.fuse, semi_structured=args.semi_structured,
                   num_layers=args.num_layers, time_budget=args.time_budget, json_path=args.json,
                   ttft_repeats=args.ttft_repeats)


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
              "prefill: tokens, K step, warps, stages, swapped; ('dense',): cuBLAS; us per call as the tuner "
              "timed it)")]
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


def emit_masks(model, originals: dict, layout: str, selection: str, sparsity: float, module_sparsity: str,
               seed: int = 0) -> dict[str, float]:
    """Prune every decoder linear of `model` from its original weight in `originals` with the
    pruner's own pattern `layout` (spruce.prune.patterns; in "16x16g4,mlp.gate_proj=16x16g8" the
    linears whose name contains a key get its pattern, as with `spruce prune --module_pattern`),
    each at its share of `sparsity` after
    the module overrides (spruce.prune.allocate), on a Wanda-like score: |W| times log-normal
    input norms drawn from `seed`. Returns the sparsity of each linear."""
    from spruce.prune.allocate import allocate, block_index, parse_overrides
    from spruce.prune.patterns import parse_pattern

    main, overrides = split_layout(layout)
    patterns = {key: parse_pattern(p, selection) for key, p in overrides.items()}
    default = parse_pattern(main, selection)
    linears = prunable_linears(model)
    shares = allocate({n: m.weight.numel() for n, m in linears.items()}, block_index(model, linears), sparsity,
                      None, parse_overrides(module_sparsity))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, linear in linears.items():
            w = originals[name]
            norms = torch.exp(torch.randn(w.shape[1], generator=gen)).to(w.device)
            pattern = next((p for key, p in patterns.items() if key in name), default)
            pruned = pattern.mask(w.abs().float() * norms, shares[name])
            linear.weight.copy_(w.masked_fill(pruned, 0))
    return shares


def layout_line(model, layout: str, selection: str, shares: dict[str, float], block_size: int) -> str:
    """How the kernels store the emitted layout: per module kind, sparsity, group width, whether
    every group keeps the same count, and the zero blocks a group stores (0 for an exact layout)."""
    from spruce.kernels import BlockSparseWeight

    kinds = {}
    for name, linear in prunable_linears(model).items():
        kind = name.rsplit(".", 1)[-1]
        if kind in kinds:
            continue
        w = BlockSparseWeight.from_dense(linear.weight.detach(), block_size)
        stored_zero = w.values.shape[0] * w.group - w.nonzero_blocks
        kinds[kind] = (f"{kind} {shares[name]:.0%} zero, {w.group_features}-feature groups"
                       f"{', equal counts' if w.uniform_count >= 0 else ''}"
                       f"{f', {stored_zero} zero blocks stored' if stored_zero else ''}")
    return f"layout {layout} ({selection} selection): " + "; ".join(kinds.values())


def step_weight_bytes(model, batch: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of weights one decode step of `batch` tokens reads: every parameter and buffer once,
    except an input embedding table (only its `batch` looked-up rows, unless a linear shares the
    table: a tied LM head reads it whole) and, for a block-sparse linear, only the copy that runs
    at this launch shape (its kept blocks and indices, or its dense copy where the dispatch runs
    dense; an untuned shape counts as sparse)."""
    from spruce.kernels.bsr import runs_dense
    from spruce.kernels.linear import BlockSparseLinear

    nbytes = lambda t: t.numel() * t.element_size() if t is not None else 0  # noqa: E731
    counted: set[int] = set()
    total = 0
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    linear_weights = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    for module in model.modules():
        if isinstance(module, BlockSparseLinear):
            dense = runs_dense("decode", module.sparse_weight, batch, dtype) and module.dense_weight is not None
            parts = [module.dense_weight] if dense else [module.values, module.cols, module.group_ptr]
            total += sum(nbytes(t) for t in [*parts, module.bias])
            counted.update(id(t) for t in (module.values, module.cols, module.group_ptr, module.dense_weight,
                                           module.bias) if t is not None)
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in counted or t.layout != torch.strided or type(t) not in (torch.Tensor, torch.nn.Parameter):
            continue
        counted.add(id(t))
        if id(t) in embeddings and id(t) not in linear_weights:
            total += batch * t.shape[1] * t.element_size()
        else:
            total += nbytes(t)
    return total


def bench_generate(batch_sizes=(1, 8), new_tokens: int = 128, prompt_tokens: int = 2048, sparsity: float = 0.5,
                   module_sparsity: str | None = None, block_size: int = 16, layouts=None,
                   selection: str = "global", modes=("compile",), dense_dispatch: str = "both", fuse: str = "on",
                   semi_structured: bool = False, num_layers: int = 32, time_budget: float | None = None,
                   json_path: str | None = None, seed: int = 0, pdl: str | None = None, device: str = "cuda",
                   config_overrides: dict | None = None, ttft_repeats: int | None = None) -> list[dict]:
    """Time to first token and decode tokens/s of a random Llama-2-7B-shaped bf16 model: dense
    against block-sparse on the layouts the pruner emits, with and without the dense dispatch.

    layouts: pruner block patterns (None: `default_layout()`); selection: "global" or
    "row-balanced"; sparsity / module_sparsity (None: the block recipe's): see `emit_masks`.
    batch_sizes: prompts per batch; prompt_tokens / new_tokens: prompt and generated lengths.
    modes: any of spruce.generate.MODES (see `add_arguments`). dense_dispatch: "on", "off" or
    "both" (see spruce.generate.measure_speeds). fuse: "on", "off" or "both": siblings (q/k/v,
    gate/up) as one launch (spruce.kernels.sparsify); unfused rows' kind ends in "unfused". semi_structured: also torch's 2:4 (pruned 2:4 by
    magnitude). num_layers: decoder layers (32 is Llama-2-7B). time_budget: seconds after which no
    new case starts. pdl (else SPRUCE_BENCH_PDL): "on" / "off" sets programmatic dependent launch
    for the sparse kernels. ttft_repeats: prefills per time to first token (default
    BENCH_TTFT_REPEATS). device / config_overrides: for a CPU check on a tiny model (the numbers
    mean nothing there). Every row: layout, kind, batch, mode, time to first token (ttft_ms,
    ttft_speedup: dense / sparse), decode tokens/s over the batch (tokens_per_s, speedup), ms per
    step, the weight bytes one decode step reads (`step_weight_bytes`) and the fraction of new tokens
    equal to dense; sparse rows also which layers run sparse (dispatch) and the tuned
    configuration of every sparse linear shape. Returns the rows.
    """
    from spruce.kernels.bsr import set_pdl

    if device == "cuda":
        require_cuda()
    pdl = _pdl_choice(pdl)
    if pdl == "both":
        raise SpruceError("the generation bench runs PDL on or off (SPRUCE_BENCH_PDL=on|off), not both")
    layouts = list(layouts or [default_layout()])
    module_sparsity = default_module_sparsity() if module_sparsity is None else module_sparsity
    _check_options(layouts, block_size, modes, dense_dispatch, sparsity, fuse)
    bench = _GenerateBench(batch_sizes, new_tokens, prompt_tokens, sparsity, module_sparsity, block_size, selection,
                           num_layers, time_budget, json_path, seed, pdl, device, config_overrides, ttft_repeats)
    if pdl is not None:
        set_pdl(pdl == "on")
    # dense dispatch first, on every layout, then without it: a run cut by the time budget has the
    # dispatch rows of each layout (the dense rows of a layout are measured once per mode)
    for mode in modes:
        for dispatch in SWITCH_CHOICES[dense_dispatch]:
            for fused in SWITCH_CHOICES[fuse]:
                for layout in layouts:
                    bench.run_case(layout, mode, dispatch, fused)
    if semi_structured:
        _run_semi_structured(bench.model, bench.originals, bench.prompts, new_tokens, modes, bench.repeats,
                             bench.rows, bench.case, bench.add_rows)
    if pdl is not None:
        set_pdl(None)
    return bench.finish()


def _check_options(layouts, block_size: int, modes, dense_dispatch: str, sparsity: float, fuse: str = "on") -> None:
    unknown = set(modes) - set(GENERATE_MODES)
    if unknown:
        raise SpruceError(f"modes must be among {', '.join(GENERATE_MODES)}, got {sorted(unknown)}")
    for name, value in (("dense_dispatch", dense_dispatch), ("fuse", fuse)):
        if value not in SWITCH_CHOICES:
            raise SpruceError(f"{name} must be one of {', '.join(SWITCH_CHOICES)}, got {value!r}")
    if not 0.0 < sparsity < 1.0:
        raise SpruceError(f"sparsity must be between 0 and 1, got {sparsity}")
    _check_layouts(layouts, block_size)


def _random_llama(num_layers: int, device: str, config_overrides: dict | None):
    """A random bf16 Llama-2-7B-shaped model with `num_layers` decoder layers that never stops early."""
    model = random_llama(num_layers, torch.bfloat16, device, **(config_overrides or {}))
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


class _GenerateBench:
    """The state of one generation bench run: the model, its original weights, the prompts, the
    rows and the JSON summary; each case is timed through `case` (time budget, failures, saving)."""

    def __init__(self, batch_sizes, new_tokens, prompt_tokens, sparsity, module_sparsity, block_size, selection,
                 num_layers, time_budget, json_path, seed, pdl, device, config_overrides, ttft_repeats):

        self.started = time.perf_counter()
        self.batch_sizes, self.new_tokens, self.prompt_tokens = batch_sizes, new_tokens, prompt_tokens
        self.sparsity, self.module_sparsity, self.block_size = sparsity, module_sparsity, block_size
        self.selection, self.time_budget, self.json_path, self.seed = selection, time_budget, json_path, seed
        self.pdl, self.device, self.cuda = pdl, device, device == "cuda"
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        self.ceilings = measure_ceilings() if self.cuda else None
        self.model = _random_llama(num_layers, device, config_overrides)
        prompt = torch.randint(0, self.model.config.vocab_size, (1, prompt_tokens), generator=gen).to(device)
        self.prompts = list(speed_prompts(prompt, prompt_tokens, batch_sizes).values())
        self.originals = {n: m.weight.detach().clone() for n, m in prunable_linears(self.model).items()}
        self.repeats = ttft_repeats or BENCH_TTFT_REPEATS
        self.rows: list[dict] = []
        self.summary = {"environment": environment(), "ceilings": self.ceilings, "num_layers": num_layers,
                        "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "sparsity": sparsity,
                        "module_sparsity": module_sparsity, "selection": selection, "pdl_setting": pdl,
                        "layouts": {}, "rows": self.rows}
        self.dense_of: dict = {}
        self.current = None

    def out_of_time(self) -> bool:
        return self.time_budget is not None and time.perf_counter() - self.started > self.time_budget

    def add_rows(self, layout, kind, mode, speeds, dense, extra):
        for i, s in enumerate(speeds):
            row = {"layout": layout, "kind": kind, "batch": s.batch, "mode": mode, "prompt_tokens": self.prompt_tokens,
                   "new_tokens": self.new_tokens, "ttft_ms": s.ttft_s * 1e3, "tokens_per_s": s.decode_tokens_per_second,
                   "ms_per_step": s.decode_s / max(self.new_tokens - 1, 1) * 1e3, **extra}
            if "weight_bytes" in extra:  # by batch: the bytes one decode step of that batch reads
                row["weight_bytes"] = extra["weight_bytes"][s.batch]
                if self.ceilings:
                    row["weight_read_floor_ms"] = row["weight_bytes"] / self.ceilings["copy_bytes_per_s"] * 1e3
            if dense is not None:
                d = dense[i]
                row["speedup"] = s.decode_tokens_per_second / d.decode_tokens_per_second
                row["ttft_speedup"] = d.ttft_s / s.ttft_s
                new = slice(self.prompt_tokens, None)
                row["tokens_equal_to_dense"] = (s.ids[:, new] == d.ids[:, new]).float().mean().item()
            self.rows.append(row)

    def save(self):
        from spruce.kernels.bsr import tuning_times

        self.summary["tuning_us"] = tuning_times()
        self.summary["seconds"] = round(time.perf_counter() - self.started, 1)
        if self.json_path:
            write_json(self.json_path, self.summary, quiet=True)

    def case(self, layout, kind, mode, fn):
        if self.out_of_time():
            self.rows.append({"layout": layout, "kind": kind, "mode": mode, "batch": 0, "skipped": "time budget"})
            print(f"skipped (time budget): {layout} {kind} {mode}", flush=True)
            return None
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - report the failure of one case and go on with the others
            self.rows.append({"layout": layout, "kind": kind, "mode": mode, "batch": 0,
                              "error": f"{type(exc).__name__}: {exc}"})
            print(f"failed: {layout} {kind} {mode}: {type(exc).__name__}: {exc}", flush=True)
            return None
        finally:
            self.save()

    def inspect(self, model_now):
        from spruce.kernels.bsr import pdl_enabled

        return {"weight_bytes": {b: step_weight_bytes(model_now, b) for b in self.batch_sizes},
                "pdl": pdl_enabled(torch.device(self.device)) if self.cuda else None,
                "configs": {b: _linear_configs(model_now, b, self.prompt_tokens, torch.bfloat16)
                            for b in self.batch_sizes}}

    def use_layout(self, layout: str) -> None:
        """Prune the model from its original weights into `layout` (once per change of layout)."""
        if layout == self.current:
            return
        shares = emit_masks(self.model, self.originals, layout, self.selection, self.sparsity,
                            self.module_sparsity, self.seed)
        self.current = layout
        if layout not in self.summary["layouts"]:
            self.summary["layouts"][layout] = layout_line(self.model, layout, self.selection, shares, self.block_size)
            print(self.summary["layouts"][layout], flush=True)

    def dense_rows(self, layout: str, mode: str):
        """The dense speeds of `layout`'s masked model in `mode`, measured once."""
        if (layout, mode) not in self.dense_of:
            dense = self.case(layout, "dense", mode,
                              lambda: measure_speeds(self.model, self.prompts, self.new_tokens, mode, sparse=False,
                                                     ttft_repeats=self.repeats)["dense"])
            self.dense_of[layout, mode] = dense
            if dense is not None:
                weight_bytes = {b: step_weight_bytes(self.model, b) for b in self.batch_sizes}
                self.add_rows(layout, "dense", mode, dense, dense, {"weight_bytes": weight_bytes})
                print("\n".join(format_generate_table(self.rows[-len(dense):]).splitlines()[1:]), flush=True)
        return self.dense_of[layout, mode]

    def run_case(self, layout: str, mode: str, dispatch: bool, fuse: bool = True) -> None:
        """Dense (once) and block-sparse speeds of `layout` in `mode`, with or without dense dispatch,
        siblings fused or not."""
        self.use_layout(layout)
        dense = self.dense_rows(layout, mode)
        kind = f"bsr {layout}" + (" +dense" if dispatch else "") + ("" if fuse else " unfused")
        result = self.case(layout, kind, mode,
                           lambda: measure_speeds(self.model, self.prompts, self.new_tokens, mode, sparse=True,
                                                  block_size=self.block_size, dense_dispatch=dispatch, compare=False,
                                                  ttft_repeats=self.repeats, on_sparse=self.inspect, fuse=fuse))
        if result is None:
            return
        seen = result["inspected"]
        print(f"{kind} {mode}: {dispatch_line(result['dispatch'])}", flush=True)
        for i, s in enumerate(result["sparse"]):
            extra = {"weight_bytes": seen["weight_bytes"], "pdl": seen["pdl"],
                     "dense_dispatch": dispatch, "dispatch": result["dispatch"]["text"],
                     "dispatch_table": result["dispatch"]["table"],
                     "kept_dense_bytes": result["dispatch"]["kept_dense_bytes"],
                     "configs": seen["configs"][s.batch]}
            self.add_rows(layout, kind, mode, [s], [dense[i]] if dense else None, extra)
            self.rows[-1]["linears_tuned_ms"] = sum(c["layers"] * c["decode_tuned_us"] for c in extra["configs"]
                                                    if c["decode_tuned_us"] is not None) / 1e3
            print(format_generate_table(self.rows[-1:]).splitlines()[1], flush=True)
        self.save()

    def finish(self) -> list[dict]:
        self.save()
        configs = format_linear_configs(self.rows)
        if configs:
            print(configs)
        print(format_generate_table(self.rows))
        if self.json_path:
            print(f"wrote {self.json_path}")
        return self.rows


def split_layout(layout: str) -> tuple[str, dict[str, str]]:
    """"16x16g4,mlp.gate_proj=16x16g8" -> ("16x16g4", {"mlp.gate_proj": "16x16g8"})."""
    from spruce.prune.spec import parse_module_patterns

    main, _, rest = layout.partition(",")
    return main.strip(), parse_module_patterns(rest)


def _check_layouts(layouts: list[str], block_size: int) -> None:
    from spruce.prune.patterns import parse_pattern

    for layout in layouts:
        main, overrides = split_layout(layout)
        for name in (main, *overrides.values()):
            pattern = parse_pattern(name)
            if pattern.kind not in ("block", "grouped"):
                raise SpruceError(f"--layout takes block patterns the pruner emits (16x16, 16x16g4, ...), "
                                  f"not {name!r}")
            rows = getattr(pattern, "block_rows", None) or pattern.rows
            if rows % block_size or pattern.cols % block_size:
                raise SpruceError(f"layout {name} does not tile into {block_size}x{block_size} kernel blocks")


def _run_semi_structured(model, originals, prompts, new_tokens, modes, repeats, rows, case, add_rows) -> None:
    from torch.sparse import to_sparse_semi_structured

    linears = prunable_linears(model)
    with torch.no_grad():
        for name, linear in linears.items():
            linear.weight = torch.nn.Parameter(to_sparse_semi_structured(prune_2_4(originals[name])),
                                               requires_grad=False)
    for mode in modes:
        result = case("2:4", "2:4 torch", mode,
                      lambda: measure_speeds(model, prompts, new_tokens, mode, sparse=False, ttft_repeats=repeats))
        if result is not None:
            dense = [r for r in rows if r.get("kind") == "dense" and r.get("mode") == mode]
            add_rows("2:4", "2:4 torch", mode, result["dense"], None, {})
            for r in rows[-len(prompts):]:
                base = next((d for d in dense if d["batch"] == r["batch"]), None)
                if base is not None:
                    r["speedup"] = r["tokens_per_s"] / base["tokens_per_s"]
                    r["ttft_speedup"] = base["ttft_ms"] / r["ttft_ms"]


def format_generate_table(rows: list[dict]) -> str:
    """The rows as a table. tokens/s: decode over the batch; x dense: against dense in the same
    layout, mode and batch; pdl: whether the sparse kernels ran with programmatic dependent launch;
    lin ms: the tuner's times summed over one step's sparse linears; same new: new tokens equal
    to dense's; ttft ms: time to first token (prefill); x: dense's over this one's."""
    lines = [(f"{'kind':<24} {'pdl':<3} {'batch':>5} {'mode':<9} {'tokens/s':>9} {'x dense':>8} {'ms/step':>8} "
              f"{'floor ms':>8} {'lin ms':>7} {'same new':>8} {'ttft ms':>9} {'x dense':>8}")]
    for r in rows:
        pdl = {True: "on", False: "off"}.get(r.get("pdl"), "")
        if "error" in r or "skipped" in r:
            why = f"failed: {r['error'][:90]}" if "error" in r else f"skipped: {r['skipped']}"
            lines.append(f"{r['kind']:<24} {pdl:<3} {'':>5} {r['mode']:<9} {why}")
            continue
        same = f"{r['tokens_equal_to_dense']:.0%}" if "tokens_equal_to_dense" in r else ""
        lin = f"{r['linears_tuned_ms']:.2f}" if r.get("linears_tuned_ms") else ""
        floor = f"{r['weight_read_floor_ms']:8.2f}" if "weight_read_floor_ms" in r else f"{'':>8}"
        ttft = f"{r['ttft_ms']:9.2f}" if "ttft_ms" in r else f"{'':>9}"
        ttft_x = f"{r['ttft_speedup']:8.2f}" if "ttft_speedup" in r else ""
        lines.append(f"{r['kind']:<24} {pdl:<3} {r['batch']:>5} {r['mode']:<9} {r['tokens_per_s']:9.1f} "
                     f"{r.get('speedup', float('nan')):8.2f} {r['ms_per_step']:8.2f} "
                     f"{floor} {lin:>7} {same:>8} {ttft} {ttft_x}".rstrip())
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(cli_main(add_arguments, run, __doc__))
