"""The Pruner: hooks on one model instance that prune its visual tokens once per prompt, at prefill.

Two kinds of forward pre-hook, and nothing else of the model is touched:
- on the model itself: at prefill it hands the prompt to `entry` (stage 1, the shorter entry frame); at each
  decode step to `decode`, which maps generate()'s full-length inputs into that frame.
- on the decoder layers from the first decoder stage on: at a stage's layer, at prefill, `cut` scores and cuts
  the sequence; every later layer gets the shorter frame's inputs (its own layer type's mask and rotary tables,
  moved once per frame and type). Layers cache what they see, so the KV cache of layers >= K holds only the
  kept tokens, and at decode `decode` gives them the mask of their cached tokens.
- where the family adds features onto visual tokens after its first layers (Qwen3-VL's DeepStack), a forward
  hook on each of those layers adds them onto the visual tokens still present.
This module decides which of those applies to each call and refuses what none of them handles.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable

import torch
from torch import nn
from transformers import DynamicCache, StaticCache

from star import compat
from star import flops as flops_model
from star import methods as registry
from star.adapters import adapter_for
from star.adapters.base import Encoded, Layout, vision_refusal
from star.methods import Method
from star.pruner import decode
from star.pruner.budget import Budget
from star.pruner.cut import cut, frame_inputs
from star.pruner.entry import Prompt, continues, enter
from star.schedule import Point, PromptBudget, pick_per_prompt

POSITION_POLICIES = ("original", "contiguous")
ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2")


@dataclass
class PruneStats:
    """What the last prefill did.

    tokens: visual tokens per image after each stage: [from the encoder, entering the decoder, after each
    decoder stage]. For LLaVA-NeXT, per 576-token crop (the budget's unit); for families whose images differ
    in size (Qwen2-VL), and under a budget picked per prompt, those of the batch's first image. totals: the same
    counts per prompt, all its images (and crops) together, [B][stages]. kept_patches: for each of those stages after the encoder, [B, V] the
    visual tokens still present in each prompt, by their place among the prompt's image tokens (image m's
    patch j is m * n_visual + j for LLaVA-1.5; LLaVA-NeXT's newline tokens take places but are never listed);
    where prompts keep different numbers, shorter rows end with -1. A merged token counts as its
    representative's place. layers: the decoder layer where each decoder stage cut. sequence_lengths: the
    tokens each decoder layer processed (per prompt, padding included). flops: the decoder's prefill FLOPs for
    the whole batch, by the paper's formula over those lengths. picks: each prompt's setting (keep, options and
    its FLOPs as a fraction of its own unpruned prefill's), where a FLOPs budget picked it per prompt; else None.
    """

    tokens: list[int]
    kept_patches: list[torch.Tensor]
    layers: list[int]
    sequence_lengths: list[int]
    batch_size: int
    flops: float
    totals: list[list[int]]
    picks: list[Point] | None = None


@dataclass
class _Call:
    """State of one forward call as it passes through the decoder layers."""

    step: decode.Step | None  # None at prefill
    layers: int = 0  # hooked decoder layers that ran
    frame: int = 0  # the frame the layers run in now: 0 (the entry frame) until the first stage's layer
    overrides: dict[tuple, dict[str, Any]] = field(default_factory=dict)  # that frame's inputs, per layer type and query count
    saved: dict[int, tuple[torch.Tensor, dict[str, Any]]] = field(default_factory=dict)


class Pruner:
    """Prunes the visual tokens of one loaded model; `remove()` leaves the model exactly as it was."""

    def __init__(
        self, model: nn.Module, method: Method, keep: int | float, positions: str = "original", per_prompt: PromptBudget | None = None,
    ):
        """per_prompt: a FLOPs budget each prompt's setting is picked from at prefill; `method` and `keep` are then
        the nominal pick (see `PromptBudget.nominal`)."""
        self.adapter = adapter_for(model)
        if positions not in POSITION_POLICIES:
            raise ValueError(f"positions={positions!r} is unknown: allowed are {', '.join(POSITION_POLICIES)}")
        if positions == "contiguous" and self.adapter.mrope and not method.grid_positions:
            raise ValueError(
                f"positions='contiguous' is not defined for {type(model).__name__}: its M-RoPE positions are 3-D "
                "(an image's tokens share one temporal position and span a height x width grid), so there is no "
                "single gap-free renumbering of a subset (pool's grids have one); use positions='original'"
            )
        implementation = model.config.get_text_config()._attn_implementation
        if implementation not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(
                f"attn_implementation={implementation!r} is not supported: allowed are "
                f"{', '.join(ATTENTION_IMPLEMENTATIONS)}"
            )
        if getattr(model, "_star_pruner", None) is not None:
            raise ValueError("this model is already pruned: call remove() on its pruner before applying another")
        self.model = model
        self._flash = implementation == "flash_attention_2"  # takes a 2-D padding mask where the others take 4-D
        self.method = method
        self.positions = positions
        num_layers = len(self.adapter.layers)
        # Families whose images differ in size plan per image at prefill; the nominal plan checks the options
        # and places the hooks (a method's stage layers depend on its options and the depth, not on the image).
        self.budget = Budget(method, keep, self.adapter.n_visual, self.adapter.budget_unit, num_layers, self.adapter.attention_layers)
        self.keep = self.budget.keep
        self.plan = self.budget.plan
        self.adapter.check_stages(self.plan.llm_stages, method.name)
        self.per_prompt = per_prompt
        self._budgets: dict[tuple, Budget] = {}  # per setting a budget picked per prompt, with its plans per unit size
        self._check_encoder(type(model).__name__)
        self._shape = flops_model.DecoderShape.from_config(model.config.get_text_config())
        self._signature = inspect.signature(model.forward)
        self._prompt: Prompt | None = None
        self._call: _Call | None = None
        self._handles = [
            model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
            model.register_forward_hook(self._after_forward),
        ]
        self._hooked_layers = 0
        # Every layer a stage may score or cut at is hooked: with a budget per prompt, any its picks reach.
        firsts = [s.score_layer for s in self.plan.llm_stages] + ([per_prompt.first_layer()] if per_prompt else [])
        if firsts := [layer for layer in firsts if layer is not None]:
            first = min(firsts)
            self._hooked_layers = num_layers - first
            for index in range(first, num_layers):
                hook = partial(self._before_layer, index)
                self._handles.append(self.adapter.layers[index].register_forward_pre_hook(hook, with_kwargs=True))
        for index in range(self.adapter.residual_layers):
            self._handles.append(self.adapter.layers[index].register_forward_hook(partial(self._after_layer, index)))
        self._restore_generate = compat.keep_pixels_for_forward(model)
        model._star_pruner = self

    def remove(self) -> None:
        """Detach every hook; the model computes exactly what it did before `apply()`."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._restore_generate()
        self._restore_generate = lambda: None
        self._prompt = self._call = None
        if getattr(self.model, "_star_pruner", None) is self:
            del self.model._star_pruner

    def __enter__(self) -> Pruner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"Pruner(method={self.method!r}, keep={self.keep}, positions={self.positions!r}, plan={self.plan})"

    @property
    def stats(self) -> PruneStats | None:
        """Token counts and FLOPs of the last prefill (None before the first one)."""
        prompt = self._prompt
        if prompt is None:
            return None
        frames = prompt.frames
        lengths = [prompt.frame_at(i).length for i in range(len(self.adapter.layers))]
        batch = frames[0].keep_cols.shape[0]
        done = 1 + len(frames)
        return PruneStats(
            tokens=prompt.tokens[:done],
            kept_patches=[f.patches for f in frames],
            layers=[f.start_layer for f in frames[1:]],
            sequence_lengths=lengths,
            batch_size=batch,
            flops=batch * flops_model.prefill_flops(self._shape, lengths),
            totals=[row[:done] for row in prompt.totals],
            picks=prompt.picks,
        )

    def _check_encoder(self, model_name: str) -> None:
        """Refuse, before any compute, a vision stage this family cannot run (a [CLS] token its tower lacks,
        or one its decoder never receives)."""
        if self.plan.vision_keep >= self.plan.n_visual and self.per_prompt is None:
            return
        reason = vision_refusal(type(self.adapter), self.method)
        if reason:
            raise ValueError(f"method={self.method.name!r} cannot prune {model_name}: {reason}")

    # -- the model's forward: prefill and decode steps -------------------------------------------------

    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if args:
            bound = self._signature.bind_partial(*args, **kwargs).arguments
            kwargs = {**bound.pop("kwargs", {}), **bound}
        cache = compat.cache_of(kwargs)
        if cache is not None and not isinstance(cache, (DynamicCache, StaticCache)):
            raise ValueError(f"a cache of type {type(cache).__name__} is not supported: use DynamicCache or StaticCache")
        # A StaticCache counts its tokens on the device: reading the count waits for it, once per call (generate()
        # itself reads once per step to stop); a DynamicCache counts on the host.
        if isinstance(cache, StaticCache):
            prompt = None if kwargs.get("pixel_values") is not None else self._prompt
            dropped = 0 if prompt is None else prompt.full_length - prompt.frames[0].length
            past = compat.static_cache_length(cache, kwargs, dropped)
        else:
            past = 0 if cache is None else cache.get_seq_length()
            if past and self._prompt is not None:  # the count of the adapter's counted layer, in its own frame
                past += self._prompt.frames[0].length - self._prompt.frame_at(self.adapter.counted_layer).length
        self._call = None
        if past == 0:
            self._refuse_unpruned_inputs(kwargs)
        if kwargs.get("pixel_values") is not None:
            if past:
                raise ValueError(
                    "pixel_values came with a non-empty cache: pruning happens once per prompt, at "
                    "prefill; start a new cache for a new image"
                )
            if isinstance(cache, StaticCache) and self.adapter.window is not None and self._hooked_layers:
                raise ValueError(
                    "a StaticCache on a decoder with sliding-window layers is not supported while a decoder stage "
                    "prunes: its window layers keep the last tokens in place of all; use DynamicCache"
                )
            if isinstance(cache, StaticCache) and self.adapter.padding_mask_types and self._hooked_layers:
                raise ValueError(
                    "a StaticCache on a decoder with linear-attention layers is not supported while a decoder stage "
                    "prunes: its length is counted by an attention layer that a cut may shorten; use DynamicCache"
                )
            replay = self._prompt if continues(self._prompt, kwargs) else None
            self._prompt, inputs = enter(self.adapter, self._budgets_of, self.positions, kwargs, replay)
            self._check_window(self._prompt.frames[0].length)
            self._call = _Call(step=None)
            return (), inputs
        if past == 0:
            self._refuse_unpruned_images(kwargs)
        if past == 0 or self._prompt is None:
            self._prompt = None
            return (), kwargs
        inputs, step = decode.step_inputs(self.adapter, self._prompt, self.positions, kwargs, past)
        self._check_window(step.end)
        self._call = _Call(step=step)
        return (), inputs

    def _budgets_of(self, layout: Layout, encode: Callable[[], Encoded]) -> tuple[list[Budget], list[Point] | None]:
        """Each prompt's budget: the one given at apply, or the setting its budget picks for its own lengths, from the
        layout where every image token is a visual token of a whole unit, else from its encoded units' sizes."""
        if self.per_prompt is None:
            return [self.budget] * len(layout.image_tokens), None
        units = None
        if not self.adapter.whole_units:
            units = [[] for _ in layout.image_tokens]
            for group in encode().groups:
                for row in group.rows:
                    units[row].append(group.view.features.shape[1])
        picks = pick_per_prompt(self.per_prompt, layout.real_tokens, layout.image_tokens, units)
        return [self._budget_of(point) for point in picks], picks

    def _budget_of(self, point: Point) -> Budget:
        """The budget of a setting picked per prompt, made once (it keeps its plans per unit size)."""
        key = (point.keep, tuple(sorted(point.options.items())))
        if key not in self._budgets:
            method = registry.build(self.per_prompt.method, **self.per_prompt.options, **point.options)
            self._budgets[key] = Budget(
                method, point.keep, self.adapter.n_visual, self.adapter.budget_unit, len(self.adapter.layers), self.adapter.attention_layers,
            )
        return self._budgets[key]

    def _check_window(self, length: int) -> None:
        """Refuse a sequence (in the entry frame) that outgrows the decoder's sliding window while a decoder
        stage prunes it: within the window a sliding layer attends to all a global one does, so a cut's frame
        is exact; beyond it the window would span dropped tokens, and the sliding caches keep only its last
        tokens, which the pruned frames cannot be mapped onto."""
        window = self.adapter.window
        if window is not None and self._hooked_layers and length > window:
            raise ValueError(
                f"the sequence reaches {length} tokens after stage 1, beyond the decoder's sliding_window={window}: "
                f"method {self.method.name!r} prunes inside the decoder, which is defined within the window only; "
                "use a method that prunes before the decoder (random), a smaller keep, or a shorter prompt or answer"
            )

    def _refuse_unpruned_inputs(self, kwargs: dict) -> None:
        """A prefill with inputs that carry visual tokens this family's adapter does not prune (Gemma 4's video)."""
        for name, what in self.adapter.unpruned_inputs.items():
            if kwargs.get(name) is not None:
                raise ValueError(
                    f"{name} came at prefill: it carries {what}, so they would reach the decoder unpruned; "
                    "pass them without a pruner (remove() it first)"
                )

    def _refuse_unpruned_images(self, kwargs: dict) -> None:
        """A prefill whose images reach the model by any way but `pixel_values` would run unpruned: refuse it.

        Known ways: precomputed encoder outputs (transformers 5's `mm_encoder_outputs`), `inputs_embeds` (the
        pruner cannot tell image tokens in them), and image tokens in `input_ids` with their pixels under
        another name.
        """
        encoded = kwargs.get("mm_encoder_outputs")
        if encoded:
            raise ValueError(
                f"mm_encoder_outputs ({', '.join(encoded)}) came at prefill: the images were encoded before the "
                "model was called, so stage 1 cannot choose their patches; pass pixel_values instead"
            )
        if kwargs.get("inputs_embeds") is not None:
            raise ValueError(
                "inputs_embeds came at prefill: the pruner finds the image tokens by their ids; pass input_ids "
                "and pixel_values (or remove() the pruner for a prompt given as embeddings)"
            )
        input_ids = kwargs.get("input_ids")
        if input_ids is not None and bool((input_ids == self.adapter.image_token_id).any()):
            given = sorted(k for k, v in kwargs.items() if v is not None and k not in ("input_ids", "attention_mask"))
            raise ValueError(
                f"input_ids hold {int((input_ids == self.adapter.image_token_id).sum())} image tokens but no "
                f"pixel_values came (given: {', '.join(given) or 'nothing else'}): the pruner prunes images "
                "passed as pixel_values only"
            )

    def _after_forward(self, module: nn.Module, args: tuple, output: Any) -> None:
        """A call's frame state ends with the call, so layers run on their own afterwards are left alone.

        Every hooked layer must have run this call's hook: a forward compiled while another pruner (or none) was
        applied keeps the hooks it was traced with, and its decoder stages would silently not prune."""
        call, self._call = self._call, None
        if self._prompt is not None:  # its decisions are its own now: drop the prompt it reused them from
            self._prompt.replay = None
        if call is not None and call.layers != self._hooked_layers:
            raise RuntimeError(
                f"{call.layers} of the {self._hooked_layers} decoder layers this pruner prunes in ran its hooks: the "
                "model's forward was compiled with other hooks (compile after star.apply(), and again after remove() "
                "and a new apply(), with torch._dynamo.reset() between)"
            )

    # -- the decoder layers -----------------------------------------------------------------------------

    def _before_layer(self, index: int, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        call = self._call
        if call is None:
            return None
        call.layers += 1
        hidden = args[0]
        current = self._frame_inputs(index, hidden, kwargs)
        prompt = self._prompt
        if index in prompt.early_scores:
            call.saved[index] = (hidden, current)
        stage_number = prompt.stage_at.get(index)
        if stage_number is not None:
            if call.step is None:
                stage = prompt.stages[stage_number]
                scored = call.saved.get(stage.score_layer, (hidden, current))
                hidden = cut(self.adapter, stage, prompt, prompt.budgets[stage_number], self.positions, hidden, scored)
            call.frame, call.overrides = stage_number + 1, {}
            current = self._frame_inputs(index, hidden, kwargs)
        if current is kwargs:
            return None
        rest = args[1:]
        frame = prompt.frames[call.frame]
        if call.step is None and hidden.shape[1] == frame.length:  # per-token inputs made for the entry frame
            rest = self.adapter.frame_args(args, frame.keep_cols)
        return (hidden, *rest), current

    def _frame_inputs(self, index: int, hidden: torch.Tensor, kwargs: dict) -> dict:
        """Layer `index`'s inputs in the frame the layers run in now. The model makes them for the entry frame,
        a mask and rotary table per layer type, so each type's are moved once per frame."""
        call = self._call
        if call.frame == 0:
            return kwargs
        frame = self._prompt.frames[call.frame]
        layer_type = self.adapter.layer_type(index)
        key = (layer_type, hidden.shape[1])  # a layer the model runs on its last tokens only has its own inputs
        if key not in call.overrides:
            if call.step is None:
                override = frame_inputs(self.adapter, frame, self.positions, hidden, kwargs, layer_type, self._prompt.cache_slots, self._flash)
            else:
                override = decode.layer_inputs(self.adapter, self._prompt, frame, self.positions, hidden, kwargs, call.step, layer_type, self._flash)
            call.overrides[key] = override
        return {**kwargs, **call.overrides[key]}

    def _after_layer(self, index: int, module: nn.Module, args: tuple, output: Any) -> torch.Tensor | None:
        """At prefill, add layer `index`'s residuals (DeepStack) onto the visual tokens present after it."""
        call, prompt = self._call, self._prompt
        if call is None or call.step is not None or prompt.residuals is None:
            return None
        if not isinstance(output, torch.Tensor):
            raise RuntimeError(f"decoder layer {index} returned {type(output).__name__}, not its hidden states: cannot add its residuals")
        visual = prompt.frames[-1].visual
        added = prompt.residuals[:, : visual.shape[1], index] * (visual >= 0)[..., None]
        columns = visual.clamp_min(0)[..., None].expand(-1, -1, output.shape[-1])
        return output.scatter_add(1, columns, added.to(output.dtype))
