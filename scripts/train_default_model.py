"""Train the default model's projector and LoRA adapters on generated scenes and easy-VQA, on a CPU.

One command, seeded, resumable:

    .venv/bin/python scripts/train_default_model.py --steps 400

Stage 1 trains the projector alone (vision tower and LLM frozen, as LLaVA's first stage); stage 2 adds LoRA
adapters on every linear layer of the LLM. Each step draws fresh scenes (scene index = step * batch + i of the
train split), so a resumed run sees new data, never a repeat. Every `--save-every` steps the projector and
the LoRA factors are written to star/weights/default.safetensors (committed; it is what
`build_default_model` merges), and the optimizer state to $STAR_HOME/train/state.pt; a later run resumes from
the committed weights (and the optimizer state when it matches). The log goes to docs/training/log.jsonl.

Why it is fast enough here:
- CLIP runs once per image under no_grad (the tower is frozen); only the projector and the LLM see gradients.
- Several questions about one image are packed into one sequence: each question block attends to the image
  prefix and to itself, not to the other questions (a 4D mask; positions restart after the prefix), so the
  196 image tokens are paid once for many supervised answers.
- A dense caption (every object with size, color, shape and place, then the counts) is one extra block per
  scene: it names every object, the signal the short answers alone give too slowly.
- float32: faster than bf16 on this CPU (no AMX).

Why the projector sees standardized features: CLIP's layer -2 patch features share a large common component
(and a few huge channels), so a projector on raw features maps every patch to nearly the same token and the
LLM cannot tell colors apart. Training `linear_1((x - mean) / std)`, with the per-channel mean and std of
fixed training pictures, fixes that; on save the standardization is folded into `linear_1`'s weight and bias,
so the checkpoint is a plain LLaVA projector.

Why a position loss: a linear probe reads an object patch's column from CLIP's features (r = 0.82) but
hardly from the step-620 projector's output (r = 0.47; `scripts/probe_projector.py`): nothing in the answers
asked the projector to keep where a patch is, and "is the red circle left of the blue rectangle?" needs
exactly that. A linear head predicts each patch's row and column from its projected token (cross-entropy,
weight `--position-weight`); the head is training-only (kept in the optimizer state, not in the checkpoint),
so the saved model is unchanged in form. Why `--relation-word`: see `one_relation_word`.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from star.data.easyvqa import EasyVQARecord, load_easyvqa  # noqa: E402
from star.data.scenes import TYPES, Question, make_scene, scene_questions, scene_records  # noqa: E402
from star.data.vqa import exact_match  # noqa: E402
from star.zoo.default_model import IMAGE_SIZE, LORA_PREFIX, PATCH_SIZE, PROJECTOR_PREFIX, TRAINED_WEIGHTS, build_base_model, star_home  # noqa: E402

QUESTION_SUFFIX = "Answer the question using a single word or phrase."
CAPTION_QUESTION = "List every object with its size, color, shape and place, then count the shapes."
GRID = IMAGE_SIZE // PATCH_SIZE  # patches per side
IMAGE_TOKENS = GRID**2
RELATION_WORDS = ("left of", "right of")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class Config:
    steps: int = 400  # total steps, counted across resumed runs
    stage1_steps: int = 10  # projector alone
    scenes_per_step: int = 6
    easyvqa_per_step: int = 2
    questions: str = "existence:3,attribute:2,count:2,relation:3"  # per scene, by type: binding is the hard part
    easyvqa_questions: int = 5  # per easy-VQA picture
    captions: bool = True
    position_weight: float = 0.0  # weight of the auxiliary patch row / column loss on the projected tokens
    relation_word: str = "both"  # "left of" or "right of": every relation question is asked with that word
    lora_rank: int = 32
    lora_alpha: float = 64.0
    lr_projector: float = 1e-3
    lr_lora: float = 4e-4
    warmup: int = 5
    decay_steps: int = 200  # the last steps before `steps` decay the learning rates linearly to 10%
    weight_decay: float = 0.0
    seed: int = 0
    save_every: int = 5
    eval_every: int = 25
    eval_per_type: int = 10  # validation scenes per type, and easy-VQA color + shape questions each
    log: str = "docs/training/log.jsonl"


# ---------------------------------------------------------------- LoRA


class LoRALinear(nn.Module):
    """y = W x + (alpha / r) B A x, with B zero at the start so training begins from the pretrained model."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.A = nn.Parameter(torch.empty(rank, base.in_features))
        self.B = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.A.T @ self.B.T) * self.scale


