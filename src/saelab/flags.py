"""``saelab``'s flags, generated from the typed configs: :func:`add_arguments` turns a config
into argparse flags (its field descriptions become the help) and :func:`from_args` turns the
parsed flags back into a validated config. A config with an architecture (``sae``) gets
``--arch`` and every registered architecture's settings, each naming the architectures that
have it."""

from __future__ import annotations

import argparse
from typing import Any, get_args, get_origin

from pydantic import BaseModel

from saelab.config_base import build, scalar_type
from saelab.sae import ArchConfig
from saelab.sae.arch import V1_RENAMES, arch_settings


def _add_flag(target: Any, name: str, annotation: Any, help_text: str, required: bool = False,
              aliases: tuple[str, ...] = ()) -> None:
    flags = ["--" + name.replace("_", "-"), *("--" + a.replace("_", "-") for a in aliases)]
    typ, choices = scalar_type(annotation)
    help_text = help_text.replace("%", "%%")  # argparse %-formats help strings
    if typ is bool:
        target.add_argument(*flags, dest=name, action=argparse.BooleanOptionalAction, default=None,
                            help=help_text)
    elif get_origin(typ) is list:
        target.add_argument(*flags, dest=name, type=_comma_list(get_args(typ)[0]), default=None,
                            required=required, help=help_text, metavar="A,B,…")
    else:
        target.add_argument(*flags, dest=name, type=typ, choices=choices, default=None, required=required,
                            help=help_text, metavar=None if choices else name.upper())


def _comma_list(item: type) -> Any:
    """argparse type of a list field: 'A,B,C'."""

    def parse(text: str) -> list[Any]:
        try:
            return [item(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of "
                                             f"{item.__name__}") from None

    parse.__name__ = f"list of {item.__name__}"
    return parse


def add_arguments(
    parser: argparse.ArgumentParser,
    model: type[BaseModel],
    exclude: set[str] = frozenset(),  # type: ignore[assignment]
    group_title: str | None = None,
) -> None:
    """Add one ``--flag`` per field of ``model`` (defaults left unset so None means 'default').
    A config with an architecture (``sae``) gets ``--arch`` and every architecture's settings."""
    target: Any = parser.add_argument_group(group_title) if group_title else parser
    for name, field in model.model_fields.items():
        if name in exclude:
            continue
        if _is_arch(model, name):
            _add_arch_flags(target)
            continue
        required = field.is_required()
        default = None if required else field.get_default(call_default_factory=True)
        suffix = " [required]" if required else f" [default: {default}]" if default is not None else ""
        _add_flag(target, name, field.annotation, (field.description or "") + suffix, required)


def _is_arch(model: type[BaseModel], name: str) -> bool:
    """Whether ``model.name`` is an architecture config (the ``sae`` of a training config)."""
    field = model.model_fields.get(name)
    return field is not None and isinstance(field.get_default(call_default_factory=True), ArchConfig)


def _add_arch_flags(target: Any) -> None:
    """``--arch`` and one flag per architecture setting, with the architectures that have it."""
    target.add_argument("--arch", "--architecture", dest="architecture", choices=list(ArchConfig.registry),
                        default=None, help="SAE architecture [default: topk]")
    for name, fields in arch_settings().items():
        first = next(iter(fields.values()))
        defaults = {a: f.get_default(call_default_factory=True) for a, f in fields.items()}
        if len(set(map(repr, defaults.values()))) == 1:
            default = f"default: {first.get_default(call_default_factory=True)}"
        else:
            default = "default: " + ", ".join(f"{a} {d}" for a, d in defaults.items())
        help_text = f"({', '.join(fields)}) {first.description or ''} [{default}]"
        _add_flag(target, name, first.annotation, help_text,
                  aliases=tuple(old for old, new in V1_RENAMES.items() if new == name))


def from_args(model: type[BaseModel], args: argparse.Namespace, /, **overrides: Any) -> Any:
    """Build ``model`` from the flags the user actually set (plus ``overrides``)."""
    names = set(model.model_fields)
    if _is_arch(model, "sae"):
        names |= {"architecture", *arch_settings()}
    values = {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return build(model, **values)
