"""A real `vllm serve` with the plugin on the default model, on localhost, and the OpenAI client.

The server starts with STAR's vision stage at 39 tokens (`--hf-overrides`); requests may set their own through
`mm_processor_kwargs` (which vLLM's server takes only with `--trust-request-mm-kwargs`). Checked: the answers are the Hugging Face path's, the usage's prompt tokens shrink by
exactly the dropped image tokens, and bad requests get an error while the server keeps serving.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time

import pytest

from engines import SERVE, ask, default_model, hf_generate, hf_model, overrides, scene_prompts

N_VISUAL = 196
START_TIMEOUT_S = 900  # a busy 2-core machine took over 10 minutes to start one


@pytest.fixture(scope="module")
def path() -> str:
    return default_model()


@pytest.fixture(scope="module")
def server(path, tmp_path_factory):
    """`vllm serve` in its own process; the client talks to it as any OpenAI client would."""
    import openai

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = tmp_path_factory.mktemp("server") / "vllm-serve.log"
    command = [
        *SERVE, "--model", path, "--host", "127.0.0.1", "--port", str(port),
        "--hf-overrides", json.dumps(overrides("star-vision", 39)), "--max-model-len", "1024", "--dtype", "float32",
        "--enforce-eager", "--max-num-seqs", "8", "--seed", "0", "--trust-request-mm-kwargs",
    ]
    with log.open("w") as out:
        # its own process group, so that stopping it stops vLLM's engine and worker processes too
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if process.poll() is not None:
            pytest.fail(f"vllm serve exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            client.models.list()
            break
        except openai.APIConnectionError:
            if time.monotonic() > deadline:
                _stop(process)
                pytest.fail(f"vllm serve did not answer within {START_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")
            time.sleep(2)
    yield client, path
    _stop(process)


def _stop(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)


def _ask(client, model: str, record, setting: dict | None = None):
    """A scene question with its image, as the evaluation asks it."""
    from star.eval.records import QUESTION_SUFFIX

    return ask(client, model, record.image, f"{record.question}\n{QUESTION_SUFFIX}", setting, max_tokens=8)


@pytest.fixture(scope="module")
def hf(path) -> tuple:
    return hf_model(path)


@pytest.fixture(scope="module")
def scenes(path):
    return scene_prompts(path, 4)


def test_answers_are_the_hf_paths_and_the_prompt_shrinks(server, hf, scenes):
    client, model = server
    prompts, images, records = scenes
    tokenizer = hf[1].tokenizer
    for setting in ({"method": "star-vision", "keep": 39}, {"method": "fastervlm", "keep": 20}, {"method": "none", "keep": N_VISUAL}):
        reference = hf_generate(hf, prompts, images, setting, 8)
        for record, expected in zip(records, reference):
            reply = _ask(client, model, record, setting if setting["keep"] != 39 else None)
            assert reply.choices[0].message.content == tokenizer.decode(expected["tokens"], skip_special_tokens=True)
    full = _ask(client, model, records[0], {"method": "none", "keep": N_VISUAL}).usage.prompt_tokens
    for keep in (98, 39, 20):
        pruned = _ask(client, model, records[0], {"method": "star-vision", "keep": keep}).usage.prompt_tokens
        assert full - pruned == N_VISUAL - keep
    assert _ask(client, model, records[0]).usage.prompt_tokens == full - (N_VISUAL - 39)  # the server's own setting


BAD = [
    ({"method": "nope", "keep": 39}, "method='nope' is unknown"),
    ({"method": "fastervlm", "keep": 300}, "keep=300 is outside [1, 196]"),
    ({"method": "star", "keep": 39}, "method 'star-vision' runs STAR's vision stage"),
    ({"method": "pdrop", "keep": 39}, "prunes inside the decoder"),
]


def test_bad_requests_get_an_error_and_the_server_keeps_serving(server, scenes):
    import openai

    client, model = server
    records = scenes[2]
    before = _ask(client, model, records[1]).choices[0].message.content
    for setting, message in BAD:
        with pytest.raises(openai.BadRequestError) as error:
            _ask(client, model, records[1], setting)
        assert message in str(error.value)
    with pytest.raises(openai.NotFoundError):  # a model this server does not serve
        _ask(client, "llava-hf/llava-1.5-7b-hf", records[1])
    assert _ask(client, model, records[1]).choices[0].message.content == before
