"""The error-contract table of docs/RESULTS.md: bad inputs and faults run through spruce.cli.main
in-process on tiny random models (tests/conftest.py), one Markdown row each.

    PYTHONPATH=. python -m tests.error_table > table.md

The first column groups the rows: 1-12 are the cases tests/test_reliability.py checks, + the others.
"""
import contextlib, errno, io, json, os, shutil, sys, tempfile
from pathlib import Path
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TQDM_DISABLE"] = "1"
import torch
from safetensors.torch import load_file, save_file
from tests.conftest import CORPUS, build_model, build_tokenizer
from spruce.cli import main

root = Path(tempfile.mkdtemp(prefix="errtable-"))
os.environ["SPRUCE_HOME"] = str(root / "home")
tok = build_tokenizer()
TINY = root / "tiny"; build_model(len(tok)).save_pretrained(TINY); tok.save_pretrained(TINY)
CORPUS_F = root / "corpus.txt"; CORPUS_F.write_text((CORPUS + "\n") * 40)
def silent(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try: code = main([str(a) for a in argv])
        except SystemExit as e: code = e.code
    return code, out.getvalue(), err.getvalue()
PRUNED = root / "pruned"
assert silent(["prune", "--model", TINY, "--prune_method", "wanda", "--sparsity_type", "16x16", "--calib_dataset",
               CORPUS_F, "--nsamples", "2", "--seqlen", "32", "--save_model", PRUNED])[0] == 0
ADAPTER = root / "adapter"
FT = ["finetune", "--model_name_or_path", PRUNED, "--train_file", CORPUS_F, "--block_size", "32", "--do_train",
      "--max_steps", "2"]
assert silent(FT + ["--save_steps", "1", "--output_dir", ADAPTER])[0] == 0
def copy(name, edit=None, damage=None):
    d = root / name
    shutil.copytree(TINY, d)
    if edit:
        t = load_file(d / "model.safetensors"); edit(t); save_file(t, d / "model.safetensors", metadata={"format": "pt"})
    if damage: damage(d)
    return d
def drop(t): t.pop("model.layers.0.mlp.up_proj.weight"); t.pop("model.layers.1.self_attn.q_proj.weight")
def pickle_model(d):
    class Evil:
        def __reduce__(self): return (os.system, ("true",))
    (d / "model.safetensors").unlink(); torch.save({"x": Evil()}, d / "pytorch_model.bin")
MISS = copy("missing", drop)
EXTRA = copy("extra", lambda t: t.__setitem__("extra.weight", torch.zeros(2)))
SHAPE = copy("shape", lambda t: t.__setitem__("model.norm.weight", torch.ones(3)))
BADJSON = copy("badjson", damage=lambda d: (d / "config.json").write_text("{not json"))
TRUNC = copy("trunc", damage=lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:5000]))
NOW = copy("noweights", damage=lambda d: (d / "model.safetensors").unlink())
PICK = copy("pickle", damage=pickle_model)
BERT = root / "bert"; BERT.mkdir(); (BERT / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"], "vocab_size": 320, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}))
NOTOK = root / "notok"; build_model(len(tok)).save_pretrained(NOTOK)
BIN = root / "binary.txt"; BIN.write_bytes(bytes(range(256)) * 20)
EMPTY = root / "empty.txt"; EMPTY.write_text("\n  \n")
SHORT = root / "short.txt"; SHORT.write_text("hello world")
FILE = root / "a-file"; FILE.write_text("x")
CKPT = root / "interrupted"; (CKPT / "checkpoint-2").mkdir(parents=True); (CKPT / "metrics.jsonl").write_text("")
TA = root / "trunc-adapter"; shutil.copytree(ADAPTER, TA); (TA / "adapter_model.safetensors").write_bytes((TA / "adapter_model.safetensors").read_bytes()[:900])
BA = root / "bad-adapter-config"; shutil.copytree(ADAPTER, BA); (BA / "adapter_config.json").write_text("{broken")
RES = root / "resume-r4"; shutil.copytree(ADAPTER, RES)
RECIPE = Path("spruce/recipes/smollm2-block16.yaml")
E = ["eval", "--dataset", CORPUS_F, "--seqlen", "32", "--max_windows", "2", "--model"]
O = lambda n: root / "out" / n
cases = [
 ("1", "model safetensors with two tensors deleted", E + [MISS]),
 ("1", "model safetensors with a tensor the model lacks", E + [EXTRA]),
 ("1", "model safetensors with a tensor of another shape", E + [SHAPE]),
 ("1", "prune a model with two tensors deleted", ["prune", "--model", MISS, "--prune_method", "magnitude", "--save_model", O("p1")]),
 ("2", "a BERT folder (config only)", E + [BERT]),
 ("3", "finetune into a folder holding checkpoint-2", FT + ["--output_dir", CKPT]),
 ("4", "prune --save_model under a file", ["prune", "--model", TINY, "--prune_method", "magnitude", "--save_model", FILE / "out"]),
 ("4", "eval --json under a file", E + [TINY, "--json", FILE / "r.json"]),
 ("4", "merge --output_dir under a file", ["merge", "--model", PRUNED, "--lora_weights", ADAPTER, "--output_dir", FILE / "m"]),
 ("4", "run with output_dir under a file", ["run", RECIPE, f"output_dir={FILE}/run"]),
 ("5", "config.json that is not JSON", E + [BADJSON]),
 ("5", "truncated model.safetensors", E + [TRUNC]),
 ("5", "folder with config.json and no weights", E + [NOW]),
 ("5", "pytorch_model.bin pickle refused by weights_only", E + [PICK]),
 ("5", "binary file as corpus", ["eval", "--model", TINY, "--dataset", BIN, "--seqlen", "32"]),
 ("5", "truncated adapter_model.safetensors", E + [PRUNED, "--lora_weights", TA]),
 ("12", "broken adapter_config.json", E + [PRUNED, "--lora_weights", BA]),
 ("6", "finetune --learning_rate -1", FT + ["--learning_rate", "-1", "--output_dir", O("f1")]),
 ("6", "finetune --lora_dropout 1.5", FT + ["--lora_dropout", "1.5", "--output_dir", O("f2")]),
 ("6", "finetune --lora_target_modules no_such_proj", FT + ["--lora_target_modules", "no_such_proj", "--output_dir", O("f3")]),
 ("6", "finetune --resume_from_checkpoint /no/such/checkpoint-3", FT + ["--resume_from_checkpoint", "/no/such/checkpoint-3", "--output_dir", O("f4")]),
 ("6", "resume a rank-8 checkpoint with --lora_r 4", FT + ["--lora_r", "4", "--resume_from_checkpoint", "latest", "--output_dir", RES]),
 ("12", "finetune --num_train_epochs 0", FT[:-2] + ["--num_train_epochs", "0", "--output_dir", O("f5")]),
 ("12", "finetune --train_file /no/such/corpus.txt", ["finetune", "--model_name_or_path", PRUNED, "--train_file", "/no/such/corpus.txt", "--do_train", "--output_dir", O("f6")]),
 ("7", "run ... prune.pattern=16", ["run", RECIPE, "prune.pattern=16"]),
 ("7", "run ... data.eval_windows=2.5", ["run", RECIPE, "data.eval_windows=2.5"]),
 ("7", "run ... recover.lr_scheduler_type=exponential", ["run", RECIPE, "recover.lr_scheduler_type=exponential"]),
 ("7", "run ... recover.lora_r=eight", ["run", RECIPE, "recover.lora_r=eight"]),
 ("+", "finetune --warmup_steps -3", FT + ["--warmup_steps", "-3", "--output_dir", O("f7")]),
 ("+", "finetune --distill_alpha 2 with a teacher", FT + ["--distill_alpha", "2", "--teacher_model", TINY, "--output_dir", O("f8")]),
 ("+", "finetune --lora_alpha 0", FT + ["--lora_alpha", "0", "--output_dir", O("f9")]),
 ("+", "finetune --learning_rate fast", FT + ["--learning_rate", "fast", "--output_dir", O("f10")]),
 ("+", "finetune --lora_r 2.5", FT + ["--lora_r", "2.5", "--output_dir", O("f11")]),
 ("+", "finetune --block_size 4096 (context 2048)", FT + ["--block_size", "4096", "--output_dir", O("f12")]),
 ("+", "finetune on a corpus shorter than one block", ["finetune", "--model_name_or_path", PRUNED, "--train_file", SHORT, "--block_size", "64", "--do_train", "--output_dir", O("f13")]),
 ("+", "finetune --global_batch_size 3 --per_device_train_batch_size 2", FT + ["--global_batch_size", "3", "--per_device_train_batch_size", "2", "--output_dir", O("f14")]),
 ("+", "finetune --teacher_model /no/such/model", FT + ["--teacher_model", "/no/such/model", "--output_dir", O("f15")]),
 ("+", "eval a folder without a tokenizer", E + [NOTOK]),
 ("+", "eval --json pointing at a folder", E + [TINY, "--json", root]),
 ("+", "eval --seqlen -5", ["eval", "--model", TINY, "--seqlen", "-5"]),
 ("+", "eval --seqlen 4096 (context 2048)", ["eval", "--model", TINY, "--dataset", CORPUS_F, "--seqlen", "4096"]),
 ("+", "eval on a corpus file of blank lines", ["eval", "--model", TINY, "--dataset", EMPTY, "--seqlen", "32"]),
 ("+", "eval --dataset sotu:abc+moby", ["eval", "--model", TINY, "--dataset", "sotu:abc+moby"]),
 ("+", "eval --lora_weights /no/such/adapter", E + [PRUNED, "--lora_weights", "/no/such/adapter"]),
 ("+", "merge --lora_weights of a model folder (not an adapter)", ["merge", "--model", PRUNED, "--lora_weights", TINY, "--output_dir", O("m2")]),
 ("+", "prune --sparsity_ratio 1.0", ["prune", "--model", TINY, "--sparsity_ratio", "1.0", "--save_model", O("p2")]),
 ("+", "prune --sparsity_type 48x48 on 64-wide layers", ["prune", "--model", TINY, "--sparsity_type", "48x48", "--calib_dataset", CORPUS_F, "--nsamples", "2", "--seqlen", "32", "--save_model", O("p3")]),
 ("+", "run a recipe that does not exist", ["run", "no-such.yaml"]),
 ("+", "run ... prune.no_such_key=1", ["run", RECIPE, "prune.no_such_key=1"]),
 ("+", "compare a folder that is not a run", ["compare", root / "nothing"]),
 ("+", "generate without --prompt", ["generate", "--model", TINY]),
]
def special():
    from transformers import PreTrainedModel
    import spruce.evaluate
    rows = []
    real = PreTrainedModel.save_pretrained
    def full(self, folder, **k):
        (Path(folder) / "model.safetensors").write_bytes(b"\0" * 1000); raise OSError(errno.ENOSPC, "No space left on device")
    PreTrainedModel.save_pretrained = full
    argv = ["prune", "--model", TINY, "--prune_method", "wanda", "--calib_dataset", CORPUS_F, "--nsamples", "2", "--seqlen", "32", "--state_every", "0", "--save_model", O("full")]
    rows.append(("4", "prune with the disk full during the save (ENOSPC raised by save_pretrained)", argv, *silent(argv), "out/ afterwards: " + str(sorted(p.name for p in (root / "out").iterdir()) if (root / "out").exists() else "[]")))
    PreTrainedModel.save_pretrained = real
    realppl = spruce.evaluate.perplexity
    def ctrlc(*a, **k): raise KeyboardInterrupt
    spruce.evaluate.perplexity = ctrlc
    argv = E + [TINY]
    rows.append(("+", "Ctrl-C during eval (KeyboardInterrupt in the perplexity loop)", argv, *silent(argv), ""))
    spruce.evaluate.perplexity = realppl
    stale = root / "out" / ".p9.partial-k1ll3d"; stale.mkdir(parents=True); (stale / "x").write_bytes(b"0" * 10)
    argv = ["prune", "--model", TINY, "--prune_method", "magnitude", "--save_model", O("p9")]
    r = silent(argv)
    rows.append(("9", "a stale .OUT.partial-* left by a killed save, then the same prune", argv, *r, f"stale folder still there: {stale.exists()}"))
    return rows
def short(a):
    s = str(a)
    for k, v in (("TINY", TINY), ("PRUNED", PRUNED), ("CORPUS", CORPUS_F), ("ADAPTER", ADAPTER), ("FILE", FILE), ("TMP", root)):
        s = s.replace(str(v), k)
    return s
print("| # | bad input or fault | command (abridged) | exit | message (last stderr line) |")
print("| --- | --- | --- | --- | --- |")
results = [(i, what, argv, *silent(argv), "") for i, what, argv in cases] + special()
for i, what, argv, code, out, err, note in results:
    lines = [l for l in err.strip().splitlines() if l.strip()]
    last = lines[-1] if lines else "(none)"
    if "Traceback" in err: last = "TRACEBACK: " + last
    cmd = "spruce " + " ".join(short(a) for a in argv)
    if len(cmd) > 110:
        words = cmd.split(" ")
        tail = ""
        for w in reversed(words[2:]):
            if len(tail) + len(w) > 70: break
            tail = w + (" " + tail if tail else "")
        cmd = " ".join(words[:2]) + " ... " + tail
    msg = short(last).replace("|", "\\|")
    if note: msg += f" ({short(note)})"
    print(f"| {i} | {what} | `{cmd}` | {code} | {msg} |")
print(f"\n{sum(1 for r in results if r[3] == 2)} of {len(results)} exit 2; tracebacks: {sum('Traceback' in r[5] for r in results)}", file=sys.stderr)
shutil.rmtree(root, ignore_errors=True)
