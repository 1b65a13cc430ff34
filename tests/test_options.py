"""parse_dataclass_options: the examples' command lines come from their Options dataclasses."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from sb3_textrl.common.options import parse_dataclass_options


@dataclass
class Options:
    output_dir: str = "runs/x"
    lm: str | None = None
    n_envs: int = 4
    kl_coef: float = 0.05
    tiny: bool = False
    normalize_advantage: bool = True
    trainable_layers: int | None = None
    splits: dict[str, int] = field(default_factory=lambda: {"sft": 0})


def test_flags_are_typed_like_the_defaults_and_booleans_are_switches():
    options = parse_dataclass_options(Options, "doc", skip=("splits",),
                                      args=["--n-envs", "8", "--kl-coef", "0.1", "--tiny", "--lm", "path/to/lm"])
    assert options == Options(n_envs=8, kl_coef=0.1, tiny=True, lm="path/to/lm")
    assert parse_dataclass_options(Options, "doc", skip=("splits",), args=[]) == Options()


def test_a_switch_that_defaults_to_true_can_be_turned_off():
    options = parse_dataclass_options(Options, "doc", skip=("splits",), args=["--no-normalize-advantage"])
    assert options.normalize_advantage is False
    assert parse_dataclass_options(Options, "doc", skip=("splits",), args=["--normalize-advantage"]).normalize_advantage
    assert parse_dataclass_options(Options, "doc", skip=("splits",), args=["--no-tiny"]).tiny is False


def test_a_field_defaulting_to_none_takes_the_type_of_its_annotation():
    options = parse_dataclass_options(Options, "doc", skip=("splits",), args=["--trainable-layers", "4"])
    assert options.trainable_layers == 4 and isinstance(options.trainable_layers, int)
    with pytest.raises(SystemExit):
        parse_dataclass_options(Options, "doc", skip=("splits",), args=["--trainable-layers", "four"])


def test_bad_values_and_skipped_fields_are_refused(capsys):
    with pytest.raises(SystemExit):
        parse_dataclass_options(Options, "doc", skip=("splits",), args=["--n-envs", "four"])
    assert "invalid int value" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_dataclass_options(Options, "doc", skip=("splits",), args=["--splits", "x"])
    with pytest.raises(TypeError, match="needs a dataclass"):
        parse_dataclass_options(dict, "doc")


@dataclass
class RecipeOptions:
    trainable_layers: int | None = 4
    source: str | None = "cnndm"
    n_envs: int = 8


def test_none_is_accepted_where_the_annotation_allows_it(capsys):
    options = parse_dataclass_options(RecipeOptions, "doc", args=["--trainable-layers", "none", "--source", "None"])
    assert options.trainable_layers is None and options.source is None
    assert parse_dataclass_options(RecipeOptions, "doc", args=["--trainable-layers", "2"]).trainable_layers == 2
    with pytest.raises(SystemExit):  # an int field without None in its annotation still wants an int
        parse_dataclass_options(RecipeOptions, "doc", args=["--n-envs", "none"])
    assert "invalid int value" in capsys.readouterr().err
