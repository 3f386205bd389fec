"""Serving throughput with the vLLM plugin: unpruned against pruned images, offline (`LLM.generate`) and through
`vllm serve` with the OpenAI client, in one run; STAR's two stages (its decoder cut) beside its vision stage alone.

    .venv-vllm/bin/python scripts/bench_vllm.py                      # the CPU table of docs/results.md
    .venv-vllm/bin/python scripts/bench_vllm.py --gpu --model llava-hf/llava-1.5-7b-hf --keep 288,115,58,29 --requests 256

Each burst is N scene questions (one image each), every request submitted at once, so that the engine batches
them; every burst has images of its own (so no encoder or prefix cache serves one burst from another), and every
setting serves the same bursts. A setting is timed after a warm-up burst of its engine, `--repeats` times; the
table gives medians, and each row's ratio to the unpruned row of the same mode.

Rows, per mode. `unpruned` and `--method` (star-vision: STAR's vision stage alone) at each `--keep` share one
engine, each setting as the requests' own `mm_processor_kwargs`; the unpruned row is the plugin's `none` setting
in that engine. `--cut-method` (star: `star (two stages)`) at each `--keep` prunes inside the decoder as well,
which vLLM serves only as an engine's own setting: each budget gets an engine of its own (one per mode, each shut
down before the next starts), with the options a cut needs (`star.integrations.vllm.engine_args`: its scheduler,
no chunked prefill, no prefix caching, eager execution; the shared engine keeps vLLM's defaults, and on a GPU its
CUDA graphs). The layers after a cut run on vLLM's own attention backend. STAR's two stages end with the same visual tokens per image as star-vision at the same `--keep`
(its vision stage keeps more, its cut the rest), so a cut row also gives its ratio to that row of its mode.

Columns: prompt tokens as vLLM counts them (a cut row's vision-stage count, e.g. 27 text + 167 of 196 image
tokens for STAR on the default model, and in brackets what the layers after its cut keep); requests/s and prompt
tokens/s over the burst's wall time; time to first token (median over the burst's requests: the engine's own
`first_token_latency` offline, the first streamed chunk for the server); the KV cache a request holds at its end,
computed from its token counts, not read from the engine: its tokens (prompt + answer, as vLLM counts them) and
the blocks of vLLM's paged allocation, ceil(tokens / block size) with every request's image being different. A
cut engine's KV cache is two groups, the layers before the cut and the layers after it, given as
`before + after = sum`: the group before holds ceil(tokens / block) blocks, the group after ceil((tokens - D) /
block), D the tokens the cut dropped (images x (vision-stage count - keep)), which never hold a block there. A block of a one-group engine holds every layer's KV for its tokens and a block of a cut
engine only its group's layers, so across engines compare the MiB column: blocks x block size x the group's layers
x K and V per token and layer (key-value heads x head size, the engine's dtype). vLLM makes its groups of equal
layer counts: STAR's cut at the middle layer gives exactly the two; a cut at layer 2 (FastV, DART) gives one group
before and 14 alike after it on a 30-layer decoder, each holding the blocks given for "after", which the sum
counts once (the MiB column counts every layer). On a CPU vLLM reserves its KV cache up front:
VLLM_CPU_KVCACHE_SPACE (GiB), 2 here unless set.
"""

from __future__ import annotations

import argparse
import base64
import gc
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
from dataclasses import dataclass
from pathlib import Path


