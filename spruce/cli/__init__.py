"""The `spruce` command: parse flags, call the entry functions, print results.

    spruce demo                                   # the whole path on the embedded model
    spruce eval --model smollm2-135m --dataset sotu --split test --seqlen 1024
    spruce prune --model smollm2-135m --prune_method wanda --sparsity_type 16x16 \\
        --sparsity_ratio 0.5 --nsamples 128 --calib_dataset sotu --save_model out/pruned
    spruce fetch                                  # fetch the embedded model and corpora

One module per command in this package, each with `add_parser(subparsers)` (its flags) and
`run(args)` (what it does); common.py holds the parser class, flag types and shared flags.
Errors a user can cause end in one line on stderr and exit status 2.
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings

from ..errors import SpruceError
from .common import Parser, formatter
from .finetune import finetune_args  # noqa: F401  (the flags-to-FinetuneArgs mapping, used by tests and tools)

# the commands in the order `spruce --help` lists them; each is the module of its name
COMMAND_NAMES = ("demo", "run", "compare", "eval", "prune", "compress", "finetune", "merge", "generate", "bench",
                 "fetch")
MODULES = {name: importlib.import_module(f"{__name__}.{name}") for name in COMMAND_NAMES}
COMMANDS = {name: module.run for name, module in MODULES.items()}


def build_parser() -> Parser:
    from .. import __version__

    parser = Parser(prog="spruce", formatter_class=formatter,
                    description="Prune language models into sparsity hardware can use (16x16 blocks, "
                                "unstructured), recover their quality with LoRA, and measure perplexity.",
                    epilog="Start with 'spruce demo'. Each command has its own --help.")
    parser.add_argument("--version", action="version", version=f"spruce {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    parser.commands = sub.choices  # for errors about a command's own flags
    for module in MODULES.values():
        module.add_parser(sub)
    return parser


def _quiet_libraries() -> None:
    """Keep library chatter off the terminal; spruce warnings print as one line each."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation notices
    warnings.showwarning = lambda message, *a, **k: print(f"spruce: warning: {message}", file=sys.stderr)


# what to lower when the GPU runs out of memory, in each command's own flags
OOM_ADVICE = {
    "eval": "lower --batch_size or --seqlen, or use --dtype bfloat16",
    "prune": "lower --calib_batch_size, --nsamples or --seqlen, or use --dtype bfloat16",
    "generate": "lower --max_new_tokens or the prompt's length",
    "finetune": "lower --per_device_train_batch_size (raise --gradient_accumulation_steps to keep the batch) "
                "or --block_size, or add --gradient_checkpointing or --bf16",
    "run": "lower prune.batch_size or recover.batch_size, or set dtype: bfloat16",
    "demo": "run it with --device cpu",
}


def _unknown_flags(parser, args, extra: list[str]) -> int:
    """One line for flags the command does not take, from the command's own parser, with the
    nearest flags it does take (a script written for another tool usually misspells by a little)."""
    import difflib

    command = parser.commands[args.command]
    if getattr(args, "bench", None) and hasattr(command, "commands"):
        command = command.commands[args.bench]
    known = [s for action in command._actions for s in action.option_strings]
    hints = []
    for flag in (e.split("=", 1)[0] for e in extra if e.startswith("--")):
        near = difflib.get_close_matches(flag, known, n=1, cutoff=0.75)
        if near:
            hints.append(f"{flag} -> {near[0]}?")
    hint = f"; did you mean {', '.join(hints)}" if hints else ""
    sys.stderr.write(f"{command.prog}: error: unrecognized arguments: {' '.join(extra)}{hint} "
                     f"(see '{command.prog} --help')\n")
    return 2


# MKL picks its CPU code path by processor: Intel and AMD CPUs then add up the same matrix
# product differently. Its AVX2 path is the same on both (and what MKL runs on AMD anyway), so
# spruce asks for it unless told otherwise; it must be set before torch first calls MKL.
REPRODUCIBLE_ENV = {"MKL_CBWR": "AVX2"}


def main(argv: list[str] | None = None) -> int:
    for key, value in REPRODUCIBLE_ENV.items():
        os.environ.setdefault(key, value)
    from ..card import set_command

    parser = build_parser()
    set_command(sys.argv[1:] if argv is None else list(argv))  # for the model cards of saved folders
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "any_flags", False):
        return _unknown_flags(parser, args, extra)
    try:
        _quiet_libraries()
        COMMANDS[args.command](args)
    except SpruceError as e:
        if os.environ.get("RANK", "0") == "0":  # several processes: rank 0 alone says it
            print(f"spruce {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"spruce {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        import torch

        if isinstance(e, torch.cuda.OutOfMemoryError):
            print(f"spruce {args.command}: error: the GPU ran out of memory; "
                  f"{OOM_ADVICE.get(args.command, OOM_ADVICE['eval'])}", file=sys.stderr)
            return 2
        raise
    return 0
