"""`spruce compress MODEL OUT`: a block-sparse pruned model stored as block values + block indices."""

from __future__ import annotations

from ..errors import SpruceError
from .common import EPILOG_MODELS, add_command


def add_parser(subparsers) -> None:
    p = add_command(subparsers, "compress", "store a block-sparse pruned model compactly: block values + block indices",
                    "Write MODEL (a pruned model, dense with zeros) as a compressed checkpoint in OUT: every decoder\n"
                    "linear with at least --min_sparsity zero blocks is stored in the kernels' block-sparse layout\n"
                    "(values of the kept blocks plus their block indices, in safetensors), everything else as it was;\n"
                    "config.json names the format and its version. After 'import spruce', plain\n"
                    "AutoModelForCausalLM.from_pretrained(OUT) builds the block-sparse layers directly (Triton\n"
                    "kernels on CUDA, the torch reference on CPU), and every spruce command accepts OUT.",
                    "Example: spruce compress out/pruned out/pruned-compressed\n\n" + EPILOG_MODELS)
    p.add_argument("model", metavar="MODEL", help="pruned model to compress (see below)")
    p.add_argument("output", metavar="OUT", help="folder to write")
    p.add_argument("--block_size", type=int, choices=[16, 32, 64],
                   help="stored block side (default: the tile of MODEL's sparsity.json pattern, else 16)")
    p.add_argument("--min_sparsity", type=float, default=0.3,
                   help="layers with fewer zero blocks than this stay dense (default: 0.3)")
    p.add_argument("--overwrite_output_dir", action="store_true", help="replace an existing OUT")


def run(args) -> None:
    from ..compress import compress_folder

    if not 0 <= args.min_sparsity < 1:
        raise SpruceError(f"--min_sparsity must be in [0, 1), got {args.min_sparsity}")
    r = compress_folder(args.model, args.output, args.block_size, args.min_sparsity, args.overwrite_output_dir)
    print(f"compressed {args.model}: {r['compressed_layers']} of {r['decoder_linears']} decoder linears stored "
          f"block-sparse ({r['block_size']}x{r['block_size']} blocks); {r['dense_bytes'] / 2**20:.1f} MiB dense -> "
          f"{r['compressed_bytes'] / 2**20:.1f} MiB ({r['compressed_bytes'] / r['dense_bytes']:.1%}); saved to {args.output}")
