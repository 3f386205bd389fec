"""The baselines of 2025 against transcriptions of their official code.

Each `official_*` function below is written from the authors' repository (named with its commit), line by
line in its own names and tensor layout, and shares no code with `star`: it picks the tokens from the model's
own tensors (eager attention, hidden states), and the pruned model must keep exactly those tokens and compute
the logits of a plain forward over them.
"""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

import star
from conftest import IMAGE_TOKEN, N_VISUAL, batch, prompt_ids, tiny_llava
from reference import forward_kept, image_features

PROMPTS = [prompt_ids(3, 6, seed=1), prompt_ids(7, 4, seed=2), prompt_ids(2, 9, seed=5)]


@pytest.fixture(scope="module")
def eager_and_sdpa():
    return tiny_llava(attn="eager", seed=0), tiny_llava(attn="sdpa", seed=0)


def _pruned(model, prompt, method, keep, **options):
    """Logits of the last token and the kept places at each stage, from the pruner on one prompt."""
    inputs = batch([prompt])
    with star.apply(model, method=method, keep=keep, **options) as pruner:
        logits = model(**inputs).logits[0, -1]
        kept = [k[0] for k in pruner.stats.kept_patches]
        layers = pruner.stats.layers
    return logits, kept, layers, inputs


# -- VisPruner: Theia-4869/VisPruner aefa01a, llava/model/llava_arch.py `encode_images` and
# llava/model/multimodal_encoder/clip_encoder.py `feature_select` ----------------------------------------


