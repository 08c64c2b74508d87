"""`spruce finetune`: the run_clm.py / Hugging Face Trainer flags mapped onto FinetuneArgs.

Every flag sets the FinetuneArgs field of its name (recover/args.py) and takes that field's
default (`field_option`); `{default}` in a help text is that default. A FinetuneArgs field with no
flag below gets a plain `--NAME` flag in a last group (`add_field_flags`), so a new option needs
one edit, its field; add it here instead when it needs an alias, choices or a custom type.
"""

from __future__ import annotations

import os
import sys
import warnings

from ..errors import SpruceError
from .common import EPILOG_CORPORA, EPILOG_MODELS, add_command, add_field_flags, field_defaults, field_option, \
    positive_int

# fields no flag sets: set by __post_init__ from --bf16
DERIVED = ("autocast_bf16",)


def add_parser(subparsers) -> None:
    from ..recover.args import FinetuneArgs

    p = add_command(subparsers, "finetune", "recover a pruned model: LoRA, masked LoRA or masked full fine-tuning",
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
    defaults = field_defaults(FinetuneArgs)
    _model_flags(p.add_argument_group("model"), defaults)
    _data_flags(p, defaults)
    _training_flags(p.add_argument_group("training"), defaults)
    _output_flags(p.add_argument_group("monitoring and output"), defaults)
    _trainer_flags(p.add_argument_group("Hugging Face Trainer flags (accepted so that run_clm.py scripts run "
                                        "unchanged)"), defaults)
    _parallel_flags(p.add_argument_group("several GPUs (launch with torchrun or accelerate launch; see the README)"),
                    defaults)
    add_field_flags(p, FinetuneArgs, skip=DERIVED)


def _model_flags(g, d: dict) -> None:
    field_option(g, d, "model_name_or_path", required=True, metavar="MODEL", help="the pruned model")
    field_option(g, d, "config_name", help="dense model whose tokenizer to use when MODEL has none")
    field_option(g, d, "tokenizer_name", help="tokenizer folder or Hub id")
    field_option(g, d, "device", help="auto, cpu, cuda (default: {default})")
    field_option(g, d, "dtype", choices=["float32", "bfloat16"],
                 help="bfloat16 trains with bf16 weights and autocast (default: {default})")
    field_option(g, d, "bf16", action="store_true",
                 help="bf16 mixed precision, the fast path on GPUs: LoRA modes load the frozen base in bf16 "
                      "(as --dtype bfloat16); full mode keeps float32 master weights under bf16 autocast, so "
                      "small late updates are not rounded away")
    field_option(g, d, "trust_remote_code", action="store_true", help="allow model code from the Hub to run")


def _data_flags(p, d: dict) -> None:
    from ..generated import add_arguments as add_generated_arguments

    g = p.add_argument_group("data")
    field_option(g, d, "dataset_name", metavar="CORPUS", help="sotu, moby, wikitext, c4, or a mix a+b")
    field_option(g, d, "dataset_config_name", help="e.g. wikitext-2-raw-v1 or wikitext-103-raw-v1")
    field_option(g, d, "mix_weights", help="comma list of weights for a mix in --dataset_name")
    field_option(g, d, "train_file", help="local .txt / .jsonl training file")
    field_option(g, d, "validation_file", help="local .txt / .jsonl validation file")
    field_option(g, d, "heldout_dataset", metavar="CORPUS",
                 help="with --do_eval, also measure the validation blocks of CORPUS, which training must not "
                      "read, before and after training (and the teacher's, for x dense); auto: moby when "
                      "training reads sotu; none: off (default: {default})")
    field_option(g, d, "block_size", type=positive_int, help="tokens per training block (default: {default})")
    field_option(g, d, "max_train_samples", type=positive_int, help="use at most N training blocks")
    field_option(g, d, "max_eval_samples", type=positive_int, help="use at most N validation blocks")
    g = p.add_argument_group("generated data (--dataset_name generated, or a mix such as generated:0.7+sotu:0.3): "
                             "text sampled from the dense model, cached beside the run")
    add_generated_arguments(g)


def _training_flags(g, d: dict) -> None:
    from ..recover.args import MODES
    from ..recover.train import SCHEDULERS

    field_option(g, d, "do_train", action="store_true", help="train")
    field_option(g, d, "do_eval", action="store_true",
                 help="evaluate on the validation split before and after training, and every --eval_steps")
    field_option(g, d, "mode", choices=list(MODES), help="what trains (default: {default})")
    field_option(g, d, "num_train_epochs", type=float, help="epochs (default: {default})")
    field_option(g, d, "max_steps", type=int, help="optimizer steps; overrides epochs when > 0")
    field_option(g, d, "per_device_train_batch_size", type=positive_int, help="blocks per micro-batch (default: {default})")
    field_option(g, d, "per_device_eval_batch_size", type=positive_int, help="blocks per eval pass (default: {default})")
    field_option(g, d, "gradient_accumulation_steps", type=positive_int,
                 help="micro-batches per step (default: 1, or what --global_batch_size needs)")
    field_option(g, d, "global_batch_size", type=positive_int, metavar="N",
                 help="blocks per optimizer step over all processes = per-device batch x accumulation x "
                      "processes; sets --gradient_accumulation_steps (must divide exactly)")
    field_option(g, d, "gradient_checkpointing", action="store_true",
                 help="recompute activations in the backward pass: far less memory, about a third more compute")
    field_option(g, d, "learning_rate", type=float, help="peak learning rate (default: {default})")
    field_option(g, d, "weight_decay", type=float, help="AdamW weight decay (default: {default})")
    field_option(g, d, "warmup_steps", type=int, help="linear warm-up steps (default: {default})")
    field_option(g, d, "lr_scheduler_type", choices=SCHEDULERS, help="decay after warm-up (default: {default})")
    field_option(g, d, "seed", type=int, help="seed for data order, LoRA init and dropout (default: {default})")
    field_option(g, d, "lora_r", type=positive_int, help="LoRA rank (default: {default})")
    field_option(g, d, "lora_alpha", type=int, help="LoRA alpha (default: {default})")
    field_option(g, d, "lora_dropout", type=float, help="LoRA dropout (default: {default})")
    field_option(g, d, "lora_target_modules", help="comma list of module names, or all-linear (default: {default})")
    field_option(g, d, "teacher_model", metavar="MODEL", help="dense teacher for distillation (KL on logits)")
    field_option(g, d, "distill_alpha", type=float, help="weight of the KL term, rest is LM loss (default: {default})")
    field_option(g, d, "distill_temperature", type=float, help="softmax temperature for KL (default: {default})")
    field_option(g, d, "distill_hidden_weight", type=float, metavar="W",
                 help="add W x the per-layer squared error between student and teacher hidden states, "
                      "each layer divided by the teacher's variance (default: {default}, off)")


def _output_flags(g, d: dict) -> None:
    field_option(g, d, "output_dir", required=True, help="adapter (or model), checkpoints, logs and summary go here")
    field_option(g, d, "overwrite_output_dir", action="store_true", help="reuse a non-empty --output_dir")
    field_option(g, d, "logging_steps", type=positive_int, help="log every N steps (default: {default})")
    field_option(g, d, "logging_first_step", action="store_true", help="also log after the first step")
    field_option(g, d, "eval_steps", type=positive_int, help="evaluate every N steps (default: only at the end)")
    field_option(g, d, "save_steps", type=positive_int, help="checkpoint every N steps (default: only at the end)")
    field_option(g, d, "save_total_limit", type=positive_int, help="keep at most N checkpoints (the best is kept)")
    field_option(g, d, "load_best_model_at_end", action="store_true", help="end with the weights of the best evaluation")
    field_option(g, d, "early_stopping_patience", type=positive_int, help="stop after N evaluations without a new best")
    field_option(g, d, "resume_from_checkpoint", metavar="PATH", help="a checkpoint folder, or 'latest' in --output_dir")
    field_option(g, d, "merge", action="store_true", help="also write OUTPUT_DIR/merged: adapter merged, zero set kept")


def _trainer_flags(g, d: dict) -> None:
    from ..recover.args import STRATEGIES

    field_option(g, d, "eval_strategy", "--evaluation_strategy", "--eval_strategy", choices=list(STRATEGIES),
                 help="steps: every --eval_steps (default: --logging_steps); epoch: after every epoch; no: only "
                      "after training (with --do_eval). Unset: every --eval_steps if given, else after training")
    field_option(g, d, "save_strategy", choices=list(STRATEGIES),
                 help="steps: a checkpoint every --save_steps (default: 500); epoch: after every epoch; no: only "
                      "the last one. Unset: every --save_steps if given, else the last one")
    field_option(g, d, "metric_for_best_model",
                 help="what picks the best checkpoint: {default} (or loss, perplexity: the same order); "
                      "the only metric spruce evaluates")
    g.add_argument("--fp16", action="store_true",
                   help="runs as --bf16: spruce's mixed precision is bfloat16, which needs no loss scaling")
    field_option(g, d, "report_to", nargs="+", metavar="NAME",
                 help="tensorboard (also: all) writes events under OUTPUT_DIR/runs; none turns them off; "
                      "metrics.jsonl is always written (default: {default})")


def _parallel_flags(g, d: dict) -> None:
    field_option(g, d, "fsdp", action="store_true",
                 help="shard parameters, gradients and optimizer state over the processes (FSDP2, one unit per "
                      "decoder layer) instead of a full copy per process (DDP, the default)")
    field_option(g, d, "fsdp_transformer_layer_cls_to_wrap", metavar="CLASS",
                 help="module class that becomes one FSDP unit (default: the model's decoder layer, e.g. "
                      "LlamaDecoderLayer)")
    field_option(g, d, "device_map", metavar="MAP",
                 help="evaluation only (--do_eval without --do_train): shard one model over the GPUs of this "
                      "process, e.g. auto or balanced")


def run(args) -> None:
    from ..recover.finetune import run_finetune

    run_finetune(finetune_args(args))


def finetune_args(args):
    """The parsed `spruce finetune` flags as FinetuneArgs: the one place flags meet options."""
    from ..recover.args import FinetuneArgs

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
