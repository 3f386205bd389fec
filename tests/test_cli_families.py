"""Every family through the command line and lmms-eval, from a checkpoint saved to disk as a real one ships (video
processor config included where the family has one): `star run`, `star eval` and `star lmms-eval` on a local task
each answer as `star.apply` does on the same weights, question by question, with the same visual tokens."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from PIL import Image

import star
from checkpoints import CHECKPOINTS, MISSING
from star import compat
from star.cli import main
from star.eval import answers
from star.eval.records import QUESTION_SUFFIX
from star.families import FAMILIES, load_processor

NEW_TOKENS = 3
SIZES = [(64, 32), (32, 64), (64, 64)]  # width x height: mixed, so Qwen's grids and NeXT's tiles differ within a batch
QUESTIONS = ["what color is the w20 ?", "what shape is the w31 ?", "how many w40 ?"]


def test_every_family_has_an_adapter_and_a_checkpoint_here():
    from star.adapters import ADAPTERS

    assert [family.name for family in FAMILIES] == list(CHECKPOINTS)
    pruned = {cls.config_class.model_type for adapter in ADAPTERS for cls in adapter.model_classes}
    assert {model_type for family in FAMILIES if MISSING[family.name] is None for model_type in family.model_types} == pruned


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Three questions about images of mixed sizes, as a `star eval` JSONL file."""
    folder = tmp_path_factory.mktemp("data")
    rows = []
    for number, ((width, height), question) in enumerate(zip(SIZES, QUESTIONS)):
        pixels = (torch.arange(width * height * 3).reshape(height, width, 3) * (number + 7) % 251).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{number}.png")
        rows.append(json.dumps({"id": f"q{number}", "image": f"{number}.png", "question": question, "answer": "red"}))
    (folder / "data.jsonl").write_text("\n".join(rows) + "\n")
    return folder


@pytest.fixture(scope="module", params=[pytest.param(name, marks=pytest.mark.skipif(MISSING[name] is not None, reason=str(MISSING[name])))
                                        for name in CHECKPOINTS])
def family(request, tmp_path_factory, data):
    """(name, path, keep, reference, flops): the saved checkpoint; each question's answer, visual tokens per stage
    (per unit: image, crop or tile) and in all under star.apply, asked alone; and its share of the prefill FLOPs of
    its batch of 2, in order."""
    from transformers import AutoModelForImageTextToText

    name = request.param
    make, keep = CHECKPOINTS[name]
    path = make(tmp_path_factory.mktemp("model"))
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = load_processor(path)
    processor.tokenizer.padding_side = "left"

    def prompts(numbers: list[int]) -> dict:
        texts = []
        for number in numbers:
            content = [{"type": "image"}, {"type": "text", "text": f"{QUESTIONS[number]}\n{QUESTION_SUFFIX}"}]
            texts.append(processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True))
        images = [[Image.open(data / f"{number}.png").convert("RGB")] for number in numbers]
        return processor(images=images, text=texts, return_tensors="pt", padding=True)

    reference = []
    for number in range(len(QUESTIONS)):
        inputs = prompts([number])
        with star.apply(model, method="star", keep=keep) as pruner, torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
            tokens, totals = list(pruner.stats.tokens), list(pruner.stats.totals[0])
        answer = processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        assert totals[-1] < totals[0], f"{name}: keep={keep} prunes nothing, the test could not tell"
        reference.append((answer, tokens, totals))
    flops = []  # each prompt's share of its batch's prefill FLOPs, in the batches of 2 the commands run
    for batch in ([0, 1], [2]):
        with star.apply(model, method="star", keep=keep) as pruner, torch.no_grad():
            model(**prompts(batch))
            flops += [pruner.stats.flops / len(batch)] * len(batch)
    return name, path, keep, reference, flops


def test_star_run(family, data, capsys):
    name, path, keep, reference, flops = family
    for number, question in enumerate(QUESTIONS):
        assert main(["run", "--model", path, "--image", str(data / f"{number}.png"), "--question", question, "--keep", str(keep),
                     "--max-new-tokens", str(NEW_TOKENS)]) == 0
        out = capsys.readouterr().out
        [line] = [line for line in out.splitlines() if line.startswith(f"star keep={keep}:")]
        assert line.removeprefix(f"star keep={keep}:").rsplit("(", 1)[0].strip() == reference[number][0], (name, number)
        assert f"visual tokens per stage: {' -> '.join(map(str, reference[number][1]))};" in out, (name, number)


