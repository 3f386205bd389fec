"""README's CPU serving command, as the README writes it: `star serve` starts vLLM's OpenAI server with the plugin on
the default model and prints its URL; one chat request with an image, sent as plain HTTP the way any OpenAI client
sends it, gets the Hugging Face path's answer from a prompt pruned to the README's budget; an interrupt sent to
star serve's own process stops it and vLLM.

The server gets none of `make test-vllm`'s VLLM_CPU_KVCACHE_SPACE: on a CPU, star serve's own settings must start it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from engines import default_model, hf_generate, hf_model, image_url, scene_prompts

README = Path(__file__).parents[1] / "README.md"
N_VISUAL = 196
START_TIMEOUT_S = 900  # a busy 2-core machine took over 10 minutes to start a vLLM server
READY = re.compile(r"star serve: ready at (http://\S+/v1) \(OpenAI API; model '([^']+)'\)")


def readme_command() -> list[str]:
    """The README's CPU serving command (its line that runs .venv-vllm/bin/star serve), with this environment's
    `star` (in `make test-vllm`, that very .venv-vllm/bin/star)."""
    section = README.read_text().split("## Serving with vLLM")[1].split("\n## ")[0]
    [line] = [line for line in section.splitlines() if line.startswith(".venv-vllm/bin/star serve ")]
    return [str(Path(sys.executable).parent / "star"), *shlex.split(line)[1:]]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The README's command on a free port, until its ready line; its URL, its model's name, the process and its log."""
    default_model()  # built first, so that the wait below is vLLM's start alone
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = tmp_path_factory.mktemp("serve") / "star-serve.log"
    env = {name: value for name, value in os.environ.items() if name != "VLLM_CPU_KVCACHE_SPACE"}
    with log.open("w") as out:  # its own process group: whatever is left of it at the end can be stopped
        process = subprocess.Popen([*readme_command(), "--port", str(port)], stdout=out, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)
    deadline = time.monotonic() + START_TIMEOUT_S
    while not (ready := READY.search(log.read_text())):
        if process.poll() is not None:
            pytest.fail(f"star serve exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            os.killpg(process.pid, signal.SIGKILL)
            pytest.fail(f"star serve printed no URL within {START_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")
        time.sleep(2)
    yield ready.group(1), ready.group(2), process, log
    try:
        os.killpg(process.pid, signal.SIGKILL)  # only if a test failed before stopping it
    except ProcessLookupError:
        pass


def test_the_readme_command_serves_the_pruned_model(served):
    from star.eval.records import QUESTION_SUFFIX

    url, model, _, _ = served
    command = readme_command()
    keep = int(command[command.index("--keep") + 1])
    path = default_model()
    prompts, images, [record] = scene_prompts(path, 1)
    content = [
        {"type": "image_url", "image_url": {"url": image_url(record.image)}},
        {"type": "text", "text": f"{record.question}\n{QUESTION_SUFFIX}"},
    ]
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 8, "temperature": 0.0}
    request = urllib.request.Request(f"{url}/chat/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        reply = json.load(response)
    hf = hf_model(path)
    [expected] = hf_generate(hf, prompts, images, {"method": "star-vision", "keep": keep}, 8)
    assert reply["choices"][0]["message"]["content"] == hf[1].tokenizer.decode(expected["tokens"], skip_special_tokens=True)
    unpruned = hf[1](images=images[0], text=prompts, return_tensors="pt")["input_ids"].shape[1]
    assert reply["usage"]["prompt_tokens"] == unpruned - (N_VISUAL - keep)


def test_an_interrupt_to_star_serve_alone_stops_vllm_too(served):
    """SIGINT to star serve's own process (`kill -INT PID`; a terminal's Ctrl-C reaches only it too, since vLLM runs
    in a session of its own): star serve forwards it to vLLM, waits for it to shut down and ends without a
    traceback of its own, and the server's port is closed."""
    url, _, process, log = served
    os.kill(process.pid, signal.SIGINT)
    process.wait(timeout=120)
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    deadline = time.monotonic() + 60
    while True:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)):
                break
        if time.monotonic() > deadline:
            pytest.fail(f"vLLM still listens on port {port} 60 s after star serve ended:\n{log.read_text()[-2000:]}")
        time.sleep(1)
    assert "star/cli" not in log.read_text(), log.read_text()[-3000:]
