"""Gradual block OBS with the exact refit against the iterative one (and the SparseGPT fallback),
layer by layer on CPU: the relative output error of each linear pruned alone, and the time.

For the linears of a few decoder layers of the (dense) model: the Hessian comes from calibration
samples (train split), each linear is pruned alone with each recipe at the same sparsity, and the
error ||X (W - W')^T||^2 / ||X W^T||^2 is measured on test-split windows, X being the dense
model's inputs to that linear (bench/layout_error.py does the same for block layouts);
`calib_error` is the same ratio on the calibration inputs (the objective OBS minimises). Recipes:
`obs-exact` (gradual block OBS, a Cholesky refit per block-row), `obs-iterative` (the batched
conjugate-gradient refit and approximate tile errors, what 7B-class layers get), `sparsegpt`
(block masks chosen in the SparseGPT sweep, the fallback past --obs_max_inputs). The seconds are
the pruning call alone; `cg_steps` counts the conjugate-gradient steps of the iterative refit
(`--cg_tol` sets its tolerance).

    python -m bench.obs_error --layers 0,15,29 --nsamples 32 --seqlen 256
"""

from __future__ import annotations

import argparse
import json
import time


from bench.layout_error import capture
from spruce.prune import methods
from spruce.prune.patterns import parse_pattern

RECIPES = {
    "obs-exact": lambda w, h, pat, s: methods.gradual_block_obs(w, h, pat, s, refit="exact"),
    "obs-iterative": lambda w, h, pat, s: methods.gradual_block_obs(w, h, pat, s, refit="iterative"),
    "sparsegpt": lambda w, h, pat, s: methods.prune_sparsegpt(w, {"hessian": h}, pat, s),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--layers", default="0,15,29")
    p.add_argument("--recipes", default=",".join(RECIPES))
    p.add_argument("--linears", help="comma list of name endings (e.g. o_proj,down_proj); default: all")
    p.add_argument("--cg_tol", type=float, default=methods.CG_TOL,
                   help=f"the iterative refit's tolerance (default: {methods.CG_TOL:g})")
    p.add_argument("--pattern", default="16x16")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--calib", default="sotu")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--corpus", default="sotu")
    p.add_argument("--test_windows", type=int, default=2)
    p.add_argument("--test_seqlen", type=int, default=512)
    p.add_argument("--json")
    a = p.parse_args()
    keep = None if a.linears is None else (lambda n: n.endswith(tuple(a.linears.split(","))))
    linears, names, hess, tests = capture(a, [a.corpus], keep)
    test = tests[a.corpus]
    pattern = parse_pattern(a.pattern)
    steps = []
    solve = methods.refit_block_rows_iterative

    def counted(*args, **kwargs):
        out = solve(*args, **{**kwargs, "tol": a.cg_tol})
        steps.append(out[1])
        return out

    methods.refit_block_rows_iterative = counted
    rows = []
    for name in names:
        w = linears[name].weight.detach().float()
        x = test[name]
        dense = (x @ w.T).square().sum()
        for recipe in a.recipes.split(","):
            steps.clear()
            t = time.time()
            pruned = RECIPES[recipe](w, hess[name], pattern, a.sparsity)
            row = {"linear": name, "shape": list(w.shape), "recipe": recipe, "seconds": round(time.time() - t, 2),
                   "zero": round((pruned == 0).float().mean().item(), 4),
                   "error": ((x @ (w - pruned).T).square().sum() / dense).item(),
                   "calib_error": (((w - pruned) @ hess[name] * (w - pruned)).sum() / (w @ hess[name] * w).sum()).item(),
                   "cg_steps": sum(steps) if steps else None}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{a.model}, {a.pattern} at {a.sparsity:g}, {len(names)} linears of layers {a.layers}, calibration "
          f"{a.nsamples} x {a.seqlen} {a.calib}/train, error on {a.test_windows} x {a.test_seqlen} {a.corpus}/test")
    print("| recipe | mean relative output error | vs obs-exact | seconds |")
    print("| --- | ---: | ---: | ---: |")
    base = {r["linear"]: r["error"] for r in rows if r["recipe"] == "obs-exact"}
    for recipe in a.recipes.split(","):
        sel = [r for r in rows if r["recipe"] == recipe]
        mean = sum(r["error"] for r in sel) / len(sel)
        ratio = (sum(r["error"] / base[r["linear"]] for r in sel) / len(sel)) if base else float("nan")
        print(f"| {recipe} | {mean:.4f} | {ratio:.3f}x | {sum(r['seconds'] for r in sel):.1f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
