"""Write a MONAI transform chain down as canonical JSON, and build it again from that JSON.

"Which preprocessing was this model trained on?" is answered by a description logged with the
run: each transform's import path and every constructor argument. A service calls
:func:`load` with the run id and applies exactly that chain::

    desc = describe(Compose([LoadImaged(keys="image"), ScaleIntensityRanged("image", -57, 164)]))
    to_json(desc)   # {"compose":{...},"format":"mlpipe.preprocessing/1","transforms":[...]}
    rebuild(desc)   # an equivalent Compose
    load(run_id)    # the same, from the run's artifact mlpipe/preprocessing/train.json

MONAI transforms do not keep their constructor arguments, so :func:`describe` recovers each
one from the instance: an attribute of the same name or with a leading underscore, then on a
nested object one or two levels down (``ScaleIntensityRanged.scaler.a_min``), plus a few
recorded aliases for MONAI transforms that store a derived value (``pos``/``neg`` as
``pos_ratio``). A parameter that is found nowhere takes its default. That alone could drop a
setting silently, so every description is verified before it is returned: the chain is rebuilt
from it, and each rebuilt transform must hold the same state as the original, attribute by
attribute, nested objects included (random generators aside, and attributes the class sets
only outside ``__init__``: the last call's random draw or cache, so a chain that has already
run describes the same); describing the rebuilt chain must give the same description again.
Anything that fails, or a value that cannot be written down (a lambda, a local class, an
arbitrary object), raises :class:`PreprocessingError` naming the transform's index, class and
parameter.

Every argument is recorded, defaults included, so a service with a newer MONAI whose default
changed (``Orientationd``'s ``labels`` is announced to) still applies the trained settings.

JSON values: ``None``, booleans, ints, finite floats, strings (MONAI's string enums as their
value), lists (tuples become lists) and string-keyed dicts; everything else is a one-key
marker dict that :func:`rebuild` turns back into the object: ``{"__dtype__": "torch.float32"}``
or ``"numpy.float32"``, ``{"__object__": "pkg.module.function"}`` for importable classes and
functions, ``{"__instance__": {"target": ..., "args": ...}}`` for a nested object described
the same way (a reader, the transforms of a ``OneOf``), ``{"__float__": "nan"}``,
``{"__enum__": "pkg.Enum", "value": ...}``, and ``{"__ndarray__": [...], "dtype": "float32"}``
or ``{"__tensor__": ...}`` for arrays.

Rebuilding imports the recorded paths and calls those constructors: load descriptions only
from runs you trust, as you would a pickled model.

Kept whole: describing and rebuilding are the two halves of one format, verified against each
other on every call (the encoder's recovery rules and the decoder's markers must agree line by
line), so they read better side by side than in two modules that import each other.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import importlib
import inspect
import json
import math
import re
import sys
import tempfile
import types
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlpipe.core.errors import PreprocessingError

if TYPE_CHECKING:
    from monai.transforms import Compose

FORMAT = "mlpipe.preprocessing/1"
"""Written into every description; :func:`rebuild` refuses any other."""

ARTIFACT_DIR = "mlpipe/preprocessing"
"""Run artifact folder: the description of preprocessing ``name`` is ``<dir>/<name>.json``."""

DIGEST_TAG = "mlpipe.preprocessing.digest"
"""Run tag holding :func:`digest` of the logged description (DESIGN.md)."""

PARAM_PREFIX = "prep"
MAX_PARAM_KEY_LENGTH = 250
MAX_PARAM_VALUE_LENGTH = 6000
"""MLflow's limits (``mlflow.utils.validation``): longer keys are refused, longer values cut."""

TRUNCATED = "...[truncated]"
"""Ends a flat parameter value that was cut to fit; the JSON artifact keeps the whole value."""

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
_SEARCH_DEPTH = 2
_NESTING_LIMIT = 8
_DESCRIPTION_KEYS = frozenset({"format", "compose", "transforms"})
_MARKERS = frozenset(
    {
        "__dtype__",
        "__object__",
        "__instance__",
        "__float__",
        "__enum__",
        "__ndarray__",
        "__tensor__",
    }
)


