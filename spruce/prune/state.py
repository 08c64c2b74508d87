"""Pruning that survives a kill: the finished decoder layers and the activations the next layer
needs, kept in a state folder, so the same command run again continues from the last saved layer.

The default 16x16 recipe spends minutes per layer on a 7B model (block OBS or SparseGPT, then the
reconstruction); losing a whole run to a preempted job or a closed terminal is the failure this
guards against. What is saved, after a layer when at least `every` seconds have passed since the
last save, and after the last layer:

    layer-<i>.safetensors  the weights of each finished layer (norms too: reconstruction may train them)
    carry.pt               the next layer's index, the pruned and dense activations it starts from,
                           the random-number state, and a fingerprint of everything that decides
                           the result (settings, calibration samples, model)

Each file is written under a temporary name and renamed, and carry.pt is written last, so a kill
at any moment leaves either the previous save or the new one whole. A state whose fingerprint
differs from the run's (other settings, samples or model) is never resumed: it is replaced.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FORMAT = "spruce-prune-state/1"
STATE_EVERY = 60.0   # seconds between state saves unless a caller (--state_every) sets it
CARRY = "carry.pt"


def fingerprint(model, settings: dict, samples: torch.Tensor | None) -> str:
    """A digest of what decides the pruned weights: the settings, the calibration samples, the
    model's configuration and its embedding and first-layer weights."""
    from ..models import decoder_layers

    h = hashlib.sha256()
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    config = {k: v for k, v in model.config.to_dict().items() if k != "_name_or_path"}  # any spelling of the path
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    if samples is not None:
        h.update(samples.detach().cpu().contiguous().numpy().tobytes())
    tensors = [model.get_input_embeddings().weight, *decoder_layers(model)[0].state_dict().values()]
    for t in tensors:
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _replace(tmp: Path, final: Path) -> None:
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)


class PruneState:
    """The state folder of one pruning run (see the module docstring)."""

    def __init__(self, folder: str | os.PathLike, digest: str, every: float = STATE_EVERY, say=None):
        self.folder = Path(folder)
        self.digest = digest
        self.every = every
        self.say = say or (lambda msg: print(f"spruce: {msg}", file=sys.stderr))
        self._last = time.monotonic()
        self._saved_layers = 0

    def resume(self, layers, device) -> tuple[int, list, list | None] | None:
        """Load the saved layers into `layers` and return (next layer, pruned activations, dense
        activations), or None when there is nothing of this run to resume."""
        path = self.folder / CARRY
        if not path.is_file():
            return None
        try:
            carry = torch.load(path, map_location="cpu", weights_only=True)
            done = int(carry["next_layer"])
            ok = carry.get("format") == FORMAT and carry.get("fingerprint") == self.digest
        except Exception as err:  # noqa: BLE001 - an unreadable state is replaced, not fatal
            self.say(f"the pruning state in {self.folder} cannot be read ({type(err).__name__}); starting over")
            self.clear()
            return None
        if not ok:
            self.say(f"the pruning state in {self.folder} was made with other settings, samples or model; "
                     "starting over")
            self.clear()
            return None
        for i in range(done):
            layers[i].load_state_dict(load_file(self.folder / f"layer-{i}.safetensors"), strict=True)
        torch.set_rng_state(carry["rng"])
        if carry.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(carry["cuda_rng"])
        self._saved_layers = done
        self.say(f"resuming the pruning from layer {done + 1}/{len(layers)} (state in {self.folder})"
                 if done < len(layers) else f"all {done} layers were pruned before (state in {self.folder})")
        from .engine import to_device

        return done, to_device(carry["batches"], device), to_device(carry["dense"], device)

    def after_layer(self, index: int, layers, batches, dense) -> None:
        """Save after layer `index` (0-based) when `every` seconds have passed since the last save,
        and after the last layer (a kill while the result is evaluated or written then loses no
        pruning); `batches` and `dense` are the activations the next layer starts from."""
        last = index + 1 >= len(layers)
        if not last and time.monotonic() - self._last < self.every:
            return
        if last:
            batches = dense = None
        try:
            self._save(index, layers, batches, dense)
        except Exception as e:
            from ..outdir import is_no_space, no_space_error

            if not is_no_space(e):
                raise
            needed = sum(t.numel() * t.element_size() for i in range(self._saved_layers, index + 1)
                         for t in layers[i].state_dict().values())
            raise self._out_of_space(no_space_error(self.folder, needed)) from None

    def _out_of_space(self, error):
        """Drop what the failed save wrote; keep an earlier complete state, which still resumes."""
        for tmp in self.folder.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
        if not (self.folder / CARRY).is_file():
            self.clear()
            return type(error)(f"{error}; pass --state_every -1 to prune without saving a state")
        return type(error)(f"{error}; the state of the layers saved before is kept, so the same command "
                           "resumes from it once space is freed (--state_every -1 prunes without a state)")

    def _save(self, index: int, layers, batches, dense) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        for i in range(self._saved_layers, index + 1):
            tmp = self.folder / f".layer-{i}.tmp"
            save_file({k: v.detach().cpu().contiguous() for k, v in layers[i].state_dict().items()}, tmp)
            _replace(tmp, self.folder / f"layer-{i}.safetensors")
        from .engine import to_device

        tmp = self.folder / f".{CARRY}.tmp"
        torch.save({"format": FORMAT, "fingerprint": self.digest, "next_layer": index + 1,
                    "batches": to_device(batches, "cpu"), "dense": to_device(dense, "cpu"), "rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}, tmp)
        _replace(tmp, self.folder / CARRY)
        self._saved_layers = index + 1
        self._last = time.monotonic()

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def state_folder(output: str | os.PathLike) -> Path:
    """The hidden sibling of an output folder that holds its pruning state."""
    output = Path(output)
    return output.parent / f".{output.name}.prune-state"
