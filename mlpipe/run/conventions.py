"""The ``mlpipe:`` section of an MLproject: its keys, what they mean, and their checks.

Read by ``mlpipe.run.project``'s linter, in the same pass as the rest of the file, so every
finding names its line; kept apart because the section grows with mlpipe (``sweep:``,
``preflight:``) while the MLproject's own rules are MLflow's.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

import yaml

CONVENTION_VERSION = 1
CONVENTION_KEYS = ("convention", "model", "dataset_param", "primary_metric", "primary_metric_goal")
OPTIONAL_KEYS = ("sweep", "preflight")
"""Keys of the ``mlpipe:`` section that a project may leave out."""
SWEEP_KEYS = ("entry_point", "space", "metric", "goal", "trials", "pruner", "sampler")
"""Keys of ``mlpipe: sweep:`` (the project's own search; ``mlpipe sweep`` reads it)."""
PREFLIGHT_KEYS = ("entry_point", "before")
"""Keys of ``mlpipe: preflight:`` (the project's own checks, run before a run exists)."""


@dataclass(frozen=True)
class Conventions:
    """The ``mlpipe:`` section; fields are None where the project leaves them out."""

    convention: int | None = None
    model: str | None = None
    dataset_param: str | None = None
    primary_metric: str | None = None
    primary_metric_goal: str | None = None
    sweep: dict[str, Any] | None = None
    """``mlpipe: sweep:`` as written (its shape checked here, its space by ``mlpipe sweep``)."""
    preflight: Preflight | None = None
    """``mlpipe: preflight:``: the entry point that checks a run's input before it exists."""


@dataclass(frozen=True)
class Preflight:
    """A project's own pre-flight check (``mlpipe.run.preflight`` runs it).

    mlpipe can check a parameter's type, not whether ``num_classes=2`` fits the labels a
    dataset declares; only the project knows that. Its ``entry_point`` gets the values of the
    parameters it declares and exits 2 to refuse the run, before ``mlpipe run`` creates it.
    """

    entry_point: str
    before: tuple[str, ...] = ("main", "train")
    """The entry points it guards."""


class ConventionChecks:
    """The ``mlpipe:`` section's checks, mixed into the MLproject linter (``mlpipe.run.project``),
    which provides ``_error``, ``_warn`` and ``convention``."""

    convention: bool = False
    """True once an ``mlpipe:`` section is seen: convention errors are errors, not warnings."""

    def _error(self, message: str, line: int | None, always: bool = False) -> None:
        raise NotImplementedError

    def _warn(self, message: str, line: int | None) -> None:
        raise NotImplementedError

    def _unknown_keys(
        self, section: dict, known: tuple[str, ...], root: Any, *path: str, always: bool = False
    ) -> None:
        """An error for each key of the section at ``path`` that is not ``known``, with the
        closest known key as a hint."""
        for key in section:
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                self._error(
                    f"unknown key {'.'.join(path)}.{key}{hint}",
                    yaml_line(root, *path, str(key)),
                    always,
                )

    def _conventions(self, data: dict, root: Any) -> Conventions | None:
        section = data.get("mlpipe")
        if section is None:
            self._warn(
                "no mlpipe: section: a foreign project; it runs with typed-parameter checks, "
                "and convention findings are warnings (add the section to follow convention 1)",
                None,
            )
            return None
        self.convention = True
        line = yaml_line(root, "mlpipe")
        if not isinstance(section, dict):
            self._error("mlpipe: must be a mapping with " + ", ".join(CONVENTION_KEYS), line)
            return Conventions()
        self._unknown_keys(section, CONVENTION_KEYS + OPTIONAL_KEYS, root, "mlpipe")
        for key in CONVENTION_KEYS:
            if section.get(key) in (None, ""):
                self._error(f"mlpipe.{key} is missing", line)
        convention = section.get("convention")
        if convention is not None and (
            type(convention) is not int or convention != CONVENTION_VERSION
        ):
            self._error(
                f"mlpipe.convention is {convention!r}; this mlpipe knows convention "
                f"{CONVENTION_VERSION}",
                yaml_line(root, "mlpipe", "convention"),
            )
        goal = section.get("primary_metric_goal")
        if goal is not None and goal not in ("max", "min"):
            self._error(
                f"mlpipe.primary_metric_goal is {goal!r}; expected max or min",
                yaml_line(root, "mlpipe", "primary_metric_goal"),
            )
        sweep = self._sweep(section.get("sweep"), root)
        preflight = self._preflight(section.get("preflight"), root)
        return Conventions(
            **{k: section.get(k) for k in CONVENTION_KEYS}, sweep=sweep, preflight=preflight
        )

    def _preflight(self, section: Any, root: Any) -> Preflight | None:
        """The shape of ``mlpipe: preflight:``; its links to the entry points are checked in
        ``_check_convention_links``, once they are read."""
        if section is None:
            return None
        line = yaml_line(root, "mlpipe", "preflight")
        shape = (
            "mlpipe.preflight must be an entry point name or a mapping with entry_point and "
            "before, e.g. {entry_point: check, before: [main, train]}"
        )
        if isinstance(section, str) and section.strip():
            return Preflight(entry_point=section.strip())
        if not isinstance(section, dict):
            self._error(shape, line, True)
            return None
        self._unknown_keys(section, PREFLIGHT_KEYS, root, "mlpipe", "preflight", always=True)
        entry = section.get("entry_point")
        if not isinstance(entry, str) or not entry.strip():
            self._error(shape, line, True)
            return None
        before = section.get("before", list(Preflight.before))
        if isinstance(before, str):
            before = [before]
        if not isinstance(before, list) or not all(isinstance(b, str) for b in before):
            self._error(
                f"mlpipe.preflight.before is {before!r}; expected a list of entry point names",
                yaml_line(root, "mlpipe", "preflight", "before"),
                True,
            )
            return None
        return Preflight(entry_point=entry.strip(), before=tuple(before))

    def _sweep(self, section: Any, root: Any) -> dict[str, Any] | None:
        """Check the shape of ``mlpipe: sweep:``; the space's expressions are parsed by
        ``mlpipe.sweep.space`` when a sweep starts, against the entry point's parameters."""
        if section is None:
            return None
        line = yaml_line(root, "mlpipe", "sweep")
        if not isinstance(section, dict):
            self._error("mlpipe.sweep must be a mapping with " + ", ".join(SWEEP_KEYS), line, True)
            return None
        self._unknown_keys(section, SWEEP_KEYS, root, "mlpipe", "sweep")
        space = section.get("space")
        if not isinstance(space, dict) or not space:
            self._error(
                "mlpipe.sweep.space must map parameter names to ranges, e.g. "
                "lr: loguniform(1e-4, 1e-2)",
                yaml_line(root, "mlpipe", "sweep", "space") or line,
                True,
            )
        else:
            for name, value in space.items():
                if not isinstance(value, (str, list)) or not value:
                    self._error(
                        f"mlpipe.sweep.space.{name} must be an expression such as "
                        "int(2, 8, step=2) or a list of choices",
                        yaml_line(root, "mlpipe", "sweep", "space", str(name)),
                        True,
                    )
        trials = section.get("trials")
        if trials is not None and (type(trials) is not int or trials < 1):
            self._error(
                f"mlpipe.sweep.trials is {trials!r}; expected a positive integer",
                yaml_line(root, "mlpipe", "sweep", "trials"),
                True,
            )
        goal = section.get("goal")
        if goal is not None and goal not in ("max", "min"):
            self._error(
                f"mlpipe.sweep.goal is {goal!r}; expected max or min",
                yaml_line(root, "mlpipe", "sweep", "goal"),
                True,
            )
        return dict(section)

    def _check_convention_links(
        self, conv: Conventions, entry_points: dict[str, Any], root: Any
    ) -> None:
        if conv.preflight is not None:
            self._check_preflight(conv.preflight, entry_points, root)
        dataset = conv.dataset_param
        if not dataset:
            return
        line = yaml_line(root, "mlpipe", "dataset_param")
        holders = [ep for ep in entry_points.values() if dataset in ep.params]
        if not holders:
            self._error(
                f"mlpipe.dataset_param {dataset!r} is not a parameter of any entry point", line
            )
        elif "train" in entry_points and dataset not in entry_points["train"].params:
            self._error(f"mlpipe.dataset_param {dataset!r} is not a parameter of train", line)
        for ep in holders:
            if ep.params[dataset].type not in ("path", "uri", "string"):
                self._error(
                    f"{ep.name}.{dataset} names a dataset; declare it as path, uri or string", line
                )

    def _check_preflight(
        self, preflight: Preflight, entry_points: dict[str, Any], root: Any
    ) -> None:
        """The check must exist, guard declared entry points, and be able to get every value
        it declares from each of them (it is handed the run's values, nothing else)."""
        line = yaml_line(root, "mlpipe", "preflight")
        check = entry_points.get(preflight.entry_point)
        if check is None:
            self._error(
                f"mlpipe.preflight names entry point {preflight.entry_point!r}, which is not "
                f"declared (declared: {', '.join(entry_points) or 'none'})",
                line,
                True,
            )
            return
        for name in preflight.before:
            guarded = entry_points.get(name)
            if guarded is None:
                self._error(
                    f"mlpipe.preflight.before names entry point {name!r}, which is not declared",
                    line,
                    True,
                )
                continue
            if name == preflight.entry_point:
                self._error(f"mlpipe.preflight cannot guard its own entry point {name!r}", line)
                continue
            missing = sorted(
                p for p, spec in check.params.items()
                if p not in guarded.params and spec.required
            )  # fmt: skip
            if missing:
                self._error(
                    f"pre-flight entry point {preflight.entry_point} needs "
                    f"{', '.join(missing)}, which {name} does not declare: declare them in "
                    f"{name} or give them defaults in {preflight.entry_point}",
                    line,
                    True,
                )


def yaml_line(root: Any, *keys: str) -> int | None:
    """1-based line of the key at ``keys`` in a composed YAML tree, or of its nearest parent."""
    node, found = root, None
    for key in keys:
        if not isinstance(node, yaml.MappingNode):
            break
        for key_node, value_node in node.value:
            if getattr(key_node, "value", None) == key:
                found = key_node.start_mark.line + 1
                node = value_node
                break
        else:
            break
    return found
