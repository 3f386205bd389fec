"""Seeded 224x224 scenes of 2 to 6 shapes, with questions whose answers need one object among several.

Why a generator: the default model must show whether a pruning method keeps the tokens a question needs, and
no hub dataset can be had here. Every answer is computed from the scene's object list, so it is true of the
picture by construction (tests recompute them). Scene `index` of `split` is drawn from its own seed, so a
split is a fixed, endless sequence: the same (split, index) always gives the same objects and PNG bytes.

Question types: `existence` (POPE-style, negatives are adversarial: the color and the shape both occur, but not
together), `attribute` (the color of the only triangle; the shape of the only teal object), `count` (digits),
`relation` (left of / right of, between two objects that are each the only one of their color and shape).
"""

from __future__ import annotations

import io
from collections import Counter
from dataclasses import dataclass
from itertools import permutations

import numpy as np
from PIL import Image, ImageDraw

SIZE = 224
SHAPES = ("circle", "rectangle", "triangle")
COLORS = {
    "red": (215, 30, 35),
    "green": (40, 160, 50),
    "blue": (35, 70, 215),
    "black": (15, 15, 15),
    "gray": (125, 125, 125),
    "teal": (0, 128, 128),
    "brown": (130, 75, 30),
    "yellow": (240, 210, 20),
}
SIZES = {"small": (22, 34), "medium": (36, 54), "large": (56, 80)}  # side of the bounding box, pixels
TYPES = ("existence", "attribute", "count", "relation")
SPLITS = {"train": 0, "validation": 1, "test": 2}
MIN_GAP = 16  # centers closer than a patch side horizontally make "left of" ambiguous: such pairs are not asked
PLURAL = {"circle": "circles", "rectangle": "rectangles", "triangle": "triangles"}


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str
    x: int  # center, pixels from the left
    y: int  # center, pixels from the top
    side: int  # bounding-box side, pixels

    @property
    def box(self) -> tuple[int, int, int, int]:
        half = self.side // 2
        return self.x - half, self.y - half, self.x - half + self.side, self.y - half + self.side

    @property
    def place(self) -> str:
        row = ("top", "middle", "bottom")[min(2, self.y * 3 // SIZE)]
        column = ("left", "center", "right")[min(2, self.x * 3 // SIZE)]
        return "center" if (row, column) == ("middle", "center") else f"{row} {column}"


@dataclass(frozen=True)
class Question:
    question: str
    answer: str
    type: str


@dataclass(frozen=True)
class Scene:
    split: str
    index: int
    objects: tuple[SceneObject, ...]
    background: tuple[int, int, int]
    noise: float  # standard deviation of the background's pixel noise; 0 is plain
    seed: tuple[int, ...]

    def image(self) -> Image.Image:
        """The picture, drawn from the object list alone (its noise from the scene's own seed)."""
        rng = np.random.default_rng((*self.seed, 1))
        base = np.broadcast_to(np.array(self.background, np.float32), (SIZE, SIZE, 3))
        if self.noise:
            base = base + rng.normal(0.0, self.noise, (SIZE, SIZE, 1)).astype(np.float32)
        image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
        draw = ImageDraw.Draw(image)
        for obj in self.objects:
            x0, y0, x1, y1 = obj.box
            fill = COLORS[obj.color]
            if obj.shape == "circle":
                draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
            elif obj.shape == "rectangle":
                draw.rectangle((x0, y0 + obj.side // 6, x1 - 1, y1 - 1 - obj.side // 6), fill=fill)
            else:
                draw.polygon([(obj.x, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=fill)
        return image

    def png(self) -> bytes:
        buffer = io.BytesIO()
        self.image().save(buffer, format="PNG")
        return buffer.getvalue()

    def caption(self) -> str:
        """A dense description, left to right, with the counts: extra training signal that names every object."""
        parts = [f"{o.size} {o.color} {o.shape} at {o.place}" for o in sorted(self.objects, key=lambda o: (o.x, o.y))]
        counts = Counter(o.shape for o in self.objects)
        tally = ", ".join(f"{counts[s]} {PLURAL[s] if counts[s] != 1 else s}" for s in SHAPES)
        return f"{len(self.objects)} objects: " + "; ".join(parts) + f". Counts: {tally}."


def _seed(split: str, index: int) -> tuple[int, ...]:
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not a scene split: choose one of {sorted(SPLITS)}")
    if index < 0:
        raise ValueError(f"index={index} must be at least 0")
    return (20251124, SPLITS[split], index)


def make_scene(split: str, index: int) -> Scene:
    """Scene `index` of `split`: 2 to 6 non-overlapping objects, each (color, shape) pair at most once."""
    seed = _seed(split, index)
    rng = np.random.default_rng(seed)
    wanted = int(rng.integers(2, 7))
    pairs = [(c, s) for c in COLORS for s in SHAPES]
    order = rng.permutation(len(pairs))
    objects: list[SceneObject] = []
    for pick in order:
        if len(objects) == wanted:
            break
        color, shape = pairs[pick]
        size = ("small", "medium", "large")[int(rng.integers(3))]
        side = int(rng.integers(*SIZES[size]))
        for _ in range(50):  # rejection sampling of a free spot; a crowded scene simply gets fewer objects
            x = int(rng.integers(side // 2 + 4, SIZE - side // 2 - 4))
            y = int(rng.integers(side // 2 + 4, SIZE - side // 2 - 4))
            candidate = SceneObject(shape, color, size, x, y, side)
            if all(_apart(candidate, other) for other in objects):
                objects.append(candidate)
                break
    noisy = bool(rng.integers(2))
    background = tuple(int(v) for v in rng.integers(222, 256, 3))
    return Scene(split, index, tuple(objects), background, 14.0 if noisy else 0.0, seed)


def _apart(a: SceneObject, b: SceneObject, margin: int = 6) -> bool:
    ax0, ay0, ax1, ay1 = a.box
    bx0, by0, bx1, by1 = b.box
    return ax1 + margin <= bx0 or bx1 + margin <= ax0 or ay1 + margin <= by0 or by1 + margin <= ay0


# ---------------------------------------------------------------- questions


def existence_question(scene: Scene, rng: np.random.Generator) -> Question:
    present = {(o.color, o.shape) for o in scene.objects}
    if rng.integers(2):
        color, shape = sorted(present)[int(rng.integers(len(present)))]
        return Question(f"Is there a {color} {shape}?", "yes", "existence")
    colors = {c for c, _ in present}
    shapes = {s for _, s in present}
    # Adversarial first: color and shape both in the picture, never together; then one of them; then neither.
    tiers = [
        [(c, s) for c in colors for s in shapes],
        [(c, s) for c in COLORS for s in SHAPES if c in colors or s in shapes],
        [(c, s) for c in COLORS for s in SHAPES],
    ]
    for tier in tiers:
        absent = sorted(set(tier) - present)
        if absent:
            color, shape = absent[int(rng.integers(len(absent)))]
            return Question(f"Is there a {color} {shape}?", "no", "existence")
    raise AssertionError("a scene holds at most 6 of the 24 color-shape pairs")


def attribute_question(scene: Scene, rng: np.random.Generator) -> Question | None:
    shapes = Counter(o.shape for o in scene.objects)
    colors = Counter(o.color for o in scene.objects)
    options = [("color", o) for o in scene.objects if shapes[o.shape] == 1]
    options += [("shape", o) for o in scene.objects if colors[o.color] == 1]
    if not options:
        return None
    asked, obj = options[int(rng.integers(len(options)))]
    if asked == "color":
        return Question(f"What color is the {obj.shape}?", obj.color, "attribute")
    return Question(f"What shape is the {obj.color} object?", obj.shape, "attribute")


def count_question(scene: Scene, rng: np.random.Generator) -> Question:
    pick = int(rng.integers(len(SHAPES) + 1))
    if pick == len(SHAPES):
        return Question("How many objects are there?", str(len(scene.objects)), "count")
    shape = SHAPES[pick]
    return Question(f"How many {PLURAL[shape]} are there?", str(sum(o.shape == shape for o in scene.objects)), "count")


def relation_question(scene: Scene, rng: np.random.Generator) -> Question | None:
    pairs = [(a, b) for a, b in permutations(scene.objects, 2) if abs(a.x - b.x) >= MIN_GAP]
    if not pairs:
        return None
    a, b = pairs[int(rng.integers(len(pairs)))]
    word = ("left of", "right of")[int(rng.integers(2))]
    truth = a.x < b.x if word == "left of" else a.x > b.x
    text = f"Is the {a.color} {a.shape} {word} the {b.color} {b.shape}?"
    return Question(text, "yes" if truth else "no", "relation")


MAKERS = {
    "existence": existence_question,
    "attribute": attribute_question,
    "count": count_question,
    "relation": relation_question,
}


def scene_questions(scene: Scene, per_type: int = 1, salt: int = 0) -> list[Question]:
    """Up to `per_type` distinct questions of each type about `scene`, seeded by the scene and `salt`."""
    rng = np.random.default_rng((*scene.seed, 2, salt))
    questions: list[Question] = []
    for kind in TYPES:
        seen: set[str] = set()
        for _ in range(per_type * 4):
            if len(seen) == per_type:
                break
            q = MAKERS[kind](scene, rng)
            if q is not None and q.question not in seen:
                seen.add(q.question)
                questions.append(q)
    return questions


@dataclass(frozen=True)
class SceneRecord:
    """One evaluation item; the fields follow star.eval.records.Record."""

    id: str
    image: Image.Image
    question: str
    answer: str
    type: str


def scene_records(split: str = "test", per_type: int = 15) -> list[SceneRecord]:
    """A fixed evaluation set: `per_type` questions of each type, each about its own scene (scenes 0, 1, ...)."""
    if per_type < 1:
        raise ValueError(f"per_type={per_type} must be at least 1")
    wanted = {kind: per_type for kind in TYPES}
    records: list[SceneRecord] = []
    index = 0
    while any(wanted.values()):
        kind = TYPES[index % len(TYPES)]
        if wanted[kind]:
            scene = make_scene(split, index)
            q = MAKERS[kind](scene, np.random.default_rng((*scene.seed, 3)))
            if q is not None:
                records.append(SceneRecord(f"scenes-{split}-{index}", scene.image(), q.question, q.answer, q.type))
                wanted[kind] -= 1
        index += 1
    return records
