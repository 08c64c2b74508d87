"""Held-out quality: data.heldout in recipes, both columns in report.md, compare, finetune and eval."""

import json

import pytest

from spruce.cli import main
from spruce.config import load_recipe, recipes_dir
from spruce.errors import SpruceError
from spruce.pipeline import run_recipe

from .test_pipeline import quiet, tiny_overrides

OTHER = ("Call me by any name you like; the sea was grey and the whale was white.\n"
         "The captain paced the deck at night, and the crew slept below in the dark.\n")


@pytest.fixture(scope="module")
def other_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("other") / "other.txt"
    path.write_text(OTHER * 40)
    return path


def test_heldout_defaults_to_moby_for_sotu_and_to_none_otherwise(corpus_file):
    assert load_recipe(recipes_dir() / "smollm2-block16.yaml").data.heldout == "moby"
    assert load_recipe(None, ["recover.corpus=sotu"]).data.heldout == "moby"
    assert load_recipe(None, ["data.heldout=null"]).data.heldout is None
    assert load_recipe(None, [f"data.corpus={corpus_file}"]).data.heldout is None
    assert load_recipe(None, ["data.corpus=wikitext2"]).data.heldout is None
    assert load_recipe(None, ["recover.corpus=sotu+moby"]).data.heldout is None  # moby is trained on
    assert load_recipe(None, [f"data.heldout={corpus_file}"]).data.heldout == str(corpus_file)


@pytest.mark.parametrize("overrides, where", [
    (["data.corpus=sotu:0.5+moby:0.5", "data.heldout=moby"], "data.corpus"),
    (["recover.corpus=sotu+moby", "data.heldout=moby"], "recover.corpus"),
    (["data.heldout=sotu"], "data.corpus"),
])
def test_a_heldout_corpus_the_recipe_trains_or_calibrates_on_is_refused(overrides, where):
    with pytest.raises(SpruceError, match=f"held-out corpus .* is also in {where}") as e:
        load_recipe(None, overrides)
    assert "\n" not in str(e.value)


def test_the_same_file_under_another_path_is_refused(corpus_file):
    other_path = corpus_file.parent / ".." / corpus_file.parent.name / corpus_file.name
    with pytest.raises(SpruceError, match="is also in data.corpus"):
        load_recipe(None, [f"data.corpus={corpus_file}", f"data.heldout={other_path}"])


def test_a_run_reports_both_columns(capsys, tiny_model_dir, corpus_file, other_file, tmp_path):
    out = tmp_path / "run"
    cfg = load_recipe(recipes_dir() / "smollm2-block16.yaml",
                      tiny_overrides(tiny_model_dir, corpus_file, out, "recover.max_steps=4", f"data.heldout={other_file}"))
    lines = []
    results = run_recipe(cfg, say=quiet(lines), progress=False)
    table = results["report"]["results"]
    for stage in ("dense", "pruned", "recovered"):
        held = table[stage]["heldout"]
        assert held["corpus"] == str(other_file) and held["windows"] == 6 and held["seqlen"] == 64
        assert held["ppl"] != table[stage]["ppl"]  # another corpus, another number
    assert any("held-out" in line and "x dense" in line for line in lines if line.startswith("[recover]"))
    report = (out / "report.md").read_text()
    header = next(line for line in report.splitlines() if line.startswith("| model |"))
    assert header.count("x dense") == 2 and f"held-out {other_file}/test perplexity" in header
    label = results["report"]["labels"]["recovered"]   # the recipe names its rows
    row = next(line for line in report.splitlines() if line.startswith(f"| {label} |"))
    ratio = table["recovered"]["heldout"]["ppl"] / table["dense"]["heldout"]["ppl"]
    assert f"| {ratio:.2f} |" in row
    # the finetune summary has the held-out pair too
    summary = json.loads((out / "recover" / "summary.json").read_text())
    assert summary["heldout_before"]["heldout"]["corpus"] == str(other_file)
    assert "eval_ppl" in summary["heldout_after"]["heldout"]

    capsys.readouterr()
    assert main(["compare", str(out), "--json", str(tmp_path / "c.json")]) == 0
    text = capsys.readouterr().out
    assert "held-out recovered x dense" in text and f"| {ratio:.2f} |" in text
    row = json.loads((tmp_path / "c.json").read_text())["runs"][0]
    assert row["heldout"] == str(other_file) and row["recovered_heldout_ppl"] == table["recovered"]["heldout"]["ppl"]


def test_a_run_without_heldout_keeps_one_column(tiny_model_dir, corpus_file, tmp_path):
    out = tmp_path / "run"
    cfg = load_recipe(recipes_dir() / "smollm2-block16.yaml",
                      tiny_overrides(tiny_model_dir, corpus_file, out, "stages=[baseline, report]"))
    results = run_recipe(cfg, say=quiet([]), progress=False)
    assert "heldout" not in results["report"]["results"]["dense"]
    assert "held-out" not in (out / "report.md").read_text().split("## Recipe")[0]


def test_finetune_summary_shows_both_columns_against_the_teacher(capsys, pruned_dir, tiny_model_dir, corpus_file,
                                                                 other_file, tmp_path):
    code = main(["finetune", "--model_name_or_path", str(pruned_dir), "--train_file", str(corpus_file),
                 "--validation_file", str(corpus_file), "--heldout_dataset", str(other_file),
                 "--teacher_model", str(tiny_model_dir), "--do_train", "--do_eval", "--mode", "full",
                 "--max_steps", "3", "--block_size", "64", "--max_eval_samples", "4", "--device", "cpu",
                 "--report_to", "none", "--output_dir", str(tmp_path / "ft")])
    out = capsys.readouterr().out
    assert code == 0
    summary = json.loads((tmp_path / "ft" / "summary.json").read_text())
    assert {"in_domain", "heldout"} <= summary["dense_eval"].keys()
    held = next(line for line in out.splitlines() if line.startswith("held-out ("))
    assert "pruned" in held and "-> recovered" in held and held.count("x dense") == 2
    assert any(line.startswith("in-domain (") and line.count("x dense") == 2 for line in out.splitlines())


def test_finetune_refuses_a_heldout_corpus_it_trains_on(capsys, pruned_dir, corpus_file, tmp_path):
    code = main(["finetune", "--model_name_or_path", str(pruned_dir), "--train_file", str(corpus_file),
                 "--validation_file", str(corpus_file), "--heldout_dataset", str(corpus_file), "--do_eval",
                 "--device", "cpu", "--output_dir", str(tmp_path / "ft")])
    err = capsys.readouterr().err
    assert code == 2 and "is also in --dataset_name / --train_file" in err and "--heldout_dataset" in err
    assert len(err.strip().splitlines()) == 1


def test_eval_takes_several_corpora_in_one_call(capsys, tiny_model_dir, corpus_file, other_file, tmp_path):
    path = tmp_path / "e.json"
    code = main(["eval", "--model", str(tiny_model_dir), "--dataset", str(corpus_file), str(other_file),
                 "--seqlen", "64", "--max_windows", "3", "--device", "cpu", "--json", str(path)])
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and len(out) == 2
    assert f"on {corpus_file}/test" in out[0] and f"on {other_file}/test" in out[1]
    record = json.loads(path.read_text())
    assert [d["dataset"] for d in record["datasets"]] == [str(corpus_file), str(other_file)]
    assert record["ppl"] == record["datasets"][0]["ppl"] != record["datasets"][1]["ppl"]
    assert all(d["windows"] == 3 for d in record["datasets"])
