"""The sweep's space: parsing ``--space`` and MLproject expressions, and checking them against
an entry point's declared parameters (pure: no Optuna, no MLflow)."""

from __future__ import annotations

import re

import pytest

from mlpipe.core.errors import ParameterError
from mlpipe.run.params import ParamSpec
from mlpipe.sweep.space import (
    check_space,
    describe_space,
    format_value,
    parse_dimension,
    parse_space,
    space_from_json,
)

SPECS = {
    "lr": ParamSpec("lr", "float", 0.01),
    "model": ParamSpec("model", "string", "unet", ("unet", "segresnet")),
    "batch_size": ParamSpec("batch_size", "int", 2),
    "amp": ParamSpec("amp", "bool", False),
    "data_dir": ParamSpec("data_dir", "path", None),
}


def test_parse_dimension_the_three_forms_of_the_issue():
    lr = parse_dimension("lr=loguniform(1e-4,1e-2)")
    assert (lr.kind, lr.low, lr.high, lr.log, lr.step) == ("float", 1e-4, 1e-2, True, None)
    model = parse_dimension("model=choice(unet, segresnet)")
    assert (model.kind, model.choices) == ("choice", ("unet", "segresnet"))
    bs = parse_dimension("batch_size=int(2,8,step=2)")
    assert (bs.kind, bs.low, bs.high, bs.step, bs.log) == ("int", 2, 8, 2, False)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("lr", "expected NAME=EXPR"),
        ("lr=", "expected NAME=EXPR"),
        ("lr=logunifrom(1e-4,1e-2)", "did you mean loguniform"),
        ("lr=uniform(1)", "needs two bounds"),
        ("lr=uniform(1e-2,1e-4)", "must be below high"),
        ("lr=loguniform(0,1)", "positive low bound"),
        ("lr=uniform(a,1)", "'a' is not a number"),
        ("lr=float(0,1,step=-1)", "step must be positive"),
        ("lr=float(0.1,1,step=0.1,log=true)", "cannot be combined"),
        ("bs=int(2.5,8)", "must be integers"),
        ("lr=uniform(0,1,step=0.1)", "unexpected"),
        ("m=choice()", "at least one value"),
        ("m=choice(a,a)", "twice"),
        ("lr=loguniform(1e-4, inf)", "finite"),
    ],
)
def test_parse_dimension_refuses_bad_expressions_naming_them(text, expected):
    with pytest.raises(ParameterError, match=expected) as info:
        parse_dimension(text)
    assert text.split("=")[0] in str(info.value)


def test_parse_space_command_line_overrides_the_mlproject_and_refuses_repeats():
    declared = {"lr": "loguniform(1e-5, 1e-1)", "model": ["unet", "segresnet"]}
    space = parse_space(["lr=uniform(0.001,0.01)"], declared)
    assert space["lr"].describe() == "float(0.001,0.01)"
    assert space["model"].choices == ("unet", "segresnet")
    with pytest.raises(ParameterError, match="given twice"):
        parse_space(["lr=uniform(0,1)", "lr=uniform(0,2)"])
    with pytest.raises(ParameterError, match=r"mlpipe\.sweep\.space\.lr"):
        parse_space([], {"lr": "loguniform(1, 0)"})


def test_describe_space_round_trips_through_json():
    space = parse_space(
        [
            "lr=loguniform(1e-4,1e-2)",
            "bs=int(2,8,step=2)",
            "m=choice(a,b)",
            "w=float(0.1,1,log=true)",
        ]
    )
    again = space_from_json(describe_space(space))
    assert again == space


def test_check_space_accepts_a_space_that_fits():
    space = parse_space(
        ["lr=loguniform(1e-4,1e-2)", "model=choice(unet,segresnet)", "batch_size=int(2,8,step=2)"]
    )
    check_space(space, SPECS, fixed=["data_dir"])


def test_check_space_unknown_names_get_did_you_mean_and_the_declared_list():
    with pytest.raises(ParameterError) as info:
        check_space(parse_space(["lrr=uniform(0,1)"]), SPECS, entry_point="train")
    message = str(info.value)
    assert "lrr is not a parameter of entry point 'train' (did you mean lr?)" in message
    assert "declared parameters: lr, model, batch_size, amp, data_dir" in message


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ("model=choice(unet,vnet)", "'vnet' is not one of the allowed choices"),
        ("batch_size=float(2,8)", "gives fractional values; use int(2,8)"),
        ("batch_size=choice(2,x)", "'x' is not valid for type int"),
        ("model=uniform(0,1)", "search it with choice"),
        ("amp=int(0,1)", "search it with choice"),
        ("data_dir=uniform(0,1)", "needs an int or float parameter"),
        ("lr=choice(0.1,fast)", "'fast' is not valid for type float"),
    ],
)
def test_check_space_refuses_values_the_declared_type_cannot_hold(item, expected):
    with pytest.raises(ParameterError, match=re.escape(expected)):
        check_space(parse_space([item]), SPECS)


def test_check_space_refuses_a_parameter_both_searched_and_fixed_and_an_empty_space():
    with pytest.raises(ParameterError, match="lr is both searched"):
        check_space(parse_space(["lr=uniform(0.1,1)"]), SPECS, fixed=["lr"])
    with pytest.raises(ParameterError, match="Nothing to search"):
        check_space({}, SPECS)


def test_check_space_lists_every_problem_at_once():
    space = parse_space(["lrr=uniform(0,1)", "model=choice(vnet)", "batch_size=float(1,2)"])
    with pytest.raises(ParameterError) as info:
        check_space(space, SPECS)
    lines = str(info.value).splitlines()
    assert len(lines) == 5  # heading, unknown, declared list, model, batch_size


def test_format_value_gives_what_the_command_line_gets():
    space = parse_space(["bs=int(2,8)", "lr=uniform(0,1)", "m=choice(a,b)"])
    assert format_value(space["bs"], 4) == "4"
    assert format_value(space["lr"], 0.25) == "0.25"
    assert format_value(space["m"], "b") == "b"
