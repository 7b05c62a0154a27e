"""How a value typed in a config file or an override becomes the value of a typed key.

YAML reads the text, keeping what the user typed for every unquoted scalar it reads as something
other than a string (:class:`Plain`), and :func:`coerce` then reads it as the key's declared type
says: a string option keeps ``off`` or ``2024-01-01`` as typed, an optional number takes ``none``.
"""
from __future__ import annotations

import dataclasses
import datetime
import types
from dataclasses import dataclass
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from ..errors import ConfigError


def type_name(annotation: Any) -> str:
    """``annotation`` as an error message names it: ``int``, ``one of 'off', 'online'``, ``float or NoneType``."""
    if get_origin(annotation) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(annotation))
    if get_origin(annotation) in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in get_args(annotation))
    return getattr(annotation, "__name__", str(annotation))


@dataclass(frozen=True)
class Plain:
    """An unquoted YAML scalar that YAML reads as something other than a string.

    ``text`` is what the user typed, ``value`` YAML's reading of it (``off`` -> False,
    ``2024-01-01`` -> a date, ``null`` -> None). Which one is meant is decided by the
    type of the key it is given to (see :func:`coerce`), not by YAML.
    """

    text: str
    value: Any


class ConfigLoader(yaml.SafeLoader):
    """YAML's safe loader that keeps the typed text of every unquoted non-string scalar as a :class:`Plain`."""

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        value = super().construct_object(node, deep)
        if isinstance(node, yaml.ScalarNode) and node.style is None and not isinstance(value, str):
            return Plain(node.value, value)
        return value

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        # keys are option names: the text typed, whatever YAML would make of it (`on:` is not True)
        mapping = super().construct_mapping(node, deep)
        return {key.text if isinstance(key, Plain) else key: value for key, value in mapping.items()}


def load_yaml(text: str) -> Any:
    """Parse config YAML, keeping unquoted non-string scalars as :class:`Plain` for :func:`coerce`."""
    return yaml.load(text, Loader=ConfigLoader)


def untyped(value: Any) -> Any:
    """``value`` with every :class:`Plain` replaced by YAML's reading (dates by their text), for keys of no
    declared element type (``list``, ``dict``)."""
    if isinstance(value, Plain):
        return value.text if isinstance(value.value, datetime.date) else value.value
    if isinstance(value, list):
        return [untyped(item) for item in value]
    if isinstance(value, dict):
        return {key: untyped(item) for key, item in value.items()}
    return value


NONE_WORDS = ("none", "null")


def coerce(key: str, value: Any, annotation: Any) -> Any:
    """``value`` as the type ``annotation`` declares, or a :class:`ConfigError` naming ``key``.

    A string option takes an unquoted word as typed; ints and numeric strings are accepted where
    floats are expected; None is written ``null``, ``~``, ``none`` or left empty.
    """
    plain = value if isinstance(value, Plain) else None
    typed = plain.value if plain is not None else value
    origin = get_origin(annotation)
    if origin is Literal:
        options = get_args(annotation)
        if plain is not None and plain.text in options:
            return plain.text
        if typed in options:
            return typed
    elif origin in (Union, types.UnionType):
        for option in get_args(annotation):
            try:
                return coerce(key, value, option)
            except ConfigError:
                continue
    elif annotation is type(None):
        if typed is None or (isinstance(typed, str) and typed.strip().lower() in NONE_WORDS):
            return None
    elif annotation is str:
        if plain is not None:
            return plain.text
        if isinstance(value, str):
            return value
    elif annotation is float:
        if isinstance(typed, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                return float(typed)
            except ValueError:
                pass
        elif isinstance(typed, (int, float)) and not isinstance(typed, bool):
            return float(typed)
    elif annotation is int:
        if isinstance(typed, int) and not isinstance(typed, bool):
            return typed
    elif origin in (list, dict) or annotation in (list, dict):
        if isinstance(typed, origin or annotation):
            return untyped(typed)
    elif isinstance(annotation, type) and isinstance(typed, annotation):
        return typed
    shown = plain.text if plain is not None else value
    raise ConfigError(f"{key}: expected {type_name(annotation)}, got {shown!r}")


def is_text(annotation: Any) -> bool:
    """Whether a key of type ``annotation`` holds free text: ``str`` or ``str | None``."""
    members = get_args(annotation) if get_origin(annotation) in (Union, types.UnionType) else (annotation,)
    return str in members and all(member in (str, type(None)) for member in members)


def how_written(key: str, annotation: Any) -> str:
    """How a value of type ``annotation`` is written in an override of ``key``, for one that YAML cannot read."""
    if annotation is list or get_origin(annotation) is list:
        return "write a list as [a, b], quoting an item that holds ': ', ' #', braces or commas: ['a: b', c]"
    if annotation is dict or get_origin(annotation) is dict or dataclasses.is_dataclass(annotation):
        return "write a mapping as {key: value}, quoting a value that holds ': ', ' #', braces or commas: {key: 'a: b'}"
    if annotation is None:
        return f"quote text that holds ': ', ' #', brackets, braces or commas: {key}='a: b'"
    return f"expected {type_name(annotation)}"
