"""The unpruned model, run through the same code path as every method: the reference for all of them."""

from __future__ import annotations

from dataclasses import dataclass

from star.methods.base import Method, Plan


@dataclass(frozen=True)
class NoPruning(Method):
    name = "none"
    summary = "no pruning: the model as it is, through the same hooks"

    def plan(self, n_visual: int, keep: int, num_layers: int) -> Plan:
        return Plan(n_visual=n_visual, vision_keep=n_visual)
