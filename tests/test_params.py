"""Unit tests of mlpipe.params: -P parsing, type conversion and the parameter check."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from mlpipe.core.errors import ParameterError, UsageError
from mlpipe.run.params import ParamSpec, check_params, convert_value, parse_assignments

# parse_assignments -------------------------------------------------------------------------


def test_parse_assignments_splits_key_and_value():
    assert parse_assignments(["alpha=0.5", "epochs=3"]) == {"alpha": "0.5", "epochs": "3"}


def test_parse_assignments_keeps_equals_sign_in_value():
    assert parse_assignments(["query=a=b=c", "empty="]) == {"query": "a=b=c", "empty": ""}


def test_parse_assignments_rejects_item_without_equals():
    with pytest.raises(ParameterError, match=r"-P 'alpha0\.5': expected KEY=VALUE"):
        parse_assignments(["alpha0.5"])


def test_parse_assignments_rejects_empty_key():
    with pytest.raises(ParameterError, match=r"-P '=5': expected KEY=VALUE"):
        parse_assignments(["=5"])


def test_parse_assignments_rejects_duplicate_key_naming_both_values():
    with pytest.raises(ParameterError, match=r"-P alpha is given twice \('1' and '2'\)"):
        parse_assignments(["alpha=1", "epochs=3", "alpha=2"])


def test_parse_assignments_parameter_error_is_a_usage_error_with_exit_2():
    with pytest.raises(UsageError) as info:
        parse_assignments(["novalue"])
    assert info.value.exit_code == 2


# convert_value: int -------------------------------------------------------------------------


def test_convert_value_int_accepts_integer_text():
    assert convert_value(ParamSpec("epochs", "int"), "3") == "3"


@pytest.mark.parametrize("bad", ["3.5", "abc"])
def test_convert_value_int_rejects_non_integer(bad):
    pattern = (
        rf"Parameter epochs: '{re.escape(bad)}' is not valid for type int; expected an integer"
    )
    with pytest.raises(ParameterError, match=pattern):
        convert_value(ParamSpec("epochs", "int"), bad)


# convert_value: float -----------------------------------------------------------------------


def test_convert_value_float_accepts_scientific_notation():
    assert convert_value(ParamSpec("lr", "float"), "1e-3") == "1e-3"


def test_convert_value_float_rejects_text():
    with pytest.raises(
        ParameterError, match=r"Parameter lr: 'abc' is not valid for type float; expected a number"
    ):
        convert_value(ParamSpec("lr", "float"), "abc")


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf", "NaN"])
def test_convert_value_float_rejects_non_finite(bad):
    pattern = rf"Parameter lr: '{re.escape(bad)}' is not valid for type float; expected a finite"
    with pytest.raises(ParameterError, match=pattern):
        convert_value(ParamSpec("lr", "float"), bad)


# convert_value: bool ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("true", "true"),
        ("TRUE", "true"),
        ("True", "true"),
        ("1", "true"),
        ("yes", "true"),
        ("YeS", "true"),
        ("false", "false"),
        ("FALSE", "false"),
        ("0", "false"),
        ("no", "false"),
        ("No", "false"),
    ],
)
def test_convert_value_bool_normalises_spellings(given, expected):
    assert convert_value(ParamSpec("amp", "bool"), given) == expected


def test_convert_value_bool_normalises_python_bools():
    assert convert_value(ParamSpec("amp", "bool"), True) == "true"
    assert convert_value(ParamSpec("amp", "bool"), False) == "false"


def test_convert_value_bool_rejects_maybe():
    with pytest.raises(
        ParameterError,
        match=r"Parameter amp: 'maybe' is not valid for type bool; expected a boolean",
    ):
        convert_value(ParamSpec("amp", "bool"), "maybe")


# convert_value: string, uri -----------------------------------------------------------------


def test_convert_value_string_passes_any_text_unchanged():
    assert convert_value(ParamSpec("model", "string"), " any thing=1 ") == " any thing=1 "


def test_convert_value_string_turns_numbers_into_text():
    assert convert_value(ParamSpec("model", "string"), 12) == "12"


def test_convert_value_uri_accepts_scheme():
    assert convert_value(ParamSpec("out", "uri"), "s3://b/k") == "s3://b/k"


@pytest.mark.parametrize("bad", ["relative/path", "C:/x"])
def test_convert_value_uri_rejects_value_without_scheme(bad):
    pattern = rf"Parameter out: '{re.escape(bad)}' is not valid for type uri; expected a URI"
    with pytest.raises(ParameterError, match=pattern):
        convert_value(ParamSpec("out", "uri"), bad)


# convert_value: path ------------------------------------------------------------------------


def test_convert_value_path_makes_existing_relative_path_absolute(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.csv").write_text("a,b\n")
    result = convert_value(ParamSpec("data_dir", "path"), "data/train.csv")
    assert os.path.isabs(result)
    assert Path(result) == tmp_path / "data" / "train.csv"


def test_convert_value_path_resolves_against_base_dir(tmp_path):
    base = tmp_path / "elsewhere"
    base.mkdir()
    (base / "x.txt").write_text("x")
    result = convert_value(ParamSpec("data_dir", "path"), "x.txt", base_dir=str(base))
    assert Path(result) == base / "x.txt"


def test_convert_value_path_missing_names_parameter_and_value(tmp_path):
    with pytest.raises(
        ParameterError, match=r"Parameter data_dir: path 'no/such/dir' does not exist"
    ) as info:
        convert_value(ParamSpec("data_dir", "path"), "no/such/dir")
    assert str(tmp_path / "no" / "such" / "dir") in str(info.value)


def test_convert_value_path_passes_remote_uri_through():
    assert convert_value(ParamSpec("data_dir", "path"), "s3://bucket/k") == "s3://bucket/k"


def test_convert_value_path_accepts_file_url_of_existing_file(tmp_path):
    target = tmp_path / "t.csv"
    target.write_text("x")
    result = convert_value(ParamSpec("data_dir", "path"), target.as_uri())
    assert result == str(target)


def test_convert_value_path_rejects_file_url_of_missing_file(tmp_path):
    missing = (tmp_path / "gone.csv").as_uri()
    with pytest.raises(ParameterError, match=r"Parameter data_dir: path 'file://.*gone\.csv'"):
        convert_value(ParamSpec("data_dir", "path"), missing)


def test_convert_value_path_rejects_empty_value():
    with pytest.raises(
        ParameterError, match=r"Parameter data_dir: '' is not valid for type path; expected an"
    ):
        convert_value(ParamSpec("data_dir", "path"), "")


def test_convert_value_path_accepts_percent_encoded_file_url(tmp_path):
    target = tmp_path / "a b.csv"
    target.write_text("x")
    assert convert_value(ParamSpec("data_dir", "path"), target.as_uri()) == str(target)


# convert_value: choices ---------------------------------------------------------------------


def test_convert_value_choices_accepts_listed_value():
    spec = ParamSpec("model", "string", choices=("unet", "segresnet"))
    assert convert_value(spec, "segresnet") == "segresnet"


def test_convert_value_choices_rejects_unlisted_value():
    spec = ParamSpec("model", "string", choices=("unet", "segresnet"))
    with pytest.raises(
        ParameterError,
        match=r"Parameter model: 'vit' is not one of the allowed choices \(unet, segresnet\)",
    ):
        convert_value(spec, "vit")


def test_convert_value_choices_compares_normalised_bool():
    spec = ParamSpec("amp", "bool", choices=("true",))
    assert convert_value(spec, "YES") == "true"
    with pytest.raises(ParameterError, match=r"Parameter amp: 'false' is not one of"):
        convert_value(spec, "no")


# check_params -------------------------------------------------------------------------------

SPECS = {
    "alpha": ParamSpec("alpha", "float", default=0.5),
    "epochs": ParamSpec("epochs", "int", default=2),
    "amp": ParamSpec("amp", "bool", default=True),
    "model": ParamSpec("model", "string", default="unet"),
}


def test_check_params_unknown_name_suggests_close_name_and_flag():
    with pytest.raises(ParameterError) as info:
        check_params(SPECS, {"alpah": "0.1"})
    message = str(info.value)
    assert "Unknown parameter for entry point 'main': alpah (did you mean alpha?)" in message
    assert "--allow-extra-params" in message
    assert "Declared parameters: alpha, epochs, amp, model" in message


def test_check_params_unknown_name_without_close_match_has_no_suggestion():
    with pytest.raises(ParameterError) as info:
        check_params(SPECS, {"zzz": "1"}, entry_point="train")
    assert "entry point 'train': zzz." in str(info.value)
    assert "did you mean" not in str(info.value)


def test_check_params_allow_extra_passes_extras_through():
    checked = check_params(SPECS, {"alpha": "0.1", "extra_flag": "x"}, allow_extra=True)
    assert checked.extras == {"extra_flag": "x"}
    assert "extra_flag" not in checked.values
    assert checked.values["alpha"] == "0.1"
    assert checked.given == frozenset({"alpha", "extra_flag"})


def test_check_params_lists_all_missing_required_at_once():
    specs = {
        "data_dir": ParamSpec("data_dir", "string"),
        "alpha": ParamSpec("alpha", "float", default=0.5),
        "run_id": ParamSpec("run_id", "string"),
    }
    with pytest.raises(ParameterError) as info:
        check_params(specs, {}, entry_point="evaluate")
    message = str(info.value)
    assert "Entry point 'evaluate' needs a value for: data_dir, run_id." in message
    assert "-P data_dir=... -P run_id=..." in message
    assert "alpha" not in message


def test_check_params_fills_defaults_as_strings():
    checked = check_params(SPECS, {"epochs": "7"})
    assert checked.values == {"alpha": "0.5", "epochs": "7", "amp": "true", "model": "unet"}
    assert all(isinstance(v, str) for v in checked.values.values())
    assert checked.extras == {}


def test_check_params_false_bool_default_becomes_false_text():
    checked = check_params({"amp": ParamSpec("amp", "bool", default=False)}, {})
    assert checked.values == {"amp": "false"}


def test_check_params_converts_given_values():
    checked = check_params(SPECS, {"amp": "No"})
    assert checked.values["amp"] == "false"


def test_check_params_reports_ill_typed_value():
    with pytest.raises(
        ParameterError, match=r"Parameter epochs: 'ten' is not valid for type int; expected"
    ):
        check_params(SPECS, {"epochs": "ten"})
