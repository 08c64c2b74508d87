"""One pruning run on a loaded model, shared by `spruce prune` and the prune stage of `spruce run`:
fit the resolved options to the model, draw calibration samples only when the spec needs them,
prune (resumable through a state folder beside the output), optionally measure perplexity, save
the model and sparsity.json atomically, and remove the state once the result is saved."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

from ..masks import write_sparsity_json
from ..models import check_context, prunable_linears, save_model
from ..outdir import NoSpaceError, atomic_dir, folder_size
from .defaults import spec_for_model
from .engine import prune_model
from .spec import PruneSpec
from .state import STATE_EVERY, state_folder

EVAL_SEQLEN = 1024   # tokens per window of the optional test-split perplexity after pruning


def run_prune(model, tok, options: dict, pattern: str, sparsity: float, corpus: str, seed: int = 0, *,
              out_dir: str | Path | None = None, state_every: float = STATE_EVERY, device=None, progress: bool = True,
              recipe: dict | None = None, eval_corpus: str | None = None, seqlen_name: str = "--seqlen",
              adjust: Callable | None = None, compressed_block: int | None = None) -> tuple[dict, PruneSpec]:
    """Prune `model` in place; return (the sparsity report, the PruneSpec used).

    options: resolved by defaults.resolve_recipe (fitted to the model here); corpus, seed: the
    calibration corpus (train split) and sampling seed; out_dir: save the pruned model there
    (a state folder beside it makes a killed run resumable unless state_every < 0); recipe: what
    the caller ran (its flags or YAML recipe), kept in sparsity.json; eval_corpus: measure the
    test-split perplexity before saving, into report["eval"]; seqlen_name: how the caller spells
    the calibration length in errors; adjust(model, report): a last change before saving (the
    progressive rounds keep earlier zeros with it); compressed_block: save out_dir compressed
    (spruce compress's format, blocks of this side) instead of dense with zeros."""
    from .. import data

    def calibration(spec: PruneSpec):
        check_context(model, spec.seqlen, seqlen_name)
        return data.calibration_samples(corpus, tok, spec.nsamples, spec.seqlen, seed=seed)

    state_dir = state_folder(out_dir) if out_dir is not None and state_every >= 0 else None
    info, spec, _ = prune_with_options(model, options, pattern, sparsity, calibration, device=device,
                                       progress=progress, state_dir=state_dir, state_every=max(state_every, 0.0))
    if adjust is not None:
        adjust(model, info)
    if recipe is not None:
        info["recipe"] = recipe
    if eval_corpus:
        from ..evaluate import perplexity

        result = perplexity(model, data.eval_windows(eval_corpus, "test", tok, EVAL_SEQLEN))
        info["eval"] = {"dataset": eval_corpus, "split": "test", **result}
    if out_dir is not None:
        try:
            save_pruned(model, tok, out_dir, info, compressed_block)
        except NoSpaceError as e:
            if state_dir is None or not state_dir.exists():
                raise
            # the state holds every pruned layer: once space is freed the same command saves without pruning again
            raise NoSpaceError(f"{e}; the prune state {state_dir.name} ({folder_size(state_dir)}) is kept so that "
                               "the same command resumes from it (delete it to free that space)") from None
        if state_dir is not None:
            shutil.rmtree(state_dir, ignore_errors=True)
    return info, spec


def prune_with_options(model, options: dict, pattern: str, sparsity: float, calibration: Callable, *, device=None,
                       progress: bool = True, **engine_options) -> tuple[dict, PruneSpec, dict]:
    """Prune `model` in place with resolved options (defaults.resolve_recipe) fitted to it; the
    calibration samples come from `calibration(spec)`, called only when the spec needs them.
    Returns (the sparsity report, the PruneSpec, the options as fitted to the model)."""
    linears = prunable_linears(model)
    spec, fitted = spec_for_model(options, pattern, sparsity, linears)
    # a pattern that does not tile the model fails here, before calibration data is read
    spec.check_divides({n: tuple(m.weight.shape) for n, m in linears.items()})
    samples = calibration(spec) if spec.needs_calibration else None
    info = prune_model(model, spec, samples, device=device, progress=progress, **engine_options)
    return info, spec, fitted


def save_pruned(model, tok, out_dir: str | Path, info: dict, compressed_block: int | None = None) -> None:
    """The pruned model (dense with zeros, or compressed in blocks of `compressed_block`) and its
    sparsity.json, in a folder that appears only once complete."""
    with atomic_dir(out_dir) as folder:
        if compressed_block:
            from ..compress import save_compressed

            save_compressed(model, tok, folder, compressed_block)
        else:
            save_model(model, tok, folder)
        write_sparsity_json(folder, info)
