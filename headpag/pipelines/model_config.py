"""
What a model folder recommends, in one file: `headpag_config.json` beside `model_index.json`.

```json
{"class": "StableDiffusion3HeadPAGPipeline",
 "pag_heads": "2.5, 4.1", "pag_sequential": false,
 "pag": {"pag_scale": 2.0, "pag_identity_weight": 0.5},
 "sampler": {"steps": 20, "size": 96, "guidance": 5.0, "prompt": "..."}}
```

- `pag_heads`, `pag_sequential` and the `pag` section are the PAG defaults of every pipeline call on the model: an
  argument a call (or its `with head_pag(...)` block) does not give comes from here, else from the built-in default
  ([`BUILTIN_PAG_DEFAULTS`]). An explicit `pag_scale=0` is always exactly the parent pipeline.
- `sampler` (steps, size, CFG or FLUX's true CFG, example prompt) is advice to the CLI and the UI only; pipeline
  calls never read it.

headpag's pipeline classes read the file in `from_pretrained`, write it in `save_pretrained` and keep it in
`from_pipe`; `head_pag(pipe)` on a stock diffusers pipeline reads it from the local folder the pipeline was loaded from
(`pipe.config._name_or_path`), so a stock pipeline and ours recommend the same. Hub ids are not read (no download).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from ..guidance import HeadSet, Perturbation
from .policy import PAGOptions


CONFIG_FILE = "headpag_config.json"
BUILTIN_PAG_DEFAULTS: dict[str, Any] = {
    "pag_scale": 3.0,
    "pag_identity_weight": 1.0,
    "pag_identity_scope": "joint",
    "pag_target": "identity",
    "pag_interval": (0.0, 1.0),
    "pag_adaptive_scale": 0.0,
    "pag_share_prefix": True,
    "pag_reuse": 1,
}
RECOMMENDABLE = tuple(BUILTIN_PAG_DEFAULTS)


def read_headpag_config(path: str | os.PathLike) -> dict[str, Any]:
    """The `headpag_config.json` of a local folder (`{}` when there is none or `path` is a hub id), its `pag`
    section checked."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"Malformed {file}: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"Malformed {file}: expected a JSON object, got {type(data).__name__}.")
    if "pag" in data:
        data["pag"] = check_pag_defaults(data["pag"], where=str(file))
    if "pag_sequential" in data and not isinstance(data["pag_sequential"], bool):
        raise ValueError(f"{file}: pag_sequential must be true or false, got {data['pag_sequential']!r}.")
    if data.get("pag_heads") is not None:
        try:
            HeadSet.parse(data["pag_heads"]) if isinstance(data["pag_heads"], str) else HeadSet.coerce(
                data["pag_heads"]
            )
        except (ValueError, TypeError) as error:
            raise ValueError(f"{file}: pag_heads {data['pag_heads']!r} is not a head set: {error}") from None
    if "sampler" in data:
        check_sampler(data["sampler"], str(file))
    return data


