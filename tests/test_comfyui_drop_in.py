"""Z-Image Parallel MODEL in a real ComfyUI (nodes/zimage_model.py; skipped unless COMFYUI_HOME names a host): the
user's own graph, Load Diffusion Model -> (LoRA) -> KSampler, with our node added, gives the latents ComfyUI's
native MODEL gives, on 1, 2 and 3 ranks and with cfg_parallel.

The files are tests/comfyui_files.py's (the smallest DiT ComfyUI takes as Z-Image: width 3840, one main layer),
the conditioning comes from a test-only node (ComfyUI always builds the full Qwen3-4B text encoder), float32 on the
CPU. Cases: Turbo's settings (cfg 1, so no negative pass) and base Z-Image's (cfg 4, a negative of another length,
so ComfyUI cannot batch the two branches itself), square and portrait, euler and dpmpp_2m, and a LoRA at 0.7 in two
key formats (before our node, and after it).

Tolerance: ComfyUI's NextDiT is another implementation of the same DiT than diffusers' (its q/k RMSNorm uses the
dtype's eps where diffusers uses 1e-5, and it orders the caption before the image): one forward differs by about
1e-5, cfg 4 multiplies a branch difference by 4, and two steps compound it. Measured: 2e-5 at cfg 1, 5.5e-5 at
cfg 4 (every layout); LATENT_TOLERANCE leaves a margin of about 10x. Our runs on different rank
counts are held to the tighter PARALLEL_TOLERANCE (tests/test_zimage.py's).
"""
import os
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import comfyui_files  # noqa: E402

NAMES = comfyui_files.FILE_NAMES
STEPS = 2
LATENT_TOLERANCE = 5e-4
PARALLEL_TOLERANCE = 1e-4
PROMPT_TIMEOUT = 600  # a group start and a 1.8 GB load per rank on two shared cores
SQUARE, PORTRAIT = (32, 32), (32, 48)  # (width, height) in pixels
CASES = {  # name: (cfg, sampler, size, lora)
    "turbo_square_euler": (1.0, "euler", SQUARE, None),
    "turbo_portrait_dpmpp_2m": (1.0, "dpmpp_2m", PORTRAIT, None),
    "base_square_euler": (4.0, "euler", SQUARE, None),
    "base_portrait_dpmpp_2m": (4.0, "dpmpp_2m", PORTRAIT, None),
    "turbo_square_lora": (1.0, "euler", SQUARE, "before"),
    "base_portrait_lora": (4.0, "dpmpp_2m", PORTRAIT, "before"),
    "turbo_square_lora_after": (1.0, "euler", SQUARE, "after"),
}
# the 2-rank group last: the interrupt test below runs on it
LAYOUTS = {"1 rank": (1, False), "3 ranks": (3, False), "2 ranks, cfg_parallel": (2, True), "2 ranks": (2, False)}


@pytest.fixture(scope="module")
def server(comfyui, zimage_files, tmp_path_factory):
    """The session's server with the three Z-Image files in their folders and a LoRA file in loras."""
    lora = tmp_path_factory.mktemp("drop_in_lora") / comfyui_files.LORA_NAME
    save_file(comfyui_files.zimage_lora_state_dict(), lora)
    links = []
    for kind, path in (*zimage_files.items(), ("loras", lora)):
        link = comfyui.models_dir / kind / path.name
        if not link.is_symlink():
            link.symlink_to(path)
            links.append(link)
    yield comfyui
    comfyui.free(unload_models=True, free_memory=True)
    for link in links:
        link.unlink()


