"""`spruce run RECIPE`: the stages of a YAML recipe, then the perplexity table."""

from __future__ import annotations

from pathlib import Path

from .common import add_command


def add_parser(subparsers) -> None:
    from ..config import STAGES

    p = add_command(subparsers, "run", "run a recipe: prune -> recover -> merge -> evaluate -> report",
                    "Run the stages of a YAML recipe in order (baseline, prune, recover, report; with a\n"
                    "prune_reference section, a one-shot 'reference' prune before 'prune', to compare) into\n"
                    "its output_dir. A finished stage is not run again, so an interrupted run resumes where\n"
                    "it stopped, and one whose recipe changed only in how it is measured (data.eval_split,\n"
                    "eval_seqlen, eval_windows, heldout, zero_shot_tasks) measures its saved model again\n"
                    "(a new data.heldout trains the recovery again: its training log reports on that corpus).\n"
                    "The resolved recipe is saved as config.yaml. Shipped recipes are in recipes/, each\n"
                    "headed by its command. Override any key on the command line: prune.sparsity=0.6.",
                    "Example: spruce run recipes/smollm2-block16.yaml recover.max_steps=300 --stages prune recover")
    p.add_argument("recipe", help="YAML recipe file")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides such as recover.learning_rate=5e-4")
    p.add_argument("--stages", nargs="+", choices=STAGES,
                   help="run only these stages (default: the recipe's stages)")
    p.add_argument("--fresh", action="store_true", help="delete the run folder first and run every stage again")


def run(args) -> None:
    from ..config import load_recipe

    run_and_show(load_recipe(args.recipe, args.overrides), args.fresh, args.stages)


def run_and_show(cfg, fresh: bool, stages=None) -> None:
    """Run a loaded recipe (the stages given, else its own) and print its table; `spruce demo` too."""
    from ..outdir import check_writable
    from ..pipeline import run_recipe
    from ..report import perplexity_table

    check_writable(cfg.output_dir, "run folder")
    results = run_recipe(cfg, fresh=fresh, only=stages)
    table = (results.get("report") or {}).get("results")
    if table:
        print()
        print(perplexity_table(table, f"{cfg.data.corpus}/{cfg.data.eval_split}", results["report"].get("labels")))
        print(f"\nreport: {Path(cfg.output_dir) / 'report.md'}")