def _finite(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        return False


def check_sampler(values: Any, where: str) -> None:
    """The `sampler` section: `steps` an integer in [1, 1000], `size` a multiple of 16 in [16, 4096], `guidance` a
    finite number, `true_cfg` (FLUX's true CFG scale, run against the empty prompt unless a negative prompt is given)
    a finite number >= 1, `prompt` and `note` strings; `ValueError` naming the bad value otherwise."""
    if not isinstance(values, dict):
        raise ValueError(f"{where}: the 'sampler' section must be a JSON object, got {type(values).__name__}.")
    allowed = ("steps", "size", "guidance", "true_cfg", "prompt", "note")
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise ValueError(f"{where}: unknown sampler setting(s) {unknown}; allowed: {', '.join(allowed)}.")
    steps, size, guidance = values.get("steps", 1), values.get("size", 16), values.get("guidance", 1.0)
    if not (_finite(steps) and isinstance(steps, int) and 1 <= steps <= 1000):
        raise ValueError(f"{where}: sampler steps must be an integer in [1, 1000], got {steps!r}.")
    if not (_finite(size) and isinstance(size, int) and 16 <= size <= 4096 and size % 16 == 0):
        raise ValueError(f"{where}: sampler size must be a multiple of 16 in [16, 4096], got {size!r}.")
    if not _finite(guidance):
        raise ValueError(f"{where}: sampler guidance must be a finite number, got {guidance!r}.")
    true_cfg = values.get("true_cfg", 1.0)
    if not (_finite(true_cfg) and true_cfg >= 1):
        raise ValueError(f"{where}: sampler true_cfg must be a finite number >= 1, got {true_cfg!r}.")
    for name in ("prompt", "note"):
        if not isinstance(values.get(name, ""), str):
            raise ValueError(f"{where}: sampler {name} must be a string, got {values[name]!r}.")


def check_pag_defaults(values: Any, where: str = "pag defaults") -> dict[str, Any]:
    r"""
    Recommended `pag_*` values, checked: known names only, each value valid for a call.

    Args:
        values (`dict`): e.g. `{"pag_scale": 2.0, "pag_identity_weight": 0.5}`.
        where (`str`): Named in the error (the file).

    Raises:
        `ValueError`: naming the bad name or value and what is allowed.
    """
    if not isinstance(values, dict):
        raise ValueError(f"{where}: the 'pag' section must be a JSON object, got {type(values).__name__}.")
    unknown = sorted(set(values) - set(RECOMMENDABLE))
    if unknown:
        raise ValueError(f"{where}: unknown PAG default(s) {unknown}; allowed: {', '.join(RECOMMENDABLE)}.")
    merged = {**BUILTIN_PAG_DEFAULTS, **values}
    if not isinstance(merged["pag_share_prefix"], bool):
        raise ValueError(f"{where}: pag_share_prefix must be true or false, got {merged['pag_share_prefix']!r}.")
    interval = merged["pag_interval"]
    if not isinstance(interval, (list, tuple)) or len(interval) != 2:
        raise ValueError(f"{where}: pag_interval must be two numbers [start, end], got {interval!r}.")
    for name in ("pag_scale", "pag_identity_weight", "pag_adaptive_scale", *(f"pag_interval[{i}]" for i in (0, 1))):
        value = interval[int(name[-2])] if name.startswith("pag_interval") else merged[name]
        if not _finite(value):
            raise ValueError(f"{where}: {name} must be a finite number, got {value!r}.")
    if isinstance(merged["pag_reuse"], bool) or not isinstance(merged["pag_reuse"], int):
        raise ValueError(f"{where}: pag_reuse must be an integer >= 1, got {merged['pag_reuse']!r}.")
    try:
        PAGOptions(
            scale=merged["pag_scale"],
            perturbation=Perturbation(
                merged["pag_identity_weight"], merged["pag_identity_scope"], merged["pag_target"]
            ),
            interval=tuple(interval),
            adaptive_scale=merged["pag_adaptive_scale"],
            reuse=merged["pag_reuse"],
        )
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None
    return {k: tuple(v) if k == "pag_interval" else v for k, v in values.items()}


def folder_config(pipe) -> dict[str, Any]:
    """The `headpag_config.json` of the local folder `pipe` was loaded from (`{}` for a hub id or a built pipeline)."""
    name = getattr(pipe, "name_or_path", None)
    if not isinstance(name, (str, os.PathLike)) or not Path(name).is_dir():
        return {}
    return read_headpag_config(name)


def recommended(pipe) -> dict[str, Any]:
    """
    The model's own recommendations for `pipe`: the `pag` section's values, and `pag_heads` / `pag_sequential` when
    set. headpag's classes keep what `from_pretrained` loaded (or `set_pag_defaults` set); a stock pipeline's come
    from the folder it was loaded from.
    """
    extra = getattr(pipe, "_headpag_extra", None)
    if extra is not None:
        out = dict(extra.get("pag") or {})
        if getattr(pipe, "_pag_heads", None) is not None:
            out["pag_heads"] = pipe._pag_heads
        out["pag_sequential"] = bool(getattr(pipe, "_pag_sequential", False))
        return out
    config = folder_config(pipe)
    out = dict(config.get("pag") or {})
    for name in ("pag_heads", "pag_sequential"):
        if config.get(name) is not None:
            out[name] = config[name]
    return out


def over_builtin(values: dict[str, Any]) -> dict[str, Any]:
    """Every recommendable `pag_*` value: the built-in defaults, overridden by those of `values` (other keys, such as
    `pag_heads`, are left out)."""
    return {**BUILTIN_PAG_DEFAULTS, **{k: v for k, v in values.items() if k in RECOMMENDABLE}}


def pag_defaults(pipe) -> dict[str, Any]:
    """Every recommendable `pag_*` default of a call of `pipe`: the built-in ones, overridden by the model's."""
    return over_builtin(recommended(pipe))
