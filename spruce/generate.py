"""`spruce generate`: greedy text from a (pruned) model, with its block-sparse layers running the
Triton kernels, timed; with `compare`, the same model dense in the same run, and the ratios.

Modes: "graph" (a static KV cache and, on CUDA, each one-token step replayed as a CUDA graph),
"compile" (the same step compiled by torch.compile first; CUDA only), "eager" (Hugging Face
`generate`) and "hf-static" (Hugging Face `generate` with a static cache, whose decode step it
compiles on CUDA). Every timed generation follows one untimed warm-up of the same length, which
also compiles and captures the graph. Each run is timed in two parts (`Speed`): time to first
token (the prompt's forward, prefill) and decode tokens/s; optionally also for the prompt
repeated to a given length at several batch sizes.

Never slower than dense: before the block-sparse runs, the kernels are tuned for every decode
batch and prefill length to be run with dense cuBLAS as a candidate (spruce.kernels.dispatch);
a layer runs dense where dense won, and the run prints which layers run sparse.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from dataclasses import dataclass

import torch

from .errors import SpruceError

MODES = ("graph", "compile", "eager", "hf-static")
KERNELS = ("auto", "on", "off")


class StaticGreedy:
    """Greedy decoding with a static KV cache; on CUDA the one-token step is a replayed CUDA graph.

    Replaying a captured step removes the per-layer Python and launch overhead that otherwise
    hides the kernels' time at batch 1-8. The cache keeps its own fill count on the device, so
    the captured step writes at the right place on every replay; positions are passed explicitly.
    With `logits`, `start` and `advance` return each step's last-position logits [batch, vocab]
    instead of the greedy token (the caller picks the token: the sampler of spruce.generated).
    With `compile_backend` (a torch.compile backend) the step and the prompt's forward are each
    compiled: the first prompt of a new length compiles again, from the second length on for any.
    """

    def __init__(self, model, batch: int, max_len: int, compile_backend: str | None = None, logits: bool = False):
        from transformers import StaticCache

        self.model = model
        self.device = next(model.parameters()).device
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        self.position = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        self.logits = logits
        self.use_graph = self.device.type == "cuda"
        self.graph = None
        self.next_out = None
        self.cache_ready = False
        # compile: torch.compile fuses what lies between the linears (norms, rotary embedding,
        # residual adds, the MLP's activation) in the step, before it is captured, and in the
        # prompt's forward, which eager spends as long in that work as in the linears; block-sparse
        # layers enter a compiled graph as one opaque op each (spruce::block_sparse_linear)
        self.compiled = compile_backend is not None
        self.step, self.prompt_forward = self._step, self._prompt_forward
        if self.compiled:
            torch._dynamo.reset()
            self.step = torch.compile(self._step, backend=compile_backend)
            self.prompt_forward = torch.compile(self._prompt_forward, backend=compile_backend)

    def _head(self, logits: torch.Tensor) -> torch.Tensor:
        return logits[:, -1] if self.logits else logits[:, -1].argmax(-1)

    def _step(self) -> torch.Tensor:
        return self._head(self.model(input_ids=self.token, past_key_values=self.cache, position_ids=self.position,
                                     use_cache=True).logits)

    def _prompt_forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, past_key_values=self.cache, position_ids=positions,
                          use_cache=True, logits_to_keep=1).logits

    def _prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        self.cache.reset()
        prompt = input_ids.shape[1]
        positions = torch.arange(prompt, device=self.device)[None]
        if self.compiled and not self.cache_ready:
            # one eager forward first allocates the cache's tensors (Hugging Face's static cache
            # does that on its first update), against which a graph compiled before would guard
            self._prompt_forward(input_ids, positions)
            self.cache.reset()
        self.cache_ready = True
        logits = self.prompt_forward(input_ids, positions)
        self.position.fill_(prompt)
        return self._head(logits)

    def _capture(self) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the capture (kernel tuning, cuBLAS handles)
            for _ in range(2):
                self.step()
        torch.cuda.current_stream().wait_stream(side)
        try:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.next_out = self.step()
        except Exception:
            from .kernels.bsr import disable_pdl, pdl_enabled

            if not pdl_enabled(self.device):
                raise
            disable_pdl()  # capture without programmatic dependent launches
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.next_out = self.step()

    def start(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The prompt's forward into a fresh cache (capturing the step on first use): the first
        token (or its logits)."""
        out = self._prefill(input_ids)
        if self.use_graph and self.graph is None:
            self._capture()
            out = self._prefill(input_ids)  # the warm-up steps wrote into the cache
        return out

    def advance(self, token: torch.Tensor) -> torch.Tensor:
        """Feed one token per row ([batch]): the next token (or its logits)."""
        self.token.copy_(token[:, None])
        if self.use_graph:
            self.graph.replay()
            out = self.next_out.clone()
        else:
            out = self.step()
        self.position += 1
        return out

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, new_tokens: int, times: dict | None = None) -> torch.Tensor:
        """Prompt and `new_tokens` greedy tokens; `times` (a dict) receives "prefill_s" (the prompt's
        forward and the first token) and "decode_s" (the other steps), measured on the host after a
        device synchronisation."""
        if times is not None:
            _sync(self.device)
            start = time.perf_counter()
        token = self.start(input_ids)
        if times is not None:
            _sync(self.device)
            times["prefill_s"] = time.perf_counter() - start
            start = time.perf_counter()
        out = [token]
        for _ in range(new_tokens - 1):
            token = self.advance(token)
            out.append(token)
        if times is not None:
            _sync(self.device)
            times["decode_s"] = time.perf_counter() - start
        return torch.cat([input_ids, torch.stack(out, dim=1)], dim=1)


