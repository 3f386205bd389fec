"""One decoder cut in vLLM (star.integrations.vllm.cut) on a small random LLaVA-1.5, against the Hugging Face path.

A cut is an engine's own setting, so each method runs in an engine of its own (`engine_args`). The reference is
`star.apply(..., positions="contiguous")` on the same checkpoint: the same greedy tokens and log-probabilities
(to 1e-4) for prompts with one and two images, in one batch with text-only prompts (which no cut touches) and
each alone, and over two tensor-parallel ranks. Every cut engine runs compiled, as `star serve` runs it. A child
process with an in-process engine (whose scheduler and model runner a test can read) checks the KV cache (the
dropped tokens holding no block; a preempted cut request recomputed, its prompt then its answer so far, to the
tokens it gives unpreempted) and the decode steps (vLLM's own forward, reading back nothing more than an engine
without a cut).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from engines import COMPILED, hf_generate, hf_model, tiny_llava_checkpoint, vllm_generate
from test_tiny_model import PICTURES, PROMPTS

# The tiny model: 16 patches per image, 4 decoder layers. STAR's stage 1 keeps 14, its cut before layer 2 keeps 5.
SETTINGS = [
    {"method": "star", "keep": 5},
    {"method": "fastv", "keep": 6},
    {"method": "dart", "keep": 6},
    {"method": "pdrop", "keep": 6, "layers": [1]},  # vLLM splits the 3 layers after this cut into 3 KV-cache groups
    {"method": "sparsevlm", "keep": 6, "layers": [1]},  # merges: its kept tokens carry recycled states
]
TEXT_ONLY = ["what color is the sky ? answer :", "say one word :"]
STEPS = 6


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return tiny_llava_checkpoint(tmp_path_factory.mktemp("tiny-llava-cut"))


@pytest.fixture(scope="module")
def hf(checkpoint) -> tuple:
    return hf_model(checkpoint)


@pytest.fixture(scope="module", params=SETTINGS, ids=lambda s: s["method"])
def engine(request, checkpoint):
    from vllm import LLM

    from star.integrations.vllm import engine_args

    setting = request.param
    options = {k: v for k, v in setting.items() if k not in ("method", "keep")}
    llm = LLM(checkpoint, max_model_len=512, limit_mm_per_prompt={"image": 2}, **{**COMPILED, **engine_args(setting["method"], setting["keep"], **options)})
    yield llm, setting
    llm.llm_engine.engine_core.shutdown()


def text_generate(hf: tuple, prompts: list[str], max_new_tokens: int) -> list[dict]:
    """The unpruned Hugging Face model on text-only prompts, one at a time, greedy."""
    model, processor = hf
    rows = []
    for prompt in prompts:
        inputs = processor.tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, output_scores=True, return_dict_in_generate=True)
        tokens = out.sequences[0, inputs["input_ids"].shape[1] :].tolist()
        logprobs = torch.stack(out.scores, dim=1)[0].float().log_softmax(dim=-1)
        rows.append({"tokens": tokens, "logprobs": [float(logprobs[i, t]) for i, t in enumerate(tokens)]})
    return rows


def _same(ours: dict, reference: dict) -> None:
    assert ours["tokens"] == reference["tokens"]
    assert max(abs(a - b) for a, b in zip(ours["logprobs"], reference["logprobs"])) < 1e-4, (ours["logprobs"], reference["logprobs"])


def test_a_mixed_batch_gives_the_hf_answers(engine, hf):
    """Image prompts (one and two images, cut) and text-only prompts (not cut) in one batch."""
    llm, setting = engine
    reference = hf_generate(hf, PROMPTS, PICTURES, setting, STEPS) + text_generate(hf, TEXT_ONLY, STEPS)
    ours = vllm_generate(llm, PROMPTS + TEXT_ONLY, PICTURES + [[]] * len(TEXT_ONLY), None, STEPS)
    for got, expected in zip(ours, reference):
        _same(got, expected)


def test_each_prompt_alone_gives_its_answer(engine, hf):
    llm, setting = engine
    reference = hf_generate(hf, PROMPTS, PICTURES, setting, STEPS)
    for row, prompt in enumerate(PROMPTS):
        [got] = vllm_generate(llm, [prompt], [PICTURES[row]], None, STEPS)
        _same(got, reference[row])


def test_the_cut_changes_the_answer(engine, hf):
    """The reference is not the vision stage alone: a test that could pass without the cut would prove nothing."""
    llm, setting = engine
    ours = vllm_generate(llm, PROMPTS, PICTURES, None, STEPS)
    vision_keep = {"star": 14}.get(setting["method"], 16)
    stage_one = hf_generate(hf, PROMPTS, PICTURES, {"method": "star-vision" if vision_keep < 16 else "none", "keep": vision_keep}, STEPS)
    assert any(o["logprobs"] != pytest.approx(s["logprobs"], abs=1e-3) for o, s in zip(ours, stage_one))


def test_a_request_with_another_setting_is_refused_and_the_engine_keeps_serving(engine, hf):
    llm, setting = engine
    with pytest.raises(ValueError, match=r"mm_processor_kwargs\['star'\].*this engine cuts inside the decoder with its own setting"):
        vllm_generate(llm, PROMPTS[:1], PICTURES[:1], {"method": "fastervlm", "keep": 5}, STEPS)
    [same] = vllm_generate(llm, PROMPTS[:1], PICTURES[:1], setting, STEPS)  # its own setting, given again, runs
    _same(same, hf_generate(hf, PROMPTS[:1], PICTURES[:1], setting, STEPS)[0])


def test_an_engine_without_the_cut_options_is_stopped_naming_them():
    """What the model checks when vLLM builds it (`check_engine`), on a stand-in of vLLM's config."""
    from star.integrations.vllm import CUT_ENGINE, parse_setting
    from star.integrations.vllm.cut import check_engine

    setting = parse_setting({"method": "star", "keep": 5}, 16, 4, "here", cuts=True)
    config = SimpleNamespace(
        scheduler_config=SimpleNamespace(scheduler_cls=None, enable_chunked_prefill=True),
        cache_config=SimpleNamespace(enable_prefix_caching=True, cache_dtype="auto"),
        model_config=SimpleNamespace(hf_text_config=SimpleNamespace(num_key_value_heads=3)),
        parallel_config=SimpleNamespace(tensor_parallel_size=1, pipeline_parallel_size=1),
        speculative_config=None,
    )
    with pytest.raises(ValueError, match="enable_chunked_prefill=True, enable_prefix_caching=True") as error:
        check_engine(config, setting)
    assert "scheduler_cls=None" in str(error.value) and "engine_args" in str(error.value)
    config.scheduler_config = SimpleNamespace(scheduler_cls=CUT_ENGINE["scheduler_cls"], enable_chunked_prefill=False)
    config.cache_config.enable_prefix_caching = False
    check_engine(config, setting)
    config.parallel_config.tensor_parallel_size = 2
    with pytest.raises(ValueError, match="tensor_parallel_size=2 with 3 key-value heads: the cut gathers every rank's heads"):
        check_engine(config, setting)
    config.parallel_config = SimpleNamespace(tensor_parallel_size=1, pipeline_parallel_size=2)
    with pytest.raises(ValueError, match="pipeline_parallel_size=2"):
        check_engine(config, setting)


