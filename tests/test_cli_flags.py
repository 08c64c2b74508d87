"""The CLI's flags take their defaults from the option dataclasses, and a new FinetuneArgs field
gets its `spruce finetune` flag without a second edit."""

import dataclasses

import pytest

from spruce.cli.common import show_default


@pytest.mark.parametrize("value, text", [(1e-4, "1e-4"), (3e-3, "3e-3"), (2.5e-3, "2.5e-3"), (0.05, "0.05"),
                                         (2.0, "2"), (0.0, "0"), (60.0, "60"), (42, "42"),
                                         (["tensorboard"], "tensorboard"), ("q_proj,v_proj", "q_proj,v_proj")])
def test_defaults_are_written_as_the_help_texts_write_them(value, text):
    assert show_default(value) == text


def test_a_new_finetune_args_field_gets_its_flag_and_reaches_finetune_args(monkeypatch, capsys):
    from spruce.cli import build_parser, finetune_args
    from spruce.recover import args as finetune_module

    @dataclasses.dataclass
    class WithNewOption(finetune_module.FinetuneArgs):
        label_smoothing: float = dataclasses.field(default=0.1, metadata={"help": "smooth the targets"})
        pack_documents: bool = dataclasses.field(default=False, metadata={"help": "pack short documents"})

    monkeypatch.setattr(finetune_module, "FinetuneArgs", WithNewOption)
    parser = build_parser()
    base = ["finetune", "--model_name_or_path", "m", "--output_dir", "o", "--do_train"]
    assert parser.parse_args(base).label_smoothing == 0.1            # the field's default
    parsed = parser.parse_args([*base, "--label_smoothing", "0.2", "--pack_documents"])
    mapped = finetune_args(parsed)
    assert isinstance(mapped, WithNewOption) and mapped.label_smoothing == 0.2 and mapped.pack_documents
    with pytest.raises(SystemExit):
        parser.parse_args(["finetune", "--help"])
    out = capsys.readouterr().out
    assert "--label_smoothing LABEL_SMOOTHING" in out and "smooth the targets (default: 0.1)" in out


def test_every_finetune_args_field_has_its_own_flag_today():
    """The generated flags are for new fields only: the shipped ones each have a written flag."""
    from spruce.cli import build_parser

    titles = [g.title for g in build_parser().commands["finetune"]._action_groups]
    assert "more options" not in titles
