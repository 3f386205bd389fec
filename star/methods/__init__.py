"""The registry: one file per method, each a frozen dataclass whose fields are its options."""

from __future__ import annotations

import dataclasses
import types
import typing

from star.methods.base import DecoderView, LLMStage, Method, Plan, Selection, VisionView
from star.methods.cdpruner import CDPruner
from star.methods.dart import Dart
from star.methods.divprune import DivPrune
from star.methods.fastervlm import FasterVLM
from star.methods.fastv import FastV
from star.methods.none import NoPruning
from star.methods.pdrop import PyramidDrop
from star.methods.pool import Pool
from star.methods.random import RandomPruning
from star.methods.sparsevlm import SparseVLM
from star.methods.star import Star, StarVision
from star.methods.visionzip import VisionZip
from star.methods.vispruner import VisPruner

REGISTRY: dict[str, type[Method]] = {
    cls.name: cls
    for cls in (
        NoPruning, Star, FastV, FasterVLM, VisionZip, PyramidDrop, SparseVLM, VisPruner, DivPrune, CDPruner, Dart,
        RandomPruning, Pool, StarVision,
    )
}


def methods() -> list[str]:
    """The registered method names."""
    return list(REGISTRY)


def options(name: str) -> list[str]:
    """The option names of method `name` (its dataclass fields)."""
    if name not in REGISTRY:
        raise ValueError(f"method={name!r} is unknown: known methods are {', '.join(REGISTRY)}")
    return [f.name for f in dataclasses.fields(REGISTRY[name])]


def build(name: str, **options_: object) -> Method:
    """The method `name` with its options, or a ValueError that lists what is allowed."""
    _check_known(name, options_)
    return REGISTRY[name](**options_)


def parse_option(name: str, option: str, text: str) -> object:
    """Option `option` of method `name` read from text as its field's type: '8' for an int, '0.15' for a float,
    '8/16/24' for a tuple of ints (not commas: those separate the values of a sweep). Ranges are the plan's to check."""
    _check_known(name, [option])
    hint = typing.get_type_hints(REGISTRY[name])[option]
    kind = next(k for k in typing.get_args(hint) if k is not type(None)) if isinstance(hint, types.UnionType) else hint
    is_tuple = typing.get_origin(kind) is tuple
    if kind is float and text.strip().lstrip("-").isdigit():
        kind = int  # an int is a float to typing; '0' stays 0, so a setting keeps the name its run folder has
    try:
        return tuple(typing.get_args(kind)[0](part) for part in text.split("/")) if is_tuple else kind(text)
    except ValueError:
        label = "ints joined by / (e.g. 8/16/24)" if is_tuple else {int: "an int", float: "a float"}[kind]
        raise ValueError(f"{option}={text!r}: method {name!r} takes {label} for {option}") from None


def _check_known(name: str, given) -> None:
    """A ValueError naming the first option in `given` that method `name` does not have, and the ones it has."""
    allowed = options(name)
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        accepted = ", ".join(allowed) if allowed else "none"
        raise ValueError(f"option {unknown[0]!r} is not accepted by method {name!r}: its options are {accepted}")


__all__ = [
    "DecoderView", "LLMStage", "Method", "Plan", "Selection", "VisionView", "build", "methods", "options",
    "parse_option", "REGISTRY",
]
