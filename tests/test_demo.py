"""The demo pipeline end to end on a tiny model and a repeating local corpus."""

import json

import yaml

from spruce.config import DataConfig, LoraConfig, PruneConfig, RunConfig
from spruce.pipeline import run_demo


def test_demo_pipeline_writes_run_folder_and_recovers(tiny_model_dir, corpus_file, tmp_path):
    cfg = RunConfig(
        model=str(tiny_model_dir), device="cpu",
        data=DataConfig(corpus=str(corpus_file), eval_seqlen=64, eval_windows=6),
        prune=PruneConfig(nsamples=4, seqlen=64, batch_size=2),
        lora=LoraConfig(r=8, lr=3e-3, steps=40, warmup=4, batch_size=2, block_size=64, dropout=0.0),
    )
    results = run_demo(cfg, tmp_path / "run", progress=False, say=lambda *_: None)
    run = tmp_path / "run"
    for name in ["config.yaml", "metrics.jsonl", "report.md", "pruned/sparsity.json",
                 "pruned/config.json", "adapter/adapter_config.json", "plots/train_loss.png"]:
        assert (run / name).exists(), name
    assert yaml.safe_load((run / "config.yaml").read_text())["prune"]["pattern"] == "16x16"
    events = [json.loads(line)["event"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert events.count("eval") == 3 and "prune" in events and "train" in events
    assert results["pruned"]["sparsity"] == 0.5 == results["recovered (LoRA)"]["sparsity"]
    assert results["recovered (LoRA)"]["ppl"] < results["pruned"]["ppl"]
    assert "| dense |" in (run / "report.md").read_text()
    assert not list(tmp_path.glob(".run.partial-*"))
