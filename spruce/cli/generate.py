"""`spruce generate`: greedy text on the block-sparse kernels, with tokens/s."""

from __future__ import annotations

from ..errors import SpruceError
from ..outdir import write_json
from .common import EPILOG_MODELS, add_command, add_model_args, check_writable_outputs, positive_int


def add_parser(subparsers) -> None:
    p = add_command(subparsers, "generate", "greedy text from a pruned model on the block-sparse kernels, with tokens/s",
                    "Generate greedily from MODEL with every block-sparse decoder linear swapped for the Triton\n"
                    "kernels (spruce.kernels.sparsify), print the text and the tokens/s of a run timed after one\n"
                    "warm-up. --compare also times the same model dense in the same run and prints the ratio\n"
                    "and whether both produced the same tokens. On a CPU the kernels are off unless --kernels on\n"
                    "(the block-sparse layers then run the torch reference: correct, not faster).",
                    "Example: spruce generate --model out/merged --prompt 'The state of the union' --compare\n\n"
                    + EPILOG_MODELS)
    add_model_args(p, None, "bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--prompt", help="text to continue")
    p.add_argument("--prompt_file", metavar="FILE", help="read the prompt from FILE instead")
    p.add_argument("--max_new_tokens", type=positive_int, default=128, help="tokens to generate (default: 128)")
    p.add_argument("--kernels", choices=["auto", "on", "off"], default="auto",
                   help="block-sparse kernels: auto (on with a CUDA GPU), on, off (default: auto)")
    p.add_argument("--mode", choices=["graph", "compile", "eager", "hf-static"],
                   help="graph: static KV cache, each step a replayed CUDA graph; compile: the same step compiled "
                        "by torch.compile first (CUDA); eager: Hugging Face generate; hf-static: Hugging Face "
                        "generate with a static cache, its decode step compiled on CUDA (default: graph on CUDA, "
                        "eager on CPU)")
    p.add_argument("--block_size", type=int, default=16, choices=[16, 32, 64], help="kernel block size (default: 16)")
    p.add_argument("--compare", action="store_true", help="also time the dense model in the same run")
    p.add_argument("--prompt_tokens", type=positive_int, metavar="N",
                   help="also time the prompt's tokens repeated to N tokens (e.g. 2048): time to first token and "
                        "decode tokens/s")
    p.add_argument("--batch_sizes", type=positive_int, nargs="+", metavar="B",
                   help="also time these batch sizes, the same prompt in every row (e.g. 1 8)")
    p.add_argument("--dense_dispatch", choices=["on", "off"], default="on",
                   help="on: each block-sparse layer runs dense cuBLAS at the token counts where the tuner timed "
                        "dense faster on this GPU, so no layer is slower than dense; off: the kernel everywhere "
                        "(default: on)")
    p.add_argument("--json", metavar="PATH", help="also write the text, speeds and settings as JSON")


def run(args) -> None:
    from ..generate import run_generate
    from ..models import load_model, resolve_device
    from ..outdir import require_file

    if bool(args.prompt) == bool(args.prompt_file):
        raise SpruceError("pass the prompt as --prompt TEXT or --prompt_file FILE (one of them)")
    prompt = args.prompt or require_file(args.prompt_file, "prompt file").read_text().rstrip("\n")
    check_writable_outputs(args.json)
    device = resolve_device(args.device)
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    model, tok = load_model(args.model, device, dtype, args.trust_remote_code, args.tokenizer)
    record = run_generate(model, tok, prompt, args.max_new_tokens, args.mode, args.kernels, args.compare,
                          args.block_size, prompt_tokens=args.prompt_tokens, batch_sizes=args.batch_sizes,
                          dense_dispatch=args.dense_dispatch == "on")
    if args.json:
        write_json(args.json, {"model": args.model, **record})
