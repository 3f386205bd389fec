"""One decoder cut inside vLLM (STAR's stage 2, FastV's, DART's) on a Llama or Qwen decoder, with
the layers after the cut on vLLM's own attention backend over a KV cache that holds only the kept tokens.

vLLM gives a request one token count: its positions, and the KV cache of the layers before the cut, run over the
prompt as the vision stage left it (S tokens). The layers from the cut on (K..L-1) are KV-cache groups of their
own (`CutSpec`, registered with vLLM's `KVCacheSpecRegistry`; vLLM makes groups of as many layers as the group
before the cut, so a cut at layer 2 of 30 gives 14, each with its own blocks), in which a request whose prompt the
cut shortens by D tokens holds S - D + its answer: its token i (in vLLM's count) sits at index i - D, its kept
prompt tokens at 0..S-D-1 in order. `CutManager` allocates each such group's blocks for those tokens alone (D
follows from the engine's setting and the request's images before anything runs: `CutScheduler` tells it), so the
dropped tokens never hold a block. The kept tokens keep positions D..S-1 and the answer vLLM's own, so every
query-key distance, all RoPE sees, is that of `star.apply(..., positions="contiguous")`.

The layers from the cut on are vLLM's own decoder layers, their attention vLLM's `Attention` on the active
backend, whose metadata builder `cut_backend` wraps: every step, vLLM's model runner builds each group's metadata
with each request's sequence length less D and the slots of its new tokens at index i - D, D read on the device
from a table indexed by the request's first block in the group. So a step that cuts no prompt (decode steps,
text-only prompts) is vLLM's own forward of the model, compiled as vLLM compiles it, and reads nothing back. A
step that holds a prompt with images (`cuts`) runs `CutDecoder`: layers 0..K-1, the method's selection per
request at the cut (its D written to the table), and the layers after it on the kept rows, with each group's
metadata rebuilt by the same builder for the compacted rows; the two layer ranges compiled as vLLM compiles the
model (`LayersBeforeCut`, `LayersAfterCut`), the selection eager.

Requests without an image keep their prompt whole (D = 0). What the engine must not do with a cut request: split
its prompt into chunks (the cut needs every text row) or share cached prefixes (the layers after the cut hold what
the question chose): `CUT_ENGINE` turns both off. A preempted cut request is recomputed as its prompt, then its
answer so far (`CutScheduler`), so that its answer never joins the cut's scoring rows.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, fields
from functools import cache

import numpy as np
import torch
from torch import nn
from vllm.compilation.backends import set_model_tag
from vllm.compilation.decorators import support_torch_compile
from vllm.config import CompilationMode, CUDAGraphMode, VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size, tensor_model_parallel_all_gather
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.attention import Attention
from vllm.v1.attention.backend import AttentionBackend, AttentionCGSupport, CommonAttentionMetadata, subclass_attention_backend
from vllm.v1.attention.backends.utils import PAD_SLOT_ID
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.utils.math_utils import cdiv
from vllm.v1.kv_cache_interface import AttentionSpec
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

from star.integrations.vllm import CUT_ENGINE, Setting, engine_setting, unit_tokens
from star.methods import DecoderView, Selection
from star.decoder import on_device
from star.scoring import attention_probs, flagged_in_order

@dataclass(frozen=True, kw_only=True)
class CutSpec(AttentionSpec):
    """The KV cache of the layers from the cut on: full attention whose requests drop tokens at the cut. Not a
    `FullAttentionSpec`, which vLLM would put in one group with the layers before the cut."""

    def max_memory_usage_bytes(self, vllm_config: VllmConfig) -> int:
        return cdiv(vllm_config.model_config.max_model_len, self.block_size) * self.page_size_bytes


def cut_blocks(tokens: int, dropped: int, block_size: int) -> int:
    """The blocks a request holds in a cut group: those of its tokens (as vLLM counts them) less the D dropped."""
    return cdiv(tokens - dropped, block_size)


class CutManager(FullAttentionManager):
    """Allocates a request's blocks for its tokens less the D its cut drops (`cut_blocks`). `dropped` (request id
    -> D) is the scheduler's, which `CutScheduler` hands to every cut group's manager."""

    def __init__(self, kv_cache_spec: CutSpec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        self.dropped: dict[str, int] = {}

    def get_num_blocks_to_allocate(self, request_id: str, num_tokens: int, *args, **kwargs) -> int:
        return super().get_num_blocks_to_allocate(request_id, num_tokens - self.dropped.get(request_id, 0), *args, **kwargs)

    def allocate_new_blocks(self, request_id: str, num_tokens: int, num_tokens_main_model: int):
        dropped = self.dropped.get(request_id, 0)
        return super().allocate_new_blocks(request_id, num_tokens - dropped, num_tokens_main_model - dropped)


def register_kv_cache_spec() -> None:
    """Make `CutSpec` a group of its own with its own manager (called in every vLLM process by the plugin)."""
    KVCacheSpecRegistry.register(CutSpec, CutManager)


class CutScheduler(Scheduler):
    """vLLM's scheduler, telling the cut group's managers what each request drops, and recomputing a preempted cut
    request in two parts: its prompt alone first (so that the cut scores the question's rows, not its answer so far,
    and drops what it dropped before), then its answer so far."""

    def __init__(self, vllm_config: VllmConfig, *args, **kwargs) -> None:
        super().__init__(vllm_config, *args, **kwargs)
        self.config = vllm_config.model_config.hf_config
        self.setting = engine_setting(self.config)
        self.dropped: dict[str, int] = {}  # request id -> D, shared with every cut group's manager
        for manager in self.kv_cache_manager.coordinator.single_type_managers:
            if isinstance(manager, CutManager):
                manager.dropped = self.dropped

    def add_request(self, request) -> None:
        super().add_request(request)
        units = [unit_tokens(self.config, f.data) for f in request.mm_features or () if f.modality == "image"]
        cut = self.setting.cut is not None
        self.dropped[request.request_id] = sum(self.setting.unit_keep(n) - self.setting.unit_cut(n) for n in units) if cut else 0

    def _reserve_prefill_lookahead(self, request, num_computed_tokens: int, num_new_tokens: int) -> int:
        """vLLM 0.32's last clip of the tokens a step computes for a request, before their blocks are allocated:
        here a cut request's prefill stops at its prompt's end (the step's sampled token is then vLLM's to discard,
        as for any prefill chunk that does not reach the request's end)."""
        num_new_tokens = super()._reserve_prefill_lookahead(request, num_computed_tokens, num_new_tokens)
        if self.dropped.get(request.request_id) and num_computed_tokens < request.num_prompt_tokens:
            return min(num_new_tokens, request.num_prompt_tokens - num_computed_tokens)
        return num_new_tokens

    def _free_request(self, request, *args, **kwargs):
        self.dropped.pop(request.request_id, None)
        return super()._free_request(request, *args, **kwargs)


class DroppedCounts:
    """D of each request, on the device, at the index of the request's first block in each group after the cut
    (which it holds from its prefill to its end; block ids are unique over the groups): written at a prompt's cut,
    read by every later step's metadata. One per engine, shared by the layers after the cut and so by every builder
    of their metadata."""

    def __init__(self) -> None:
        self.of_block: torch.Tensor | None = None

    def table(self, layer: Attention, block_bytes: int, device: torch.device) -> torch.Tensor:
        """The table, made at the first step (when the layer's KV cache, whatever its backend's layout, is bound)."""
        if self.of_block is None:
            cache = layer.kv_cache[0] if isinstance(layer.kv_cache, list) else layer.kv_cache
            self.of_block = torch.zeros(cache.numel() * cache.element_size() // block_bytes, dtype=torch.int32, device=device)
        return self.of_block


@cache
def cut_backend(backend: type[AttentionBackend]) -> type[AttentionBackend]:
    """The active backend with a metadata builder for the cut group: each request's sequence length less its D,
    and its new tokens' slots at index i - D, computed on the device before the backend's own builder runs. vLLM's
    model runner builds every step's metadata with it (so a step that cuts nothing needs no more), and
    `CutDecoder` rebuilds it for a step whose prompts the cut shortens."""

    class CutMetadataBuilder(backend.get_builder_cls()):
        supports_update_block_table = False  # each group after the cut has its own blocks, so its own slots: built whole

        @classmethod
        def get_cudagraph_support(cls, vllm_config: VllmConfig, kv_cache_spec) -> AttentionCGSupport:
            return AttentionCGSupport.NEVER  # lengths in new tensors each step, not in buffers a graph could replay

        def __init__(self, kv_cache_spec, layer_names: list[str], vllm_config: VllmConfig, device: torch.device) -> None:
            super().__init__(kv_cache_spec, layer_names, vllm_config, device)
            self.layer = vllm_config.compilation_config.static_forward_context[layer_names[0]]

        def dropped(self) -> torch.Tensor:
            """The engine's table of D per block (`DroppedCounts`), which every builder of the group shares."""
            return self.layer.dropped.table(self.layer, self.kv_cache_spec.page_size_bytes, self.device)

        def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata, fast_build: bool = False):
            """common_attn_metadata: each request's rows in this group's batch and its length as vLLM counts it;
            its slot mapping (the step's, for this group's layers) is written over with the cut's."""
            common, size = common_attn_metadata, self.kv_cache_spec.block_size
            n, table, device = common.num_reqs, common.block_table_tensor, common.seq_lens.device
            dropped = self.dropped()
            first = table[:n, 0]
            query_lens = common.query_start_loc[1 : n + 1] - common.query_start_loc[:n]
            seq_lens = common.seq_lens.clone()
            # a prompt computed from its start keeps itself whole until its cut, if it has one (which then writes its D)
            dropped[first] = torch.where(query_lens == seq_lens[:n], 0, dropped[first])
            seq_lens[:n] -= dropped[first]
            starts = common.query_start_loc_cpu[: n + 1].numpy()  # the host's copy, which vLLM gives every builder
            owner = np.repeat(np.arange(n), np.diff(starts))
            within = np.arange(owner.shape[0]) - starts[owner]
            owner, within = (torch.from_numpy(a).to(device, non_blocking=True) for a in (owner, within))
            index = (seq_lens[:n] - query_lens)[owner] + within  # token i of a request at index i - D of its blocks
            common.slot_mapping[: owner.shape[0]] = table[owner, index // size].long() * size + index % size
            return super().build(common_prefix_len, common.replace(seq_lens=seq_lens, seq_lens_cpu_upper_bound=None), fast_build)

    return subclass_attention_backend("Cut", backend, CutMetadataBuilder)


class CutAttention(Attention):
    """vLLM's attention for a layer after the cut: its KV cache a `CutSpec` group, its metadata `cut_backend`'s."""

    def __init__(self, *args, dropped: DroppedCounts, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.dropped = dropped

    def get_kv_cache_spec(self, vllm_config: VllmConfig) -> CutSpec:
        spec = super().get_kv_cache_spec(vllm_config)
        return CutSpec(**{f.name: getattr(spec, f.name) for f in fields(AttentionSpec)})


def use_cut_attention(self_attn: nn.Module, vllm_config: VllmConfig, dropped: DroppedCounts) -> None:
    """Give a Llama or Qwen attention module a `CutAttention` in place of the `Attention` its constructor made (whose
    backend it wraps and whose registration under the layer's name it takes over)."""
    name = self_attn.attn.layer_name
    vllm_config.compilation_config.static_forward_context.pop(name)
    self_attn.attn = CutAttention(
        self_attn.num_heads, self_attn.head_dim, self_attn.scaling, num_kv_heads=self_attn.num_kv_heads,
        cache_config=vllm_config.cache_config, quant_config=vllm_config.quant_config, prefix=name,
        attn_backend=cut_backend(self_attn.attn.attn_backend), dropped=dropped,
    )


def cut_decoder(model: nn.Module, setting: Setting, vllm_config: VllmConfig) -> CutDecoder | None:
    """The decoder cut of an engine whose setting has one (its engine options checked, the layers after it given a
    `CutAttention`), or None."""
    if setting.cut is None:
        return None
    check_engine(vllm_config, setting)
    dropped = DroppedCounts()
    for layer in model.layers[setting.cut.layer :]:
        use_cut_attention(layer.self_attn, vllm_config, dropped)
    return CutDecoder(model, setting, vllm_config)


def check_engine(vllm_config: VllmConfig, setting: Setting) -> None:
    """The engine options a cut needs (`CUT_ENGINE`), and what it cannot run with, each named."""
    scheduler, cache, model, parallel = vllm_config.scheduler_config, vllm_config.cache_config, vllm_config.model_config, vllm_config.parallel_config
    found = {
        "scheduler_cls": scheduler.scheduler_cls if isinstance(scheduler.scheduler_cls, str) else getattr(scheduler.scheduler_cls, "__qualname__", None),
        "enable_chunked_prefill": scheduler.enable_chunked_prefill,
        "enable_prefix_caching": cache.enable_prefix_caching,
    }
    if found["scheduler_cls"] in ("CutScheduler", CutScheduler.__module__ + ".CutScheduler"):
        found["scheduler_cls"] = CUT_ENGINE["scheduler_cls"]
    wrong = {k: v for k, v in found.items() if v != CUT_ENGINE[k]}
    if wrong:
        raise ValueError(
            f"method={setting.method.name!r} cuts before decoder layer {setting.cut.layer}, which needs the engine options "
            f"{CUT_ENGINE} (star.integrations.vllm.engine_args gives them; `star serve` passes them); this engine has "
            + ", ".join(f"{k}={v!r}" for k, v in wrong.items())
        )
    if parallel.pipeline_parallel_size > 1:
        raise ValueError(f"pipeline_parallel_size={parallel.pipeline_parallel_size}: the decoder cut runs its layers in one pipeline stage")
    kv_heads = model.hf_text_config.num_key_value_heads
    if kv_heads % parallel.tensor_parallel_size:
        raise ValueError(
            f"tensor_parallel_size={parallel.tensor_parallel_size} with {kv_heads} key-value heads: the cut gathers every "
            "rank's heads for its scores, which needs the key-value heads split evenly (not copied) across the ranks"
        )
    if vllm_config.speculative_config is not None or cache.cache_dtype != "auto":
        raise ValueError("the decoder cut runs without speculative decoding and with kv_cache_dtype='auto'")


def profile_run() -> bool:
    """Whether this forward is vLLM's profile run (no attention metadata, no CUDA graph), where the model compiles."""
    context = get_forward_context()
    return context.attn_metadata is None and context.cudagraph_runtime_mode == CUDAGraphMode.NONE


def cuts(visual: torch.Tensor | None) -> bool:
    """Whether a step holds image rows (vLLM's `is_multimodal`, on the host on every platform: read as the host's
    array, which a tensor on a device refuses), so that the cut shortens a prompt in it. A step that cuts nothing
    is vLLM's own forward: the metadata of the layers after the cut, which vLLM builds with `cut_backend`'s
    builder, already counts what earlier steps dropped."""
    return visual is not None and bool(visual.numpy().any())


@dataclass
class StepRequest:
    """One request of a step that cuts: its rows in the batch before the cut [start, end) and after it
    [new_start, new_end), its length so far (seq_len, in vLLM's count), its image rows (offsets in its prompt;
    set at its prefill, which is then its cut), and D, the tokens its cut drops (0 for a request that does not cut
    this step)."""

    start: int
    end: int
    seq_len: int
    visual: list[int]
    units: list[int] | None = None  # each image row's image tokens from the encoder (None: the setting's per image)
    new_start: int = 0
    new_end: int = 0
    dropped: int = 0

    @property
    def prefill(self) -> bool:
        return self.seq_len == self.end - self.start


@support_torch_compile(dynamic_arg_dims={"positions": -1, "hidden": 0, "added": 1})
class LayersBeforeCut(nn.Module):
    """Layers 0..K-1 at a step that cuts, compiled as vLLM compiles the model (`support_torch_compile`, as vLLM's
    Gemma3n compiles its self- and cross-decoder apart). Returns the residual stream at the cut and at the score
    layer's input."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", layers: nn.ModuleList, score_layer: int) -> None:
        super().__init__()
        self.layers, self.score_layer = layers, score_layer

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, added: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        residual, score_input = None, None
        for index, layer in enumerate(self.layers):
            if index == self.score_layer:
                score_input = _true(hidden, residual)
            hidden, residual = layer(positions, hidden, residual)
            if added is not None and index < added.shape[0]:
                hidden = hidden + added[index]
        x = _true(hidden, residual)
        return x, x if score_input is None else score_input


@support_torch_compile(dynamic_arg_dims={"positions": -1, "hidden": 0, "added": 1})
class LayersAfterCut(nn.Module):
    """Layers K.. and the last norm over the kept rows, compiled as `LayersBeforeCut` (a class of its own: vLLM keys
    a compiled module's cache on its `forward`'s name and line)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", layers: nn.ModuleList, norm: nn.Module) -> None:
        super().__init__()
        self.layers, self.norm = layers, norm

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, added: torch.Tensor | None) -> torch.Tensor:
        residual = None
        for index, layer in enumerate(self.layers):
            hidden, residual = layer(positions, hidden, residual)
            if added is not None and index < added.shape[0]:
                hidden = hidden + added[index]
        return self.norm(hidden, residual)[0]


class CutDecoder:
    """The language model's forward at a step that cuts (`cuts`): layers 0..K-1, the method's selection per request
    at the cut, layers K.. (vLLM's own) on the kept rows, over their groups' caches through attention metadata
    rebuilt for the kept rows. The two layer ranges are compiled as vLLM compiles the model (at its profile run,
    `compile`); the selection runs eagerly. Such a step is a prefill with images, read to the host once."""

    def __init__(self, model: nn.Module, setting: Setting, vllm_config: VllmConfig) -> None:
        self.model, self.setting, self.stage, self.vllm_config = model, setting, setting.cut, vllm_config
        self.cut_layers = [layer.self_attn.attn for layer in model.layers[setting.cut.layer :]]
        self.builders: list = []  # a metadata builder (`cut_backend`'s) per KV-cache group after the cut, made at the first cut
        with set_model_tag("star_before_cut"):
            self.before = LayersBeforeCut(vllm_config=vllm_config, layers=model.layers[: setting.cut.layer], score_layer=setting.cut.score_layer)
        with set_model_tag("star_after_cut"):
            self.after = LayersAfterCut(vllm_config=vllm_config, layers=model.layers[setting.cut.layer :], norm=model.norm)

    def compile(self, positions: torch.Tensor, embeds: torch.Tensor, added: list[torch.Tensor] = ()) -> None:
        """At vLLM's profile run (`profile_run`), both layer ranges over its rows (no attention metadata: the kernels
        skip), so that they compile when the model does, not in the first request that cuts."""
        if self.vllm_config.compilation_config.mode == CompilationMode.NONE:
            return
        with _no_graphs():
            x, _ = self.before(positions, embeds, _stack(added[: self.stage.layer]))
            self.after(positions, x, _stack(added[self.stage.layer :]))

    def forward(
        self, positions: torch.Tensor, embeds: torch.Tensor, visual: torch.Tensor, units: torch.Tensor | None = None,
        added: list[torch.Tensor] = (),
    ) -> torch.Tensor:
        """The last norm's output for every input row (rows the cut dropped: zeros, never read by the LM head).
        positions: vLLM's ([S], or [3, S] for M-RoPE); visual: the image rows; units: each row's image's tokens
        from the encoder, where images differ in size (Qwen); added: what the model adds to every row's hidden state
        after each of its first layers (Qwen3-VL's DeepStack features), which go with the kept rows."""
        requests = self._requests(visual, units)
        cut = self.stage.layer
        with _no_graphs():
            x, score_input = self.before(positions, embeds, _stack(added[:cut]))
            kept, positions = self._cut(requests, positions, score_input, x)
            self._bind(requests, kept.shape[0])
            hidden = self.after(positions, x[kept], _stack(added[cut:], kept))
        out = hidden.new_zeros(embeds.shape[0], hidden.shape[-1])
        out[kept] = hidden
        return out

    def _requests(self, visual: torch.Tensor, units: torch.Tensor | None) -> list[StepRequest]:
        """The step's requests, from the first layer's attention metadata read to the host, with the step's image
        rows (vLLM's `is_multimodal`, on the host) and their images' sizes."""
        first = get_forward_context().attn_metadata[self.model.layers[0].self_attn.attn.layer_name]
        starts, seq_lens = first.query_start_loc.tolist(), first.seq_lens.tolist()
        flags = visual.tolist()
        sizes = units.tolist() if units is not None else None
        requests = []
        for r, seq_len in enumerate(seq_lens):
            start, end = starts[r], starts[r + 1]
            rows = [i for i in range(start, min(end, len(flags))) if flags[i]]
            request = StepRequest(start, end, seq_len, [i - start for i in rows], None if sizes is None else [sizes[i] for i in rows])
            if request.visual and not request.prefill:
                raise RuntimeError(
                    f"a prompt with images reached the decoder cut in part ({request.end - request.start} of {seq_len} tokens): "
                    "the cut needs the whole prompt at once (enable_chunked_prefill=False, enable_prefix_caching=False)"
                )
            requests.append(request)
        return requests

    def _cut(self, requests, positions, score_input, x) -> tuple[torch.Tensor, torch.Tensor]:
        """Each cutting request's selection: the rows kept (an index into the batch) and their positions."""
        kept, new_positions, offset = [], [], 0
        for request in requests:
            part, length = slice(request.start, request.end), request.end - request.start
            if request.visual:
                index, merged = self._select(request, positions[..., part], score_input[part], x[part])
                if merged is not None:
                    x[request.start + merged[0]] = merged[1].to(x.dtype)
                request.dropped = length - index.shape[0]
                kept.append(request.start + index)
                # M-RoPE: each kept token keeps its own position; else the gap-free numbering moved up by D
                mrope = positions.dim() == 2
                new_positions.append(positions[:, request.start + index] if mrope else torch.arange(request.dropped, length, device=x.device))
            else:
                kept.append(torch.arange(request.start, request.end, device=x.device))
                new_positions.append(positions[..., part])
            request.new_start, request.new_end = offset, offset + kept[-1].shape[0]
            offset = request.new_end
        return torch.cat(kept), torch.cat(new_positions, dim=-1)

    def _bind(self, requests: list[StepRequest], rows: int) -> None:
        """The attention metadata of this step's kept rows for the layers after the cut, in the step's forward
        context: per KV-cache group of theirs (vLLM splits them into groups as many layers as the group before the
        cut, each with its own blocks), each cutting request's D written at its first block there, then the group's
        builder on each request's queries after the cut (padding rows past them get no slot)."""
        context = get_forward_context()
        counted = context.attn_metadata[self.model.layers[0].self_attn.attn.layer_name]  # lengths as vLLM counts them
        device = counted.seq_lens.device
        cutting = [r for r, request in enumerate(requests) if request.visual]
        cutting, dropped = on_device(cutting, device), on_device([requests[r].dropped for r in cutting], device)
        lengths = [request.new_end - request.new_start for request in requests]
        starts = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
        groups: dict[int, list[str]] = {}  # the runner gives the layers of one group one metadata object
        for attn in self.cut_layers:
            groups.setdefault(id(context.attn_metadata[attn.layer_name]), []).append(attn.layer_name)
        for index, names in enumerate(groups.values()):
            if index == len(self.builders):
                spec = self.cut_layers[0].get_kv_cache_spec(self.vllm_config)
                self.builders.append(self.cut_layers[0].attn_backend.get_builder_cls()(spec, names, self.vllm_config, device))
            builder, table = self.builders[index], context.attn_metadata[names[0]].block_table
            builder.dropped()[table[cutting, 0]] = dropped.to(torch.int32)
            slots = torch.full((rows,), PAD_SLOT_ID, dtype=torch.long, device=device)
            common = CommonAttentionMetadata(
                query_start_loc=starts.to(device), query_start_loc_cpu=starts, seq_lens=counted.seq_lens, num_reqs=len(requests),
                num_actual_tokens=sum(lengths), max_query_len=max(lengths), max_seq_len=counted.max_seq_len, block_table_tensor=table,
                slot_mapping=slots,
            )
            metadata = builder.build(0, common)
            for name in names:
                context.attn_metadata[name] = metadata
                context.slot_mapping[name] = slots

    def _budget(self, request: StepRequest) -> int:
        """The image tokens a prompt keeps after the cut: each image's own budget (`Setting.unit_cut`), summed."""
        setting, n_visual = self.setting, len(request.visual)
        if request.units is None:  # every image of the setting's size, its rows a multiple of it
            if n_visual % setting.keep:
                raise RuntimeError(f"a prompt holds {n_visual} image tokens, not a multiple of the setting's {setting.keep} per image")
            return n_visual // setting.keep * self.stage.keep
        # images of their own sizes, each a run of rows between its vision start and end tokens
        firsts = [i for i, row in enumerate(request.visual) if i == 0 or row != request.visual[i - 1] + 1]
        return sum(setting.unit_cut(request.units[i]) for i in firsts)

    def _select(self, request: StepRequest, positions, score_input, x) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """One prompt's cut: the method's `select_llm` on its `DecoderView`. Returns the kept rows (prompt
        offsets, in order) and, for a merging method, (its kept visual rows, their states) to write over them."""
        setting = self.setting
        length, n_visual = x.shape[0], len(request.visual)
        budget = self._budget(request)
        visual = on_device(request.visual, x.device)[None]
        n_text = length - 1 - request.visual[-1]
        layer = self.model.layers[self.stage.score_layer]

        @cache
        def qk() -> tuple[torch.Tensor, torch.Tensor]:
            return _qk(layer, score_input, positions)

        def attention(rows: torch.Tensor) -> torch.Tensor:
            q, k = qk()
            return attention_probs(q[:, :, rows[0]], k, None, rows)

        view = DecoderView(
            hidden=score_input[None], visual=visual, n_text=torch.tensor([n_text], device=x.device), text_counts=[n_text],
            key_mask=torch.ones(1, length, dtype=torch.bool, device=x.device), attention=attention,
            keys=lambda: qk()[1], states=x[None], normed_states=lambda: self.model.norm(x)[None],
        )
        selection: Selection = setting.method.select_llm(self.stage, view, budget)
        keep = torch.ones(length, dtype=torch.bool, device=x.device)
        keep[visual[0]] = False
        chosen = visual[0, selection.index[0]]
        keep[chosen] = True
        index = flagged_in_order(keep[None], length - n_visual + budget)[0]
        return index, None if selection.states is None else (chosen, selection.states[0])


def _qk(layer: nn.Module, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A Llama or Qwen layer's queries and keys for its input x [S, D] after the rotary embedding, every rank's heads:
    [1, H, S, d], [1, H_kv, S, d]."""
    attn = layer.self_attn
    qkv, _ = attn.qkv_proj(layer.input_layernorm(x))
    q, k, _ = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
    length = x.shape[0]
    if hasattr(attn, "q_norm"):  # Qwen3's per-head norms of queries and keys, before the rotary embedding
        q = attn.q_norm(q.view(length, -1, attn.head_dim)).view(length, -1)
        k = attn.k_norm(k.view(length, -1, attn.head_dim)).view(length, -1)
    q, k = attn.rotary_emb(positions, q, k)
    q = q.view(length, attn.num_heads, attn.head_dim).transpose(0, 1)[None]
    k = k.view(length, attn.num_kv_heads, attn.head_dim).transpose(0, 1)[None]
    if get_tensor_model_parallel_world_size() > 1:  # each rank holds its share of the heads: the scores read them all
        q, k = tensor_model_parallel_all_gather(q.contiguous(), dim=1), tensor_model_parallel_all_gather(k.contiguous(), dim=1)
    return q, k


def _stack(added: list[torch.Tensor], rows: torch.Tensor | None = None) -> torch.Tensor | None:
    """A layer range's additions as one tensor [layers, rows, D] (of the kept rows), or None where it has none."""
    if not added:
        return None
    stacked = torch.stack(list(added))
    return stacked if rows is None else stacked[:, rows]


@contextmanager
def _no_graphs():
    """The step's CUDA-graph mode off while the cut's layer ranges run: vLLM's graphs are captured for the step's
    rows before the cut, and the rows after it are as many as the cut keeps."""
    context = get_forward_context()
    mode, context.cudagraph_runtime_mode = context.cudagraph_runtime_mode, CUDAGraphMode.NONE
    try:
        yield
    finally:
        context.cudagraph_runtime_mode = mode


def _true(hidden: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    """The residual stream vLLM's layers carry as (hidden, residual), added up as the next layer's norm does: a
    tensor of its own (before the first layer, not vLLM's input buffer), which the cut may write into."""
    return hidden.clone() if residual is None else hidden + residual