# `vllm serve`'s server by its module: vllm-cpu 0.32.0's `vllm` command fails before parsing (it reads the version
# of a distribution named "vllm"; this one is "vllm-cpu"). The module runs the same server with the same arguments.
SERVE = [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
MIB = 2**20
IMAGES = 1  # images per request: every scene question shows one


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    summary, _, method = __doc__.partition("\n\n")
    parser = argparse.ArgumentParser(description=summary, epilog=method, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint directory or hub name (default: the project's default model)")
    parser.add_argument("--method", default="star-vision", help="the vision-side method of the pruned rows, served per request by one engine (default star-vision)")
    parser.add_argument("--cut-method", default="star",
                        help="the method of the rows that also prune inside the decoder (one cut; LLaVA-1.5 only), served as an engine's own "
                             "setting, one engine per budget per mode: star (default; rows 'star (two stages)'), fastv or dart; "
                             "none: no such rows")
    parser.add_argument("--keep", default="98,39,20", help="budgets of the pruned rows, visual tokens per image after all pruning, comma-separated (default 98,39,20)")
    parser.add_argument("--requests", type=int, default=16, help="requests per burst (default 16)")
    parser.add_argument("--repeats", type=int, default=3, help="timed bursts per setting after one warm-up (default 3)")
    parser.add_argument("--max-tokens", type=int, default=8, help="answer tokens per request (default 8)")
    parser.add_argument("--modes", default="offline,server", help="offline, server or both (default both)")
    parser.add_argument("--gpu", action="store_true", help="bfloat16, CUDA graphs (not in a cut engine) and a larger batch (a GPU machine with vllm installed)")
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
    # 32-token blocks, the CPU backend's smallest (its default is 128): the blocks the cut saves show at these sizes
    return {"dtype": "float32", "max_model_len": 1024, "max_num_seqs": args.requests, "enforce_eager": True, "seed": 0, "block_size": 32}


@dataclass
class Engine:
    """One engine of a mode and the settings it serves: `star` (the plugin's engine_args: hf_overrides, and a cut's
    engine options) and its rows; `per_request`: each row's setting goes with its requests (else it is the
    engine's own); `cut`: the engine's decoder cut (layer, vision-stage count, tokens it drops per image)."""

    star: dict
    rows: list[dict]
    per_request: bool
    cut: dict | None = None
    layers: tuple[int, ...] = ()  # the decoder layers of each KV-cache group


def engines(args: argparse.Namespace, config) -> list[Engine]:
    """The shared engine (unpruned and --method, per request), then one engine per --keep for --cut-method."""
    from star.integrations.vllm import engine_args as star_engine_args
    from star.integrations.vllm import hf_overrides, parse_setting
    from star.integrations.vllm import n_visual, num_layers

    n, layers = n_visual(config), num_layers(config)
    rows = [{"method": "none", "keep": n}] + [{"method": args.method, "keep": k} for k in args.keeps]
    shared = Engine({"hf_overrides": hf_overrides("none", n)}, rows, per_request=True, layers=(layers,))
    if args.cut_method == "none":
        return [shared]
    architecture = (config.architectures or ["?"])[0]
    if architecture != "LlavaForConditionalGeneration":
        raise SystemExit(f"--cut-method {args.cut_method}: the plugin serves a decoder cut on LLaVA-1.5 only, not {architecture}; "
                         "--cut-method none runs the other rows")
    cuts = []
    for keep in args.keeps:
        raw = {"method": args.cut_method, "keep": keep}
        setting = parse_setting(raw, n, layers, f"--cut-method {args.cut_method} --keep {keep}", cuts=True)
        if setting.cut is None:
            raise SystemExit(f"--cut-method {args.cut_method} at --keep {keep} does not prune inside this model's decoder: "
                             "a vision-side setting belongs in --method")
        layer = setting.cut.layer
        cut = {"layer": layer, "vision_keep": setting.keep, "dropped_per_image": setting.keep - setting.cut.keep}
        cuts.append(Engine(star_engine_args(args.cut_method, keep, architecture), [raw], per_request=False, cut=cut, layers=(layer, layers - layer)))
    return [shared, *cuts]


def label(row: dict) -> str:
    if row["method"] == "none":
        return "unpruned"
    if row.get("cut"):
        return f"{row['method']} ({'two stages' if row['method'] == 'star' else 'decoder cut'}) {row['keep']}"
    return f"{row['method']} {row['keep']}"


def scene_requests(path: str, count: int) -> tuple[list[str], list]:
    from transformers import AutoProcessor

    from star.data.scenes import TYPES, scene_records
    from star.eval.runner import build_prompt

    processor = AutoProcessor.from_pretrained(path)
    records = scene_records("test", per_type=-(-count // len(TYPES)))[:count]
    return [build_prompt(processor, r.question) for r in records], records


def kv_blocks(prompt_tokens: int, answer_tokens: int, block_size: int, dropped: int | None = None) -> tuple[int, ...]:
    """The blocks of each KV-cache group a request holds at its end, from its token counts (prompt as vLLM counts
    it): one group without a cut (`dropped` None); with a cut that dropped `dropped` tokens, the group before the
    cut, and the group after it, which holds the kept tokens alone (`cut_blocks`)."""
    from star.integrations.vllm.cut import cut_blocks

    held = math.ceil((prompt_tokens + answer_tokens) / block_size)
    if dropped is None:
        return (held,)
    return (held, cut_blocks(prompt_tokens + answer_tokens, dropped, block_size))


def kv_bytes_per_token_layer(config, dtype: str) -> int:
    """K and V of one token in one decoder layer: 2 x key-value heads x head size x the dtype's bytes."""
    text = config.text_config
    head = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return 2 * text.num_key_value_heads * head * DTYPE_BYTES[dtype]


def run_offline(args, path: str, engine: Engine, kv_unit: int) -> list[dict]:
    from vllm import LLM, SamplingParams

    prompts, records = scene_requests(path, args.requests * (args.repeats + 1))
    llm = LLM(path, disable_log_stats=False, **{**engine_args(args), **engine.star})
    try:
        block_size = llm.llm_engine.vllm_config.cache_config.block_size
        params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
        results = []
        for setting in engine.rows:
            own = {"mm_processor_kwargs": {"star": setting}} if engine.per_request else {}
            requests = [{"prompt": p, "multi_modal_data": {"image": r.image}, **own} for p, r in zip(prompts, records)]
            bursts = []
            for repeat in range(args.repeats + 1):
                burst = requests[repeat * args.requests : (repeat + 1) * args.requests]
                start = time.perf_counter()
                outputs = llm.generate(burst, params, use_tqdm=False)
                wall = time.perf_counter() - start
                answers = [len(o.outputs[0].token_ids) for o in outputs]
                _check_answers(answers, [o.outputs[0].finish_reason for o in outputs], args.max_tokens, setting)
                if repeat:
                    bursts.append(_burst(wall, [len(o.prompt_token_ids) for o in outputs], [o.metrics.first_token_latency for o in outputs],
                                         answers, block_size, engine, kv_unit))
            results.append(_row("offline", setting, engine, bursts))
            print(json.dumps(results[-1]), flush=True)
        return results
    finally:  # the engine core's process ends here, its KV cache with it, before the next engine starts
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def run_server(args, path: str, engine: Engine, kv_unit: int) -> list[dict]:
    import openai

    from star.eval.records import QUESTION_SUFFIX
    from star.integrations.vllm import server_flags

    _, records = scene_requests(path, args.requests * (args.repeats + 1))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [*SERVE, "--model", path, "--host", "127.0.0.1", "--port", str(port), *server_flags({**engine_args(args), **engine.star})]
    command += ["--trust-request-mm-kwargs"] if engine.per_request else []
    log = tempfile.NamedTemporaryFile("w", prefix="vllm-serve-", suffix=".log", delete=False)
    print(f"vllm serve's log: {log.name}", file=sys.stderr)
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=600)
    try:
        _wait(client, process)
        block_size = _block_size(port)
        images = [_image_url(r.image) for r in records]
        results = []
        for setting in engine.rows:
            own = setting if engine.per_request else None
            bursts = []
            for repeat in range(args.repeats + 1):
                burst = slice(repeat * args.requests, (repeat + 1) * args.requests)
                start = time.perf_counter()
                replies = _burst_requests(client, path, records[burst], images[burst], own, args.max_tokens, QUESTION_SUFFIX, start)
                wall = time.perf_counter() - start
                _check_answers([r[2] for r in replies], [r[3] for r in replies], args.max_tokens, setting)
                if repeat:
                    bursts.append(_burst(wall, [r[0] for r in replies], [r[1] for r in replies], [r[2] for r in replies], block_size, engine, kv_unit))
            results.append(_row("server", setting, engine, bursts))
            print(json.dumps(results[-1]), flush=True)
        return results
    finally:  # the server's process group: its engine and worker processes stop with it, before the next starts
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=120)


def _burst_requests(client, model, records, images, setting, max_tokens, suffix, start) -> list[tuple[int, float, int, str]]:
    """Every request at once, one thread each, streamed: (prompt tokens, time to first token, answer tokens, finish
    reason). `setting`: the requests' own (`mm_processor_kwargs`), or None for the engine's."""
    replies: list = [None] * len(records)
    extra = {"ignore_eos": True, **({"mm_processor_kwargs": {"star": setting}} if setting is not None else {})}

    def ask(index: int) -> None:
        content = [{"type": "image_url", "image_url": {"url": images[index]}},
                   {"type": "text", "text": f"{records[index].question}\n{suffix}"}]
        stream = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": content}], max_tokens=max_tokens, temperature=0.0, stream=True,
            stream_options={"include_usage": True}, extra_body=extra,
        )
        first, usage, finish = None, None, None
        for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - start
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
            usage = chunk.usage or usage
        replies[index] = (usage.prompt_tokens, first, usage.completion_tokens, finish)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(records))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if None in replies:
        raise RuntimeError(f"{replies.count(None)} of {len(replies)} streamed requests failed (their threads' errors are above)")
    return replies


def _check_answers(answers: list[int], reasons: list, max_tokens: int, setting: dict) -> None:
    """Every answer as long as asked (ignore_eos): a shorter one ended early, e.g. a cut request that vLLM preempted
    (its scheduler ends it with an error rather than recomputing it), which would make the burst look faster."""
    short = [(a, r) for a, r in zip(answers, reasons) if a != max_tokens]
    if short:
        raise RuntimeError(f"{setting}: {len(short)} of {len(answers)} answers ended before {max_tokens} tokens "
                           f"(tokens, finish reason: {short[:4]}); a cut request ends so when its KV cache runs short")


def _burst(wall: float, prompt: list[int], ttft: list[float], answer: list[int], block_size: int, engine: Engine, kv_unit: int) -> dict:
    dropped = IMAGES * engine.cut["dropped_per_image"] if engine.cut else None
    groups = [kv_blocks(p, a, block_size, dropped) for p, a in zip(prompt, answer)]
    burst = {
        "wall_s": wall, "requests_per_s": len(prompt) / wall, "prompt_tokens_per_s": sum(prompt) / wall,
        "ttft_s": statistics.median(ttft), "prompt_tokens": statistics.median(prompt),
        "kv_tokens": statistics.median(p + a for p, a in zip(prompt, answer)),
        "kv_blocks": statistics.median(sum(g) for g in groups), "block_size": block_size,
        "kv_mib": statistics.median(sum(b * block_size * n * kv_unit for b, n in zip(g, engine.layers)) / MIB for g in groups),
    }
    if engine.cut:
        burst["prompt_tokens_after_cut"] = statistics.median(p - dropped for p in prompt)
        burst["kv_blocks_before_cut"] = statistics.median(g[0] for g in groups)
        burst["kv_blocks_after_cut"] = statistics.median(g[1] for g in groups)
    return burst


def _row(mode: str, setting: dict, engine: Engine, bursts: list[dict]) -> dict:
    median = {key: statistics.median(b[key] for b in bursts) for key in bursts[0]}
    row = {"mode": mode, "method": setting["method"], "keep": setting["keep"], "repeats": len(bursts), **median}
    if engine.cut:
        row.update(cut=engine.cut, kv_group_layers=list(engine.layers),
                   engine_options={k: v for k, v in engine.star.items() if k != "hf_overrides"})
    return row


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


def table(results: list[dict], vision_method: str = "star-vision") -> str:
    """The markdown table: per mode the unpruned row, then per budget the vision-side row and the cut row."""
    lines = [
        f"| mode | setting | prompt tokens | requests/s (x unpruned; x {vision_method}) | prompt tokens/s | TTFT (s) (x unpruned; x {vision_method}) "
        "| KV cache / request: tokens; blocks (before + after cut = sum) of block size; MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    modes = list(dict.fromkeys(r["mode"] for r in results))
    keeps = list(dict.fromkeys(r["keep"] for r in results if r["method"] != "none"))
    order = sorted(results, key=lambda r: (modes.index(r["mode"]), r["method"] != "none", keeps.index(r["keep"]) if r["method"] != "none" else 0, bool(r.get("cut"))))
    for row in order:
        base = next(r for r in results if r["mode"] == row["mode"] and r["method"] == "none")
        vision = next((r for r in results if r["mode"] == row["mode"] and r["method"] == vision_method and r["keep"] == row["keep"] and not r.get("cut")), None)

        def cell(key: str, digits: int) -> str:
            ratios = f"{row[key] / base[key]:.2f}x" + (f"; {row[key] / vision[key]:.2f}x" if row.get("cut") and vision else "")
            return f"{row[key]:.{digits}f} ({ratios})"

        if row.get("cut"):
            prompt = f"{row['prompt_tokens']:.0f} ({row['prompt_tokens_after_cut']:.0f} after the cut)"
            held = f"{row['kv_blocks_before_cut']:.0f} + {row['kv_blocks_after_cut']:.0f} = {row['kv_blocks']:.0f}"
        else:
            prompt, held = f"{row['prompt_tokens']:.0f}", f"{row['kv_blocks']:.0f}"
        lines.append(
            f"| {row['mode']} | {label(row)} | {prompt} | {cell('requests_per_s', 2)} | {row['prompt_tokens_per_s']:.0f} | {cell('ttft_s', 2)} "
            f"| {row['kv_tokens']:.0f}; {held} of {row['block_size']}; {row['kv_mib']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from transformers import AutoConfig

    path = args.model
    if path is None:
        from star.zoo import build_default_model

        path = str(build_default_model())
    config = AutoConfig.from_pretrained(path)
    plan = engines(args, config)
    kv_unit = kv_bytes_per_token_layer(config, engine_args(args)["dtype"])
    record = {"command": " ".join(["scripts/bench_vllm.py", *(argv if argv is not None else sys.argv[1:])]), "model": path,
              "requests": args.requests, "max_tokens": args.max_tokens, "method": args.method, "cut_method": args.cut_method,
              "kv_cache_gib": None if args.gpu else os.environ["VLLM_CPU_KVCACHE_SPACE"], "results": []}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for mode, run in (("offline", run_offline), ("server", run_server)):
        if mode in args.modes:
            for engine in plan:  # one at a time: each is shut down before the next starts
                record["results"] += run(args, path, engine, kv_unit)
                args.out.write_text(json.dumps(record, indent=1) + "\n")  # what has run so far, should a later engine fail
    print(table(record["results"], args.method))


if __name__ == "__main__":
    main()
