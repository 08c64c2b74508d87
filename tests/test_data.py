"""Corpora, splitting and the one tokenization path: samples, blocks, windows."""

import pytest
import torch

from spruce import data
from spruce.errors import SpruceError


def test_parse_mix_normalises_weights():
    parts = data.parse_corpus("sotu:3+moby:1")
    assert [(p.name, p.weight) for p in parts] == [("sotu", 0.75), ("moby", 0.25)]
    assert [p.weight for p in data.parse_corpus("sotu+moby")] == [0.5, 0.5]
    assert data.parse_corpus("wikitext")[0].name == "wikitext2"


@pytest.mark.parametrize("spec, message", [
    ("nosuch", "unknown corpus 'nosuch'"),
    ("sotu:abc+moby", "unknown corpus 'sotu:abc'"),
    ("sotu:-1", "must be positive"),
    ("", "empty corpus name"),
])
def test_bad_corpus_specs(spec, message):
    with pytest.raises(SpruceError, match=message):
        data.parse_corpus(spec)


def test_cut_blocks_drops_the_tail():
    blocks = data.cut_blocks(torch.arange(103), 10)
    assert blocks.shape == (10, 10) and blocks[-1, -1].item() == 99


def test_windows_follow_the_protocol(tokenizer, corpus_file):
    stream = data.tokenize(tokenizer, data.documents(str(corpus_file), "test"))
    windows = data.eval_windows(str(corpus_file), "test", tokenizer, 64)
    assert windows.shape == (stream.numel() // 64, 64)
    assert torch.equal(windows.flatten(), stream[: windows.numel()])
    assert data.eval_windows(str(corpus_file), "test", tokenizer, 64, max_windows=3).shape == (3, 64)


def test_calibration_is_seeded(tokenizer, corpus_file):
    a = data.calibration_samples(str(corpus_file), tokenizer, 8, 32, seed=1)
    b = data.calibration_samples(str(corpus_file), tokenizer, 8, 32, seed=1)
    c = data.calibration_samples(str(corpus_file), tokenizer, 8, 32, seed=2)
    assert a.shape == (8, 32) and torch.equal(a, b) and not torch.equal(a, c)


def test_too_many_calibration_samples_warns_and_uses_what_there_is(tokenizer, corpus_file):
    capacity = data.tokenize(tokenizer, data.documents(str(corpus_file), "train")).numel() // 256
    with pytest.warns(UserWarning, match=rf"using {capacity} samples"):
        samples = data.calibration_samples(str(corpus_file), tokenizer, 10_000, 256)
    assert samples.shape == (capacity, 256)


def test_training_blocks_warn_on_max_samples(tokenizer, corpus_file):
    n = data.training_blocks(str(corpus_file), tokenizer, 64).shape[0]
    with pytest.warns(UserWarning, match=rf"max_train_samples \(30000\) is larger than dataset size \({n}\); using all {n} samples"):
        blocks = data.training_blocks(str(corpus_file), tokenizer, 64, max_samples=30000)
    assert blocks.shape == (n, 64)


def test_mix_takes_blocks_by_weight(tokenizer, corpus_file, tmp_path):
    other = tmp_path / "other.jsonl"
    other.write_text("\n".join('{"text": "numbers one two three four five six seven eight nine ten"}'
                               for _ in range(200)))
    blocks = data.training_blocks(f"{corpus_file}:0.5+{other}:0.5", tokenizer, 32, max_samples=20)
    assert blocks.shape == (20, 32)
    # the short part keeps its share by repeating its blocks, with a warning; the long part is sampled
    parts = [data.cut_blocks(data.tokenize(tokenizer, data.documents(str(f), "train")), 32)
             for f in (corpus_file, other)]
    assert parts[0].shape[0] < parts[1].shape[0]
    with pytest.warns(UserWarning, match="its blocks repeat"):
        mixed = data.training_blocks(f"{corpus_file}:0.5+{other}:0.5", tokenizer, 32)
    total = parts[0].shape[0] + parts[1].shape[0]
    first = total - total // 2                                      # the weights hold: half and half
    assert mixed.shape[0] == total and first > parts[0].shape[0]
    assert {tuple(r) for r in mixed[:first].tolist()} == {tuple(r) for r in parts[0].tolist()}  # all, repeated


def test_jsonl_and_empty_files(tmp_path):
    good = tmp_path / "a.jsonl"
    good.write_text('{"text": "hello"}\n\n{"text": "world"}\n')
    assert data.documents(str(good), "train") == ["hello", "world"]
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"txt": 1}\n')
    with pytest.raises(SpruceError, match=r"b.jsonl:1 is not a JSON object"):
        data.documents(str(bad), "train")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(SpruceError, match="holds no text"):
        data.documents(str(empty), "test")


def test_offline_datasets_corpus_names_alternatives(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *a, **k):
        if name == "datasets":
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "datasets" else object())
    with pytest.raises(SpruceError, match=r"not installed: pip install 'datasets==5.2.0'.*use sotu, moby"):
        data.documents("wikitext2", "test")
    with pytest.raises(SpruceError, match="'datasets' package"):
        data.check_corpus("sotu:0.5+c4:0.5")


def test_unreachable_hub_names_alternatives(monkeypatch):
    """With datasets installed but no Hub and no cache: one line that says so."""
    import sys
    import types

    fake = types.ModuleType("datasets")

    def load_dataset(*_args, **_kwargs):
        raise ConnectionError("no route to huggingface.co")

    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: object())
    with pytest.raises(SpruceError, match=r"Hub is unreachable .* offline, use sotu, moby .*\(ConnectionError\)"):
        data.documents("wikitext2", "test")


@pytest.mark.assets
def test_sotu_splits_by_year_and_strips_markers():
    from spruce.assets import cache_home

    if not (cache_home() / "corpora" / "sotu").exists():
        pytest.skip("embedded corpora not fetched (run 'spruce fetch')")
    test = data.documents("sotu", "test")
    assert len(test) == 21  # 2001-2021, one address a year
    assert not any("[Applause]" in d or "[laughter]" in d.lower() for d in test)
    assert len(data.documents("sotu", "validation")) == 11
    assert len(data.documents("moby", "test")) > 5