def add_lora(language_model: nn.Module, rank: int, alpha: float) -> dict[str, LoRALinear]:
    """Wrap every target linear layer; returns the wrappers by their module name in the language model."""
    wrapped = {}
    for name, module in list(language_model.named_modules()):
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in LORA_TARGETS:
            parent_name, _, child = name.rpartition(".")
            wrapper = LoRALinear(module, rank, alpha)
            setattr(language_model.get_submodule(parent_name), child, wrapper)
            wrapped[name] = wrapper
    if not wrapped:
        raise RuntimeError("no linear layer named like " + ", ".join(LORA_TARGETS) + " in the language model")
    return wrapped


class StandardizedLinear(nn.Module):
    """linear((x - mean) / std) while training; `folded()` gives the one plain Linear it equals."""

    def __init__(self, linear: nn.Linear, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.linear = linear
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear((x - self.mean) / self.std)

    def folded(self) -> dict[str, torch.Tensor]:
        weight = self.linear.weight.detach() / self.std
        return {"weight": weight, "bias": self.linear.bias.detach() - weight @ self.mean}

    @torch.no_grad()
    def unfold(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        """Load a plain Linear's weight and bias (a saved checkpoint) into the standardized form."""
        self.linear.weight.copy_(weight * self.std)
        self.linear.bias.copy_(bias + weight @ self.mean)


def projector_state(projector: nn.Module) -> dict[str, torch.Tensor]:
    """The projector as a plain LLaVA projector: a StandardizedLinear is folded into linear_1."""
    state = {}
    for name, module in projector.named_children():
        parts = module.folded() if isinstance(module, StandardizedLinear) else module.state_dict()
        state.update({f"{name}.{k}": v.detach().clone() for k, v in parts.items()})
    return state


def trained_state(projector: nn.Module, lora: dict[str, LoRALinear]) -> dict[str, torch.Tensor]:
    state = {PROJECTOR_PREFIX + k: v for k, v in projector_state(projector).items()}
    for name, wrapper in lora.items():
        # float16 halves the committed file; the factors are small numbers, well within its range
        state[f"{LORA_PREFIX}{name}.A"] = wrapper.A.detach().to(torch.float16)
        state[f"{LORA_PREFIX}{name}.B"] = wrapper.B.detach().to(torch.float16)
    return state


def load_state(projector: nn.Module, lora: dict[str, LoRALinear], tensors: dict[str, torch.Tensor]) -> None:
    """Resume: every tensor of the checkpoint must land somewhere, and every parameter must be given."""
    saved = {k.removeprefix(PROJECTOR_PREFIX): v for k, v in tensors.items() if k.startswith(PROJECTOR_PREFIX)}
    expected = projector_state(projector)
    if set(saved) != set(expected):
        raise ValueError(f"checkpoint projector tensors {sorted(saved)} differ from the projector's {sorted(expected)}")
    for name, module in projector.named_children():
        parts = {k.removeprefix(name + "."): v for k, v in saved.items() if k.startswith(name + ".")}
        if isinstance(module, StandardizedLinear):
            module.unfold(parts["weight"], parts["bias"])
        else:
            module.load_state_dict(parts)
    used = {PROJECTOR_PREFIX + k for k in saved}
    for name, wrapper in lora.items():
        for part in ("A", "B"):
            key = f"{LORA_PREFIX}{name}.{part}"
            if key in tensors:
                getattr(wrapper, part).data.copy_(tensors[key].float())
                used.add(key)
    unused = sorted(set(tensors) - used)
    if unused:
        raise ValueError(f"checkpoint tensors match no parameter (rank or targets changed?): {unused[:5]}")


# ---------------------------------------------------------------- packing


@dataclass
class Example:
    image: object  # PIL image
    key: str  # the picture's identity, for the feature cache
    blocks: list[tuple[str, str]]  # (user text after the image, answer)


class Packer:
    """Token ids, labels, a 4D mask and positions for one image and several question blocks."""

    def __init__(self, processor):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_id = self.tokenizer.convert_tokens_to_ids(processor.image_token)
        self.end = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        probe = self.prompt_ids("?")
        first = probe.index(self.image_id)
        # The prefix ends after the image and its newline: the same ids whatever the question.
        self.prefix = probe[: first + IMAGE_TOKENS + 1]
        if self.prompt_ids("Another question?")[: len(self.prefix)] != self.prefix:
            raise RuntimeError("the chat template does not give a question-independent prefix")

    def prompt_ids(self, text: str) -> list[int]:
        """The ids the processor gives at inference, with the image token expanded."""
        prompt = self.processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}], add_generation_prompt=True
        )
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        at = ids.index(self.image_id)
        return ids[:at] + [self.image_id] * IMAGE_TOKENS + ids[at + 1 :]

    def pack(self, blocks: list[tuple[str, str]]) -> tuple[list[int], list[int], list[int], list[int]]:
        """ids, labels (-100 where unsupervised), positions, and each token's block (0 = shared prefix)."""
        ids, labels = list(self.prefix), [-100] * len(self.prefix)
        positions, owner = list(range(len(self.prefix))), [0] * len(self.prefix)
        for number, (text, answer) in enumerate(blocks, start=1):
            full = self.prompt_ids(text)
            assert full[: len(self.prefix)] == self.prefix
            question = full[len(self.prefix) :]
            target = self.tokenizer(answer, add_special_tokens=False)["input_ids"] + [self.end]
            start = len(self.prefix)
            ids += question + target
            labels += [-100] * len(question) + target
            positions += list(range(start, start + len(question) + len(target)))
            owner += [number] * (len(question) + len(target))
        return ids, labels, positions, owner


