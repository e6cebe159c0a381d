"""Parse a sweep's search space and check it against the entry point's declared parameters.

Pure: no Optuna, no MLflow. A dimension is written as on the command line
(``lr=loguniform(1e-4,1e-2)``, ``model=choice(unet,segresnet)``, ``batch_size=int(2,8,step=2)``)
or in the MLproject (``mlpipe: sweep: space: {lr: "loguniform(1e-4, 1e-2)", model: [unet,
segresnet]}``). Every value a dimension can take is checked against the declared type and
``choices`` before any study or run exists, so a typo costs no GPU hour.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from mlpipe.core.errors import ParameterError
from mlpipe.run.params import ParamSpec, convert_value

KINDS = ("uniform", "loguniform", "float", "int", "choice")
_EXPR = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*\((.*)\)\s*$", re.S)
EXAMPLES = "lr=loguniform(1e-4,1e-2), model=choice(unet,segresnet) or batch_size=int(2,8,step=2)"


@dataclass(frozen=True)
class Dimension:
    """One searched parameter.

    ``kind`` is ``float``, ``int`` or ``choice``; ``float``/``int`` have ``low``/``high``
    (inclusive), ``log`` and an optional ``step``; ``choice`` has ``choices`` (as strings,
    the way the command line passes them).
    """

    name: str
    kind: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[str, ...] = ()

    def describe(self) -> str:
        """The dimension as it would be written again (for tags and the table header)."""
        if self.kind == "choice":
            return f"choice({','.join(self.choices)})"
        extra = ""
        if self.step is not None:
            extra += f",step={_num(self.step)}"
        if self.log:
            if self.kind == "float" and self.step is None:
                return f"loguniform({_num(self.low)},{_num(self.high)})"
            extra += ",log=true"
        return f"{self.kind}({_num(self.low)},{_num(self.high)}{extra})"


Space = dict[str, Dimension]


def parse_dimension(text: str) -> Dimension:
    """``NAME=EXPR`` from ``--space``.

    Raises:
        ParameterError: no ``=``, an unknown function, or bad bounds, naming the item.
    """
    name, sep, expr = text.partition("=")
    name = name.strip()
    if not sep or not name or not expr.strip():
        raise ParameterError(f"--space {text!r}: expected NAME=EXPR, e.g. {EXAMPLES}.")
    return parse_expression(name, expr, where=f"--space {text!r}")


def parse_expression(name: str, expr: object, *, where: str | None = None) -> Dimension:
    """One dimension from its expression; a list (from YAML) is a ``choice``.

    Raises:
        ParameterError: naming ``where`` (the option or MLproject key), the problem and a fix.
    """
    where = where or f"space {name}"
    if isinstance(expr, (list, tuple)):
        return _choice(name, [_text(v) for v in expr], where)
    match = _EXPR.match(str(expr))
    if not match:
        raise ParameterError(f"{where}: {expr!r} is not an expression like {EXAMPLES}.")
    func, body = match.group(1).lower(), match.group(2)
    args = [a.strip() for a in body.split(",")] if body.strip() else []
    positional = [a for a in args if "=" not in a]
    keywords = dict(a.split("=", 1) for a in args if "=" in a)
    keywords = {k.strip(): v.strip() for k, v in keywords.items()}
    if func == "choice":
        if keywords:
            raise ParameterError(f"{where}: choice(...) takes values only, not {keywords}.")
        return _choice(name, positional, where)
    if func not in KINDS:
        close = difflib.get_close_matches(func, KINDS, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ParameterError(
            f"{where}: unknown function {func!r}{hint}; expected one of {', '.join(KINDS)}."
        )
    if len(positional) != 2:
        raise ParameterError(f"{where}: {func}(...) needs two bounds, low and high.")
    unknown = sorted(set(keywords) - {"step", "log"})
    if unknown or (func in ("uniform", "loguniform") and keywords):
        allowed = "none" if func in ("uniform", "loguniform") else "step=, log="
        raise ParameterError(
            f"{where}: unexpected {', '.join(unknown or keywords)} (allowed: {allowed})."
        )
    kind = "int" if func == "int" else "float"
    low, high = (_number(v, kind, where) for v in positional)
    step = _number(keywords["step"], kind, where) if "step" in keywords else None
    log = func == "loguniform" or _flag(keywords.get("log", "false"), where)
    if not low < high:
        raise ParameterError(f"{where}: low ({_num(low)}) must be below high ({_num(high)}).")
    if log and low <= 0:
        raise ParameterError(f"{where}: a log scale needs a positive low bound, not {_num(low)}.")
    if step is not None:
        if step <= 0:
            raise ParameterError(f"{where}: step must be positive, not {_num(step)}.")
        if log:
            raise ParameterError(f"{where}: step and a log scale cannot be combined (Optuna).")
    return Dimension(name, kind, low, high, log, step)


def parse_space(items: Iterable[str] = (), declared: Mapping[str, object] | None = None) -> Space:
    """The space of ``--space`` items over the MLproject's ``sweep: space:`` (items win).

    Raises:
        ParameterError: a bad item, or a name given twice on the command line.
    """
    space: Space = {}
    for name, expr in (declared or {}).items():
        space[str(name)] = parse_expression(
            str(name), expr, where=f"MLproject mlpipe.sweep.space.{name}"
        )
    seen: set[str] = set()
    for item in items:
        dim = parse_dimension(item)
        if dim.name in seen:
            raise ParameterError(f"--space {dim.name} is given twice; give it once.")
        seen.add(dim.name)
        space[dim.name] = dim
    return space


def check_space(
    space: Space,
    specs: Mapping[str, ParamSpec],
    *,
    fixed: Iterable[str] = (),
    entry_point: str = "main",
    base_dir: str | None = None,
) -> None:
    """Check that every value the space can produce is valid for its declared parameter.

    Unknown names get the closest declared names; a float range on an ``int`` parameter, a
    range on a parameter with ``choices`` or a ``bool``, and a choice value of the wrong type
    are refused; a parameter both searched and fixed with ``-P`` is refused.

    Raises:
        ParameterError: every problem found, one per line.
    """
    if not space:
        raise ParameterError(
            "Nothing to search: give --space NAME=EXPR (e.g. "
            f"{EXAMPLES}) or declare mlpipe: sweep: space: in the MLproject."
        )
    problems: list[str] = []
    unknown = [name for name in space if name not in specs]
    for name in unknown:
        close = difflib.get_close_matches(name, list(specs), n=3, cutoff=0.6)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        problems.append(f"{name} is not a parameter of entry point {entry_point!r}{hint}")
    if unknown:
        problems.append(f"declared parameters: {', '.join(specs) or 'none'}")
    for name in sorted(set(fixed) & set(space)):
        problems.append(f"{name} is both searched (--space) and fixed (-P); drop one")
    for name, dim in space.items():
        spec = specs.get(name)
        if spec is None:
            continue
        problem = _check_dimension(dim, spec, base_dir)
        if problem:
            problems.append(problem)
    if problems:
        raise ParameterError(
            "The search space does not fit the project:\n  " + "\n  ".join(problems)
        )


def describe_space(space: Space) -> str:
    """The space as compact JSON (the parent run's ``mlpipe.sweep.space`` tag)."""
    return json.dumps({name: dim.describe() for name, dim in space.items()}, separators=(",", ":"))


def space_from_json(text: str) -> Space:
    """The space back from :func:`describe_space` (a joining worker reads it from the study)."""
    return {name: parse_expression(name, expr) for name, expr in json.loads(text).items()}


def format_value(dim: Dimension, value: object) -> str:
    """A sampled value as the string the project's command gets."""
    if dim.kind == "int":
        return str(int(value))  # type: ignore[arg-type]
    if dim.kind == "float":
        return repr(float(value))  # type: ignore[arg-type]
    return str(value)


def _check_dimension(dim: Dimension, spec: ParamSpec, base_dir: str | None) -> str | None:
    label = f"{dim.name} ({spec.type}"
    label += f", choices {', '.join(spec.choices)})" if spec.choices else ")"
    if dim.kind == "choice":
        bad = []
        for value in dim.choices:
            try:
                convert_value(spec, value, base_dir=base_dir)
            except ParameterError as exc:
                bad.append(str(exc))
        return f"{dim.name}: " + "; ".join(bad) if bad else None
    if spec.choices is not None or spec.type == "bool":
        return f"{label}: search it with choice(...) over its allowed values, not {dim.describe()}"
    if spec.type == "int" and dim.kind == "float":
        return (
            f"{label}: {dim.describe()} gives fractional values; use "
            f"int({_num(dim.low)},{_num(dim.high)})"
        )
    if spec.type not in ("int", "float"):
        return f"{label}: a numeric range needs an int or float parameter; use choice(...)"
    return None


def _choice(name: str, values: list[str], where: str) -> Dimension:
    values = [v for v in values if v != ""]
    if not values:
        raise ParameterError(f"{where}: choice(...) needs at least one value.")
    if len(set(values)) != len(values):
        raise ParameterError(f"{where}: choice(...) lists a value twice.")
    return Dimension(name, "choice", choices=tuple(values))


def _number(text: str, kind: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ParameterError(f"{where}: {text!r} is not a number.") from None
    if not math.isfinite(value):
        raise ParameterError(f"{where}: {text!r} is not a finite number.")
    if kind == "int" and value != int(value):
        raise ParameterError(f"{where}: int(...) bounds and step must be integers, not {text!r}.")
    return float(int(value)) if kind == "int" else value


def _flag(text: str, where: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise ParameterError(f"{where}: log={text!r}; expected true or false.")


def _text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _num(value: float | None) -> str:
    if value is None:
        return ""
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else repr(value)