def describe(transform: Any) -> dict:
    """Write a transform chain down as a canonical, verified description.

    Args:
        transform: a MONAI ``Compose``, a list or tuple of transforms, a single transform, or a
            plain dict of the description's own shape: ``{"transforms": [{"target":
            "monai.transforms.ScaleIntensityRanged", "args": {...}}, ...]}`` with optional
            ``"format"`` (must be :data:`FORMAT`) and ``"compose"`` (``Compose`` arguments).
            A dict may leave arguments out; they take their defaults and come back filled in.
            Other dicts (free-form settings) are refused: a description is only useful to a
            service if it can be rebuilt.

    Returns:
        ``{"format": FORMAT, "compose": {...}, "transforms": [{"target", "args"}, ...]}`` with
        every constructor argument, ready for :func:`to_json`.

    Raises:
        PreprocessingError: a transform, parameter or value that cannot be written down, or a
            description that does not rebuild into the same chain; the message names the
            transform's index and class and the parameter.
    """
    if isinstance(transform, Mapping):
        return _describe_compose(rebuild(transform))
    from monai.transforms import Compose

    if type(transform) is Compose:
        return _describe_compose(transform)
    if isinstance(transform, (list, tuple)):
        return _describe_items(list(transform), compose=None)
    if isinstance(transform, (str, bytes)) or not callable(transform):
        raise PreprocessingError(
            f"Cannot describe a {type(transform).__name__} as preprocessing: pass a MONAI "
            "Compose, a list of transforms, or a dict like "
            '{"transforms": [{"target": "monai.transforms.X", "args": {...}}]}.'
        )
    return _describe_items([transform], compose=None)


def to_json(description: dict) -> str:
    """The canonical text of a description: sorted keys, no spaces, shortest float repr.

    The same description always gives the same bytes, so :func:`digest` identifies it.

    Raises:
        PreprocessingError: a value JSON cannot hold (describe() never produces one).
    """
    try:
        return json.dumps(
            description, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
        )
    except (TypeError, ValueError) as exc:
        raise PreprocessingError(
            f"Preprocessing description is not plain JSON ({exc}); build it with describe()."
        ) from exc


def digest(description: dict) -> str:
    """SHA-256 hex of :func:`to_json`: equal for equal chains, different if one argument differs."""
    return hashlib.sha256(to_json(description).encode("utf-8")).hexdigest()


def artifact_path(name: str) -> str:
    """Run-relative artifact path of preprocessing ``name``: ``mlpipe/preprocessing/<name>.json``.

    Raises:
        PreprocessingError: a name that is not a safe file and parameter name.
    """
    _check_name(name)
    return f"{ARTIFACT_DIR}/{name}.json"


def flat_params(description: dict, name: str) -> dict[str, str]:
    """One MLflow parameter per argument, so runs compare side by side in the UI.

    Keys are ``prep.<name>.<index>.<Class>.<arg>`` (``prep.train.4.ScaleIntensityRanged.a_min``)
    and ``prep.<name>.compose.<arg>``. Strings stay as they are, other values are compact
    JSON with markers shown plainly (``torch.float32``). A value over 6000 characters is cut
    and ends in :data:`TRUNCATED` (the artifact keeps it whole); a key over 250 characters
    keeps its head and ends in ``~`` and 8 hex digits of its SHA-256, so it stays unique.

    Args:
        description: from :func:`describe`.
        name: the preprocessing's name (``train``, ``val``).

    Raises:
        PreprocessingError: a bad name or a description of the wrong shape.
    """
    _check_name(name)
    _check_description(description)
    params: dict[str, str] = {}
    for index, item in enumerate(description["transforms"]):
        class_name = item["target"].rsplit(".", 1)[-1]
        for arg, value in sorted(item.get("args", {}).items()):
            key = f"{PARAM_PREFIX}.{name}.{index}.{class_name}.{arg}"
            params[_fit_key(key)] = _fit_value(_render(value))
    for arg, value in sorted(description.get("compose", {}).items()):
        params[_fit_key(f"{PARAM_PREFIX}.{name}.compose.{arg}")] = _fit_value(_render(value))
    return params


def rebuild(description: Mapping[str, Any]) -> Compose:
    """Build the ``Compose`` a description stands for.

    Args:
        description: from :func:`describe` or :func:`load`'s artifact, or a hand-written dict
            of the same shape (arguments left out take their defaults).

    Returns:
        A new ``monai.transforms.Compose``; its random state is fresh (seed it with
        ``set_random_state`` where a run must repeat).

    Raises:
        PreprocessingError: a description of the wrong shape or format, a path that does not
            import, or a constructor that refuses the recorded arguments (a MONAI version
            without that parameter, say); the message names the transform.
    """
    _check_description(description)
    from monai.transforms import Compose

    items = [
        _build(item, f"transform {index} ({_short_name(item['target'])})", depth=0)
        for index, item in enumerate(description["transforms"])
    ]
    compose_args = {
        key: _decode(value, f"Compose parameter {key!r}", depth=0)
        for key, value in description.get("compose", {}).items()
    }
    try:
        return Compose(items, **compose_args)
    except Exception as exc:
        raise PreprocessingError(
            f"Compose cannot be rebuilt with the recorded arguments {sorted(compose_args)}: {exc}"
        ) from exc


