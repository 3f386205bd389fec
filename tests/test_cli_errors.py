"""Every `star` subcommand over a table of bad arguments: one error line that names the argument and the value,
exit code 2, no traceback, nothing written, and no model loaded (the loaders fail the test if called)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, LlamaConfig

import star.eval.runner
import star.synthetic
import star.zoo
from conftest import tiny_checkpoint, tiny_llava
from families import tiny_gemma3, tiny_qwen
from star.cli import main
from star.methods import REGISTRY


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """The paths the table refers to: a tiny model's config (16 visual tokens, 6 layers), a Qwen2-VL config, a
    text-only model, a folder without config, images good and broken, data, and a finished eval run."""
    root = tmp_path_factory.mktemp("cli")
    tiny_llava().config.save_pretrained(root / "tiny")
    tiny_qwen().config.save_pretrained(root / "qwen")
    tiny_gemma3().config.save_pretrained(root / "gemma")
    LlamaConfig(num_hidden_layers=2).save_pretrained(root / "text-only")
    (root / "no-config").mkdir()
    Image.new("RGB", (40, 40), (255, 0, 0)).save(root / "red.png")
    (root / "broken.png").write_bytes(b"not a png")
    (root / "a-file").write_text("not a folder")
    rows = [{"image": "red.png", "question": "what color is the w20 ?", "answer": "red", "type": "color"}]
    (root / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (root / "empty.jsonl").write_text("\n")
    checkpoint = tiny_checkpoint(root / "checkpoint")
    run = ["eval", "--model", checkpoint, "--data", str(root / "data.jsonl"), "--methods", "none,star", "--keep", "4",
           "--max-new-tokens", "2", "--out", str(root / "run")]
    assert main(run) == 0
    names = ["tiny", "qwen", "gemma", "text-only", "no-config", "a-file", "checkpoint", "run"]
    named = {"image": "red.png", "broken": "broken.png", "data": "data.jsonl", "empty": "empty.jsonl"}
    return {name: str(root / name) for name in names} | {key: str(root / name) for key, name in named.items()} | {"root": str(root)}


@pytest.fixture
def no_model(monkeypatch, tmp_path):
    """Any model load, default-model build or evaluation fails the test; the default model is not built here."""

    def refuse(*args, **kwargs):
        raise AssertionError("a bad argument reached the model")

    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", refuse)
    monkeypatch.setattr(star.synthetic, "random_model", refuse)
    monkeypatch.setattr(star.zoo, "build_default_model", refuse)
    monkeypatch.setattr(star.eval.runner, "evaluate", refuse)
    monkeypatch.setenv("STAR_HOME", str(tmp_path / "home"))


def _available_gib() -> float:
    meminfo = Path("/proc/meminfo")
    lines = meminfo.read_text().splitlines() if meminfo.is_file() else []
    return next((int(line.split()[1]) / 2**20 for line in lines if line.startswith("MemAvailable:")), float("inf"))


# (arguments after the subcommand's base, the texts its one error line must hold); {name} is a path of `files`.
RUN = "run --image {image} --question what"
RUN_CASES = [
    ("--keep abc", ["--keep", "'abc'"]),
    ("--keep 0", ["--keep", "'0'"]),
    ("--keep -3", ["--keep", "'-3'"]),
    ("--keep 1.5", ["--keep", "'1.5'"]),
    ("--keep 500", ["keep=500", "[1, 196]"]),  # the default model: 196 tokens, known before its first build
    ("--keep 17 --model {tiny}", ["keep=17", "[1, 16]"]),
    ("--method nope", ["--method", "'nope'", "star, fastv"]),
    ("--option layer=99", ["layer=99", "1 to 29"]),
    ("--option layer=6 --keep 4 --model {tiny}", ["layer=6", "1 to 5"]),
    ("--option layer=x", ["layer='x'", "an int"]),
    ("--option stage1_ratio=1.5", ["stage1_ratio=1.5", "[0, 1)"]),
    ("--option depth=3", ["'depth'", "layer, stage1_ratio"]),
    ("--option layer", ["--option", "'layer'", "NAME=VALUE"]),
    ("--option layer=4 --option layer=8", ["'layer'", "twice"]),
    ("--method fastervlm --option layer=3", ["'layer'", "'fastervlm'"]),
    ("--method none --option layer=3", ["'layer'", "'none'"]),
    ("--method pdrop --option layers=8,16", ["layers='8,16'", "8/16/24"]),
    ("--method pdrop --option layers=3/2 --keep 4 --model {tiny}", ["layers=(3, 2)", "increasing"]),
    ("--layer 99", ["--layer 99", "--option layer=99"]),
    ("--image {root}/missing.png", ["--image", "missing.png", "not a file"]),
    ("--image {broken}", ["--image", "broken.png", "cannot be read as an image"]),
    ("--image {root}", ["--image", "not a file"]),
    ("--model {no-config}", ["--model", "no-config", "no config.json"]),
    ("--model {text-only}", ["--model", "'llama'", "llava"]),
    ("--model {a-file}", ["--model", "a-file", "no config.json"]),
    ("--keep 4 --model {qwen}", ["--model", "qwen", "its processor cannot be read"]),  # weights, but no processor files
    ("--keep 4 --model {qwen} --save-viz {root}/viz.png", ["--save-viz", "Qwen2-VL", "leave --save-viz out"]),
    ("--model ./no/such/model", ["--model", "./no/such/model", "does not exist"]),
    ("--model {qwen} --positions contiguous", ["positions='contiguous'", "Qwen2VL"]),
    ("--model {qwen} --method fastervlm --keep 4", ["method='fastervlm'", "[CLS]"]),
    ("--device banana", ["--device", "'banana'", "cpu"]),
    ("--device cuda:99", ["--device", "'cuda:99'", "cpu"]),
    ("--dtype float64", ["--dtype", "'float64'", "float32"]),
    ("--positions diagonal", ["--positions", "'diagonal'", "original"]),
    ("--max-new-tokens 0", ["--max-new-tokens", "'0'"]),
    ("--save-viz {root}/no-folder/x.png", ["--save-viz", "no-folder"]),
    ("--save-viz {root}", ["--save-viz", "is a folder"]),
]
if not torch.cuda.is_available():
    RUN_CASES.append(("--device cuda", ["--device", "'cuda'", "allowed are cpu"]))

EVAL = "eval --model {checkpoint} --data {data} --methods star --keep 4 --out {run}"
EVAL_CASES = [
    ("--methods none,resize", ["resize", "LlavaForConditionalGeneration", "fixed size"]),
    ("--methods resise", ["--methods", "'resise'", "resize"]),
    ("--time 0.5 --keep 4", ["--keep and --time"]),
    ("--time 1.5", ["time='1.5'", "(0, 1]"]),
    ("--keep 0", ["--keep", "'0'"]),
    ("--keep 4,abc", ["--keep", "'abc'"]),
    ("--keep 17", ["keep=17", "[1, 16]"]),
    ("--keep ,", ["--keep", "no budget"]),
    ("--methods star,bogus", ["--methods", "method='bogus'"]),
    ("--methods ,", ["--methods", "no method"]),
    ("--methods none --option layer=2", ["'layer'", "'none'"]),
    ("--limit 0", ["--limit", "'0'"]),
    ("--limit many", ["--limit", "'many'"]),
    ("--batch-size 0", ["--batch-size", "'0'"]),
    ("--max-new-tokens -3", ["--max-new-tokens", "'-3'"]),
    ("--data {root}/missing.jsonl", ["--data", "missing.jsonl"]),
    ("--data {empty}", ["data=", "empty.jsonl", "no usable record"]),
    ("--split validation", ["--split", "'validation'", "JSONL"]),
    ("--data scenes --split dev", ["--split", "'dev'", "train, validation, test"]),
    ("--types colour", ["types='colour'", "color"]),
    ("--grid layer", ["--grid", "OPTION=V1,V2"]),
    ("--grid depth=1,2", ["'depth'", "layer, stage1_ratio"]),
    ("--grid layer=1,9", ["layer=9", "1 to 5"]),
    ("--grid positions=original,diagonal", ["positions='diagonal'", "original, contiguous"]),
    ("--option layer=2 --grid layer=1,3", ["'layer'", "twice"]),
    ("--option layer=x", ["layer='x'", "an int"]),
    ("--out {a-file}", ["--out", "a-file", "not a folder"]),
    ("--model {text-only}", ["--model", "'llama'"]),
    ("--device cuda:99", ["--device", "'cuda:99'"]),
]

BENCH = "bench --methods star --out {root}/bench.json"
BENCH_CASES = [
    ("--keep abc", ["--keep", "'abc'"]),
    ("--keep 0", ["--keep", "'0'"]),
    ("--keep 500", ["keep=500", "[1, 196]"]),
    ("--methods bogus", ["--methods", "method='bogus'"]),
    ("--option layer=abc", ["layer='abc'", "an int"]),
    ("--option layer=99", ["layer=99", "1 to 29"]),
    ("--repeats 0", ["--repeats", "'0'"]),
    ("--warmup -1", ["--warmup", "'-1'"]),
    ("--new-tokens 0", ["--new-tokens", "'0'"]),
    ("--out {root}/no-folder/bench.json", ["--out", "no-folder"]),
    ("--out {root}", ["--out", "is a folder"]),
    ("--model {no-config}", ["--model", "no config.json"]),
    ("--device banana", ["--device", "'banana'"]),
    ("--batch 0", ["--batch", "'0'"]),
    ("--batch 1,x", ["--batch", "'x'"]),
    ("--batch ,", ["--batch", "no batch size"]),
    ("--attn flash", ["--attn", "'flash'", "sdpa"]),
    ("--attn flash_attention_2", ["--attn flash_attention_2", "--device 'cpu'"]),
    ("--text-tokens 0", ["--text-tokens", "'0'"]),
    ("--config gpt-2 --random-init", ["--config", "'gpt-2'", "llava-1.5-7b"]),
    ("--config llava-1.5-7b", ["--config 'llava-1.5-7b'", "--random-init"]),
    ("--config llava-1.5-7b --random-init --model {tiny}", ["--config 'llava-1.5-7b'", "--model", "both"]),
    ("--random-init", ["--random-init", "--config"]),
    ("--config llava-1.5-7b --random-init --keep 600", ["keep=600", "[1, 576]"]),
    ("--config qwen2.5-vl-7b --random-init --methods fastervlm --keep 58", ["method='fastervlm'", "[CLS]"]),
    ("--config llava-1.5-7b --random-init --methods resize --keep 58", ["resize", "LlavaForConditionalGeneration", "576 tokens"]),
    ("--config llava-1.5-7b --random-init --option layer=32", ["layer=32", "1 to 31"]),
]
if _available_gib() < 49:  # the 13B's weights in float32: more than this machine has
    BENCH_CASES.append(("--config llava-1.5-13b --random-init --dtype float32", ["--dtype float32", "49.7 GiB", "available"]))

DEMO = "demo --out {root}/demo"
DEMO_CASES = [
    ("--keep 0", ["--keep", "'0'"]),
    ("--keep 197", ["keep=197", "[1, 196]"]),
    ("--method nope", ["--method", "'nope'"]),
    ("--option layer=99", ["layer=99", "1 to 29"]),
    ("--out {a-file}", ["--out", "a-file", "not a folder"]),
    ("--device banana", ["--device", "'banana'"]),
]

FLOPS = "flops"
FLOPS_CASES = [
    ("--keep abc", ["--keep", "'abc'"]),
    ("--keep 600", ["keep=600", "[1, 576]"]),
    ("--method bogus", ["--method", "method='bogus'"]),
    ("--option layer=99", ["layer=99", "1 to 31"]),
    ("--method star,fastervlm --option layer=8", ["'layer'", "'fastervlm'"]),
    ("--model gpt-2", ["--model", "'gpt-2'", "llava-1.5-7b"]),
    ("--model {text-only}", ["--model", "'llama'", "Qwen2.5-VL (Qwen/Qwen2.5-VL-7B-Instruct)"]),
    ("--model {qwen} --method fastervlm --keep 4", ["fastervlm", "[CLS]"]),
    ("--model {qwen} --keep 9999", ["keep=9999"]),
    ("--text-tokens -1", ["--text-tokens", "'-1'"]),
    ("--layer 8", ["--layer 8", "--option layer=8"]),
]

# Checked before vLLM is looked for: these run without it.
SERVE = "serve"
SERVE_CASES = [
    ("--method pdrop --keep 39", ["--method pdrop --keep 39", "method='pdrop'", "cuts before 3 decoder layers", "serves one cut"]),
    ("--method sparsevlm", ["method='sparsevlm'", "cuts before 3 decoder layers"]),
    ("--method cdpruner", ["method='cdpruner'", "instruction"]),
    ("--method nope", ["--method", "'nope'"]),
    ("--keep 500", ["keep=500", "[1, 196]"]),
    ("--keep 17 --model {tiny}", ["keep=17", "[1, 16]"]),
    ("--keep 0", ["--keep", "'0'"]),
    ("--option layer=3", ["'layer'", "'star-vision'"]),
    ("--model {gemma}", ["--model", "Gemma3ForConditionalGeneration", "not served"]),
    ("--model {qwen} --method fastervlm --keep 4", ["--method fastervlm --keep 4", "method='fastervlm'", "[CLS]"]),
    ("--model {qwen} --method sparsevlm --keep 4", ["method='sparsevlm' at keep=4", "cuts before 3 decoder layers"]),
    ("--model {text-only}", ["--model", "'llama'"]),
    ("--model {no-config}", ["--model", "no config.json"]),
    ("--hf-overrides {{}}", ["--hf-overrides", "--method, --keep"]),
    ("--port 0", ["--port", "'0'"]),
]

CALIBRATE = "calibrate --out {root}/schedule.json"
CALIBRATE_CASES = [
    ("--method none", ["--method 'none'", "nothing to calibrate"]),
    ("--model {qwen}", ["same number of visual tokens in every image", "Qwen2VLForConditionalGeneration"]),
    ("--keep 500", ["keep=500", "[1, 196]"]),
]

CASES = [
    (base, extra, named)
    for base, cases in ((RUN, RUN_CASES), (EVAL, EVAL_CASES), (BENCH, BENCH_CASES), (DEMO, DEMO_CASES), (FLOPS, FLOPS_CASES),
                        (SERVE, SERVE_CASES), (CALIBRATE, CALIBRATE_CASES))
    for extra, named in cases
]


def snapshot(folder: str) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


# lmms-eval's own command line: the star backend's model_args, checked against the checkpoint's config before
# lmms-eval loads a task or the weights.
LMMS = "lmms-eval --tasks mme --model_args"
LMMS_CASES = [
    ("pretrained={tiny},keep=17", ["keep=17", "[1, 16]"]),
    ("pretrained={checkpoint},method=star,keep=0", ["keep=0"]),
    ("pretrained={checkpoint},method=nope", ["method='nope'"]),
    ("pretrained={checkpoint},layer=6", ["layer=6", "1 to 5"]),
    ("pretrained={checkpoint},depth=3", ["'depth'"]),
    ("pretrained={checkpoint},positions=sideways", ["positions='sideways'"]),
    ("pretrained={text-only}", ["pretrained", "text-only", "'llama'"]),
    ("pretrained={no-config}", ["pretrained", "no config.json"]),
    ("method=star,keep=4", ["pretrained="]),
]


@pytest.mark.usefixtures("no_model")
@pytest.mark.parametrize("base, extra, named", CASES, ids=[f"{base.split()[0]} {extra}" for base, extra, _ in CASES])
def test_a_bad_argument_is_one_error_line_before_any_compute(files, base, extra, named, capsys):
    assert_one_error_line(files, f"{base} {extra}", named, capsys)


@pytest.mark.usefixtures("no_model")
@pytest.mark.parametrize("extra, named", LMMS_CASES, ids=[extra for extra, _ in LMMS_CASES])
def test_a_bad_lmms_eval_model_arg_is_one_error_line_before_lmms_eval_starts(files, extra, named, capsys, monkeypatch):
    dispatch = pytest.importorskip("lmms_eval.cli.dispatch")
    monkeypatch.setattr(dispatch, "main", lambda: pytest.fail("a bad model_arg reached lmms-eval"))
    assert_one_error_line(files, f"{LMMS} {extra}", named, capsys)


def assert_one_error_line(files: dict[str, str], command: str, named: list[str], capsys) -> None:
    run_before = snapshot(files["run"])
    argv = command.format(**files).split()
    assert main(argv) == 2
    out, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err
    for text in named:
        assert text.format(**files) in errors[0], errors[0]
    assert "Traceback" not in out + err
    assert snapshot(files["run"]) == run_before  # no answer lost, none added, no run.json rewritten
    assert not (Path(files["root"]) / "bench.json").exists() and not (Path(files["root"]) / "demo").exists()


@pytest.mark.usefixtures("no_model")
@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_serve_without_vllm_says_how_to_install_it(capsys):
    assert main(["serve", "--method", "star-vision", "--keep", "39"]) == 2
    [error] = capsys.readouterr().err.splitlines()
    assert error.startswith("star serve: error: vLLM is not installed")
    assert 'pip install "star-vlm[vllm]"' in error and "make .venv-vllm/installed" in error


@pytest.mark.usefixtures("no_model")
@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file whatever its mode")
def test_an_unreadable_image_is_named(files, tmp_path, capsys):
    image = tmp_path / "secret.png"
    shutil.copy(files["image"], image)
    image.chmod(0)
    assert main(["run", "--image", str(image), "--question", "what"]) == 2
    assert "--image" in (err := capsys.readouterr().err) and "secret.png" in err


@pytest.mark.parametrize(
    "argv, named",
    [
        (["bench", "--methods", "star", "--keep", "abc"], "argument --keep: keep='abc' is not a budget"),
        (["eval", "--data", "scenes", "--methods", "star", "--keep", "500"], "keep=500 is outside [1, 196]"),
    ],
)
def test_the_command_line_prints_no_traceback(argv, named, tmp_path):
    """The installed `star` script, in a process of its own: what a user sees."""
    script = shutil.which("star", path=str(Path(sys.executable).parent))
    env = {**os.environ, "STAR_HOME": str(tmp_path / "home")}
    done = subprocess.run([script, *argv], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert done.returncode == 2
    assert "Traceback" not in done.stdout + done.stderr
    [error] = [line for line in done.stderr.splitlines() if "error:" in line]
    assert error.startswith(f"star {argv[0]}: error: {named}")
    assert not (tmp_path / "star-eval").exists() and not (tmp_path / "home").exists()


def test_methods_lists_each_option_with_type_default_and_meaning(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for cls in REGISTRY.values():
        for field in dataclasses.fields(cls):
            assert field.metadata["help"], f"{cls.name}.{field.name} says nothing about itself"
            [line] = [line for line in out.splitlines() if line.split()[:1] == [field.name] and field.metadata["help"] in line]
            assert f"{field.type} = {field.default!r}" in line
    assert "--option NAME=VALUE" in out


def test_option_reaches_the_method_in_run_and_eval(files, capsys):
    image, checkpoint = files["image"], files["checkpoint"]
    assert main(["run", "--model", checkpoint, "--image", image, "--question", "what", "--keep", "4", "--option", "layer=1",
                 "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "star keep=4 layer=1:" in out and "decoder layers cut: [1]" in out
    out_dir = Path(files["root"]) / "with-option"
    assert main(["eval", "--model", checkpoint, "--data", files["data"], "--methods", "none,star,fastv", "--keep", "4",
                 "--option", "layer=3", "--max-new-tokens", "2", "--out", str(out_dir)]) == 0
    rows = json.loads((out_dir / "results.json").read_text())["settings"]
    assert [(row["name"], row["options"]) for row in rows] == [("none-1.0", {}), ("star-4-layer3", {"layer": 3}), ("fastv-4-layer3", {"layer": 3})]


def test_star_run_on_a_checkpoint_prints_no_warning(files, tmp_path):
    """4.57 warns at every load of a processor saved as a slow one unless `use_fast` is stated: star states it."""
    script = shutil.which("star", path=str(Path(sys.executable).parent))
    argv = ["run", "--model", files["checkpoint"], "--image", files["image"], "--question", "what", "--keep", "4", "--max-new-tokens", "1"]
    done = subprocess.run([script, *argv], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "slow image processor" not in done.stderr and "warn" not in done.stderr.lower(), done.stderr
