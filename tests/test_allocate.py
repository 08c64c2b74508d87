"""Layer sparsity allocation: OWL and module overrides average to the target, parameter-weighted."""

import pytest

from spruce.errors import SpruceError
from spruce.prune.allocate import allocate, outlier_ratio, owl_sparsities, parse_overrides

import torch


def _weighted(values, weights):
    return sum(v * w for v, w in zip(values, weights)) / sum(weights)


def test_owl_averages_to_the_target_and_spares_outlier_layers():
    ratios = [0.01, 0.05, 0.02, 0.09]
    sizes = [1.0, 1.0, 2.0, 1.0]
    s = owl_sparsities(ratios, 0.5, lam=0.08, weights=sizes)
    assert _weighted(s, sizes) == pytest.approx(0.5, abs=1e-12)
    assert s[3] == min(s) and s[0] == max(s)           # most outliers -> least pruned
    assert max(s) - min(s) == pytest.approx(0.16)      # spans 2 * lambda


def test_outlier_ratio_counts_scores_above_m_times_mean():
    scores = [torch.ones(10, 10), torch.tensor([[100.0]])]
    # mean of the 101 scores is 200/101 ~ 1.98; only the 100 exceeds 5 x that
    assert outlier_ratio(scores, m=5) == pytest.approx(1 / 101)


def test_overrides_keep_the_total_exact():
    sizes = {"l0.self_attn.q": 100, "l0.mlp.up": 300, "l1.self_attn.q": 100, "l1.mlp.up": 300}
    block_of = {n: int(n[1]) for n in sizes}
    s = allocate(sizes, block_of, 0.5, overrides={"self_attn": 0.3})
    assert s["l0.self_attn.q"] == 0.3 and s["l1.self_attn.q"] == 0.3
    total = sum(s[n] * sizes[n] for n in sizes) / sum(sizes.values())
    assert total == pytest.approx(0.5, abs=1e-12) and s["l0.mlp.up"] > 0.5


def test_owl_with_overrides_keeps_the_total_exact():
    sizes = {"l0.attn": 10, "l0.mlp": 30, "l1.attn": 10, "l1.mlp": 30}
    block_of = {n: int(n[1]) for n in sizes}
    s = allocate(sizes, block_of, 0.5, block_sparsity=[0.45, 0.55], overrides={"attn": 0.4})
    total = sum(s[n] * sizes[n] for n in sizes) / sum(sizes.values())
    assert total == pytest.approx(0.5, abs=1e-12) and s["l1.mlp"] - s["l0.mlp"] == pytest.approx(0.1)


@pytest.mark.parametrize("text, message", [
    ("self_attn", "bad module sparsity"), ("self_attn=x", "bad module sparsity"),
    ("self_attn=1.2", r"must be in \[0, 1\)"),
])
def test_bad_overrides(text, message):
    with pytest.raises(SpruceError, match=message):
        parse_overrides(text)


def test_override_that_matches_nothing():
    with pytest.raises(SpruceError, match="matches no decoder linear"):
        allocate({"l0.mlp": 10}, {"l0.mlp": 0}, 0.5, overrides={"attn": 0.2})


def test_impossible_override():
    with pytest.raises(SpruceError, match="outside"):
        allocate({"l0.attn": 90, "l0.mlp": 10}, {"l0.attn": 0, "l0.mlp": 0}, 0.5, overrides={"attn": 0.0})
