"""Typed, documented recipes for `spruce run`: YAML + `key.sub=value` overrides, validated early.

Each dataclass field carries its meaning in a comment; `__post_init__` rejects bad values with a
one-line SpruceError. `to_dict` gives the resolved form saved as config.yaml in a run folder.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from .assets import DEFAULT_CORPUS
from .errors import SpruceError
from .prune.spec import DEFAULTS as PRUNE
from .prune.spec import OPTIONS as PRUNE_OPTIONS
from .recover.args import MODES, FinetuneArgs
from .recover.train import SCHEDULERS

# the defaults of `spruce finetune`, which the recover section shares
FINETUNE = {f.name: f.default for f in dataclasses.fields(FinetuneArgs) if f.default is not dataclasses.MISSING}
STAGES = ("baseline", "reference", "prune", "recover", "report")


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise SpruceError(message)


@dataclass
class DataConfig:
    corpus: str = DEFAULT_CORPUS  # corpus spec for calibration, training and evaluation (see spruce.data)
    eval_split: str = "test"      # split that perplexity is measured on
    eval_seqlen: int = 1024       # tokens per evaluation window
    eval_windows: int | None = None  # first N windows only (None = all)
    zero_shot_tasks: list[str] | None = None  # lm-evaluation-harness tasks, e.g. [boolq, rte] (needs lm-eval)
    # corpus spec evaluated like eval_split (same seqlen and windows) beside the in-domain number,
    # never calibrated or trained on; auto = moby when the recipe's data is sotu, else none; null = off
    heldout: str | None = "auto"

    def __post_init__(self):
        _require(self.eval_seqlen > 0, f"data.eval_seqlen must be positive, got {self.eval_seqlen}")
        _require(self.eval_windows is None or self.eval_windows > 0,
                 f"data.eval_windows must be positive, got {self.eval_windows}")


@dataclass
class PruneConfig:
    """The prune stage: PruneSpec fields (spruce/prune/spec.py documents each), the calibration
    size at the top level and every other option under `options`."""
    method: str | None = None     # magnitude | wanda | sparsegpt | ... ; None = the pattern's best recipe
    pattern: str = "16x16"        # unstructured | N:M | BxB / RxC blocks | hybrid (see spruce prune --help)
    sparsity: float = PRUNE["sparsity"]      # fraction of each decoder linear weight set to zero
    nsamples: int = PRUNE["nsamples"]        # calibration samples
    seqlen: int = PRUNE["seqlen"]            # tokens per calibration sample
    batch_size: int = PRUNE["batch_size"]    # calibration samples per forward call
    options: dict = field(default_factory=dict)  # more PruneSpec fields: selection, allocation, tiers, ...
    # the default block recipe falls back from OBS to sparsegpt (same reconstruction) on layers with
    # more inputs than this, per linear; None = prune.defaults.OBS_MAX_INPUTS (32768); 0 = everywhere
    obs_max_inputs: int | None = None
    # progressive pruning: one entry per prune -> recover round, a sparsity or a mapping
    # {sparsity: s, <prune option>: value, ...} (e.g. hybrid tiers); the last must equal `sparsity`
    rounds: list | None = None
    label: str | None = None      # this model's row name in the tables (default: the stage's name)

    def __post_init__(self):
        _require(0 <= self.sparsity < 1, f"prune.sparsity must be in [0, 1), got {self.sparsity}")
        _require(self.nsamples > 0 and self.seqlen > 0 and self.batch_size > 0,
                 "prune.nsamples, prune.seqlen and prune.batch_size must be positive")
        _require(self.obs_max_inputs is None or (isinstance(self.obs_max_inputs, int) and self.obs_max_inputs >= 0),
                 f"prune.obs_max_inputs must be a whole number >= 0, got {self.obs_max_inputs}")
        if self.rounds:
            levels = [r["sparsity"] if isinstance(r, dict) else r for r in self.rounds]
            _require(all(isinstance(x, (int, float)) and 0 < x < 1 for x in levels),
                     f"every prune.rounds entry needs a sparsity in (0, 1), got {self.rounds}")
            _require(all(a <= b for a, b in zip(levels, levels[1:])),
                     f"prune.rounds must not lower the sparsity from one round to the next, got {levels}")
            _require(abs(levels[-1] - self.sparsity) < 1e-9,
                     f"prune.rounds must end at prune.sparsity ({self.sparsity}), got {levels[-1]}")
        for _, options in self.round_plan():
            self.given(options)    # unknown option names fail when the recipe is read

    def given(self, options: dict) -> dict:
        """The options of one round as prune.defaults.resolve_recipe takes them (None: not set)."""
        unknown = sorted(set(options) - set(PRUNE_OPTIONS))
        _require(not unknown, f"unknown prune option(s) {unknown}; use {', '.join(PRUNE_OPTIONS)}")
        return {"method": self.method, "nsamples": self.nsamples, "seqlen": self.seqlen,
                "batch_size": self.batch_size, "obs_max_inputs": self.obs_max_inputs, **options}

    def round_plan(self) -> list[tuple[float, dict]]:
        """[(sparsity, prune options)] for each round; one round when `rounds` is not set."""
        if not self.rounds:
            return [(self.sparsity, dict(self.options))]
        plan = []
        for entry in self.rounds:
            extra = dict(entry) if isinstance(entry, dict) else {"sparsity": entry}
            plan.append((extra.pop("sparsity"), {**self.options, **extra}))
        return plan


@dataclass
class RecoverConfig:
    """The recover stage: FinetuneArgs options (recover/args.py) under recipe names, their defaults those of
    `spruce finetune` but where a recipe run wants another (max_eval_samples)."""
    mode: str = FINETUNE["mode"]  # lora | masked-lora | full (masked full fine-tuning)
    corpus: str | None = None     # training corpus; None = data.corpus; `generated` (or a mix such as
                                  # generated:0.7+sotu:0.3) = text sampled from the dense model
    # how `generated` text is sampled: spruce.generated.GeneratedSettings fields (sequences,
    # new_tokens, temperature, top_p, prompts, prompt_tokens, batch_size, seed), cached in the run folder
    generated: dict = field(default_factory=dict)
    lora_r: int = FINETUNE["lora_r"]  # LoRA rank
    lora_alpha: int = FINETUNE["lora_alpha"]  # LoRA scaling numerator (scale = alpha / r)
    lora_dropout: float = FINETUNE["lora_dropout"]  # dropout on the LoRA input
    lora_target_modules: str = FINETUNE["lora_target_modules"]  # comma list of module names, or all-linear
    learning_rate: float = FINETUNE["learning_rate"]  # peak learning rate (AdamW, warm-up then decay)
    max_steps: int | None = None  # optimizer steps; None = num_train_epochs
    num_train_epochs: float = FINETUNE["num_train_epochs"]
    batch_size: int = FINETUNE["per_device_train_batch_size"]  # blocks per micro-batch
    gradient_accumulation_steps: int = 1
    block_size: int = FINETUNE["block_size"]  # tokens per training block
    warmup_steps: int = FINETUNE["warmup_steps"]
    lr_scheduler_type: str = FINETUNE["lr_scheduler_type"]  # linear | cosine | constant
    logging_steps: int = FINETUNE["logging_steps"]  # log the train loss every N steps
    max_train_samples: int | None = None
    max_eval_samples: int | None = 16   # validation blocks for eval during training
    eval_steps: int | None = None
    save_steps: int | None = None
    teacher: bool = False         # distil from the dense model (the run's `model`)
    distill_alpha: float = FINETUNE["distill_alpha"]
    distill_temperature: float = FINETUNE["distill_temperature"]  # softmax temperature of the KL term
    distill_hidden: float = FINETUNE["distill_hidden_weight"]  # weight of the per-layer hidden-state term (needs teacher)
    dtype: str | None = None      # training dtype; None = the run's dtype
    bf16: bool = FINETUNE["bf16"]  # bf16 mixed precision (full mode keeps float32 master weights)
    label: str | None = None      # the recovered model's row name in the tables

    def __post_init__(self):
        _require(self.mode in MODES,
                 f"recover.mode must be lora, masked-lora or full, got {self.mode}")
        _require(self.lora_r > 0 and self.batch_size > 0 and self.block_size > 0
                 and self.gradient_accumulation_steps > 0,
                 "recover.lora_r, batch_size, block_size and gradient_accumulation_steps must be positive")
        _require(self.learning_rate > 0, f"recover.learning_rate must be positive, got {self.learning_rate}")
        _require(self.max_steps is None or self.max_steps > 0, "recover.max_steps must be positive")
        _require(0 <= self.lora_dropout < 1, f"recover.lora_dropout must be in [0, 1), got {self.lora_dropout}")
        _require(self.distill_temperature > 0,
                 f"recover.distill_temperature must be positive, got {self.distill_temperature}")
        _require(self.distill_hidden >= 0, f"recover.distill_hidden must be >= 0, got {self.distill_hidden}")
        _require(self.lr_scheduler_type in SCHEDULERS,
                 f"recover.lr_scheduler_type must be one of {', '.join(SCHEDULERS)}, got {self.lr_scheduler_type}")
        _require(self.num_train_epochs > 0 or bool(self.max_steps),
                 f"recover.num_train_epochs must be positive (or set recover.max_steps), got {self.num_train_epochs}")
        _require(0 <= self.distill_alpha <= 1, f"recover.distill_alpha must be in [0, 1], got {self.distill_alpha}")
        from .generated import GeneratedSettings

        _require(isinstance(self.generated, dict), "recover.generated must be a mapping of sampling settings")
        GeneratedSettings.from_mapping(self.generated, "recover.generated")


@dataclass
class RunConfig:
    model: str = "smollm2-135m"   # model source: HF folder, Hub id, .gguf file or embedded name
    output_dir: str = "runs/run"  # the run folder
    device: str = "auto"          # auto | cpu | cuda
    dtype: str = "float32"        # float32 | bfloat16 | float16
    seed: int = 0                 # seeds calibration sampling and training order
    # CPU threads (torch.set_num_threads) for the whole run; sums split across threads add up in
    # another order with another count, so a fixed count gives the same numbers on every machine.
    # None = torch's default (one per core)
    threads: int | None = None
    stages: list[str] = field(default_factory=lambda: list(STAGES))  # which stages to run, in order
    data: DataConfig = field(default_factory=DataConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    recover: RecoverConfig = field(default_factory=RecoverConfig)
    # a second prune recipe run one-shot (no recovery) beside `prune`, for comparison: the
    # "reference" stage writes its model to reference/ and its row to the tables; None = no such stage
    prune_reference: PruneConfig | None = None

    def __post_init__(self):
        unknown = [s for s in self.stages if s not in STAGES]
        _require(not unknown, f"unknown stage(s) {unknown}; stages are {', '.join(STAGES)}")
        _require(self.threads is None or self.threads > 0, f"threads must be positive, got {self.threads}")
        _require(self.prune_reference is None or not self.prune_reference.rounds,
                 "prune_reference is one-shot: it takes no rounds")
        self._resolve_heldout()

    def _resolve_heldout(self) -> None:
        """data.heldout: `auto` resolved, and refused when calibration or training reads it."""
        from . import data

        used = {"data.corpus": self.data.corpus, "recover.corpus": self.recover.corpus,
                "recover.generated.prompts": self.recover.generated.get("prompts", "diverse")}
        if used["recover.generated.prompts"] == "diverse":
            del used["recover.generated.prompts"]
        if self.data.heldout == "auto":
            self.data.heldout = data.default_heldout(list(used.values()))
        data.check_heldout(self.data.heldout, used)

    def active_stages(self, only: list[str] | None = None) -> list[str]:
        """The stages to run, in order: `only` or `stages`, without "reference" when there is no
        prune_reference section."""
        return [s for s in (only or self.stages) if s != "reference" or self.prune_reference is not None]

    def to_dict(self) -> dict:
        return asdict(self)


def _build(cls, values: dict, where: str):
    """Instantiate dataclass `cls` from a dict, recursing into nested dataclasses; unknown keys fail."""
    if not isinstance(values, dict):
        raise SpruceError(f"{where or 'recipe'} must be a mapping, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise SpruceError(f"unknown key(s) {', '.join(f'{where}{k}' for k in unknown)}; "
                          f"valid keys: {', '.join(f'{where}{k}' for k in fields)}")
    kwargs = {}
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        sub = _nested.get((cls, name))
        if sub and value is None and (cls, name) in _optional:
            kwargs[name] = None
            continue
        if not sub:
            value = _check_type(value, hints[name], f"{where}{name}")
        kwargs[name] = _build(sub, value or {}, f"{where}{name}.") if sub else value
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise SpruceError(f"bad recipe section {where or 'top level'}: {e}") from None


def _fits(value, hint) -> bool:
    origin, params = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, p) for p in params)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is list or hint is list:
        return isinstance(value, list) and all(_fits(v, params[0]) for v in value) if params else isinstance(value, list)
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    return isinstance(value, hint) if isinstance(hint, type) else True


def _describe(hint) -> str:
    names = {int: "a whole number", float: "a number", str: "a string", bool: "true or false",
             type(None): "null", list: "a list", dict: "a mapping"}
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(p) for p in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        return f"a list of {_describe(typing.get_args(hint)[0]).removeprefix('a ')}s"
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def _check_type(value, hint, key: str):
    """The value, checked against its field's type; a wrong type names its key, at load time
    (before any stage runs). YAML reads 1e-4 as a string, so a number written that way is read
    as the number."""
    if isinstance(value, str) and not _fits(value, hint) and _fits(1.0, hint):
        try:
            value = float(value)
        except ValueError:
            pass
    if not _fits(value, hint):
        raise SpruceError(f"{key} must be {_describe(hint)}, got {value!r} ({type(value).__name__})")
    return value


_nested = {(RunConfig, "data"): DataConfig, (RunConfig, "prune"): PruneConfig,
           (RunConfig, "recover"): RecoverConfig, (RunConfig, "prune_reference"): PruneConfig}
_optional = {(RunConfig, "prune_reference")}   # sections that may be null (absent)


def apply_override(tree: dict, assignment: str) -> None:
    """Apply `key.sub=value` to a nested dict; the value is parsed as YAML (numbers, lists, null)."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise SpruceError(f"override '{assignment}' is not key.sub=value")
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise SpruceError(f"override '{assignment}': {part} is not a section")
    node[parts[-1]] = yaml.safe_load(raw) if raw != "" else None


def load_recipe(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML recipe (or start from the defaults), apply overrides, validate."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise SpruceError(f"recipe {path} does not exist; shipped recipes are in recipes/")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise SpruceError(f"recipe {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    for assignment in overrides:
        apply_override(tree, assignment)
    return _build(RunConfig, tree, "")


def recipes_dir() -> Path:
    """The shipped recipes (package data, also linked as recipes/ at the repository root)."""
    return Path(__file__).parent / "recipes"
