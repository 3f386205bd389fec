"""`star serve`: vLLM's OpenAI-compatible server with the star plugin, the method and budget as its hf_overrides.

It runs the server as `python -m vllm.entrypoints.openai.api_server`, the module behind `vllm serve`: vllm-cpu's
`vllm` script stops before it parses anything (it reads its version from a distribution named `vllm`). Without
a GPU, vLLM would reserve most of the machine's memory (`--gpu-memory-utilization`, 0.92 of it by default) and
refuse to start where less is free: star serve gives its KV cache 1 GiB instead (VLLM_CPU_KVCACHE_SPACE=1), enough
for the default model, unless the environment or the arguments size it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

from star.cli.args import add_option_argument, budget, command, method_name, model_path, positive, settings
from star.integrations.vllm import ARCHITECTURES, CUT_ENGINE, server_flags, vision_methods

MISSING = (
    'vLLM is not installed in this environment: pip install "star-vlm[vllm]" (a GPU machine), or on a CPU machine '
    "make .venv-vllm/installed in the project's checkout and run .venv-vllm/bin/star serve (or make serve)"
)
CPU_KV_CACHE_GIB = "1"
# What sizes vLLM's KV cache on a CPU: given any of them, star serve leaves the size to it.
KV_CACHE_ARGUMENTS = ("--kv-cache-memory-bytes", "--gpu-memory-utilization")


def add(commands: argparse._SubParsersAction) -> None:
    sub = command(
        commands, "serve",
        help="serve a pruned model with vLLM's OpenAI-compatible server",
        description="Starts vLLM's OpenAI-compatible server on --model (default: the project's default model) with "
        "--method and --keep (and --option) as the engine's pruning setting, and prints the URL once it answers. "
        f"vLLM serves the vision-side methods ({', '.join(vision_methods())}, none) on LLaVA-1.5, LLaVA-NeXT, Qwen2-VL, "
        "Qwen2.5-VL, Qwen3-VL and Qwen3.5 (the kept tokens keep their original M-RoPE positions on Qwen; Qwen3.5 in bfloat16 "
        "on a CPU) and, on LLaVA-1.5, Qwen2-VL, Qwen2.5-VL and Qwen3-VL, a method "
        "with one cut inside the decoder (star, fastv, dart; pdrop and sparsevlm with one layer), for which star serve "
        "adds the engine options the cut needs (its scheduler, no chunked prefill, no prefix caching); "
        "the setting is checked against the model before vLLM starts. Every other argument goes to vLLM unchanged "
        "(e.g. --max-model-len 4096, --dtype float32, or --trust-request-mm-kwargs to let each request choose its "
        "own setting). Without a GPU, vLLM's KV cache gets 1 GiB unless VLLM_CPU_KVCACHE_SPACE (GiB), "
        "--kv-cache-memory-bytes or --gpu-memory-utilization says otherwise. Needs vLLM: "
        'pip install "star-vlm[vllm]"; on a CPU machine, make .venv-vllm/installed and .venv-vllm/bin/star serve. '
        "docs/serving.md has the request format.",
        examples=[".venv-vllm/bin/star serve --method star-vision --keep 39 --dtype float32   # a CPU machine, the default model",
                  ".venv-vllm/bin/star serve --method star --keep 39 --dtype float32   # STAR's two stages, the cut inside vLLM's decoder",
                  "star serve --model llava-hf/llava-1.5-7b-hf --method star-vision --keep 98 --trust-request-mm-kwargs   # a GPU",
                  "star serve --model Qwen/Qwen2.5-VL-7B-Instruct --method star-vision --keep 0.25 --max-model-len 8192   # a GPU: a quarter of each image's tokens"],
    )
    sub.allow_abbrev = False  # a vLLM option that starts like one of ours (--mod, --po) goes to vLLM, not to ours
    sub.add_argument("--model", help="a checkpoint directory or hub id of a served family: " + ", ".join(ARCHITECTURES) + " (default: the project's default model)")
    sub.add_argument("--method", type=method_name, default="star-vision", help="a vision-side method, or on LLaVA-1.5, Qwen2-VL, Qwen2.5-VL and Qwen3-VL one with one decoder cut (default star-vision)")
    sub.add_argument("--keep", type=budget, default=98, help="visual tokens kept per image (per crop for LLaVA-NeXT; Qwen images differ in size, so a fraction suits them): an int, or a fraction in (0, 1] (default 98)")
    add_option_argument(sub)
    sub.add_argument("--host", default="127.0.0.1", help="the address to listen on (default 127.0.0.1, this machine only; 0.0.0.0: every interface)")
    sub.add_argument("--port", type=positive, default=8000, help="the port (default 8000)")
    sub.set_defaults(run=run, passed_on=[])


def run(args: argparse.Namespace) -> int:
    if given(args.passed_on, "--hf-overrides") is not None:
        raise ValueError("--hf-overrides is what star serve builds from --method, --keep and --option: give those instead")
    overrides, cuts = engine_overrides(args)
    if importlib.util.find_spec("vllm") is None:
        raise ValueError(MISSING)
    path = model_path(args)
    argv = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", path, "--host", args.host,
        "--port", str(args.port), "--hf-overrides", json.dumps(overrides), *(server_flags(CUT_ENGINE) if cuts else []),
        *args.passed_on,
    ]
    env = dict(os.environ)
    if not gpu() and "VLLM_CPU_KVCACHE_SPACE" not in env and all(given(args.passed_on, a) is None for a in KV_CACHE_ARGUMENTS):
        env["VLLM_CPU_KVCACHE_SPACE"] = CPU_KV_CACHE_GIB
        print(f"star serve: no GPU: vLLM's KV cache gets {CPU_KV_CACHE_GIB} GiB (set VLLM_CPU_KVCACHE_SPACE for more)", flush=True)
    print(f"star serve: {shlex.join(argv)}", flush=True)
    # The server in a session of its own, so that it hears only what star serve forwards: an interrupt (Ctrl-C, or
    # SIGINT sent to star serve alone) reaches it once and it shuts down; SIGTERM stops it.
    server = subprocess.Popen(argv, env=env, start_new_session=True)
    signal.signal(signal.SIGINT, lambda *_: server.send_signal(signal.SIGINT))
    signal.signal(signal.SIGTERM, lambda *_: server.terminate())
    host = "localhost" if args.host in ("0.0.0.0", "::", "") else args.host
    url = f"http://{host}:{args.port}/v1"
    while server.poll() is None:
        if answers(f"http://{host}:{args.port}/health"):
            name = given(args.passed_on, "--served-model-name") or path
            print(f"star serve: ready at {url} (OpenAI API; model {name!r}); Ctrl-C stops it", flush=True)
            break
        time.sleep(1)
    code = server.wait()
    return code if code >= 0 else 128 - code  # killed by a signal: the shell's convention


def engine_overrides(args: argparse.Namespace) -> tuple[dict, bool]:
    """vLLM's hf_overrides for --model's architecture and the setting, checked on the model's skeleton as the
    plugin checks it when the engine starts (the family, the budget, a method the family refuses, a decoder cut only
    on LLaVA-1.5, Qwen2-VL, Qwen2.5-VL and Qwen3-VL and only one), and whether the setting cuts inside the decoder."""
    from star import checks
    from star.integrations.vllm import config_setting, hf_overrides

    [setting] = settings([args.method], [args.keep], args.option)
    skeleton = checks.model_skeleton(args.model)
    architecture = type(skeleton).__name__  # vLLM names its classes as transformers does
    named = " ".join([f"--method {args.method}", f"--keep {args.keep}", *(f"--option {k}={v}" for k, v in args.option)])
    try:
        overrides = hf_overrides(setting.method, setting.keep, architecture, **setting.options)
    except ValueError as error:
        raise ValueError(f"{named if architecture in ARCHITECTURES else f'--model {args.model!r}'}: {error}") from None
    return overrides, config_setting(overrides["star"], skeleton.config, named).cut is not None


def given(arguments: list[str], flag: str) -> str | None:
    """The value of `flag` among the arguments for vLLM (as `--flag VALUE` or `--flag=VALUE`), or None."""
    for i, argument in enumerate(arguments):
        if argument == flag:
            return arguments[i + 1] if i + 1 < len(arguments) else ""
        if argument.startswith(flag + "="):
            return argument.partition("=")[2]
    return None


def gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def answers(url: str) -> bool:
    """Whether vLLM's server answers at `url` yet."""
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except (urllib.error.URLError, OSError):
        return False
