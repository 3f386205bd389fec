"""`star bench --config NAME --random-init`: the shipped architectures load as the real models, random weights
are allocated once on the target device (no CPU copy, no float32 copy), the synthetic prompts fit each family,
and the batch report holds one complete row per batch size and setting."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import transformers
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForImageTextToText

import star
from conftest import tiny_llava
from families import tiny_llava_next, tiny_qwen
from star import compat, synthetic
from star.checks import skeleton_of
from star.cli import main
from star.flops import DecoderShape, named_models, visual_tokens

# Parameter counts the model cards publish (vision tower, projector and decoder together), in billions.
PUBLISHED = {
    "llava-1.5-7b": 7.06, "llava-1.5-13b": 13.35, "llava-next-7b": 7.06, "qwen2.5-vl-7b": 8.29, "llava-onevision-7b": 8.03,
    "qwen3-vl-8b": 8.77, "gemma-3-4b": 4.30,
}
LATER_FAMILIES = ["internvl3-8b", "llava-onevision-7b", "qwen3-vl-8b", "gemma-3-4b"]


def _installed(name: str):
    """A shipped architecture, skipped where this transformers lacks its family (Gemma 4 on 4.57)."""
    model_type = json.loads((Path(star.__file__).parent / "configs" / f"{name}.json").read_text())["architecture"]["model_type"]
    from transformers import CONFIG_MAPPING

    return pytest.param(name, marks=pytest.mark.skipif(model_type not in CONFIG_MAPPING, reason=f"transformers {transformers.__version__} has no {model_type}"))


@pytest.mark.parametrize("name", [_installed(name) for name in synthetic.shipped_configs()])
def test_a_shipped_architecture_is_the_model_its_flops_shape_describes(name):
    config = synthetic.shipped_config(name)
    skeleton = skeleton_of(config)  # a supported family, built on the meta device
    assert DecoderShape.from_config(config.get_text_config()) == DecoderShape.named(name)
    if name in PUBLISHED:
        assert sum(p.numel() for p in skeleton.parameters()) / 1e9 == pytest.approx(PUBLISHED[name], abs=0.01)
    image_tokens = star.apply(skeleton, method="none", keep=1.0)
    image_tokens.remove()
    assert visual_tokens(name) == _tokens_per_image(skeleton)


def _tokens_per_image(model) -> int:
    """Visual tokens of one crop or tile (LLaVA, InternVL, Gemma 3) or of the benchmark's image (Qwen: its
    adapter's synthetic_patches a side, merged)."""
    adapter = star.adapters.adapter_for(model)
    return adapter.n_visual or adapter.synthetic_patches**2 // adapter.merge_unit


def test_the_required_architectures_ship():
    required = {"llava-1.5-7b", "llava-1.5-13b", "llava-next-7b", "qwen2.5-vl-7b", "llava-1.5-tinyllama-1.1b", *LATER_FAMILIES}
    assert required <= set(synthetic.shipped_configs())
    assert set(synthetic.shipped_configs()) <= set(named_models())
    with pytest.raises(ValueError, match="'gpt-2'.*llava-1.5-7b"):
        synthetic.shipped_config("gpt-2")