def test_two_ranks_give_the_hf_answers(checkpoint, hf, monkeypatch):
    """Tensor parallelism: the decoder's heads split over 2 ranks (the cut gathers them for its scores), the vision
    tower whole on each (mm_encoder_tp_mode="data"). On a CPU vLLM binds each rank's threads to cores of its own."""
    from vllm import LLM

    from star.integrations.vllm import engine_args

    if not torch.cuda.is_available():
        monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    setting = SETTINGS[0]
    llm = LLM(checkpoint, max_model_len=512, limit_mm_per_prompt={"image": 2}, tensor_parallel_size=2, mm_encoder_tp_mode="data",
              **{**COMPILED, **engine_args(setting["method"], setting["keep"])})
    try:
        ours = vllm_generate(llm, PROMPTS + TEXT_ONLY, PICTURES + [[]] * len(TEXT_ONLY), None, STEPS)
    finally:
        llm.llm_engine.engine_core.shutdown()
    reference = hf_generate(hf, PROMPTS, PICTURES, setting, STEPS) + text_generate(hf, TEXT_ONLY, STEPS)
    for got, expected in zip(ours, reference):
        _same(got, expected)


# Five images of 16 patches: stage 1 keeps 5 x 14 = 70, the cut keeps 5 x 1, so D = 65 tokens are dropped.
# Per step the child records the scheduler's blocks per request and group, and, on the model runner (in the same
# process): the calls of the cut's own forward, the reads back to the host inside the model's forward, and those
# of the metadata builders of the two KV-cache groups (before the cut: vLLM's; after it: `cut_backend`'s).
CHILD = """
import json, os, sys
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process: its scheduler is readable
sys.path.insert(0, {tests!r})
from engines import COMPILED
from vllm import LLM, SamplingParams
from star.bench import host_reads
from star.integrations.vllm import engine_args

def spy(owner, name, record, key, reads=True):
    inner, record[key] = getattr(owner, name), [0, 0]
    def counted(*args, **kwargs):
        out = []
        count = sum(host_reads(lambda: out.append(inner(*args, **kwargs))).values()) if reads else (out.append(inner(*args, **kwargs)) or 0)
        record[key] = [record[key][0] + 1, record[key][1] + count]
        return out[0]
    setattr(owner, name, counted)

{pictures}
def main():
    llm = LLM({checkpoint!r}, max_model_len={max_len}, limit_mm_per_prompt={{"image": 5}}, block_size=32,
              num_gpu_blocks_override={blocks}, **{{**COMPILED, **engine_args({method!r}, {keep}, {architecture!r})}})
    engine = llm.llm_engine.engine_core.engine_core
    scheduler, runner = engine.scheduler, engine.model_executor.driver_worker.worker.model_runner
    managers = scheduler.kv_cache_manager.coordinator.single_type_managers
    cut = runner.model.decoder_cut
    compiled = [getattr(m, "aot_compiled_fn", None) is not None or m.compiled for m in (cut.before, cut.after)] if cut else None
    record = {{}}
    spy(runner.model, "forward", record, "model")
    if runner.model.decoder_cut is not None:
        spy(runner.model.decoder_cut, "forward", record, "cut", reads=False)  # inside the model's forward: counted there
    for group, groups in enumerate(runner.attn_groups):
        spy(groups[0].get_metadata_builder(), "build", record, f"builder {{group}}")
    params = SamplingParams(max_tokens={tokens}, temperature=0.0, ignore_eos=True)
    for i in range({requests}):
        llm.llm_engine.add_request(str(i), {{"prompt": {prompt!r}, "multi_modal_data": {{"image": pictures(i)}}}}, params)
    llm.llm_engine.add_request("text", {{"prompt": "what color is it ? answer :"}}, params)
    steps, probes, ended, preempted = [], [], {{}}, {{}}
    while llm.llm_engine.has_unfinished_requests():
        record.update({{key: [0, 0] for key in record}})
        for out in llm.llm_engine.step():
            if out.finished:
                ended[out.request_id] = [out.outputs[0].finish_reason, len(out.outputs[0].token_ids), len(out.prompt_token_ids),
                                         list(out.outputs[0].token_ids)]
        steps.append({{rid.split("-")[0]: [sum(not b.is_null for b in m.req_to_blocks.get(rid, [])) for m in managers]
                      for rid in scheduler.requests}})
        probes.append(dict(record))
        preempted.update({{rid.split("-")[0]: r.num_preemptions for rid, r in scheduler.requests.items()}})
    print("RESULT" + json.dumps({{"managers": [type(m).__name__ for m in managers], "steps": steps, "probes": probes,
                                  "ended": ended, "preempted": preempted, "compiled": compiled}}))

if __name__ == "__main__":
    main()
"""


