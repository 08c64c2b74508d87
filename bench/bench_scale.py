"""7B-class recovery on one GPU, and LoRA throughput on one and two: memory and tokens/s, one run.

    python -m bench.bench_scale --json scale.json                      # one GPU, about 4 minutes on an H200
    python -m bench.bench_scale --parts lora,reference --layers 8      # shorter
    torchrun --nproc_per_node 2 -m bench.bench_scale --json scale2.json  # 1 GPU, then 2 with DDP: efficiency
    python -m bench.bench_scale --tiny                                 # a 2-layer model, any machine, seconds

A Llama-2-7B-shaped model (hidden 4096, 32 layers, 32 heads, intermediate 11008, vocab 32000) with
random weights in bf16, trained on random tokens: it measures speed and memory honestly and
quality not at all. Parts:

  prune      Wanda 16x16 at 50% with the model on the CPU and one decoder layer at a time on the
             GPU (spruce.prune.prune_model with device='cuda'): seconds and peak GPU memory.
  lora       spruce's loop (spruce.recover.train): LoRA r=8 on q_proj,v_proj (and all linears), bf16
             weights and autocast, fused AdamW, sequence 1024, with and without gradient
             checkpointing: tokens/s and peak memory, timed after warm-up steps.
  masked     masked full fine-tuning of every weight with gradient checkpointing; pruned weights
             stay zero. bf16 weights, gradients and AdamW states (spruce's --dtype bfloat16 path: no
             fp32 master copy), so 7B needs about 7e9 x (2 + 2 + 4) bytes + masks.
  reference  the reference recipe's configuration, measured in the same run: Hugging Face Trainer
             + peft LoRA r=8 q_proj,v_proj, per-device batch 1, fp16 mixed precision (fp32 weights),
             sequence 1024 (bench_train.reference_trainer, after one short warm-up run).

Under torchrun with 2 processes only the lora part runs: rank 0 first measures one GPU alone, then
both train with DDP; the table gives per-GPU and global tokens/s and the scaling efficiency.
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time
import warnings

import torch


from bench.bench_train import reference_trainer
from bench.common import llama2_7b_config, write_json
from spruce.masks import zero_masks
from spruce.prune import prune_model
from spruce.recover.lora import attach_lora
from spruce.recover.parallel import Parallel, launch_env
from spruce.recover.train import TrainArgs, train

PARTS = ("prune", "lora", "masked", "reference")
warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation notices
GIB = 2 ** 30


def llama_config(layers: int, tiny: bool):
    if tiny:
        return llama2_7b_config(2, vocab_size=320, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                num_key_value_heads=4, tie_word_embeddings=False)
    return llama2_7b_config(layers, rms_norm_eps=1e-5, tie_word_embeddings=False)


def build(config, dtype: torch.dtype, device: torch.device):
    """Random weights, initialised directly on `device` (seconds for 7B on a GPU)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.config.use_cache = False
    return model.eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / GIB, 2) if device.type == "cuda" else None


def tokens(vocab: int, n: int, seq: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))


def timed_train(model, vocab, seq, batch, steps, warmup, device, masks=None, parallel=None) -> dict:
    """Warm-up steps, then `steps` timed optimizer steps of spruce's loop; tokens/s and peak memory."""
    world = parallel.world if parallel else 1
    blocks = tokens(vocab, batch * world * (steps + warmup), seq)
    quiet = {"say": lambda *_: None, "progress": False, "parallel": parallel}
    reset_peak(device)
    train(model, blocks, TrainArgs(steps=warmup, lr=1e-5, batch_size=batch, logging_steps=warmup, seed=1,
                                   bf16=device.type == "cuda"), masks=masks, **quiet)
    sync(device)
    start = time.time()
    train(model, blocks, TrainArgs(steps=steps, lr=1e-5, batch_size=batch, logging_steps=steps, seed=2,
                                   bf16=device.type == "cuda"), masks=masks, **quiet)
    sync(device)
    seconds = time.time() - start
    rate = steps * batch * world * seq / seconds
    return {"tokens_per_s": rate, "tokens_per_s_per_gpu": rate / world, "seconds": round(seconds, 2),
            "steps": steps, "micro_batch": batch, "processes": world, "peak_gib": peak_gib(device)}


def guarded(name: str, fn, device) -> dict:
    """Run one measurement; an out-of-memory error becomes a row that says so."""
    try:
        return fn()
    except torch.cuda.OutOfMemoryError:
        reset_peak(device)
        return {"error": f"out of memory ({name})"}


