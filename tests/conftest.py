"""Tiny models and corpora built in-process: no downloads, seconds on 2 CPU cores."""

from __future__ import annotations

import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter on the CPU (tests/test_kernels.py).
# The switch is read when triton is first imported, and peft imports it, so it is set here first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

CORPUS = (
    "The quick brown fox jumps over the lazy dog. The dog sleeps in the sun while the fox runs.\n"
    "A small model learns the patterns of a small corpus. Pruning removes weights; recovery trains.\n"
    "Blocks of sixteen by sixteen weights suit the tensor cores of a GPU, so sparsity becomes speed.\n"
)


def pytest_collection_modifyitems(config, items):
    gpu = torch.cuda.is_available()
    slow = os.environ.get("SPRUCE_SLOW") == "1"
    for item in items:
        if "gpu" in item.keywords and not gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "slow" in item.keywords and not slow:
            item.add_marker(pytest.mark.skip(reason="slow; set SPRUCE_SLOW=1"))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch, request):
    """Tests never touch the user's cache, except those marked `assets` that read it."""
    if "assets" not in request.keywords:
        monkeypatch.setenv("SPRUCE_HOME", str(tmp_path_factory.getbasetemp() / "spruce-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def build_tokenizer():
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([CORPUS] * 4, vocab_size=320, min_frequency=1, show_progress=False,
                            special_tokens=["<|endoftext|>"])
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>")


def served(layers) -> int:
    """How many linears these block-sparse layers serve: a fused one serves each of its siblings."""
    return sum(len(getattr(layer, "names", ("",))) for layer in layers)


def build_model(vocab_size: int, hidden: int = 64, seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**{"vocab_size": vocab_size, "hidden_size": hidden, "intermediate_size": 2 * hidden,
                            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                            "max_position_embeddings": 2048, "tie_word_embeddings": False, **overrides})
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture
def tiny_model(tokenizer):
    return build_model(len(tokenizer))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny Llama folder (config, safetensors, tokenizer), as save_pretrained writes it."""
    tok = build_tokenizer()
    folder = tmp_path_factory.mktemp("tiny-llama")
    build_model(len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text((CORPUS + "\n") * 40)
    return path


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory):
    """A tiny Llama pruned to 50% in 16x16 blocks, saved as a HF folder."""
    from spruce.prune import prune_model

    tok = build_tokenizer()
    model = build_model(len(tok), seed=1)
    samples = torch.randint(0, len(tok), (4, 64), generator=torch.Generator().manual_seed(0))
    prune_model(model, "wanda", "16x16", 0.5, samples=samples, progress=False)
    folder = tmp_path_factory.mktemp("pruned")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
