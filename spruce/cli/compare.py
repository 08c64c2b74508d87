"""`spruce compare RUN...`: several run folders in one table."""

from __future__ import annotations

from pathlib import Path

from ..outdir import write_json
from .common import add_command, check_writable_outputs


def add_parser(subparsers) -> None:
    p = add_command(subparsers, "compare", "put several runs in one table (Markdown and JSON)",
                    "Read the run folders written by 'spruce run' / 'spruce demo' and print one Markdown table:\n"
                    "pattern, recovery mode, measured sparsity, dense / pruned / recovered perplexity and\n"
                    "recovered x dense, in-domain and, where the runs measured one, on the held-out corpus.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders")
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    p.add_argument("--markdown", metavar="PATH", help="also write the table as a Markdown file")


def run(args) -> None:
    from ..report import compare_markdown, compare_runs

    check_writable_outputs(args.json, args.markdown)
    rows = compare_runs(args.runs)
    table = compare_markdown(rows)
    print(table)
    if args.json:
        write_json(args.json, {"runs": rows})
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
