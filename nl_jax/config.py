"""Load a config file, apply command-line overrides, validate.

A run is ``config file + overrides`` (big_vision style)::

    python -m nl_jax train --config experiments/hope/tiny.py \\
        --config.train.steps=50 --config.data.batch_size=8

``--config path.py[:arg]`` names a Python file with ``get_config()`` (or
``get_config(arg)``).  ``--config.a.b=value`` replaces an existing key; the
value is parsed to the type of the value it replaces.  Every mistake (an
unknown key, a wrong type, an impossible value) raises ``ConfigError`` with a
message that names the key and what is allowed; the CLI turns it into exit 2.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import math
import os
import re
from collections.abc import Sequence
from typing import Any

import ml_collections

from nl_jax.errors import ConfigError

# The folder that holds the nl_jax package: the repository, or site-packages when
# installed.  Relative data paths of a config and relative --config paths start here.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The default config ships inside the package (nl_jax/configs/), so an installed
# nl_jax trains without the repository's experiments/ folder.
DEFAULT_CONFIG = os.path.join("nl_jax", "configs", "hope", "tiny.py")


def default_config_path() -> str:
    """The README's default: Hope tiny, ``nl_jax/configs/hope/tiny.py``."""
    from nl_jax import configs
    return configs.path("hope/tiny.py")


def _config_import_root(path: str) -> str | None:
    """The folder to put on ``sys.path`` so that the config file at ``path`` can
    import the package it belongs to: the parent of the outermost folder of an
    unbroken chain of ``__init__.py`` folders above it (``experiments/hope/340m.py``
    -> the repository, whence ``from experiments.hope import common``).  None when
    that package is importable already (``nl_jax/configs/*``) or the file is in no
    package: it imports what ``sys.path`` already reaches (the installed nl_jax,
    ``from nl_jax.configs import base``; with ``python -m``, the working directory)."""
    folder, top = os.path.dirname(os.path.abspath(path)), None
    while os.path.isfile(os.path.join(folder, "__init__.py")):
        top, folder = folder, os.path.dirname(folder)
        if folder == top:
            break
    if top is None:
        return None
    try:
        found = importlib.util.find_spec(os.path.basename(top))
    except (ImportError, ValueError):
        found = None
    places = (found.submodule_search_locations or []) if found else []
    if any(os.path.realpath(p) == os.path.realpath(top) for p in places):
        return None
    return os.path.dirname(top)


