"""`spruce generate`: text from a pruned model with its block-sparse layers swapped in, timed."""

import json

import pytest

from spruce.cli import main


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_block_sparse_generation_matches_dense_and_reports_speed(capsys, pruned_dir, tmp_path):
    base = ["generate", "--model", str(pruned_dir), "--prompt", "The quick brown fox", "--max_new_tokens", "10"]
    code, dense_out, _ = run_cli(capsys, *base, "--kernels", "off")
    assert code == 0 and "tokens/s | dense | eager mode, float32 on cpu" in dense_out
    code, out, err = run_cli(capsys, *base, "--kernels", "on", "--compare", "--json", str(tmp_path / "g.json"))
    assert code == 0 and "torch reference: correct, not faster" in err
    stages = [line for line in err.splitlines() if line.startswith("spruce generate: ")]
    assert stages == ["spruce generate: timing dense (1 run, eager mode, each after a warm-up)",
                      "spruce generate: 14 linears block-sparse",   # on CUDA: "; tuning their kernels ..."
                      "spruce generate: timing block-sparse (1 run, eager mode, each after a warm-up)"]
    assert "block-sparse kernels on 14 linears (1 kept dense)" in out and "same tokens: yes" in out
    record = json.loads((tmp_path / "g.json").read_text())
    assert record["same_tokens"] is True and record["kernels"] is True and record["new_tokens"] == 10
    assert record["speedup"] > 0 and record["dense"]["tokens_per_second"] > 0
    assert record["text"] and out.startswith("The quick brown fox" + record["text"])
    assert dense_out.splitlines()[0] == out.splitlines()[0]  # the same text, dense and block-sparse
    # the static-cache greedy loop (graph mode without CUDA) gives the same tokens as HF generate
    code, graph_out, _ = run_cli(capsys, *base, "--kernels", "on", "--mode", "graph")
    assert code == 0 and graph_out.splitlines()[0] == dense_out.splitlines()[0]


def test_prompt_file(capsys, pruned_dir, tmp_path):
    (tmp_path / "p.txt").write_text("A small model learns\n")
    code, out, _ = run_cli(capsys, "generate", "--model", str(pruned_dir), "--prompt_file", str(tmp_path / "p.txt"),
                           "--max_new_tokens", "3")
    assert code == 0 and out.startswith("A small model learns")


@pytest.mark.parametrize("extra, message", [
    ([], "pass the prompt as --prompt TEXT or --prompt_file FILE"),
    (["--prompt", "a", "--prompt_file", "x.txt"], "(one of them)"),
    (["--prompt_file", "/nonexistent/p.txt"], "prompt file /nonexistent/p.txt does not exist"),
    (["--prompt", "the dog", "--mode", "compile"], "--mode compile needs a CUDA GPU"),
    (["--prompt", "the dog", "--max_new_tokens", "5000"], "exceeds the model's context (2048 tokens)"),
    (["--prompt", "the dog", "--compare", "--kernels", "off"], "--compare times the block-sparse kernels"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, pruned_dir, extra, message):
    code, out, err = run_cli(capsys, "generate", "--model", str(pruned_dir), *extra)
    assert code == 2 and message in err and err.count("\n") == 1 and not out


def test_a_dense_model_has_nothing_for_the_kernels(capsys, tiny_model_dir):
    code, _, err = run_cli(capsys, "generate", "--model", str(tiny_model_dir), "--prompt", "the dog",
                           "--kernels", "on", "--max_new_tokens", "2")
    assert code == 2 and "no layer was made block-sparse" in err


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["graph", "eager"])
def test_generation_on_the_gpu_kernels(capsys, pruned_dir, mode):
    code, out, _ = run_cli(capsys, "generate", "--model", str(pruned_dir), "--prompt", "The quick brown fox",
                           "--max_new_tokens", "8", "--mode", mode, "--compare")
    assert code == 0 and "bfloat16 on cuda" in out and "| block-sparse:" in out
