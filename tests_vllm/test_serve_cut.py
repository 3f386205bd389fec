"""STAR's two stages through a real server: `star serve --method star --keep 39` on the default model (which adds
the engine options the decoder cut needs) and the OpenAI client. Checked: answers equal the Hugging Face path's,
sent one by one and as one concurrent burst with text-only requests; the usage counts the prompt as vLLM holds it
(stage 1's 167 tokens per image); a request with another setting gets an error and the server keeps serving."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from engines import default_model, hf_generate, hf_model, scene_prompts, star_serve
from test_server import _ask

SETTING = {"method": "star", "keep": 39}


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    path = default_model()
    log = tmp_path_factory.mktemp("serve-cut") / "star-serve.log"
    arguments = [
        "--method", "star", "--keep", "39", "--dtype", "float32", "--max-model-len", "1024", "--max-num-seqs", "8", "--seed", "0",
        "--trust-request-mm-kwargs",
    ]
    with star_serve(arguments, log) as (openai_client, model):
        assert "--scheduler-cls star.integrations.vllm.cut.CutScheduler" in log.read_text()
        yield openai_client, model, path


@pytest.fixture(scope="module")
def hf(client) -> tuple:
    return hf_model(client[2])


@pytest.fixture(scope="module")
def scenes(client):
    return scene_prompts(client[2], 4)


def _text(client, model: str, question: str):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}], max_tokens=8, temperature=0.0)


def test_answers_are_the_hf_paths_alone_and_in_a_burst(client, hf, scenes):
    openai_client, model, _ = client
    prompts, images, records = scenes
    tokenizer = hf[1].tokenizer
    expected = [tokenizer.decode(r["tokens"], skip_special_tokens=True) for r in hf_generate(hf, prompts, images, SETTING, 8)]
    alone = [_ask(openai_client, model, record) for record in records]
    assert [reply.choices[0].message.content for reply in alone] == expected
    unpruned = [hf[1](images=image[0], text=[prompt], return_tensors="pt")["input_ids"].shape[1] for prompt, image in zip(prompts, images)]
    assert [reply.usage.prompt_tokens for reply in alone] == [n - (196 - 167) for n in unpruned]
    texts = ["What is the capital of France?", "Name a colour."]
    with ThreadPoolExecutor(len(records) + len(texts)) as pool:
        burst = [pool.submit(_ask, openai_client, model, record) for record in records]
        plain = [pool.submit(_text, openai_client, model, text) for text in texts]
        assert [f.result().choices[0].message.content for f in burst] == expected
        assert [f.result().choices[0].message.content for f in plain] == [_text(openai_client, model, t).choices[0].message.content for t in texts]


def test_a_request_with_another_setting_gets_an_error_and_the_server_keeps_serving(client, scenes):
    import openai

    openai_client, model, _ = client
    records = scenes[2]
    before = _ask(openai_client, model, records[1]).choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="this engine cuts inside the decoder with its own setting"):
        _ask(openai_client, model, records[1], {"method": "fastervlm", "keep": 39})
    assert _ask(openai_client, model, records[1], SETTING).choices[0].message.content == before  # its own, given again
    assert _ask(openai_client, model, records[1]).choices[0].message.content == before
