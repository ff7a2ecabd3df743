"""Build a validated `Config` from a YAML recipe plus dotted overrides, and save it.

Keys are checked against the dataclass tree before OmegaConf merges them, so a typo fails
with the closest valid key instead of OmegaConf's bare `ConfigKeyError`. Values are
type-checked by OmegaConf; cross-field rules live in the dataclasses' `__post_init__`.

`${oc.env:VAR}` is refused in recipes and overrides: the resolved config is saved
(`config.yaml`, checkpoints, logs, tracker params), so it would copy environment values such
as tokens into every copy of the run. `MMFM_ALLOW_OC_ENV=1` allows it, values saved included.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import itertools
import os
import re
import textwrap
import typing
from collections.abc import Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from omegaconf.resolvers import oc

from mmfm.config.layout import explain, resolve_layout
from mmfm.config.schema import Config, LayoutError
from mmfm.core.errors import ConfigError

T = TypeVar("T")


def _now(fmt: str = "%Y%m%d-%H%M%S") -> str:
    """`${now:%Y%m%d}` in a recipe: the launch time, e.g. for a fresh run_dir per launch."""
    return datetime.now().strftime(fmt)


# omegaconf 2.4 renamed register_new_resolver; 2.3 only has the old name.
_register = getattr(OmegaConf, "register_resolver", None) or OmegaConf.register_new_resolver
if not OmegaConf.has_resolver("now"):
    _register("now", _now, use_cache=True)


ENV_OPT_IN = "MMFM_ALLOW_OC_ENV"
_ENV_REFERENCE = re.compile(r"\$\{\s*oc\.env\s*:")
_ENV_REFUSED = (
    "reads an environment variable (${oc.env:...}), whose value would be saved in config.yaml, "
    f"checkpoints, logs and trackers: write the value itself, or set {ENV_OPT_IN}=1 to allow it"
)


def _env(*args: Any) -> Any:
    """`oc.env` only with the opt-in: the guard behind `_refuse_env` for any reference it
    did not see in the text."""
    if os.environ.get(ENV_OPT_IN) != "1":
        raise ConfigError(f"the config {_ENV_REFUSED}")
    return oc.env(*args)


_register("oc.env", _env, replace=True, use_cache=False)


def _refuse_env(node: Any, origin: str, prefix: str = "") -> None:
    if os.environ.get(ENV_OPT_IN) == "1":
        return
    items = node.items() if isinstance(node, dict) else enumerate(node)
    for key, value in items:
        dotted = f"{prefix}{key}"
        if isinstance(value, dict | list):
            _refuse_env(value, origin, dotted + ".")
        elif isinstance(value, str) and _ENV_REFERENCE.search(value):
            raise ConfigError(f"{origin}: {dotted} {_ENV_REFUSED}")


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _fields(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def valid_keys(cls: type = Config, prefix: str = "") -> Iterator[str]:
    """Every dotted key of the tree (sections and leaves)."""
    for name, tp in _fields(cls).items():
        key = f"{prefix}{name}"
        yield key
        if _is_dataclass_type(tp):
            yield from valid_keys(tp, key + ".")


def _check_keys(node: Any, cls: type, prefix: str, origin: str, root: type) -> None:
    if not isinstance(node, dict):
        return
    fields = _fields(cls)
    for key, value in node.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            candidates = list(valid_keys(root))
            close = difflib.get_close_matches(dotted, candidates, n=1, cutoff=0.5)
            if not close:
                leaf = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
                close = [f"{prefix}{leaf[0]}"] if leaf else []
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"unknown config key '{dotted}' in {origin}{hint}")
        if _is_dataclass_type(fields[key]):
            _check_keys(value, fields[key], dotted + ".", origin, root)


def _empty_nulls(layer: DictConfig, node: Any, cls: type, prefix: str = "") -> None:
    """`data.paths=null`: an empty list (or dict) where the field may not be None."""
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        tp = _fields(cls)[key]
        if _is_dataclass_type(tp):
            _empty_nulls(layer, value, tp, f"{prefix}{key}.")
        elif value is None and typing.get_origin(tp) in (list, dict):
            OmegaConf.update(layer, f"{prefix}{key}", typing.get_origin(tp)(), merge=False)


def _drop_alternatives(
    node: Any, cls: type, merged: DictConfig, named: set[str], prefix: str = ""
) -> None:
    """An override that sets one of a section's ALTERNATIVES (data.paths or data.sources)
    empties the others, unless an override names them too (then they clash, as asked):
    `data.sources=[...]` on the command line replaces a recipe's data.paths."""
    if not isinstance(node, dict):
        return
    alternatives = getattr(cls, "ALTERNATIVES", ())
    if any(name in node for name in alternatives):
        for f in dataclasses.fields(cls):
            if f.name in alternatives and f"{prefix}{f.name}" not in named:
                merged[f.name] = _default(f)
    for key, value in node.items():
        if _is_dataclass_type(tp := _fields(cls)[key]):
            _drop_alternatives(value, tp, merged[key], named, f"{prefix}{key}.")


