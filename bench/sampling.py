"""GLM-Image's AR sampling between two decode steps: generate()'s logits processors against FastDecoder's equivalents
(models/glm_image/logits_processors.py), side by side on one GPU, with the AR's vocabulary and the bench's sampling.

    python3 bench/sampling.py --out bench/results/glm_ar_sampling_h200.json

Per processor and for the whole chain (in generate()'s order: suppressed tokens, temperature, top-k, top-p):
gpu_us_per_call, CUDA events around --calls calls queued back to back (the GPU's time per call where the host keeps
ahead of it, i.e. host_us_per_call is smaller; else the host's pace); host_us_per_call, the host's time to queue a
call; whether it synchronises with the host (torch.cuda.set_sync_debug_mode); and that both give equal scores.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from transformers import (LogitsProcessorList, SuppressTokensLogitsProcessor, TemperatureLogitsWarper,
                          TopKLogitsWarper, TopPLogitsWarper)

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from comfyui_parallel_diffusion.models.glm_image.logits_processors import without_host_syncs  # noqa: E402
import random_models  # noqa: E402
from ar import FULL_TEXT  # noqa: E402
from denoise import _machine  # noqa: E402


def generate_processors(device: torch.device) -> LogitsProcessorList:
    """What generate() builds for the bench's AR (bench/random_models.py): suppressed tokens first, then warpers."""
    codebook = random_models.SCALES["full"]["glm_dit"]["prior_vq_quantizer_codebook_size"]
    s = random_models.AR_SAMPLING
    return LogitsProcessorList([
        SuppressTokensLogitsProcessor(range(codebook, FULL_TEXT["vision_vocab_size"]), device=device),
        TemperatureLogitsWarper(s["temperature"]), TopKLogitsWarper(s["top_k"]), TopPLogitsWarper(s["top_p"])])


def measure(fn, scores: torch.Tensor, calls: int) -> dict:
    fn(scores)  # warm-up: kernels loaded, masks built
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    host = time.perf_counter()
    start.record()
    for _ in range(calls):
        fn(scores)
    end.record()
    host = time.perf_counter() - host
    end.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn(scores)
        syncs = False
    except RuntimeError:
        syncs = True
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return {"gpu_us_per_call": round(start.elapsed_time(end) * 1e3 / calls, 1),
            "host_us_per_call": round(host * 1e6 / calls, 1), "synchronises_with_host": syncs}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=500)
    p.add_argument("--out", type=Path, default=BENCH / "results" / "glm_ar_sampling.json")
    args = p.parse_args()
    device = torch.device("cuda")
    torch.manual_seed(0)
    scores = torch.randn(1, FULL_TEXT["vision_vocab_size"], device=device) * 3  # logits as the float32 copy
    ids = torch.zeros(1, 1, dtype=torch.long, device=device)
    plain = generate_processors(device)
    fast = without_host_syncs(plain)
    rows = {}
    for original, equivalent in [*zip(plain, fast), (plain, fast)]:
        name = "chain" if original is plain else type(original).__name__
        rows[name] = {"generate": measure(lambda s: original(ids, s), scores, args.calls),
                      "fast_decoder": measure(lambda s: equivalent(ids, s), scores, args.calls),
                      "replaced": original is not equivalent,
                      "equal_scores": torch.equal(original(ids, scores), equivalent(ids, scores))}
    result = {"benchmark": "glm_ar_sampling", "machine": _machine("cuda"), "command": " ".join(sys.argv),
              "vocab": FULL_TEXT["vision_vocab_size"], "sampling": random_models.AR_SAMPLING, "calls": args.calls,
              "processors": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
