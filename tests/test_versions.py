"""The library internals the project relies on are all present in the installed libraries, and where one is not, or
a library's version is untested, the path built on them is off with a warning and the supported API runs instead."""
import warnings
from types import SimpleNamespace

import pytest
import torch
import transformers
from transformers.generation.utils import GenerationMixin

from comfyui_parallel_diffusion.models import internals, processors
from comfyui_parallel_diffusion.models.glm_image import ar_decode
from comfyui_parallel_diffusion.models.glm_image import model as glm_model
from comfyui_parallel_diffusion.models.glm_image import plan as glm_plan
from comfyui_parallel_diffusion.models.zimage import plan as zimage_plan
from comfyui_parallel_diffusion.parallel import versions
from comfyui_parallel_diffusion.parallel.comm import Comm
from comfyui_parallel_diffusion.parallel.layout import Layout

GATED = [versions.SYMMETRIC_MEMORY, internals.FAST_AR, internals.SEQUENCE_PARALLEL_ATTENTION]
ON_CUDA = SimpleNamespace(device=torch.device("cuda"))  # all ar_decode.enabled reads of a model
PUBLISHED_AR = SimpleNamespace(num_attention_heads=32, num_key_value_heads=2, intermediate_size=13696)


def untested(monkeypatch, package, version):
    """`package` reports `version`, as far as the gate asks."""
    installed = versions.installed_version
    monkeypatch.setattr(versions, "installed_version", lambda name: version if name == package else installed(name))


def fresh_gate(monkeypatch):
    """The gate as in a new process: nothing checked or warned yet."""
    monkeypatch.setattr(versions, "_checked", {})
    monkeypatch.setattr(versions, "_warned", set())


@pytest.mark.parametrize("internal", [i for path in GATED for i in path.internals] + list(
    versions.FUNCTIONAL_COLLECTIVES), ids=lambda i: i.target)
def test_every_internal_used_is_present_in_the_installed_libraries(internal):
    assert internal.problem() is None


@pytest.mark.parametrize("path", [internals.FAST_AR, internals.SEQUENCE_PARALLEL_ATTENTION], ids=lambda p: p.package)
def test_the_installed_transformers_and_diffusers_are_tested_versions(path):
    assert path.problems() == []


def test_version_minor():
    assert versions.minor("2.11.0+cu130") == "2.11"
    assert versions.minor("5.25.0.dev0") == "5.25"


def test_untested_transformers_turns_the_fast_ar_off_with_a_warning(monkeypatch):
    assert ar_decode.enabled(ON_CUDA)
    assert glm_model.ar_placement("auto", "cuda", 4, PUBLISHED_AR)[0] == 4
    untested(monkeypatch, "transformers", "5.99.0")
    with pytest.warns(RuntimeWarning, match=r"fast AR decoding is off: transformers 5.99.0 is untested.*plain"):
        assert not ar_decode.enabled(ON_CUDA)  # plain generate()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process
        assert not ar_decode.enabled(ON_CUDA)
    for ar in ("auto", "tensor_parallel"):  # sharded, the AR would need the fast loop: on GPU 0 instead
        n, message = glm_model.ar_placement(ar, "cuda", 4, PUBLISHED_AR)
        assert n == 1 and "rank 0 alone" in message


def test_a_missing_internal_turns_its_path_off(monkeypatch):
    monkeypatch.delattr(GenerationMixin, "_prefill")
    assert internals.FAST_AR.problems() == ["transformers.generation.utils.GenerationMixin._prefill is missing "
                                            "(type object 'GenerationMixin' has no attribute '_prefill')"]


def test_a_changed_signature_or_source_turns_its_path_off(monkeypatch):
    monkeypatch.setattr(GenerationMixin, "_prefill", lambda self, input_ids, model_kwargs, generation_config: None)
    monkeypatch.setattr(transformers.TopKLogitsWarper, "__init__", lambda self, top_k: None)
    problems = internals.FAST_AR.problems()
    assert len(problems) == 2
    assert "_prefill takes (self, input_ids, model_kwargs, generation_config), not" in problems[0]
    assert problems[1] == "transformers.TopKLogitsWarper.__init__ no longer uses self.top_k, self.filter_value"


@pytest.mark.parametrize("plan", [zimage_plan, glm_plan], ids=["zimage", "glm_image"])
def test_untested_diffusers_refuses_sequence_parallelism(monkeypatch, plan):
    """The DiT's plan consults the gate before sharding: the project's processors copy diffusers' 0.42 ones."""
    comm = Comm(Layout.for_world(2), 0, torch.device("cpu"), distributed=False)
    assert comm.layout.sp == 2
    fresh_gate(monkeypatch)
    untested(monkeypatch, "diffusers", "0.99.0")
    with pytest.warns(RuntimeWarning, match=r"copies of diffusers' attention processors is off: diffusers 0.99.0 "
                                            r"is untested.*cfg_parallel"):
        with pytest.raises(RuntimeError, match="sequence parallelism is off with this diffusers"):
            plan.apply_sequence_parallel(None, comm)  # refused before the model is read
    plan.apply_sequence_parallel(None, Comm(Layout.for_world(1), 0, torch.device("cpu"), distributed=False))


def test_a_changed_diffusers_processor_refuses_sequence_parallelism(monkeypatch):
    from diffusers.models.transformers.transformer_glm_image import GlmImageAttnProcessor
    monkeypatch.setattr(GlmImageAttnProcessor, "__call__", lambda self, attn, hidden_states, encoder_hidden_states,
                        attention_mask=None, image_rotary_emb=None, kv_cache=None: None)
    fresh_gate(monkeypatch)
    problems = internals.SEQUENCE_PARALLEL_ATTENTION.problems()
    assert len(problems) == 1 and "GlmImageAttnProcessor.__call__ no longer uses to_q" in problems[0]
    with pytest.warns(RuntimeWarning), pytest.raises(RuntimeError, match="GLM-Image: sequence parallelism is off"):
        processors.check_sequence_parallel("GLM-Image")


def test_untested_torch_keeps_small_all_reduces_on_nccl(monkeypatch):
    """enable_small_all_reduce consults the gate before touching symmetric memory (a CUDA-only path past it)."""
    comm = Comm(Layout.for_world(2), 0, torch.device("cuda"), distributed=False)
    monkeypatch.setattr(comm, "group_size", lambda group: 2)
    untested(monkeypatch, "torch", "2.99.0")
    with pytest.warns(RuntimeWarning, match="symmetric memory is off: torch 2.99.0 is untested.*stay on NCCL"):
        assert comm.enable_small_all_reduce("ar", torch.bfloat16) is False
