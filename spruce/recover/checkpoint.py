"""Training checkpoints that resume exactly and never look complete when half written.

A checkpoint folder holds the trainable tensors (safetensors), the optimizer and scheduler
states, every RNG state and a JSON state; it is written to a temporary sibling and renamed into
place, so a kill mid-write leaves no folder named `checkpoint-N`. Everything is read back with
`weights_only=True`.
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


def save_checkpoint(folder: Path, model, optimizer, scheduler, state: dict) -> Path:
    with atomic_dir(folder) as tmp:
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=2) + "\n")
    return folder


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint folders under `root`, oldest step first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def prune_checkpoints(root: Path, limit: int | None, keep: Path | None = None) -> None:
    """Delete the oldest checkpoints beyond `limit`, never the one in `keep` (the best)."""
    if not limit or limit <= 0:
        return
    checkpoints = list_checkpoints(root)
    removable = [c for c in checkpoints if keep is None or c.resolve() != keep.resolve()]
    excess = len(checkpoints) - limit
    for old in removable[:max(0, excess)]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(folder: Path, model, optimizer, scheduler) -> dict:
    """Restore model, optimizer, scheduler and RNG states in place; return the JSON state."""
    folder = Path(folder)
    missing = [f for f in FILES if not (folder / f).is_file()]
    if not folder.is_dir() or missing:
        raise SpruceError(f"{folder} is not a complete checkpoint (missing {', '.join(missing) or 'folder'}); "
                          "resume from another checkpoint or start again")
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
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)
    optimizer.load_state_dict(opt_state)
    scheduler.load_state_dict(sched_state)
    torch.set_rng_state(rng["torch"])
    random.setstate(_as_tuple(rng["python"]))
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state


def _as_tuple(obj):
    return tuple(_as_tuple(o) for o in obj) if isinstance(obj, (list, tuple)) else obj
