"""One decoder cut inside vLLM (STAR's stage 2, FastV's, DART's) on a Llama-layer decoder (LLaVA-1.5), with the KV cache of the layers
after the cut holding only the kept tokens.

vLLM gives a request one token count: its positions, and the KV cache of the layers before the cut, run over the
prompt as the vision stage left it (S tokens). The layers from the cut on (K..L-1) are a KV-cache group of their
own (`CutSpec`, registered with vLLM's `KVCacheSpecRegistry`), whose slots follow vLLM's positions like every
group's, and which `CutDecoder` reads and writes itself. For a request whose prompt the cut shortens by D tokens:

    slot 0          a header: its key NaN, its value D (a layer has no other memory of a request at decode)
    slots 1..D-1    nothing: the blocks wholly inside are freed once the prompt is computed (`CutManager`)
    slots D..S-1    the kept prompt tokens in order, at positions D..S-1: the gap-free numbering moved up by D,
                    so every query-key distance, all RoPE sees, is that of `star.apply(..., positions="contiguous")`
    slots S..       the generated tokens, at vLLM's own positions

Requests without an image keep their prompt whole (no header). `CutScheduler` tells the managers what each
request drops (images x (stage-1 count - keep)), as it follows from the engine's setting before anything runs.
What the engine must not do with such a request: split its prompt into chunks (the cut needs every text row),
share cached prefixes (the layers after the cut hold what the question chose), or recompute it after a preemption
(its answer would join the scoring rows): `CUT_ENGINE` turns off the first two, and a cut request the scheduler
preempts ends with an error instead.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn
from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size, tensor_model_parallel_all_gather
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.attention import Attention
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.utils.math_utils import cdiv
from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs
from vllm.v1.kv_cache_interface import AttentionSpec
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry
from vllm.v1.request import RequestStatus

from star.integrations.vllm import CUT_ENGINE, Setting, engine_setting
from star.methods import DecoderView, Selection
from star.decoder import on_device
from star.scoring import attention_probs, flagged_in_order

HEADER_BASE = 256  # D is stored as two digits below 256: exact in float32, float16 and bfloat16 alike


@dataclass(frozen=True, kw_only=True)
class CutSpec(AttentionSpec):
    """The KV cache of the layers from the cut on: full attention whose requests drop tokens at the cut. Not a
    `FullAttentionSpec`, which vLLM would put in one group with the layers before the cut."""

    def max_memory_usage_bytes(self, vllm_config: VllmConfig) -> int:
        return cdiv(vllm_config.model_config.max_model_len, self.block_size) * self.page_size_bytes


def freed_blocks(dropped: int, block_size: int) -> int:
    """The blocks a request's cut frees: those wholly inside slots 1..D-1 (block 0 keeps the header)."""
    return max(0, dropped // block_size - 1)


class CutManager(FullAttentionManager):
    """Frees, once a request's prompt is computed, the blocks its cut emptied (`freed_blocks`). `dropped`
    (request id -> D) is the scheduler's, which `CutScheduler` hands to every cut group's manager."""

    def __init__(self, kv_cache_spec: CutSpec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        self.dropped: dict[str, int] = {}

    def remove_skipped_blocks(self, request_id: str, processed_computed_tokens: int, num_prompt_tokens: int | None = None) -> None:
        dropped = self.dropped.get(request_id, 0)
        if dropped and num_prompt_tokens is not None and processed_computed_tokens >= num_prompt_tokens:
            self._remove_blocks_in_range(request_id, 1, 1 + freed_blocks(dropped, self.block_size))


def register_kv_cache_spec() -> None:
    """Make `CutSpec` a group of its own with its own manager (called in every vLLM process by the plugin)."""
    KVCacheSpecRegistry.register(CutSpec, CutManager)


class CutScheduler(Scheduler):
    """vLLM's scheduler, telling the cut group's managers what each request drops, and ending with an error a cut
    request it preempts (recomputing it would score its own answer as part of the question)."""

    def __init__(self, vllm_config: VllmConfig, *args, **kwargs) -> None:
        super().__init__(vllm_config, *args, **kwargs)
        setting = engine_setting(vllm_config.model_config.hf_config)
        self.dropped_per_image = setting.keep - setting.cut.keep if setting.cut else 0
        self.dropped: dict[str, int] = {}  # request id -> D, shared with every cut group's manager
        for manager in self.kv_cache_manager.coordinator.single_type_managers:
            if isinstance(manager, CutManager):
                manager.dropped = self.dropped
        self.preempted_cuts: set[str] = set()

    def add_request(self, request) -> None:
        super().add_request(request)
        images = sum(1 for feature in request.mm_features or () if feature.modality == "image")
        self.dropped[request.request_id] = images * self.dropped_per_image

    def _preempt_request(self, request, timestamp: float, drop_stale_output: bool = False) -> None:
        super()._preempt_request(request, timestamp, drop_stale_output)
        if self.dropped.get(request.request_id):
            self.preempted_cuts.add(request.request_id)

    def update_from_output(self, scheduler_output, model_runner_output) -> dict[int, EngineCoreOutputs]:
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        if self.preempted_cuts:
            ended = self.finish_requests(self.preempted_cuts, RequestStatus.FINISHED_ERROR)
            self.preempted_cuts = set()
            for request in ended:
                output = EngineCoreOutput(request_id=request.request_id, new_token_ids=[], finish_reason=request.get_finished_reason())
                outputs.setdefault(request.client_index, EngineCoreOutputs()).outputs.append(output)
        return outputs

    def _free_request(self, request, *args, **kwargs):
        self.dropped.pop(request.request_id, None)
        return super()._free_request(request, *args, **kwargs)


class CutAttention(Attention):
    """The attention module of a layer after the cut: vLLM allocates and binds its KV cache, as a `CutSpec` group;
    `CutDecoder` reads and writes it (vLLM's kernels never see the header or the freed slots)."""

    def get_kv_cache_spec(self, vllm_config: VllmConfig) -> CutSpec:
        spec = super().get_kv_cache_spec(vllm_config)
        return CutSpec(**{f.name: getattr(spec, f.name) for f in fields(AttentionSpec)})

    def forward(self, *args, **kwargs):
        raise RuntimeError(f"{self.layer_name} is after the decoder cut: CutDecoder runs its attention")


def use_cut_attention(self_attn: nn.Module, vllm_config: VllmConfig) -> None:
    """Give a Llama attention module a `CutAttention` in place of the `Attention` its constructor made (whose
    registration under the layer's name it takes over)."""
    name = self_attn.attn.layer_name
    vllm_config.compilation_config.static_forward_context.pop(name)
    self_attn.attn = CutAttention(
        self_attn.num_heads, self_attn.head_dim, self_attn.scaling, num_kv_heads=self_attn.num_kv_heads,
        cache_config=vllm_config.cache_config, quant_config=vllm_config.quant_config, prefix=name,
    )


def check_engine(vllm_config: VllmConfig, setting: Setting) -> None:
    """The engine options a cut needs (`CUT_ENGINE`), and what it cannot run with, each named."""
    scheduler, cache, model, parallel = vllm_config.scheduler_config, vllm_config.cache_config, vllm_config.model_config, vllm_config.parallel_config
    found = {
        "scheduler_cls": scheduler.scheduler_cls if isinstance(scheduler.scheduler_cls, str) else getattr(scheduler.scheduler_cls, "__qualname__", None),
        "enable_chunked_prefill": scheduler.enable_chunked_prefill,
        "enable_prefix_caching": cache.enable_prefix_caching,
        "enforce_eager": model.enforce_eager,
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


@dataclass
class StepRequest:
    """One request of a step: its rows in the batch before the cut [start, end) and after it [new_start, new_end),
    its length so far (seq_len, in vLLM's positions), its image rows (offsets in its prompt; set at its prefill,
    which is then its cut) and D, the tokens its cut dropped (None: read from the header)."""

    start: int
    end: int
    seq_len: int
    visual: list[int]
    new_start: int = 0
    new_end: int = 0
    dropped: int | None = 0


class CutDecoder:
    """The language model's forward when the engine's setting cuts before layer K: layers 0..K-1 as vLLM runs
    them, the method's selection per request at the cut, layers K.. on the kept rows over the cut group's cache."""

    def __init__(self, model: nn.Module, setting: Setting) -> None:
        self.model, self.setting, self.stage = model, setting, setting.cut

    def forward(self, positions: torch.Tensor, embeds: torch.Tensor, visual: torch.Tensor | None) -> torch.Tensor:
        """The last norm's output for every input row (rows the cut dropped: zeros, never read by the LM head)."""
        layers, stage = self.model.layers, self.stage
        requests = self._requests(visual)
        hidden, residual, score_input = embeds, None, None
        for index, layer in enumerate(layers[: stage.layer]):
            if index == stage.score_layer:
                score_input = _true(hidden, residual)
            hidden, residual = layer(positions, hidden, residual)
        x = _true(hidden, residual)
        score_input = x if score_input is None else score_input
        kept, new_positions = self._cut(requests, positions, score_input, x)
        x = x[kept] if kept is not None else x
        positions = new_positions
        hidden, residual = x, torch.zeros_like(x)
        self._read_headers(requests)
        for index, layer in enumerate(layers[stage.layer :]):
            hidden, residual = self._layer(layer, positions, hidden, residual, requests, first=index == 0)
        hidden, _ = self.model.norm(hidden, residual)
        if kept is None:
            return hidden
        out = hidden.new_zeros(embeds.shape[0], hidden.shape[-1])
        out[kept] = hidden
        return out

    def _requests(self, visual: torch.Tensor | None) -> list[StepRequest] | None:
        """The step's requests, from the first layer's attention metadata (None: a profiling run, one sequence),
        read to the host once, with the step's image rows (vLLM's `is_multimodal`, already on the host)."""
        metadata = get_forward_context().attn_metadata
        if not metadata:
            return None
        first = metadata[self.model.layers[0].self_attn.attn.layer_name]
        starts, seq_lens = first.query_start_loc.tolist(), first.seq_lens.tolist()
        flags = visual.tolist() if visual is not None else []
        requests = []
        for r, seq_len in enumerate(seq_lens):
            start, end = starts[r], starts[r + 1]
            request = StepRequest(start, end, seq_len, [i - start for i in range(start, min(end, len(flags))) if flags[i]])
            past = seq_len - (end - start)
            if request.visual and past:
                raise RuntimeError(
                    f"a prompt with images reached the decoder cut in part ({request.end - request.start} of {seq_len} tokens): "
                    "the cut needs the whole prompt at once (enable_chunked_prefill=False, enable_prefix_caching=False)"
                )
            request.dropped = None if past else 0  # a prefill keeps its prompt whole until its cut, if it has one
            requests.append(request)
        return requests

    def _cut(self, requests, positions, score_input, x) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Each cutting request's selection: the rows kept (an index into the batch) and their positions."""
        if requests is None:
            return None, positions
        kept, new_positions, offset = [], [], 0
        for request in requests:
            part, length = slice(request.start, request.end), request.end - request.start
            if request.visual:
                index, merged = self._select(request, positions[part], score_input[part], x[part])
                if merged is not None:
                    x[request.start + merged[0]] = merged[1].to(x.dtype)
                request.dropped = length - index.shape[0]
                kept.append(request.start + index)
                new_positions.append(torch.arange(request.dropped, length, device=x.device))
            else:
                kept.append(torch.arange(request.start, request.end, device=x.device))
                new_positions.append(positions[part])
            request.new_start, request.new_end = offset, offset + kept[-1].shape[0]
            offset = request.new_end
        if offset == x.shape[0] and not any(request.visual for request in requests):
            return None, positions  # no prompt cut this step (decoding, text alone): every row stays where it is
        return torch.cat(kept), torch.cat(new_positions)

    def _select(self, request: StepRequest, positions, score_input, x) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """One prompt's cut: the method's `select_llm` on its `DecoderView`. Returns the kept rows (prompt
        offsets, in order) and, for a merging method, (its kept visual rows, their states) to write over them."""
        setting, stage = self.setting, self.stage
        length, n_visual = x.shape[0], len(request.visual)
        if n_visual % setting.keep:
            raise RuntimeError(f"a prompt holds {n_visual} image tokens, not a multiple of the setting's {setting.keep} per image")
        budget = n_visual // setting.keep * stage.keep
        visual = on_device(request.visual, x.device)[None]
        n_text = length - 1 - request.visual[-1]
        layer = self.model.layers[stage.score_layer]

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
        selection: Selection = setting.method.select_llm(stage, view, budget)
        keep = torch.ones(length, dtype=torch.bool, device=x.device)
        keep[visual[0]] = False
        chosen = visual[0, selection.index[0]]
        keep[chosen] = True
        index = flagged_in_order(keep[None], length - n_visual + budget)[0]
        return index, None if selection.states is None else (chosen, selection.states[0])

    def _read_headers(self, requests: list[StepRequest] | None) -> None:
        """D of each request decoding this step, from the header slot of the first layer after the cut."""
        if requests is None or all(r.dropped is not None for r in requests):
            return
        attn = self.model.layers[self.stage.layer].self_attn.attn
        pages, table = _pages(attn), _block_table(attn)
        waiting = [r for r, request in enumerate(requests) if request.dropped is None]
        heads = pages[table[waiting, 0]]  # [n, 2, block, heads, dim]
        marked = torch.isnan(heads[:, 0, 0, 0, 0])
        digits = heads[:, 1, 0, 0, :2].round().long()
        values = torch.where(marked, digits[:, 0] * HEADER_BASE + digits[:, 1], 0).tolist()
        for r, value in zip(waiting, values):
            requests[r].dropped = value

    def _layer(self, layer, positions, hidden, residual, requests, first: bool):
        """A Llama decoder layer after the cut (vLLM's `LlamaDecoderLayer.forward`, its attention ours)."""
        hidden, residual = layer.input_layernorm(hidden, residual)
        attn = layer.self_attn
        qkv, _ = attn.qkv_proj(hidden)
        q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
        q, k = attn.rotary_emb(positions, q, k)
        out = self._attend(attn, positions, q, k, v, requests, first)
        hidden, _ = attn.o_proj(out)
        hidden, residual = layer.post_attention_layernorm(hidden, residual)
        return layer.mlp(hidden), residual

    def _attend(self, attn, positions, q, k, v, requests, first: bool) -> torch.Tensor:
        """Every new row written to its request's slot (its position). A prefill's rows then attend among themselves
        (nothing precedes them: chunked prefill is off), and the decoding requests' rows together, each to its
        slots D..seq_len-1."""
        heads, kv_heads, dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
        q, k, v = q.view(-1, heads, dim), k.view(-1, kv_heads, dim), v.view(-1, kv_heads, dim)
        if requests is None:  # a profiling run: one causal sequence, no cache
            return _sdpa(q, k, v, attn.scaling).reshape(q.shape[0], -1)
        pages, table = _pages(attn.attn), _block_table(attn.attn)
        size = pages.shape[2]
        owner = on_device([r for r, request in enumerate(requests) for _ in range(request.new_start, request.new_end)], q.device)
        blocks, places = table[owner, positions // size], positions % size
        pages[blocks, 0, places] = k
        pages[blocks, 1, places] = v
        out = torch.empty_like(q)
        decoding = []
        for r, request in enumerate(requests):
            if first and request.visual:  # the header, in slot 0 of the request's block 0
                block = table[r, :1]
                pages[block, 0, 0] = float("nan")
                pages[block, 1, 0] = 0
                pages[block, 1, 0, 0, :2] = on_device(list(divmod(request.dropped, HEADER_BASE)), q.device).to(pages.dtype)
            if request.seq_len > request.end - request.start:  # it had tokens before this step: it decodes
                decoding.append(r)
            else:
                new = slice(request.new_start, request.new_end)
                out[new] = _sdpa(q[new], k[new], v[new], attn.scaling)
        if decoding:
            at = on_device([requests[r].new_start for r in decoding], q.device)
            out[at] = self._decode(q[at], pages, table, [requests[r] for r in decoding], on_device(decoding, q.device), attn.scaling)
        return out.reshape(q.shape[0], -1)

    @staticmethod
    def _decode(q: torch.Tensor, pages: torch.Tensor, table: torch.Tensor, requests: list[StepRequest], index: torch.Tensor, scale: float) -> torch.Tensor:
        """One new row per request [B, H, d] attending to its slots D..seq_len-1, the requests padded to the
        longest (the padding masked, and zeroed: a freed block may hold anything)."""
        lengths = [request.seq_len - request.dropped for request in requests]
        offsets = torch.arange(max(lengths), device=q.device)
        valid = offsets < on_device(lengths, q.device)[:, None]
        seen = torch.where(valid, on_device([request.dropped for request in requests], q.device)[:, None] + offsets, 0)
        blocks, places = table[index[:, None], seen // pages.shape[2]], seen % pages.shape[2]
        keys = torch.where(valid[..., None, None], pages[blocks, 0, places], 0).transpose(1, 2)
        values = torch.where(valid[..., None, None], pages[blocks, 1, places], 0).transpose(1, 2)
        out = F.scaled_dot_product_attention(q[:, :, None], keys, values, attn_mask=valid[:, None, None], scale=scale, enable_gqa=True)
        return out[:, :, 0]


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """A prefill's rows q [R, H, d] attending causally among themselves (keys and values [R, H_kv, d])."""
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], is_causal=True, scale=scale, enable_gqa=True
    )
    return out[0].transpose(0, 1)


def _qk(layer: nn.Module, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A Llama layer's queries and keys for its input x [S, D] after the rotary embedding, every rank's heads:
    [1, H, S, d], [1, H_kv, S, d]."""
    attn = layer.self_attn
    qkv, _ = attn.qkv_proj(layer.input_layernorm(x))
    q, k, _ = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
    q, k = attn.rotary_emb(positions, q, k)
    length = x.shape[0]
    q = q.view(length, attn.num_heads, attn.head_dim).transpose(0, 1)[None]
    k = k.view(length, attn.num_kv_heads, attn.head_dim).transpose(0, 1)[None]
    if get_tensor_model_parallel_world_size() > 1:  # each rank holds its share of the heads: the scores read them all
        q, k = tensor_model_parallel_all_gather(q.contiguous(), dim=1), tensor_model_parallel_all_gather(k.contiguous(), dim=1)
    return q, k


def _true(hidden: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    """The residual stream vLLM's layers carry as (hidden, residual), added up as the next layer's norm does: a
    tensor of its own (before the first layer, not vLLM's input buffer), which the cut may write into."""
    return hidden.clone() if residual is None else hidden + residual


def _pages(attn: Attention) -> torch.Tensor:
    """A cut layer's KV cache as [blocks, 2 (key, value), block_size, kv_heads, head_size]: the layout CutDecoder
    keeps within each block's own bytes, whatever shape the backend gives the tensor vLLM binds, as long as its
    memory holds whole blocks one after another (the CPU backend's), or all blocks' keys and then all their values
    (a leading dimension of 2; vLLM has far more than 2 blocks)."""
    cache = attn.kv_cache[0] if isinstance(attn.kv_cache, list) else attn.kv_cache
    physical = cache.permute(sorted(range(cache.dim()), key=cache.stride, reverse=True))
    if not physical.is_contiguous():
        raise RuntimeError(f"the KV cache of {attn.layer_name} ({attn.attn_backend.get_name()}, shape {tuple(cache.shape)}) is not one piece of memory")
    if physical.shape[0] == 2:
        return physical.view(2, physical.shape[1], -1, attn.num_kv_heads, attn.head_size).transpose(0, 1)
    return physical.view(physical.shape[0], 2, -1, attn.num_kv_heads, attn.head_size)


def _block_table(attn: Attention) -> torch.Tensor:
    return get_forward_context().attn_metadata[attn.layer_name].block_table