def sampling_prompt(layout: tuple[int, bool] | None, tag: str) -> dict:
    """One prompt sampling every case; layout None: ComfyUI's native MODEL, else (gpus, cfg_parallel) of our node."""
    prompt = {
        "model": {"class_type": "UNETLoader",
                  "inputs": {"unet_name": NAMES["diffusion_models"], "weight_dtype": "default"}},
        "lora": {"class_type": "LoraLoaderModelOnly",
                 "inputs": {"model": ["model", 0], "lora_name": comfyui_files.LORA_NAME, "strength_model": 0.7}},
        "positive": {"class_type": "PDTestRandomConditioning", "inputs": {"seed": 0, "length": 16, "width": 2560}},
        "negative": {"class_type": "PDTestRandomConditioning", "inputs": {"seed": 1, "length": 9, "width": 2560}},
    }
    models = {None: ["model", 0], "before": ["lora", 0], "after": ["model", 0]}
    if layout is not None:
        gpus, cfg_parallel = layout
        for name, source in (("parallel", ["model", 0]), ("parallel_lora", ["lora", 0])):
            prompt[name] = {"class_type": "PDZImageParallelModel", "inputs": {
                "model": source, "gpus": gpus, "cfg_parallel": cfg_parallel, "device": "cpu"}}
        prompt["lora_after"] = {"class_type": "LoraLoaderModelOnly", "inputs": {
            "model": ["parallel", 0], "lora_name": comfyui_files.LORA_NAME, "strength_model": 0.7}}
        models = {None: ["parallel", 0], "before": ["parallel_lora", 0], "after": ["lora_after", 0]}
    else:
        models["after"] = ["lora", 0]  # natively, before and after are the same graph
    for name, (cfg, sampler, (width, height), lora) in CASES.items():
        prompt[f"{name}_latent"] = {"class_type": "EmptySD3LatentImage",
                                    "inputs": {"width": width, "height": height, "batch_size": 1}}
        prompt[f"{name}_sample"] = {"class_type": "KSampler", "inputs": {
            "model": models[lora], "seed": 7, "steps": STEPS, "cfg": cfg, "sampler_name": sampler,
            "scheduler": "simple", "positive": ["positive", 0], "negative": ["negative", 0],
            "latent_image": [f"{name}_latent", 0], "denoise": 1.0}}
        prompt[f"{name}_save"] = {"class_type": "SaveLatent", "inputs": {
            "samples": [f"{name}_sample", 0], "filename_prefix": f"drop_in/{tag}_{name}"}}
    return prompt


def run_cases(server, layout, tag: str) -> dict[str, torch.Tensor]:
    started = time.monotonic()
    entry, _ = server.run(sampling_prompt(layout, tag), timeout=PROMPT_TIMEOUT)
    errors = [m[1] for m in entry["status"]["messages"] if m[0] in ("execution_error", "execution_interrupted")]
    assert entry["status"]["status_str"] == "success" and not errors, f"{errors}\n{server.log_tail(80)}"
    print(f"{tag}: {len(CASES)} KSampler runs in {time.monotonic() - started:.1f} s")
    out = {}
    for name in CASES:
        (item,) = entry["outputs"][f"{name}_save"]["latents"]
        out[name] = load_file(server.output_dir / item["subfolder"] / item["filename"])["latent_tensor"]
    return out


@pytest.fixture(scope="module")
def native(server):
    return run_cases(server, None, "native")


@pytest.fixture(scope="module")
def ours(server, native):
    """Our node's latents per layout. ComfyUI's DiT (3.6 GB) stays loaded in its process throughout, as a user's
    would."""
    return {name: run_cases(server, layout, name.replace(" ", "_").replace(",", "")) for name, layout in LAYOUTS.items()}


def test_the_lora_changes_the_native_output(native):
    change = (native["turbo_square_lora"] - native["turbo_square_euler"]).abs().max().item()
    print(f"the LoRA at 0.7 changes the latents by up to {change:.3f}")
    assert change > 100 * LATENT_TOLERANCE


@pytest.mark.parametrize("layout", LAYOUTS)
def test_ksampler_with_our_model_equals_comfyuis_native_model(native, ours, layout):
    worst = {}
    for name in CASES:
        theirs, mine = native[name], ours[layout][name]
        assert mine.shape == theirs.shape, name
        worst[name] = (mine - theirs).abs().max().item()
    print(f"{layout}: max|ours - native| per case " + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))
    bad = {k: v for k, v in worst.items() if not v <= LATENT_TOLERANCE}
    assert not bad, bad


@pytest.mark.parametrize("layout", [name for name in LAYOUTS if name != "1 rank"])
def test_every_layout_equals_one_rank(ours, layout):
    worst = max((ours[layout][name] - ours["1 rank"][name]).abs().max().item() for name in CASES)
    print(f"{layout} vs 1 rank: worst max|diff| {worst:.1e}")
    assert worst <= PARALLEL_TOLERANCE


