"""`spruce demo`: the shipped demo recipe for this machine (CPU-sized, or the full size on CUDA)."""

from __future__ import annotations

from .common import add_command
from .run import run_and_show

DEMO_RECIPES = {"cpu": "smollm2-block16.yaml", "cuda": "smollm2-block16-distill.yaml"}


def add_parser(subparsers) -> None:
    p = add_command(subparsers, "demo", "prune the embedded model to 16x16 blocks two ways, recover, report",
                    "On the embedded SmolLM2-135M model and State of the Union corpus: the dense perplexity;\n"
                    "the reference block recipe one-shot (Wanda, mean tile score, one threshold per matrix),\n"
                    "which collapses the model; spruce's 16x16 recipe one-shot on the same model; a recovery\n"
                    "of spruce's pruned model that keeps its zeros; one table of the four and report.md.\n"
                    "Without a GPU it runs recipes/smollm2-block16.yaml, sized for 2 CPU cores (about 15\n"
                    "minutes, fewer windows and calibration samples than a full run). With CUDA (--device\n"
                    "cuda, or auto on a GPU) it runs the full size, recipes/smollm2-block16-distill.yaml: 128\n"
                    "calibration samples, all windows, spruce's default 16x16 recipe and distillation.\n"
                    "Run it again and finished stages are skipped.")
    p.add_argument("--output_dir", help="run folder (default: the recipe's, runs/smollm2-block16 or on a GPU "
                                        "runs/smollm2-block16-distill, so that 'spruce run RECIPE' continues it)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    p.add_argument("--fresh", action="store_true", help="delete the run folder first and run every stage again")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides, e.g. recover.max_steps=300")


def run(args) -> None:
    from ..config import load_recipe, recipes_dir
    from ..models import resolve_device

    kind = resolve_device(args.device).type
    recipe = recipes_dir() / DEMO_RECIPES.get(kind, DEMO_RECIPES["cpu"])
    if kind == "cuda":
        print(f"spruce demo: CUDA found, so the full-size demo ({recipe.name}: 128 calibration samples, all "
              "evaluation windows, the default 16x16 recipe, distillation; a few minutes); --device cpu runs "
              "the CPU-sized one")
    else:
        print(f"spruce demo: no GPU, so the CPU-sized demo ({recipe.name}; about 13 minutes on 2 cores); "
              "on a GPU it runs the full-size one")
    where = [f"output_dir={args.output_dir}"] if args.output_dir else []
    cfg = load_recipe(recipe, [*where, f"device={args.device}", *args.overrides])
    run_and_show(cfg, args.fresh)
