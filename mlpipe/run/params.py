"""Parse and type-check ``-P key=value`` against an entry point's declared parameters.

Pure: no mlflow, no network. MLflow itself checks only ``path`` and ``uri`` and passes
``-P lr=abc`` or a misspelt name straight to the command, so every other check is ours
and happens before any run exists.
"""

from __future__ import annotations

import difflib
import math
import os
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from mlpipe.core.errors import ParameterError

PARAM_TYPES = ("int", "float", "bool", "string", "path", "uri")
"""Types an MLproject parameter may declare (DESIGN.md, convention 1)."""

_TRUE = frozenset({"true", "1", "yes"})
_FALSE = frozenset({"false", "0", "no"})


@dataclass(frozen=True)
class ParamSpec:
    """One declared parameter. ``default is None`` means the parameter is required."""

    name: str
    type: str = "string"
    default: object | None = None
    choices: tuple[str, ...] | None = None
    typed: bool = True

    @property
    def required(self) -> bool:
        return self.default is None


@dataclass(frozen=True)
class CheckedParams:
    """Values ready for MLflow: every declared parameter plus passed-through extras."""

    values: dict[str, str]
    extras: dict[str, str] = field(default_factory=dict)
    given: frozenset[str] = frozenset()


def parse_assignments(assignments: Iterable[str]) -> dict[str, str]:
    """Split ``key=value`` strings; the value may itself contain ``=``.

    Raises:
        ParameterError: an item has no ``=``, an empty key, or a key given twice.
    """
    out: dict[str, str] = {}
    for item in assignments:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ParameterError(
                f"-P {item!r}: expected KEY=VALUE, e.g. -P alpha=0.5 (no spaces around '=')."
            )
        if key in out:
            raise ParameterError(
                f"-P {key} is given twice ({out[key]!r} and {value!r}); give it once."
            )
        out[key] = value
    return out


def convert_value(spec: ParamSpec, value: object, *, base_dir: str | None = None) -> str:
    """Check one value against its declared type and return the string MLflow will pass.

    ``bool`` values come back as ``true``/``false``; local ``path`` values come back absolute,
    resolved against ``base_dir`` (default: the current folder, as ``mlflow run`` does).

    Raises:
        ParameterError: naming the parameter, the value and the expected type.
    """
    text = _as_text(value)
    kind = spec.type
    if kind == "int":
        try:
            int(text, 10)
        except ValueError:
            _fail(spec, text, "an integer, e.g. 3")
    elif kind == "float":
        try:
            number = float(text)
        except ValueError:
            _fail(spec, text, "a number, e.g. 0.01 or 1e-3")
        if not math.isfinite(number):
            _fail(spec, text, "a finite number")
    elif kind == "bool":
        lowered = text.strip().lower()
        if lowered in _TRUE:
            text = "true"
        elif lowered in _FALSE:
            text = "false"
        else:
            _fail(spec, text, "a boolean: true/false, 1/0 or yes/no")
    elif kind == "uri":
        if not _has_scheme(text):
            _fail(spec, text, "a URI with a scheme, e.g. s3://bucket/key or file:///data")
    elif kind == "path":
        text = _check_path(spec, text, base_dir)
    if spec.choices is not None and text not in spec.choices:
        raise ParameterError(
            f"Parameter {spec.name}: {text!r} is not one of the allowed choices "
            f"({', '.join(spec.choices)})."
        )
    return text


def check_params(
    specs: Mapping[str, ParamSpec],
    given: Mapping[str, str],
    *,
    allow_extra: bool = False,
    base_dir: str | None = None,
    entry_point: str = "main",
) -> CheckedParams:
    """Check user values against the declared parameters, all problems of one kind at once.

    Unknown names are refused with the closest declared names suggested, unless
    ``allow_extra``; missing required parameters are listed together.

    Returns:
        The converted values of every declared parameter (defaults included, as strings) and
        the extras passed through.

    Raises:
        ParameterError: unknown, missing or ill-typed parameters.
    """
    unknown = [name for name in given if name not in specs]
    if unknown and not allow_extra:
        raise ParameterError(_unknown_message(unknown, specs, entry_point))
    missing = [name for name, spec in specs.items() if spec.required and name not in given]
    if missing:
        listed = ", ".join(missing)
        example = " ".join(f"-P {name}=..." for name in missing)
        raise ParameterError(
            f"Entry point {entry_point!r} needs a value for: {listed}. Add {example}."
        )
    values: dict[str, str] = {}
    for name, spec in specs.items():
        if name in given:
            values[name] = convert_value(spec, given[name], base_dir=base_dir)
        else:
            values[name] = _as_text(spec.default)
    extras = {name: given[name] for name in unknown}
    return CheckedParams(values=values, extras=extras, given=frozenset(given))


def _unknown_message(unknown: list[str], specs: Mapping[str, ParamSpec], entry_point: str) -> str:
    parts = []
    for name in unknown:
        close = difflib.get_close_matches(name, list(specs), n=3, cutoff=0.6)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        parts.append(f"{name}{hint}")
    declared = ", ".join(specs) or "none"
    return (
        f"Unknown parameter for entry point {entry_point!r}: {'; '.join(parts)}. "
        f"Declared parameters: {declared}. Pass --allow-extra-params to hand unknown "
        "parameters to the command as --name value, as mlflow run does."
    )


def _check_path(spec: ParamSpec, text: str, base_dir: str | None) -> str:
    if _has_scheme(text) and not text.startswith("file:"):
        return text  # a remote URI: MLflow downloads it before the command starts
    local = (
        urllib.parse.unquote(urllib.parse.urlparse(text).path) if text.startswith("file:") else text
    )
    local = os.path.expanduser(local)
    if not local:
        _fail(spec, text, "an existing file or folder, or a remote URI such as s3://bucket/key")
    absolute = os.path.abspath(os.path.join(base_dir or os.getcwd(), local))
    if not os.path.exists(absolute):
        raise ParameterError(
            f"Parameter {spec.name}: path {text!r} does not exist (looked for {absolute}). "
            "Give an existing file or folder, or a remote URI such as s3://bucket/key."
        )
    return absolute


def _has_scheme(text: str) -> bool:
    # One-letter schemes are Windows drive letters, not URIs.
    return len(urllib.parse.urlparse(text).scheme) > 1


def _as_text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


def _fail(spec: ParamSpec, text: str, expected: str) -> None:
    raise ParameterError(
        f"Parameter {spec.name}: {text!r} is not valid for type {spec.type}; expected {expected}."
    )
