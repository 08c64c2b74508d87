"""Corpora, and the one tokenization path that cuts them into samples, blocks and windows.

A corpus spec is one of
  - an embedded corpus: `sotu` (State of the Union, split by year: train <= 1989,
    validation 1990-2000, test 2001-2021; [Applause]-style markers stripped) or `moby`
    (Moby-Dick, split by chapter);
  - a `datasets` corpus: `wikitext2`, `wikitext103` or `c4` (needs the package and network
    access or a local cache);
  - a local `.txt` file (the whole file is one document, used for every split) or `.jsonl`
    file (one document per line, from its "text" field);
  - `generated`: text sampled from the dense model itself (spruce.generated), a training source
    only (`spruce finetune --dataset_name generated`, recipes' `recover.corpus: generated`);
  - a weighted mix joined with `+`, for example `sotu:0.7+moby:0.3` (weights default to equal).

Every corpus is joined with blank lines and tokenized once (the Wanda / SparseGPT protocol);
the token stream then yields calibration samples, training blocks and evaluation windows.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from . import assets
from .errors import SpruceError

SPLITS = ("train", "validation", "test")
EMBEDDED = ("sotu", "moby")
HF_CORPORA = ("wikitext2", "wikitext103", "c4")
_ALIASES = {"wikitext": "wikitext2", "wikitext-2": "wikitext2", "wikitext-2-raw-v1": "wikitext2",
            "wikitext-103": "wikitext103", "wikitext-103-raw-v1": "wikitext103"}
KNOWN = EMBEDDED + HF_CORPORA
GENERATED = "generated"  # text the dense model writes (spruce.generated); read through `sources`

# Audience reactions and editorial notes in the SOTU transcripts; they are not speech.
_SOTU_MARKERS = re.compile(r"\s*\[(?:laughter|applause|missing text)\]", re.IGNORECASE)
SOTU_YEARS = {"train": (0, 1989), "validation": (1990, 2000), "test": (2001, 9999)}


@dataclass(frozen=True)
class MixPart:
    name: str
    weight: float


def parse_corpus(spec: str) -> list[MixPart]:
    """Parse `name[:weight]+name[:weight]...` into parts whose weights sum to 1."""
    if not spec or not spec.strip():
        raise SpruceError("empty corpus name; use sotu, moby, wikitext2, c4 or a .txt/.jsonl file")
    parts = []
    for piece in spec.split("+"):
        name, _, weight = piece.strip().rpartition(":") if _weighted(piece) else (piece.strip(), "", "")
        try:
            w = float(weight) if weight else 1.0
        except ValueError:
            raise SpruceError(f"bad mix weight '{weight}' in '{spec}'; write e.g. sotu:0.7+moby:0.3") from None
        if w <= 0:
            raise SpruceError(f"mix weight of '{name}' must be positive, got {w}")
        name = _ALIASES.get(name, name)
        if name not in KNOWN and name != GENERATED and not name.endswith((".txt", ".jsonl")):
            raise SpruceError(f"unknown corpus '{name}'; use one of {', '.join(KNOWN)}, "
                              "a .txt / .jsonl file, or a mix such as sotu+moby")
        parts.append(MixPart(name, w))
    total = sum(p.weight for p in parts)
    return [MixPart(p.name, p.weight / total) for p in parts]


def check_corpus(spec: str) -> list[MixPart]:
    """parse_corpus, and fail now (before a model is loaded) if a Hub corpus in it cannot be read."""
    parts = parse_corpus(spec)
    for part in parts:
        if part.name in HF_CORPORA:
            require_datasets(part.name)
        elif part.name not in KNOWN and part.name != GENERATED and not Path(part.name).expanduser().is_file():
            raise SpruceError(f"corpus file {Path(part.name).expanduser()} does not exist; check the path")
    return parts


def require_datasets(name: str) -> None:
    """Fail early, before any model is loaded, when a Hub corpus cannot be read for want of `datasets`."""
    import importlib.util

    if importlib.util.find_spec("datasets") is None:
        raise SpruceError(f"corpus '{name}' is read through the 'datasets' package, which is not installed: "
                          "pip install 'datasets==5.2.0' (or pip install -e '.[data]'); without it use sotu, moby "
                          "or a local .txt/.jsonl file")


def _weighted(piece: str) -> bool:
    head, sep, tail = piece.rpartition(":")
    return bool(sep) and bool(re.fullmatch(r"[-+0-9.eE]+", tail.strip()))


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise SpruceError(f"unknown split '{split}'; use train, validation or test")


def sotu_documents(split: str) -> list[str]:
    lo, hi = SOTU_YEARS[split]
    docs = []
    for path in sorted(assets.corpus_folder("sotu").glob("*.txt")):
        year = int(path.name[:4])
        if lo <= year <= hi:
            text = _SOTU_MARKERS.sub("", path.read_text(encoding="utf-8")).strip()
            docs.append(text)
    return docs


def _moby_order(path: Path) -> float:
    stem = path.stem
    if stem.startswith("chapter_"):
        return float(stem.split("_")[1])
    return {"etymology": -2, "extracts": -1, "epilogue": 1000}.get(stem, 2000)


def moby_documents(split: str) -> list[str]:
    """Moby-Dick by chapter: train = front matter + chapters 1-115, validation 116-125, test the rest."""
    bounds = {"train": (-10, 115), "validation": (116, 125), "test": (126, 1000)}[split]
    paths = sorted(assets.corpus_folder("moby").glob("*.txt"), key=_moby_order)
    return [p.read_text(encoding="utf-8").strip() for p in paths
            if bounds[0] <= _moby_order(p) <= bounds[1]]


def _datasets_documents(name: str, split: str) -> list[str]:
    offline = (f"corpus '{name}' could not be loaded: the Hugging Face Hub is unreachable and it is not in the "
               "local datasets cache; offline, use sotu, moby or a local .txt/.jsonl file")
    require_datasets(name)
    from datasets import load_dataset

    try:
        if name.startswith("wikitext"):
            config = "wikitext-2-raw-v1" if name == "wikitext2" else "wikitext-103-raw-v1"
            return list(load_dataset("wikitext", config, split=split)["text"])
        shard = {"train": "en/c4-train.00000-of-01024.json.gz",
                 "validation": "en/c4-validation.00000-of-00008.json.gz"}
        if split not in shard:
            raise SpruceError("c4 has train and validation splits only; use --split validation")
        data = load_dataset("allenai/c4", data_files={split: shard[split]}, split=split)
        return list(data["text"])
    except SpruceError:
        raise
    except Exception as e:  # datasets raises many types for an unreachable Hub
        raise SpruceError(f"{offline} ({type(e).__name__})") from None


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise SpruceError(f"corpus file {path} is not UTF-8 text (byte {e.start} cannot be decoded); give a "
                          ".txt or .jsonl file of text") from None
    except OSError as e:
        raise SpruceError(f"cannot read corpus file {path}: {e.strerror or type(e).__name__}") from None


def _file_documents(path: Path) -> list[str]:
    if not path.is_file():
        raise SpruceError(f"corpus file {path} does not exist; check the path")
    if path.suffix == ".jsonl":
        docs = []
        for i, line in enumerate(_read_text(path).splitlines(), 1):
            if not line.strip():
                continue
            try:
                docs.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise SpruceError(f"{path}:{i} is not a JSON object with a \"text\" field") from None
    else:
        docs = [_read_text(path)]
    if not any(d.strip() for d in docs):
        raise SpruceError(f"corpus file {path} holds no text; give a file with text in it")
    return docs


def documents(name: str, split: str) -> list[str]:
    """The documents of one (unmixed) corpus split."""
    _check_split(split)
    if name == "sotu":
        return sotu_documents(split)
    if name == "moby":
        return moby_documents(split)
    if name in HF_CORPORA:
        return _datasets_documents(name, split)
    return _file_documents(Path(name).expanduser())


def tokenize(tokenizer, docs: list[str]) -> torch.Tensor:
    """Join documents with blank lines and tokenize once: a 1-D LongTensor of token ids."""
    ids = tokenizer("\n\n".join(docs), return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def token_streams(spec: str, split: str, tokenizer, sources: dict | None = None) -> list[tuple[MixPart, torch.Tensor]]:
    """Tokenized streams of every part of a corpus spec, with their mix weights. `sources` maps a
    part name to a function split -> token stream (how `generated` text comes in)."""
    streams = []
    for part in parse_corpus(spec):
        if part.name in (sources or {}):
            stream = sources[part.name](split)
        elif part.name == GENERATED:
            raise SpruceError("corpus 'generated' is text sampled from the dense model for training only (spruce "
                              "finetune --dataset_name generated, or recover.corpus: generated); calibrate and "
                              "evaluate on a corpus such as sotu")
        else:
            stream = tokenize(tokenizer, documents(part.name, split))
        if stream.numel() == 0:
            raise SpruceError(f"corpus '{part.name}' split '{split}' holds no tokens")
        streams.append((part, stream))
    return streams


def cut_blocks(stream: torch.Tensor, length: int) -> torch.Tensor:
    """Non-overlapping blocks of `length` tokens, the tail dropped (run_clm's group_texts)."""
    n = stream.numel() // length
    return stream[: n * length].view(n, length)


def _mix_counts(parts: list[MixPart], total: int) -> list[int]:
    counts = [int(p.weight * total) for p in parts]
    for i in range(total - sum(counts)):  # hand out the rounding remainder, largest weight first
        counts[sorted(range(len(parts)), key=lambda j: -parts[j].weight)[i % len(parts)]] += 1
    return counts


def eval_windows(spec: str, split: str, tokenizer, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Evaluation windows (n, seqlen) by the Wanda protocol; a mix takes windows by weight."""
    streams = token_streams(spec, split, tokenizer)
    blocks = [cut_blocks(s, seqlen) for _, s in streams]
    if len(blocks) == 1:
        windows = blocks[0]
    else:
        available = sum(b.shape[0] for b in blocks) if max_windows is None else max_windows
        counts = _mix_counts([p for p, _ in streams], available)
        windows = torch.cat([b[:c] for b, c in zip(blocks, counts)])
    if windows.shape[0] == 0:
        raise SpruceError(f"corpus '{spec}' split '{split}' is shorter than one window of {seqlen} "
                          "tokens; lower --seqlen")
    return windows[:max_windows] if max_windows else windows


def calibration_samples(spec: str, tokenizer, nsamples: int, seqlen: int, seed: int = 0,
                        split: str = "train") -> torch.Tensor:
    """`nsamples` random windows of `seqlen` tokens from the train split, reproducible by seed."""
    gen = torch.Generator().manual_seed(seed)
    streams = token_streams(spec, split, tokenizer)
    capacity = sum(s.numel() // seqlen for _, s in streams)
    if capacity == 0:
        raise SpruceError(f"corpus '{spec}' is shorter than one sample of {seqlen} tokens; lower the seqlen")
    if nsamples > capacity:
        warnings.warn(f"nsamples ({nsamples}) is more than corpus '{spec}' holds at seqlen {seqlen} "
                      f"({capacity}); using {capacity} samples")
        nsamples = capacity
    samples = []
    for (part, stream), count in zip(streams, _mix_counts([p for p, _ in streams], nsamples)):
        starts = torch.randint(0, stream.numel() - seqlen + 1, (count,), generator=gen)
        samples += [stream[s: s + seqlen] for s in starts.tolist()]
    return torch.stack(samples)


def training_blocks(spec: str, tokenizer, block_size: int, split: str = "train",
                    max_samples: int | None = None, seed: int = 0,
                    limit_flag: str = "max_train_samples", sources: dict | None = None) -> torch.Tensor:
    """Training blocks (n, block_size), the run_clm way; a mix is sampled by weight."""
    streams = token_streams(spec, split, tokenizer, sources)
    blocks = [cut_blocks(s, block_size) for _, s in streams]
    available = sum(b.shape[0] for b in blocks)
    if available == 0:
        raise SpruceError(f"corpus '{spec}' split '{split}' is shorter than one block of {block_size} tokens")
    want = available if max_samples is None else max_samples
    if want > available:
        warnings.warn(f"{limit_flag} ({want}) is larger than dataset size ({available}); "
                      f"using all {available} samples")
        want = available
    if len(blocks) == 1:
        return blocks[0][:want]
    gen = torch.Generator().manual_seed(seed)
    chosen = []
    for (part, _), b, c in zip(streams, blocks, _mix_counts([p for p, _ in streams], want)):
        n = b.shape[0]
        if c and not n:
            raise SpruceError(f"corpus '{part.name}' split '{split}' is shorter than one block of {block_size} tokens, "
                              "but its mix weight asks for blocks; give it more text or lower the block size")
        if c > n:   # keep the weights: a part shorter than its share repeats, in fresh orders
            warnings.warn(f"{part.name} has {n} blocks of {block_size} tokens but its weight asks for {c}; "
                          f"its blocks repeat (about {c / n:.1f} times each)")
        idx = torch.cat([torch.randperm(n, generator=gen) for _ in range(-(-c // n))])[:c] if c else \
            torch.empty(0, dtype=torch.long)
        chosen.append(b[idx])
    return torch.cat(chosen)


# --- held-out evaluation: a corpus the recipe never calibrates or trains on --------------------

# the held-out corpus each in-domain corpus gets when none is named (ASSETS: moby for sotu)
DEFAULT_HELDOUT = {"sotu": "moby"}


def _part_key(name: str) -> str:
    """What identifies a corpus part for the overlap check: its name, or a file's resolved path."""
    return str(Path(name).expanduser().resolve()) if name.endswith((".txt", ".jsonl")) else name


def corpus_names(spec: str | None) -> set[str]:
    """The corpora a spec reads (mix weights dropped; files by resolved path)."""
    return {_part_key(p.name) for p in parse_corpus(spec)} if spec else set()


def default_heldout(used: list[str | None]) -> str | None:
    """The held-out corpus for a recipe whose calibration and training read the specs `used`:
    moby when all of that data is sotu (generated text aside), otherwise none."""
    names = set().union(*(corpus_names(s) for s in used if s)) - {GENERATED}
    return DEFAULT_HELDOUT.get(next(iter(names))) if len(names) == 1 else None


def check_heldout(heldout: str | None, used: dict[str, str | None]) -> None:
    """Refuse a held-out corpus that calibration or training reads (`used`: {what: spec})."""
    if not heldout:
        return
    held = corpus_names(heldout)
    for what, spec in used.items():
        common = held & corpus_names(spec)
        if common:
            raise SpruceError(f"the held-out corpus {', '.join(sorted(common))} is also in {what} ({spec}); a held-out "
                              "number needs text the recipe never saw: drop it there or set data.heldout to "
                              "another corpus (null turns it off)")