def load(run_id: str, name: str = "train", *, tracking_uri: str | None = None) -> Compose:
    """Rebuild the preprocessing that run ``run_id`` logged under ``name``.

    Args:
        run_id: the training run.
        name: which of the run's preprocessing chains (``train``, ``val``...).
        tracking_uri: where the run lives; by default the URI set with
            ``mlflow.set_tracking_uri`` or ``MLFLOW_TRACKING_URI``, else mlpipe's settings
            (``mlpipe.yaml``, the user's config, ``./mlruns.db``).

    Returns:
        The rebuilt ``Compose``.

    Raises:
        NotFoundError: no such run.
        PreprocessingError: the run has no preprocessing ``name`` (the message lists the ones
            it has), or its description does not rebuild here.
        TrackingUnavailableError: the tracking server does not answer.
    """
    path = artifact_path(name)
    from mlflow import MlflowClient

    from mlpipe.core.tracking import translate_errors

    client = MlflowClient(tracking_uri=_tracking_uri(tracking_uri))
    with translate_errors(f"run {run_id}"):
        client.get_run(run_id)
        names = sorted(
            Path(info.path).name[: -len(".json")]
            for info in client.list_artifacts(run_id, ARTIFACT_DIR)
            if not info.is_dir and info.path.endswith(".json")
        )
    if name not in names:
        have = ", ".join(names) if names else "none"
        raise PreprocessingError(
            f"Run {run_id} has no preprocessing named {name!r} (no artifact {path}); "
            f"preprocessing logged with this run: {have}."
        )
    with tempfile.TemporaryDirectory(prefix="mlpipe-prep-") as tmp:
        with translate_errors(f"run {run_id} artifact {path}"):
            local = client.download_artifacts(run_id, path, tmp)
        text = Path(local).read_text(encoding="utf-8")
    try:
        description = json.loads(text)
    except ValueError as exc:
        raise PreprocessingError(f"Run {run_id}: {path} is not valid JSON ({exc}).") from exc
    return rebuild(description)


# --- describing -----------------------------------------------------------------------------


def _describe_compose(compose: Any) -> dict:
    return _describe_items(list(compose.transforms), compose=compose)


def _describe_items(items: list[Any], *, compose: Any | None) -> dict:
    transforms = []
    unfound: list[list[str]] = []
    for index, item in enumerate(items):
        where = f"transform {index} ({type(item).__name__})"
        if not _is_plain_object(item) or not callable(item):
            raise PreprocessingError(
                f"{where}: {_brief(item)} is not a transform object; only instances of an "
                "importable class can be described (wrap a function in a transform class)."
            )
        described, missing = _describe_object(item, where, depth=0)
        transforms.append(described)
        unfound.append(missing)
    if compose is None:
        from monai.transforms import Compose

        compose_args = _encode_defaults(Compose, exclude={"transforms"}, where="Compose")
    else:
        compose_args = _describe_object(compose, "Compose", depth=0, exclude={"transforms"})[0][
            "args"
        ]
    description = {"format": FORMAT, "compose": compose_args, "transforms": transforms}
    _verify(description, items, compose, unfound)
    return description


def _describe_object(
    obj: Any, where: str, *, depth: int, exclude: frozenset[str] | set[str] = frozenset()
) -> tuple[dict, list[str]]:
    """``{"target", "args"}`` for one object, and the parameters that took their defaults."""
    cls = type(obj)
    target = _import_path(cls, where)
    try:
        signature = inspect.signature(cls)
    except (TypeError, ValueError) as exc:
        raise PreprocessingError(f"{where}: its constructor signature cannot be read.") from exc
    args: dict[str, Any] = {}
    unfound: list[str] = []
    for param in signature.parameters.values():
        if param.name in exclude:
            continue
        label = f"{where}: parameter {param.name!r}"
        if param.kind is param.POSITIONAL_ONLY:
            raise PreprocessingError(
                f"{label} is positional-only; only keyword-callable constructors can be rebuilt."
            )
        if param.kind is param.VAR_POSITIONAL:
            found, value = _lookup(obj, param.name)
            if found and value:
                raise PreprocessingError(f"{label}: extra positional arguments cannot be recorded.")
            continue
        if param.kind is param.VAR_KEYWORD:
            found, value = _lookup(obj, param.name)
            if not found:
                found, value = _lookup(obj, "kwargs")
            if not found:
                unfound.append(f"**{param.name}")
                continue
            if not isinstance(value, Mapping):
                raise PreprocessingError(f"{label}: expected a dict of keyword arguments.")
            for key, item in value.items():
                if key in signature.parameters:
                    raise PreprocessingError(f"{label}: {key!r} is also a named parameter.")
                args[str(key)] = _encode(item, f"{where}: parameter {key!r}", depth)
            continue
        found, value = _lookup(obj, param.name)
        if not found:
            if param.default is param.empty:
                raise PreprocessingError(
                    f"{label} has no default and is not stored on the instance (no attribute "
                    f"{param.name!r} or '_{param.name}'); store it as self.{param.name} in "
                    "__init__ so the transform can be described."
                )
            value = param.default
            unfound.append(param.name)
        args[param.name] = _encode(value, label, depth)
    return {"target": target, "args": args}, unfound


