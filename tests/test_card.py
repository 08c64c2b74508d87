"""Model cards: every folder spruce saves describes itself in a README.md."""

from spruce.cli import main


def test_pruned_and_compressed_folders_carry_a_card(capsys, tiny_model_dir, corpus_file, tmp_path):
    pruned, compressed = tmp_path / "pruned", tmp_path / "small"
    argv = ["prune", "--model", str(tiny_model_dir), "--prune_method", "magnitude", "--sparsity_type", "16x16",
            "--calib_dataset", str(corpus_file), "--nsamples", "2", "--seqlen", "32",
            "--eval_dataset", str(corpus_file), "--save_model", str(pruned)]
    assert main(argv) == 0
    card = (pruned / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers") and "# pruned\n" in card
    for text in ("| method | magnitude |", "`16x16`", "| sparsity | 0.5000 measured (target 0.5) |",
                 f"| base model | `{tiny_model_dir}` |", "dense safetensors", "| pruned | ",
                 "spruce prune --model", "--save_model " + str(pruned)):
        assert text in card, text
    assert main(["compress", str(pruned), str(compressed)]) == 0
    card = (compressed / "README.md").read_text()
    assert "compressed: spruce-block-sparse version 1" in card and "import spruce" in card
    assert "spruce prune --model" in card and f"spruce compress {pruned} {compressed}" in card
    capsys.readouterr()


def test_merged_folder_card_has_the_recovered_perplexity(capsys, pruned_dir, corpus_file, tmp_path):
    out = tmp_path / "ft"
    argv = ["finetune", "--model_name_or_path", str(pruned_dir), "--train_file", str(corpus_file),
            "--validation_file", str(corpus_file), "--block_size", "32", "--do_train", "--do_eval",
            "--max_eval_samples", "4", "--mode", "masked-lora", "--max_steps", "1", "--report_to", "none",
            "--merge", "--output_dir", str(out)]
    assert main(argv) == 0
    card = (out / "merged" / "README.md").read_text()
    assert "| merged (masked-lora) | " in card and "/ validation | 32 x 4 |" in card
    assert "spruce finetune --model_name_or_path" in card
    capsys.readouterr()