def set_checkpointing(model, on: bool) -> None:
    if on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def part_prune(model, config, a, device) -> dict:
    model.to("cpu")
    reset_peak(device)
    samples = tokens(config.vocab_size, a.nsamples, a.calib_seqlen, seed=3)
    start = time.time()
    info = prune_model(model, "wanda", "16x16", 0.5, samples=samples, device=device, batch_size=8,
                       progress=False)
    sync(device)
    return {"part": "prune", "recipe": f"wanda 16x16 50%, {a.nsamples} x {a.calib_seqlen} tokens, model on CPU, "
                                       "one layer on the GPU",
            "seconds": round(time.time() - start, 1), "peak_gib": peak_gib(device),
            "measured_sparsity": info.get("measured_sparsity")}


def lora_rows(model, config, a, device) -> list[dict]:
    rows = []
    for targets, checkpointing, batch in a.lora_configs:
        set_checkpointing(model, checkpointing)
        peft_model = attach_lora(model, 8, 16, 0.05, targets)
        row = guarded("lora", lambda: timed_train(peft_model, config.vocab_size, a.seq, batch, a.steps, a.warmup,
                                                  device), device)
        model = peft_model.unload()
        rows.append({"part": "lora", "recipe": f"spruce LoRA r=8 {targets}, bf16, batch {batch}"
                                               f"{', grad ckpt' if checkpointing else ''}", **row})
    set_checkpointing(model, False)
    return rows


def part_masked(model, config, a, device) -> list[dict]:
    rows = []
    for p in model.parameters():
        p.requires_grad_(True)
    masks = {f"{n}.weight": m for n, m in zero_masks(model).items()}
    set_checkpointing(model, True)
    for batch in a.masked_batches:
        row = guarded("masked", lambda: timed_train(model, config.vocab_size, a.seq, batch, a.steps, a.warmup,
                                                    device, masks=masks), device)
        rows.append({"part": "masked", "recipe": f"spruce masked full FT, bf16 weights/grads/AdamW states, "
                                                 f"batch {batch}, grad ckpt", **row})
    after = zero_masks(model)
    rows[-1]["zero_set_unchanged"] = all(torch.equal(masks[f"{n}.weight"], after[n]) for n in after)
    set_checkpointing(model, False)
    for p in model.parameters():
        p.requires_grad_(False)
        p.grad = None
    return rows


def part_reference(config, a, device) -> dict:
    make = lambda dtype: build(config, getattr(torch, dtype), device)  # noqa: E731
    eval_blocks = tokens(config.vocab_size, 2, a.seq, seed=5)
    reference_trainer(make, tokens(config.vocab_size, 2, a.seq, seed=6), eval_blocks, 1e-4, device.type)  # warm-up
    reset_peak(device)
    row = guarded("reference", lambda: reference_trainer(make, tokens(config.vocab_size, a.reference_steps, a.seq,
                                                                      seed=4), eval_blocks, 1e-4, device.type), device)
    if "seconds" in row:
        row["seconds"] = round(row["seconds"], 2)
    return {"part": "reference", **row, "recipe": "reference: HF Trainer + peft LoRA r=8 q,v, batch 1, fp16 AMP",
            "steps": a.reference_steps, "peak_gib": peak_gib(device)}


def parse_lora_configs(text: str) -> list[tuple[str, bool, int]]:
    """'q_proj,v_proj:ckpt:8;all-linear:ckpt:8' -> [(targets, gradient checkpointing, batch)]."""
    out = []
    for item in filter(None, (t.strip() for t in text.split(";"))):
        targets, mode, batch = item.split(":")
        out.append((targets, mode == "ckpt", int(batch)))
    return out


