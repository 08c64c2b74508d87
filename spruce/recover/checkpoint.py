"""Training checkpoints that resume exactly and never look complete when half written.

A checkpoint folder holds the trainable tensors (safetensors), the optimizer and scheduler
states, every RNG state and a JSON state; it is written to a temporary sibling and renamed into
place, so a kill mid-write leaves no folder named `checkpoint-N`. Everything is read back with
`weights_only=True`.

In a run of several processes every process takes part in gathering the (possibly sharded)
tensors and optimizer state, rank 0 alone writes, and the optimizer state is keyed by parameter
names; such a checkpoint resumes with any number of processes, a single one included.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import SpruceError
from ..outdir import atomic_dir

FILES = ("trainable.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "state.json")
_NAME = re.compile(r"^checkpoint-(\d+)$")


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def save_checkpoint(folder: Path, model, optimizer, scheduler, state: dict, parallel=None) -> Path:
    if parallel is None:
        tensors, opt_state = trainable_state(model), optimizer.state_dict()
    else:  # collective: every process gathers, rank 0 writes
        tensors = parallel.full_tensors({n: p for n, p in model.named_parameters() if p.requires_grad})
        opt_state = parallel.optimizer_state(model, optimizer)
    if parallel is None or parallel.is_main:
        with atomic_dir(folder) as tmp:
            save_file(tensors, str(tmp / "trainable.safetensors"))
            torch.save(opt_state, tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            torch.save(rng_state(), tmp / "rng.pt")
            (tmp / "state.json").write_text(json.dumps(state, indent=2) + "\n")
    if parallel is not None:
        parallel.barrier()
    return folder


def _by_name(opt_state: dict, names: list[str]) -> dict:
    """A torch optimizer state (parameters numbered in order) keyed by parameter names instead."""
    if not all(isinstance(k, int) for k in opt_state["state"]):
        return opt_state
    return {"state": {names[i]: v for i, v in opt_state["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in opt_state["param_groups"]]}


def _by_number(opt_state: dict, names: list[str]) -> dict:
    """The inverse of _by_name, for resuming a multi-process checkpoint in one process."""
    if all(isinstance(k, int) for k in opt_state["state"]):
        return opt_state
    index = {n: i for i, n in enumerate(names)}
    return {"state": {index[n]: v for n, v in opt_state["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in opt_state["param_groups"]]}


def list_checkpoints(root: Path) -> list[Path]:
    """Checkpoint folders (checkpoint-N) directly under `root`, oldest step first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


# Checkpoints live where the Hugging Face Trainer puts them, OUTPUT_DIR/checkpoint-N, so scripts
# that test for or resume from that path work; runs of spruce 0.1 wrote OUTPUT_DIR/checkpoints/.
LEGACY_ROOT = "checkpoints"


def run_checkpoints(output_dir: Path) -> list[Path]:
    """The checkpoints of the run in `output_dir` (either layout), oldest step first."""
    found = list_checkpoints(output_dir) + list_checkpoints(output_dir / LEGACY_ROOT)
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def prune_checkpoints(root: Path, limit: int | None, keep: Path | None = None) -> None:
    """Delete the oldest checkpoints beyond `limit`, never the one in `keep` (the best)."""
    if not limit or limit <= 0:
        return
    checkpoints = list_checkpoints(root)
    removable = [c for c in checkpoints if keep is None or c.resolve() != keep.resolve()]
    excess = len(checkpoints) - limit
    for old in removable[:max(0, excess)]:
        shutil.rmtree(old, ignore_errors=True)


def check_checkpoint_files(folder: Path) -> None:
    """Fail when `folder` is not a whole checkpoint (every file present, the JSON state readable)."""
    folder = Path(folder)
    missing = [f for f in FILES if not (folder / f).is_file()]
    if not folder.is_dir() or missing:
        raise SpruceError(f"{folder} is not a complete checkpoint (missing {', '.join(missing) or 'folder'}); "
                          "resume from another checkpoint or start again")
    checkpoint_step(folder)


def checkpoint_step(folder: Path) -> int:
    """The optimizer step a checkpoint was written at."""
    try:
        return int(json.loads((Path(folder) / "state.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        raise SpruceError(f"checkpoint {folder} is corrupt (state.json unreadable); resume from another "
                          "checkpoint or start again") from None


def check_resumable(folder: Path, model) -> None:
    """Before anything is written: the checkpoint's trainable tensors are exactly the trainable
    parameters of `model`, name for name and shape for shape (a LoRA rank or target modules other
    than the checkpoint's fail here, not inside the training loop)."""
    from safetensors import safe_open

    check_checkpoint_files(folder)
    try:
        with safe_open(str(Path(folder) / "trainable.safetensors"), "pt") as f:
            shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except Exception as e:  # SafetensorError: truncated or not a safetensors file
        raise SpruceError(f"checkpoint {folder} is corrupt ({type(e).__name__}); resume from another "
                          "checkpoint or start again") from None
    expected = {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    if set(shapes) != set(expected):
        raise SpruceError(f"checkpoint {folder} was written for another model or training mode "
                          f"({len(shapes)} trainable tensors, this run has {len(expected)}); resume with the "
                          "flags of the run that wrote it (--mode, --lora_target_modules)")
    wrong = [n for n in shapes if shapes[n] != expected[n]]
    if wrong:
        raise SpruceError(f"checkpoint {folder} does not fit this run: {wrong[0]} is {list(shapes[wrong[0]])} "
                          f"there and {list(expected[wrong[0]])} here; resume with the flags of the run that "
                          "wrote it (--lora_r, --mode)")


def load_checkpoint(folder: Path, model, optimizer, scheduler, parallel=None) -> dict:
    """Restore model, optimizer, scheduler and RNG states in place; return the JSON state."""
    folder = Path(folder)
    check_checkpoint_files(folder)
    try:
        tensors = load_file(str(folder / "trainable.safetensors"))
        opt_state = torch.load(folder / "optimizer.pt", weights_only=True)
        sched_state = torch.load(folder / "scheduler.pt", weights_only=True)
        rng = torch.load(folder / "rng.pt", weights_only=True)
        state = json.loads((folder / "state.json").read_text())
    except Exception as e:  # any unreadable file means the checkpoint is unusable
        raise SpruceError(f"checkpoint {folder} is corrupt ({type(e).__name__}); resume from another "
                          "checkpoint or start again") from None
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(tensors) != expected:
        raise SpruceError(f"checkpoint {folder} was written for another model or training mode "
                          f"({len(tensors)} trainable tensors, this run has {len(expected)})")
    from .parallel import local_part, local_view

    with torch.no_grad():
        for name, value in tensors.items():
            local_view(params[name]).copy_(local_part(params[name], value))
    names = [n for n, p in params.items() if p.requires_grad]
    try:
        if parallel is None:
            optimizer.load_state_dict(_by_number(opt_state, names))
        else:
            parallel.load_optimizer_state(model, optimizer, _by_name(opt_state, names))
    except (KeyError, ValueError, RuntimeError) as e:
        raise SpruceError(f"checkpoint {folder} holds an optimizer state that does not fit this run "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    scheduler.load_state_dict(sched_state)
    torch.set_rng_state(rng["torch"])
    random.setstate(_as_tuple(rng["python"]))
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state


def _as_tuple(obj):
    return tuple(_as_tuple(o) for o in obj) if isinstance(obj, (list, tuple)) else obj
