"""Pruning one loaded model, split by job: `hooks` (the Pruner: which job each call needs), `budget` (keep as
token counts per unit and stage), `entry` (prefill: stage 1 and the entry frame), `cut` (a decoder stage's cut)
and `decode` (decode steps mapped into the pruned frames)."""

from star.pruner.budget import resolve_keep
from star.pruner.hooks import POSITION_POLICIES, Pruner, PruneStats

__all__ = ["POSITION_POLICIES", "PruneStats", "Pruner", "resolve_keep"]
