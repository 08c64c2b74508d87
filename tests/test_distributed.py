"""Several processes: `spruce finetune` under torchrun and accelerate launch, DDP and FSDP2.

The CPU tests start 2 processes with the gloo backend on a tiny pruned model; the commands are the
ones the README shows. Tests that need two GPUs carry the `gpu` mark and skip with fewer.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from spruce.cli import main
from spruce.masks import zero_masks
from spruce.models import load_model
from spruce.recover.finetune import grad_accum_steps
from spruce.recover.parallel import check_fsdp_wrapping
from spruce.errors import SpruceError

ROOT = Path(__file__).resolve().parents[1]


def common(pruned_dir, corpus_file, out, *extra):
    return ["finetune", "--model_name_or_path", str(pruned_dir), "--train_file", str(corpus_file),
            "--validation_file", str(corpus_file), "--block_size", "64", "--do_train", "--do_eval",
            "--per_device_train_batch_size", "2", "--max_eval_samples", "8", "--logging_steps", "1",
            "--output_dir", str(out), *extra]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(launcher: str, argv: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    """`torchrun` or `accelerate launch` with `nproc` CPU processes (gloo), as the README shows."""
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--rdzv_endpoint", f"127.0.0.1:{_free_port()}", "-m", "spruce.cli", *argv]
    else:
        # with no GPU visible, accelerate's multi-GPU launcher starts gloo CPU processes
        kind = ["--use_fsdp", "--fsdp_version", "2", "--fsdp_transformer_layer_cls_to_wrap", "LlamaDecoderLayer"] \
            if launcher == "accelerate-fsdp" else ["--multi_gpu"]
        cmd = [sys.executable, "-m", "accelerate.commands.launch", *kind, "--num_processes", str(nproc),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), "-m", "spruce.cli", *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def train_losses(folder: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["event"] == "train"}


def same_zero_set(pruned_dir, trained_dir) -> bool:
    before = zero_masks(load_model(str(pruned_dir))[0])
    after = zero_masks(AutoModelForCausalLM.from_pretrained(trained_dir))
    return all(torch.equal(before[n], after[n]) for n in before)


def test_ddp_two_processes_match_one_process_with_accumulation(pruned_dir, corpus_file, tmp_path, capsys):
    """2 processes x batch 2 see the same blocks per step as 1 process x batch 2 x accumulation 2."""
    run = launch("torchrun", common(pruned_dir, corpus_file, tmp_path / "ddp", "--mode", "full",
                                    "--max_steps", "4", "--learning_rate", "1e-3"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("=== summary ===") == 1  # rank 0 alone prints and writes
    assert "(2 processes x 2 x 1, ddp)" in run.stdout
    assert main(common(pruned_dir, corpus_file, tmp_path / "one", "--mode", "full", "--max_steps", "4",
                       "--learning_rate", "1e-3", "--gradient_accumulation_steps", "2")) == 0
    capsys.readouterr()
    ddp, one = train_losses(tmp_path / "ddp"), train_losses(tmp_path / "one")
    assert sorted(ddp) == [1, 2, 3, 4]
    assert all(abs(ddp[s] - one[s]) < 1e-4 * abs(one[s]) for s in one), (ddp, one)
    assert same_zero_set(pruned_dir, tmp_path / "ddp")
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["processes"] == {"world_size": 2, "kind": "ddp"}


def test_fsdp_keeps_zeros_and_resumes_exactly(pruned_dir, corpus_file, tmp_path, capsys):
    args = ["--mode", "full", "--fsdp", "--max_steps", "6", "--save_steps", "3", "--learning_rate", "2e-3"]
    run = launch("torchrun", common(pruned_dir, corpus_file, tmp_path / "straight", *args))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "fsdp)" in run.stdout
    # pruned weights stayed exactly zero through sharded optimizer steps; kept weights moved
    assert same_zero_set(pruned_dir, tmp_path / "straight")
    base = load_model(str(pruned_dir))[0]
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "straight")
    assert not torch.equal(base.model.layers[1].mlp.down_proj.weight, trained.model.layers[1].mlp.down_proj.weight)
    straight = train_losses(tmp_path / "straight")

    # a run that stopped after its checkpoint at step 3, resumed by 2 processes: the same losses, bit for bit
    (tmp_path / "resumed").mkdir()
    shutil.copytree(tmp_path / "straight" / "checkpoint-3", tmp_path / "resumed" / "checkpoint-3")
    run = launch("torchrun", common(pruned_dir, corpus_file, tmp_path / "resumed", *args,
                                    "--resume_from_checkpoint", "latest"))
    assert run.returncode == 0, run.stderr[-3000:]
    resumed = train_losses(tmp_path / "resumed")
    assert sorted(resumed) == [4, 5, 6]
    assert all(resumed[s] == straight[s] for s in resumed), (resumed, straight)

    # the same checkpoint resumes in one process (accumulation 2 gives the same global batch)
    (tmp_path / "single" / "checkpoints").mkdir(parents=True)  # the layout of spruce 0.1 is found too
    shutil.copytree(tmp_path / "straight" / "checkpoint-3", tmp_path / "single" / "checkpoints" / "checkpoint-3")
    single_args = [a for a in args if a != "--fsdp"] + ["--gradient_accumulation_steps", "2"]
    assert main(common(pruned_dir, corpus_file, tmp_path / "single", *single_args,
                       "--resume_from_checkpoint", "latest")) == 0
    capsys.readouterr()
    single = train_losses(tmp_path / "single")
    assert all(abs(single[s] - straight[s]) < 1e-4 * abs(straight[s]) for s in single), (single, straight)
    assert same_zero_set(pruned_dir, tmp_path / "single")


def test_fsdp_distillation_shards_the_teacher_and_matches_one_process(pruned_dir, tiny_model_dir, corpus_file,
                                                                     tmp_path, capsys):
    """Under FSDP each process holds half of the teacher and gathers it layer by layer; the KL and
    hidden-state losses are those of one process with the whole teacher and accumulation 2."""
    args = ["--mode", "full", "--max_steps", "3", "--learning_rate", "2e-3", "--teacher_model", str(tiny_model_dir),
            "--distill_alpha", "0.7", "--distill_hidden_weight", "0.5"]
    run = launch("torchrun", common(pruned_dir, corpus_file, tmp_path / "fsdp", *args, "--fsdp"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "teacher sharded over 2 processes: each holds 50% of its parameters" in run.stdout
    assert main(common(pruned_dir, corpus_file, tmp_path / "one", *args, "--gradient_accumulation_steps", "2")) == 0
    assert "teacher sharded" not in capsys.readouterr().out
    fsdp, one = train_losses(tmp_path / "fsdp"), train_losses(tmp_path / "one")
    assert sorted(fsdp) == [1, 2, 3]
    assert all(abs(fsdp[s] - one[s]) < 1e-4 * abs(one[s]) for s in one), (fsdp, one)
    assert same_zero_set(pruned_dir, tmp_path / "fsdp")


def test_masked_lora_under_accelerate_launch_with_fsdp_config(pruned_dir, corpus_file, tmp_path):
    out = tmp_path / "lora"
    run = launch("accelerate-fsdp", common(pruned_dir, corpus_file, out, "--mode", "masked-lora", "--max_steps", "4",
                                      "--learning_rate", "1e-2", "--lora_dropout", "0", "--merge",
                                      "--gradient_checkpointing"))
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == {"world_size": 2, "kind": "fsdp"}
    assert summary["merged_zero_set_unchanged"] is True
    assert summary["eval_after"]["eval_loss"] < summary["eval_before"]["eval_loss"]
    assert abs(summary["eval_merged"]["eval_loss"] - summary["eval_after"]["eval_loss"]) < 1e-4
    assert (out / "adapter_model.safetensors").is_file() and same_zero_set(pruned_dir, out / "merged")


def test_fsdp_wrapping_too_large_is_one_line(pruned_dir, corpus_file, tmp_path):
    run = launch("torchrun", common(pruned_dir, corpus_file, tmp_path / "w", "--mode", "full", "--fsdp",
                                    "--max_steps", "1", "--fsdp_transformer_layer_cls_to_wrap", "LlamaMLP"))
    assert run.returncode != 0 and "exitcode  : 2" in run.stderr
    lines = [line for line in run.stderr.splitlines() if line.startswith("spruce finetune: error")]
    assert len(lines) == 1 and "wrap the decoder layers with --fsdp_transformer_layer_cls_to_wrap " \
        "LlamaDecoderLayer" in lines[0], run.stderr[-2000:]
    assert not (tmp_path / "w").exists()


def test_fsdp_wrapping_check(tiny_model):
    assert len(check_fsdp_wrapping(tiny_model, ["LlamaDecoderLayer"])) == 2
    with pytest.raises(SpruceError, match="the root unit holding .* of the model"):
        check_fsdp_wrapping(tiny_model, [])
    with pytest.raises(SpruceError, match="no module of class Block"):
        check_fsdp_wrapping(tiny_model, ["Block"])


def test_global_batch_size():
    assert grad_accum_steps(16, 2, None, 4) == 2
    assert grad_accum_steps(None, 2, None, 4) == 1
    with pytest.raises(SpruceError, match="not a multiple of .* = 8"):
        grad_accum_steps(12, 2, None, 4)


def _one_line(capsys, argv, expected):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and expected in err, err
    assert len(err.strip().splitlines()) == 1


def test_bad_launches_are_one_line(capsys, pruned_dir, corpus_file, tmp_path, monkeypatch):
    argv = common(pruned_dir, corpus_file, tmp_path / "x", "--max_steps", "1")
    _one_line(capsys, argv + ["--fsdp"], "--fsdp needs several processes")
    _one_line(capsys, argv + ["--device_map", "auto"], "--device_map shards one model")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    _one_line(capsys, argv + ["--global_batch_size", "6"],
              "--global_batch_size 6 is not a multiple of --per_device_train_batch_size 2 x 4 processes = 8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    _one_line(capsys, argv, "starts 4 processes on this machine but only 2 GPUs are visible")
    assert not (tmp_path / "x").exists()


def test_eval_with_device_map_in_one_process(capsys, pruned_dir, corpus_file, tmp_path):
    for name, extra in (("plain", []), ("sharded", ["--device_map", "auto"])):
        argv = common(pruned_dir, corpus_file, tmp_path / name, *extra)
        argv.remove("--do_train")
        assert main(argv) == 0
    capsys.readouterr()
    plain = json.loads((tmp_path / "plain" / "summary.json").read_text())["eval_before"]["eval_loss"]
    sharded = json.loads((tmp_path / "sharded" / "summary.json").read_text())["eval_before"]["eval_loss"]
    assert abs(plain - sharded) < 1e-5


def test_gradient_checkpointing_changes_memory_not_math(capsys, pruned_dir, corpus_file, tmp_path):
    for name, extra in (("plain", []), ("ckpt", ["--gradient_checkpointing"])):
        assert main(common(pruned_dir, corpus_file, tmp_path / name, "--mode", "full", "--max_steps", "3",
                           "--lora_dropout", "0", *extra)) == 0
    capsys.readouterr()
    plain, ckpt = train_losses(tmp_path / "plain"), train_losses(tmp_path / "ckpt")
    assert all(abs(plain[s] - ckpt[s]) < 1e-5 * abs(plain[s]) for s in plain), (plain, ckpt)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_fsdp_on_two_gpus_keeps_zeros(pruned_dir, corpus_file, tmp_path):
    env_gpus = {"CUDA_VISIBLE_DEVICES": "0,1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--rdzv_endpoint",
           f"127.0.0.1:{_free_port()}", "-m", "spruce.cli",
           *common(pruned_dir, corpus_file, tmp_path / "g", "--mode", "full", "--fsdp", "--bf16",
                   "--max_steps", "4", "--learning_rate", "1e-3")]
    run = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **env_gpus, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert same_zero_set(pruned_dir, tmp_path / "g")