# The requests of the tiny LLaVA: five images of 16 patches each.
LLAVA = dict(
    architecture="LlavaForConditionalGeneration", max_len=160, prompt="<image> <image> <image> <image> <image> what shape . answer :",
    pictures="from test_tiny_model import images\ndef pictures(i):\n    return images(10 + i, 5)\n",
)


def _child(checkpoint: str, blocks: int, requests: int, tokens: int, keep: int = 1, method: str = "star", family: dict = LLAVA) -> dict:
    """An in-process engine of `method` at `keep` on `family`'s requests (`requests` with images, one text-only) with
    `blocks` KV-cache blocks of 32 tokens, run to their ends: what CHILD prints."""
    code = CHILD.format(tests=str(Path(__file__).parent), checkpoint=checkpoint, blocks=blocks, requests=requests, tokens=tokens,
                        keep=keep, method=method, **family)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900, env=os.environ.copy())
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT")]
    assert run.returncode == 0 and lines, run.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT") :])


@pytest.fixture(scope="module")
def one_request(checkpoint) -> dict:
    """One cut request (5 images) and one text-only request, 4 tokens each, in a KV cache that preempts nothing."""
    return _child(checkpoint, blocks=256, requests=1, tokens=4)


def test_the_dropped_tokens_never_hold_a_block(one_request):
    """75 prompt tokens as vLLM counts them (70 image tokens, 5 others), 65 of them dropped by the cut: 3 blocks of
    32 before the cut, and from the start 1 after it (the 10 kept tokens, then the answer's)."""
    result = one_request
    assert result["managers"] == ["FullAttentionManager", "CutManager"]
    first, second = result["steps"][0], result["steps"][1]
    assert first["0"] == [3, 1] and second["0"] == [3, 1]
    assert first["text"] == [1, 1] and second["text"] == [1, 1]  # a text-only prompt keeps its blocks
    assert result["ended"]["0"][0] == "length" and result["ended"]["text"][0] == "length"
    assert result["ended"]["0"][2] == 75  # the prompt as vLLM holds it: 5 x 14 image tokens and 5 others