def print_table(rows, reference, card):
    print(f"\n{card}")
    print(f"{'part':<10} {'configuration':<66} {'tok/s':>9} {'x ref':>6} {'peak GiB':>9} {'seconds':>8}")
    for r in rows:
        rate = r.get("tokens_per_s")
        ratio = f"{rate / reference:.2f}" if rate and reference else ""
        peak = r.get("peak_gib")
        print(f"{r['part']:<10} {r['recipe'][:66]:<66} {f'{rate:,.0f}' if rate else r.get('error', ''):>9} "
              f"{ratio:>6} {'' if peak is None else f'{peak:.1f}':>9} {r.get('seconds', ''):>8}")
        if "zero_set_unchanged" in r:
            print(f"{'':<10} pruned weights still exactly zero after masked training: {r['zero_set_unchanged']}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="prune,lora,masked,reference", help=f"comma list of {', '.join(PARTS)}")
    parser.add_argument("--layers", type=int, default=32, help="decoder layers (32 is Llama-2-7B)")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer, hidden-64 model: checks the script anywhere")
    parser.add_argument("--seq", type=int, default=1024, help="tokens per training block (default: 1024)")
    parser.add_argument("--steps", type=int, default=6, help="timed optimizer steps per configuration")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    parser.add_argument("--lora", default="q_proj,v_proj:ckpt:8;q_proj,v_proj:plain:8;q_proj,v_proj:ckpt:16;"
                                          "all-linear:ckpt:8",
                        help="LoRA configurations TARGETS:ckpt|plain:BATCH separated by ';'")
    parser.add_argument("--masked_batches", default="4", help="micro-batches for masked full fine-tuning")
    parser.add_argument("--reference_steps", type=int, default=24, help="blocks (= steps) of the reference run")
    parser.add_argument("--nsamples", type=int, default=32, help="calibration samples for pruning")
    parser.add_argument("--calib_seqlen", type=int, default=1024)
    parser.add_argument("--json", help="write every row here")
    a = parser.parse_args()
    a.lora_configs = parse_lora_configs(a.lora)
    a.masked_batches = [int(b) for b in a.masked_batches.split(",")]
    parts = [p.strip() for p in a.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    if a.tiny:
        a.seq = min(a.seq, 64)
        a.nsamples, a.calib_seqlen = min(a.nsamples, 4), min(a.calib_seqlen, 64)
    config = llama_config(a.layers, a.tiny)
    world = launch_env()[1]
    if world > 1:
        return scaling(config, a)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    card = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    shape = "tiny 2-layer" if a.tiny else f"Llama-2-7B-shaped ({a.layers} layers)"
    print(f"{shape} random model, bf16, sequence {a.seq}, on {card}", flush=True)
    rows, started = [], time.time()
    model = None
    if any(p in parts for p in ("prune", "lora", "masked")):
        start = time.time()
        model = build(config, torch.bfloat16, device)
        print(f"built in {time.time() - start:.1f} s", flush=True)
    if "prune" in parts:
        rows.append(part_prune(model, config, a, device))
        print(f"prune: {rows[-1]['seconds']} s, peak {rows[-1]['peak_gib']} GiB", flush=True)
    if model is not None:
        model.to(device)
    if "lora" in parts:
        rows += lora_rows(model, config, a, device)
        print("lora: done", flush=True)
    if "masked" in parts:
        rows += part_masked(model, config, a, device)
        print("masked: done", flush=True)
    del model
    reset_peak(device)
    reference = None
    if "reference" in parts:
        with tempfile.TemporaryDirectory() as tmp:
            cwd = os.getcwd()
            os.chdir(tmp)  # the Trainer writes its run folder here
            try:
                rows.append(part_reference(config, a, device))
            finally:
                os.chdir(cwd)
        reference = rows[-1].get("tokens_per_s")
    for r in rows:
        if reference and r.get("tokens_per_s"):
            r["x_reference"] = round(r["tokens_per_s"] / reference, 2)
    print_table(rows, reference, f"{shape}, sequence {a.seq}, {card}, {time.time() - started:.0f} s in all")
    if a.json:
        write_json(a.json, {"card": card, "torch": torch.__version__, "shape": shape, "seq": a.seq, "rows": rows},
                   quiet=True)


def scaling(config, a):
    """torchrun: rank 0 measures one GPU alone, then every process trains with DDP."""
    parallel = Parallel.from_env("auto")
    device = parallel.device
    if device.type == "cuda":
        torch.cuda.set_device(device)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    targets, checkpointing, batch = a.lora_configs[0]
    model = build(config, torch.bfloat16, device)
    set_checkpointing(model, checkpointing)
    model = attach_lora(model, 8, 16, 0.05, targets)
    rows = []
    if parallel.is_main:
        one = guarded("one GPU", lambda: timed_train(model, config.vocab_size, a.seq, batch, a.steps, a.warmup,
                                                     device), device)
        rows.append({"part": "lora", "recipe": f"1 GPU: LoRA r=8 {targets}, batch {batch}", **one})
    parallel.barrier()
    wrapped = parallel.wrap(model)
    many = guarded("DDP", lambda: timed_train(wrapped, config.vocab_size, a.seq, batch, a.steps, a.warmup, device,
                                              parallel=parallel), device)
    if parallel.is_main:
        rows.append({"part": "lora", "recipe": f"{parallel.world} GPUs DDP: LoRA r=8 {targets}, batch {batch}/GPU",
                     **many})
        one_rate, many_rate = rows[0].get("tokens_per_s"), many.get("tokens_per_s")
        print_table(rows, None, f"{card} x {parallel.world}, sequence {a.seq}")
        if one_rate and many_rate:
            efficiency = many_rate / (parallel.world * one_rate)
            print(f"global {many_rate:,.0f} tok/s, per GPU {many_rate / parallel.world:,.0f} tok/s; one GPU "
                  f"{one_rate:,.0f} tok/s; scaling efficiency {efficiency:.1%}")
            rows.append({"part": "scaling", "recipe": "efficiency = global / (GPUs x one GPU)",
                         "efficiency": efficiency})
        if a.json:
            write_json(a.json, {"card": card, "processes": parallel.world, "rows": rows}, quiet=True)
    parallel.barrier()
    parallel.close()


if __name__ == "__main__":
    main()
