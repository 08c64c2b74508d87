"""`spruce generate`: greedy text from a (pruned) model, with its block-sparse layers running the
Triton kernels, timed; with `compare`, the same model dense in the same run, and the ratio.

Modes: "graph" (a static KV cache and, on CUDA, each one-token step replayed as a CUDA graph),
"compile" (the same step compiled by torch.compile first; CUDA only) and "eager" (Hugging Face
`generate`). Every timed generation follows one untimed warm-up of the same length, which also
tunes the kernels and captures the graph.
"""

from __future__ import annotations

import functools
import sys
import time
from dataclasses import dataclass

import torch

from .errors import SpruceError

MODES = ("graph", "compile", "eager")
KERNELS = ("auto", "on", "off")


@dataclass
class Timed:
    ids: torch.Tensor      # prompt and new tokens, [1, prompt + new]
    seconds: float
    new_tokens: int

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("inf")


class StaticGreedy:
    """Greedy decoding with a static KV cache; on CUDA the one-token step is a replayed CUDA graph.

    Replaying a captured step removes the per-layer Python and launch overhead that otherwise
    hides the kernels' time at batch 1-8. The cache keeps its own fill count on the device, so
    the captured step writes at the right place on every replay; positions are passed explicitly.
    """

    def __init__(self, model, batch: int, max_len: int, compile_backend: str | None = None):
        from transformers import StaticCache

        self.model = model
        self.device = next(model.parameters()).device
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        self.position = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        self.use_graph = self.device.type == "cuda"
        self.graph = None
        self.next_token = None
        # compile: torch.compile fuses what lies between the linears (norms, rotary embedding,
        # residual adds, the MLP's activation) before the step is captured; block-sparse layers
        # enter the compiled graph as one opaque op each (spruce::block_sparse_linear)
        self.step = self._step
        if compile_backend is not None:
            torch._dynamo.reset()
            self.step = torch.compile(self._step, backend=compile_backend)

    def _step(self) -> torch.Tensor:
        logits = self.model(input_ids=self.token, past_key_values=self.cache, position_ids=self.position,
                            use_cache=True).logits
        return logits[:, -1].argmax(-1)

    def _prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        self.cache.reset()
        prompt = input_ids.shape[1]
        positions = torch.arange(prompt, device=self.device)[None]
        logits = self.model(input_ids=input_ids, past_key_values=self.cache, position_ids=positions,
                            use_cache=True, logits_to_keep=1).logits
        self.position.fill_(prompt)
        return logits[:, -1].argmax(-1)

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
                self.next_token = self.step()
        except Exception:
            from .kernels.bsr import disable_pdl, pdl_enabled

            if not pdl_enabled(self.device):
                raise
            disable_pdl()  # capture without programmatic dependent launches
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.next_token = self.step()

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
        token = self._prefill(input_ids)
        if self.use_graph and self.graph is None:
            self._capture()
            token = self._prefill(input_ids)  # the warm-up steps wrote into the cache
        out = [token]
        for _ in range(new_tokens - 1):
            self.token.copy_(token[:, None])
            if self.use_graph:
                self.graph.replay()
                token = self.next_token.clone()
            else:
                token = self.step()
            out.append(token)
            self.position += 1
        return torch.cat([input_ids, torch.stack(out, dim=1)], dim=1)


def greedy_generator(model, mode: str, batch: int, prompt_tokens: int, new_tokens: int):
    """A function of the prompt ids that generates `new_tokens` greedily in the given mode."""
    if mode in ("graph", "compile"):
        greedy = StaticGreedy(model, batch, prompt_tokens + new_tokens,
                              compile_backend="inductor" if mode == "compile" else None)
        return functools.partial(greedy.generate, new_tokens=new_tokens)

    def hf_generate(ids):
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False)

    return hf_generate


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