def _encode_defaults(cls: type, *, exclude: set[str], where: str) -> dict:
    args = {}
    for param in inspect.signature(cls).parameters.values():
        if param.name in exclude or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        args[param.name] = _encode(param.default, f"{where}: parameter {param.name!r}", 0)
    return args


def _lookup(obj: Any, name: str) -> tuple[bool, Any]:
    """Find a constructor argument on ``obj``, then breadth-first on nested objects."""
    level = [obj]
    seen = {id(obj)}
    for depth in range(_SEARCH_DEPTH + 1):
        children = []
        for candidate in level:
            known = _known_values(candidate)
            if name in known:
                return True, known[name]
            if depth < _SEARCH_DEPTH:
                for child in _children(candidate):
                    if id(child) not in seen:
                        seen.add(id(child))
                        children.append(child)
        level = children
    return False, None


def _known_values(obj: Any) -> dict[str, Any]:
    state = getattr(obj, "__dict__", None)
    if not isinstance(state, dict):
        return {}
    values = {
        key[1:]: value
        for key, value in state.items()
        if key.startswith("_") and not key.startswith("__")
    }
    values.update(state)  # an attribute of the exact name wins over "_name"
    recover = _RECOVERERS.get(_qualified(type(obj)))
    if recover is not None:
        values.update(recover(obj))
    return values


def _children(obj: Any) -> list[Any]:
    return [value for value in vars(obj).values() if _is_plain_object(value)]


def _is_plain_object(value: Any) -> bool:
    if isinstance(value, (type, types.ModuleType, types.FunctionType, types.MethodType)):
        return False
    module = type(value).__module__
    if module == "builtins" or module.split(".")[0] in ("numpy", "torch", "logging"):
        return False
    return isinstance(getattr(value, "__dict__", None), dict)


def _encode(value: Any, where: str, depth: int) -> Any:
    """A JSON-able stand-in for ``value`` that :func:`_decode` turns back into an equal one."""
    import numpy as np
    import torch

    if value is None or type(value) in (bool, int, str):
        return value
    if isinstance(value, enum.Enum):
        if isinstance(value, str):
            return value.value
        enum_path = _import_path(type(value), where)
        return {"__enum__": enum_path, "value": _encode(value.value, where, depth)}
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        number = float(value)
        return number if math.isfinite(number) else {"__float__": repr(number)}
    if isinstance(value, (str, np.str_)):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_encode(item, where, depth) for item in value]
    if isinstance(value, dict):
        encoded = {}
        for key, item in value.items():
            if not isinstance(key, str) or key in _MARKERS:
                raise PreprocessingError(f"{where}: dict key {key!r} cannot be recorded.")
            encoded[key] = _encode(item, where, depth)
        return encoded
    if isinstance(value, torch.dtype):
        return {"__dtype__": str(value)}
    if isinstance(value, np.dtype) or (isinstance(value, type) and issubclass(value, np.generic)):
        return {"__dtype__": f"numpy.{_numpy_dtype_name(value, where)}"}
    if isinstance(value, np.ndarray):
        if value.dtype.hasobject:
            raise PreprocessingError(f"{where}: an object array cannot be recorded.")
        return {
            "__ndarray__": _encode(value.tolist(), where, depth),
            "dtype": _numpy_dtype_name(value.dtype, where),
        }
    if isinstance(value, torch.Tensor):
        return {
            "__tensor__": _encode(value.detach().cpu().tolist(), where, depth),
            "dtype": str(value.dtype).removeprefix("torch."),
        }
    if isinstance(value, functools.partial):
        raise PreprocessingError(
            f"{where} is a functools.partial, which cannot be written down; use a module-level "
            "function or a transform class with the arguments as constructor parameters."
        )
    if isinstance(value, (type, types.FunctionType, types.BuiltinFunctionType, np.ufunc)):
        return {"__object__": _import_path(value, where)}
    if callable(value) and isinstance(value, (types.MethodType, types.BuiltinMethodType)):
        raise PreprocessingError(f"{where} is a bound method, which cannot be written down.")
    if _is_plain_object(value):
        if depth >= _NESTING_LIMIT:
            raise PreprocessingError(f"{where}: objects nested too deep to record.")
        nested, _ = _describe_object(value, f"{where} ({type(value).__name__})", depth=depth + 1)
        return {"__instance__": nested}
    raise PreprocessingError(
        f"{where}: a {type(value).__module__}.{type(value).__qualname__} cannot be written down "
        "as JSON."
    )


