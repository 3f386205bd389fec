"""The registry: one file per method, each a frozen dataclass whose fields are its options."""

from __future__ import annotations

import dataclasses

from star.methods.base import DecoderView, LLMStage, Method, Plan, Selection, VisionView
from star.methods.fastervlm import FasterVLM
from star.methods.fastv import FastV
from star.methods.none import NoPruning
from star.methods.pdrop import PyramidDrop
from star.methods.random import RandomPruning
from star.methods.sparsevlm import SparseVLM
from star.methods.star import Star
from star.methods.visionzip import VisionZip

REGISTRY: dict[str, type[Method]] = {
    cls.name: cls for cls in (NoPruning, Star, FastV, FasterVLM, VisionZip, PyramidDrop, SparseVLM, RandomPruning)
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
    allowed = options(name)
    unknown = sorted(set(options_) - set(allowed))
    if unknown:
        accepted = ", ".join(allowed) if allowed else "none"
        raise ValueError(f"option {unknown[0]!r} is not accepted by method {name!r}: its options are {accepted}")
    return REGISTRY[name](**options_)


__all__ = ["DecoderView", "LLMStage", "Method", "Plan", "Selection", "VisionView", "build", "methods", "options", "REGISTRY"]
