"""Serving throughput with the vLLM plugin: unpruned against pruned images, offline (`LLM.generate`) and through
`vllm serve` with the OpenAI client, in one run.

    .venv-vllm/bin/python scripts/bench_vllm.py                      # the CPU table of docs/results.md
    .venv-vllm/bin/python scripts/bench_vllm.py --gpu --model llava-hf/llava-1.5-7b-hf --keep 288,115,58,29 --requests 256

Each burst is N scene questions (one image each), every request submitted at once, so that the engine batches
them; every burst has images of its own (so no encoder or prefix cache serves one burst from another), and every
setting serves the same bursts. One engine per mode serves every setting, each as the requests' own
`mm_processor_kwargs`; the unpruned row is the plugin's `none` setting in that engine. A setting is timed after
a warm-up burst, `--repeats` times; the table gives medians, and each row's ratio to the unpruned row of the same
mode. Columns: requests/s and prompt tokens/s over the burst's wall time; time to first token (median over the
burst's requests: the engine's own `first_token_latency` offline, the first streamed chunk for the server); the
KV cache a request holds at its end: its tokens (prompt + answer) and the blocks vLLM's paged allocation gives
them (ceil(tokens / block size), every request's image being different). On a CPU vLLM reserves its KV cache up front: VLLM_CPU_KVCACHE_SPACE (GiB),
2 here unless set.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


# `vllm serve`'s server by its module: vllm-cpu 0.32.0's `vllm` command fails before parsing (it reads the version
# of a distribution named "vllm"; this one is "vllm-cpu"). The module runs the same server with the same arguments.
SERVE = [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint directory or hub name (default: the project's default model)")
    parser.add_argument("--method", default="star-vision", help="the vision-side method of the pruned rows (default star-vision)")
    parser.add_argument("--keep", default="98,39,20", help="budgets of the pruned rows, comma-separated (default 98,39,20)")
    parser.add_argument("--requests", type=int, default=16, help="requests per burst (default 16)")
    parser.add_argument("--repeats", type=int, default=3, help="timed bursts per setting after one warm-up (default 3)")
    parser.add_argument("--max-tokens", type=int, default=8, help="answer tokens per request (default 8)")
    parser.add_argument("--modes", default="offline,server", help="offline, server or both (default both)")
    parser.add_argument("--gpu", action="store_true", help="bfloat16, CUDA graphs and a larger batch (a GPU machine with vllm installed)")
    parser.add_argument("--out", type=Path, default=Path("docs/results/vllm-cpu.json"), help="where the measurements go (JSON)")
    args = parser.parse_args(argv)
    args.keeps = [int(k) for k in args.keep.split(",")]
    args.modes = args.modes.split(",")
    for mode in args.modes:
        if mode not in ("offline", "server"):
            parser.error(f"--modes: {mode!r} is not offline or server")
    if args.requests < 1 or args.repeats < 1:
        parser.error(f"--requests={args.requests} and --repeats={args.repeats} must be at least 1")
    return args


def engine_args(args: argparse.Namespace) -> dict:
    if args.gpu:
        return {"dtype": "bfloat16", "max_model_len": 4096, "max_num_seqs": 256, "seed": 0}
    return {"dtype": "float32", "max_model_len": 1024, "max_num_seqs": args.requests, "enforce_eager": True, "seed": 0}


def settings(args: argparse.Namespace, n_visual: int) -> list[dict]:
    return [{"method": "none", "keep": n_visual}] + [{"method": args.method, "keep": k} for k in args.keeps]


def scene_requests(path: str, count: int) -> tuple[list[str], list]:
    from transformers import AutoProcessor

    from star.data.scenes import TYPES, scene_records
    from star.eval.runner import build_prompt

    processor = AutoProcessor.from_pretrained(path)
    records = scene_records("test", per_type=-(-count // len(TYPES)))[:count]
    return [build_prompt(processor, r.question) for r in records], records


def blocks(prompt_tokens: int, answer_tokens: int, block_size: int) -> int:
    return math.ceil((prompt_tokens + answer_tokens) / block_size)


def run_offline(args, path: str, overrides: dict, rows: list[dict]) -> list[dict]:
    from vllm import LLM, SamplingParams

    prompts, records = scene_requests(path, args.requests * (args.repeats + 1))
    llm = LLM(path, hf_overrides=overrides, disable_log_stats=False, **engine_args(args))
    block_size = llm.llm_engine.vllm_config.cache_config.block_size
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    results = []
    for setting in rows:
        requests = [
            {"prompt": p, "multi_modal_data": {"image": r.image}, "mm_processor_kwargs": {"star": setting}}
            for p, r in zip(prompts, records)
        ]
        bursts = []
        for repeat in range(args.repeats + 1):
            burst = requests[repeat * args.requests : (repeat + 1) * args.requests]
            start = time.perf_counter()
            outputs = llm.generate(burst, params, use_tqdm=False)
            wall = time.perf_counter() - start
            if repeat:
                bursts.append(_burst(wall, [len(o.prompt_token_ids) for o in outputs], [o.metrics.first_token_latency for o in outputs],
                                     [len(o.outputs[0].token_ids) for o in outputs], block_size))
        results.append(_row("offline", setting, bursts))
        print(json.dumps(results[-1]), flush=True)
    llm.llm_engine.engine_core.shutdown()
    return results


def run_server(args, path: str, overrides: dict, rows: list[dict]) -> list[dict]:
    import openai

    from star.eval.records import QUESTION_SUFFIX

    _, records = scene_requests(path, args.requests * (args.repeats + 1))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    engine = engine_args(args)
    command = [*SERVE, "--model", path, "--host", "127.0.0.1", "--port", str(port),
               "--hf-overrides", json.dumps(overrides), "--dtype", engine["dtype"], "--max-model-len", str(engine["max_model_len"]),
               "--max-num-seqs", str(engine["max_num_seqs"]), "--seed", "0", "--trust-request-mm-kwargs"]
    command += ["--enforce-eager"] if engine.get("enforce_eager") else []
    log = tempfile.NamedTemporaryFile("w", prefix="vllm-serve-", suffix=".log", delete=False)
    print(f"vllm serve's log: {log.name}", file=sys.stderr)
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=600)
    try:
        _wait(client, process)
        block_size = _block_size(port)
        images = [_image_url(r.image) for r in records]
        results = []
        for setting in rows:
            bursts = []
            for repeat in range(args.repeats + 1):
                burst = slice(repeat * args.requests, (repeat + 1) * args.requests)
                start = time.perf_counter()
                replies = _burst_requests(client, path, records[burst], images[burst], setting, args.max_tokens, QUESTION_SUFFIX, start)
                wall = time.perf_counter() - start
                if repeat:
                    bursts.append(_burst(wall, [r[0] for r in replies], [r[1] for r in replies], [r[2] for r in replies], block_size))
            results.append(_row("server", setting, bursts))
            print(json.dumps(results[-1]), flush=True)
        return results
    finally:  # the server's process group: its engine and worker processes stop with it
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=120)


def _burst_requests(client, model, records, images, setting, max_tokens, suffix, start) -> list[tuple[int, float, int]]:
    """Every request at once, one thread each, streamed: (prompt tokens, time to first token, answer tokens)."""
    replies: list = [None] * len(records)

    def ask(index: int) -> None:
        content = [{"type": "image_url", "image_url": {"url": images[index]}},
                   {"type": "text", "text": f"{records[index].question}\n{suffix}"}]
        stream = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": content}], max_tokens=max_tokens, temperature=0.0, stream=True,
            stream_options={"include_usage": True}, extra_body={"mm_processor_kwargs": {"star": setting}, "ignore_eos": True},
        )
        first, usage = None, None
        for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - start
            usage = chunk.usage or usage
        replies[index] = (usage.prompt_tokens, first, usage.completion_tokens)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(records))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return replies


def _burst(wall: float, prompt: list[int], ttft: list[float], answer: list[int], block_size: int) -> dict:
    return {
        "wall_s": wall, "requests_per_s": len(prompt) / wall, "prompt_tokens_per_s": sum(prompt) / wall,
        "ttft_s": statistics.median(ttft), "prompt_tokens": statistics.median(prompt),
        "kv_tokens": statistics.median(p + a for p, a in zip(prompt, answer)),
        "kv_blocks": statistics.median(blocks(p, a, block_size) for p, a in zip(prompt, answer)), "block_size": block_size,
    }


def _row(mode: str, setting: dict, bursts: list[dict]) -> dict:
    median = {key: statistics.median(b[key] for b in bursts) for key in bursts[0]}
    return {"mode": mode, "method": setting["method"], "keep": setting["keep"], "repeats": len(bursts), **median}


def _wait(client, process, timeout: float = 900) -> None:
    import openai

    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"vllm serve exited with {process.returncode}: see its log (printed at its start)")
        try:
            client.models.list()
            return
        except openai.APIConnectionError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"vllm serve did not answer within {timeout} s") from None
            time.sleep(2)


def _block_size(port: int) -> int:
    """The KV block size the server runs with, from its Prometheus cache-config gauge."""
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    line = next(line for line in text.splitlines() if line.startswith("vllm:cache_config_info"))
    return int(line.split('block_size="')[1].split('"')[0])


def _image_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def table(results: list[dict]) -> str:
    lines = [
        "| mode | setting | prompt tokens | requests/s | prompt tokens/s | TTFT (s) | KV cache / request: tokens (blocks) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in results:
        base = next(r for r in results if r["mode"] == row["mode"] and r["method"] == "none")
        name = "unpruned" if row["method"] == "none" else f"{row['method']} {row['keep']}"
        lines.append(
            f"| {row['mode']} | {name} | {row['prompt_tokens']:.0f} | {row['requests_per_s']:.2f} ({row['requests_per_s'] / base['requests_per_s']:.2f}x) "
            f"| {row['prompt_tokens_per_s']:.0f} | {row['ttft_s']:.2f} ({row['ttft_s'] / base['ttft_s']:.2f}x) "
            f"| {row['kv_tokens']:.0f} ({row['kv_blocks']:.0f} of {row['block_size']}) |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from star.integrations.vllm import hf_overrides
    from star.integrations.vllm.llava import n_visual
    from transformers import AutoConfig

    path = args.model
    if path is None:
        from star.zoo import build_default_model

        path = str(build_default_model())
    rows = settings(args, n_visual(AutoConfig.from_pretrained(path)))
    overrides = hf_overrides("none", rows[0]["keep"])
    results = []
    if "offline" in args.modes:
        results += run_offline(args, path, overrides, rows)
    if "server" in args.modes:
        results += run_server(args, path, overrides, rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {"command": " ".join(["scripts/bench_vllm.py", *(argv if argv is not None else sys.argv[1:])]), "model": path,
              "requests": args.requests, "max_tokens": args.max_tokens, "results": results}
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
