"""`spruce eval`: perplexity (and optionally zero-shot accuracy) of a model on one or more corpora."""

from __future__ import annotations

from ..assets import DEFAULT_CORPUS
from ..outdir import write_json
from .common import EPILOG_CORPORA, EPILOG_MODELS, add_command, add_model_args, check_writable_outputs, positive_int

# the seven zero-shot tasks of the Wanda paper's tables
ZERO_SHOT_TASKS = "boolq,rte,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa"


def add_parser(subparsers) -> None:
    p = add_command(subparsers, "eval", "perplexity of a model (optionally with a LoRA adapter) on a corpus",
                    "Measure perplexity by the Wanda / SparseGPT protocol: the split is joined with blank\n"
                    "lines, tokenized once and cut into non-overlapping windows of --seqlen tokens; the\n"
                    "result is exp(mean next-token loss). Also reports the share of zeros in the decoder\n"
                    "linear weights (the measured sparsity).",
                    EPILOG_MODELS + "\n" + EPILOG_CORPORA)
    add_model_args(p)
    p.add_argument("--lora_weights", metavar="ADAPTER", help="peft adapter folder to apply on top of MODEL")
    p.add_argument("--dataset", nargs="+", action="extend", metavar="CORPUS",
                   help=f"corpus, or several (--dataset sotu moby): one model load, one line each (default: {DEFAULT_CORPUS})")
    p.add_argument("--split", default="test", choices=["train", "validation", "test"], help="split (default: test)")
    p.add_argument("--seqlen", "--ctx_length", type=positive_int, default=1024,
                   help="tokens per window (default: 1024; the Wanda LoRA evaluate script's --ctx_length)")
    p.add_argument("--max_windows", type=positive_int, help="use only the first N windows")
    p.add_argument("--batch_size", type=positive_int, default=1, help="windows per forward pass (default: 1)")
    p.add_argument("--json", metavar="PATH", help="also write the result as JSON to PATH")
    p.add_argument("--tasks", metavar="T1,T2",
                   help="also run zero-shot tasks through lm-evaluation-harness (if installed), e.g. "
                        f"{ZERO_SHOT_TASKS}")
    p.add_argument("--tasks_limit", type=positive_int, help="at most N examples per zero-shot task")
    p.add_argument("--eval_zero_shot", action="store_true",
                   help=f"the Wanda evaluate scripts' flag: --tasks {ZERO_SHOT_TASKS}")


def run(args) -> None:
    from .. import data
    from ..evaluate import perplexity
    from ..masks import overall_sparsity
    from ..models import check_context, load_model
    from ..recover.lora import load_adapter

    datasets = args.dataset or [DEFAULT_CORPUS]
    for spec in datasets:
        data.check_corpus(spec)
    check_writable_outputs(args.json)
    if args.lora_weights:
        from ..recover.lora import check_adapter_files

        check_adapter_files(args.lora_weights)  # before the model loads
    if args.eval_zero_shot and not args.tasks:
        args.tasks = ZERO_SHOT_TASKS
    if args.tasks:
        from ..evaluate import require_lm_eval

        require_lm_eval()
    model, tok = load_model(args.model, args.device, args.dtype, args.trust_remote_code, args.tokenizer)
    check_context(model, args.seqlen, "--seqlen")
    sparsity = overall_sparsity(model)
    if args.lora_weights:
        model = load_adapter(model, args.lora_weights)
    name = f"{args.model}{' + ' + args.lora_weights if args.lora_weights else ''}"
    measured = []
    for spec in datasets:  # one model load, one line per corpus
        windows = data.eval_windows(spec, args.split, tok, args.seqlen, args.max_windows)
        result = perplexity(model, windows, args.batch_size)
        measured.append({"dataset": spec, "split": args.split, **result})
        print(f"perplexity {result['ppl']:.3f} | {name} on {spec}/{args.split} | seqlen {result['seqlen']} x "
              f"{result['windows']} windows ({result['tokens']:,} tokens) | sparsity {sparsity:.2%} | "
              f"{result['seconds']:.0f} s")
    # the first corpus at the top level (the one-corpus form), every corpus under "datasets"
    record = {"model": args.model, "lora_weights": args.lora_weights, **measured[0], "sparsity": sparsity,
              "dtype": args.dtype, "datasets": measured}
    if args.tasks:
        from ..evaluate import zero_shot

        scores = zero_shot(model, tok, [t.strip() for t in args.tasks.split(",") if t.strip()],
                           batch_size=args.batch_size, limit=args.tasks_limit)
        record["zero_shot"] = scores
        print("zero-shot accuracy | " + " | ".join(f"{t} {100 * a:.1f}" for t, a in scores.items()))
    if args.json:
        write_json(args.json, record)
