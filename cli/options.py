"""Command-line options generated from the configs that declare them, so each setting has one help text.

:func:`add_options` adds one option per field of a pydantic model (help: the field's ``description``)
or of a dataclass (help: ``metadata["help"]``), named ``--field-name``; :func:`collect` turns the parsed
arguments back into the field values. A dataclass field whose type is a pydantic model (the GRPO
config's ``episode``) is flattened: its own fields become options, and :func:`collect` rebuilds the
model. Types come from the annotations: ``int``, ``float``, ``str``, ``Path``, enums (their values
become choices), ``bool`` (``--x/--no-x``), ``bool | None`` (``--x/--no-x``, unset = automatic),
``list[str]`` (one or more values) and ``tuple[str, ...]`` (comma-separated).

Dataclass metadata a field may add: ``required`` (the option must be given), ``choices`` (a tuple of
allowed strings, or a mapping from what the user types to the value), ``aliases`` (older option names
that keep working), ``exclude`` and ``choices_of`` (for a flattened model: its fields left out, and
choices per field). Light to import: only argparse, dataclasses and typing, so ``--help`` stays instant.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel

Source = type[BaseModel] | type[Any]  # a pydantic model class or a dataclass class


@dataclasses.dataclass(frozen=True)
class _Field:
    name: str
    annotation: Any
    default: Any
    help: str
    meta: Mapping[str, Any]


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _fields(source: Source) -> list[_Field]:
    if isinstance(source, type) and issubclass(source, BaseModel):
        out = []
        for name, info in source.model_fields.items():
            default = info.default_factory() if info.default_factory is not None else info.default  # type: ignore[call-arg]
            out.append(_Field(name, info.annotation, default, info.description or "", {}))
        return out
    hints = typing.get_type_hints(source)
    out = []
    for f in dataclasses.fields(source):  # type: ignore[arg-type]
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        out.append(_Field(f.name, hints[f.name], default, str(f.metadata.get("help", "")), f.metadata))
    return out


def _strip_optional(annotation: Any) -> tuple[Any, bool]:
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else annotation), True
    return annotation, False


def _is_model(annotation: Any) -> bool:
    inner, _ = _strip_optional(annotation)
    return isinstance(inner, type) and issubclass(inner, BaseModel)


def _choice_map(choices: Any) -> Callable[[str], Any] | None:
    if isinstance(choices, Mapping):
        return lambda text: choices[text]
    return None


def _add_one(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    field: _Field,
    *,
    default: Any,
    choices: Any = None,
    aliases: Iterable[str] = (),
    required: bool = False,
) -> None:
    names = [flag(field.name), *aliases]
    inner, optional = _strip_optional(field.annotation)
    help_text = field.help
    if inner is bool and choices is None:
        auto = " (default: automatic)" if optional and default is None else " (default: %(default)s)"
        parser.add_argument(
            *names, dest=field.name, action=argparse.BooleanOptionalAction, default=default, help=help_text + auto
        )
        return
    kwargs: dict[str, Any] = {"dest": field.name, "help": help_text}
    if isinstance(choices, Mapping):
        kwargs["choices"] = list(choices)
        kwargs["type"] = str
        shown = next((k for k, v in choices.items() if v == default), default)
        default = shown
    elif choices is not None:
        kwargs["choices"] = list(choices)
    if isinstance(inner, type) and issubclass(inner, enum.Enum):
        kwargs.setdefault("choices", [m.value for m in inner])
        kwargs["type"] = str
        default = default.value if isinstance(default, enum.Enum) else default
    elif typing.get_origin(inner) is list:
        kwargs["nargs"] = "+"
        kwargs["type"] = str
    elif typing.get_origin(inner) is tuple:
        kwargs["type"] = lambda text: tuple(part.strip() for part in text.split(",") if part.strip())
        default = ",".join(default) if default else default
    elif "type" not in kwargs:
        kwargs["type"] = {int: int, float: float, Path: Path}.get(inner, str)
    if required:
        kwargs["required"] = True
    else:
        kwargs["default"] = default
        if default is not None and default != "":
            kwargs["help"] = help_text + " (default: %(default)s)"
    parser.add_argument(*names, **kwargs)


def add_options(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    source: Source,
    *,
    exclude: Iterable[str] = (),
    defaults: Mapping[str, Any] | None = None,
    choices: Mapping[str, Any] | None = None,
    aliases: Mapping[str, Iterable[str]] | None = None,
) -> None:
    """One option per field of ``source`` (see the module docstring); ``defaults``, ``choices`` and
    ``aliases`` override per field name what the source declares."""
    skip = set(exclude)
    defaults = dict(defaults or {})
    choices = dict(choices or {})
    aliases = dict(aliases or {})
    for field in _fields(source):
        if field.name in skip:
            continue
        if _is_model(field.annotation):
            model, _ = _strip_optional(field.annotation)
            nested_default = defaults.get(field.name, field.default)
            add_options(
                parser,
                model,
                exclude=field.meta.get("exclude", ()),
                defaults={k: getattr(nested_default, k) for k in model.model_fields} if nested_default else None,
                choices=field.meta.get("choices_of"),
                aliases=field.meta.get("aliases_of"),
            )
            continue
        _add_one(
            parser,
            field,
            default=defaults.get(field.name, field.default),
            choices=choices.get(field.name, field.meta.get("choices")),
            aliases=aliases.get(field.name, field.meta.get("aliases", ())),
            required=bool(field.meta.get("required")),
        )


def collect(ns: argparse.Namespace, source: Source, *, exclude: Iterable[str] = ()) -> dict[str, Any]:
    """The field values of ``source`` in the parsed arguments (options :func:`add_options` added; choice
    mappings applied, flattened models rebuilt). Fields without an option are left out."""
    values = vars(ns)
    skip = set(exclude)
    out: dict[str, Any] = {}
    for field in _fields(source):
        if field.name in skip:
            continue
        if _is_model(field.annotation):
            model, _ = _strip_optional(field.annotation)
            nested = collect(ns, model, exclude=field.meta.get("exclude", ()))
            base = field.default.model_dump() if isinstance(field.default, BaseModel) else {}
            out[field.name] = model(**{**base, **nested})
            continue
        if field.name not in values:
            continue
        value = values[field.name]
        convert = _choice_map(field.meta.get("choices"))
        if convert is not None and isinstance(value, str):
            value = convert(value)
        out[field.name] = value
    return out
