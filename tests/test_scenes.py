"""The scene generator: deterministic pictures, and answers that are true of them (recomputed independently)."""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pytest

from star.data.scenes import COLORS, SHAPES, SIZE, TYPES, make_scene, scene_questions, scene_records
from star.data.vqa import exact_match, normalize_answer


def truth(objects, question: str) -> str:
    """The answer to `question`, worked out from the object list alone, without the generator's code."""
    if m := re.fullmatch(r"Is there a (\w+) (\w+)\?", question):
        return "yes" if any((o.color, o.shape) == m.groups() for o in objects) else "no"
    if m := re.fullmatch(r"What color is the (\w+)\?", question):
        [obj] = [o for o in objects if o.shape == m.group(1)]
        return obj.color
    if m := re.fullmatch(r"What shape is the (\w+) object\?", question):
        [obj] = [o for o in objects if o.color == m.group(1)]
        return obj.shape
    if question == "How many objects are there?":
        return str(len(objects))
    if m := re.fullmatch(r"How many (\w+)s are there\?", question):
        return str(sum(o.shape == m.group(1) for o in objects))
    if m := re.fullmatch(r"Is the (\w+) (\w+) (left|right) of the (\w+) (\w+)\?", question):
        [a] = [o for o in objects if (o.color, o.shape) == m.group(1, 2)]
        [b] = [o for o in objects if (o.color, o.shape) == m.group(4, 5)]
        assert abs(a.x - b.x) >= 16, "relation asked between objects at nearly the same x"
        return "yes" if (a.x < b.x) == (m.group(3) == "left") else "no"
    raise AssertionError(f"unknown question form: {question!r}")


def test_same_seed_same_bytes():
    for split, index in [("train", 0), ("test", 7), ("validation", 123)]:
        first = hashlib.sha256(make_scene(split, index).png()).hexdigest()
        assert hashlib.sha256(make_scene(split, index).png()).hexdigest() == first
        assert make_scene(split, index).objects == make_scene(split, index).objects
    assert scene_questions(make_scene("train", 3), 2) == scene_questions(make_scene("train", 3), 2)


def test_splits_and_indices_differ():
    pictures = {make_scene(s, i).png() for s in ("train", "validation", "test") for i in range(5)}
    assert len(pictures) == 15


@pytest.mark.parametrize("split", ["train", "validation", "test"])
def test_every_answer_is_true_of_the_object_list(split):
    for index in range(60):
        scene = make_scene(split, index)
        assert 2 <= len(scene.objects) <= 6
        pairs = [(o.color, o.shape) for o in scene.objects]
        assert len(set(pairs)) == len(pairs)
        for q in scene_questions(scene, per_type=3, salt=index):
            assert q.type in TYPES
            assert q.answer == truth(scene.objects, q.question), (split, index, q)


def test_picture_shows_the_object_list():
    """The pixel at each object's center has the object's color, and the objects stay inside the picture."""
    for index in range(40):
        scene = make_scene("test", index)
        pixels = np.asarray(scene.image())
        assert pixels.shape == (SIZE, SIZE, 3)
        for o in scene.objects:
            assert tuple(pixels[o.y, o.x]) == COLORS[o.color], (index, o)
            x0, y0, x1, y1 = o.box
            assert 0 <= x0 and 0 <= y0 and x1 <= SIZE and y1 <= SIZE


def test_generator_covers_its_vocabulary():
    objects = [o for i in range(200) for o in make_scene("train", i).objects]
    assert {o.shape for o in objects} == set(SHAPES)
    assert {o.color for o in objects} == set(COLORS)
    assert {o.size for o in objects} == {"small", "medium", "large"}
    assert {make_scene("train", i).noise > 0 for i in range(20)} == {True, False}


def test_negatives_are_adversarial():
    """A 'no' existence question names a color and a shape that both occur in the scene, when such a pair exists."""
    checked = 0
    for index in range(100):
        scene = make_scene("train", index)
        colors, shapes = {o.color for o in scene.objects}, {o.shape for o in scene.objects}
        present = {(o.color, o.shape) for o in scene.objects}
        for q in scene_questions(scene, per_type=3, salt=1):
            if q.type == "existence" and q.answer == "no" and any((c, s) not in present for c in colors for s in shapes):
                color, shape = re.fullmatch(r"Is there a (\w+) (\w+)\?", q.question).groups()
                assert color in colors and shape in shapes
                checked += 1
    assert checked > 20


def test_fixed_evaluation_set():
    records = scene_records("test", 10)
    assert [r.type for r in records].count("count") == 10 and len(records) == 40
    assert [(r.question, r.answer) for r in records] == [(r.question, r.answer) for r in scene_records("test", 10)]
    for r in records:
        index = int(r.id.rsplit("-", 1)[1])
        assert r.answer == truth(make_scene("test", index).objects, r.question)
    for kind in ("existence", "relation"):
        answers = [r.answer for r in scene_records("test", 100) if r.type == kind]
        assert 0.35 < answers.count("yes") / len(answers) < 0.65, kind


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="split='dev'"):
        make_scene("dev", 0)
    with pytest.raises(ValueError, match="index=-1"):
        make_scene("train", -1)
    with pytest.raises(ValueError, match="per_type=0"):
        scene_records("test", 0)


@pytest.mark.parametrize(
    "raw, expected",
    [("Two.", "2"), ("The Circle", "circle"), ("  YES!", "yes"), ("an apple", "apple"), ("3.5", "3.5"),
     ("zero", "0"), ("a red, round-ish thing", "red round ish thing"), ("six  circles", "6 circles")],
)
def test_normalisation(raw, expected):
    assert normalize_answer(raw) == expected


def test_exact_match():
    assert exact_match("Three", "3") and exact_match("the triangle.", "triangle")
    assert not exact_match("circles", "circle") and not exact_match("no", "yes")