def _display(path: str) -> str:
    """``path`` relative to the working directory when inside it (as the user wrote it)."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def _raised_at(err: BaseException, path: str) -> str:
    """``line N`` of the config file's deepest frame in ``err``'s traceback, plus
    the deepest frame of the repository when that is another file."""
    import traceback
    frames = traceback.extract_tb(err.__traceback__)
    target = os.path.abspath(path)
    mine = [f for f in frames if os.path.abspath(f.filename) == target]
    where = f"line {mine[-1].lineno}" if mine else "(no line of it on the stack)"
    def user_file(name: str) -> bool:   # the repository's own code, not a library
        name = os.path.abspath(name)
        return (name.startswith(REPO_ROOT + os.sep) and name != target
                and "site-packages" not in name and name != os.path.abspath(__file__))
    inner = [f for f in frames if user_file(f.filename)]
    if inner and (not mine or frames.index(inner[-1]) > frames.index(mine[-1])):
        where += f" (raised in {_display(inner[-1].filename)} line {inner[-1].lineno})"
    return where


def _describe(err: BaseException) -> str:
    text = " ".join(str(err).split()) or "(no message)"
    return f"{type(err).__name__}: {text}"


def load_config_file(spec: str, *, strict: bool = True) -> ml_collections.ConfigDict:
    """Loads ``path.py`` or ``path.py:arg`` and calls its ``get_config``.

    With ``strict`` (the default) the result may hold only the keys that
    ``nl_jax/configs/base.py`` and the family schemas know (``check_known_keys``).
    Any exception while the file runs is a ``ConfigError`` naming the file and
    line, so the command line prints one ``error:`` line instead of a traceback.
    """
    path, _, arg = spec.partition(":")
    if not os.path.isabs(path) and not os.path.exists(path):
        path = os.path.join(REPO_ROOT, path)
    if not os.path.isfile(path):
        raise ConfigError(f"--config: file {spec!r} not found (give a path to a "
                          f"Python file with get_config(), e.g. {DEFAULT_CONFIG})")
    shown = _display(path)
    module_spec = importlib.util.spec_from_file_location("_nl_jax_config", path)
    module = importlib.util.module_from_spec(module_spec)
    import sys
    root = _config_import_root(path)
    if root is not None and root not in sys.path:
        sys.path.insert(0, root)   # so the file can import its siblings by package name
    try:
        module_spec.loader.exec_module(module)
    except SyntaxError as e:
        if os.path.abspath(e.filename or "") != os.path.abspath(path):
            raise ConfigError(f"--config: {shown}: importing it failed: {e.filename} line "
                              f"{e.lineno}: syntax error: {e.msg}") from None
        raise ConfigError(f"--config: {shown} line {e.lineno}: syntax error: {e.msg}") from None
    except Exception as e:
        fix = "fix that line"
        if isinstance(e, ModuleNotFoundError) and e.name == "experiments":
            fix = ("the repository's experiments/ folder is not importable here: import "
                   "the base config from the library (`from nl_jax.configs import base`) "
                   "or run from the repository")
        raise ConfigError(f"--config: {shown} {_raised_at(e, path)}: loading the file "
                          f"raised {_describe(e)}; {fix}") from None
    if not hasattr(module, "get_config"):
        raise ConfigError(f"--config: {shown} has no get_config() function")
    import inspect
    try:
        inspect.signature(module.get_config).bind(*([arg] if arg else []))
    except TypeError:
        wanted = ("takes an argument: use --config {path}:ARG" if not arg else
                  "takes no argument: use --config {path} without ':{arg}'")
        raise ConfigError(f"--config: get_config() in {shown} "
                          + wanted.format(path=spec.partition(':')[0], arg=arg)) from None
    try:
        config = module.get_config(arg) if arg else module.get_config()
    except Exception as e:
        raise ConfigError(f"--config: {shown} {_raised_at(e, path)}: get_config() raised "
                          f"{_describe(e)}; fix that line") from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"--config: get_config() in {shown} must return a "
                          f"ml_collections.ConfigDict, got {type(config).__name__}")
    if strict:
        check_known_keys(config, source=f"--config: {shown}")
    return config


# ----------------------------------------------------------------------------
# Strict configs: the keys a config file may set, and their types
# ----------------------------------------------------------------------------

ANY = object()   # a key whose value this check does not type (the model checks it)
NEVER = "never"

# model.cms: the keys ContinuumMemory reads (nl_jax/models/cms.py keeps them in a
# local set; tests/test_strict_config.py checks the two agree).
CMS_KEYS = dict(periods=ANY, variant="sequential", block="swiglu", d_ff=ANY, lr=0.0,
                target="input", use_cms=True, max_update=0.0, nested_lr=0.0)
# model.memory: Titans keys outside MemorySpec (nl_jax/models/titans.py TITANS_KEYS).
TITANS_TYPES = dict(segment_len=0, n_persistent=0, window=0, remat_segments=False)


def _group_schemas() -> dict[str, dict[str, Any]]:
    """``{dotted group: {key: example value}}`` for the family groups that
    ``nl_jax/configs/base.py`` does not hold: their known keys come from the
    models' own definitions."""
    import dataclasses

    from nl_jax.memory.spec import MemorySpec
    from nl_jax.models import self_modifying, titans
    memory = {f.name: f.default for f in dataclasses.fields(MemorySpec)}
    memory.update({k: TITANS_TYPES.get(k, ANY) for k in titans.TITANS_KEYS})
    return {"model.memory": memory,
            "model.self_modifying": dict(self_modifying.DEFAULTS),
            "model.cms": dict(CMS_KEYS)}


def base_config() -> ml_collections.ConfigDict:
    """``nl_jax/configs/base.py``'s ``get_config()``: the keys every config knows."""
    from nl_jax.configs import base
    return base.get_config()


