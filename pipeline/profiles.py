"""Profiles: overlays on the quick defaults in ``params.yaml``.

A profile file (``params/paper.yaml``, ``params/learn.yaml``) holds only the keys that differ from
``params.yaml`` and names its base with the top-level key ``overlay_of`` (a path relative to the
profile). Reading it deep-merges it onto the base: mappings merge key by key, anything else (numbers,
strings, lists) replaces the base's value. The result is validated like any params file, so
``python stages/metagrad.py --params params/learn.yaml`` runs the learn profile directly.

``python -m pipeline profile NAME`` writes the merged profile over ``params.yaml`` (what DVC reads),
with a first line ``# profile: NAME`` so that a second, different overlay is not stacked on top of
the first: restore the quick defaults first (``git checkout params.yaml``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from .config import ConfigError, PipelineConfig, load_params
from .io import write_text

OVERLAY_KEY = "overlay_of"
PROFILE_LINE = re.compile(r"#\s*profile:\s*(\S+)")


def deep_merge(base: dict, overlay: dict) -> dict:
    """``base`` with ``overlay`` on top: nested mappings merge, every other value replaces (new dicts)."""
    merged = dict(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_mapping(path: Path) -> tuple[dict, str]:
    try:
        text = path.read_text()
        raw = yaml.safe_load(text)
    except FileNotFoundError:
        raise ConfigError([f"{path}: file not found"]) from None
    except yaml.YAMLError as err:
        raise ConfigError([f"{path}: not valid YAML: {err}"]) from None
    if not isinstance(raw, dict):
        raise ConfigError(
            [f"{path}: expected a mapping of sections ({', '.join(PipelineConfig.model_fields)})"]
        )
    return raw, text


def profile_name(text: str) -> str | None:
    """The profile a params file holds, from its ``# profile: NAME`` first line (None: the defaults)."""
    first = text.split("\n", 1)[0]
    match = PROFILE_LINE.fullmatch(first.strip())
    return match.group(1) if match else None


def read_params(path: str | Path) -> dict:
    """The raw params mapping of ``path``; a profile overlay comes back merged onto its base."""
    path = Path(path)
    raw, _ = _read_mapping(path)
    if OVERLAY_KEY not in raw:
        return raw
    overlay = dict(raw)
    base_path = (path.parent / str(overlay.pop(OVERLAY_KEY))).resolve()
    base, base_text = _read_mapping(base_path)
    if OVERLAY_KEY in base:
        raise ConfigError([f"{path}: {OVERLAY_KEY}: {base_path} is itself an overlay; name a full file"])
    holds = profile_name(base_text)
    if holds is not None and holds != path.stem:
        raise ConfigError(
            [
                f"{path}: an overlay on the quick defaults, but {base_path} holds the {holds!r} profile; "
                f"restore the defaults first (git checkout {base_path.name})"
            ]
        )
    return deep_merge(base, overlay)


def apply_profile(name: str, root: Path) -> Path:
    """Validate ``params/NAME.yaml`` merged onto ``params.yaml`` and write the result over
    ``params.yaml``; raises ConfigError (nothing written) on bad params."""
    source = root / "params" / f"{name}.yaml"
    load_params(source)  # validated as a whole first: nothing is written for bad params
    merged = read_params(source)
    header = (
        f"# profile: {name}\n"
        f"# Written by `python -m pipeline profile {name}`: params.yaml's quick defaults with\n"
        f"# params/{name}.yaml on top. Restore the defaults with `git checkout params.yaml`.\n"
    )
    return write_text(root / "params.yaml", header + dump(merged))


def dump(params: dict[str, Any]) -> str:
    return yaml.safe_dump(params, sort_keys=False, default_flow_style=None, width=1000, allow_unicode=True)
