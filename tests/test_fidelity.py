"""Each peer at its defaults against a transcription of its official code, on a small random LLaVA.

Every reference here is written from the authors' repository at the commit the method's file names, in the
order and with the tensor operations of their code (eager attention weights, topk, masks, concatenations), one
prompt at a time, and imports nothing from `star` but `apply`: the pruned model must keep the same tokens and
compute the same states (the decoder's input, or the logits after every cut). Each test names the lines it
transcribes. Where a method documents a deliberate difference, the reference applies that difference, marked
DIFFERENCE, and nothing else.
"""

from __future__ import annotations

import pytest
import torch

import star
from conftest import IMAGE_TOKEN, N_VISUAL, batch, prompt_ids, tiny_llava

PROMPT = prompt_ids(4, 7, seed=11)


@pytest.fixture(scope="module")
def eager():
    return tiny_llava(attn="eager", layers=8)


def captured_entry(model, inputs: dict, method: str, keep: int, **options) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, object]:
    """The pruned model's decoder input (embeddings, positions), its last logits and its stats."""
    seen = {}

    def grab(module, args, kwargs):
        seen["embeds"], seen["positions"] = kwargs["inputs_embeds"], kwargs["position_ids"]

    handle = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with star.apply(model, method=method, keep=keep, **options) as pruner:
            logits = model(**inputs).logits[0, -1]
            stats = pruner.stats
    finally:
        handle.remove()
    return seen["embeds"][0], seen["positions"].reshape(-1), logits, stats


def vision_outputs(model, pixel_values: torch.Tensor):
    """What the official code asks CLIP for: every layer's hidden states and eager attention weights."""
    return model.model.vision_tower(pixel_values, output_hidden_states=True, output_attentions=True)


def feature_keys(model, hidden_in: torch.Tensor) -> torch.Tensor:
    """VisionZip's `metric`: the feature layer's keys before the head split's transpose, mean over heads
    (visionzip/utils.py, CLIPAttention_forward: `raw_key_states.mean(1)` of `self._shape(self.k_proj(...))`)."""
    layers = next(m for name, m in model.model.vision_tower.named_modules() if name.endswith("encoder.layers"))
    layer = layers[-2]
    keys = layer.self_attn.k_proj(layer.layer_norm1(hidden_in))
    heads = layer.self_attn.num_heads
    return keys.view(keys.shape[0], keys.shape[1], heads, -1).transpose(1, 2).mean(1)


def sequence(model, ids: list[int], image_embeds: torch.Tensor) -> torch.Tensor:
    """LLaVA's prepare_inputs: the text embeddings with the image block replaced by `image_embeds`."""
    ids = torch.tensor(ids)
    start = int((ids == IMAGE_TOKEN).nonzero()[0, 0])
    end = start + N_VISUAL
    embed = model.model.language_model.embed_tokens
    return torch.cat([embed(ids[:start]), image_embeds, embed(ids[end:])])


def decoder(model, hidden: torch.Tensor, positions: torch.Tensor, after_layer, before_layer=None) -> torch.Tensor:
    """The decoder's layer loop, eager, one prompt; `after_layer(i, hidden, positions, weights)` may cut the
    sequence after layer i (weights: layer i's attention probabilities [H, S, S]); `before_layer(i, hidden)` sees
    each layer's input. Returns the last logits."""
    lm = model.model.language_model
    hidden = hidden[None]
    for index, layer in enumerate(lm.layers):
        if before_layer is not None:
            before_layer(index, hidden)
        n = hidden.shape[1]
        causal = torch.full((n, n), float("-inf")).triu(1)[None, None]
        rotary = lm.rotary_emb(hidden, positions[None])
        _, weights = layer.self_attn(
            hidden_states=layer.input_layernorm(hidden), position_embeddings=rotary, attention_mask=causal
        )
        hidden = layer(hidden, attention_mask=causal, position_ids=positions[None], position_embeddings=rotary)
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        hidden, positions = after_layer(index, hidden, positions, weights[0])
    return model.lm_head(lm.norm(hidden))[0, -1]