def check_length(model, prompt_tokens: int, new_tokens: int) -> None:
    if prompt_tokens == 0:
        raise SpruceError("the prompt is empty; pass --prompt TEXT or --prompt_file FILE")
    if new_tokens < 1:
        raise SpruceError(f"--max_new_tokens must be at least 1, got {new_tokens}")
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and prompt_tokens + new_tokens > limit:
        raise SpruceError(f"the prompt ({prompt_tokens} tokens) plus --max_new_tokens {new_tokens} exceeds the "
                          f"model's context ({limit} tokens); shorten one of them")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def timed_greedy(model, ids: torch.Tensor, new_tokens: int, mode: str) -> Timed:
    """Greedy decoding of `new_tokens` after one untimed warm-up run of the same length."""
    generate = greedy_generator(model, mode, ids.shape[0], ids.shape[1], new_tokens)
    generate(ids)  # warm-up: kernel tuning, graph capture, compilation
    _sync(ids.device)
    start = time.perf_counter()
    out = generate(ids)
    _sync(ids.device)
    return Timed(out, time.perf_counter() - start, out.shape[1] - ids.shape[1])


def run_generate(model, tok, prompt: str, new_tokens: int, mode: str | None = None, kernels: str = "auto",
                 compare: bool = False, block_size: int = 16, say=print) -> dict:
    """Generate, print the text and the speed, and return a record (see module docstring)."""
    from .kernels import densify, sparsify

    device = next(model.parameters()).device
    mode = resolve_mode(mode, device)
    sparse = use_kernels(kernels, device)
    ids = tok(prompt, return_tensors="pt").input_ids.to(device)
    check_length(model, ids.shape[1], new_tokens)
    if not sparse and compare:
        raise SpruceError("--compare times the block-sparse kernels against dense; it needs --kernels on or auto "
                          "with a GPU")
    record: dict = {"prompt_tokens": int(ids.shape[1]), "new_tokens": new_tokens, "mode": mode,
                    "device": str(device), "dtype": str(model.dtype).replace("torch.", "")}
    dense = timed_greedy(model, ids, new_tokens, mode) if compare or not sparse else None
    if sparse:
        report = sparsify(model, block_size=block_size)
        record["swapped_layers"], record["kept_dense"] = len(report.swapped), len(report.kept)
        if device.type != "cuda":
            print(f"spruce: on {device.type} the block-sparse layers run the torch reference: correct, not faster",
                  file=sys.stderr)
        try:
            result = timed_greedy(model, ids, new_tokens, mode)
        finally:
            densify(model)
    else:
        result = dense
    new = result.ids[0, ids.shape[1]:].tolist()
    eos = tok.eos_token_id
    if eos is not None and eos in new:  # timed to the full length; the text ends where the model ended it
        new = new[:new.index(eos)]
    text = tok.decode(new, skip_special_tokens=True)
    record.update({"text": text, "seconds": round(result.seconds, 4),
                   "tokens_per_second": round(result.tokens_per_second, 2), "kernels": sparse})
    say(prompt + text)
    say("")
    what = (f"block-sparse kernels on {record['swapped_layers']} linears ({record['kept_dense']} kept dense)"
            if sparse else "dense")
    say(f"{result.new_tokens} new tokens in {result.seconds:.3f} s: {result.tokens_per_second:.1f} tokens/s "
        f"| {what} | {mode} mode, {record['dtype']} on {device}")
    if compare:
        same = torch.equal(dense.ids, result.ids)
        ratio = result.tokens_per_second / dense.tokens_per_second
        record["dense"] = {"seconds": round(dense.seconds, 4), "tokens_per_second": round(dense.tokens_per_second, 2)}
        record["speedup"], record["same_tokens"] = round(ratio, 3), same
        say(f"dense: {dense.tokens_per_second:.1f} tokens/s | block-sparse: {result.tokens_per_second:.1f} "
            f"tokens/s | {ratio:.2f}x | same tokens: {'yes' if same else 'no (rounding differs between kernels)'}")
    return record
