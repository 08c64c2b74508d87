"""What a block layout costs each layer, on CPU: the relative output error of SparseGPT-pruned
linears, independent 16x16 blocks against grouped ones (16x16gG), on held-out inputs.

For the linears of a few decoder layers of the (dense) model: the Hessian comes from calibration
samples (train split), each linear is pruned alone with `sparsegpt` (mask chosen in the sweep) for
every pattern, and the error ||X (W - W')^T||^2 / ||X W^T||^2 is measured on test-split windows of
each corpus, X being the dense model's inputs to that linear. A per-layer proxy for the quality
cost of a layout that runs in minutes on 2 CPU cores; it does not replace perplexity of a fully
pruned model. A pattern with the suffix `+perm` (e.g. 16x16g4+perm) first reorders each MLP's
intermediate features (spruce/prune/permute.py, scores |W| * input norm of gate and up), which moves
the rows of gate/up and the columns of down; attention linears are pruned as without it.

    python -m bench.layout_error --layers 0,7,14 --patterns 16x16,16x16g2,16x16g4
"""

from __future__ import annotations

import argparse
import json

import torch

from spruce.data import calibration_samples, eval_windows
from spruce.models import decoder_layers, load_model, prunable_linears
from spruce.prune.methods import prune_sparsegpt
from spruce.prune.patterns import parse_pattern
from spruce.prune.permute import block_column_importance, similar_rows_order


class _Done(Exception):
    pass


@torch.no_grad()
def linear_inputs(model, ids: torch.Tensor, names: list[str], last_layer, hessian: bool) -> dict:
    """{name: X^T X} (hessian) or {name: X (tokens, in)} for each named linear, running the model
    on `ids` only up to `last_layer`."""
    linears = prunable_linears(model)
    out, hooks = {}, []

    def keep(name):
        def hook(_m, args):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            if hessian:
                out[name] = out.get(name, 0) + x.T @ x
            else:
                out[name] = torch.cat([out[name], x]) if name in out else x
        return hook

    def stop(_m, _a, _o):
        raise _Done

    hooks = [linears[n].register_forward_pre_hook(keep(n)) for n in names]
    hooks.append(last_layer.register_forward_hook(stop))
    try:
        for row in ids:
            try:
                model(row.unsqueeze(0))
            except _Done:
                pass
    finally:
        for h in hooks:
            h.remove()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--layers", default="0,7,14")
    p.add_argument("--patterns", default="16x16,16x16g2,16x16g4")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--calib", default="sotu")
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--corpora", default="sotu,moby")
    p.add_argument("--test_windows", type=int, default=2)
    p.add_argument("--test_seqlen", type=int, default=512)
    p.add_argument("--json")
    a = p.parse_args()
    torch.manual_seed(0)
    model, tok = load_model(a.model)
    layers = [int(v) for v in a.layers.split(",")]
    last = decoder_layers(model)[max(layers)]
    linears = prunable_linears(model)
    names = [n for n in linears if any(f".layers.{i}." in n for i in layers)]
    hess = linear_inputs(model, calibration_samples(a.calib, tok, a.nsamples, a.seqlen), names, last, True)
    tests = {c: linear_inputs(model, eval_windows(c, "test", tok, a.test_seqlen, a.test_windows), names, last, False)
             for c in a.corpora.split(",")}
    perms = {}
    for name in names:
        if name.endswith("mlp.gate_proj"):
            up = name.replace("gate_proj", "up_proj")
            norm = torch.diagonal(hess[name]).sqrt().unsqueeze(0)
            score = (linears[name].weight.abs() + linears[up].weight.abs()).float() * norm
            group = max(getattr(parse_pattern(p.split("+")[0]), "rows", 1) for p in a.patterns.split(","))
            perms[name.removesuffix("gate_proj")] = similar_rows_order(block_column_importance(score, 16), group)
    rows = []
    for name in names:
        w0 = linears[name].weight.detach().float()
        for pat in a.patterns.split(","):
            base, _, perm_flag = pat.partition("+")
            w, h, xs = w0, hess[name], {c: t[name] for c, t in tests.items()}
            perm = perms.get(name.rsplit(".", 1)[0] + ".") if perm_flag else None
            if perm is not None and name.endswith(("gate_proj", "up_proj")):
                w = w0[perm]                       # rows move; X and H stay
            elif perm is not None and name.endswith("down_proj"):
                w, h = w0[:, perm], hess[name][perm][:, perm]
                xs = {c: x[:, perm] for c, x in xs.items()}
            pruned = prune_sparsegpt(w, {"hessian": h}, parse_pattern(base), a.sparsity)
            row = {"linear": name, "pattern": pat, "zero": round((pruned == 0).float().mean().item(), 4)}
            for c, x in xs.items():
                row[c] = ((x @ (w - pruned).T).square().sum() / (x @ w.T).square().sum()).item()
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\nmean relative output error over", len(names), "linears of layers", a.layers)
    for pat in a.patterns.split(","):
        sel = [r for r in rows if r["pattern"] == pat]
        means = {c: sum(r[c] for r in sel) / len(sel) for c in tests}
        print(pat, " ".join(f"{c} {v:.4f}" for c, v in means.items()))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
