"""Perplexity on a case whose answer is known."""

import math

import torch

from spruce.evaluate import perplexity
from tests.conftest import build_model


def test_uniform_logits_give_vocabulary_size():
    model = build_model(vocab_size=320)
    torch.nn.init.zeros_(model.lm_head.weight)  # every logit 0: a uniform next-token distribution
    windows = torch.randint(0, 320, (3, 48))
    result = perplexity(model, windows, batch_size=2, progress=False)
    assert math.isclose(result["ppl"], 320, rel_tol=1e-5)
    assert result["windows"] == 3 and result["tokens"] == 144 and result["seqlen"] == 48


def test_batch_size_does_not_change_the_number(tiny_model):
    windows = torch.randint(0, tiny_model.config.vocab_size, (5, 40), generator=torch.Generator().manual_seed(3))
    a = perplexity(tiny_model, windows, batch_size=1, progress=False)["ppl"]
    b = perplexity(tiny_model, windows, batch_size=4, progress=False)["ppl"]
    assert math.isfinite(a) and math.isclose(a, b, rel_tol=1e-4)
