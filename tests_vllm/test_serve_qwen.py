"""A Qwen checkpoint through a real server: `star serve --model QWEN --method star-vision --keep 0.5` on a tiny random
Qwen2.5-VL and the OpenAI client. Checked: the answer to a chat request with an image is the Hugging Face path's
(star.apply, original positions; pool's, its 2 x 4 grid's own) for the prompt the chat template builds, with the
engine's setting and with the request's own; the usage counts the pruned prompt; a request whose int `keep` is
above its image's tokens gets an error and the server keeps serving."""

from __future__ import annotations

import pytest

from engines import ask, star_serve, tiny_qwen_checkpoint
from test_tiny_qwen import PICTURES, hf_generate

QUESTION = "what color is the ?"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    path = tiny_qwen_checkpoint(tmp_path_factory.mktemp("tiny-qwen2.5"), "2.5")
    log = tmp_path_factory.mktemp("serve-qwen") / "star-serve.log"
    arguments = [
        "--model", path, "--method", "star-vision", "--keep", "0.5", "--dtype", "float32", "--max-model-len", "512",
        "--max-num-seqs", "4", "--seed", "0", "--trust-request-mm-kwargs",
    ]
    with star_serve(arguments, log) as (client, model):
        yield client, model, path


@pytest.mark.parametrize(
    "setting", [None, {"method": "random", "keep": 4, "seed": 3}, {"method": "pool", "keep": 6}], ids=["engine", "request", "pool"]
)
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
    reply = ask(client, model, image, QUESTION, setting)
    # the same words (vLLM's incremental detokenizer puts a space before the first word of this word-level vocabulary)
    assert reply.choices[0].message.content.strip() == processor.tokenizer.decode(expected["tokens"], skip_special_tokens=True)
    unpruned = processor(images=[image], text=[prompt], return_tensors="pt")["input_ids"].shape[1]
    assert reply.usage.prompt_tokens == unpruned - (32 - len(expected["kept"]))


def test_a_budget_above_an_images_tokens_is_an_error_and_the_server_keeps_serving(served):
    import openai

    client, model, _ = served
    with pytest.raises(openai.BadRequestError, match="keep=40 is above the 16 visual tokens of an image"):
        ask(client, model, PICTURES[0][0], QUESTION, {"method": "star-vision", "keep": 40})
    assert ask(client, model, PICTURES[0][0], QUESTION).choices[0].message.content is not None