def _type_error(key: str, value: Any, example: Any) -> str | None:
    """What is wrong with ``value`` for a key whose known value is ``example``
    (the rules of ``_parse_value``: the type of the value it replaces)."""
    if example is ANY or example is None:
        return None
    if isinstance(example, bool):
        return None if isinstance(value, bool) else "expected a boolean (True/False)"
    if isinstance(example, int):
        ok = (isinstance(value, int) and not isinstance(value, bool)) or value == NEVER
        return None if ok else "expected an integer"
    if isinstance(example, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return None if ok else "expected a number"
    if isinstance(example, str):
        return None if isinstance(value, str) else "expected a string"
    if isinstance(example, (tuple, list)):
        return None if isinstance(value, (tuple, list)) else "expected a tuple, e.g. (x,)"
    if isinstance(example, (dict, ml_collections.ConfigDict)):
        ok = isinstance(value, (dict, ml_collections.ConfigDict))
        return None if ok else "expected a group (dict) of keys"
    return None


def _unknown(source: str, key: str, known: Sequence[str], group: str) -> ConfigError:
    last = key.rsplit(".", 1)[-1]
    close = [k for k in known if k.rsplit(".", 1)[-1] == last]   # in another group
    close = close or difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if not close:
        tails = {k.rsplit(".", 1)[-1]: k for k in known}
        close = [tails[t] for t in difflib.get_close_matches(last, list(tails), n=1)]
    hint = f"did you mean {close[0]}? " if close else ""
    siblings = sorted(k.rsplit(".", 1)[-1] for k in known
                      if k.rpartition(".")[0] == group)
    return ConfigError(f"{source}: unknown config key {key!r}; {hint}(keys under "
                       f"{group or 'the config'}: {', '.join(siblings)}); fix or remove it "
                       f"in the file")


def check_known_keys(config: ml_collections.ConfigDict, source: str = "config") -> None:
    """Every key of ``config`` is one that ``nl_jax/configs/base.py`` or a family
    schema knows, with a value of the known type; else a ``ConfigError`` naming
    the key and ``source`` (the config file) with a "did you mean".

    Open groups: ``levels`` (any level names; each ``params``, ``every``,
    ``optimizer``, the optimizer checked by the registry), ``mesh`` (any axis
    names), ``model.memory`` / ``model.self_modifying`` / ``model.cms`` (the
    keys the Titans, Hope and CMS modules read).
    """
    base = base_config()
    groups = _group_schemas()
    known: list[str] = _all_keys(base)
    for group, keys in groups.items():
        known += [group] + [f"{group}.{k}" for k in keys]

    def walk(node, schema, prefix):
        for k, value in node.items():
            key = prefix + k
            if prefix == "mesh.":
                if _type_error(key, value, 0) or value == NEVER:
                    raise ConfigError(f"{source}: config key {key}={value!r}: expected an "
                                      f"integer (a mesh axis size, -1 fills)")
                continue
            if key in groups:
                example = {}
            elif schema is not None and k in schema:
                example = schema[k]
            else:
                raise _unknown(source, key, known, prefix[:-1])
            problem = _type_error(key, value, example)
            if problem:
                raise ConfigError(f"{source}: config key {key}={value!r}: {problem} "
                                  f"(the type of nl_jax/configs/base.py's value); fix it in "
                                  f"the file")
            if key == "levels":
                check_levels(value, source)
            elif isinstance(value, ml_collections.ConfigDict):
                sub = groups.get(key, example)
                walk(value, sub, key + ".")

    walk(config, base, "")


LEVEL_KEYS = ("params", "every", "optimizer")


def check_levels(levels, source: str = "config") -> None:
    """``levels.<name>``: only ``params`` (a string), ``every`` (int or 'never')
    and ``optimizer`` (a spec the registry accepts)."""
    from nl_jax.optim import check_spec
    for name, level in levels.items():
        if not isinstance(level, (dict, ml_collections.ConfigDict)):
            raise ConfigError(f"{source}: config key levels.{name} must be a group "
                              f"dict(params=..., every=..., optimizer=...), got {level!r}")
        for k, value in level.items():
            key = f"levels.{name}.{k}"
            if k not in LEVEL_KEYS:
                raise _unknown(source, key, [f"levels.{name}.{x}" for x in LEVEL_KEYS],
                               f"levels.{name}")
            example = dict(params="", every=0, optimizer={})[k]
            problem = _type_error(key, value, example)
            if problem:
                raise ConfigError(f"{source}: config key {key}={value!r}: {problem}; fix "
                                  f"it in the file")
        if "optimizer" in level:
            try:
                check_spec(level["optimizer"], where=f"levels.{name}.optimizer")
            except ConfigError as e:
                raise ConfigError(f"{source}: {e}") from None


def _all_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in config.items():
        keys.append(prefix + k)
        if isinstance(v, ml_collections.ConfigDict):
            keys += _all_keys(v, prefix + k + ".")
    return keys


def _parse_value(key: str, text: str, current: Any) -> Any:
    """Parses ``text`` to the type of ``current``."""
    def literal():
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text
    if isinstance(current, bool):
        low = text.lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ConfigError(f"--config.{key}={text!r}: expected a boolean (true/false)")
    if isinstance(current, int):
        try:
            return int(text)
        except ValueError:
            if text == "never":  # a level/period that never updates
                return text
            raise ConfigError(f"--config.{key}={text!r}: expected an integer") from None
    if isinstance(current, float):
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"--config.{key}={text!r}: expected a number") from None
    if isinstance(current, str):
        return text
    if isinstance(current, (tuple, list)):
        value = literal()
        if isinstance(value, str):   # a bare list: 32,never -> (32, 'never')
            def item(part):
                try:
                    return ast.literal_eval(part)
                except (ValueError, SyntaxError):
                    return part
            value = tuple(item(part.strip()) for part in text.split(",") if part.strip())
        if not isinstance(value, (tuple, list)):
            value = (value,)
        return tuple(value)
    return literal()


