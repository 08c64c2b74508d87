"""python -m bench.generate --json runs/bench/generate.json

Greedy generation of a random Llama-2-7B-shaped bf16 model (random weights measure speed
honestly): dense, block-sparse and 2:4 tokens/s, measured in the same run, with the time one step
needs to read the weights at the card's measured copy bandwidth; prints a table of ratios against
dense and can write JSON. The same as `spruce bench generate`; `--help` lists the flags.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import torch

from spruce.errors import SpruceError
from spruce.generate import MODES as GENERATE_MODES
from spruce.generate import greedy_generator
from spruce.models import prunable_linears

from .common import (LAYOUTS, _pdl_choice, cli_main, environment, expand_block_mask, llama2_7b_config,
                     measure_ceilings, prune_2_4, random_block_mask, require_cuda, write_json)


def add_arguments(b) -> None:
    """The flags of `spruce bench generate` and `python -m bench.generate`."""
    b.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    b.add_argument("--new-tokens", type=int, default=128)
    b.add_argument("--prompt-tokens", type=int, default=128)
    b.add_argument("--sparsity", type=float, default=0.5, help="fraction of zero blocks in every decoder linear")
    b.add_argument("--block-size", type=int, default=16)
    b.add_argument("--layout", choices=list(LAYOUTS), default="grouped")
    b.add_argument("--modes", nargs="+", choices=list(GENERATE_MODES), default=["graph", "eager"],
                   help="graph: static cache + CUDA graph per step; compile: the same step compiled with "
                        "torch.compile (inductor) first; eager: Hugging Face generate (default: graph eager)")
    b.add_argument("--no-semi-structured", action="store_true", help="skip torch's 2:4 path")
    b.add_argument("--num-layers", type=int, default=32, help="decoder layers (32 is Llama-2-7B)")
    b.add_argument("--json", help="write rows, ceilings and environment to this file")


def run(args) -> None:
    bench_generate(batch_sizes=args.batch_sizes, new_tokens=args.new_tokens, prompt_tokens=args.prompt_tokens,
                   sparsity=args.sparsity, block_size=args.block_size, layout=args.layout, modes=args.modes,
                   semi_structured=not args.no_semi_structured, num_layers=args.num_layers, json_path=args.json)


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
    from spruce.kernels import densify, sparsify
    from spruce.kernels.bsr import set_pdl

    require_cuda()
    pdl = _pdl_choice(pdl)
    pdl_states = {None: [None], "on": [True], "off": [False], "both": [True, False]}[pdl]
    _check_options(modes, sparsity)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    ceilings = measure_ceilings()
    model = _masked_random_llama(num_layers, block_size, sparsity, layout, gen)
    prompts = {b: torch.randint(0, 32000, (b, prompt_tokens), generator=gen).to("cuda") for b in batch_sizes}
    timer = _GenerationTimer(model, batch_sizes, modes, prompts, prompt_tokens, new_tokens,
                             ceilings["copy_bytes_per_s"])
    timer.run("dense", _model_bytes(model))
    report = sparsify(model, block_size=block_size, min_sparsity=min(sparsity, 0.3))
    try:
        for state in pdl_states:
            if state is not None:
                set_pdl(state)
            timer.run(f"bsr b{block_size} {sparsity:.0%} {layout}", _model_bytes(model), sparse=True)
    finally:
        if pdl is not None:
            set_pdl(None)
    densify(model)
    if semi_structured:
        _run_semi_structured(model, timer)
    rows = timer.rows
    _compare_to_dense(rows, timer.outputs, prompt_tokens)
    summary = {"environment": environment(), "ceilings": ceilings, "num_layers": num_layers,
               "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "sparsify_report": str(report),
               "pdl_setting": pdl, "rows": rows}
    configs = format_linear_configs(rows)
    if configs:
        print(configs)
    print(format_generate_table(rows))
    if json_path:
        write_json(json_path, summary)
    return rows


def _check_options(modes, sparsity: float) -> None:
    unknown = set(modes) - set(GENERATE_MODES)
    if unknown:
        raise SpruceError(f"modes must be among {', '.join(GENERATE_MODES)}, got {sorted(unknown)}")
    if not 0.0 < sparsity < 1.0:
        raise SpruceError(f"sparsity must be between 0 and 1, got {sparsity}")


def _masked_random_llama(num_layers: int, block_size: int, sparsity: float, layout: str, gen: torch.Generator):
    """A random bf16 Llama-2-7B-shaped model on CUDA, every decoder linear with `sparsity` zero blocks."""
    from transformers import LlamaForCausalLM

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
        for _, linear in prunable_linears(model).items():
            n, k = linear.weight.shape
            mask = random_block_mask(n, k, block_size, sparsity, layout, gen)
            linear.weight.mul_(expand_block_mask(mask, block_size).to("cuda"))
    return model


def _model_bytes(model) -> int:
    """Bytes of the model's dense tensors (parameters and buffers; packed sparse weights are not counted)."""
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.layout == torch.strided and type(t) in (torch.Tensor, torch.nn.Parameter):
            total += t.numel() * t.element_size()
    return total