class Allocations(TorchDispatchMode):
    """Every tensor any operator returns while active: (operator, device, bytes, dtype)."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[str, str, int, torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.seen.append((func.__name__.split(".")[0], t.device.type, t.numel() * t.element_size(), t.dtype))
        return out

    def bytes(self, device: str, dtype: torch.dtype | None = None) -> int:
        """Bytes of fresh tensors (factory operators and copies) on `device`, of `dtype` if given."""
        fresh = {"empty", "empty_strided", "zeros", "ones", "full", "randn", "rand", "arange", "_to_copy", "clone"}
        return sum(b for op, d, b, t in self.seen if op in fresh and d == device and dtype in (None, t))


def test_random_weights_are_made_on_the_target_device_with_no_cpu_copy():
    config = tiny_llava().config
    with Allocations() as made:
        model = synthetic.random_model(config, "meta", torch.bfloat16, "sdpa")
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert made.seen and all(device == "meta" for _, device, _, _ in made.seen), Counter(d for _, d, _, _ in made.seen)
    with Allocations() as naive:  # the detector sees the copy a CPU build then a move would make
        AutoModelForImageTextToText.from_config(config).to("meta")
    assert naive.bytes("cpu") >= sum(p.numel() * 4 for p in model.parameters())


def test_random_weights_are_allocated_once_in_their_dtype():
    config = tiny_llava().config
    with Allocations() as made:
        model = synthetic.random_model(config, "cpu", torch.bfloat16, "sdpa")
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert weights <= made.bytes("cpu") <= 1.02 * (weights + buffers)  # one allocation per weight, no second copy
    assert made.bytes("cpu", torch.float32) <= buffers  # never a float32 copy of the weights
    with Allocations() as naive:
        AutoModelForImageTextToText.from_config(config).to(torch.bfloat16)
    assert naive.bytes("cpu") > 2 * weights


def test_random_weights_are_the_models_own_initialisation_and_leave_the_callers_rng_alone():
    config = tiny_llava().config
    state, before = torch.get_rng_state(), config.to_dict()
    model = synthetic.random_model(config, "cpu", torch.float32, "eager", seed=3)
    assert torch.equal(torch.get_rng_state(), state) and config.to_dict() == before
    torch.manual_seed(3)
    reference = AutoModelForImageTextToText.from_config(config)
    ours, theirs = dict(model.named_parameters()), dict(reference.named_parameters())
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    buffers, reference_buffers = dict(model.named_buffers()), dict(reference.named_buffers())
    assert buffers.keys() == reference_buffers.keys() and all(torch.equal(buffers[k], reference_buffers[k]) for k in buffers)
    assert model.config._attn_implementation == "eager"
    assert model.generation_config.pad_token_id is not None


@torch.no_grad()
@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2.5"])
def test_synthetic_prompts_fit_the_family_and_prune_per_prompt(family):
    model = {"llava": tiny_llava, "llava_next": tiny_llava_next, "qwen2.5": lambda: tiny_qwen("2.5")}[family]()
    inputs = synthetic.synthetic_inputs(model, batch=2, text_tokens=synthetic.TEXT_TOKENS)
    ids = inputs["input_ids"]
    adapter = star.adapters.adapter_for(model)
    image = ids == adapter.image_token_id
    text = ~image
    if family == "qwen2.5":
        text &= (ids != model.config.vision_start_token_id) & (ids != model.config.vision_end_token_id)
    assert text.sum(dim=1).tolist() == [synthetic.TEXT_TOKENS] * 2
    first_image = int(image[0].nonzero()[0])
    assert first_image == synthetic.TEXT_BEFORE_IMAGE + (family == "qwen2.5")
    assert not torch.equal(ids[0], ids[1])  # each row its own text
    model(**inputs)  # the model's own check: as many image tokens as its encoder makes features
    with star.apply(model, method="star", keep=4) as pruner:
        model(**inputs)
        stats = pruner.stats
    per_prompt = 4 * (5 if family == "llava_next" else 1)  # LLaVA-NeXT's budget counts per crop: a base and 4 tiles
    assert stats.tokens[-1] == 4
    assert [int((stats.kept_patches[-1][row] >= 0).sum()) for row in range(2)] == [per_prompt] * 2


def test_bench_reports_every_batch_size_against_unpruned_and_oracle(tmp_path, capsys):
    tiny_llava().config.save_pretrained(tmp_path / "tiny")
    out = tmp_path / "bench.json"
    argv = ["bench", "--model", str(tmp_path / "tiny"), "--random-init", "--batch", "1,3", "--methods", "star",
            "--keep", "4", "--repeats", "1", "--warmup", "0", "--new-tokens", "2", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert synthetic.NOTICE in printed and "| 3 | star | 4 | 16 / 14 / 4 |" in printed
    rows = json.loads(out.read_text())
    assert [(r["batch"], r["method"]) for r in rows] == [(1, "none"), (1, "star"), (3, "none"), (3, "star")]
    for row in rows:
        assert row["weights"] == "random" and row["dtype"] == "float32" and row["attn"] == "sdpa"
        assert row["prefill_s"] > 0 and row["oracle_prefill_s"] > 0 and row["unpruned_prefill_s"] > 0
        assert row["prefill_prompts_per_s"] == pytest.approx(row["batch"] / row["prefill_s"])
        assert row["decode_tokens_per_s"] is None or row["decode_tokens_per_s"] > 0  # None: noise above the decode steps
        assert row["peak_memory_bytes"] > 0
        assert row["prefill_vs_unpruned"] > 0 and row["prefill_vs_oracle"] > 0
    by = {(r["batch"], r["method"]): r for r in rows}
    for method in ("none", "star"):  # three prompts of one length cache three times one prompt's keys and values
        assert by[3, method]["kv_cache_bytes"] == 3 * by[1, method]["kv_cache_bytes"]
    assert by[3, "star"]["flops_vs_unpruned"] == pytest.approx(by[1, "star"]["flops_vs_unpruned"])
    assert by[1, "star"]["kv_cache_bytes"] < by[1, "none"]["kv_cache_bytes"]


def test_bench_times_resize_as_the_unpruned_model_on_a_smaller_image(tmp_path, capsys):
    """resize beside a method: the unpruned model on an image of about keep tokens, its tower and counted FLOPs
    smaller too."""
    tiny_qwen().config.save_pretrained(tmp_path / "tiny")
    argv = ["bench", "--model", str(tmp_path / "tiny"), "--random-init", "--methods", "pool,resize", "--keep", "64",
            "--repeats", "1", "--warmup", "0", "--new-tokens", "2", "--text-tokens", "6"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| 1 | pool | 64 | 576 / 64 |" in printed and "| 1 | resize | 64 | 64 / 64 |" in printed
    rows = {line.split(" | ")[1]: line.split(" | ") for line in printed.splitlines() if line.startswith("| 1 |")}
    counted = {method: float(cells[10]) for method, cells in rows.items()}  # counted FLOPs vs unpruned: the tower too
    assert counted["resize"] < counted["pool"] < 1


# A tiny version of a shipped architecture: every width and depth small (the vocabulary too, each special token id
# moved to its top), the family's structure (tiling, pinpoints, merge, pooling, layer types) and its native image
# size kept, and patches large enough that the image makes few tokens. Qwen3-VL's timing image is a number of
# patches (64 a side), so its patches stay.
TINY_VOCAB = 256
TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, depth=2, num_attention_heads=4, num_heads=4, out_hidden_size=64)
TINY = {
    "internvl3-8b": {"vision_config": {"patch_size": [56, 56]}},  # 8 x 8 patches a 448 px tile: 16 tokens
    "llava-onevision-7b": {"vision_config": {"patch_size": 96}},  # 4 x 4 patches a 384 px crop
    "qwen3-vl-8b": {
        "vision_config": {"deepstack_visual_indexes": [0, 1], "num_heads": 1},  # one head: 4096 patches attend
        "text_config": {"rope_scaling": {"rope_type": "default", "mrope_interleaved": True, "mrope_section": [4, 2, 2]}},
    },
    "gemma-3-4b": {"vision_config": {"patch_size": 56}, "text_config": {"sliding_window_pattern": 2}, "mm_tokens_per_image": 16},
    "gemma-4-e4b": {  # 8 layers, the last 2 sharing what layers 4 and 5 store; global layers' heads of 32
        "text_config": {
            "num_hidden_layers": 8, "num_kv_shared_layers": 2, "layer_types": ["sliding_attention", "full_attention"] * 4,
            "global_head_dim": 32, "hidden_size_per_layer_input": 16, "vocab_size_per_layer_input": TINY_VOCAB,
        },
        "vision_config": {"head_dim": 8, "num_key_value_heads": 4},
    },
}


def tiny_shipped(name: str):
    """The config of a tiny version of shipped architecture `name` (see TINY)."""
    from transformers import AutoConfig

    fields = json.loads((Path(star.__file__).parent / "configs" / f"{name}.json").read_text())["architecture"]
    for part, tiny in (("text_config", TINY_TEXT), ("vision_config", TINY_VISION)):
        fields[part].update({key: value for key, value in tiny.items() if key in fields[part]})
    for key, value in TINY[name].items():
        fields[key] = {**fields[key], **value} if isinstance(value, dict) else value
    ids = [(part, key) for part in (fields, fields["text_config"]) for key, value in part.items()
           if key.endswith(("token_id", "token_index")) and isinstance(value, int)]
    special = sorted({part[key] for part, key in ids})
    for part, key in ids:
        part[key] = TINY_VOCAB - 1 - special.index(part[key])
    fields["text_config"]["vocab_size"] = TINY_VOCAB
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


# Per prompt of a tiny version at keep=4: visual tokens (newlines and start/end tokens aside), then kept after
# STAR's stage 1 (before the decoder) and after its stage 2 (decoder layer 1 of 2).
KEPT = {
    "internvl3-8b": (13 * 16, 13 * 14, 13 * 4),  # 12 tiles and the thumbnail, each a unit of 16 tokens
    "llava-onevision-7b": (16 + 144, 14 + 122, 4 + 36),  # the base crop, and the 3 x 3 grid (12 x 12) keeping its share
    "qwen3-vl-8b": (1024, 870, 4),  # one image of 64 x 64 patches, merged 2 x 2
    "gemma-3-4b": (16, 14, 4),  # one image, 16 x 16 patches pooled 4 x 4
}


@pytest.mark.parametrize("name", LATER_FAMILIES)
def test_bench_times_a_tiny_version_of_each_later_family(name, tmp_path):
    """Each family's synthetic prompt (its native image size, TEXT_TOKENS of random text) runs the model and STAR at
    batch 1 and 2, and every prompt keeps what the budget says: the KV cache holds exactly the kept tokens."""
    config = tiny_shipped(name)
    config.save_pretrained(tmp_path / "tiny")
    out = tmp_path / "bench.json"
    argv = ["bench", "--model", str(tmp_path / "tiny"), "--random-init", "--batch", "1,2", "--methods", "star",
            "--keep", "4", "--repeats", "1", "--warmup", "0", "--new-tokens", "2", "--out", str(out)]
    assert main(argv) == 0
    rows = json.loads(out.read_text())
    assert [(r["batch"], r["method"]) for r in rows] == [(1, "none"), (1, "star"), (2, "none"), (2, "star")]
    by = {(r["batch"], r["method"]): r for r in rows}

    ids = synthetic.synthetic_inputs(synthetic.random_model(config, "cpu", torch.float32, "sdpa"), batch=2)["input_ids"]
    special = {v for k, v in config.to_dict().items() if k.endswith(("token_id", "token_index")) and isinstance(v, int)}
    text = ~torch.isin(ids, torch.tensor(sorted(special)))
    assert text.sum(dim=1).tolist() == [synthetic.TEXT_TOKENS] * 2 and int((~text[0]).nonzero()[0]) == synthetic.TEXT_BEFORE_IMAGE
    assert not torch.equal(ids[0], ids[1])
    visual, stage1, final = KEPT[name]
    assert by[1, "star"]["tokens"][-1] == 4
    decoder = config.get_text_config()
    per_token = 2 * decoder.num_key_value_heads * TINY_TEXT["head_dim"] * 4  # a key and a value of float32 in one layer
    fixed = ids.shape[1] - visual
    assert by[1, "none"]["kv_cache_bytes"] == 2 * (fixed + visual) * per_token
    assert by[1, "star"]["kv_cache_bytes"] == ((fixed + stage1) + (fixed + final)) * per_token
    for method in ("none", "star"):
        assert by[2, method]["kv_cache_bytes"] == 2 * by[1, method]["kv_cache_bytes"]


@pytest.mark.parametrize("name", [_installed("gemma-4-e4b")])
def test_bench_times_a_tiny_gemma4(name, tmp_path):
    """Gemma 4's synthetic prompt (a 768 px image, 48 x 48 patches padded to the 280-token budget's, pooled 3 x 3 into
    256 tokens) runs the model, STAR and FastV; the KV cache holds exactly the kept tokens, in the 6 layers that store
    keys and values (sliding ones 2 heads of 16, global ones 2 of 32; the 2 sharing layers store none)."""
    config = tiny_shipped(name)
    config.save_pretrained(tmp_path / "tiny")
    out = tmp_path / "bench.json"
    argv = ["bench", "--model", str(tmp_path / "tiny"), "--random-init", "--batch", "1", "--methods", "star,fastv",
            "--keep", "4", "--repeats", "1", "--warmup", "0", "--new-tokens", "2", "--out", str(out)]
    assert main(argv) == 0
    by = {r["method"]: r for r in json.loads(out.read_text())}
    assert by["none"]["tokens"] == [256, 256] and by["star"]["tokens"] == [256, 218, 4] and by["fastv"]["tokens"] == [256, 256, 4]
    text = synthetic.TEXT_TOKENS + 2  # and the start- and end-of-image tokens
    sliding, full = 2 * 2 * 16 * 4, 2 * 2 * 32 * 4  # bytes per token of a layer of each type
    assert by["none"]["kv_cache_bytes"] == (text + 256) * 3 * (sliding + full)
    assert by["star"]["kv_cache_bytes"] == ((text + 218) * 2 + (text + 4)) * (sliding + full)  # layers 0-3, then 4-5
    assert by["fastv"]["kv_cache_bytes"] == ((text + 256) + (text + 4) * 2) * (sliding + full)  # layers 0-1, then 2-5


@pytest.mark.parametrize("name, model_type", [("gemma-4-e4b", "gemma4"), ("qwen3.5-9b", "qwen3_5")])
def test_a_shipped_architecture_this_transformers_lacks_is_refused_by_name(name, model_type):
    from transformers import CONFIG_MAPPING

    if model_type in CONFIG_MAPPING:
        pytest.skip(f"transformers {transformers.__version__} has {model_type}")
    with pytest.raises(ValueError, match=rf"'{name}' is a '{model_type}' model, which transformers 4\.\d+\.\d+ lacks"):
        synthetic.shipped_config(name)


def test_the_table3_script_runs_at_a_tiny_shape(tmp_path):
    """scripts/paper/table3.sh, the one GPU script, on the CPU with a tiny config: both benches and the paper table."""
    tiny_llava().config.save_pretrained(tmp_path / "tiny")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(root), "SOURCE": f"--model {tmp_path / 'tiny'}",
           "KEEPS": "4", "DEVICE": "cpu", "DTYPE": "float32", "REPEATS": "1", "WARMUP": "0", "NEW_TOKENS": "2",
           "BATCHES": "2", "OUT": str(tmp_path / "out")}
    done = subprocess.run(["bash", str(root / "scripts/paper/table3.sh")], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((tmp_path / "out/batch1.json").read_text()) + json.loads((tmp_path / "out/batches.json").read_text())
    assert [(r["batch"], r["method"]) for r in rows] == [
        (1, "none"), (1, "fastv"), (1, "fastervlm"), (1, "sparsevlm"), (1, "star"), (2, "none"), (2, "star"), (2, "fastervlm")
    ]
    table = (tmp_path / "out/table3.md").read_text()
    assert "| 576 | none | 8.99 |" in table and "| 2 | star | 4 |" in table and "Random weights" in table


def test_the_gpu_latency_script_runs_at_a_tiny_shape(tmp_path):
    """scripts/gpu_latency.sh on the CPU with a tiny config (eager; compiled costs minutes of compilation here):
    every setting's row, its ratio to the unpruned row, its syncs, the table."""
    tiny_llava().config.save_pretrained(tmp_path / "tiny")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(root)}
    args = ["--model", str(tmp_path / "tiny"), "--device", "cpu", "--dtype", "float32", "--keeps", "8,4", "--peer-keep", "4",
            "--repeats", "1", "--warmup", "0", "--new-tokens", "2", "--batch", "1,2", "--modes", "eager", "--out", str(tmp_path / "out")]
    done = subprocess.run(["bash", str(root / "scripts/gpu_latency.sh"), *args], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((tmp_path / "out/latency.json").read_text())
    assert [(r["batch"], r["method"], r["keep"]) for r in rows] == [
        (b, m, k) for b in (1, 2) for m, k in [("none", 1.0), ("star", 8), ("star", 4), ("fastervlm", 4), ("fastv", 4)]
    ]
    assert all("error" not in r and r["syncs_per_prefill"] <= 3 and r["prefill_vs_unpruned"] > 0 for r in rows), rows
    assert [r["tokens"] for r in rows[:5]] == [[16, 16], [16, 14, 8], [16, 14, 4], [16, 4], [16, 16, 4]]
    assert "| eager | 2 | star | 4 | 16 / 14 / 4 |" in (tmp_path / "out/latency.md").read_text()
