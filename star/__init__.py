"""star-vlm: training-free visual-token pruning (STAR and its peers) for Hugging Face vision-language models."""

from star.api import apply, methods
from star.pruner import Pruner, PruneStats

__all__ = ["apply", "methods", "Pruner", "PruneStats"]
__version__ = "0.1.0"