@dataclass
class _GenerationTimer:
    """Greedy generation of one model timed for every batch size and mode: one row each, and the
    generated tokens by (kind, batch, mode, pdl) for the comparison with dense."""
    model: object
    batch_sizes: tuple
    modes: tuple
    prompts: dict
    prompt_tokens: int
    new_tokens: int
    copy_bytes_per_s: float
    rows: list = field(default_factory=list)
    outputs: dict = field(default_factory=dict)

    def run(self, kind: str, weight_bytes: int, sparse: bool = False) -> None:
        for b in self.batch_sizes:
            for mode in self.modes:
                self._one(kind, weight_bytes, sparse, b, mode)

    def _one(self, kind: str, weight_bytes: int, sparse: bool, b: int, mode: str) -> None:
        from spruce.kernels.bsr import pdl_enabled

        extra = {}
        try:
            generate = greedy_generator(self.model, mode, b, self.prompt_tokens, self.new_tokens)
            generate(self.prompts[b])  # warm-up: kernel tuning, graph capture
            torch.cuda.synchronize()
            start = time.perf_counter()
            tokens = generate(self.prompts[b])
            torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            if sparse:
                extra["pdl"] = pdl_enabled(torch.device("cuda"))
                extra["configs"] = _linear_configs(self.model, b, self.prompt_tokens, torch.bfloat16)
                extra["linears_tuned_ms"] = sum(
                    c["layers"] * c["decode_tuned_us"] for c in extra["configs"]
                    if c["decode_tuned_us"] is not None) / 1e3
        except Exception as exc:  # noqa: BLE001 - report the failure of one case and go on with the others
            self.rows.append({"kind": kind, "batch": b, "mode": mode, **extra,
                              "error": f"{type(exc).__name__}: {exc}"})
            return
        self.outputs[kind, b, mode, extra.get("pdl")] = tokens.cpu()
        per_token_ms = seconds / self.new_tokens * 1e3
        self.rows.append({"kind": kind, "batch": b, "mode": mode, "seconds": seconds,
                          "tokens_per_s": b * self.new_tokens / seconds, "ms_per_step": per_token_ms,
                          "weight_bytes": weight_bytes,
                          "weight_read_floor_ms": weight_bytes / self.copy_bytes_per_s * 1e3, **extra})


def _run_semi_structured(model, timer: _GenerationTimer) -> None:
    """The same model pruned 2:4 by magnitude on torch's semi-structured path, timed like the others."""
    from torch.sparse import to_sparse_semi_structured

    with torch.no_grad():
        for _, linear in prunable_linears(model).items():
            linear.weight = torch.nn.Parameter(to_sparse_semi_structured(prune_2_4(linear.weight)),
                                               requires_grad=False)
    dense_bytes = timer.rows[0].get("weight_bytes", 0)
    linear_elems = sum(m.weight.shape[0] * m.weight.shape[1] for _, m in prunable_linears(model).items())
    timer.run("2:4 torch", dense_bytes - linear_elems * 2 + linear_elems + linear_elems // 8)


def _compare_to_dense(rows: list[dict], outputs: dict, prompt_tokens: int) -> None:
    """Each row's speedup over dense at the same batch and mode, and for block-sparse rows the share
    of generated tokens equal to dense's."""
    for r in rows:
        base = next((d for d in rows if d["kind"] == "dense" and d["batch"] == r["batch"]
                     and d["mode"] == r["mode"] and "error" not in d), None)
        if base is not None and "error" not in r:
            r["speedup"] = r["tokens_per_s"] / base["tokens_per_s"]
            dense_out = outputs.get(("dense", r["batch"], r["mode"], None))
            if r["kind"].startswith("bsr") and dense_out is not None:
                new = outputs[r["kind"], r["batch"], r["mode"], r.get("pdl")][:, prompt_tokens:]
                r["tokens_equal_to_dense"] = (new == dense_out[:, prompt_tokens:]).float().mean().item()


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


if __name__ == "__main__":
    sys.exit(cli_main(add_arguments, run, __doc__))