def test_the_layers_around_the_cut_compile_when_the_engine_starts(one_request):
    """Both layer ranges of a step that cuts are compiled by vLLM at its profile run, before any request."""
    assert one_request["compiled"] == [True, True]


def test_a_preempted_cut_request_gives_its_unpreempted_answer(checkpoint):
    """14 blocks for two groups: three 75-token prompts growing to 115 tokens (their cut keeping 5 x 5 image tokens)
    cannot all stay, so vLLM preempts one. Recomputed (its prompt first, then its answer so far), it finishes with
    the tokens it gives when nothing is preempted. Recomputed in one prefill, with its answer among the cut's
    scoring rows, it keeps other tokens and its answer changes (seen by turning the split off: this test fails)."""
    unpreempted = _child(checkpoint, blocks=256, requests=3, tokens=40, keep=5)
    result = _child(checkpoint, blocks=14, requests=3, tokens=40, keep=5)
    assert not any(unpreempted["preempted"].values())
    assert any(result["preempted"][rid] for rid in ("0", "1", "2")), result["preempted"]
    assert {rid: ended[0] for rid, ended in result["ended"].items()} == dict.fromkeys(["0", "1", "2", "text"], "length")
    for rid, ended in unpreempted["ended"].items():
        assert result["ended"][rid][3] == ended[3], rid


def test_a_step_that_cuts_nothing_is_vllms_own_forward_reading_nothing_more(checkpoint, one_request):
    """The first step prefills both prompts and cuts the one with images (the cut's forward runs once). Every later
    step only decodes: the cut's forward does not run, the model's forward (vLLM's, compiled) reads back exactly
    what the same step of an engine without a cut reads (the CPU backend's matrix products read their own shapes),
    and the cut group's metadata builder reads back nothing more than vLLM's builder of the group before the cut."""
    uncut = _child(checkpoint, blocks=256, requests=1, tokens=4, method="star-vision")
    first, *decoding = one_request["probes"]
    assert first["cut"] == [1, 0] and len(decoding) == len(uncut["probes"]) - 1 >= 2
    for step, (probe, reference) in enumerate(zip(decoding, uncut["probes"][1:]), start=1):
        assert probe["cut"] == [0, 0], step
        assert probe["model"] == reference["model"], step
        assert probe["builder 1"] == [1, probe["builder 0"][1]] and probe["builder 0"] == reference["builder 0"], step