@torch.no_grad()
@pytest.mark.parametrize("keep", [3, 7, 12])
def test_fastervlm_matches_its_official_selection(eager, keep):
    """Theia-4869/FasterVLM @ f5d5f12: clip_encoder.py `feature_select` (attentions[select_layer][:, :, 0, 1:]),
    llava_arch.py `encode_images` (mean over heads, topk, boolean index mask, projector), and the shorter
    prompt numbered 0..n-1 (`prepare_inputs_labels_for_multimodal` builds new embeddings)."""
    inputs = batch([PROMPT])
    out = vision_outputs(eager, inputs["pixel_values"])
    image_features = out.hidden_states[-2][:, 1:]
    image_attentions = out.attentions[-2][:, :, 0, 1:].mean(dim=1)
    token_indices = torch.topk(image_attentions, k=keep, dim=1)[1]
    index_masks = torch.zeros(1, N_VISUAL, dtype=torch.bool).scatter_(1, token_indices, True)
    projected = eager.model.multi_modal_projector(image_features)[index_masks]
    expected = sequence(eager, PROMPT, projected)

    embeds, positions, _, stats = captured_entry(eager, inputs, "fastervlm", keep)
    assert stats.kept_patches[0][0].tolist() == index_masks[0].nonzero()[:, 0].tolist()
    assert (embeds - expected).abs().max() < 1e-5
    assert positions.tolist() == list(range(len(expected)))