def _numpy_dtype_name(value: Any, where: str) -> str:
    import numpy as np

    dtype = np.dtype(value)
    if dtype.fields is not None or dtype.subdtype is not None or dtype.hasobject:
        raise PreprocessingError(f"{where}: numpy dtype {dtype} cannot be recorded.")
    return dtype.name


def _import_path(obj: Any, where: str) -> str:
    """The shortest ``package.module.Name`` that imports ``obj`` itself.

    ``monai.transforms.ScaleIntensityRanged`` rather than its defining module: MONAI keeps the
    package-level names stable while it moves modules around.
    """
    name = getattr(obj, "__name__", repr(obj))
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if module is None and type(obj).__name__ == "ufunc":  # np.abs: no module of its own
        module, qualname = "numpy", name
    if not module or not qualname:
        raise PreprocessingError(f"{where}: {name} has no import path.")
    if qualname == "<lambda>" or "<lambda>" in qualname:
        raise PreprocessingError(
            f"{where} is a lambda, which cannot be written down and rebuilt; use a module-level "
            "function or a transform class importable by path."
        )
    if "<locals>" in qualname:
        raise PreprocessingError(
            f"{where}: {qualname} is defined inside a function and cannot be imported; define "
            "it at module level."
        )
    if module == "__main__":
        raise PreprocessingError(
            f"{where}: {qualname} is defined in the script being run (__main__), which a service "
            "cannot import; move it into a module of your package."
        )
    parts = module.split(".")
    for end in range(1, len(parts) + 1):
        prefix = ".".join(parts[:end])
        loaded = sys.modules.get(prefix)
        if loaded is None:
            continue
        # torch.abs says its qualname is _VariableFunctionsClass.abs: try the plain name too.
        for attribute in dict.fromkeys((qualname, name)):
            if _getattr_path(loaded, attribute) is obj:
                return f"{prefix}.{attribute}"
    raise PreprocessingError(
        f"{where}: {module}.{qualname} does not import as that name, so it cannot be rebuilt."
    )


