"""One adapter per model family: where the vision attention comes from and how image tokens lie in the prompt."""

from __future__ import annotations

from torch import nn

from star.adapters.gemma3 import Gemma3Adapter
from star.adapters.gemma4 import Gemma4Adapter
from star.adapters.internvl import InternVLAdapter
from star.adapters.llava import LlavaAdapter
from star.adapters.llava_next import LlavaNextAdapter
from star.adapters.llava_onevision import LlavaOnevisionAdapter
from star.adapters.qwen2_vl import Qwen2VLAdapter
from star.adapters.qwen3_5 import Qwen3_5Adapter
from star.adapters.qwen3_vl import Qwen3VLAdapter

ADAPTERS = (
    LlavaAdapter, LlavaNextAdapter, LlavaOnevisionAdapter, Qwen2VLAdapter, Qwen3VLAdapter, Qwen3_5Adapter, InternVLAdapter, Gemma3Adapter,
    Gemma4Adapter,
)
Adapter = (
    LlavaAdapter | LlavaNextAdapter | LlavaOnevisionAdapter | Qwen2VLAdapter | Qwen3VLAdapter | Qwen3_5Adapter | InternVLAdapter
    | Gemma3Adapter | Gemma4Adapter
)


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter of this model's family, or a ValueError naming the supported classes."""
    for adapter in ADAPTERS:
        if isinstance(model, adapter.model_classes):
            return adapter(model)
    supported = ", ".join(cls.__name__ for adapter in ADAPTERS for cls in adapter.model_classes)
    raise ValueError(f"model of class {type(model).__name__} is not supported: supported classes are {supported}")
