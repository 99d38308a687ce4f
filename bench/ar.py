"""GLM-Image's AR stage: ms per sampled token, plain generate() against the fast path on one GPU, and the fast path
tensor-parallel over N GPUs, in one run.

    python3 bench/ar.py --out bench/results/glm_ar_h200.json                     # full size, CUDA, bf16
    python3 bench/ar.py --tp 2 --out bench/results/glm_ar_h200x2.json            # + tensor-parallel over 2 GPUs
    python3 bench/ar.py --scale tiny --device cpu --tp 2 --out /tmp/glm_ar_cpu.json   # checks the script itself

The AR decoder is built at full size with random weights (text decoder hidden 4096, 40 layers, 32 heads / 2 KV
heads, FFN 13696, vocab 168064, vision vocab 16512; matrices N(0, 0.02) from --seed; the vision tower small, as
text-to-image never runs it) with the tiny AR's tokenizer and processor (token ids only need to be valid). A prompt
of exactly --prompt-tokens tokens goes through the processor as the AR stage sends it (target grid large enough for
--new-tokens decode positions), and both paths sample --new-tokens tokens with the AR stage's call (do_sample=True,
the model's generation config, a per-token stopping criterion like the stage's progress report):

  (a) plain   model.generate(), its default dynamic KV cache
  (b) fast    models/glm_image/ar_decode.py: static KV cache, compiled (CUDA-graphed) decode step
  (c) --tp N  (b) with the decoder sharded over N GPUs (models/glm_image/plan.py), rank 0 deciding every token

For each: the first call (for (b): compilation and CUDA-graph capture), then the median of --repeats timed calls after
--warmup, all with the same seed; the prefill alone (1 new token) is timed too, so decode ms/token excludes it. The
end token is set outside the sampled range, so every call samples exactly --new-tokens tokens.

Agreement (bf16 on a GPU: compiled kernels round differently from eager ones, so exact equality is not expected):
greedy decoding free-running (identical prefix), and teacher-forced (the fast path's argmax at every step given the
plain path's greedy tokens, with the logit gap where they differ, and the top1-top2 gap for scale); sampled tokens:
repeats with one seed identical per path, and the identical prefix between the paths. Where the time goes: the
decode step alone (step_ms: the compiled forward replayed, no sampling or host loop) and the time to read the
weights once at the GPU's measured copy bandwidth (weight_read_bound).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import (GlmImageConfig, GlmImageForConditionalGeneration, LogitsProcessor, LogitsProcessorList,
                          StoppingCriteria, StoppingCriteriaList)

from comfyui_parallel_diffusion.models import loading
from comfyui_parallel_diffusion.models.glm_image import ar_decode, tiny
from comfyui_parallel_diffusion.models.glm_image import plan as glm_plan
from comfyui_parallel_diffusion.parallel import Layout
from comfyui_parallel_diffusion.parallel.comm import Comm
from comfyui_parallel_diffusion.parallel.group import free_port
from comfyui_parallel_diffusion.parallel.worker import join_process_group

BENCH = Path(__file__).resolve().parent
# GLM-Image's AR text decoder (shared/design.md); GLM-4 style: qkv bias, partial rotary 0.5, 3D rope 8/12/12
FULL_TEXT = dict(hidden_size=4096, num_hidden_layers=40, num_attention_heads=32, num_key_value_heads=2, head_dim=128,
                 intermediate_size=13696, vocab_size=168064, vision_vocab_size=16512, attention_bias=True,
                 rms_norm_eps=1e-5, max_position_embeddings=131072,
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 12, 12],
                                  "partial_rotary_factor": 0.5})
SMALL_VISION = dict(depth=1, hidden_size=64, num_heads=2, image_size=64, patch_size=16, intermediate_size=128,
                    spatial_merge_size=1)
SMALL_VQ = dict(embed_dim=16, num_embeddings=16384, latent_channels=64)
TARGET_MS_PER_TOKEN, TARGET_SPEEDUP, TARGET_TP2_MS_PER_TOKEN = 6.0, 4.0, 3.5  # on H200s (the issue)


def main(argv=None) -> None:
    args = _parser().parse_args(argv)
    if args.tp == 1:
        _rank_main(0, args)
        return
    import torch.multiprocessing as mp

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))  # as the worker group's host does
    mp.spawn(_rank_main, args=(args,), nprocs=args.tp)


def _rank_main(rank: int, args) -> None:
    """One process per GPU. Every rank builds the same full model (same seed); rank 0 measures the 1-GPU paths while
    the others wait, then, with --tp N, every rank shards the decoder and the tensor-parallel path is measured."""
    started = time.perf_counter()
    inductor = _inductor_config(args.inductor_config)
    comm = None
    if args.tp > 1:  # the worker group's own rendezvous and process groups
        device = join_process_group(args.device, rank, args.tp)
        comm = Comm(Layout.for_world(args.tp), rank, device, distributed=True)
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    main_rank = rank == 0
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    out = Path(args.out or BENCH / "results" / f"glm_ar_{re.sub(r'[^a-z0-9]+', '_', gpu.lower()).strip('_')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)

    processor, tokenizer = tiny._processor()
    t0 = time.perf_counter()
    model = _build(args.scale, tokenizer, device, dtype, args.seed, args.layers)
    build_s = time.perf_counter() - t0
    _sampling(model, args, tokenizer)
    inputs = _inputs(processor, args.prompt_tokens, args.new_tokens, device)
    compile_on = {"auto": device.type == "cuda", "on": True, "off": False}[args.compile]
    compile_options = dict(compile=compile_on, backend=args.compile_backend, mode=args.compile_mode or None)
    gen = model.generation_config
    result = {
        "benchmark": "glm_image_ar", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
        "device": str(device), "gpu": gpu, "gpus": args.tp, "torch": torch.__version__, "cuda": torch.version.cuda,
        "transformers": transformers.__version__, "command": " ".join(sys.argv), "inductor_config": inductor,
        "model": {"scale": args.scale, "dtype": str(dtype).removeprefix("torch."),
                  "text_decoder_params_b": round(_text_params(model) / 1e9, 3),
                  "text_config": {k: getattr(model.config.text_config, k) for k in FULL_TEXT},
                  "weights": (f"random: matrices N(0, 0.02), seed {args.seed}" if args.scale == "full"
                              else "models/glm_image/tiny.py's"), "build_s": round(build_s, 1),
                  "attn_implementation": model.config.text_config._attn_implementation},
        "workload": {"batch": 1, "prompt_tokens": inputs["input_ids"].shape[1], "new_tokens": args.new_tokens,
                     "grids": inputs["image_grid_thw"].tolist(), "seed": args.seed,
                     "sampling": {"do_sample": True, "temperature": gen.temperature, "top_k": gen.top_k,
                                  "top_p": gen.top_p, "eos_token_id": gen.eos_token_id}},
        "targets": {"ms_per_token_max": TARGET_MS_PER_TOKEN, "speedup_min": TARGET_SPEEDUP,
                    "tensor_parallel_2_ms_per_token_max": TARGET_TP2_MS_PER_TOKEN},
    }

    def save(phase):
        if not main_rank:
            return
        result["phase_done"] = phase
        result["elapsed_s"] = round(time.perf_counter() - started, 1)
        if device.type == "cuda":
            result["max_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"[{result['elapsed_s']:7.1f}s] {phase}", flush=True)

    from torch._dynamo.utils import counters

    if main_rank:  # the 1-GPU paths, side by side
        save("built")
        if device.type == "cuda":
            result["weight_read_bound"] = _weight_read_bound(model, device)
        decoder = ar_decode.FastDecoder(model, **compile_options)
        bench = _Bench(model, decoder, inputs, args, device)
        result["plain_generate"], plain_tokens = bench.measure("plain")
        save("plain timed")
        counters.clear()
        result["fast"], fast_tokens = bench.measure("fast")
        result["fast"].update(_compile_report(decoder, counters, compile_options), step_ms=_step_ms(decoder))
        if args.profile:
            result["fast"]["step_profile"] = _step_profile(decoder)
        plain, fast = result["plain_generate"], result["fast"]
        result["speedup"] = round(plain["ms_per_token"] / fast["ms_per_token"], 2)
        result["decode_speedup"] = round(plain["decode_ms_per_token"] / fast["decode_ms_per_token"], 2)
        result["sampled"] = {"plain_vs_fast": _agreement(plain_tokens, fast_tokens)}
        result["targets"].update(ms_per_token_met=fast["ms_per_token"] <= TARGET_MS_PER_TOKEN,
                                 speedup_met=result["speedup"] >= TARGET_SPEEDUP)
        save("fast timed")
        print(f"plain {plain['ms_per_token']:.2f} ms/token, fast {fast['ms_per_token']:.2f} ms/token "
              f"(first call {fast['first_call_s']:.1f} s): {result['speedup']:.2f}x", flush=True)
        result["greedy"], plain_greedy = bench.greedy()
        save("greedy checked")
        del decoder, bench

    if comm is not None:
        comm.all_gather_object(None)  # the other ranks waited for the 1-GPU paths
        if main_rank:
            print(f"tensor-parallel x{args.tp}: sharding, compiling, measuring", flush=True)
        model.__dict__.pop(ar_decode._ATTR, None)
        comm.make_group(ar_decode.TP_GROUP, range(args.tp))  # the group the plan shards over (all ranks)
        glm_plan.apply_ar_tensor_parallel(model, comm)
        decoder = ar_decode.FastDecoder(model, comm=comm, **compile_options)
        bench = _Bench(model, decoder, inputs, args, device)
        counters.clear()
        tp, tp_tokens = bench.measure("fast")
        tp.update(_compile_report(decoder, counters, compile_options), step_ms=_step_ms(decoder))
        if args.profile:
            tp["step_profile"] = _step_profile(decoder, comm)
        reference = comm.broadcast_object(plain_greedy if main_rank else None)
        greedy = bench.greedy_against(reference.to(device))
        if main_rank:
            tp["speedup_vs_1gpu_fast"] = round(result["fast"]["ms_per_token"] / tp["ms_per_token"], 2)
            tp["sampled_vs_1gpu_fast"] = _agreement(fast_tokens, tp_tokens)
            tp["greedy_vs_plain"] = greedy
            result[f"tensor_parallel_{args.tp}"] = tp
            if args.tp == 2:
                result["targets"]["tensor_parallel_2_met"] = tp["ms_per_token"] <= TARGET_TP2_MS_PER_TOKEN
            save("tensor-parallel timed")
            print(f"tensor-parallel x{args.tp}: {tp['ms_per_token']:.2f} ms/token", flush=True)
        del decoder, bench
    del model

    too_late = comm.broadcast_object(time.perf_counter() - started > args.exact_after_s) if comm else (
        time.perf_counter() - started > args.exact_after_s)
    if not (args.exact_layers or args.scale == "tiny"):
        result["exact_float32"] = "skipped (--exact-layers 0)"
    elif too_late:
        result["exact_float32"] = f"skipped: more than {args.exact_after_s:.0f} s had passed (--exact-after-s)"
    else:
        result["exact_float32"] = _exactness(args, processor, tokenizer, device, comm)
        save("float32 exactness checked")
    save("done")
    if main_rank:
        print(json.dumps({k: result.get(k) for k in ("speedup", "decode_speedup", "greedy", "exact_float32",
                                                     "targets")}, indent=2))
    if comm is not None:  # without it, NCCL's teardown at exit kept the processes alive for minutes
        import torch.distributed as dist

        comm.all_gather_object(None)
        dist.destroy_process_group()


def _inductor_config(settings: list[str]) -> dict:
    """--inductor-config KEY=VALUE settings applied to torch._inductor.config (values parsed as JSON), for trying a
    compiler setting against the default in separate runs; returns them for the JSON."""
    import torch._inductor.config as config

    applied = {key: json.loads(value) for key, _, value in (s.partition("=") for s in settings)}
    config.load_config(applied)
    return applied


def _compile_report(decoder, counters, options: dict) -> dict:
    return dict(compiled=bool(decoder.slots) and all(s.compiled for s in decoder.slots.values()),
                compile_errors=decoder.compile_errors, cache_len=[s.length for s in decoder.slots.values()],
                graph_breaks=dict(counters["graph_break"]), unique_graphs=counters["stats"].get("unique_graphs", 0),
                compile=dict(enabled=options["compile"], backend=options["backend"], mode=options["mode"]))


def _replay_args(decoder, replays: int) -> tuple | None:
    """The compiled step's arguments on its CUDA slot, if it has room for `replays` more positions (each replay
    writes one; the next request resets them); None where there is nothing compiled to replay."""
    slot = next(iter(decoder.slots.values()), None)
    if slot is None or not slot.compiled or slot.ids.device.type != "cuda":
        return None
    if slot.length - int(slot.cache.get_seq_length()) < replays:
        return None
    return slot.ids, slot.positions, slot.mask, slot.cache


def _step_ms(decoder, steps: int = 50) -> float | None:
    """The decode step alone (the compiled forward replayed on its slot's buffers: no sampling, no host loop), ms."""
    args = _replay_args(decoder, steps + 5)
    if args is None:
        return None
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.no_grad():  # as generate() runs it: no recompile
        for i in range(steps + 5):
            if i == 5:
                start.record()
            torch.compiler.cudagraph_mark_step_begin()
            decoder._compiled(*args)
        end.record()
        end.synchronize()
    return round(start.elapsed_time(end) / steps, 3)


def _step_profile(decoder, comm=None, steps: int = 50, top: int = 25) -> dict | None:
    """Where a decode step's time goes: the compiled step replayed under torch.profiler, its CUDA kernels grouped by
    name (us per step, launches per step); against step_ms, the rest of a step is gaps between kernels."""
    args = _replay_args(decoder, steps + 5)
    if args is None:
        return None
    from torch.profiler import ProfilerActivity, profile

    def replay(n):
        for _ in range(n):
            torch.compiler.cudagraph_mark_step_begin()
            decoder._compiled(*args)
        torch.cuda.synchronize()

    with torch.no_grad():
        replay(5)
        if comm is not None:  # start together: a rank that waits for another would count it as collective time
            comm.all_gather_object(None)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            replay(steps)
    kernels: dict[str, list[float]] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            kernels.setdefault(event.name, []).append(event.device_time)
    total = sum(sum(v) for v in kernels.values()) / steps
    rows = sorted(kernels.items(), key=lambda kv: -sum(kv[1]))
    return {"steps": steps, "kernel_us_per_step": round(total, 1),
            "launches_per_step": round(sum(len(v) for v in kernels.values()) / steps, 1),
            "by_kernel": [{"name": name[:120], "us_per_step": round(sum(v) / steps, 1),
                           "launches_per_step": round(len(v) / steps, 2), "mean_us": round(sum(v) / len(v), 2)}
                          for name, v in rows[:top]]}


def _weight_read_bound(model, device: torch.device) -> dict:
    """Where a decode step's time must go: the ms to read the weights once at this GPU's measured copy bandwidth
    (bench/gemv.py measures the step's matmuls one by one)."""
    weights = sum(p.numel() * p.element_size() for p in model.model.language_model.parameters())
    weights += model.lm_head.weight.numel() * model.lm_head.weight.element_size()
    src = torch.empty(2 * 2**30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    bandwidth = 2 * src.numel() / _graph_ms(lambda: dst.copy_(src), 10) * 1e3  # a copy reads and writes each byte
    del src, dst
    torch.cuda.empty_cache()
    return {"weights_gb": round(weights / 1e9, 2), "copy_tb_per_s": round(bandwidth / 1e12, 2),
            "ms_per_token": round(weights / bandwidth * 1e3, 2)}


def _graph_ms(fn, repeats: int) -> float:
    """ms per call of fn, `repeats` calls captured in one CUDA graph (no launch gaps), replayed after a warm-up."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeats):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / (5 * repeats)


def _exactness(args, processor, tokenizer, device, comm=None) -> dict:
    """The same comparison in float32 (TF32 off), where rounding cannot flip an argmax: the full-width decoder with
    --exact-layers layers, a fresh fast decoder (compiled as in the timed run), --exact-tokens tokens; greedy and
    seeded sampling must give identical tokens on both paths. With --tp N, the tensor-parallel path too."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    started = time.perf_counter()
    model = _build(args.scale, tokenizer, device, torch.float32, args.seed, args.exact_layers)
    _sampling(model, args, tokenizer)
    new = args.exact_tokens
    inputs = _inputs(processor, args.prompt_tokens, new, device)
    compile_on = {"auto": device.type == "cuda", "on": True, "off": False}[args.compile]
    options = dict(compile=compile_on, backend=args.compile_backend, mode=args.compile_mode or None)
    out = {"layers": model.config.text_config.num_hidden_layers, "new_tokens": new, "dtype": "float32"}
    plain = {}
    if comm is None or comm.is_main:
        decoder = ar_decode.FastDecoder(model, **options)
        bench = _Bench(model, decoder, inputs, args, device)
        for name, do_sample in (("greedy", False), ("sampled", True)):
            plain[name] = bench.call("plain", new, do_sample=do_sample)[1]
            out[name] = _agreement(plain[name], bench.call("fast", new, do_sample=do_sample)[1])
        out["compiled"] = bool(decoder.slots) and all(s.compiled for s in decoder.slots.values())
        out["compile_errors"] = decoder.compile_errors
    if comm is not None:
        comm.all_gather_object(None)
        comm.make_group(ar_decode.TP_GROUP, range(args.tp))  # the group the plan shards over (all ranks)
        glm_plan.apply_ar_tensor_parallel(model, comm)
        decoder = ar_decode.FastDecoder(model, comm=comm, **options)
        bench = _Bench(model, decoder, inputs, args, device)
        for name, do_sample in (("greedy", False), ("sampled", True)):
            tokens = bench.call("fast", new, do_sample=do_sample)[1]
            if comm.is_main:
                out[f"tensor_parallel_{comm.world_size}_{name}"] = _agreement(plain[name], tokens)
    out["seconds"] = round(time.perf_counter() - started, 1)
    return out


class _Bench:
    def __init__(self, model, decoder, inputs, args, device):
        self.model, self.decoder, self.inputs, self.args, self.device = model, decoder, inputs, args, device
        self.prompt = inputs["input_ids"].shape[1]

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def call(self, path: str, new: int, do_sample: bool = True, processors=()) -> tuple[float, torch.Tensor, int]:
        """One AR request on `path`, seeded as the AR stage seeds it: (seconds, new tokens (1, n), stopping calls)."""
        progress = _Progress()
        kwargs = dict(max_new_tokens=new, do_sample=do_sample, stopping_criteria=StoppingCriteriaList([progress]))
        if processors:
            kwargs["logits_processor"] = LogitsProcessorList(processors)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(self.args.seed)
            if self.device.type == "cuda":
                torch.cuda.manual_seed(self.args.seed)
            self.sync()
            t0 = time.perf_counter()
            if path == "plain":
                out = self.model.generate(**self.inputs, **kwargs)
            else:
                out = self.decoder.generate(self.inputs, **kwargs)
            self.sync()
            seconds = time.perf_counter() - t0
        return seconds, out[:, self.prompt:].cpu(), progress.calls

    def measure(self, path: str) -> tuple[dict, torch.Tensor]:
        new = self.args.new_tokens
        first, tokens, calls = self.call(path, new)
        if tokens.shape[1] != new or calls != new:
            raise RuntimeError(f"{path}: {tokens.shape[1]} tokens and {calls} progress calls for {new} new tokens")
        for _ in range(self.args.warmup):
            self.call(path, new)
        runs = [self.call(path, new) for _ in range(self.args.repeats)]
        prefill = [self.call(path, 1)[0] for _ in range(self.args.repeats)]
        seconds = [r[0] for r in runs]
        median, prefill_median = statistics.median(seconds), statistics.median(prefill)
        return {
            "first_call_s": round(first, 3), "call_s": [round(s, 4) for s in seconds],
            "median_call_s": round(median, 4), "ms_per_token": round(median / new * 1e3, 3),
            "prefill_call_ms": round(prefill_median * 1e3, 2),
            "decode_ms_per_token": round((median - prefill_median) / max(new - 1, 1) * 1e3, 3),
            "progress_calls_per_request": calls,
            "seeded_repeats_identical": all(torch.equal(r[1], tokens) for r in runs),
        }, tokens

    def greedy(self) -> tuple[dict, torch.Tensor]:
        """Greedy tokens of plain generate(), and how the fast path agrees with them; returns (report, tokens)."""
        _, plain, _ = self.call("plain", self.args.new_tokens, do_sample=False)
        return self.greedy_against(plain), plain

    def greedy_against(self, reference: torch.Tensor) -> dict:
        """The fast path's greedy tokens against reference greedy tokens: free-running, and teacher-forced."""
        new, plain = self.args.new_tokens, reference.cpu()
        _, fast, _ = self.call("fast", new, do_sample=False)
        teacher = _TeacherForcing(reference.to(self.device), self.prompt)
        _, forced, _ = self.call("fast", new, do_sample=False, processors=[teacher])
        argmax, gap, margin = (torch.stack(v, 1).cpu() for v in (teacher.argmax, teacher.gap, teacher.margin))
        differ = argmax != plain
        return {
            "free_running": _agreement(plain, fast),
            "teacher_forced": {
                "steps": int(argmax.numel()), "agreement": round(float((~differ).float().mean()), 4),
                "disagreements": int(differ.sum()),
                "max_logit_gap_where_differ": round(float(gap[differ].max()), 4) if differ.any() else 0.0,
                "median_top1_top2_margin": round(float(margin.median()), 4),
                "forced_tokens_followed": bool(torch.equal(forced, plain)),
            },
        }


class _Progress(StoppingCriteria):
    """The AR stage's per-token progress criterion, without a host to report to: never stops generation."""

    def __init__(self):
        self.calls = 0

    def __call__(self, input_ids, scores, **kwargs):
        self.calls += 1
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class _TeacherForcing(LogitsProcessor):
    """Records the argmax of the scores it gets (and the gap to the reference token's score, and the top-2
    margin), then forces the reference token: greedy decoding follows the reference, each step judged alone."""

    def __init__(self, reference: torch.Tensor, prompt: int):
        self.reference, self.prompt = reference, prompt
        self.argmax, self.gap, self.margin = [], [], []

    def __call__(self, input_ids, scores):
        ref = self.reference[:, input_ids.shape[1] - self.prompt, None]
        top2 = scores.topk(2, dim=-1).values
        self.argmax.append(scores.argmax(-1))
        self.gap.append(top2[:, 0] - scores.gather(1, ref).squeeze(1))
        self.margin.append(top2[:, 0] - top2[:, 1])
        return torch.full_like(scores, -math.inf).scatter_(1, ref, 0.0)


def _agreement(a: torch.Tensor, b: torch.Tensor) -> dict:
    same = (a == b).all(0)
    differ = (~same).nonzero()
    return {"identical": bool(same.all()), "identical_prefix": int(differ[0]) if len(differ) else int(same.numel()),
            "equal_positions": round(float(same.float().mean()), 4)}


def full_config(tokenizer, layers: int | None = None) -> GlmImageConfig:
    """The full-size AR's config (FULL_TEXT's decoder, the small stand-in vision tower) for the tiny tokenizer."""
    text = dict(FULL_TEXT, pad_token_id=tokenizer.pad_token_id, eos_token_id=FULL_TEXT["vision_vocab_size"])
    if layers:
        text["num_hidden_layers"] = layers
    return GlmImageConfig(
        text_config=text,
        vision_config=SMALL_VISION, vq_config=SMALL_VQ, image_token_id=tokenizer.convert_tokens_to_ids("<|image|>"),
        image_start_token_id=tiny.IMAGE_START, image_end_token_id=tiny.IMAGE_END)


def _build(scale: str, tokenizer, device: torch.device, dtype: torch.dtype, seed: int, layers: int | None = None):
    if scale == "tiny":
        with torch.random.fork_rng(devices=[]):
            return tiny._ar_model(tokenizer).to(device, dtype).eval()
    config = full_config(tokenizer, layers)
    torch.manual_seed(seed)
    with torch.device(device), loading.default_dtype(dtype):  # as from_pretrained(dtype=...) builds it: rope buffers float32
        model = GlmImageForConditionalGeneration(config)
    generator = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:  # norms stay 1, biases 0, as the model's own initialisation leaves them
                p.normal_(0.0, 0.02, generator=generator)
    return model.eval()


def _sampling(model, args, tokenizer) -> None:
    """The generation config the pipeline leaves to the checkpoint (diffusers passes only do_sample=True); the end
    token outside the sampled range, so every request samples exactly --new-tokens tokens."""
    gen = model.generation_config
    gen.do_sample = True
    gen.temperature = args.temperature
    gen.top_k = args.top_k or None
    gen.top_p = args.top_p if args.top_p < 1 else None
    gen.bos_token_id = tiny.IMAGE_START
    gen.eos_token_id = model.config.text_config.vision_vocab_size
    gen.pad_token_id = tokenizer.pad_token_id


def _inputs(processor, prompt_tokens: int, new_tokens: int, device: torch.device):
    """A text-to-image request of exactly `prompt_tokens` tokens whose target grid holds `new_tokens` positions."""
    side = 32 * math.ceil(math.sqrt(new_tokens))

    def request(chars: int):
        messages = [[{"role": "user", "content": [{"type": "text", "text": "x" * chars}]}]]
        return processor.apply_chat_template(messages, tokenize=True, target_h=side, target_w=side,
                                             return_dict=True, return_tensors="pt")

    overhead = request(1)["input_ids"].shape[1] - 1  # chat template, size markers, image start: one id per char
    if prompt_tokens <= overhead:
        raise SystemExit(f"--prompt-tokens must be more than {overhead} (the chat template's own tokens)")
    inputs = request(prompt_tokens - overhead)
    assert inputs["input_ids"].shape[1] == prompt_tokens, inputs["input_ids"].shape
    return inputs.to(device)


def _text_params(model) -> int:
    return sum(p.numel() for p in model.model.language_model.parameters()) + model.lm_head.weight.numel()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", choices=["full", "tiny"], default="full")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tp", type=int, default=1,
                   help="also measure the decoder tensor-parallel over this many GPUs (one process each)")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--warmup", type=int, default=1, help="untimed calls after the first")
    p.add_argument("--repeats", type=int, default=3, help="timed calls (median)")
    p.add_argument("--layers", type=int, help="full scale: this many decoder layers instead of 40 (smoke tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.9)
    p.add_argument("--top-k", type=int, default=2048, help="0: off")
    p.add_argument("--top-p", type=float, default=0.9, help="1: off")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto", help="auto: on for CUDA")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--compile-mode", default="reduce-overhead")
    p.add_argument("--exact-layers", type=int, default=8,
                   help="float32 exactness check on a full-width decoder of this many layers (0: skip)")
    p.add_argument("--exact-tokens", type=int, default=64)
    p.add_argument("--exact-after-s", type=float, default=210.0,
                   help="skip the float32 check when the run has taken longer than this (keeps it near 5 minutes)")
    p.add_argument("--inductor-config", action="append", default=[], metavar="KEY=VALUE",
                   help="set torch._inductor.config KEY to the JSON VALUE for this run (repeatable)")
    p.add_argument("--profile", action="store_true", help="add a kernel profile of the decode step to the JSON")
    p.add_argument("--out", help="JSON file (default bench/results/glm_ar_<gpu>.json)")
    return p


if __name__ == "__main__":
    main()
