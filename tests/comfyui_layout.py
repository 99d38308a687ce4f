"""Writers of ComfyUI's split-file layouts from diffusers state dicts, for tests and bench/load.py: each is the
inverse of the converter the loader uses (diffusers' convert_z_image_transformer_checkpoint_to_diffusers and
convert_ldm_vae_checkpoint, transformers' base-model prefix), and tests/test_split_files.py checks that running
that converter on the writer's output gives the input back exactly."""
from __future__ import annotations

import re

import torch

# diffusers' Z-Image DiT names -> ComfyUI's (NextDiT)
DIT_RENAMES = {
    "all_final_layer.2-1.": "final_layer.",
    "all_x_embedder.2-1.": "x_embedder.",
    ".attention.to_out.0.": ".attention.out.",
    ".attention.norm_k.": ".attention.k_norm.",
    ".attention.norm_q.": ".attention.q_norm.",
}


def comfyui_transformer_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI's Z-Image DiT keys: q, k and v fused into attention.qkv (concatenated on dim 0)."""
    out = {}
    for name, tensor in sd.items():
        if ".attention.to_k." in name or ".attention.to_v." in name:
            continue
        if ".attention.to_q." in name:
            tensor = torch.cat([tensor, sd[name.replace(".to_q.", ".to_k.")], sd[name.replace(".to_q.", ".to_v.")]])
            name = name.replace(".attention.to_q.", ".attention.qkv.")
        for old, new in DIT_RENAMES.items():
            name = name.replace(old, new)
        out[name] = tensor.contiguous()
    return out


def causal_lm_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A bare Qwen3Model's weights as the causal LM's checkpoint names them (qwen_3_4b.safetensors)."""
    return {f"model.{name}": tensor for name, tensor in sd.items()}


RESNET_PARTS = {"conv_shortcut": "nin_shortcut"}
ATTENTION_PARTS = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def ldm_vae_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The Flux VAE's original (LDM) keys, as ae.safetensors holds them: attention projections as 1x1 convs,
    decoder levels numbered from the bottom."""
    levels = len({m.group(1) for n in sd if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", n))})
    out = {}
    for name, tensor in sd.items():
        new = name
        new = re.sub(r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out.", new)
        new = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2.", new)
        new = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", new)
        new = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
                     lambda m: f"decoder.up.{levels - 1 - int(m.group(1))}.block.{m.group(2)}.", new)
        new = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                     lambda m: f"decoder.up.{levels - 1 - int(m.group(1))}.upsample.", new)
        new = re.sub(r"^(encoder|decoder)\.mid_block\.resnets\.(\d+)\.",
                     lambda m: f"{m.group(1)}.mid.block_{int(m.group(2)) + 1}.", new)
        for old, part in RESNET_PARTS.items():
            new = new.replace(f".{old}.", f".{part}.")
        attention = re.match(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)$", new)
        if attention:
            coder, part, kind = attention.groups()
            new = f"{coder}.mid.attn_1.{ATTENTION_PARTS[part]}.{kind}"
            if kind == "weight" and part != "group_norm":
                tensor = tensor[:, :, None, None]
        out[new] = tensor.contiguous()
    return out