def test_star_eval(family, data, tmp_path):
    name, path, keep, reference, flops = family
    out = tmp_path / "eval"
    assert main(["eval", "--model", path, "--data", str(data / "data.jsonl"), "--methods", "star", "--keep", str(keep),
                 "--batch-size", "2", "--max-new-tokens", str(NEW_TOKENS), "--out", str(out)]) == 0
    rows = answers.read(out).rows[f"star-{keep}"]
    assert [(rows[f"q{n}"]["prediction"], rows[f"q{n}"]["tokens"]) for n in range(len(QUESTIONS))] == [r[:2] for r in reference], name
    assert [rows[f"q{n}"]["flops"] for n in range(len(QUESTIONS))] == pytest.approx(flops, rel=1e-9), name
    assert (out / "results.md").read_text().count("| star |") == 1


def test_star_lmms_eval(family, data, tmp_path, monkeypatch):
    pytest.importorskip("lmms_eval")
    from star.integrations import lmms_eval as backend

    name, path, keep, reference, flops = family
    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(variable, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # the wrapper hands lmms-eval its arguments there
    backend.write_task(data / "data.jsonl", tmp_path / "task", "star_families_local", max_new_tokens=NEW_TOKENS)
    assert main(["lmms-eval", "--model_args", f"pretrained={path},method=star,keep={keep},dtype=float32", "--device", "cpu",
                 "--tasks", "star_families_local", "--include_path", str(tmp_path / "task"), "--batch_size", "2",
                 "--log_samples", "--output_path", str(tmp_path / "lmms")]) == 0
    [samples_file] = (tmp_path / "lmms").rglob("*_samples_star_families_local.jsonl")
    samples = sorted((json.loads(line) for line in samples_file.read_text().splitlines()), key=lambda s: s["doc_id"])
    assert [(s["filtered_resps"], s["token_counts"][0]["visual_tokens"]) for s in samples] == [(r[0], r[2]) for r in reference], name
    assert [s["token_counts"][0]["prefill_flops"] for s in samples] == pytest.approx(flops, rel=1e-9), name


def test_a_processor_that_needs_a_missing_package_is_one_error_line(family, data, capsys, monkeypatch):
    """What transformers raises for a missing package (here torchvision, as a fast-only image processor would) is
    one `star run: error:` line that names it, before the weights load."""
    from transformers import AutoImageProcessor, AutoModelForImageTextToText

    name, path, keep, _, _ = family

    def missing(*args, **kwargs):
        raise ImportError("This image processor requires the Torchvision library but it was not found in your environment. "
                          "You can install it with pip: `pip install torchvision`.")

    monkeypatch.setattr(AutoImageProcessor, "from_pretrained", missing)
    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", lambda *a, **k: pytest.fail("weights loaded"))
    assert main(["run", "--model", path, "--image", str(data / "0.png"), "--question", "what", "--keep", str(keep)]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"star run: error: --model {path!r}: its processor needs a package") and "pip install torchvision" in line


def test_save_viz_is_refused_where_images_are_no_square_grid(family, data, tmp_path, capsys):
    name, path, keep, _, _ = family
    code = main(["run", "--model", path, "--image", str(data / "0.png"), "--question", "what", "--keep", str(keep),
                 "--max-new-tokens", "1", "--save-viz", str(tmp_path / "viz.png")])
    if name == "LLaVA-1.5":
        assert code == 0 and (tmp_path / "viz.png").is_file()
    else:
        assert code == 2 and f"is {name}, whose images are laid out otherwise" in capsys.readouterr().err


def test_auto_processor_would_need_torchvision(family):
    """Without torchvision, the families that ship a video processor config cannot be loaded by AutoProcessor: the
    case star's image-only processor is for."""
    pytest.importorskip("transformers")
    from transformers import AutoProcessor
    from transformers.utils import is_torchvision_available

    name, path, _, _, _ = family
    if is_torchvision_available() or name not in ("LLaVA-OneVision", "Qwen2-VL", "Qwen2.5-VL", "Qwen3-VL", "InternVL3", "Qwen3.5", "Gemma 4"):
        pytest.skip("only where a video processor needs the missing torchvision")
    with pytest.raises(ImportError, match="(?i)torchvision"):
        AutoProcessor.from_pretrained(path)


@pytest.mark.parametrize("name", ["llava-1.5-7b", "llava-next-7b", "llava-onevision-7b", "qwen2.5-vl-7b", "qwen3-vl-8b", "internvl3-8b", "gemma-3-4b",
                                  pytest.param("qwen3.5-9b", marks=pytest.mark.skipif(compat.QWEN3_5_MISSING is not None, reason=str(compat.QWEN3_5_MISSING))),
                                  pytest.param("gemma-4-e4b", marks=pytest.mark.skipif(compat.GEMMA4_MISSING is not None, reason=str(compat.GEMMA4_MISSING)))])
def test_star_flops_on_a_checkpoint_is_the_shipped_shapes_table(name, tmp_path, capsys):
    """A checkpoint's config.json gives the table its shipped shape gives: the decoder from the config, one image of
    the family's native size laid out by its adapter (tokens per unit, units, newlines), the refusals of star.apply."""
    from star import synthetic

    synthetic.shipped_config(name).save_pretrained(tmp_path)
    tables = []
    for model in (name, str(tmp_path)):
        assert main(["flops", "--model", model, "--method", "star,fastv,random", "--keep", "64,16"]) == 0
        tables.append(capsys.readouterr().out.split(": ", 1)[1])
    assert tables[0] == tables[1]
    refused = "fastervlm" if name not in ("llava-1.5-7b", "llava-next-7b", "internvl3-8b") else None
    if refused:
        assert main(["flops", "--model", str(tmp_path), "--method", refused, "--keep", "16"]) == 2
        assert "fastervlm" in capsys.readouterr().err


def test_star_flops(family, capsys):
    from transformers import AutoConfig

    name, path, keep, _, _ = family
    layers = AutoConfig.from_pretrained(path).get_text_config().num_hidden_layers
    assert main(["flops", "--model", path, "--method", "star", "--keep", str(keep)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{path}: {layers} layers") and f"| star | {keep} |" in out, (name, out)


def test_star_bench(family, tmp_path):
    name, path, keep, _, _ = family
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", path, "--methods", "star", "--keep", str(keep), "--repeats", "1", "--warmup", "0",
                 "--new-tokens", "2", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [row["method"] for row in rows] == ["none", "star"] and rows[1]["tokens"][-1] < rows[1]["tokens"][0], name


def test_the_star_script_on_qwen3_vl_prints_no_traceback_nor_torchvision(family, data, tmp_path):
    """The installed `star` script, in a process of its own, on the checkpoint of the issue: a video processor config
    and a torchvision-backed image processor named (one family: a process takes seconds to start)."""
    import shutil
    import subprocess
    from pathlib import Path

    name, path, keep, reference, _ = family
    if name != "Qwen3-VL":
        pytest.skip("one family")
    script = shutil.which("star", path=str(Path(sys.executable).parent))
    argv = ["run", "--model", path, "--image", str(data / "0.png"), "--question", QUESTIONS[0], "--keep", str(keep),
            "--max-new-tokens", str(NEW_TOKENS)]
    done = subprocess.run([script, *argv], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "torchvision" not in done.stderr.lower() and "slow image processor" not in done.stderr
    assert f"star keep={keep}: {reference[0][0]}" in done.stdout


def test_the_processor_is_the_checkpoints_own(family, data):
    """star's processor carries the checkpoint's chat template and processor options, lacks only the parts images
    do not need (a video processor, Gemma 4's audio feature extractor) of the families that have them, and where a
    family has none it is AutoProcessor's, output for output."""
    from pathlib import Path

    from transformers import AutoConfig, AutoProcessor
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING

    name, path, _, _, _ = family
    processor = load_processor(path)
    saved = Path(path)
    jinja = saved / "chat_template.jinja"  # as processors save it now; chat_template.json as the hub's older ones
    template = jinja.read_text() if jinja.is_file() else json.loads((saved / "chat_template.json").read_text())["chat_template"]
    assert processor.chat_template == template
    family_class = PROCESSOR_MAPPING[type(AutoConfig.from_pretrained(path))]
    parts = {"processor_class", *compat.processor_attributes(family_class)}  # 5.x saves the sub-processors' configs there too
    options = {k: v for k, v in json.loads((saved / "processor_config.json").read_text()).items() if k not in parts}
    assert all(getattr(processor, option) == value for option, value in options.items()), (name, options)
    assert isinstance(processor, family_class)
    assert compat.processor_attributes(type(processor)) == [a for a in compat.processor_attributes(family_class) if a in compat.IMAGE_PARTS]
    if type(processor) is family_class:
        theirs = AutoProcessor.from_pretrained(path, **compat.processor_kwargs())
        texts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
                                               add_generation_prompt=True) for q in QUESTIONS]
        images = [[Image.open(data / f"{n}.png").convert("RGB")] for n in range(len(QUESTIONS))]
        ours = processor(images=images, text=texts, return_tensors="pt", padding=True)
        reference = theirs(images=images, text=texts, return_tensors="pt", padding=True)
        assert sorted(ours) == sorted(reference) and all(torch.equal(ours[key], reference[key]) for key in ours), name


@pytest.mark.skipif(compat.GEMMA4_MISSING is not None, reason=str(compat.GEMMA4_MISSING or ""))
def test_star_flops_on_a_shipped_shape_refuses_what_star_apply_refuses(capsys):
    """The shipped Gemma 4 E4B shares its last 18 layers' keys and values: PyramidDrop's cut at layer 31 is refused
    as star.apply refuses it, naming the layers, where a cut at 21 (STAR's) is costed."""
    assert main(["flops", "--model", "gemma-4-e4b", "--method", "star,pdrop", "--keep", "64"]) == 2
    assert "method 'pdrop' cuts at decoder layer 31" in capsys.readouterr().err
    assert main(["flops", "--model", "gemma-4-e4b", "--method", "star", "--keep", "64"]) == 0
