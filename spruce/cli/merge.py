"""`spruce merge`: a LoRA adapter merged into its pruned base model, the zero set kept."""

from __future__ import annotations

from ..errors import SpruceError
from .common import EPILOG_MODELS, add_command, add_model_args


def add_parser(subparsers) -> None:
    p = add_command(subparsers, "merge", "merge a LoRA adapter into a pruned model, keeping its zeros",
                    "Merge a peft adapter into its pruned base model and save a plain Hugging Face folder\n"
                    "whose zero set equals the base model's, bit for bit. Plain peft merge_and_unload fills\n"
                    "the zeros in; this merge adds the update only on kept weights (exact for adapters\n"
                    "trained with --mode masked-lora).", EPILOG_MODELS)
    add_model_args(p)
    p.add_argument("--lora_weights", required=True, metavar="ADAPTER", help="peft adapter folder")
    p.add_argument("--output_dir", required=True, help="where to write the merged model")
    p.add_argument("--overwrite_output_dir", action="store_true", help="replace an existing --output_dir")


def run(args) -> None:
    import torch

    from ..masks import copy_sparsity_json, zero_masks
    from ..models import load_model, save_model
    from ..outdir import atomic_dir, check_output_dir
    from ..recover.lora import check_adapter_files, load_adapter, merge_keep_sparsity

    check_output_dir(args.output_dir, args.overwrite_output_dir)
    check_adapter_files(args.lora_weights)  # before the base model loads
    model, tok = load_model(args.model, args.device, args.dtype, args.trust_remote_code, args.tokenizer)
    before = zero_masks(model)
    merged = merge_keep_sparsity(load_adapter(model, args.lora_weights))
    after = zero_masks(merged)
    if not all(torch.equal(before[n], after[n]) for n in before):
        raise SpruceError("the merge changed the zero set; please report this with the adapter's config")
    with atomic_dir(args.output_dir) as folder:
        save_model(merged, tok, folder)
        copy_sparsity_json(args.model, folder)
    print(f"merged {args.lora_weights} into {args.model}: zero set unchanged; saved to {args.output_dir}")