def collate(packer: Packer, packed: list[tuple[list[int], list[int], list[int], list[int]]]) -> dict[str, torch.Tensor]:
    """Right-padded batch; mask[b, i, j] allows j <= i within the prefix or within i's own block."""
    width = max(len(p[0]) for p in packed)
    ids = torch.full((len(packed), width), packer.tokenizer.pad_token_id or 0, dtype=torch.long)
    labels = torch.full((len(packed), width), -100, dtype=torch.long)
    positions = torch.zeros((len(packed), width), dtype=torch.long)
    owner = torch.full((len(packed), width), -1, dtype=torch.long)
    for row, (i, l, p, o) in enumerate(packed):
        ids[row, : len(i)] = torch.tensor(i)
        labels[row, : len(l)] = torch.tensor(l)
        positions[row, : len(p)] = torch.tensor(p)
        owner[row, : len(o)] = torch.tensor(o)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    same = owner[:, :, None] == owner[:, None, :]
    to_prefix = (owner[:, None, :] == 0) & (owner[:, :, None] >= 0)
    allowed = causal & (same | to_prefix)
    allowed |= torch.eye(width, dtype=torch.bool)  # padding rows attend to themselves: no all -inf row, no NaN
    mask = torch.zeros(allowed.shape, dtype=torch.float32).masked_fill(~allowed, torch.finfo(torch.float32).min)
    return {"input_ids": ids, "labels": labels, "position_ids": positions, "attention_mask": mask[:, None]}


