"""Can a linear probe read where an object is from its patch's CLIP feature, and from its projected token?

    .venv/bin/python scripts/probe_projector.py [--model DIR] [--scenes 240]

For each object of `--scenes` training-split scenes (indices the training script never draws), the patch under
the object's center gives two vectors: CLIP's layer-(-2) feature and the projector's output. A ridge regression
from each (standardized) to the patch's column and row is fitted on 60% of the scenes, its penalty chosen on
20%, and scored on the last 20%: Pearson r and mean absolute error in patches. If CLIP's features carry the
place and the projected tokens do not, the projector is what keeps the decoder from answering "left of".
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from star.data.scenes import make_scene  # noqa: E402
from star.zoo.default_model import PATCH_SIZE, IMAGE_SIZE, build_default_model  # noqa: E402

FIRST_SCENE = 5_000_000  # far above the indices training draws (step * scenes per step)
PENALTIES = (1.0, 10.0, 100.0, 1000.0)


@torch.no_grad()
def object_vectors(model, processor, scenes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """CLIP features and projected tokens at each object's center patch, its (column, row), and its scene."""
    side = IMAGE_SIZE // PATCH_SIZE
    clip, projected, place, scene_of = [], [], [], []
    for start in tqdm(range(0, scenes, 16), desc="CLIP and projector", unit="batch of 16"):
        batch = [make_scene("train", FIRST_SCENE + i) for i in range(start, min(scenes, start + 16))]
        pixels = processor.image_processor(images=[s.image() for s in batch], return_tensors="pt")["pixel_values"]
        hidden = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[model.config.vision_feature_layer][:, 1:]
        tokens = model.model.multi_modal_projector(hidden)
        for k, scene in enumerate(batch):
            for obj in scene.objects:
                column, row = obj.x // PATCH_SIZE, obj.y // PATCH_SIZE
                clip.append(hidden[k, row * side + column].numpy())
                projected.append(tokens[k, row * side + column].numpy())
                place.append((column, row))
                scene_of.append(start + k)
    return np.array(clip), np.array(projected), np.array(place, dtype=float), np.array(scene_of)


def ridge_probe(x: np.ndarray, y: np.ndarray, part: np.ndarray) -> tuple[float, float]:
    """Test-part Pearson r and mean absolute error of a ridge fit on part 0, its penalty chosen on part 1."""
    mean, std = x[part == 0].mean(0), x[part == 0].std(0) + 1e-6
    z = np.hstack([(x - mean) / std, np.ones((len(x), 1))])
    fit = z[part == 0]

    def predict(penalty: float) -> np.ndarray:
        return z @ np.linalg.solve(fit.T @ fit + penalty * np.eye(z.shape[1]), fit.T @ y[part == 0])

    best = min(PENALTIES, key=lambda p: np.abs(predict(p)[part == 1] - y[part == 1]).mean())
    guess = predict(best)[part == 2]
    return float(np.corrcoef(guess, y[part == 2])[0, 1]), float(np.abs(guess - y[part == 2]).mean())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, help="a LLaVA model directory (default: the default model, built if needed)")
    parser.add_argument("--scenes", type=int, default=240, help="training-split scenes to probe (default 240)")
    args = parser.parse_args(argv)
    if args.scenes < 20:
        parser.error(f"--scenes {args.scenes}: at least 20 are needed for three parts")
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    path = args.model or build_default_model()
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(path)
    clip, projected, place, scene_of = object_vectors(model, processor, args.scenes)
    part = np.digitize(scene_of, [args.scenes * 0.6, args.scenes * 0.8])
    print(f"{len(place)} objects in {args.scenes} scenes; scored on {int((part == 2).sum())}")
    print("vectors            column r  column MAE  row r  row MAE")
    for name, x in (("CLIP layer -2", clip), ("projected token", projected)):
        (cr, ce), (rr, re) = ridge_probe(x, place[:, 0], part), ridge_probe(x, place[:, 1], part)
        print(f"{name:<18} {cr:8.2f}  {ce:10.2f}  {rr:5.2f}  {re:7.2f}")
    norms = np.linalg.norm(projected, axis=1).mean()
    words = model.get_input_embeddings().weight.norm(dim=1).mean().item()
    print(f"mean norm: projected token {norms:.1f}, word embedding {words:.1f}")


if __name__ == "__main__":
    main()
