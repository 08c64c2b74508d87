"""Both quality columns in `spruce finetune`: in-domain (the training corpus's validation blocks)
and held-out (the validation blocks of a corpus training never reads), each also against the
dense teacher when one is given.

    spruce finetune --model_name_or_path out/pruned --dataset_name sotu --heldout_dataset moby \\
        --teacher_model smollm2-135m --do_train --do_eval --output_dir out/ft

Recovery bends a model toward the one corpus it trains on, so the in-domain number alone flatters
it; the held-out pair (pruned -> recovered, and x dense) shows what carries over.
"""

from __future__ import annotations

import math
import warnings

from .. import data
from ..errors import SpruceError
from .train import eval_loss


def resolve_heldout(given: str | None, train_spec: str | None, prompts: str | None = None) -> str | None:
    """--heldout_dataset: `auto` (the default) is moby when training reads sotu (or generated text
    from sotu prompts), else none; none / an empty value turns it off. Refused when training (or
    the generated text's prompts, `prompts`) reads it."""
    if given in (None, "", "none", "null"):
        return None
    used = {"--dataset_name / --train_file": train_spec, "--generated_prompts": prompts}
    heldout = data.default_heldout(list(used.values())) if given == "auto" else given
    if heldout:
        data.check_corpus(heldout)
        try:
            data.check_heldout(heldout, used)
        except SpruceError as e:
            raise SpruceError(str(e).replace("set data.heldout", "set --heldout_dataset")) from None
    return heldout


def _point(loss: float) -> dict:
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 700))}


class QualityColumns:
    """Validation perplexity on the in-domain and held-out blocks: of the pruned model (before),
    of the recovered one (after) and of the dense teacher; `lines()` for the summary."""

    def __init__(self, heldout: str | None, heldout_blocks, eval_blocks, batch_size: int, bf16: bool):
        self.heldout, self.heldout_blocks, self.eval_blocks = heldout, heldout_blocks, eval_blocks
        self.batch_size, self.bf16 = batch_size, bf16

    @classmethod
    def build(cls, heldout: str | None, tok, block_size: int, max_eval_samples: int | None, seed: int,
              eval_blocks, batch_size: int, bf16: bool) -> QualityColumns:
        blocks = None
        if heldout and eval_blocks is not None:
            with warnings.catch_warnings():  # a small held-out split gives what it has; the summary says how many
                warnings.simplefilter("ignore")
                blocks = data.training_blocks(heldout, tok, block_size, "validation", max_eval_samples, seed)
        return cls(heldout if blocks is not None else None, blocks, eval_blocks, batch_size, bf16)

    def measure(self, model, summary: dict, key: str, parallel=None, teacher: bool = False) -> None:
        """summary[key] = {in_domain, heldout} for `model`: the in-domain point only for the
        dense teacher (the student's in-domain numbers are eval_before / eval_after already)."""
        if self.heldout_blocks is None and not (teacher and self.eval_blocks is not None):
            return
        point = {}
        if teacher and self.eval_blocks is not None:
            point["in_domain"] = _point(eval_loss(model, self.eval_blocks, self.batch_size, self.bf16, parallel))
        if self.heldout_blocks is not None:
            point["heldout"] = {"corpus": self.heldout, "blocks": int(self.heldout_blocks.shape[0]), **_point(
                eval_loss(model, self.heldout_blocks, self.batch_size, self.bf16, parallel))}
        summary[key] = point

    @staticmethod
    def lines(summary: dict) -> list[str]:
        """'in-domain: pruned 80.1 (3.5x dense) -> recovered 40.2 (1.8x dense)' and the held-out twin."""
        dense = summary.get("dense_eval") or {}
        before, after = summary.get("eval_before"), summary.get("eval_after") or summary.get("eval_merged")
        held_before = (summary.get("heldout_before") or {}).get("heldout")
        held_after = (summary.get("heldout_after") or {}).get("heldout")
        lines = []

        def cell(point, base):
            x = f" ({point['eval_ppl'] / base['eval_ppl']:.2f}x dense)" if base else ""
            return f"{point['eval_ppl']:.2f}{x}"

        if before and after and dense.get("in_domain"):
            lines.append(f"in-domain (validation blocks): pruned {cell(before, dense['in_domain'])} "
                         f"-> recovered {cell(after, dense['in_domain'])}")
        if held_before:
            base = dense.get("heldout")
            text = (f"held-out ({held_before['corpus']}/validation, {held_before['blocks']} blocks, never trained on): "
                    f"pruned {cell(held_before, base)}")
            if held_after:
                text += f" -> recovered {cell(held_after, base)}"
            lines.append(text)
        return lines
