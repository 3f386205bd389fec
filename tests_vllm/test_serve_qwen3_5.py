"""`star serve` on a small random Qwen3.5 (bfloat16, as vLLM runs its gated delta net on a CPU), over HTTP with the
OpenAI client: a chat request's answer scored by the Hugging Face path under `star.apply` (`test_tiny_qwen3_5`'s
teacher-forced reference and tolerance), its usage counting the pruned prompt, a bad request answered with an error
while the server keeps serving, and a decoder cut refused before vLLM starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from engines import QWEN3_5_TOKENIZER, ask, star_serve, tiny_qwen_checkpoint
from test_tiny_qwen import PICTURES
from test_tiny_qwen3_5 import TOL, gap, reference, reference_model

QUESTION = "what color is the ?"


@pytest.fixture(scope="module")
def path(tmp_path_factory) -> str:
    return tiny_qwen_checkpoint(tmp_path_factory.mktemp("tiny-qwen3.5"), "3.5")


@pytest.fixture(scope="module")
def served(path, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-qwen3.5") / "star-serve.log"
    arguments = [
        "--model", path, "--tokenizer", f"{path}/{QWEN3_5_TOKENIZER}", "--method", "star-vision", "--keep", "0.5",
        "--dtype", "bfloat16", "--max-model-len", "512", "--max-num-seqs", "4", "--seed", "0", "--trust-request-mm-kwargs",
    ]
    with star_serve(arguments, log) as (client, model):
        yield client, model


@pytest.fixture(scope="module")
def hf(path) -> tuple:
    return reference_model(path)


@pytest.mark.parametrize("setting", [None, {"method": "random", "keep": 4, "seed": 3}], ids=["engine", "request"])
def test_a_chat_request_is_scored_by_the_hf_path_on_the_pruned_prompt(served, hf, setting):
    client, model = served
    image = PICTURES[1][1]  # 32 x 64 px: 32 tokens
    reply = ask(client, model, image, QUESTION, setting, logprobs=True)
    steps = reply.choices[0].logprobs.content
    ours = {"tokens": [int(step.token.removeprefix("token_id:")) for step in steps], "logprobs": [step.logprob for step in steps]}
    processor = hf[1]
    prompt = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
                                           add_generation_prompt=True)
    scored = reference(hf, prompt, [image], setting or {"method": "star-vision", "keep": 0.5}, ours["tokens"])
    assert gap(ours, scored) <= TOL
    unpruned = processor(images=[image], text=[prompt], return_tensors="pt")["input_ids"].shape[1]
    assert reply.usage.prompt_tokens == unpruned - (32 - len(scored["kept"]))


def test_a_bad_request_is_an_error_and_the_server_keeps_serving(served):
    import openai

    client, model = served
    with pytest.raises(openai.BadRequestError, match="keep=40 is above the 16 visual tokens of an image"):
        ask(client, model, PICTURES[0][0], QUESTION, {"method": "star-vision", "keep": 40}, logprobs=True)
    assert ask(client, model, PICTURES[0][0], QUESTION, logprobs=True).choices[0].message.content is not None


def test_a_decoder_cut_is_refused_before_vllm_starts(path):
    star = Path(sys.executable).parent / "star"
    done = subprocess.run([str(star), "serve", "--model", path, "--method", "star", "--keep", "4"], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "Qwen3.5's decoder is never cut here" in done.stderr
    assert "vllm.entrypoints.openai.api_server" not in done.stdout