def _as_container(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=False)  # type: ignore[return-value]


def load_config(
    recipe: str | Path | None = None,
    overrides: Sequence[str] = (),
    world_size: int | None = None,
    job: str | None = None,
) -> Config:
    """Merge the dataclass defaults, the YAML recipe and `key=value` overrides, then validate.
    With `world_size` (and `job`, where that number comes from) the layout is checked against
    it and parallel.dp_shard=-1 filled; layout errors list every broken rule and a layout
    that fits (config/layout.py)."""
    cfg = load_asked_config(recipe, overrides, world_size, job)
    return cfg if world_size is None else resolve_layout(cfg, world_size, job)


def load_asked_config(
    recipe: str | Path | None = None,
    overrides: Sequence[str] = (),
    world_size: int | None = None,
    job: str | None = None,
) -> Config:
    """`load_config` before the layout is resolved (parallel.dp_shard=-1 still -1): for a
    caller that resolves it itself and shows what was asked (`mmfm train --dry-run`)."""
    try:
        cfg = load_structured(Config, recipe, overrides)
    except LayoutError as e:
        raise explain(e, world_size, job) from None
    _check_eval_every(cfg, recipe, overrides)
    return cfg


def _check_eval_every(cfg: Config, recipe: str | Path | None, overrides: Sequence[str]) -> None:
    """eval.every asked for (by an override, or by a recipe that names no held-out data) in a
    config without held-out data would validate nothing, silently. A saved config.yaml spells
    out every key, eval.paths too, and so asks for nothing: old runs still load."""
    if cfg.eval.enabled:
        return
    origin = next((f"override {o!r}" for o in overrides if _key_path(o) == ["eval", "every"]), None)
    if origin is None and recipe is not None:
        section = OmegaConf.load(recipe).get("eval")
        if isinstance(section, DictConfig) and "every" in section:
            origin = None if {"paths", "sources"} & set(section) else str(recipe)
    if origin is not None:
        raise ConfigError(
            f"{origin}: eval.every={cfg.eval.every} has no held-out data to evaluate: set "
            "eval.paths or eval.sources too, or drop eval.every"
        )


def load_structured(
    root: type[T], recipe: str | Path | None = None, overrides: Sequence[str] = ()
) -> T:
    """`load_config` for any dataclass tree (training configs, tokenizer recipes, ...)."""
    layers: list[tuple[DictConfig, str, list[str] | None]] = []
    if recipe is not None:
        path = Path(recipe)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = OmegaConf.load(path)
        except Exception as e:  # yaml errors come in several types
            raise ConfigError(f"cannot parse {path}: {e}") from e
        if not isinstance(loaded, DictConfig):
            raise ConfigError(f"{path} must hold a mapping of sections (section: ...)")
        layers.append((loaded, str(path), None))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        try:
            layer = OmegaConf.from_dotlist([item])
        except Exception as e:  # yaml and OmegaConf grammar errors come in several types
            raise ConfigError(
                f"override {item!r} is not a valid value "
                f"({getattr(e, 'problem', None) or _first_line(e)}): close every bracket "
                "and quote, e.g. data.paths=[a,b] or key='text with [ or ,'"
            ) from None
        layers.append((layer, f"override {item!r}", _key_path(item)))

    named = {".".join(path[:i]) for _, _, path in layers if path for i in range(len(path) + 1)}
    merged = OmegaConf.structured(root)
    for layer, origin, path in layers:
        _refuse_env(_as_container(layer), origin)
        _check_keys(_as_container(layer), root, "", origin, root)
        _empty_nulls(layer, _as_container(layer), root)
        entry = _list_entry_key(path, root, merged, origin) if path else None
        if path and entry is None:
            _drop_alternatives(_as_container(layer), root, merged, named)
        try:
            if entry is None:
                merged = OmegaConf.merge(merged, layer)
            else:
                OmegaConf.update(merged, entry, OmegaConf.select(layer, ".".join(path)))
        except OmegaConfBaseException as e:
            raise ConfigError(f"{origin}: {_first_line(e)} (key {e.full_key})") from None
        except TypeError as e:  # OmegaConf's own, for a dotted index into a list
            raise ConfigError(f"{origin}: {e}: give a list whole, e.g. key=[a,b]") from None
    try:
        OmegaConf.resolve(merged)
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except ConfigError:
        raise
    except OmegaConfBaseException as e:
        if isinstance(e.__cause__, ConfigError):
            raise e.__cause__ from None
        raise ConfigError(f"{_first_line(e)} (key {e.full_key})") from None


