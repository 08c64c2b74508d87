"""Gradual block OBS at scale: the iterative refit against the exact one, the refit chosen by cost,
and the per-linear choice between OBS and the SparseGPT fallback (obs_max_inputs)."""

import json

import pytest
import torch

from spruce.errors import SpruceError
from spruce.masks import block_pattern_holds
from spruce.models import prunable_linears
from spruce.prune import PruneSpec, prune_model
from spruce.prune import methods
from spruce.prune.patterns import expand_tiles, parse_pattern


def _problem(out=32, n=128, tokens=400, seed=0):
    """A weight and the damped Hessian of correlated inputs (what LLM activations look like)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n, generator=g) @ (torch.eye(n) + 0.3 * torch.randn(n, n, generator=g))
    w = torch.randn(out, n, generator=g)
    return w, x.T @ x


def _error(w, target, h):
    d = w - target
    return (d @ h * d).sum().item()


def test_iterative_refit_is_within_its_tolerance_of_the_exact_one():
    w, h0 = _problem()
    h, _ = methods.damped(h0)
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    keep = expand_tiles(torch.rand(2, 8, generator=torch.Generator().manual_seed(1)) > 0.4, 1, 16)
    exact, _ = methods.refit_block_rows(w, h, keep, 16, 16, score=False)
    approx, steps = methods.refit_block_rows_iterative(w, h, hinv, keep, 16)
    pruned = ~keep.repeat_interleave(16, 0)
    assert torch.all(approx[pruned] == 0) and 0 < steps < methods.CG_MAX_ITERS
    # the stopping rule bounds the excess output error by CG_TOL times the error itself (the
    # preconditioner over-estimates it), and the exact refit is the least-squares optimum
    best, got = _error(exact, w, h), _error(approx, w, h)
    assert best * (1 - 1e-5) <= got <= best / (1 - methods.CG_TOL)
    # a tighter tolerance reaches the exact weights
    tight, _ = methods.refit_block_rows_iterative(w, h, hinv, keep, 16, tol=1e-9, max_iters=500)
    assert torch.allclose(tight, exact, rtol=1e-3, atol=1e-3 * exact.abs().max().item())


def test_approximate_tile_errors_are_exact_while_nothing_is_pruned():
    w, h0 = _problem()
    h, _ = methods.damped(h0)
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    blocks = hinv.view(8, 16, 8, 16).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    none = torch.zeros(2, 8, dtype=torch.bool)
    _, exact = methods.refit_block_rows(w, h, ~expand_tiles(none, 1, 16), 16, 16)
    approx = methods.approx_group_obs_errors(w, torch.linalg.inv(blocks), none, 16, 16)
    assert torch.allclose(approx, exact, rtol=1e-3)
    gone = none.clone()
    gone[0, 3] = True
    assert methods.approx_group_obs_errors(w, torch.linalg.inv(blocks), gone, 16, 16)[0, 3] == float("inf")


@pytest.mark.parametrize("pattern", ["16x16", "16x16g2"])
def test_iterative_obs_keeps_the_pattern_and_nearly_the_exact_error(pattern):
    w, h = _problem()
    pat = parse_pattern(pattern)
    exact = methods.gradual_block_obs(w, h, pat, 0.5, refit="exact")
    approx = methods.gradual_block_obs(w, h, pat, 0.5, refit="iterative")
    assert (approx == 0).float().mean().item() == 0.5 and block_pattern_holds(approx, pat.rows, 16)
    assert _error(approx, w, h) <= 1.1 * _error(exact, w, h)
    assert _error(approx, w, h) < _error(methods.prune_sparsegpt(w, {"hessian": h}, pat, 0.5), w, h)


def test_the_refit_is_chosen_by_its_cost():
    pat = parse_pattern("16x16")
    assert methods.obs_refit_for((1536, 576), pat) == "exact"          # SmolLM2-135M's linears
    assert methods.obs_refit_for((576, 1536), pat) == "exact"
    assert methods.obs_refit_for((4096, 4096), pat) == "iterative"     # Llama-2-7B's
    assert methods.obs_refit_for((4096, 4096), pat, "exact") == "exact"
    assert methods.obs_refit_for((32, 64), pat, "iterative") == "iterative"
    assert PruneSpec(method="obs", pattern="16x16").linear_method((4096, 11008)) == "obs-iterative"
    assert PruneSpec(method="obs", pattern="16x16", obs_max_inputs=4096).linear_method((4096, 11008)) == "sparsegpt"
    assert PruneSpec(method="wanda", pattern="16x16", obs_max_inputs=0).linear_method((64, 64)) == "wanda"
    with pytest.raises(SpruceError, match="unknown OBS refit 'cholesky'"):
        PruneSpec(method="obs", pattern="16x16", obs_refit="cholesky")
    with pytest.raises(SpruceError, match="obs_max_inputs must be a whole number"):
        PruneSpec(method="obs", pattern="16x16", obs_max_inputs=-1)


def _samples(vocab, n=4, seqlen=32):
    return torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(0))


def test_each_linear_gets_its_own_method_and_the_report_says_which(tiny_model):
    from spruce.prune.defaults import resolve_recipe, spec_for_model

    linears = prunable_linears(tiny_model)
    with pytest.warns(UserWarning, match="the 2 wider \\(up to 128 inputs\\) use sparsegpt"):
        spec, fitted = spec_for_model(resolve_recipe("16x16", obs_max_inputs=64, reconstruct_epochs=0), "16x16",
                                      0.5, linears)
    assert fitted["method"] == spec.method == "obs" and spec.obs_max_inputs == 64
    before = {n: m.weight.detach().clone() for n, m in linears.items()}
    info = prune_model(tiny_model, spec, _samples(tiny_model.config.vocab_size), progress=False)
    assert info["linear_methods"] == {n: "sparsegpt" if n.endswith("down_proj") else "obs-exact" for n in linears}
    assert info["obs_max_inputs"] == 64 and info["obs_refit"] == "auto"
    for name, m in linears.items():
        assert block_pattern_holds(m.weight, 16, 16) and not torch.equal(m.weight, before[name])
    assert info["measured_sparsity"] == pytest.approx(0.5, abs=0.02)


def test_the_linear_methods_enter_the_resume_fingerprint(tiny_model, tmp_path, monkeypatch):
    """A state saved under one per-linear plan is not resumed under another."""
    from spruce.prune import engine

    seen = []
    real = engine.state_fingerprint
    monkeypatch.setattr(engine, "state_fingerprint", lambda m, settings, s: seen.append(settings) or real(m, settings, s))
    samples = _samples(tiny_model.config.vocab_size)
    for refit in ("exact", "iterative"):
        prune_model(tiny_model, PruneSpec(method="obs", pattern="16x16", obs_refit=refit), samples, progress=False,
                    state_dir=tmp_path / refit)
    assert [set(s["linear_methods"].values()) for s in seen] == [{"obs-exact"}, {"obs-iterative"}]
    assert real(tiny_model, seen[0], samples) != real(tiny_model, seen[1], samples)


def test_cli_prunes_part_of_the_model_with_the_fallback(capsys, tiny_model_dir, corpus_file, tmp_path):
    from spruce.cli import main

    out = tmp_path / "pruned"
    code = main(["prune", "--model", str(tiny_model_dir), "--sparsity_type", "16x16", "--obs_max_inputs", "64",
                 "--nsamples", "4", "--seqlen", "64", "--calib_batch_size", "2", "--reconstruct_epochs", "1",
                 "--calib_dataset", str(corpus_file), "--device", "cpu", "--save_model", str(out)])
    assert code == 0 and "the 2 wider (up to 128 inputs) use sparsegpt" in capsys.readouterr().err
    info = json.loads((out / "sparsity.json").read_text())
    assert info["method"] == "obs" and info["obs_max_inputs"] == 64
    assert sorted(set(info["linear_methods"].values())) == ["obs-exact", "sparsegpt"]
    assert "obs (obs-exact on 12 linears, sparsegpt on 2 linears)" in (out / "README.md").read_text()


def test_the_prune_speed_bench_times_a_default_prune_at_the_given_cg_tolerance(monkeypatch, capsys):
    """bench.prune_speed's flow on the CPU, a tiny Llama shape: every iterative refit gets --cg_tol."""
    import sys

    from bench import prune_speed

    tolerances = []
    solve = methods.refit_block_rows_iterative

    def recorded(*args, **kwargs):
        tolerances.append(kwargs.get("tol"))
        return solve(*args, **kwargs)

    monkeypatch.setattr(methods, "refit_block_rows_iterative", recorded)
    monkeypatch.setattr(sys, "argv", ["prune_speed", "--device", "cpu", "--runs", "default:16x16", "--layers", "1",
                                      "--hidden_size", "128", "--intermediate_size", "256", "--nsamples", "2",
                                      "--seqlen", "32", "--obs_refit", "iterative", "--cg_tol", "0.1"])
    prune_speed.main()
    out = capsys.readouterr().out
    assert "CG tolerance 0.1," in out and "| default:16x16 | obs-iterative |" in out
    assert tolerances and set(tolerances) == {0.1}
