"""The Pruner: hooks on one model instance that prune its visual tokens once per prompt, at prefill.

Two kinds of forward pre-hook, and nothing else of the model is touched:
- on the model itself: at prefill it runs the vision encoder, applies the method's vision stage, projects
  only the kept patches and hands the decoder `inputs_embeds` in a shorter "entry frame"; at each decode
  step it maps generate()'s full-length attention mask, positions and cache positions into that frame.
- on the decoder layers from the first decoder stage on: at a stage's layer, at prefill, it scores and cuts
  the sequence (hidden states, mask, rotary positions); every later layer gets the shorter frame's mask and
  positions. Layers cache what they see, so the KV cache of layers >= K holds only the kept tokens, and at
  decode the same hooks slice the mask's key columns to match.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache

from star import compat
from star import flops as flops_model
from star.adapters import adapter_for
from star.adapters.base import FIXED, TEXT
from star.decoder import Frame, contiguous_positions, decode_mask, gather_positions, gather_rotary, gather_seq, slice_mask
from star.methods import DecoderView, LLMStage, Method, Plan, Selection, VisionView
from star.scoring import attention_probs

POSITION_POLICIES = ("original", "contiguous")
ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2")
# Families whose images differ in size (Qwen2-VL) get a notional image of this many tokens at apply(), to
# check the options and place the hooks; the real plans are made per image at prefill.
NOMINAL_TOKENS = 16384


@dataclass
class PruneStats:
    """What the last prefill did.

    tokens: visual tokens per image after each stage: [from the encoder, entering the decoder, after each
    decoder stage]. For LLaVA-NeXT, per 576-token crop (the budget's unit); for families whose images differ
    in size (Qwen2-VL), those of the batch's first image. totals: the same counts per prompt, all its images
    (and crops) together, [B][stages]. kept_patches: for each of those stages after the encoder, [B, V] the
    visual tokens still present in each prompt, by their place among the prompt's image tokens (image m's
    patch j is m * n_visual + j for LLaVA-1.5; LLaVA-NeXT's newline tokens take places but are never listed);
    where prompts keep different numbers, shorter rows end with -1. A merged token counts as its
    representative's place. layers: the decoder layer where each decoder stage cut. sequence_lengths: the
    tokens each decoder layer processed (per prompt, padding included). flops: the decoder's prefill FLOPs for
    the whole batch, by the paper's formula over those lengths.
    """

    tokens: list[int]
    kept_patches: list[torch.Tensor]
    layers: list[int]
    sequence_lengths: list[int]
    batch_size: int
    flops: float
    totals: list[list[int]]


@dataclass
class _Prompt:
    """What a prefill decided, kept for the decode steps of the same prompt."""

    full_length: int
    entry_keep: torch.Tensor  # [B, S1] indices of the full prompt present in the entry frame
    entry_real: torch.Tensor  # [B, S1] False at the padding slots the pruner added to even out rows
    entry_pads: torch.Tensor  # [B] how many of those each row has
    positions: torch.Tensor  # rotary positions of the full prompt, [B, S] or [3, B, S]
    frames: list[Frame]
    n_text: torch.Tensor
    budgets: list[list[int]]  # per decoder stage, the visual tokens each prompt keeps
    tokens: list[int]
    totals: list[list[int]]
    residuals: torch.Tensor | None = None  # [B, V, E, D] DeepStack features of the last frame's visual tokens


@dataclass
class _Step:
    """State of one forward call as it passes through the decoder layers."""

    prefill: bool
    position_ids: torch.Tensor | None = None
    cache_position: torch.Tensor | None = None
    padding: torch.Tensor | None = None  # the step's 2-D mask in the entry frame: its prompt tokens, then the new ones
    frame: int = 0  # the frame the layers run in now: 0 (the entry frame) until the first stage's layer
    overrides: dict[str | None, dict[str, Any]] = field(default_factory=dict)  # the frame's inputs, per layer type
    saved: dict[int, tuple[torch.Tensor, dict[str, Any]]] = field(default_factory=dict)


class Pruner:
    """Prunes the visual tokens of one loaded model; `remove()` leaves the model exactly as it was."""

    def __init__(self, model: nn.Module, method: Method, keep: int | float, positions: str = "original"):
        self.adapter = adapter_for(model)
        if positions not in POSITION_POLICIES:
            raise ValueError(f"positions={positions!r} is unknown: allowed are {', '.join(POSITION_POLICIES)}")
        if positions == "contiguous" and self.adapter.mrope:
            raise ValueError(
                f"positions='contiguous' is not defined for {type(model).__name__}: its M-RoPE positions are 3-D "
                "(an image's tokens share one temporal position and span a height x width grid), so there is no "
                "single gap-free renumbering; use positions='original'"
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
        self.method = method
        self.positions = positions
        n_visual = self.adapter.n_visual
        self.keep = resolve_keep(keep, n_visual)
        self._keep_given = keep
        num_layers = len(self.adapter.layers)
        # Families whose images differ in size plan per image at prefill; this plan checks the options and
        # places the hooks (a method's stage layers depend on its options and the depth, not on the image).
        self.plan = method.plan(n_visual or max(NOMINAL_TOKENS, self.keep), self.keep, num_layers)
        _check_stages(self.plan.llm_stages)
        self._check_encoder(type(model).__name__)
        self._plans: dict[int, Plan] = {}
        self._stage_at = {stage.layer: i for i, stage in enumerate(self.plan.llm_stages)}
        self._early_scores = {s.score_layer for s in self.plan.llm_stages if s.score_layer != s.layer}
        self._shape = flops_model.DecoderShape.from_config(model.config.get_text_config())
        self._signature = inspect.signature(model.forward)
        self._prompt: _Prompt | None = None
        self._step: _Step | None = None
        self._handles = [
            model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
            model.register_forward_hook(self._after_forward),
        ]
        if self.plan.llm_stages:
            first = min(s.score_layer for s in self.plan.llm_stages)
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
        self._prompt = self._step = None
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
        lengths = [next(f.length for f in reversed(frames) if f.start_layer <= i) for i in range(len(self.adapter.layers))]
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
        )

    def _check_encoder(self, model_name: str) -> None:
        """Refuse, before any compute, a method whose vision stage needs a [CLS] token this encoder lacks.

        The method's vision stage runs once on a two-token stand-in view without [CLS]; what it raises is
        what it would raise at the first prompt.
        """
        if self.adapter.has_cls or self.plan.vision_keep >= self.plan.n_visual:
            return
        stand_in = torch.zeros(1, 1, 2, 1)
        probe = VisionView(features=torch.zeros(1, 2, 1), n_prefix=0, qk=lambda: (stand_in, stand_in))
        try:
            self.method.select_vision(probe, 1)
        except ValueError as error:
            raise ValueError(f"method={self.method.name!r} cannot prune {model_name}: {error}") from None

    # -- budgets ------------------------------------------------------------------------------------------

    def _unit_plan(self, n: int) -> Plan:
        """The method's plan for one unit (an image, a LLaVA-NeXT crop) of n visual tokens."""
        if n not in self._plans:
            plan = self.method.plan(n, unit_keep(self._keep_given, n, self.adapter.budget_unit), len(self.adapter.layers))
            nominal = {s.layer: s for s in self.plan.llm_stages}
            if any(nominal.get(s.layer, None) is None or nominal[s.layer].score_layer != s.score_layer for s in plan.llm_stages):
                raise ValueError(f"method {self.method.name!r} plans other decoder stages for {n} tokens than for {self.plan.n_visual}")
            self._plans[n] = plan
        return self._plans[n]

    def _schedule(self, plan: Plan) -> list[int]:
        """A unit's visual tokens [from the encoder, entering the decoder, after each of the pruner's stages]."""
        counts = [plan.n_visual, plan.vision_keep]
        own = {s.layer: s.keep for s in plan.llm_stages}
        for stage in self.plan.llm_stages:
            counts.append(own.get(stage.layer, counts[-1]))
        return counts

    # -- the model's forward: prefill and decode steps -------------------------------------------------

    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if args:
            bound = self._signature.bind_partial(*args, **kwargs).arguments
            kwargs = {**bound.pop("kwargs", {}), **bound}
        cache = compat.cache_of(kwargs)
        past = cache.get_seq_length() if cache is not None else 0
        self._step = None
        if kwargs.get("pixel_values") is not None:
            if past:
                raise ValueError(
                    "pixel_values came with a non-empty cache: pruning happens once per prompt, at "
                    "prefill; start a new cache for a new image"
                )
            if cache is not None and not isinstance(cache, DynamicCache):
                raise ValueError(f"a cache of type {type(cache).__name__} is not supported: use DynamicCache")
            return (), self._start_prompt(kwargs)
        if past == 0:
            self._refuse_unpruned_images(kwargs)
        if past == 0 or self._prompt is None:
            self._prompt = None
            return (), kwargs
        return (), self._continue_prompt(kwargs, past)

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
        """A call's frame state ends with the call, so layers run on their own afterwards are left alone."""
        self._step = None

    def _start_prompt(self, kwargs: dict) -> dict:
        input_ids = kwargs.get("input_ids")
        if input_ids is None:
            raise ValueError("input_ids is None: pruning needs the prompt's token ids to find its image tokens")
        batch, length = input_ids.shape
        device = input_ids.device
        mask = kwargs.get("attention_mask")
        mask = torch.ones_like(input_ids) if mask is None else mask
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            raise ValueError(
                f"attention_mask came as {type(mask).__name__}{'' if not isinstance(mask, torch.Tensor) else f' of {mask.dim()} dims'}"
                " at prefill: the pruner needs the 2-D padding mask [batch, tokens] to build its shorter frames"
            )
        if bool((mask[:, 1:] < mask[:, :-1]).any()):
            raise ValueError("attention_mask pads on the right: prompts must be left-padded (padding_side='left')")
        encoded = self.adapter.encode_prompts(kwargs, input_ids)
        full_positions = self.adapter.prompt_positions(kwargs, input_ids, mask)

        # Stage 1, unit by unit: the kept tokens' places among each prompt's image tokens, and their embeddings.
        slots = encoded.slots
        kept_places: list[list[torch.Tensor]] = [[] for _ in range(batch)]
        kept_embeds: list[list[torch.Tensor]] = [[] for _ in range(batch)]
        kept_residuals: list[list[torch.Tensor]] = [[] for _ in range(batch)]
        totals = torch.zeros(batch, 2 + len(self.plan.llm_stages), dtype=torch.long)
        tokens = None
        for group in encoded.groups:
            units, n = group.view.features.shape[:2]
            plan = self._unit_plan(n)
            schedule = self._schedule(plan)
            tokens = tokens or (self._schedule(self.plan) if self.adapter.n_visual else schedule)
            totals.index_add_(0, group.rows.cpu(), torch.tensor(schedule).expand(units, -1).contiguous())
            if plan.vision_keep < n:
                selection = self.method.select_vision(group.view, plan.vision_keep)
            else:
                selection = Selection(torch.arange(n, device=device).expand(units, n))
            features = selection.states if selection.states is not None else gather_seq(group.view.features, selection.index)
            projected = self.adapter.project(features)
            kept = group.ordinals.gather(1, selection.index)
            # A merged token keeps the residuals of the place it takes.
            residuals = None if group.residuals is None else gather_seq(group.residuals, selection.index)
            for unit, row in enumerate(group.rows.tolist()):
                kept_places[row].append(kept[unit])
                kept_embeds[row].append(projected[unit])
                if residuals is not None:
                    kept_residuals[row].append(residuals[unit])

        totals_list = totals.tolist()
        budgets = [[row[2 + s] for row in totals_list] for s in range(len(self.plan.llm_stages))]
        uneven = any(len({row[j] for row in totals_list}) > 1 for j in range(1, totals.shape[1]))
        if uneven and self.positions == "contiguous" and self.plan.llm_stages:
            raise ValueError(
                "positions='contiguous' needs every prompt of a batch to keep the same number of visual tokens "
                "(same image sizes); use positions='original', or batch such prompts apart"
            )

        # Entry frame: each prompt's text and fixed image tokens, and its kept visual tokens at their places (a
        # merged token may share its place with another; the stable sort keeps the method's order). Shorter
        # rows are left-padded; one spare padding slot per row when a later cut is uneven, so every row has a
        # masked column for that cut's own padding to point at.
        image_cols = ragged_rows(slots != TEXT)
        columns, visual_embeds, visual_residuals = [], [], []
        for row in range(batch):
            places = torch.cat(kept_places[row]) if kept_places[row] else slots.new_zeros(0)
            others = (slots[row] < 0).nonzero()[:, 0]  # TEXT and FIXED
            cols = torch.cat([others, image_cols[row, places]])
            order = torch.sort(cols, stable=True).indices
            columns.append(cols[order])
            visual_order = order[order >= len(others)] - len(others)
            visual_embeds.append(torch.cat(kept_embeds[row])[visual_order] if kept_embeds[row] else None)
            if kept_residuals[row]:
                visual_residuals.append(torch.cat(kept_residuals[row])[visual_order])
        spare = 1 if uneven and self.plan.llm_stages else 0
        width = max(len(c) for c in columns) + spare
        entry_keep = torch.stack([torch.cat([c.new_zeros(width - len(c)), c]) for c in columns])
        lengths = torch.tensor([len(c) for c in columns], device=device)
        entry_real = torch.arange(width, device=device) >= width - lengths[:, None]
        entry_slots = slots.gather(1, entry_keep)
        entry_visual = (entry_slots >= 0) & entry_real
        embeds = self.adapter.embed(input_ids.gather(1, entry_keep))
        for row, row_embeds in enumerate(visual_embeds):
            if row_embeds is not None:
                embeds[row, entry_visual[row]] = row_embeds.to(embeds.dtype)
        if encoded.fixed is not None:
            embeds = torch.where((entry_slots == FIXED)[..., None], encoded.fixed.to(embeds.dtype), embeds)

        pads = width - lengths
        if self.positions == "original":
            positions = gather_positions(full_positions, entry_keep)
        else:  # the padding slots added here do not count as tokens before the real ones
            positions = contiguous_positions(full_positions, entry_keep) - pads[:, None]
        entry_length = entry_keep.shape[1]
        entry_mask = mask.gather(1, entry_keep) * entry_real
        visual = ragged_rows(entry_visual)
        patches = entry_slots.gather(1, visual.clamp_min(0)).masked_fill(visual < 0, -1)
        image_like = (entry_visual | (entry_slots == FIXED)).long()
        last_image = (image_like * torch.arange(entry_length, device=device)).amax(dim=1)
        entry_cols = torch.arange(entry_length, device=device).expand(batch, entry_length)
        frame = Frame(0, entry_cols, entry_mask, visual, patches, positions)
        self._check_window(entry_length)
        residuals = None
        if visual_residuals:
            residuals = torch.zeros(batch, visual.shape[1], *visual_residuals[0].shape[1:], dtype=embeds.dtype, device=device)
            for row, row_residuals in enumerate(visual_residuals):
                residuals[row, : len(row_residuals)] = row_residuals.to(embeds.dtype)
        self._prompt = _Prompt(
            length, entry_keep, entry_real, pads, full_positions, [frame], entry_length - 1 - last_image, budgets,
            tokens or [0] * totals.shape[1], totals_list, residuals,
        )
        self._step = _Step(prefill=True)
        token_inputs = {
            name: kwargs[name].gather(1, entry_keep) * entry_real
            for name in self.adapter.token_inputs
            if kwargs.get(name) is not None
        }
        entry = {
            **kwargs,
            **{name: None for name in self.adapter.vision_inputs},
            **token_inputs,
            "input_ids": None,
            "inputs_embeds": embeds,
            "attention_mask": entry_mask,
            "position_ids": positions,
        }
        return compat.with_cache_position(entry, torch.arange(entry_length, device=device))

    def _continue_prompt(self, kwargs: dict, past: int) -> dict:
        prompt = self._prompt
        dropped = prompt.full_length - prompt.frames[0].length
        new = kwargs["input_ids"].shape[1] if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"].shape[1]
        cache_position = kwargs.get("cache_position")
        if cache_position is None:
            cache_position = torch.arange(past, past + new, device=prompt.entry_keep.device)
        else:
            cache_position = cache_position - dropped
        positions = kwargs.get("position_ids")
        if positions is None:
            positions = self.adapter.decode_positions(prompt.positions, cache_position + dropped)
        if self.positions == "contiguous":
            positions = positions - dropped - prompt.entry_pads[:, None]
        mask = kwargs.get("attention_mask")
        if mask is not None:
            full = prompt.full_length
            entry = mask[:, :full].gather(1, prompt.entry_keep) * prompt.entry_real
            mask = torch.cat([entry, mask[:, full:]], dim=1)
        self._check_window(int(cache_position.max()) + 1)
        self._step = _Step(prefill=False, position_ids=positions, cache_position=cache_position, padding=mask)
        return compat.with_cache_position({**kwargs, "attention_mask": mask, "position_ids": positions}, cache_position)

    # -- the decoder layers -----------------------------------------------------------------------------

    def _check_window(self, length: int) -> None:
        """Refuse a sequence that outgrows the decoder's sliding window while a decoder stage prunes it.

        Within the window a sliding layer attends to everything a global one does, so a cut's frame is exact; beyond
        it, the window would span dropped tokens, and the sliding caches keep only its last tokens, which the
        pruned frames cannot be mapped onto.
        """
        window = self.adapter.window
        if window is not None and self.plan.llm_stages and length > window:
            raise ValueError(
                f"the sequence reaches {length} tokens after stage 1, beyond the decoder's sliding_window={window}: "
                f"method {self.method.name!r} prunes inside the decoder, which is defined within the window only; "
                "use a method that prunes before the decoder (random), a smaller keep, or a shorter prompt or answer"
            )

    def _before_layer(self, index: int, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        step = self._step
        if step is None:
            return None
        hidden = args[0]
        current = self._frame_inputs(index, hidden, kwargs, step)
        if index in self._early_scores:
            step.saved[index] = (hidden, current)
        stage_number = self._stage_at.get(index)
        if stage_number is not None:
            if step.prefill:
                hidden = self._cut(stage_number, hidden, current, step)
            step.frame = stage_number + 1
            step.overrides = {}
            current = self._frame_inputs(index, hidden, kwargs, step)
        if current is kwargs:
            return None
        return (hidden, *args[1:]), current

    def _after_layer(self, index: int, module: nn.Module, args: tuple, output: Any) -> Any:
        """After layer `index`, at prefill, add its residuals (DeepStack) onto the visual tokens present then."""
        step, prompt = self._step, self._prompt
        if step is None or not step.prefill or prompt.residuals is None:
            return None
        if not isinstance(output, torch.Tensor):
            raise RuntimeError(f"decoder layer {index} returned {type(output).__name__}, not its hidden states: cannot add its DeepStack features")
        visual = prompt.frames[-1].visual
        present = (visual >= 0)[..., None].to(output.dtype)
        added = prompt.residuals[:, : visual.shape[1], index] * present
        index_ = visual.clamp_min(0)[..., None].expand(-1, -1, output.shape[-1])
        return output.scatter_add(1, index_, added.to(output.dtype))

    def _frame_inputs(self, index: int, hidden: torch.Tensor, kwargs: dict, step: _Step) -> dict:
        """Layer `index`'s inputs in the frame the layers run in now. The model makes them for the entry frame,
        one mask and rotary table per layer type, so each type's are moved once per frame."""
        if step.frame == 0:
            return kwargs
        frame = self._prompt.frames[step.frame]
        layer_type = self.adapter.layer_type(index)
        if layer_type not in step.overrides:
            if step.prefill:
                step.overrides[layer_type] = self._prefill_frame(frame, hidden, kwargs, layer_type)
            else:
                step.overrides[layer_type] = self._decode_frame(frame, hidden, kwargs, step, layer_type)
        return {**kwargs, **step.overrides[layer_type]}

    def _prefill_frame(self, frame: Frame, hidden: torch.Tensor, kwargs: dict, layer_type: str | None) -> dict:
        """A layer's prefill inputs moved from the entry frame into `frame`: its mask, rotary tables and
        positions gathered at the tokens the frame keeps (or, for contiguous positions, made anew)."""
        keep = frame.keep_cols
        override = {"attention_mask": slice_mask(kwargs["attention_mask"], keep, keep)}
        for name, kind in compat.rotary_tables(kwargs).items():
            if self.positions == "original":
                cos, sin = kwargs[name]
                override[name] = (gather_rotary(cos, keep), gather_rotary(sin, keep))
            else:
                override[name] = self.adapter.rotary(hidden, frame.position_ids, kind or layer_type)
        if self.positions == "contiguous":
            override["position_ids"] = frame.position_ids
        elif kwargs.get("position_ids") is not None:
            override["position_ids"] = gather_positions(kwargs["position_ids"], keep)
        return compat.with_cache_position(override, torch.arange(frame.length, device=hidden.device))

    def _select(self, stage: LLMStage, hidden: torch.Tensor, kwargs: dict, budgets: list[int]) -> list[Selection]:
        """The method's decoder-stage selection over the last frame's visual tokens: one per group of rows.

        Rows that hold and keep the same numbers of visual tokens are scored together; otherwise row by row.
        """
        prompt = self._prompt
        frame = prompt.frames[-1]
        score_layer = self.adapter.layers[stage.score_layer]
        score_rotary = compat.layer_rotary(kwargs, self.adapter.layer_type(stage.score_layer))
        batch = hidden.shape[0]
        counts = (frame.visual >= 0).sum(dim=1)
        if len(set(budgets)) == 1 and bool((counts == counts[0]).all()):
            groups = [None]
        else:
            groups = list(range(batch))
        selections = []
        for row in groups:
            h, pe, key_mask = hidden, score_rotary, frame.mask.bool()
            visual, n_text = frame.visual, prompt.n_text
            if row is not None:
                h, key_mask, n_text = h[row : row + 1], key_mask[row : row + 1], n_text[row : row + 1]
                pe = tuple(_batch_row(x, row, x.dim() - 3) for x in pe)
                visual = visual[row : row + 1, : int(counts[row])]

            def attention(rows: torch.Tensor, h=h, pe=pe, key_mask=key_mask) -> torch.Tensor:
                q, k = self.adapter.decoder_qk(score_layer, h, pe, rows)
                return attention_probs(q, k, key_mask, rows)

            view = DecoderView(h, visual, n_text, key_mask, attention)
            selections.append(self.method.select_llm(stage, view, budgets[0 if row is None else row]))
        return selections

    def _cut(self, stage_number: int, hidden: torch.Tensor, kwargs: dict, step: _Step) -> torch.Tensor:
        """Score the visual tokens with the stage's layer and keep the top ones: the start of a new frame, whose
        inputs `_prefill_frame` makes for every layer from this one on."""
        prompt = self._prompt
        frame = prompt.frames[-1]
        stage = self.plan.llm_stages[stage_number]
        budgets = prompt.budgets[stage_number]
        score_hidden, score_kwargs = step.saved.get(stage.score_layer, (hidden, kwargs))
        selections = self._select(stage, score_hidden, score_kwargs, budgets)
        batch, length = hidden.shape[:2]
        if len(selections) == 1:
            index = selections[0].index
            states = None if selections[0].states is None else list(selections[0].states)
        else:
            index = pad_rows([s.index[0] for s in selections])
            states = None if selections[0].states is None else [s.states[0] for s in selections]

        # Each row keeps its other tokens (text, fixed image tokens, padding) and its kept visual tokens;
        # rows that end up shorter are left-padded with a masked column of their own.
        rows = []
        for row in range(batch):
            chosen = index[row][index[row] >= 0]
            visual = frame.visual[row][frame.visual[row] >= 0]
            others = torch.ones(length, dtype=torch.bool, device=hidden.device)
            others[visual] = False
            rows.append((others.nonzero()[:, 0], visual[chosen]))
        width = max(len(o) + len(v) for o, v in rows)
        keep, kept_visual = [], []
        for row, (others, visual) in enumerate(rows):
            cols = torch.cat([others, visual]).sort().values
            if len(cols) < width:
                pad = (frame.mask[row] == 0).nonzero()[0, 0]
                cols = torch.cat([pad.expand(width - len(cols)), cols])
            keep.append(cols)
            kept_visual.append(torch.isin(cols, visual).nonzero()[:, 0])
        keep = torch.stack(keep)
        visual = pad_rows(kept_visual)
        patches = gather_seq(frame.patches, index.clamp_min(0)).masked_fill(index < 0, -1)
        hidden = gather_seq(hidden, keep)
        if states is not None:
            for row, merged in enumerate(states):
                hidden[row, kept_visual[row]] = merged.to(hidden.dtype)

        if self.positions == "original":
            positions = gather_positions(frame.position_ids, keep)
        else:
            positions = contiguous_positions(frame.position_ids, keep)
        prompt.frames.append(
            Frame(stage.layer, frame.keep_cols.gather(1, keep), frame.mask.gather(1, keep), visual, patches, positions)
        )
        if prompt.residuals is not None:
            prompt.residuals = gather_seq(prompt.residuals, index.clamp_min(0))
        return hidden

    def _decode_frame(self, frame: Frame, hidden: torch.Tensor, kwargs: dict, step: _Step, layer_type: str | None) -> dict:
        """A layer's decode-step inputs in `frame`, whose cache holds only the frame's prompt tokens: the mask's
        key columns of those tokens and the new ones, cache positions (and contiguous positions) shifted back."""
        prompt = self._prompt
        shift = prompt.frames[0].length - frame.length
        mask = kwargs["attention_mask"]
        if mask is not None:
            batch, entry = frame.keep_cols.shape[0], prompt.frames[0].length
            new = torch.arange(entry, int(step.cache_position.max()) + 1, device=mask.device).expand(batch, -1)
            mask = decode_mask(mask, step.padding, torch.cat([frame.keep_cols, new], dim=1), step.cache_position)
        override = compat.with_cache_position({"attention_mask": mask}, step.cache_position - shift)
        if self.positions == "contiguous":
            positions = step.position_ids - shift
            override["position_ids"] = positions
            for name, kind in compat.rotary_tables(kwargs).items():
                override[name] = self.adapter.rotary(hidden, positions, kind or layer_type)
        return override


def resolve_keep(keep: int | float, n_visual: int | None) -> int:
    """`keep` as a token count: an int in [1, n_visual], or a float in (0, 1] as a fraction of n_visual.

    n_visual is None for families whose images differ in size: an int is then checked against each image.
    """
    bound = "" if n_visual is None else f", {n_visual}"
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise ValueError(f"keep={keep!r} must be an int in [1{bound}] or a float in (0, 1]")
    if isinstance(keep, float):
        if not 0.0 < keep <= 1.0:
            raise ValueError(f"keep={keep!r} as a fraction must be in (0, 1]")
        return max(1, round(keep * (n_visual or NOMINAL_TOKENS)))
    if keep < 1 or (n_visual is not None and keep > n_visual):
        raise ValueError(f"keep={keep!r} is outside [1{bound}]: the model has {n_visual or 'a varying number of'} visual tokens per image")
    return keep


def unit_keep(keep: int | float, n: int, budget_unit: int | None) -> int:
    """The budget of one unit of n visual tokens.

    A fraction applies to every unit. An int counts tokens per `budget_unit` tokens (LLaVA-NeXT: per 576-token
    crop, so a crop the prompt shows only in part keeps the same fraction), or per image where that is None.
    """
    if isinstance(keep, float):
        return max(1, round(keep * n))
    if budget_unit is None:
        if keep > n:
            raise ValueError(f"keep={keep} is above the {n} visual tokens of an image in this batch: pass at most {n}, or a fraction")
        return keep
    return keep if n == budget_unit else min(n, max(1, round(keep * n / budget_unit)))


def ragged_rows(flags: torch.Tensor) -> torch.Tensor:
    """Indices of each row's True columns, in order, [B, V_max]; shorter rows end with -1."""
    counts = flags.sum(dim=1, keepdim=True)
    width = int(counts.max()) if flags.shape[0] else 0
    order = torch.sort((~flags).long(), dim=1, stable=True).indices[:, :width]
    return order.masked_fill(torch.arange(width, device=flags.device) >= counts, -1)


def pad_rows(rows: list[torch.Tensor]) -> torch.Tensor:
    """1-D index tensors stacked into [B, max], shorter rows ending with -1."""
    width = max(len(r) for r in rows)
    return torch.stack([torch.cat([r, r.new_full((width - len(r),), -1)]) for r in rows])


def _batch_row(x: torch.Tensor, row: int, dim: int) -> torch.Tensor:
    """Row `row` of x along its batch axis `dim`, or x itself where that axis broadcasts (size 1)."""
    return x if x.shape[dim] == 1 else x.narrow(dim, row, 1)


def _check_stages(stages: tuple[LLMStage, ...]) -> None:
    """Each stage scores within the frame it cuts: no earlier cut may fall between its score layer and its layer."""
    previous = -1
    for stage in stages:
        if not previous < stage.score_layer <= stage.layer:
            raise ValueError(f"decoder stages {stages} overlap: each must score after the previous cut")
        previous = stage.layer
