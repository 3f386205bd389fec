"""A Qwen checkpoint through a real server: `star serve --model QWEN --method star-vision --keep 0.5` on a tiny random
Qwen2.5-VL and the OpenAI client. Checked: the answer to a chat request with an image is the Hugging Face path's
(star.apply, original positions) for the prompt the chat template builds, with the engine's setting and with the
request's own; the usage counts the pruned prompt; a request whose int `keep` is above its image's tokens gets an
error and the server keeps serving."""

from __future__ import annotations

import base64
import io
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engines import tiny_qwen_checkpoint
from test_tiny_qwen import PICTURES, hf_generate

START_TIMEOUT_S = 900
READY = re.compile(r"star serve: ready at (http://\S+/v1) \(OpenAI API; model '([^']+)'\)")
QUESTION = "what color is the ?"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    import openai

    path = tiny_qwen_checkpoint(tmp_path_factory.mktemp("tiny-qwen2.5"), "2.5")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = tmp_path_factory.mktemp("serve-qwen") / "star-serve.log"
    command = [
        str(Path(sys.executable).parent / "star"), "serve", "--model", path, "--method", "star-vision", "--keep", "0.5",
        "--port", str(port), "--dtype", "float32", "--max-model-len", "512", "--max-num-seqs", "4", "--seed", "0",
        "--trust-request-mm-kwargs",
    ]
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + START_TIMEOUT_S
    while not (ready := READY.search(log.read_text())):
        if process.poll() is not None or time.monotonic() > deadline:
            os.killpg(process.pid, signal.SIGKILL)
            pytest.fail(f"star serve did not start:\n{log.read_text()[-4000:]}")
        time.sleep(2)
    yield openai.OpenAI(base_url=ready.group(1), api_key="unused", max_retries=0, timeout=300), ready.group(2), path
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)


def _ask(client, model: str, image, setting: dict | None = None):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    content = [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()}},
        {"type": "text", "text": QUESTION},
    ]
    extra = {"mm_processor_kwargs": {"star": setting}} if setting is not None else None
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], max_tokens=6, temperature=0.0, extra_body=extra
    )


@pytest.mark.parametrize("setting", [None, {"method": "random", "keep": 4, "seed": 3}], ids=["engine", "request"])
def test_a_chat_request_gets_the_hf_answer_from_the_pruned_prompt(served, setting):
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    client, model, path = served
    image = PICTURES[1][1]  # 32 x 64 px: 32 tokens
    processor = AutoProcessor.from_pretrained(path, padding_side="left")
    prompt = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
                                           add_generation_prompt=True)
    hf = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval(), processor
    expected = hf_generate(hf, prompt, [image], setting or {"method": "star-vision", "keep": 0.5})
    reply = _ask(client, model, image, setting)
    # the same words (vLLM's incremental detokenizer puts a space before the first word of this word-level vocabulary)
    assert reply.choices[0].message.content.strip() == processor.tokenizer.decode(expected["tokens"], skip_special_tokens=True)
    unpruned = processor(images=[image], text=[prompt], return_tensors="pt")["input_ids"].shape[1]
    assert reply.usage.prompt_tokens == unpruned - (32 - len(expected["kept"]))


def test_a_budget_above_an_images_tokens_is_an_error_and_the_server_keeps_serving(served):
    import openai

    client, model, _ = served
    with pytest.raises(openai.BadRequestError, match="keep=40 is above the 16 visual tokens of an image"):
        _ask(client, model, PICTURES[0][0], {"method": "star-vision", "keep": 40})
    assert _ask(client, model, PICTURES[0][0]).choices[0].message.content is not None