@torch.no_grad()
@pytest.mark.parametrize("keep", [4, 7, 12])
def test_visionzip_matches_its_official_tokens_and_order(eager, keep):
    """dvlab-research/VisionZip @ 3151f6d: main.py `visionzip(model, dominant, contextual)` (dominant_num =
    dominant - 1) and clip_encoder.py `CLIPVisionTower_VisionZip.forward`, line by line: [CLS]-row attention
    summed over heads, topk + 1, [CLS] first, masked_select (spatial order), normalised metric, evenly spaced
    targets, one-hot assignment by argmax, `target_hidden + bmm(assign^T, hidden_to_merge) / counts`, output
    [dominant, contextual], projected, numbered 0..n-1."""
    contextual_num = round(10 / 64 * keep)
    dominant_num = keep - contextual_num - 1  # apply_info(dominant_num=dominant - 1), dominant = keep - contextual
    inputs = batch([PROMPT])
    out = vision_outputs(eager, inputs["pixel_values"])
    attn_weights, hidden_states = out.attentions[-2], out.hidden_states[-2]
    metric = feature_keys(eager, out.hidden_states[-3])
    cls_attention_sum = attn_weights[:, :, 0, 1:].sum(dim=1)
    topk_indices = cls_attention_sum.topk(dominant_num, dim=1).indices + 1
    all_indices = torch.cat([torch.zeros(1, 1, dtype=topk_indices.dtype), topk_indices], dim=1)
    mask = torch.ones_like(hidden_states[:, :, 0], dtype=torch.bool).scatter_(1, all_indices, False)
    dominant_tokens = hidden_states.masked_select(~mask.unsqueeze(-1)).view(1, dominant_num + 1, -1)
    metric_filtered = metric[mask].view(1, hidden_states.shape[1] - (dominant_num + 1), metric.shape[2])
    hidden_states_filtered = hidden_states.masked_select(mask.unsqueeze(-1)).view(1, hidden_states.shape[1] - (dominant_num + 1), -1)
    metric_normalized = metric_filtered / metric_filtered.norm(dim=-1, keepdim=True)
    step = max(1, metric_normalized.shape[1] // contextual_num)
    target_indices = torch.arange(0, metric_normalized.shape[1], step)[:contextual_num]
    target_tokens = metric_normalized[:, target_indices, :]
    is_target = torch.isin(torch.arange(metric_normalized.shape[1]), target_indices)
    tokens_to_merge = metric_normalized[:, ~is_target, :]
    similarity = torch.bmm(tokens_to_merge, target_tokens.transpose(1, 2))
    assign_one_hot = torch.zeros(1, tokens_to_merge.shape[1], contextual_num)
    assign_one_hot.scatter_(2, similarity.argmax(dim=2).unsqueeze(-1), 1)
    counts = assign_one_hot.sum(dim=1).clamp(min=1).unsqueeze(-1)
    hidden_to_merge = hidden_states_filtered[:, ~is_target, :]
    aggregated_hidden = torch.bmm(assign_one_hot.transpose(1, 2), hidden_to_merge) / counts
    contextual_tokens = hidden_states_filtered[:, target_indices, :] + aggregated_hidden
    hidden_states_save = torch.cat([dominant_tokens, contextual_tokens], dim=1)
    expected = sequence(eager, PROMPT, eager.model.multi_modal_projector(hidden_states_save)[0])

    embeds, positions, _, stats = captured_entry(eager, inputs, "visionzip", keep)
    assert stats.tokens[-1] == keep
    assert (embeds - expected).abs().max() < 1e-5
    assert positions.tolist() == list(range(len(expected)))


def image_window(ids: list[int]) -> tuple[int, int]:
    ids = torch.tensor(ids)
    start = int((ids == IMAGE_TOKEN).nonzero()[0, 0])
    return start, start + N_VISUAL


@torch.no_grad()
@pytest.mark.parametrize("keep,k", [(5, 2), (9, 3), (2, 1)])
def test_fastv_matches_its_official_selection(eager, keep, k):
    """pkunlp-icler/FastV @ d165972, `fastv_forward` in src/FastV/llava-hf/transformers/.../modeling_llama.py:
    the attention of layer K-1 (`layer_outputs[1]`, saved at `layer_idx == FASTV_k - 1`), mean over heads, the
    last row, the image window, topk, `keep_indexs` sorted, `hidden_states[:, keep_indexs]` and
    `position_ids = keep_indexs` before layer K."""
    inputs = batch([PROMPT])
    full = eager.model.get_image_features(inputs["pixel_values"], vision_feature_layer=-2, vision_feature_select_strategy="default")
    full = getattr(full, "pooler_output", full)
    full = torch.stack(list(full)) if isinstance(full, (list, tuple)) else full
    embeds = sequence(eager, PROMPT, full[0])
    start, end = image_window(PROMPT)
    kept = {}

    def after_layer(index, hidden, positions, weights):
        if index != k - 1:
            return hidden, positions
        last_tok = weights.mean(dim=0)[-1]
        top = last_tok[start:end].topk(keep).indices + start
        keep_indexs = torch.cat((torch.arange(start), top, torch.arange(end, hidden.shape[1]))).sort().values
        kept["patches"] = (top.sort().values - start).tolist()
        return hidden[:, keep_indexs], keep_indexs

    expected = decoder(eager, embeds, torch.arange(len(embeds)), after_layer)
    _, _, logits, stats = captured_entry(eager, inputs, "fastv", keep, layer=k)
    assert stats.kept_patches[1][0].tolist() == kept["patches"]
    assert (logits - expected).abs().max() < 1e-4


@torch.no_grad()
@pytest.mark.parametrize("keep", [2, 5])
def test_pdrop_matches_its_official_schedule_and_selection(eager, keep):
    """Cooperx521/PyramidDrop @ 6444f30, modeling_llama_pdrop.py: `pdrop_forward` (`rank_layer = layer_idx + 1`
    in layer_list: rank and drop after that layer) and `pdrop_rank_drop` (the next layer's input_layernorm,
    q/k projections and rotary at the current positions, the last instruction token's row, softmax in float32,
    mean over heads, the image slice, topk(int(n * ratio_list[stage + 1])) sorted, then `position_ids[i, :cur_len]
    = arange(cur_len)`), with layer_list = L/4, L/2, 3L/4 and ratio_list = [1, lambda, lambda^2, lambda^3]."""
    lm = eager.model.language_model
    layers = len(lm.layers)
    layer_list = [layers * s // 4 for s in (1, 2, 3)]
    ratio = (keep / N_VISUAL) ** (1 / 3)
    ratio_list = [1.0, ratio, ratio**2, ratio**3]
    inputs = batch([PROMPT])
    full = eager.model.get_image_features(inputs["pixel_values"], vision_feature_layer=-2, vision_feature_select_strategy="default")
    full = getattr(full, "pooler_output", full)
    full = torch.stack(list(full)) if isinstance(full, (list, tuple)) else full
    embeds = sequence(eager, PROMPT, full[0])
    image_index, _ = image_window(PROMPT)
    state = {"image": list(range(N_VISUAL)), "kept": []}

    def after_layer(index, hidden, positions, weights):
        rank_layer = index + 1
        if rank_layer not in layer_list:
            return hidden, positions
        stage = layer_list.index(rank_layer)
        image_tokens = int(N_VISUAL * ratio_list[stage] + 1e-9)
        keep_length = keep if stage == 2 else int(N_VISUAL * ratio_list[stage + 1] + 1e-9)
        attn = lm.layers[rank_layer].self_attn
        normed = lm.layers[rank_layer].input_layernorm(hidden)
        heads, head_dim = eager.config.text_config.num_attention_heads, attn.head_dim
        q = attn.q_proj(normed).view(1, -1, heads, head_dim).transpose(1, 2)
        kv = attn.k_proj(normed).view(1, normed.shape[1], -1, head_dim).transpose(1, 2)
        kv = kv.repeat_interleave(heads // kv.shape[1], dim=1)
        cos, sin = lm.rotary_emb(hidden, positions[None])
        rotate = lambda x: torch.cat((-x[..., x.shape[-1] // 2 :], x[..., : x.shape[-1] // 2]), dim=-1)
        q = q * cos[:, None] + rotate(q) * sin[:, None]
        kv = kv * cos[:, None] + rotate(kv) * sin[:, None]
        last = hidden.shape[1] - 1  # prompt_total_len - 1: the last instruction token
        scores = torch.matmul(q[0, :, last : last + 1], kv[0].transpose(1, 2)) / head_dim**0.5
        attn_weights = scores.softmax(dim=-1, dtype=torch.float32)
        attention_avg_text = attn_weights.mean(dim=0)[:, image_index : image_index + image_tokens].mean(dim=0)
        top_rank_index = attention_avg_text.topk(keep_length).indices.sort().values
        state["image"] = [state["image"][i] for i in top_rank_index.tolist()]
        state["kept"].append(list(state["image"]))
        top_rank_index = top_rank_index + image_index
        cut = torch.cat([torch.arange(image_index), top_rank_index, torch.arange(image_index + image_tokens, hidden.shape[1])])
        return hidden[:, cut], torch.arange(len(cut))

    expected = decoder(eager, embeds, torch.arange(len(embeds)), after_layer)
    _, _, logits, stats = captured_entry(eager, inputs, "pdrop", keep)
    assert [p[0].tolist() for p in stats.kept_patches[1:]] == state["kept"]
    assert (logits - expected).abs().max() < 1e-4


def test_pdrop_lambda_half_is_the_official_576_288_144_72():
    """scripts/v1_5/pdrop_eval/*.sh: --layer_list '[8,16,24]' --image_token_ratio_list "[0.5,0.25,0.125]"."""
    from star.methods import build

    plan = build("pdrop").plan(576, 72, 32)
    assert [(s.layer, s.keep) for s in plan.llm_stages] == [(8, 288), (16, 144), (24, 72)]


def official_cluster_and_merge(x: torch.Tensor, cluster_num: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gumpest/SparseVLMs @ 26a5f48, llava/model/language_model/utils.py `cluster_and_merge` (DPC-kNN), without
    its 1e-6 random tie noise (DIFFERENCE: ties go to the lower index). Returns the merged tokens and, for the
    DIFFERENCE in their places, each token's cluster."""
    B, N, C = x.shape
    dist_matrix = (x[:, :, None] - x[:, None]).norm(dim=-1, p=2) / (C**0.5)
    dist_nearest, _ = torch.topk(dist_matrix, k=cluster_num, dim=-1, largest=False)
    density = (-(dist_nearest**2).mean(dim=-1)).exp()
    mask = (density[:, None, :] > density[:, :, None]).type(x.dtype)
    dist_max = dist_matrix.flatten(1).max(dim=-1)[0][:, None, None]
    dist, _ = (dist_matrix * mask + dist_max * (1 - mask)).min(dim=-1)
    _, index_down = torch.topk(dist * density, k=cluster_num, dim=-1)
    idx_cluster = dist_matrix[0, index_down[0]][None].argmin(dim=1)
    idx_cluster[0, index_down[0]] = torch.arange(cluster_num)
    all_weight = torch.zeros(cluster_num, 1).index_add_(0, idx_cluster[0], torch.ones(N, 1)) + 1e-6
    norm_weight = 1 / all_weight[idx_cluster[0]]
    merged = torch.zeros(cluster_num, C).index_add_(0, idx_cluster[0], x[0] * norm_weight)[None]
    return merged, idx_cluster[0]


@torch.no_grad()
@pytest.mark.parametrize("keep", [3, 6])
def test_sparsevlm_matches_its_official_v15_stages(eager, keep):
    """Gumpest/SparseVLMs @ 26a5f48 (USE_VERSION "1_0"), modelling_sparse_llama.py `LlamaDynamicvitModel.forward`:
    at a layer of pruning_loc the layer runs over every token; `attn_postprocess_topk` (score.py) averages its
    attention over heads, takes the raters' rows and the visual columns, averages the rows and keeps
    topk(min(count, v_token_num - 1)); of the deleted, int(0.3 n) + 1 best scored are merged into
    int(r / 10) + 1 clusters of the layer's *output*, and `position_ids[:, :len]` renumbers. Raters:
    `m_v_t = v_t @ t_t^T`, softmax over text, mean over visual, `> mean`."""
    inputs = batch([PROMPT])
    with star.apply(eager, method="sparsevlm", keep=keep) as pruner:
        plan = pruner.plan
    pruning_loc = [s.score_layer for s in plan.llm_stages]
    totals = [s.keep for s in plan.llm_stages]

    def clusters(deleted: int) -> int:
        return int((int(deleted * 0.3) + 1) / 10) + 1

    full = eager.model.get_image_features(inputs["pixel_values"], vision_feature_layer=-2, vision_feature_select_strategy="default")
    full = getattr(full, "pooler_output", full)
    full = torch.stack(list(full)) if isinstance(full, (list, tuple)) else full
    embeds = sequence(eager, PROMPT, full[0])
    v_token_start, _ = image_window(PROMPT)
    state = {"v_token_num": N_VISUAL, "places": list(range(N_VISUAL)), "kept": [], "input": None}

    def before(index, hidden):
        state["input"] = hidden  # DIFFERENCE: the raters come from the ranking layer's input, not the embeddings

    def after_layer(index, hidden, positions, weights):
        if index not in pruning_loc:
            return hidden, positions
        stage = pruning_loc.index(index)
        v_token_num = state["v_token_num"]
        text_token_start = v_token_start + v_token_num
        layer_input = state["input"]
        v_t = layer_input[:, v_token_start:text_token_start]
        t_t = layer_input[:, text_token_start:]
        m_v_t = (v_t @ t_t.transpose(1, 2)).softmax(2).mean(1)
        t_token_idx = torch.where(m_v_t > m_v_t.mean())[1] + text_token_start
        relation_vis_text = weights.mean(0)[t_token_idx, v_token_start:text_token_start].mean(0)
        count = max(t for t in range(totals[stage] + 1) if t + clusters(v_token_num - t) <= totals[stage])
        indices = torch.topk(relation_vis_text, min(count, v_token_num - 1)).indices
        pred_score_vis = torch.zeros(v_token_num, dtype=torch.bool)
        pred_score_vis[indices] = True
        merge_token_idx_stage1 = torch.where(~pred_score_vis)[0]
        merge_token_stage1 = relation_vis_text[merge_token_idx_stage1]
        merge_token_num_stage1 = int(merge_token_idx_stage1.shape[0] * 0.3) + 1
        merge_token_stage2_idx = merge_token_stage1.topk(merge_token_num_stage1)[1]
        total_sparse_token = hidden[:, v_token_start + merge_token_idx_stage1]
        merge_token_stage2 = total_sparse_token[:, merge_token_stage2_idx, :]
        cluster_num = int(merge_token_stage2.shape[1] / 10) + 1
        merged, assignment = official_cluster_and_merge(merge_token_stage2, cluster_num)
        # DIFFERENCE: each merged token takes its best scored member's place instead of following the kept ones
        # (members are in descending score order, so a cluster's first member is its best scored one)
        members = merge_token_idx_stage1[merge_token_stage2_idx]
        best = [members[(assignment == c).nonzero()[0, 0]] for c in range(cluster_num)]
        visual_rows = [(int(i), hidden[0, v_token_start + int(i)]) for i in indices.sort().values]
        visual_rows += [(int(b), merged[0, c]) for c, b in enumerate(best)]
        visual_rows.sort(key=lambda row: row[0])
        state["places"] = [state["places"][i] for i, _ in visual_rows]
        state["kept"].append(list(state["places"]))
        new_visual = torch.stack([h for _, h in visual_rows])[None]
        hidden = torch.cat([hidden[:, :v_token_start], new_visual, hidden[:, text_token_start:]], dim=1)
        state["v_token_num"] = new_visual.shape[1]
        return hidden, positions[: hidden.shape[1]]

    expected = decoder(eager, embeds, torch.arange(len(embeds)), after_layer, before)
    _, _, logits, stats = captured_entry(eager, inputs, "sparsevlm", keep)
    assert [p[0].tolist() for p in stats.kept_patches[1:]] == state["kept"]
    assert (logits - expected).abs().max() < 1e-4


@pytest.mark.parametrize(
    "name,counts", [(64, (66, 30, 17)), (96, (238, 48, 26)), (128, (303, 110, 36)), (192, (300, 200, 110))]
)
def test_sparsevlm_average_budget_is_the_official_lists(name, counts):
    """Gumpest/SparseVLMs @ 26a5f48, score.py: `sparse_token_list_64 = [66, 30, 17]` and its siblings for
    RETAIN_TOKN = 64 / 96 / 128 / 192 at `layer_dict = {2: 0, 6: 1, 15: 2}`; each stage holds its count plus
    int((int(0.3 * deleted) + 1) / 10) + 1 merged tokens, and the next stage ranks those."""
    from star.methods import build

    method = build("sparsevlm", budget="average")
    plan = method.plan(576, name, 32)
    assert [(s.score_layer, s.layer) for s in plan.llm_stages] == [(2, 3), (6, 7), (15, 16)]
    present = 576
    for stage, count in zip(plan.llm_stages, counts):
        assert stage.keep == count + int((int((present - count) * 0.3) + 1) / 10) + 1
        assert method.split(present, stage.keep) == count
        present = stage.keep
