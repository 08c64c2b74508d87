"""`spruce prune`: the Wanda scripts' flags mapped onto a pruning run (prune/run.py run_prune).

The flags come in three groups, each a function below: what to remove and how (`_method_flags`;
None where the pattern's recipe decides, prune/defaults.py), calibration and allocation
(`_calibration_flags`), outputs (`_output_flags`). Defaults come from PruneSpec (prune/spec.py)
and the recipe constants; `_prune_options` maps the flags onto the recipe's options.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..assets import DEFAULT_CORPUS
from ..errors import SpruceError
from .common import EPILOG_CORPORA, EPILOG_MODELS, add_command, add_model_args, nonnegative_int, positive_int, \
    show_default


def add_parser(subparsers) -> None:
    from ..prune.defaults import DEFAULTS as RECIPES
    from ..prune.defaults import LARGE_RECONSTRUCT

    block = RECIPES["block"]
    p = add_command(subparsers, "prune", "prune a model (magnitude, Wanda, SparseGPT, OBS) into unstructured, N:M, block or hybrid sparsity",
                    "Prune every linear layer of the decoder blocks, one layer at a time over calibration\n"
                    "samples, and save an ordinary Hugging Face folder with zeros in place plus\n"
                    "sparsity.json (pattern, per-layer ratios, the resolved recipe). Accepts the flags of\n"
                    "the Wanda scripts. Without --prune_method each pattern gets its best measured recipe:\n"
                    "sparsegpt for unstructured and hybrid; sparsegpt + layer reconstruction for N:M;\n"
                    f"for blocks, {block['method']} with attention at {block['module_sparsity']['attn']:.0%} "
                    f"and layer reconstruction ({block['reconstruct_epochs']} epochs, lr "
                    f"{show_default(block['reconstruct_lr'])};\n{LARGE_RECONSTRUCT['reconstruct_epochs']} on 7B-class "
                    "models, for time), the OBS refit by conjugate gradients on 7B-class\n"
                    "linears (--obs_refit), and sparsegpt + the same reconstruction on linears wider than\n"
                    "--obs_max_inputs. Naming --prune_method runs that method plainly, with only the\n"
                    "options you add.\n\n"
                    "Patterns: 'unstructured' prunes the same share of every output row (Wanda);\n"
                    "'unstructured-layer' uses one threshold per matrix; 'N:M' (2:4, 4:8) keeps at most N\n"
                    "of every M consecutive input weights (so 2:4 is 50%); 'BxB' or 'RxC' (e.g. 16x16)\n"
                    "removes whole tiles, chosen with one threshold per matrix (--block_selection global)\n"
                    "or the same count per block-row (row-balanced); 'hybrid:16x16' keeps the best tiles\n"
                    "dense, the next 2:4 and the rest top-k (--hybrid_tiers).\n\n"
                    "Methods: magnitude (|W|, no data); wanda (|W| * input norm); sparsegpt (OBS weight\n"
                    "update, mask chosen inside the sweep); wanda+update (Wanda mask, SparseGPT update);\n"
                    "obs (blocks: tiles removed over rounds by exact group OBS error, kept weights refit).",
                    EPILOG_MODELS + "\n" + EPILOG_CORPORA)
    add_model_args(p)
    _method_flags(p)
    _calibration_flags(p)
    _output_flags(p)


def _method_flags(p) -> None:
    """What to remove and how the kept weights are updated."""
    from ..prune.allocate import ALLOCATIONS
    from ..prune.defaults import DEFAULTS as RECIPES
    from ..prune.defaults import DEFAULT_BLOCK_GROUP
    from ..prune.methods import METHODS
    from ..prune.patterns import DEFAULT_TIERS, SELECTIONS, TILE_SCORES
    from ..prune.reconstruct import RECONSTRUCT_TARGETS
    from ..prune.spec import DEFAULTS as PRUNE

    p.add_argument("--prune_method", choices=list(METHODS),
                   help="how weights are scored and updated (default: the best recipe for the pattern)")
    p.add_argument("--sparsity_type", default=PRUNE["pattern"],
                   help="unstructured, unstructured-layer, N:M such as 2:4, BxB / RxC blocks such as 16x16, "
                        "grouped blocks such as 16x16g4 (groups of 4 block-rows share their kept columns: the "
                        "kernels' wide tiles), hybrid:16x16, or 'block' with --block_size. Without "
                        f"--prune_method, RxC prunes as RxCg{DEFAULT_BLOCK_GROUP} with each MLP's features "
                        "reordered first (a smaller group where the model's rows do not divide); RxCg1 keeps "
                        f"every block-row independent (default: {PRUNE['pattern']})")
    p.add_argument("--block_selection", choices=SELECTIONS,
                   help="blocks: one threshold per matrix, or the same tile count in every block-row "
                        "(default: the pattern's recipe)")
    p.add_argument("--tile_score", choices=TILE_SCORES,
                   help="blocks ranked by wanda/magnitude: mean score of the tile (the reference) or sum of "
                        f"squared scores (default: {PRUNE['tile_score']})")
    p.add_argument("--hybrid_tiers", metavar="DENSE,NM",
                   help="hybrid: shares of tiles kept dense and kept 2:4; the rest keep their top-k weights "
                        f"(default: {','.join(show_default(t) for t in DEFAULT_TIERS)})")
    p.add_argument("--allocation", choices=ALLOCATIONS,
                   help="sparsity per decoder layer: uniform, or owl (layers with more outliers pruned less); "
                        "the total stays at --sparsity_ratio (default: the pattern's recipe)")
    p.add_argument("--owl_m", type=float, default=PRUNE["owl_m"],
                   help=f"owl: an outlier scores above M x the mean (default: {PRUNE['owl_m']:g})")
    p.add_argument("--owl_lambda", type=float, default=PRUNE["owl_lambda"],
                   help=f"owl: layer sparsities span the target +- lambda (default: {PRUNE['owl_lambda']:g})")
    p.add_argument("--dense_target", action=argparse.BooleanOptionalAction, default=None,
                   help="sparsegpt / wanda+update / obs: refit each layer toward the dense model's outputs, "
                        "which also undoes the drift from earlier pruned layers (default: the pattern's recipe)")
    p.add_argument("--true_sequential", dest="sequential", action=argparse.BooleanOptionalAction, default=None,
                   help="Hessian and Wanda methods: within a layer prune q/k/v, then o, then gate/up, then down, "
                        "each calibrated on the outputs of those already pruned (default: the pattern's recipe)")
    p.add_argument("--reconstruct_epochs", type=nonnegative_int, metavar="N",
                   help="after pruning each layer, N passes of Adam over the calibration set train its kept "
                        "weights toward the dense outputs; pruned weights stay zero; 0 turns it off "
                        "(default: the pattern's recipe)")
    p.add_argument("--reconstruct_lr", type=float, metavar="LR",
                   help="learning rate of the reconstruction (default: the pattern's recipe: "
                        f"{show_default(RECIPES['block']['reconstruct_lr'])} for square "
                        f"blocks, {show_default(PRUNE['reconstruct_lr'])} otherwise)")
    p.add_argument("--permute", action=argparse.BooleanOptionalAction, default=None,
                   help="block patterns: reorder each MLP's intermediate features before pruning so that rows "
                        "valuing the same block-columns share a tile (the dense function is unchanged; the saved "
                        "model is an ordinary one) (default: on under the default block recipe)")
    p.add_argument("--reconstruct_norms", action="store_true",
                   help="the reconstruction also trains each layer's norm weights (default: off)")
    p.add_argument("--reconstruct_target", choices=RECONSTRUCT_TARGETS,
                   help="reconstruction target: the dense model's outputs on its own inputs (dense), or the dense "
                        f"layer's outputs on the pruned model's inputs (local) (default: {PRUNE['reconstruct_target']})")


def _calibration_flags(p) -> None:
    """Per-module sparsity, the OBS width limit, the sparsity and the calibration data."""
    from ..prune.defaults import OBS_MAX_INPUTS
    from ..prune.methods import OBS_EXACT_MAX_FLOPS, OBS_REFITS
    from ..prune.spec import DEFAULTS as PRUNE

    p.add_argument("--module_pattern", metavar="NAME=PATTERN,...",
                   help="another pattern for linears whose name contains NAME, e.g. mlp.gate_proj=16x16g8,"
                        "mlp.up_proj=16x16g8 (128-row groups, where the prefill kernel gains most); the others "
                        "keep --sparsity_type")
    p.add_argument("--module_sparsity", metavar="NAME=RATIO,...",
                   help="fixed sparsity for linears whose name contains NAME (e.g. self_attn=0.35); the others "
                        "are shifted so the total stays at --sparsity_ratio")
    p.add_argument("--obs_max_inputs", type=nonnegative_int, metavar="N",
                   help="the default block recipe runs gradual block OBS on linears of up to N inputs and falls "
                        "back, per linear, to sparsegpt with block masks chosen in the sweep (same reconstruction) "
                        f"on wider ones; 0 forces the fallback everywhere (default: {OBS_MAX_INPUTS})")
    p.add_argument("--obs_refit", choices=OBS_REFITS,
                   help="gradual block OBS: refit the kept weights exactly (a Cholesky factor per block-row), "
                        "iteratively (batched conjugate gradients, what 7B-class linears get), or auto: exact while "
                        f"its cost estimate is at most {OBS_EXACT_MAX_FLOPS:.0e} flops (default: auto)")
    p.add_argument("--block_size", type=positive_int, help="with --sparsity_type block: square block side")
    p.add_argument("--sparsity_ratio", type=float, default=PRUNE["sparsity"],
                   help=f"fraction of weights set to zero, in [0, 1) (default: {PRUNE['sparsity']:g})")
    p.add_argument("--nsamples", type=positive_int, default=PRUNE["nsamples"],
                   help=f"calibration samples (default: {PRUNE['nsamples']})")
    p.add_argument("--seqlen", type=positive_int, default=PRUNE["seqlen"],
                   help=f"tokens per calibration sample (default: {PRUNE['seqlen']})")
    p.add_argument("--calib_dataset", default=DEFAULT_CORPUS, metavar="CORPUS",
                   help=f"calibration corpus, train split (default: {DEFAULT_CORPUS})")
    p.add_argument("--calib_batch_size", type=positive_int, default=PRUNE["batch_size"],
                   help=f"calibration samples per forward call (default: {PRUNE['batch_size']})")
    p.add_argument("--seed", type=int, default=0, help="seed for calibration sampling (default: 0)")


def _output_flags(p) -> None:
    """Where the pruned model, its resumable state and the Wanda-style log go."""
    from ..prune.run import EVAL_SEQLEN
    from ..prune.state import STATE_EVERY

    p.add_argument("--save_model", metavar="DIR", help="write the pruned model here")
    p.add_argument("--overwrite_output_dir", action="store_true", help="replace an existing --save_model folder")
    p.add_argument("--state_every", type=float, default=STATE_EVERY, metavar="SECONDS",
                   help="with --save_model: every SECONDS (after the layer in progress) keep the finished layers "
                        "and the next layer's inputs in a hidden folder beside DIR, so that the same command run "
                        "again after a kill continues from there; 0 saves after every layer, a negative value never "
                        f"(default: {show_default(STATE_EVERY)})")
    p.add_argument("--save_compressed", action="store_true",
                   help="with --save_model and a block pattern: write DIR as a compressed checkpoint (block-sparse "
                        "layers as values + block indices, about half the bytes at 50%%; see 'spruce compress') "
                        "instead of a dense one with zeros")
    p.add_argument("--eval_dataset", metavar="CORPUS",
                   help=f"measure perplexity (test split, {EVAL_SEQLEN}-token windows) after pruning")
    p.add_argument("--save", metavar="DIR", help="write log_<method>.txt with sparsity and perplexity here (Wanda style)")


def run(args) -> None:
    from ..models import load_model, prunable_linears
    from ..prune.patterns import check_divides
    from ..prune.run import run_prune

    pattern, recipe, compressed_block = _check_before_loading(args)
    model, tok = load_model(args.model, args.device, args.dtype, args.trust_remote_code, args.tokenizer)
    overridden = set(recipe.get("module_patterns") or ())
    check_divides(pattern, {n: tuple(m.weight.shape) for n, m in prunable_linears(model).items()
                            if not any(key in n for key in overridden)})
    if next(model.parameters()).device.type == "cpu" and recipe["method_is_default"] \
            and recipe["reconstruct_epochs"] >= 8:
        print(f"spruce: the default {pattern} recipe (OBS, then {recipe['reconstruct_epochs']} epochs of layer "
              "reconstruction per layer) is sized for a GPU; on a CPU it can take hours. --nsamples 32, "
              "--seqlen 1024 or --reconstruct_epochs 4 shorten it", file=sys.stderr)
    info, spec = run_prune(model, tok, recipe, pattern, args.sparsity_ratio, args.calib_dataset, args.seed,
                           out_dir=args.save_model, state_every=args.state_every, eval_corpus=args.eval_dataset,
                           recipe={k: v for k, v in vars(args).items() if k != "command"},
                           compressed_block=compressed_block)
    _report(args, info, spec)


def _check_before_loading(args) -> tuple[str, dict, int | None]:
    """Every check that needs no model: (the pattern, the resolved recipe, the compressed block side or None)."""
    from .. import data
    from ..outdir import check_output_dir, check_writable
    from ..prune.defaults import resolve_recipe
    from ..prune.patterns import parse_pattern

    pattern = args.sparsity_type
    if pattern == "block":
        if not args.block_size:
            raise SpruceError("--sparsity_type block needs --block_size (e.g. 16)")
        pattern = f"{args.block_size}x{args.block_size}"
    recipe = resolve_recipe(pattern, **_prune_options(args))
    parse_pattern(pattern, selection=recipe["selection"], tile_score=recipe["tile_score"], tiers=recipe["tiers"])
    if not 0 <= args.sparsity_ratio < 1:
        raise SpruceError(f"--sparsity_ratio must be in [0, 1), got {args.sparsity_ratio}")
    if not (args.save_model or args.eval_dataset or args.save):
        raise SpruceError("nothing to do with the pruned model: pass --save_model DIR and/or --eval_dataset CORPUS")
    if args.save_model:
        check_output_dir(args.save_model, args.overwrite_output_dir)
    if args.save:
        check_writable(Path(args.save) / "log.txt")
    compressed_block = None
    if args.save_compressed:
        from ..compress import check_compressible

        if not args.save_model:
            raise SpruceError("--save_compressed says how to write --save_model DIR; pass --save_model too")
        compressed_block = check_compressible(pattern)
    if args.eval_dataset:
        data.check_corpus(args.eval_dataset)
    data.check_corpus(args.calib_dataset)
    if args.sparsity_ratio == 0:
        print("spruce: --sparsity_ratio 0 prunes nothing; the model is saved unchanged", file=sys.stderr)
    return pattern, recipe, compressed_block


def _prune_options(args) -> dict:
    """The prune flags as defaults.resolve_recipe options (None: not given, the recipe decides)."""
    from ..prune.allocate import parse_overrides
    from ..prune.patterns import parse_tiers
    from ..prune.spec import parse_module_patterns

    return dict(method=args.prune_method, selection=args.block_selection, tile_score=args.tile_score,
                tiers=parse_tiers(args.hybrid_tiers), allocation=args.allocation, owl_m=args.owl_m,
                owl_lambda=args.owl_lambda, module_sparsity=parse_overrides(args.module_sparsity) or None,
                module_patterns=parse_module_patterns(args.module_pattern) or None,
                dense_target=args.dense_target, sequential=args.sequential,
                reconstruct_epochs=args.reconstruct_epochs, reconstruct_lr=args.reconstruct_lr,
                reconstruct_target=args.reconstruct_target, reconstruct_norms=args.reconstruct_norms or None,
                permute=args.permute,
                obs_max_inputs=args.obs_max_inputs, obs_refit=args.obs_refit, nsamples=args.nsamples,
                seqlen=args.seqlen,
                batch_size=args.calib_batch_size)


def _report(args, info: dict, spec) -> None:
    """The result lines, and the Wanda scripts' log_<method>.txt under --save."""
    print(f"pruned {args.model}: {spec.method}, {info['pattern']}, measured sparsity "
          f"{info['measured_sparsity']:.4f} of decoder linear weights ({info['seconds']:.0f} s)")
    if args.eval_dataset:
        result = info["eval"]
        print(f"perplexity {result['ppl']:.3f} on {args.eval_dataset}/test "
              f"(seqlen {result['seqlen']} x {result['windows']} windows)")
    if args.save_model:
        print(f"saved the pruned model to {args.save_model}")
    if args.save:
        Path(args.save).mkdir(parents=True, exist_ok=True)
        ppl = info.get("eval", {}).get("ppl", float("nan"))
        with open(Path(args.save, f"log_{spec.method}.txt"), "w") as f:
            f.write("method\tactual_sparsity\tppl_test\n")
            f.write(f"{spec.method}\t{info['measured_sparsity']:.4f}\t{ppl:.4f}\n")