SWAP_KEY = re.compile(r"levels\.([^.]+)\.optimizer\.name")
FALLBACK_KEY = re.compile(r"levels\.([^.]+)\.optimizer\.fallback")


def _swap_optimizers(config: ml_collections.ConfigDict,
                     overrides: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """``levels.<L>.optimizer.name=X`` replaces the level's optimizer settings by
    X's recipe (``nl_jax.optim.recipe``); returns the other overrides, which then
    apply on top (so keys set on the same command line win, whatever their order)."""
    rest = []
    for key, text in overrides:
        match = SWAP_KEY.fullmatch(key)
        levels = config.get("levels")
        if not match or not isinstance(levels, ml_collections.ConfigDict) or \
                not isinstance(levels.get(match.group(1)), ml_collections.ConfigDict) or \
                "optimizer" not in levels[match.group(1)]:
            rest.append((key, text))
            continue
        from nl_jax.optim import OPTIMIZERS, recipe
        if text not in OPTIMIZERS:
            close = difflib.get_close_matches(text, list(OPTIMIZERS), n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise ConfigError(f"--config.{key}={text!r} is not a registered optimizer; "
                              f"{hint}choose one of {', '.join(sorted(OPTIMIZERS))}")
        _set_value(config, ["levels", match.group(1), "optimizer"],
                   ml_collections.ConfigDict(recipe(text)))
    return rest


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: Sequence[tuple[str, str]]) -> ml_collections.ConfigDict:
    """Applies ``(dotted.key, text)`` overrides in order.

    Naming an optimizer (``levels.<L>.optimizer.name=X``) first replaces the
    level's optimizer settings by X's recipe (learning rate and schedule
    included); the other ``levels.<L>.optimizer.*`` overrides then apply on top.
    ``levels.<L>.optimizer.fallback=none`` keeps a matrix optimizer on all of
    the level's parameters.
    """
    overrides = _swap_optimizers(config, overrides)
    for key, text in overrides:
        if FALLBACK_KEY.fullmatch(key) and text.strip().lower() == "none":
            try:
                _set_value(config, key.split("."), "none")
            except (KeyError, AttributeError):
                raise ConfigError(f"unknown config key {key!r}") from None
            continue
        node = config
        parts = key.split(".")
        for i, part in enumerate(parts):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                where = ".".join(parts[:i]) or "the config"
                known = _all_keys(config)
                close = difflib.get_close_matches(key, known, n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                siblings = (sorted(node.keys())
                            if isinstance(node, ml_collections.ConfigDict) else [])
                raise ConfigError(f"unknown config key {key!r}{hint} (keys under "
                                  f"{where}: {', '.join(siblings)})")
            if i < len(parts) - 1:
                node = node[part]
        leaf = parts[-1]
        current = node[leaf]
        if isinstance(current, ml_collections.ConfigDict):
            raise ConfigError(f"--config.{key} is a group of keys "
                              f"({', '.join(sorted(current.keys()))}); set one of them")
        value = _parse_value(key, text, current)
        _set_value(config, parts, value)
    return config


def _set_value(config: ml_collections.ConfigDict, parts: list[str], value: Any) -> None:
    """Sets a key, allowing a change of type (e.g. an int period -> "never")."""
    node = config
    for part in parts[:-1]:
        node = node[part]
    try:
        with node.unlocked():
            node[parts[-1]] = value
    except TypeError:
        # ConfigDict is type-safe; rebuild the enclosing group with the new value.
        group = node.to_dict()
        group[parts[-1]] = value
        if len(parts) == 1:
            raise ConfigError(f"--config.{parts[0]}: cannot change the type of a "
                              f"top-level key") from None
        _set_value(config, parts[:-1], ml_collections.ConfigDict(group))


def parse_overrides(argv: Sequence[str]) -> tuple[str | None, list[tuple[str, str]], list[str]]:
    """Splits argv into (--config spec, [--config.key=value], other args)."""
    spec, overrides, rest = None, [], []
    it = iter(argv)
    for arg in it:
        if arg == "--config":
            spec = next(it, None)
            if spec is None:
                raise ConfigError("--config needs a path, e.g. --config experiments/hope/tiny.py")
        elif arg.startswith("--config="):
            spec = arg.split("=", 1)[1]
        elif arg.startswith("--config."):
            body = arg[len("--config."):]
            if "=" in body:
                key, text = body.split("=", 1)
            else:
                key, text = body, next(it, None)
                if text is None:
                    raise ConfigError(f"--config.{key} needs a value (--config.{key}=VALUE)")
            overrides.append((key, text))
        else:
            rest.append(arg)
    return spec, overrides, rest


def _require(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"config key {key}: {message}")


def _positive_int(config, key: str) -> int:
    node = config
    for part in key.split("."):
        node = node[part]
    _require(isinstance(node, int) and not isinstance(node, bool) and node > 0, key,
             f"must be a positive integer, got {node!r}")
    return node


def resolve_mesh_shape(mesh_cfg, device_count: int) -> dict[str, int]:
    """Fills one ``-1`` axis; the product must equal the device count."""
    shape = dict(mesh_cfg)
    for name, size in shape.items():
        _require(isinstance(size, int) and (size > 0 or size == -1), f"mesh.{name}",
                 f"must be a positive integer or -1 (fill), got {size!r}")
    fill = [n for n, s in shape.items() if s == -1]
    _require(len(fill) <= 1, "mesh", f"at most one axis may be -1, got {fill}")
    known = math.prod(s for s in shape.values() if s != -1)
    if fill:
        _require(device_count % known == 0, f"mesh.{fill[0]}",
                 f"cannot fill: {device_count} devices are not divisible by the "
                 f"product {known} of the other axes")
        shape[fill[0]] = device_count // known
    _require(math.prod(shape.values()) == device_count, "mesh",
             f"shape {shape} uses {math.prod(shape.values())} devices but "
             f"{device_count} are available; make the product equal {device_count} "
             f"or set one axis to -1")
    return shape


def seq_len_divisors(config) -> list[tuple[str, int]]:
    """Config keys whose value must divide data.seq_len (chunk/segment sizes)."""
    found = []
    model = config.model
    for group, keys in (("memory", ("chunk_size", "segment_len")),
                        ("self_modifying",
                         ("chunk_size", "memory_chunk_size", "chunk_size_memory"))):
        if group in model and isinstance(model[group], ml_collections.ConfigDict):
            for k in keys:
                v = model[group].get(k)
                if isinstance(v, int) and not isinstance(v, bool):
                    found.append((f"model.{group}.{k}", v))
    return found


def validate_rules(config: ml_collections.ConfigDict) -> None:
    """``sharding.rules``: pairs (logical name, mesh axis | tuple of mesh axes | None),
    every mesh axis one of ``config.mesh``'s (a misspelt axis would silently
    replicate what it should shard)."""
    rules, axes = config.sharding.rules, tuple(config.mesh.keys())
    example = "(('batch', ('data', 'fsdp')), ('mlp', 'tensor'))"
    _require(isinstance(rules, (tuple, list)), "sharding.rules",
             f"must be a tuple of (logical name, mesh axes) pairs, e.g. {example}; "
             f"got {rules!r}")
    for rule in rules:
        _require(isinstance(rule, (tuple, list)) and len(rule) == 2
                 and isinstance(rule[0], str), "sharding.rules",
                 f"each rule is a pair (logical name, mesh axes), e.g. ('mlp', 'tensor'); "
                 f"got {rule!r}")
        target = rule[1]
        targets = (() if target is None else (target,) if isinstance(target, str)
                   else target)
        _require(isinstance(targets, (tuple, list))
                 and all(isinstance(t, str) for t in targets), "sharding.rules",
                 f"rule {tuple(rule)!r}: the target must be a mesh axis name, a tuple of "
                 f"them or None")
        for t in targets:
            _require(t in axes, "sharding.rules",
                     f"rule {tuple(rule)!r} names mesh axis {t!r}, which is not an axis of "
                     f"config.mesh ({', '.join(axes)})")


def validate(config: ml_collections.ConfigDict, device_count: int | None = None,
             process_count: int = 1) -> ml_collections.ConfigDict:
    """Checks values that are impossible; raises ConfigError naming the key."""
    for key in ("train.steps", "train.log_every", "data.seq_len", "data.batch_size",
                "model.d_model", "model.n_layers", "model.n_heads", "model.vocab_size",
                "train.keep_checkpoints"):
        _positive_int(config, key)
    _require(isinstance(config.train.seed, int), "train.seed", "must be an integer")
    for key in ("eval_every", "checkpoint_every", "eval_batches", "sample_tokens"):
        v = config.train[key]
        _require(isinstance(v, int) and v >= 0, f"train.{key}",
                 f"must be an integer >= 0, got {v!r}")
    clip = config.train.grad_clip_norm
    _require(isinstance(clip, (int, float)) and not isinstance(clip, bool) and clip >= 0,
             "train.grad_clip_norm", f"must be a number >= 0 (0: no clipping), got {clip!r}")
    m = config.model
    window = m.get("attention_window", 0)
    _require(isinstance(window, int) and not isinstance(window, bool) and window >= 0,
             "model.attention_window",
             f"must be an integer >= 0 (0: full causal attention), got {window!r}")
    _require(m.mlp != "cms" or isinstance(m.get("cms"), ml_collections.ConfigDict),
             "model.mlp", "'cms' needs a model.cms group (its levels' periods), which "
             "this config does not have: start from experiments/hope/tiny.py, or add "
             "c.model.cms = dict(periods=(32, 'never')) to the config file")
    _require(m.d_model % m.n_heads == 0, "model.n_heads",
             f"must divide model.d_model={m.d_model}, got {m.n_heads}")
    _require((m.d_model // m.n_heads) % 2 == 0, "model.n_heads",
             f"head dim d_model/n_heads={m.d_model // m.n_heads} must be even (RoPE)")
    _require(m.dtype in ("float32", "bfloat16"), "model.dtype",
             f"must be 'float32' or 'bfloat16', got {m.dtype!r}")
    seq_len = config.data.seq_len
    for key, v in seq_len_divisors(config):
        _require(v > 0 and seq_len % v == 0, key,
                 f"must be a positive divisor of data.seq_len={seq_len}, got {v} "
                 f"(change data.seq_len or {key})")
    validate_rules(config)
    if device_count is not None:
        shape = resolve_mesh_shape(config.mesh, device_count)
        data_parallel = shape.get("data", 1) * shape.get("fsdp", 1)
        _require(config.data.batch_size % data_parallel == 0, "data.batch_size",
                 f"{config.data.batch_size} must be divisible by the data-parallel "
                 f"size mesh.data*mesh.fsdp={data_parallel}")
    _require(config.data.batch_size % process_count == 0, "data.batch_size",
             f"must be divisible by the number of processes ({process_count})")
    return config


def load(argv: Sequence[str]) -> tuple[ml_collections.ConfigDict, list[str]]:
    """Config from ``--config`` and ``--config.*`` flags; returns (config, other args)."""
    spec, overrides, rest = parse_overrides(argv)
    config = load_config_file(spec or default_config_path())
    config = apply_overrides(config, overrides)
    config.lock()
    return config, rest