def _key_path(override: str) -> list[str]:
    """The keys of `a.b[0].c=value` (or `a.b.0.c=value`): [a, b, 0, c], as OmegaConf parses it."""
    key = override.split("=", 1)[0].strip()
    return _INDEX.sub(r".\1", key).split(".")


_INDEX = re.compile(r"\[([^\]]*)\]")


def _list_entry_key(path: list[str], root: type, merged: DictConfig, origin: str) -> str | None:
    """The key (`data.sources.0.paths`) of an override that sets part of one entry of a list,
    checked against the schema and the list as the earlier layers left it; None for an
    override that goes through no list (merged whole, as a recipe is)."""
    tp, node, shown, indexed = root, merged, "", False
    for part in path:
        tp = _without_none(tp)
        if typing.get_origin(tp) is list:
            _check_index(part, shown, 0 if node is None else len(node), origin)
            tp, node, indexed = typing.get_args(tp)[0], node[int(part)], True
            shown = f"{shown}[{part}]"
            continue
        if _is_dataclass_type(tp):
            fields = _fields(tp)
            if part not in fields:
                if not indexed:
                    return None  # _check_keys has named it
                close = difflib.get_close_matches(part, list(fields), n=1, cutoff=0.5)
                hint = f"; did you mean '{shown}.{close[0]}'?" if close else ""
                raise ConfigError(f"unknown config key '{shown}.{part}' in {origin}{hint}")
            tp = fields[part]
        elif typing.get_origin(tp) is dict:
            tp = typing.get_args(tp)[1]
        else:
            break  # a leaf: any key below it is OmegaConf's to refuse
        node = None if node is None else node.get(part)
        shown = f"{shown}.{part}" if shown else part
    return ".".join(path) if indexed else None


def _check_index(part: str, shown: str, size: int, origin: str) -> None:
    if not part.isdigit():
        raise ConfigError(
            f"{origin}: {shown} is a list: set one entry by its index, e.g. {shown}[0], or "
            f"give the list whole, e.g. {shown}=[...]"
        )
    if int(part) >= size:
        raise ConfigError(
            f"{origin}: there is no {shown}[{part}]: {shown} has {size} "
            f"{'entry' if size == 1 else 'entries'} (indices from 0); give the list whole to "
            f"add one, e.g. {shown}=[...]"
        )


def _without_none(tp: Any) -> Any:
    """X of `X | None`."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if type(None) in typing.get_args(tp) and len(args) == 1 else tp


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(to_yaml(cfg))


def field_docs(cls: type = Config, prefix: str = "") -> Iterator[tuple[str, str, Any, str]]:
    """(dotted key, type, default, docstring) of every field, read from the source; a section
    (a dataclass, default MISSING) and then its fields, a list, dict or optional of a
    dataclass and then the fields of an entry: `data.sources[].kind`, `<key>.<name>.field`."""
    docs = _attribute_docstrings(cls)
    for f in dataclasses.fields(cls):
        key, tp = f"{prefix}{f.name}", _fields(cls)[f.name]
        default = dataclasses.MISSING if _is_dataclass_type(tp) else _default(f)
        yield key, _type_name(tp), default, docs.get(f.name, "")
        entry = _without_none(tp)
        if _is_dataclass_type(entry):
            yield from field_docs(entry, key + ".")
        elif typing.get_origin(entry) is list and _is_dataclass_type(typing.get_args(entry)[0]):
            yield from field_docs(typing.get_args(entry)[0], key + "[].")
        elif typing.get_origin(entry) is dict and _is_dataclass_type(typing.get_args(entry)[1]):
            yield from field_docs(typing.get_args(entry)[1], key + ".<name>.")


def _default(f: dataclasses.Field) -> Any:
    """A field's default, without building its class (whose checks may need more fields)."""
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _type_name(tp: Any) -> str:
    """`int`, `list[SourceConfig]`, `str | None`: the annotation without module prefixes."""
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return re.sub(r"\b(?:[A-Za-z_]\w*\.)+(\w+)", r"\1", str(tp))


@functools.cache
def _attribute_docstrings(cls: type) -> dict[str, str]:
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for stmt, nxt in itertools.pairwise(body):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs
