"""LoRA training throughput and quality: the reference recipe against spruce's loop, same run.

    python -m bench.bench_train --model smollm2-135m --pruned out/pruned --blocks 256 --json train.json

The reference recipe is what the Wanda LoRA workflow runs: Hugging Face Trainer + peft, LoRA
r=8 on q_proj and v_proj, batch 1 of 1024 tokens, lr 1e-4, fp16 mixed precision. spruce's
configuration trains the same adapter on the same blocks with bf16 weights and autocast,
larger micro-batches, a higher learning rate for the fewer steps and a fused AdamW. Both see the
same number of training tokens; the table reports tokens/s, the ratio, and the validation
perplexity each one reaches.
"""

from __future__ import annotations

import argparse
import math
import time

import torch


from bench.common import write_json
from spruce import data
from spruce.models import load_model
from spruce.recover.lora import attach_lora
from spruce.recover.train import TrainArgs, eval_loss, train


def model_factory(src: str, random_init: bool, device: str):
    """A function dtype -> model: the model at `src`, or one of its shape with random weights."""
    def make(dtype: str):
        if not random_init:
            return load_model(src, device=device, dtype=dtype)[0]
        from transformers import AutoConfig, AutoModelForCausalLM

        torch.manual_seed(0)
        config = AutoConfig.from_pretrained(src)
        return AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype)).to(device)
    return make


def reference_trainer(make, blocks, eval_blocks, lr, device):
    """HF Trainer + peft, batch 1, fp16 AMP: the reference recipe's configuration."""
    from transformers import Trainer, TrainingArguments

    model = make("float32")
    model = attach_lora(model, 8, 16, 0.05, "q_proj,v_proj")

    class Blocks(torch.utils.data.Dataset):
        def __len__(self):
            return blocks.shape[0]

        def __getitem__(self, i):
            return {"input_ids": blocks[i], "labels": blocks[i]}

    args = TrainingArguments(output_dir="/tmp/spruce-bench-ref", per_device_train_batch_size=1, learning_rate=lr,
                             num_train_epochs=1, fp16=device == "cuda", logging_steps=50, save_strategy="no",
                             report_to=[], disable_tqdm=True, seed=0, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=Blocks())
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.time()
    trainer.train()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.time() - start
    loss = eval_loss(model, eval_blocks, 8)
    return {"recipe": "reference: HF Trainer + peft, batch 1, fp16 AMP, lr %g" % lr,
            "tokens_per_s": blocks.numel() / seconds, "seconds": seconds, "eval_ppl": math.exp(loss)}


def spruce_loop(make, blocks, eval_blocks, lr, batch, device, compile_model):
    model = make("bfloat16" if device == "cuda" else "float32")
    model = attach_lora(model, 8, 16, 0.05, "q_proj,v_proj")
    if compile_model:
        model = torch.compile(model)
    steps = blocks.shape[0] // batch
    args = TrainArgs(steps=steps, lr=lr, batch_size=batch, warmup_steps=max(1, steps // 10), scheduler="cosine",
                     logging_steps=max(1, steps // 4), seed=0, bf16=device == "cuda")
    warm = TrainArgs(steps=2, lr=lr, batch_size=batch, logging_steps=2, seed=1, bf16=device == "cuda")
    state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    train(model, blocks, warm, say=lambda *_: None, progress=False)  # compile / autotune outside the clock
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in state:
                p.copy_(state[n])
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.time()
    train(model, blocks, args, say=lambda *_: None, progress=False)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.time() - start
    loss = eval_loss(model, eval_blocks, 8, bf16=device == "cuda")
    return {"recipe": f"spruce: bf16, batch {batch}, lr {lr:g}, cosine{', compiled' if compile_model else ''}",
            "tokens_per_s": blocks.numel() / seconds, "seconds": seconds, "eval_ppl": math.exp(loss)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="tokenizer source (and model if --pruned is absent)")
    parser.add_argument("--pruned", help="pruned model folder to train (default: --model)")
    parser.add_argument("--corpus", default="sotu")
    parser.add_argument("--blocks", type=int, default=256, help="training blocks of 1024 tokens for each recipe")
    parser.add_argument("--eval_blocks", type=int, default=32)
    parser.add_argument("--batches", default="8,16", help="spruce micro-batch sizes to try")
    parser.add_argument("--compile", action="store_true", help="also try torch.compile")
    parser.add_argument("--random_init", action="store_true",
                        help="speed only: a model of --model's shape (a folder with config.json) with random "
                             "weights, trained on random tokens")
    parser.add_argument("--json", help="write all rows here")
    a = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    make = model_factory(a.pruned or a.model, a.random_init, device)
    if a.random_init:
        from transformers import AutoConfig

        vocab = AutoConfig.from_pretrained(a.model).vocab_size
        gen = torch.Generator().manual_seed(0)
        blocks = torch.randint(0, vocab, (a.blocks, 1024), generator=gen)
        eval_blocks = torch.randint(0, vocab, (a.eval_blocks, 1024), generator=gen)
    else:
        _, tok = load_model(a.model, device="cpu")
        blocks = data.training_blocks(a.corpus, tok, 1024, "train", a.blocks, seed=0)
        eval_blocks = data.training_blocks(a.corpus, tok, 1024, "validation", a.eval_blocks, seed=0)
    rows = [reference_trainer(make, blocks, eval_blocks, 1e-4, device)]
    for batch in [int(b) for b in a.batches.split(",")]:
        for compile_model in ([False, True] if a.compile else [False]):
            rows.append(spruce_loop(make, blocks, eval_blocks, 1e-3 * math.sqrt(batch / 8), batch, device, compile_model))
    base = rows[0]["tokens_per_s"]
    card = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    if a.json:
        write_json(a.json, {"card": card, "blocks": a.blocks, "rows": rows}, quiet=True)
    print(f"\nLoRA training, {a.blocks} blocks x 1024 tokens of {a.corpus}/train, on {card}")
    print(f"{'recipe':<62} {'tok/s':>9} {'x ref':>6} {'val ppl':>9}")
    for r in rows:
        print(f"{r['recipe']:<62} {r['tokens_per_s']:>9,.0f} {r['tokens_per_s'] / base:>6.2f} {r['eval_ppl']:>9.2f}")


if __name__ == "__main__":
    main()
