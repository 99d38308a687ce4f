"""Who stops the workers in ComfyUI: comfy.model_management.unload_all_models() between prompts (POST /free, the
UI's Unload Models, --disable-smart-memory after a prompt, the out-of-memory handler) releases the runner; a call
from inside a running node (another custom node) keeps it. Runs ComfyUI's own modules in the host's venv."""
import json
import subprocess

import pytest
from comfyui_server import REPO_ROOT, SKIP_REASON, find_comfyui_home

SCRIPT = r"""
import json, logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
sys.argv = ["main.py", "--cpu"]
import comfy.options
comfy.options.enable_args_parsing()
import comfy.model_management as mm
from comfy_execution.utils import CurrentNodeContext
import comfyui_parallel_diffusion  # ComfyUI's entry point: the nodes, and the release hook
from comfyui_parallel_diffusion.parallel import Layout, pool

runner = pool.get_runner(Layout(), plugin="dummy_plugin")
with CurrentNodeContext("prompt-1", "7"):
    mm.unload_all_models()  # what another custom node does while it runs
kept = pool._runner is runner
mm.unload_all_models()  # what the prompt worker does for /free, between prompts
print(json.dumps({"kept_mid_prompt": kept, "released_between_prompts": pool._runner is None}))
"""


def test_unload_all_models_releases_the_group_between_prompts_and_keeps_it_inside_a_node(tmp_path):
    home = find_comfyui_home()
    if home is None:
        pytest.skip(SKIP_REASON)
    (tmp_path / "comfyui_parallel_diffusion").symlink_to(REPO_ROOT, target_is_directory=True)
    comfyui = home / "ComfyUI"
    result = subprocess.run(
        [str(home / "venv" / "bin" / "python"), "-c", SCRIPT], cwd=comfyui, capture_output=True, text=True,
        timeout=300, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{comfyui}:{tmp_path}:{REPO_ROOT / 'tests'}"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.splitlines()[-1]) == {"kept_mid_prompt": True, "released_between_prompts": True}
    assert "node 7 called unload_all_models() while it ran; the worker group stays" in result.stderr