def _getattr_path(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _short_name(target: str) -> str:
    return target.rsplit(".", 1)[-1]


# MONAI transforms that keep a constructor argument only in a derived form. Each function
# returns argument values that rebuild the same state; _verify checks that they do.


def _recover_load_image(obj: Any) -> dict[str, Any]:
    values = {"prune_meta_pattern": obj.pattern, "prune_meta_sep": obj.sep}
    if obj.auto_select:
        values["reader"] = None
    else:
        # The default readers come first; the user's follow, registered as given.
        defaults = _default_reader_count(type(obj))
        user = list(obj.readers[defaults:])
        values["reader"] = user[0] if len(user) == 1 else user
    return values


@functools.lru_cache(maxsize=8)
def _default_reader_count(cls: type) -> int:
    return len(cls().readers)


def _recover_load_imaged(obj: Any) -> dict[str, Any]:
    # Stored once per key; the constructor takes the one string.
    postfixes = set(obj.meta_key_postfix)
    return {"meta_key_postfix": postfixes.pop()} if len(postfixes) == 1 else {}


def _recover_ensure_channel_first(obj: Any) -> dict[str, Any]:
    return {"channel_dim": obj.input_channel_dim}


def _recover_pos_neg(obj: Any) -> dict[str, Any]:
    ratio = obj.pos_ratio
    # Small whole numbers first, as people write them (pos=1, neg=1; pos=2, neg=1).
    for total in range(1, 21):
        for pos in range(total, -1, -1):
            if pos / total == ratio:
                return {"pos": float(pos), "neg": float(total - pos)}
    for pos, neg in ((ratio, 1.0 - ratio), (ratio / (1.0 - ratio) if ratio < 1 else 1.0, 1.0)):
        if pos + neg > 0 and pos / (pos + neg) == ratio:
            return {"pos": pos, "neg": neg}
    return {}


_RECOVERERS: dict[str, Callable[[Any], dict[str, Any]]] = {
    "monai.transforms.io.array.LoadImage": _recover_load_image,
    "monai.transforms.io.dictionary.LoadImaged": _recover_load_imaged,
    "monai.transforms.utility.array.EnsureChannelFirst": _recover_ensure_channel_first,
    "monai.transforms.croppad.array.RandCropByPosNegLabel": _recover_pos_neg,
}


# --- verifying ------------------------------------------------------------------------------


def _verify(
    description: dict, originals: list[Any], compose: Any | None, unfound: list[list[str]]
) -> None:
    """Rebuild the description and require the same transforms, and the same description."""
    rebuilt = rebuild(description)
    for index, (original, copy) in enumerate(zip(originals, rebuilt.transforms, strict=True)):
        difference = _difference(original, copy, type(original).__name__, set())
        if difference is not None:
            guessed = ", ".join(unfound[index]) or "none"
            raise PreprocessingError(
                f"transform {index} ({type(original).__name__}): rebuilt from the recovered "
                f"arguments it differs from the original at {difference}. Parameters not "
                f"found on the instance, taken as their defaults: {guessed}. Store each "
                "constructor argument as an attribute of the same name (self.<arg> or "
                "self._<arg>) so the transform can be described."
            )
    if compose is not None:
        own = {k: v for k, v in vars(compose).items() if k != "transforms"}
        again = {k: v for k, v in vars(rebuilt).items() if k != "transforms"}
        difference = _difference(own, again, "Compose", set())
        if difference is not None:
            raise PreprocessingError(f"Compose: rebuilt, it differs at {difference}.")
    redescribed = [
        _describe_object(t, f"transform {index} ({type(t).__name__})", depth=0)[0]
        for index, t in enumerate(rebuilt.transforms)
    ]
    for index, (first, second) in enumerate(
        zip(description["transforms"], redescribed, strict=True)
    ):
        if to_json(first) != to_json(second):
            changed = sorted(
                key
                for key in set(first["args"]) | set(second["args"])
                if first["args"].get(key, _ABSENT) != second["args"].get(key, _ABSENT)
            )
            raise PreprocessingError(
                f"transform {index} ({_short_name(first['target'])}): describing the rebuilt "
                f"transform gives other arguments ({', '.join(changed) or 'target'}), so the "
                "description would not round-trip."
            )


_ABSENT = object()


def _difference(a: Any, b: Any, path: str, seen: set[tuple[int, int]]) -> str | None:
    """Where two transform states differ (``path: a != b``), or None if they are the same."""
    import numpy as np
    import torch

    if a is b:
        return None
    pair = (id(a), id(b))
    if pair in seen:
        return None
    random_states = (np.random.RandomState, np.random.Generator, torch.Generator)
    if isinstance(a, random_states) and isinstance(b, random_states):
        return None
    mismatch = f"{path}: {_brief(a)} != {_brief(b)}"
    if isinstance(a, (bool, np.bool_)) or isinstance(b, (bool, np.bool_)):
        same = isinstance(a, (bool, np.bool_)) and isinstance(b, (bool, np.bool_)) and a == b
        return None if same else mismatch
    numbers = (int, float, np.integer, np.floating)
    if isinstance(a, numbers) and isinstance(b, numbers):
        same = a == b or (math.isnan(float(a)) and math.isnan(float(b)))
        return None if same else mismatch
    if isinstance(a, str) and isinstance(b, str):
        return None if a == b else mismatch
    if _is_numpy_dtype(a) and _is_numpy_dtype(b):
        return None if np.dtype(a) == np.dtype(b) else mismatch
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return mismatch
        for index, (x, y) in enumerate(zip(a, b, strict=True)):
            found = _difference(x, y, f"{path}[{index}]", seen)
            if found:
                return found
        return None
    if type(a) is not type(b):
        return mismatch
    if isinstance(a, np.ndarray):
        nan = a.dtype.kind in "fc"
        same = a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b, equal_nan=nan)
        return None if same else mismatch
    if isinstance(a, torch.Tensor):
        same = a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        return None if same else mismatch
    seen.add(pair)
    if isinstance(a, dict):
        if set(a) != set(b):
            return f"{path}: keys {sorted(map(str, a))} != {sorted(map(str, b))}"
        for key in a:
            found = _difference(a[key], b[key], f"{path}[{key!r}]", seen)
            if found:
                return found
        return None
    if isinstance(a, types.FunctionType):
        if a.__code__ is not b.__code__:
            return mismatch
        cells_a = [c.cell_contents for c in a.__closure__ or ()]
        cells_b = [c.cell_contents for c in b.__closure__ or ()]
        parts = (
            (cells_a, cells_b, "closure"),
            (a.__defaults__, b.__defaults__, "defaults"),
            (a.__kwdefaults__, b.__kwdefaults__, "kwdefaults"),
        )
        for x, y, part in parts:
            found = _difference(x, y, f"{path}.<{part}>", seen)
            if found:
                return found
        return None
    if isinstance(a, functools.partial):
        return _difference((a.func, a.args, a.keywords), (b.func, b.args, b.keywords), path, seen)
    if isinstance(a, types.MethodType):
        if a.__func__ is not b.__func__:
            return mismatch
        return _difference(a.__self__, b.__self__, f"{path}.<self>", seen)
    if isinstance(a, (type, types.ModuleType, types.BuiltinFunctionType)):
        return mismatch  # not the same object (checked first)
    state_a = _state(a)
    state_b = _state(b)
    if isinstance(state_a, dict) and isinstance(state_b, dict):
        per_call = _per_call_attributes(type(a))
        for key in sorted(set(state_a) | set(state_b)):
            if key in per_call and not (
                _is_plain_object(state_a.get(key)) and _is_plain_object(state_b.get(key))
            ):
                continue  # the last call's draw or cache; a nested transform is still compared
            if key not in state_a or key not in state_b:
                return f"{path}.{key}: present on only one of them"
            found = _difference(state_a[key], state_b[key], f"{path}.{key}", seen)
            if found:
                return found
        return None
    try:
        return None if bool(a == b) else mismatch
    except Exception:
        return mismatch


@functools.lru_cache(maxsize=256)
def _per_call_attributes(cls: type) -> frozenset[str]:
    """Attributes a class sets outside ``__init__``: what the last call drew or cached.

    ``randomize()`` stores its draw on the instance (``_do_transform``, ``_rand_k``,
    ``centers``, ``rand_affine_grid.affine``...) and ``NibabelReader`` keeps the last file
    names, so a chain that has been applied differs from a fresh one there. Those are not
    settings. Read from the class's source, so custom transforms written the MONAI way are
    covered too; property setters (``lazy``) count as settings.
    """
    import ast
    import textwrap

    names: set[str] = set()
    for klass in cls.__mro__:
        if klass is object:
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if node.name == "__init__" or any(_is_setter(d) for d in node.decorator_list):
                continue  # settings: the constructor, and property setters such as ``lazy``
            for inner in ast.walk(node):
                if isinstance(inner, ast.Assign):
                    targets = list(inner.targets)
                elif isinstance(inner, ast.AugAssign) or (
                    isinstance(inner, ast.AnnAssign) and inner.value is not None
                ):
                    targets = [inner.target]
                else:
                    continue
                while targets:
                    target = targets.pop()
                    if isinstance(target, (ast.Tuple, ast.List)):
                        targets.extend(target.elts)
                    elif isinstance(target, ast.Starred):
                        targets.append(target.value)
                    elif (
                        isinstance(target, ast.Attribute)
                        and isinstance(target.value, ast.Name)
                        and target.value.id == "self"
                    ):
                        names.add(target.attr)  # not self.a.b: that changes a, not which a
    return frozenset(names)


def _is_setter(decorator: Any) -> bool:
    import ast

    return isinstance(decorator, ast.Attribute) and decorator.attr == "setter"


def _state(value: Any) -> dict | None:
    """What pickling keeps of ``value``: MONAI drops its thread-local tracing flag there."""
    state = getattr(value, "__dict__", None)
    if not isinstance(state, dict):
        return None
    getstate = getattr(value, "__getstate__", None)
    if getstate is not None:
        try:
            kept = getstate()
        except Exception:
            return state
        if isinstance(kept, dict):
            return kept
    return state


def _is_numpy_dtype(value: Any) -> bool:
    import numpy as np

    return isinstance(value, np.dtype) or (
        isinstance(value, type) and issubclass(value, np.generic)
    )


def _brief(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- rebuilding -----------------------------------------------------------------------------


def _check_description(description: Any) -> None:
    shape = (
        'expected {"format": "mlpipe.preprocessing/1", "compose": {...}, "transforms": '
        '[{"target": "monai.transforms.X", "args": {...}}, ...]} ("format" and "compose" '
        "optional)"
    )
    if not isinstance(description, Mapping):
        raise PreprocessingError(f"A preprocessing description must be a dict: {shape}.")
    unknown = sorted(set(description) - _DESCRIPTION_KEYS)
    if unknown:
        raise PreprocessingError(f"Unknown keys {unknown} in preprocessing description: {shape}.")
    fmt = description.get("format", FORMAT)
    if fmt != FORMAT:
        raise PreprocessingError(
            f"Preprocessing description has format {fmt!r}; this mlpipe reads {FORMAT!r}. "
            "Upgrade mlpipe to read it."
        )
    if not isinstance(description.get("compose", {}), Mapping):
        raise PreprocessingError(f'"compose" must be a dict of Compose arguments: {shape}.')
    transforms = description.get("transforms")
    if not isinstance(transforms, list):
        raise PreprocessingError(f'"transforms" must be a list: {shape}.')
    for index, item in enumerate(transforms):
        if (
            not isinstance(item, Mapping)
            or not isinstance(item.get("target"), str)
            or not isinstance(item.get("args", {}), Mapping)
            or set(item) - {"target", "args"}
        ):
            raise PreprocessingError(f"transform {index}: {item!r} has the wrong shape: {shape}.")


def _build(item: Mapping[str, Any], where: str, *, depth: int) -> Any:
    cls = _import(item["target"], where)
    args = {
        key: _decode(value, f"{where}: parameter {key!r}", depth)
        for key, value in item.get("args", {}).items()
    }
    try:
        return cls(**args)
    except Exception as exc:
        raise PreprocessingError(
            f"{where}: {item['target']} cannot be built with the recorded arguments: {exc}"
        ) from exc


def _decode(value: Any, where: str, depth: int) -> Any:
    if isinstance(value, list):
        return [_decode(item, where, depth) for item in value]
    if not isinstance(value, Mapping):
        return value
    marker = next((key for key in value if key in _MARKERS), None)
    if marker is None:
        return {key: _decode(item, where, depth) for key, item in value.items()}
    payload = value[marker]
    try:
        if marker == "__dtype__":
            return _decode_dtype(payload)
        if marker == "__object__":
            return _import(payload, where)
        if marker == "__instance__":
            if depth >= _NESTING_LIMIT:
                raise PreprocessingError(f"{where}: objects nested too deep to rebuild.")
            _check_description({"transforms": [payload]})
            return _build(payload, f"{where} ({_short_name(payload['target'])})", depth=depth + 1)
        if marker == "__float__":
            return float(payload)
        if marker == "__enum__":
            return _import(payload, where)(_decode(value["value"], where, depth))
        if marker in ("__ndarray__", "__tensor__"):
            import numpy as np
            import torch

            data = _decode(payload, where, depth)
            if marker == "__ndarray__":
                return np.array(data, dtype=value["dtype"])
            return torch.tensor(data, dtype=getattr(torch, value["dtype"]))
    except PreprocessingError:
        raise
    except Exception as exc:
        raise PreprocessingError(f"{where}: cannot rebuild {dict(value)!r}: {exc}") from exc
    raise AssertionError(marker)  # pragma: no cover - every marker is handled above


def _decode_dtype(name: str) -> Any:
    import numpy as np
    import torch

    library, _, dtype = name.partition(".")
    if library == "torch" and isinstance(getattr(torch, dtype, None), torch.dtype):
        return getattr(torch, dtype)
    if library == "numpy":
        return np.dtype(dtype).type
    raise ValueError(f"unknown dtype {name!r}")


def _import(path: str, where: str) -> Any:
    """Import ``package.module.Name`` (or ``package.module.Class.Inner``)."""
    parts = path.split(".")
    for end in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:end])
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            missing = exc.name or ""
            if module_name == missing or module_name.startswith(missing + "."):
                continue  # not a module: the name is an attribute further up
            raise PreprocessingError(f"{where}: importing {path} failed: {exc}") from exc
        except Exception as exc:
            raise PreprocessingError(f"{where}: importing {path} failed: {exc}") from exc
        found = _getattr_path(module, ".".join(parts[end:]))
        if found is None:
            raise PreprocessingError(
                f"{where}: {module_name} has no {'.'.join(parts[end:])!r} (is the installed "
                "version the one the run was trained with?)."
            )
        return found
    raise PreprocessingError(f"{where}: {path!r} cannot be imported.")


# --- names, parameters, settings ------------------------------------------------------------


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise PreprocessingError(
            f"Preprocessing name {name!r} must be 1-100 letters, digits, '_', '-' or '.', "
            "starting with a letter or digit (it becomes a file and parameter name)."
        )


def _render(value: Any) -> str:
    plain = _plain(value)
    if isinstance(plain, str):
        return plain
    return json.dumps(plain, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _plain(value: Any) -> Any:
    """Markers shown as people read them: ``torch.float32``, ``monai.data.NibabelReader(...)``."""
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if not isinstance(value, Mapping):
        return value
    if "__dtype__" in value:
        return value["__dtype__"]
    if "__object__" in value:
        return value["__object__"]
    if "__float__" in value:
        return value["__float__"]
    if "__enum__" in value:
        return _plain(value["value"])
    if "__ndarray__" in value:
        return _plain(value["__ndarray__"])
    if "__tensor__" in value:
        return _plain(value["__tensor__"])
    if "__instance__" in value:
        nested = value["__instance__"]
        args = json.dumps(
            _plain(nested.get("args", {})),
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=False,
        )
        return f"{nested['target']}({args})"
    return {key: _plain(item) for key, item in value.items()}


def _fit_key(key: str) -> str:
    if len(key) <= MAX_PARAM_KEY_LENGTH:
        return key
    tail = "~" + hashlib.sha256(key.encode("utf-8")).hexdigest()[:8]
    return key[: MAX_PARAM_KEY_LENGTH - len(tail)] + tail


def _fit_value(value: str) -> str:
    if len(value) <= MAX_PARAM_VALUE_LENGTH:
        return value
    return value[: MAX_PARAM_VALUE_LENGTH - len(TRUNCATED)] + TRUNCATED


def _tracking_uri(explicit: str | None) -> str | None:
    if explicit:
        return explicit
    import mlflow

    if mlflow.is_tracking_uri_set():
        return mlflow.get_tracking_uri()
    from mlpipe.core.settings import resolve_settings

    return resolve_settings().tracking_uri.value