def test_interrupt_stops_ksampler_between_steps_and_the_group_serves_on(server, ours):
    """Cancel during a long KSampler on our MODEL: ComfyUI stops it between steps, as with its own MODEL (each
    step is a finished request), and the same worker processes serve the next prompt."""
    prompt = sampling_prompt(LAYOUTS["2 ranks"], "interrupted")
    keep = {"model", "positive", "negative", "parallel", "turbo_square_euler_latent", "turbo_square_euler_sample",
            "turbo_square_euler_save"}
    prompt = {k: v for k, v in prompt.items() if k in keep}
    prompt["turbo_square_euler_sample"]["inputs"]["steps"] = 60
    workers = set(server.group_processes("worker_main.py"))
    assert len(workers) == 2
    prompt_id = server.queue(prompt)
    deadline = time.monotonic() + PROMPT_TIMEOUT
    while not [e for e in server.events(prompt_id) if e["type"] == "progress" and e["data"]["value"] >= 2]:
        assert time.monotonic() < deadline, server.log_tail(40)
        time.sleep(0.2)
    server.interrupt()
    entry, events = server.wait(prompt_id, timeout=120)
    kinds = [m[0] for m in entry["status"]["messages"]]
    assert "execution_interrupted" in kinds and "execution_error" not in kinds, entry["status"]
    steps = [e["data"]["value"] for e in events if e["type"] == "progress"]
    assert steps and max(steps) < 60
    prompt["turbo_square_euler_sample"]["inputs"].update(steps=STEPS, seed=8)
    entry, _ = server.run(prompt, timeout=PROMPT_TIMEOUT)
    assert entry["status"]["status_str"] == "success", server.log_tail(60)
    assert set(server.group_processes("worker_main.py")) == workers


def test_the_example_workflow_runs_and_equals_the_graph_without_our_node(server, ours):
    """example_workflows/z_image_parallel_model_2gpu.json as a user opens it, at test size: ComfyUI's text encoder
    (which would build the full Qwen3-4B) replaced by the test conditioning node, and the test files picked. The same
    graph with our node taken out (KSampler on Load Diffusion Model's MODEL) gives the same latents."""
    from comfyui_server import REPO_ROOT, load_workflow

    prompt = server.workflow_to_api(load_workflow(REPO_ROOT / "example_workflows" / "z_image_parallel_model_2gpu.json"))
    by_type = {node["class_type"]: node_id for node_id, node in prompt.items()}
    prompt[by_type["UNETLoader"]]["inputs"]["unet_name"] = NAMES["diffusion_models"]
    prompt[by_type["VAELoader"]]["inputs"]["vae_name"] = NAMES["vae"]
    del prompt[by_type["CLIPLoader"]]
    prompt[by_type["CLIPTextEncode"]] = {"class_type": "PDTestRandomConditioning",
                                         "inputs": {"seed": 0, "length": 16, "width": 2560}}
    prompt[by_type["EmptySD3LatentImage"]]["inputs"].update(width=SQUARE[0], height=SQUARE[1])
    prompt[by_type["KSampler"]]["inputs"].update(steps=STEPS, seed=3)
    prompt[by_type["PDZImageParallelModel"]]["inputs"]["device"] = "cpu"
    prompt["save_latent"] = {"class_type": "SaveLatent", "inputs": {"samples": [by_type["KSampler"], 0],
                                                                    "filename_prefix": "drop_in/example"}}
    latents = {}
    for tag in ("ours", "native"):
        if tag == "native":
            prompt[by_type["KSampler"]]["inputs"]["model"] = [by_type["UNETLoader"], 0]
            del prompt[by_type["PDZImageParallelModel"]]
        prompt["save_latent"]["inputs"]["filename_prefix"] = f"drop_in/example_{tag}"
        entry, _ = server.run(prompt, timeout=PROMPT_TIMEOUT)
        assert entry["status"]["status_str"] == "success", server.log_tail(60)
        assert entry["outputs"][by_type["SaveImage"]]["images"]
        (item,) = entry["outputs"]["save_latent"]["latents"]
        latents[tag] = load_file(server.output_dir / item["subfolder"] / item["filename"])["latent_tensor"]
    assert (latents["ours"] - latents["native"]).abs().max() <= LATENT_TOLERANCE