def official_vispruner(image_features, image_attentions, visual_token_num, important_ratio):
    """`encode_images` from its first line to `index_masks.scatter_`, returning the index mask [B, N]."""
    B, N, C = image_features.shape
    important_token_num = int(visual_token_num * important_ratio)
    diverse_token_num = visual_token_num - important_token_num
    # "Select important tokens using attention scores": mean over heads, argsort descending.
    image_attentions = image_attentions.mean(dim=1)
    token_indices = image_attentions.argsort(dim=-1, descending=True)
    important_indices = token_indices[:, :important_token_num]
    residual_indices = token_indices[:, important_token_num:]
    # "Remove duplicate tokens by iterative matching and pruning".
    image_normalized = image_features / image_features.norm(dim=-1, keepdim=True)
    while diverse_token_num > 0:
        R = residual_indices.shape[1]
        r = min(8, R - diverse_token_num)
        if r <= 0:
            break
        residual_tokens = image_normalized[torch.arange(B).unsqueeze(-1).expand(-1, R), residual_indices]
        a, b = residual_tokens[..., ::2, :], residual_tokens[..., 1::2, :]
        scores = a @ b.transpose(-1, -2)
        scores = scores.max(dim=-1).values
        distinct_indices = scores.argsort(dim=-1, descending=True)[:, r:]
        residual_indices = torch.cat([
            residual_indices[..., ::2][torch.arange(B).unsqueeze(-1).expand(-1, R // 2 - r), distinct_indices],
            residual_indices[..., 1::2],
        ], dim=-1)
    if diverse_token_num > 0:
        selected_indices = torch.cat([important_indices, residual_indices], dim=-1)
    else:
        selected_indices = important_indices
    index_masks = torch.zeros(B, N, dtype=torch.bool)
    index_masks.scatter_(1, selected_indices, True)
    return index_masks


@torch.no_grad()
@pytest.mark.parametrize("keep, ratio", [(12, 0.5), (9, 0.5), (5, 0.5), (10, 0.5), (11, 0.25), (4, 0.0), (7, 1.0)])
def test_vispruner_keeps_the_official_tokens(eager_and_sdpa, keep, ratio):
    eager, sdpa = eager_and_sdpa
    for prompt in PROMPTS:
        logits, kept, layers, inputs = _pruned(sdpa, prompt, "vispruner", keep, important_ratio=ratio)
        # clip_encoder.py `feature_select` with select_layer = -2 and select_feature = "patch".
        out = eager.model.vision_tower(inputs["pixel_values"], output_hidden_states=True, output_attentions=True)
        features, attentions = out.hidden_states[-2][:, 1:], out.attentions[-2][:, :, 0, 1:]
        official = official_vispruner(features, attentions, keep, ratio)[0].nonzero()[:, 0]
        assert torch.equal(kept[0], official)
        all_features = image_features(sdpa, inputs["pixel_values"])[0]
        assert (logits - forward_kept(sdpa, prompt, all_features, [official], layers, "original")).abs().max() < 1e-4


def test_vispruner_rounds_on_many_patches_equal_the_official_loop():
    """576 patches, so that rounds drop 8 of many: the selection alone, on random features and attention."""
    g = torch.Generator().manual_seed(0)
    features, attentions = torch.randn(2, 576, 32, generator=g), torch.rand(2, 4, 576, generator=g)
    from star.methods.vispruner import important_then_diverse

    for keep, ratio in [(64, 0.5), (128, 0.5), (64, 0.75), (192, 0.25)]:
        important = int(keep * ratio)
        ours = important_then_diverse(attentions.mean(dim=1), features, important, keep - important)
        official = official_vispruner(features, attentions, keep, ratio)
        assert torch.equal(ours, torch.stack([row.nonzero()[:, 0] for row in official]))


# -- DivPrune: vbdi/divprune 799e2d9, LLaVA/llava/model/llava_arch.py `pairwise_cosine_similarity`, `DivPrune`
# and its call at the end of `prepare_inputs_labels_for_multimodal` -----------------------------------------


def official_divprune(visual_feature_vectors, threshold_terms):
    """`DivPrune`, with the budget given as a count (the code's int(round(threshold_ratio * length)))."""
    norm_matrix = visual_feature_vectors / visual_feature_vectors.norm(dim=1, keepdim=True)
    cosine_matrix = 1.0 - torch.mm(norm_matrix, norm_matrix.t())
    s = torch.empty(threshold_terms, dtype=torch.long)
    for i in range(threshold_terms):
        if i == 0:
            m2 = cosine_matrix
        else:
            m2 = torch.index_select(cosine_matrix, 0, torch.index_select(s, 0, torch.arange(0, i)))
        if i == 0:
            scores = torch.topk(m2, 2, dim=0, largest=False).values[1, :]
        else:
            scores = torch.min(m2, dim=0).values
        s[i] = torch.argmax(scores)
    return s.sort().values  # keep_indexs.sort(): the kept tokens in their order


@torch.no_grad()
@pytest.mark.parametrize("keep", [1, 4, 9, 15])
def test_divprune_keeps_the_official_tokens(eager_and_sdpa, keep):
    _, sdpa = eager_and_sdpa
    for prompt in PROMPTS:
        logits, kept, layers, inputs = _pruned(sdpa, prompt, "divprune", keep)
        # The code slices the projected image features out of the decoder's input embeddings.
        features = image_features(sdpa, inputs["pixel_values"])[0]
        official = official_divprune(features, keep)
        assert torch.equal(kept[0], official)
        assert (logits - forward_kept(sdpa, prompt, features, [official], layers, "original")).abs().max() < 1e-4


# -- CDPruner: Theia-4869/CDPruner 9541616, llava/model/llava_arch.py `encode_images` ----------------------


def official_cdpruner(image_features, image_embeds, text_embeds, visual_token_num):
    """`encode_images` after the vision tower, with `image_features` already projected. The relevance inputs
    are this project's reading (the decoder input embeddings of the visual tokens and of the prompt's text
    after the image, not negated: the method file says why); normalisation, kernel and MAP are the code's."""
    B, N, D = image_features.shape
    image_normalized = image_features / image_features.norm(dim=-1, keepdim=True)
    image_normalized = image_normalized.float()
    similarity = torch.matmul(image_normalized, image_normalized.transpose(1, 2))
    image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
    text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
    relevance = torch.matmul(image_embeds, text_embeds.t())
    relevance = relevance.mean(dim=-1)  # the code: (-relevance).mean(dim=-1), for CLIP's embeddings
    relevance = (relevance - relevance.min() + 1e-6) / (relevance.max() - relevance.min())
    kernel = relevance.unsqueeze(2) * similarity * relevance.unsqueeze(1)
    # "Fast MAP inference of conditional DPP".
    cis = torch.zeros((visual_token_num, B, N))
    di2s = torch.diagonal(kernel, dim1=1, dim2=2).clone()
    select_idx = torch.empty((visual_token_num, B), dtype=torch.long)
    for i in range(visual_token_num):
        j = torch.argmax(di2s, dim=-1)
        select_idx[i] = j
        eis = (kernel[torch.arange(B), j] - torch.einsum("tb,tbn->bn", cis[:i, torch.arange(B), j], cis[:i])) \
            / torch.sqrt(di2s[torch.arange(B), j]).unsqueeze(-1)
        cis[i, :, :] = eis
        di2s -= torch.square(eis)
        di2s[torch.arange(B), j] = -float("inf")
    select_idx = torch.sort(select_idx.t()).values
    return select_idx


@torch.no_grad()
@pytest.mark.parametrize("keep", [1, 4, 9, 15])
def test_cdpruner_keeps_the_official_tokens(eager_and_sdpa, keep):
    _, sdpa = eager_and_sdpa
    for prompt in PROMPTS:
        logits, kept, layers, inputs = _pruned(sdpa, prompt, "cdpruner", keep)
        features = image_features(sdpa, inputs["pixel_values"])
        ids = torch.tensor(prompt)
        instruction = ids[int((ids == IMAGE_TOKEN).nonzero().max()) + 1 :]
        text = sdpa.model.language_model.embed_tokens(instruction)
        official = official_cdpruner(features, features, text, keep)[0]
        assert torch.equal(kept[0], official)
        assert (logits - forward_kept(sdpa, prompt, features[0], [official], layers, "original")).abs().max() < 1e-4


def test_cdpruner_relevance_changes_with_the_question(eager_and_sdpa):
    """The same image under two questions: the instruction reaches the selection."""
    _, sdpa = eager_and_sdpa
    first, second = prompt_ids(3, 6, seed=1), prompt_ids(3, 6, seed=8)
    picks = {tuple(_pruned(sdpa, p, "cdpruner", 6)[1][0].tolist()) for p in (first, second)}
    assert len(picks) == 2


# -- DART: ZichenWen1/DART 5a19452, llava/model/language_model/modeling_llama_self.py `DART.forward` (the
# cut before layer K) and `get_retained_image_token` ---------------------------------------------------------


def official_dart(last_layer_state, any_states, image_token_start_index, image_token_length, max_num_trunction,
                  pivot_image_token, pivot_text_token, literal_order):
    """`get_retained_image_token` with max_num_trunction given (the code's default path).

    The code visits the pivots in the iteration order of a Python set of their sequence indices (CPython's
    hash order); the method visits them in sequence order (its file says why). literal_order=True keeps the
    code's order and checks that it is the sequence order here; False visits them in sequence order."""
    TOKEN_TOPK = max_num_trunction // (pivot_image_token + pivot_text_token)
    any_states = any_states.permute(0, 2, 1, 3).reshape(any_states.shape[0], any_states.shape[2], -1)
    k_states_image_token = any_states[0][image_token_start_index:image_token_start_index + image_token_length, :]
    k_states_query_token = any_states[0][image_token_start_index + image_token_length:, :]
    k_states_image_token_L1_norm = torch.norm(k_states_image_token, p=1, dim=-1)
    k_states_query_token_L1_norm = torch.norm(k_states_query_token, p=1, dim=-1)
    image_indices = (k_states_image_token_L1_norm.topk(pivot_image_token).indices + image_token_start_index).tolist()
    query_indices = (k_states_query_token_L1_norm.topk(pivot_text_token).indices + image_token_start_index + image_token_length).tolist()
    indices_set = set(image_indices + query_indices)
    if literal_order:
        assert list(indices_set) == sorted(indices_set)
    valid_indices = set(range(image_token_start_index, image_token_start_index + image_token_length)) - set(image_indices)
    valid_indices_list = list(valid_indices)
    for item in list(indices_set) if literal_order else sorted(indices_set):
        valid_vectors = last_layer_state[0][valid_indices_list, :]
        cos_sim = -torch.nn.functional.cosine_similarity(last_layer_state[0][item, :], valid_vectors, dim=-1)
        top_k_indices = cos_sim.topk(TOKEN_TOPK).indices
        top_k_real_indices = [valid_indices_list[i] for i in top_k_indices]
        indices_set.update(top_k_real_indices)
        valid_indices.difference_update(top_k_real_indices)
        valid_indices_list = list(valid_indices)
    indices_set.difference_update(query_indices)
    return torch.tensor(sorted(indices_set)) - image_token_start_index


def _layer_keys(model, hidden, layer):
    """`LlamaAttention.forward` of the code up to `repeat_kv`: the keys it returns as `any_states`."""
    attn = model.model.language_model.layers[layer].self_attn
    normed = model.model.language_model.layers[layer].input_layernorm(hidden)
    key_states = attn.k_proj(normed).view(1, hidden.shape[1], -1, attn.head_dim).transpose(1, 2)
    query_states = attn.q_proj(normed).view(1, hidden.shape[1], -1, attn.head_dim).transpose(1, 2)
    cos, sin = model.model.language_model.rotary_emb(hidden, torch.arange(hidden.shape[1])[None])
    _, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)
    return repeat_kv(key_states, attn.num_key_value_groups)


@torch.no_grad()
@pytest.mark.parametrize(
    "keep, pivots, literal_order", [(12, (4, 4), True), (6, (2, 2), False), (10, (2, 2), False), (14, (2, 2), False), (13, (1, 3), False)]
)
def test_dart_keeps_the_official_tokens(eager_and_sdpa, keep, pivots, literal_order):
    _, sdpa = eager_and_sdpa
    image_pivots, text_pivots = pivots
    for prompt in PROMPTS:
        logits, kept, layers, inputs = _pruned(
            sdpa, prompt, "dart", keep, pivot_image_tokens=image_pivots, pivot_text_tokens=text_pivots
        )
        assert layers == [2]
        # `DART.forward` at layer_idx == K = 2: layer_outputs of layer 1, its output through the final norm.
        hidden = sdpa(**inputs, output_hidden_states=True).hidden_states
        last_layer_state = sdpa.model.language_model.norm(hidden[2])
        any_states = _layer_keys(sdpa, hidden[1], 1)
        start = prompt.index(IMAGE_TOKEN)
        official = official_dart(
            last_layer_state, any_states, start, N_VISUAL, keep - image_pivots, image_pivots, text_pivots, literal_order
        )
        assert torch.equal(kept[1], official)
        features = image_features(sdpa, inputs["pixel_values"])[0]
        expected = forward_kept(sdpa, prompt, features, [torch.arange(N_VISUAL), official], layers, "original")
        assert (logits - expected).abs().max() < 1e-4


def test_dart_budget_is_exact_when_it_does_not_divide():
    """keep - image pivots not a multiple of the pivots: the earlier pivots take one more each."""
    from star.methods.dart import least_duplicated

    g = torch.Generator().manual_seed(3)
    states = torch.nn.functional.normalize(torch.randn(40, 8, generator=g), dim=-1)
    norms = torch.rand(40, generator=g)
    visual, text = torch.arange(5, 35), torch.arange(35, 40)
    for k in range(1, 31):
        kept = least_duplicated(states, norms, visual, text, k, 4, 4)
        assert len(kept) == k and len(set(kept.tolist())) == k


def test_diversity_selections_keep_exactly_k_distinct_tokens_when_tokens_repeat():
    """Duplicated tokens and a kernel of rank 2: the greedy steps past what the code handles still keep k."""
    from star.methods.cdpruner import dpp_map
    from star.methods.divprune import max_min_diverse

    g = torch.Generator().manual_seed(4)
    tokens = torch.randn(2, 2, 6, generator=g).repeat(1, 5, 1)  # 10 tokens, 2 distinct ones per image
    kernel = torch.nn.functional.normalize(tokens, dim=-1) @ torch.nn.functional.normalize(tokens, dim=-1).transpose(1, 2)
    for k in range(1, 11):
        for kept in (max_min_diverse(tokens, k), dpp_map(kernel, k)):
            assert kept.shape == (2, k)
            assert all(len(set(row.tolist())) == k for row in kept)