# ---------------------------------------------------------------- the model pieces


class Features:
    """CLIP features (layer -2, patches only), computed under no_grad: the tower is frozen.

    Pictures seen again (the evaluation sets) are kept, in float16; a training scene is used once, so it is not.
    """

    def __init__(self, model, processor):
        self.model = model
        self.processor = processor
        self.cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, images: list, keys: list[str], keep: bool = True) -> torch.Tensor:
        fresh: dict[str, torch.Tensor] = {}
        missing = [i for i, k in enumerate(keys) if k not in self.cache]
        if missing:
            pixels = self.processor.image_processor(images=[images[i] for i in missing], return_tensors="pt")["pixel_values"]
            out = self.model.model.vision_tower(pixels, output_hidden_states=True)
            hidden = out.hidden_states[self.model.config.vision_feature_layer][:, 1:]
            fresh = {keys[i]: h for i, h in zip(missing, hidden)}
            if keep:
                self.cache.update({k: h.to(torch.float16) for k, h in fresh.items()})
        return torch.stack([fresh[k] if k in fresh else self.cache[k].float() for k in keys])


def feature_statistics(features: Features, easy_stream: "EasyVQAStream", pictures: int = 96) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of the patch features of fixed training pictures (two thirds scenes): the same
    pictures every run, so a resumed run standardizes exactly as before."""
    scenes = [make_scene("train", 10_000_000 + i) for i in range(pictures * 2 // 3)]
    easy = [easy_stream.example(i, 1) for i in range(pictures - len(scenes))]
    images = [s.image() for s in scenes] + [e.image for e in easy]
    keys = [f"stats-{i}" for i in range(len(images))]
    flat = torch.cat([features(images[i : i + 16], keys[i : i + 16], keep=False).flatten(0, 1) for i in range(0, len(images), 16)])
    return flat.mean(0), flat.std(0).clamp_min(1e-4)


def embed(model, ids: torch.Tensor, projected: torch.Tensor) -> torch.Tensor:
    """Token embeddings with the projected image tokens in the image-token slots (one image per row)."""
    embeds = model.get_input_embeddings()(ids)
    slots = (ids == model.config.image_token_index).unsqueeze(-1).expand_as(embeds)
    return embeds.masked_scatter(slots, projected.to(embeds.dtype))


def position_loss(head: nn.Linear, projected: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each patch's row and column, read linearly from its projected token."""
    index = torch.arange(projected.shape[1]).repeat(projected.shape[0])
    logits = head(projected.flatten(0, 1))
    rows, cols = logits[:, :GRID], logits[:, GRID:]
    return nn.functional.cross_entropy(rows, index // GRID) + nn.functional.cross_entropy(cols, index % GRID)


# ---------------------------------------------------------------- data


def question_counts(spec: str) -> dict[str, int]:
    """'existence:3,attribute:2,...' -> {'existence': 3, ...}; every scene question type must be named."""
    try:
        counts = {kind: int(n) for kind, _, n in (part.partition(":") for part in spec.split(","))}
    except ValueError:
        counts = {}
    if set(counts) != set(TYPES) or min(counts.values()) < 0:
        raise ValueError(f"--questions {spec!r}: give a count >= 0 for each of {', '.join(TYPES)}")
    return counts


def one_relation_word(q: Question, word: str) -> Question:
    """The same relation asked with `word` ("left of" or "right of"): a curriculum.

    With both words, the answer is the XOR of the word and the order of the two objects, so in expectation
    neither the word nor the order alone moves the loss, and reading the order gets no gradient to start from.
    With one word the answer is the order itself. No pair is closer than MIN_GAP, so flipping the word flips
    the answer."""
    other = RELATION_WORDS[1 - RELATION_WORDS.index(word)]
    if q.type != "relation" or f" {other} " not in q.question:
        return q
    return Question(q.question.replace(f" {other} ", f" {word} "), "no" if q.answer == "yes" else "yes", q.type)


def scene_example(index: int, cfg: Config, salt: int) -> Example:
    scene = make_scene("train", index)
    counts = question_counts(cfg.questions)
    taken = {kind: 0 for kind in counts}
    blocks = []
    for q in scene_questions(scene, max(counts.values()), salt):
        if cfg.relation_word != "both":
            q = one_relation_word(q, cfg.relation_word)
        if taken[q.type] < counts[q.type]:
            taken[q.type] += 1
            blocks.append((f"{q.question}\n{QUESTION_SUFFIX}", q.answer))
    if cfg.captions:
        blocks.append((CAPTION_QUESTION, scene.caption()))
    random.Random(index * 7919 + salt).shuffle(blocks)
    return Example(scene.image(), f"scene-train-{index}", blocks)


class EasyVQAStream:
    """easy-VQA's training pictures in a seeded order, each with up to `per_image` of its questions."""

    def __init__(self, records: list[EasyVQARecord], seed: int):
        self.by_image: dict[int, list[EasyVQARecord]] = {}
        for record in records:
            self.by_image.setdefault(record.image_id, []).append(record)
        self.order = sorted(self.by_image)
        random.Random(seed).shuffle(self.order)

    def example(self, position: int, per_image: int) -> Example:
        image_id = self.order[position % len(self.order)]
        rows = list(self.by_image[image_id])
        random.Random(position).shuffle(rows)
        blocks = [(f"{r.question}\n{QUESTION_SUFFIX}", r.answer) for r in rows[:per_image]]
        return Example(rows[0].image, f"easy-train-{image_id}", blocks)


# ---------------------------------------------------------------- evaluation


@torch.no_grad()
def answer(model, packer: Packer, features: Features, images: list, keys: list[str], questions: list[str], max_new_tokens: int = 5) -> list[str]:
    """Greedy answers from cached features, left-padded, through the model's own generate()."""
    rows = [packer.prompt_ids(f"{q}\n{QUESTION_SUFFIX}") for q in questions]
    width = max(map(len, rows))
    pad = packer.tokenizer.pad_token_id or 0
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    embeds = embed(model, ids, model.model.multi_modal_projector(features(images, keys)))
    out = model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=pad, eos_token_id=packer.end)
    return [packer.tokenizer.decode(o, skip_special_tokens=True).strip() for o in out]


