"""PruneSpec: one documented default per option, early errors, the report and the fingerprint."""

import copy
import dataclasses

import pytest
import torch

from spruce.config import PruneConfig
from spruce.errors import SpruceError
from spruce.prune import PruneSpec, Reconstruct, prune_model
from spruce.prune.defaults import BASE
from spruce.prune.spec import OPTIONS


def _samples(vocab, n=4, seqlen=32):
    return torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("changes, message", [
    ({"method": "random"}, "unknown prune method 'random'"),
    ({"sparsity": 1.0}, r"sparsity must be in \[0, 1\)"),
    ({"pattern": "diagonal"}, "unknown sparsity type 'diagonal'"),
    ({"selection": "diagonal", "pattern": "16x16"}, "unknown block selection"),
    ({"allocation": "random"}, "unknown allocation 'random'"),
    ({"reconstruct_target": "teacher"}, "reconstruction target must be 'dense' or 'local'"),
    ({"reconstruct_lr": 0.0}, "reconstruction needs epochs >= 0 and lr > 0"),
    ({"nsamples": 0}, "must be positive"),
    ({"pattern": "2:4", "allocation": "owl"}, "2:4 fixes every layer's sparsity"),
])
def test_a_bad_spec_fails_on_creation_with_one_message(changes, message):
    with pytest.raises(SpruceError, match=message):
        PruneSpec(**changes)


def test_spec_normalises_pattern_and_fixed_sparsity():
    with pytest.warns(UserWarning, match="fixes the sparsity at 0.5"):
        spec = PruneSpec(pattern="2:4", sparsity=0.3)
    assert spec.sparsity == 0.5
    assert PruneSpec(pattern="hybrid", tiers=[0.2, 0.4]).pattern == "hybrid:16x16"
    assert PruneSpec(pattern="hybrid", tiers=[0.2, 0.4]).tiers == (0.2, 0.4)


def test_every_default_is_the_spec_s_own():
    defaults = {f.name: f.default for f in dataclasses.fields(PruneSpec)}
    assert {k: v for k, v in BASE.items()} == {k: v for k, v in defaults.items() if k not in ("pattern", "sparsity")}
    config = PruneConfig()
    assert (config.nsamples, config.seqlen, config.batch_size, config.sparsity) == \
        (defaults["nsamples"], defaults["seqlen"], defaults["batch_size"], defaults["sparsity"])
    assert set(OPTIONS) >= {"selection", "tiers", "allocation", "owl_m", "reconstruct_epochs"}
    with pytest.raises(SpruceError, match="unknown prune option"):
        PruneConfig(options={"selektion": "global"})


def test_spec_and_keyword_forms_prune_the_same_and_report_the_spec(tiny_model):
    samples = _samples(tiny_model.config.vocab_size)
    other = copy.deepcopy(tiny_model)
    spec = PruneSpec(method="wanda", pattern="16x16", sparsity=0.5, reconstruct_epochs=2, reconstruct_lr=1e-3,
                     batch_size=2)
    info = prune_model(tiny_model, spec, samples, progress=False)
    keyword = prune_model(other, "wanda", "16x16", 0.5, samples=samples, batch_size=2, progress=False,
                          reconstruct=Reconstruct(2, 1e-3))
    assert all(torch.equal(a, b) for a, b in zip(tiny_model.state_dict().values(), other.state_dict().values()))
    for name, value in dataclasses.asdict(spec).items():
        if name != "selection":   # reported as the pattern's own word for it
            assert info[name] == value, name
    assert info["reconstruct"] == {"epochs": 2, "lr": 1e-3, "target": "dense", "norms": False}
    assert {k: v for k, v in info.items() if k != "seconds"} == {k: v for k, v in keyword.items() if k != "seconds"}


def test_run_prune_reads_calibration_only_when_the_spec_needs_it(tiny_model, tokenizer, tmp_path):
    from spruce.masks import read_sparsity_json
    from spruce.prune.defaults import resolve_recipe
    from spruce.prune.run import run_prune
    from spruce.prune.state import state_folder

    out = tmp_path / "pruned"
    recipe = resolve_recipe("16x16", method="magnitude")
    info, spec = run_prune(tiny_model, tokenizer, recipe, "16x16", 0.5, corpus="no-such-corpus.txt",
                           out_dir=out, progress=False, recipe={"command": "test"})
    assert not spec.needs_calibration and info["calibration"] is None
    assert read_sparsity_json(out)["recipe"] == {"command": "test"} and not state_folder(out).exists()
    with pytest.raises(SpruceError, match="no-such-corpus"):
        run_prune(tiny_model, tokenizer, resolve_recipe("16x16", method="wanda"), "16x16", 0.5,
                  corpus="no-such-corpus.txt", progress=False)


def test_the_cli_and_the_yaml_recipes_share_each_default():
    from spruce.cli import build_parser
    from spruce.config import RecoverConfig

    finetune = build_parser().parse_args(["finetune", "--model_name_or_path", "m", "--output_dir", "o"])
    assert (finetune.lr_scheduler_type, finetune.logging_steps) == ("linear", 10)   # run_clm's defaults
    recover = RecoverConfig()
    assert (recover.lr_scheduler_type, recover.logging_steps) == (finetune.lr_scheduler_type, finetune.logging_steps)
    prune = build_parser().parse_args(["prune", "--model", "m"])
    config = PruneConfig()
    assert (prune.seqlen, prune.nsamples, prune.calib_batch_size, prune.sparsity_ratio) == \
        (config.seqlen, config.nsamples, config.batch_size, config.sparsity)