def hf_generate(model, ids: torch.Tensor, new_tokens: int, static: bool = False) -> torch.Tensor:
    """Hugging Face `generate`, greedy, exactly `new_tokens`; static: a static KV cache, whose decode
    step Hugging Face compiles with torch.compile on CUDA ("reduce-overhead": CUDA graphs)."""
    extra = {"cache_implementation": "static"} if static else {}
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, **extra)


def resolve_mode(mode: str | None, device: torch.device) -> str:
    if mode is None:
        return "graph" if device.type == "cuda" else "eager"
    if mode not in MODES:
        raise SpruceError(f"unknown mode '{mode}'; use {', '.join(MODES)}")
    if mode == "compile" and device.type != "cuda":
        raise SpruceError("--mode compile needs a CUDA GPU; on a CPU use --mode eager or graph")
    return mode


def use_kernels(kernels: str, device: torch.device) -> bool:
    """auto: on with a CUDA GPU (on a CPU block-sparse layers run the torch reference, which is
    correct but slower than dense)."""
    if kernels not in KERNELS:
        raise SpruceError(f"--kernels must be one of {', '.join(KERNELS)}, not '{kernels}'")
    return kernels == "on" or (kernels == "auto" and device.type == "cuda")


def check_length(model, prompt_tokens: int, new_tokens: int, flag: str = "the prompt") -> None:
    if prompt_tokens == 0:
        raise SpruceError("the prompt is empty; pass --prompt TEXT or --prompt_file FILE")
    if new_tokens < 1:
        raise SpruceError(f"--max_new_tokens must be at least 1, got {new_tokens}")
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and prompt_tokens + new_tokens > limit:
        raise SpruceError(f"{flag} ({prompt_tokens} tokens) plus --max_new_tokens {new_tokens} exceeds the "
                          f"model's context ({limit} tokens); shorten one of them")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Speed:
    """One timed greedy generation, split into time to first token and decode."""

    ids: torch.Tensor       # prompts and new tokens, [batch, prompt + new]
    ttft_s: float           # time to first token: the prompt's forward (prefill) and the first token
    decode_s: float         # the other new_tokens - 1 steps
    new_tokens: int

    @property
    def batch(self) -> int:
        return self.ids.shape[0]

    @property
    def seconds(self) -> float:
        return self.ttft_s + self.decode_s

    @property
    def tokens_per_second(self) -> float:
        """New tokens of one sequence per second, end to end (prefill included)."""
        return self.new_tokens / self.seconds if self.seconds > 0 else float("inf")

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens per second over the whole batch in the decode steps (after the first token)."""
        steps = self.new_tokens - 1
        if steps < 1:
            return float("nan")
        return self.batch * steps / self.decode_s if self.decode_s > 0 else float("inf")


TTFT_REPEATS = 3  # time to first token: the median of this many prefills


@torch.no_grad()
def timed_speed(model, ids: torch.Tensor, new_tokens: int, mode: str, ttft_repeats: int = TTFT_REPEATS) -> Speed:
    """Greedy decoding of `new_tokens` after one untimed warm-up of the same length (kernel tuning,
    graph capture, compilation), timed in two parts. graph / compile: one timed generation, its
    prefill and its steps apart, the time to first token the median over it and `ttft_repeats` - 1
    more prefills. eager / hf-static (Hugging Face `generate`): the time to first token is the
    median of `ttft_repeats` generations of one token, decode what a full generation takes more."""
    device = ids.device
    if mode in ("graph", "compile"):
        greedy = StaticGreedy(model, ids.shape[0], ids.shape[1] + new_tokens,
                              compile_backend="inductor" if mode == "compile" else None)
        greedy.generate(ids, new_tokens)
        times: dict = {}
        out = greedy.generate(ids, new_tokens, times)
        prefills, decode_s = [times["prefill_s"]], times["decode_s"]
        for _ in range(ttft_repeats - 1):
            greedy.generate(ids, 1, times)
            prefills.append(times["prefill_s"])
        return Speed(out, statistics.median(prefills), decode_s, new_tokens)
    static = mode == "hf-static"
    hf_generate(model, ids, new_tokens, static)
    firsts = []
    for _ in range(ttft_repeats):
        _sync(device)
        start = time.perf_counter()
        hf_generate(model, ids, 1, static)
        _sync(device)
        firsts.append(time.perf_counter() - start)
    ttft = statistics.median(firsts)
    _sync(device)
    start = time.perf_counter()
    out = hf_generate(model, ids, new_tokens, static)
    _sync(device)
    total = time.perf_counter() - start
    return Speed(out, ttft, max(total - ttft, 0.0), new_tokens)


def speed_prompts(ids: torch.Tensor, prompt_tokens: int | None, batch_sizes) -> dict[int, torch.Tensor]:
    """{batch: [batch, prompt_tokens] ids}: the prompt's tokens repeated (or cut) to `prompt_tokens`
    (None: as they are), the same prompt in every row."""
    row = ids[0]
    length = prompt_tokens or row.numel()
    row = row.repeat(-(-length // row.numel()))[:length]
    return {b: row[None].repeat(b, 1) for b in batch_sizes}


def _release_compiled(model) -> None:
    """Forget compiled graphs (ours and the one Hugging Face `generate` keeps on the model), so a
    model whose layers were swapped compiles afresh."""
    torch._dynamo.reset()
    model.__dict__.pop("_compiled_call", None)


def measure_speeds(model, prompts: list[torch.Tensor], new_tokens: int, mode: str, sparse: bool = True,
                   block_size: int = 16, dense_dispatch: bool = True, compare: bool = True,
                   ttft_repeats: int = TTFT_REPEATS, on_sparse=None, note=lambda message: None,
                   fuse: bool = True) -> dict:
    """Time greedy generation of each batch of prompt ids in `prompts`: dense (when `compare` or not
    `sparse`), then block-sparse (when `sparse`), with the dense dispatch when `dense_dispatch`:
    every block-sparse layer keeps its dense weight while the tuner times the kernel against dense
    on this device for each decode batch and prefill length, then the layers where the kernel won
    everywhere drop the copy (spruce.kernels.dispatch). The model is dense again afterwards.

    Returns {"dense": [Speed per prompt], "sparse": [...], "sparsify": SparsifyReport, "dispatch":
    {"text", "table", "freed_bytes", "kept_dense_bytes", "dense_dispatch"}} (parts not run left out),
    and under "inspected" what `on_sparse(model)` returned, called on the block-sparse model after
    its timed runs (e.g. to read its memory and tuned configurations). `note(message)` hears of each
    stage as it starts (the first run of a mode compiles or captures, which can take minutes).
    `fuse`: q/k/v and gate/up run as one launch each (spruce.kernels.sparsify).
    """
    from .kernels import densify, sparsify
    from .kernels.dispatch import dispatch_table, dispatch_text, prepare_dispatch

    out: dict = {}
    runs = f"{len(prompts)} run{'s' if len(prompts) > 1 else ''}, {mode} mode, each after a warm-up"
    if compare or not sparse:
        _release_compiled(model)
        note(f"timing dense ({runs})")
        out["dense"] = [timed_speed(model, ids, new_tokens, mode, ttft_repeats) for ids in prompts]
    if not sparse:
        return out
    report = sparsify(model, block_size=block_size, dense_fallback=dense_dispatch, fuse=fuse)
    out["sparsify"] = report
    try:
        tuning = "; tuning their kernels on this device" if next(model.parameters()).is_cuda else ""
        note(f"{len(report.swapped)} linears block-sparse{tuning}")
        dispatch = prepare_dispatch(model, decode_tokens=[ids.shape[0] for ids in prompts],
                                    prefill_tokens=[ids.numel() for ids in prompts])
        table = dispatch_table(model, dispatch.launches)
        text = dispatch_text(table, len(report.kept))
        out["dispatch"] = {"text": text, "table": table, "freed_bytes": dispatch.freed_bytes,
                           "kept_dense_bytes": dispatch.kept_dense_bytes, "dense_dispatch": dense_dispatch}
        _release_compiled(model)
        note(f"timing block-sparse ({runs})")
        out["sparse"] = [timed_speed(model, ids, new_tokens, mode, ttft_repeats) for ids in prompts]
        if on_sparse is not None:
            out["inspected"] = on_sparse(model)
    finally:
        densify(model)
        _release_compiled(model)
    return out


def dispatch_line(dispatch: dict) -> str:
    """`dense dispatch: sparse: 180 of 224 linears at decode 1, ...; dense elsewhere` (or, without
    the dense dispatch, `kernel everywhere: ...`)."""
    head = "dense dispatch" if dispatch["dense_dispatch"] else "no dense dispatch (the kernel everywhere)"
    line = f"{head}: {dispatch['text']}"
    if dispatch["kept_dense_bytes"]:
        line += f"; dense copies kept: {dispatch['kept_dense_bytes'] / 2**20:.1f} MiB"
    return line


def speed_rows(speeds: dict, which=None) -> list[dict]:
    """One row per timed prompt (those at the indices `which`, None: all): batch, prompt length,
    time to first token and decode tokens/s, dense and block-sparse, their ratios (> 1: block-sparse
    is faster) and whether both generated the same tokens."""
    dense, sparse = speeds.get("dense", []), speeds.get("sparse", [])
    count = max(len(dense), len(sparse))
    rows = []
    for i in range(count) if which is None else which:
        d = dense[i] if dense else None
        s = sparse[i] if sparse else None
        run = d or s
        row = {"batch": run.batch, "prompt_tokens": run.ids.shape[1] - run.new_tokens, "new_tokens": run.new_tokens}
        for name, r in (("dense", d), ("sparse", s)):
            if r is not None:
                row[name] = {"ttft_ms": round(r.ttft_s * 1e3, 3),
                             "decode_tokens_per_second": round(r.decode_tokens_per_second, 2)}
        if d is not None and s is not None:
            row["ttft_speedup"] = round(d.ttft_s / s.ttft_s, 3) if s.ttft_s > 0 else None
            ratio = s.decode_tokens_per_second / d.decode_tokens_per_second
            row["decode_speedup"] = round(ratio, 3) if math.isfinite(ratio) else None
            row["same_tokens"] = torch.equal(d.ids, s.ids)
        rows.append(row)
    return rows


def format_speed_rows(rows: list[dict], mode: str) -> str:
    """The rows as a table: time to first token (ms, lower is better) and decode tokens/s."""
    lines = [f"speed, {mode} mode: time to first token (prefill) and decode, dense against block-sparse",
             f"{'batch':>5} {'prompt':>6} {'ttft dense ms':>13} {'ttft sparse ms':>14} {'x dense':>7} "
             f"{'decode dense tok/s':>18} {'decode sparse tok/s':>19} {'x dense':>7} {'same tokens':>11}"]
    for r in rows:
        d, s = r.get("dense", {}), r.get("sparse", {})
        same = {True: "yes", False: "no"}.get(r.get("same_tokens"), "")
        lines.append(f"{r['batch']:>5} {r['prompt_tokens']:>6} {_num(d.get('ttft_ms'), 13)} "
                     f"{_num(s.get('ttft_ms'), 14)} {_num(r.get('ttft_speedup'), 7)} "
                     f"{_num(d.get('decode_tokens_per_second'), 18)} {_num(s.get('decode_tokens_per_second'), 19)} "
                     f"{_num(r.get('decode_speedup'), 7)} {same:>11}")
    return "\n".join(lines)


def _num(value, width: int) -> str:
    if value is None:
        return " " * width
    return f"{value:>{width}.2f}"


def run_generate(model, tok, prompt: str, new_tokens: int, mode: str | None = None, kernels: str = "auto",
                 compare: bool = False, block_size: int = 16, say=print, prompt_tokens: int | None = None,
                 batch_sizes=None, dense_dispatch: bool = True) -> dict:
    """Generate, print the text and the speed, and return a record (see module docstring).

    The text continues `prompt` at batch 1. prompt_tokens / batch_sizes also time the prompt's
    tokens repeated to `prompt_tokens` tokens (e.g. 2048) at each batch size (e.g. 1 and 8): time to
    first token and decode tokens/s, dense against block-sparse with `compare`. dense_dispatch: the
    block-sparse layers run dense cuBLAS where the tuner timed dense faster (measure_speeds).
    """
    device = next(model.parameters()).device
    mode = resolve_mode(mode, device)
    sparse = use_kernels(kernels, device)
    ids = tok(prompt, return_tensors="pt").input_ids.to(device)
    check_length(model, ids.shape[1], new_tokens)
    if prompt_tokens is not None:
        if prompt_tokens < 1:
            raise SpruceError(f"--prompt_tokens must be at least 1, got {prompt_tokens}")
        check_length(model, prompt_tokens, new_tokens, "--prompt_tokens")
    batch_sizes = list(dict.fromkeys(batch_sizes or []))
    if any(b < 1 for b in batch_sizes):
        raise SpruceError(f"--batch_sizes must be positive, got {batch_sizes}")
    if not sparse and compare:
        raise SpruceError("--compare times the block-sparse kernels against dense; it needs --kernels on or auto "
                          "with a GPU")
    # prompt 0: the text, at batch 1; then the timed prompts at each batch size
    timed = speed_prompts(ids, prompt_tokens, batch_sizes or [1]) if batch_sizes or prompt_tokens else {}
    prompts = [ids] + [p for p in timed.values() if not torch.equal(p, ids)]
    which = [next(i for i, p in enumerate(prompts) if torch.equal(p, t)) for t in timed.values()]
    record: dict = {"prompt_tokens": int(ids.shape[1]), "new_tokens": new_tokens, "mode": mode,
                    "device": str(device), "dtype": str(model.dtype).replace("torch.", "")}
    if sparse and device.type != "cuda":
        print(f"spruce: on {device.type} the block-sparse layers run the torch reference: correct, not faster",
              file=sys.stderr)
    speeds = measure_speeds(model, prompts, new_tokens, mode, sparse, block_size, dense_dispatch, compare,
                            note=lambda message: print(f"spruce generate: {message}", file=sys.stderr))
    result = speeds["sparse"][0] if sparse else speeds["dense"][0]
    if sparse:
        report = speeds["sparsify"]
        record["swapped_layers"], record["kept_dense"] = len(report.swapped), len(report.kept)
        record["dispatch"] = speeds["dispatch"]
    new = result.ids[0, ids.shape[1]:].tolist()
    eos = tok.eos_token_id
    if eos is not None and eos in new:  # timed to the full length; the text ends where the model ended it
        new = new[:new.index(eos)]
    text = tok.decode(new, skip_special_tokens=True)
    record.update({"text": text, "seconds": round(result.seconds, 4),
                   "tokens_per_second": round(result.tokens_per_second, 2), "kernels": sparse,
                   "ttft_ms": round(result.ttft_s * 1e3, 3),
                   "decode_tokens_per_second": round(result.decode_tokens_per_second, 2)})
    say(prompt + text)
    say("")
    what = (f"block-sparse kernels on {record['swapped_layers']} linears ({record['kept_dense']} kept dense)"
            if sparse else "dense")
    say(f"{result.new_tokens} new tokens in {result.seconds:.3f} s: {result.tokens_per_second:.1f} tokens/s "
        f"| {what} | {mode} mode, {record['dtype']} on {device}")
    say(f"time to first token {result.ttft_s * 1e3:.1f} ms ({ids.shape[1]} prompt tokens), then "
        f"{result.decode_tokens_per_second:.1f} tokens/s decode")
    if sparse:
        say(dispatch_line(speeds["dispatch"]))
    if compare:
        dense = speeds["dense"][0]
        same = torch.equal(dense.ids, result.ids)
        ratio = result.tokens_per_second / dense.tokens_per_second
        record["dense"] = {"seconds": round(dense.seconds, 4), "tokens_per_second": round(dense.tokens_per_second, 2),
                           "ttft_ms": round(dense.ttft_s * 1e3, 3),
                           "decode_tokens_per_second": round(dense.decode_tokens_per_second, 2)}
        record["speedup"], record["same_tokens"] = round(ratio, 3), same
        say(f"dense: {dense.tokens_per_second:.1f} tokens/s | block-sparse: {result.tokens_per_second:.1f} "
            f"tokens/s | {ratio:.2f}x | same tokens: {'yes' if same else 'no (rounding differs between kernels)'}")
    if timed:
        record["speed"] = speed_rows(speeds, which)
        say(format_speed_rows(record["speed"], mode))
    return record