def evaluate(model, packer: Packer, features: Features, records: list, batch: int = 8) -> dict[str, dict[str, float]]:
    """Normalised exact match per question type, with the sample size and the majority-answer level."""
    model.eval()
    hits: dict[str, list[bool]] = {}
    answers: dict[str, list[str]] = {}
    for start in range(0, len(records), batch):
        chunk = records[start : start + batch]
        got = answer(model, packer, features, [r.image for r in chunk], [r.id for r in chunk], [r.question for r in chunk])
        for record, prediction in zip(chunk, got):
            hits.setdefault(record.type, []).append(exact_match(prediction, record.answer))
            answers.setdefault(record.type, []).append(record.answer)
    result = {}
    for kind, marks in hits.items():
        counts = {a: answers[kind].count(a) for a in set(answers[kind])}
        result[kind] = {"accuracy": sum(marks) / len(marks), "n": len(marks), "majority": max(counts.values()) / len(marks)}
    return result


def eval_sets(cfg: Config, split: str) -> tuple[list, list]:
    scenes = scene_records("validation" if split == "validation" else "test", cfg.eval_per_type)
    easy = load_easyvqa("test")
    picked = []
    for kind in ("color", "shape"):
        of_kind = [r for r in easy if r.type == kind]
        step = max(1, len(of_kind) // cfg.eval_per_type)
        picked += of_kind[::step][: cfg.eval_per_type]
    return scenes, picked


# ---------------------------------------------------------------- training


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for field, default in asdict(Config()).items():
        kind = type(default)
        if kind is bool:
            parser.add_argument(f"--{field.replace('_', '-')}", type=lambda s: s.lower() in ("1", "true", "yes"), default=default)
        else:
            parser.add_argument(f"--{field.replace('_', '-')}", type=kind, default=default)
    parser.add_argument("--weights", type=Path, default=TRAINED_WEIGHTS, help="checkpoint to resume from and write to")
    parser.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint and start from step 0")
    args = parser.parse_args(argv)
    cfg = Config(**{f: getattr(args, f) for f in asdict(Config())})
    question_counts(cfg.questions)  # a bad --questions is refused before the model loads
    if cfg.relation_word not in ("both", *RELATION_WORDS):
        parser.error(f"--relation-word {cfg.relation_word!r}: choose both, {' or '.join(RELATION_WORDS)}")
    run(cfg, args.weights, args.fresh)


def run(cfg: Config, weights: Path, fresh: bool) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    torch.manual_seed(cfg.seed)
    base = build_base_model()
    model = LlavaForConditionalGeneration.from_pretrained(base, dtype=torch.float32, attn_implementation="sdpa")
    processor = AutoProcessor.from_pretrained(base)
    model.requires_grad_(False)
    language_model = model.model.language_model
    lora = add_lora(language_model, cfg.lora_rank, cfg.lora_alpha)
    projector = model.model.multi_modal_projector
    packer = Packer(processor)
    features = Features(model, processor)
    easy_stream = EasyVQAStream(load_easyvqa("train"), cfg.seed)
    projector.linear_1 = StandardizedLinear(projector.linear_1, *feature_statistics(features, easy_stream))
    log_path = ROOT / cfg.log
    log_path.parent.mkdir(parents=True, exist_ok=True)
    state_path = star_home() / "train" / "state.pt"

    step = 0
    if weights.is_file() and not fresh:
        with safe_open(str(weights), framework="pt") as handle:
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
            meta = dict(handle.metadata() or {})
        if int(meta.get("lora_rank", cfg.lora_rank)) != cfg.lora_rank:
            raise ValueError(f"--lora-rank {cfg.lora_rank} differs from the checkpoint's {meta['lora_rank']}: use --fresh")
        load_state(projector, lora, tensors)
        step = int(meta.get("step", 0))
        print(f"resumed from {weights} at step {step}", flush=True)

    projector.requires_grad_(True)
    lora_params = [p for w in lora.values() for p in (w.A, w.B)]
    optimizer = torch.optim.AdamW(
        [{"params": list(projector.parameters()), "lr": cfg.lr_projector}, {"params": lora_params, "lr": cfg.lr_lora}],
        weight_decay=cfg.weight_decay,
    )
    saved: dict = {}
    if step and state_path.is_file():
        saved = torch.load(state_path, weights_only=False)
        if saved.get("step") == step and saved.get("config", {}).get("lora_rank") == cfg.lora_rank:
            optimizer.load_state_dict(saved["optimizer"])
            print(f"optimizer state restored from {state_path}", flush=True)
    # A separate optimizer, so that turning the position loss on keeps a resumed run's main optimizer state.
    position_head = nn.Linear(projector.linear_2.out_features, 2 * GRID)
    position_optimizer = torch.optim.AdamW(position_head.parameters(), lr=cfg.lr_projector)
    if saved.get("step") == step and "position_head" in saved:
        position_head.load_state_dict(saved["position_head"])
        position_optimizer.load_state_dict(saved["position_optimizer"])
    warm_from = step  # a resumed run without its optimizer state warms up again
    base_lrs = [cfg.lr_projector, cfg.lr_lora]

    val_scenes, val_easy = eval_sets(cfg, "validation")

    def log(entry: dict) -> None:
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **entry}
        with open(log_path, "a") as handle:
            handle.write(json.dumps(entry) + "\n")
        print(json.dumps(entry), flush=True)

    def save() -> None:
        meta = {"lora_rank": str(cfg.lora_rank), "lora_alpha": str(cfg.lora_alpha), "step": str(step),
                "config": json.dumps(asdict(cfg))}
        weights.parent.mkdir(parents=True, exist_ok=True)
        tmp = weights.with_suffix(".tmp")
        save_file(trained_state(projector, lora), str(tmp), metadata=meta)
        tmp.replace(weights)
        state_path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "config": asdict(cfg),
                    "position_head": position_head.state_dict(), "position_optimizer": position_optimizer.state_dict()},
                   state_path.with_suffix(".tmp"))
        state_path.with_suffix(".tmp").replace(state_path)  # a run stopped mid-save keeps the previous state

    def run_eval() -> None:
        started = time.perf_counter()
        result = {"scenes": evaluate(model, packer, features, val_scenes), "easy-vqa": evaluate(model, packer, features, val_easy)}
        scenes_all = sum(v["accuracy"] * v["n"] for v in result["scenes"].values()) / sum(v["n"] for v in result["scenes"].values())
        log({"step": step, "eval": "validation", "scenes_overall": round(scenes_all, 4), **result,
             "seconds": round(time.perf_counter() - started, 1)})

    log({"start": True, "step": step, "config": asdict(cfg)})
    if step == 0:
        run_eval()
    bar = tqdm(total=cfg.steps, initial=step, desc="train", mininterval=30)
    while step < cfg.steps:
        stage = 1 if step < cfg.stage1_steps else 2
        for wrapper in lora.values():
            wrapper.A.requires_grad_(stage == 2)
            wrapper.B.requires_grad_(stage == 2)
        factor = min(1.0, (step - warm_from + 1) / cfg.warmup)
        factor *= min(1.0, 0.1 + 0.9 * (cfg.steps - step) / max(1, cfg.decay_steps))
        for group, lr in zip(optimizer.param_groups, base_lrs):
            group["lr"] = lr * factor
        position_optimizer.param_groups[0]["lr"] = cfg.lr_projector * factor
        examples = [scene_example(step * cfg.scenes_per_step + i, cfg, salt=0) for i in range(cfg.scenes_per_step)]
        examples += [easy_stream.example(step * cfg.easyvqa_per_step + i, cfg.easyvqa_questions) for i in range(cfg.easyvqa_per_step)]
        started = time.perf_counter()
        model.train()
        feats = features([e.image for e in examples], [e.key for e in examples], keep=False)
        batch = collate(packer, [packer.pack(e.blocks) for e in examples])
        projected = projector(feats)
        embeds = embed(model, batch["input_ids"], projected)
        out = language_model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], position_ids=batch["position_ids"])
        targets = batch["labels"][:, 1:]
        supervised = targets != -100  # logits only where an answer token is predicted: the vocabulary is 49k wide
        logits = model.lm_head(out.last_hidden_state[:, :-1][supervised])
        loss = nn.functional.cross_entropy(logits, targets[supervised])
        where = position_loss(position_head, projected) if cfg.position_weight else torch.zeros(())
        optimizer.zero_grad(set_to_none=True)
        position_optimizer.zero_grad(set_to_none=True)
        (loss + cfg.position_weight * where).backward()
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"] if p.requires_grad], 1.0)
        optimizer.step()
        position_optimizer.step()
        step += 1
        bar.update()
        log({"step": step, "stage": stage, "loss": round(loss.item(), 4), "position_loss": round(where.item(), 4), "tokens": int(batch["input_ids"].numel()),
             "seconds": round(time.perf_counter() - started, 2)})
        if step % cfg.save_every == 0 or step == cfg.steps:
            save()
        if step % cfg.eval_every == 0 or step == cfg.steps:
            run_eval()
    bar.close()


if __name__ == "__main__":
    main()
