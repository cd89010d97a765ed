"""``docs/params.md``: the params reference, generated from the config models' field docstrings.

``python -m pipeline params-doc`` rewrites it; a test keeps the committed file up to date.
"""

from __future__ import annotations

import json
import types
import typing
from pathlib import Path

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from .config import PipelineConfig
from .io import write_text

HEADER = """# Params reference

Every key of `params.yaml` (and of the profile overlays in `params/`), section by section. Generated
from the field docstrings in `pipeline/config/` by `python -m pipeline params-doc`: edit those, not
this file. *default* is the value a key takes when the file leaves it out; *required* keys must be given.
"""

BOUNDS = {  # constraint type -> (its attribute, how it reads)
    annotated_types.Gt: ("gt", "> {}"),
    annotated_types.Ge: ("ge", ">= {}"),
    annotated_types.Lt: ("lt", "< {}"),
    annotated_types.Le: ("le", "<= {}"),
    annotated_types.MinLen: ("min_length", "length >= {}"),
}


def _constraints(metadata: list) -> list[str]:
    texts = []
    for item in metadata:
        items = item.metadata if isinstance(item, FieldInfo) else [item]
        for bound in items:
            if type(bound) in BOUNDS:
                attribute, template = BOUNDS[type(bound)]
                texts.append(template.format(getattr(bound, attribute)))
    return texts


def type_text(annotation, metadata: list | None = None) -> str:
    """A short human reading of a field's type and bounds, e.g. ``float, > 0`` or ``list of int (> 0)``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return type_text(args[0], [*args[1:], *(metadata or [])])
    if origin is typing.Literal:
        text = "one of " + ", ".join(f"`{a}`" for a in args)
    elif origin is list:
        text = f"list of {type_text(args[0])}"
    elif origin in (typing.Union, types.UnionType):
        text = " or ".join(type_text(a) for a in args)
    else:
        text = getattr(annotation, "__name__", str(annotation))
    bounds = _constraints(metadata or [])
    if not bounds:
        return text
    joined = ", ".join(bounds)
    return f"{text} ({joined})" if origin is list or " " in text else f"{text}, {joined}"


def default_text(field: FieldInfo) -> str:
    if field.is_required():
        return "*required*"
    value = field.get_default(call_default_factory=True)
    if value is PydanticUndefined:
        return "*required*"
    if isinstance(value, BaseModel):
        return "(section)"
    return f"`{json.dumps(value)}`"


def _section(model: type[BaseModel], prefix: str, lines: list[str]) -> None:
    nested = []
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{field.alias or name}"
        meaning = " ".join((field.description or "").split())
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            nested.append((key, annotation, field))
            rows.append(f"| `{key}` | section | | {meaning} (below) |")
            continue
        kind = type_text(annotation, field.metadata)
        rows.append(f"| `{key}` | {kind} | {default_text(field)} | {meaning} |")
    title = prefix.rstrip(".") or "top level"
    lines += ["", f"## `{title}`" if prefix else f"## {title}", ""]
    if model.__doc__ and prefix:
        lines += [" ".join(model.__doc__.split()), ""]
    lines += ["| key | type | default | meaning |", "|---|---|---|---|", *rows]
    for key, sub_model, _ in nested:
        _section(sub_model, f"{key}.", lines)


def render() -> str:
    """The whole reference as markdown."""
    lines = [HEADER.rstrip()]
    _section(PipelineConfig, "", lines)
    return "\n".join(lines) + "\n"


def write_params_doc(path: Path) -> Path:
    return write_text(path, render())
