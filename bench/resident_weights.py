"""Each layout's GPU memory for weights, per rank: a count, not a measurement (weights are deterministic).

    python bench/resident_weights.py [--out bench/results/resident_weights.json]    # on the CPU, in seconds

The models are built on the meta device (no memory) from the published configs (shared/reference/published-
configs: Z-Image-Turbo's DiT, Qwen3-4B text encoder and VAE; GLM-Image's DiT) and, where no config was readable, the
shapes the benchmarks use (bench/random_models.py: GLM-Image's glyph T5 and VAE; bench/ar.py: the AR's text
decoder, whose published facts it holds). GLM-Image's AR vision tower and VQ model are left out: their config was
not readable (the published facts give the tower's depth 40 and width 1536 only), and bench/ar.py's stand-in is
not their size. Their weights are in bf16 (2 bytes), or in fp8 (1 byte) where the project's own weight_dtype
fp8_e4m3fn stores them (models/fp8.py on these meta models); the AR's per-rank share is counted on the model
sharded by the project's own plan (plan.apply_ar_tensor_parallel over a group of `n`, n the largest split of the
GPU count, as offload=auto and ar=auto place it on CUDA).

Per rank and GPU count, for offload resident and offload (a rank whose stages take turns holds the larger of the
modules that alternate, besides those always there): Z-Image's rank 0 holds the DiT, text encoder and VAE, the
others the DiT; GLM-Image's rank 0 the DiT, glyph encoder and VAE, the others the DiT, ranks 0..n-1 their AR
share.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from comfyui_parallel_diffusion.models import fp8  # noqa: E402

PUBLISHED = Path("/work/shared/reference/published-configs")
GPU_COUNTS = (1, 2, 4, 8)
GB = 1e9


def _config(path: Path) -> dict:
    return {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}


def _bytes(module: torch.nn.Module) -> int:
    """Parameter bytes as stored (fp8 originals 1 byte each)."""
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _bf16(build) -> torch.nn.Module:
    with torch.device("meta"):
        module = build()
    return module.to(torch.bfloat16)


def _both(build, fp8_layers) -> dict[str, int]:
    """bf16 and fp8 bytes of a model, its parameter count."""
    bf16 = _bf16(build)
    stored = _bf16(build)
    fp8.store_fp8(fp8_layers(stored), torch.bfloat16)
    return {"params": sum(p.numel() for p in bf16.parameters()), "bf16": _bytes(bf16), "fp8": _bytes(stored)}


def zimage() -> dict:
    from diffusers import AutoencoderKL, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    root = PUBLISHED / "z-image-turbo"
    te_config = Qwen3Config(**_config(root / "text_encoder" / "config.json"))
    dit = _both(lambda: ZImageTransformer2DModel.from_config(_config(root / "transformer" / "config.json")),
                fp8.linears)
    te = _both(lambda: Qwen3Model(te_config), lambda m: [])
    vae = _both(lambda: AutoencoderKL.from_config(_config(root / "vae" / "config.json")), lambda m: [])
    table = []
    for gpus in GPU_COUNTS:
        for dtype in ("bf16", "fp8"):
            main = {"resident": dit[dtype] + te[dtype] + vae[dtype],
                    "offload": max(dit[dtype], te[dtype]) + vae[dtype]}
            table.append({"gpus": gpus, "weight_dtype": dtype,
                          "rank0_gb": {k: round(v / GB, 2) for k, v in main.items()},
                          "other_ranks_gb": round(dit[dtype] / GB, 2) if gpus > 1 else None})
    return {"components": {"transformer": dit, "text_encoder": te, "vae": vae}, "per_rank": table}


def glm_image() -> dict:
    from diffusers import AutoencoderKL, GlmImageTransformer2DModel
    from transformers import GlmImageForConditionalGeneration, T5Config, T5EncoderModel

    import ar as ar_bench
    import random_models
    from comfyui_parallel_diffusion.models.glm_image import model as glm_model, plan, tiny

    dit = _both(lambda: GlmImageTransformer2DModel.from_config(_config(PUBLISHED / "glm-image" / "transformer" /
                                                                       "config.json")), fp8.linears)
    t5 = _both(lambda: T5EncoderModel(T5Config(vocab_size=384, **random_models.GLYPH_T5)), lambda m: [])
    vae = _both(lambda: AutoencoderKL.from_config(random_models.GLM_VAE), lambda m: [])
    _, tokenizer = tiny._processor()
    config = ar_bench.full_config(tokenizer)

    def decoder_share(n: int) -> dict[str, int]:
        """The text decoder and output head one of n ranks holds (the vision tower and VQ left out)."""
        out = {}
        for dtype in ("bf16", "fp8"):
            model = _bf16(lambda: GlmImageForConditionalGeneration(config))
            comm = SimpleNamespace(group_size=lambda group: n, group_rank=lambda group: 0,
                                   enable_small_all_reduce=lambda group, dtype: False)
            plan.apply_ar_tensor_parallel(model, comm)
            if dtype == "fp8":
                fp8.store_fp8(glm_model.ar_fp8_layers(model), torch.bfloat16)
            out[dtype] = _bytes(model.model.language_model) + _bytes(model.lm_head)
        return out

    shares = {}
    table = []
    for gpus in GPU_COUNTS:
        n = plan.largest_ar_split(config.text_config, gpus)
        shares[n] = shares.get(n) or decoder_share(n)
        for dtype in ("bf16", "fp8"):
            main = t5[dtype] + vae[dtype]  # rank 0 only, which is an AR rank
            table.append({"gpus": gpus, "ar_ranks": n, "weight_dtype": dtype,
                          "ar_ranks_gb": {"resident": round((dit[dtype] + shares[n][dtype] + main) / GB, 2),
                                          "offload": round((max(dit[dtype], shares[n][dtype]) + main) / GB, 2)},
                          "other_ranks_gb": round(dit[dtype] / GB, 2) if gpus > n else None})
    whole = decoder_share(1)
    return {"components": {"transformer": dit, "glyph_text_encoder": t5, "vae": vae,
                           "ar_text_decoder_and_head": {"bf16": whole["bf16"], "fp8": whole["fp8"]}},
            "per_rank": table}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=BENCH / "results" / "resident_weights.json")
    args = parser.parse_args()
    result = {"what": __doc__.split("\n\n")[0], "unit": "GB (1e9 bytes) of parameters", "zimage": zimage(),
              "glm_image": glm_image()}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for model in ("zimage", "glm_image"):
        for row in result[model]["per_rank"]:
            print(model, json.dumps(row))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
