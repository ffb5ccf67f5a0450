"""The primitives every typed config is built from: the strict base model, the dtypes, the
on-disk format version, and one-line validation errors.

Kept apart from :mod:`saelab.config` (the stage configs) so the dictionary models in
:mod:`saelab.sae` can define their own configs without importing the stages built on them.
"""

from __future__ import annotations

import types
import typing
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, ValidationError

from saelab.errors import SaelabError

DType = Literal["float32", "bfloat16", "float16"]

FORMAT_VERSION = 2
"""Version of the on-disk SAE / training-checkpoint format written by this saelab.
1: saelab 0.4 (architecture settings flat in the training config); 2: each architecture's
settings in its own config (``sae``). Version 1 files are migrated on read."""


class Config(BaseModel):
    """A strict config: unknown fields are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def validation_message(err: ValidationError) -> str:
    """One readable line from a pydantic error: 'field: problem; field: problem'."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "config"
        msg = e["msg"].removeprefix("Value error, ")
        parts.append(f"{loc.replace('_', '-')}: {msg}" if e["loc"] else msg)
    return "; ".join(parts)


def build(cls: type[BaseModel], /, **values: Any) -> Any:
    """Validate ``values`` into ``cls``, turning errors into one-line SaelabErrors."""
    try:
        return cls(**values)
    except ValidationError as e:
        raise SaelabError(f"invalid {cls.__name__}: {validation_message(e)}") from None


def scalar_type(annotation: Any) -> tuple[Any, list[Any] | None]:
    """Reduce an annotation to (python type, choices): ``int | None`` -> (int, None),
    ``Literal["a", "b"]`` -> (str, ["a", "b"]), ``list[int]`` -> (list[int], None)."""
    origin = get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        return scalar_type(args[0])
    if origin is Literal:
        choices = list(get_args(annotation))
        return type(choices[0]), choices
    return annotation, None
