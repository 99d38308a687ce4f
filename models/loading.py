"""Loading diffusers model folders, shared by the Z-Image and GLM-Image loaders.

A user's folder is checked before anything heavy is loaded, so a wrong or half-downloaded folder gives one clear
line instead of a traceback minutes into loading a 6 B model. Components load one at a time (GLM-Image's rank 0
alone loads the AR model), from safetensors only: pickle files (.bin, .pt, .ckpt) can run code and are never read.
Z-Image can also be loaded from the single files ComfyUI users keep (load_zimage_single_files).
"""
from __future__ import annotations

import importlib
import json
import struct
from pathlib import Path

import torch

# Only classes from these libraries (and diffusers' pipeline packages) are instantiated from a folder's
# model_index.json: the index is user data.
TRUSTED_LIBRARIES = ("diffusers", "transformers")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


class ModelFolderError(ValueError):
    """A model folder that cannot be loaded; the message is one line naming the folder and what is wrong."""


def detect_pipeline(path) -> str:
    """The diffusers pipeline class a model folder holds, e.g. "ZImagePipeline", from its model_index.json."""
    return _read_index(Path(path))["_class_name"]


def inspect_model_folder(path, expected_pipeline: str) -> dict[str, tuple[str, str]]:
    """Check that `path` is a complete diffusers folder of `expected_pipeline`.

    Returns the components its model_index.json lists, {name: (library, class name)}, optional (null) ones left
    out. Raises ModelFolderError for the first problem found."""
    root = Path(path)
    index = _read_index(root)
    if index["_class_name"] != expected_pipeline:
        raise ModelFolderError(f"{root} holds a {index['_class_name']}, not a {expected_pipeline}")
    components = _components(index)
    for name, (_, class_name) in components.items():
        _check_component(root, name, class_name)
    return components


def load_component(path, name: str, dtype: torch.dtype | None = None, device=None, *, cls=None):
    """Load one component of a diffusers folder: a model (safetensors only), a tokenizer, processor or scheduler.

    `cls` defaults to the class model_index.json names. `dtype` and `device` apply to models only; dtype None
    keeps the library's default. The folder is read locally: nothing is looked up on the Hub."""
    root = Path(path)
    components = _components(_read_index(root))
    if name not in components:
        raise ModelFolderError(f"{root}/model_index.json lists no component '{name}'")
    library, class_name = components[name]
    _check_component(root, name, class_name)
    cls = cls or _resolve_class(root, name, library, class_name)
    folder = root / name
    if not issubclass(cls, torch.nn.Module):
        return cls.from_pretrained(folder, local_files_only=True)
    kwargs = {} if dtype is None else {"dtype": dtype}
    model = cls.from_pretrained(folder, use_safetensors=True, local_files_only=True, **kwargs)
    return model.to(device) if device is not None else model


# -- model_index.json ------------------------------------------------------------------------------------------

def _read_index(root: Path) -> dict:
    if not root.is_dir():
        what = "it is a file" if root.is_file() else "it does not exist"
        raise ModelFolderError(f"{root} is not a diffusers model folder: {what}")
    index_file = root / "model_index.json"
    if not index_file.is_file():
        raise ModelFolderError(f"{root} is not a diffusers model folder: no model_index.json")
    try:
        index = json.loads(index_file.read_text())
    except (OSError, ValueError) as exc:
        raise ModelFolderError(f"{index_file} cannot be read: {exc}") from None
    if not isinstance(index, dict) or not isinstance(index.get("_class_name"), str):
        raise ModelFolderError(f"{index_file} names no pipeline (_class_name)")
    return index


def _components(index: dict) -> dict[str, tuple[str, str]]:
    """Entries of the form "name": [library, class]; keys starting with "_" are metadata, [null, null] is absent."""
    return {
        name: (value[0], value[1])
        for name, value in index.items()
        if not name.startswith("_") and isinstance(value, list) and len(value) == 2 and value[1] is not None
    }


def _resolve_class(root: Path, name: str, library: str, class_name: str) -> type:
    module = _trusted_module(library)
    if module is None:
        raise ModelFolderError(
            f"{root} component '{name}' is a {library}.{class_name}; only diffusers and transformers classes load")
    cls = getattr(module, class_name, None)
    if cls is None:
        raise ModelFolderError(f"{root} component '{name}' needs {library}.{class_name}, which the installed "
                               f"{library} lacks (too old?)")
    return cls


def _trusted_module(library: str):
    """diffusers or transformers, or a diffusers pipeline package: diffusers saves a transformers class whose module
    path contains a pipeline's name (transformers.models.glm_image) under that name ("glm_image"), and resolves
    it the same way when loading."""
    if library in TRUSTED_LIBRARIES:
        return importlib.import_module(library)
    import diffusers.pipelines

    module = getattr(diffusers.pipelines, library, None) if library.isidentifier() else None
    is_pipeline_package = getattr(module, "__name__", None) == f"diffusers.pipelines.{library}"
    return module if is_pipeline_package else None


# -- component folders -----------------------------------------------------------------------------------------

def _check_component(root: Path, name: str, class_name: str) -> None:
    kind = _kind(class_name)
    if kind == "model":
        _check_weights(root, name)
        return
    wanted = _CONFIG_FILES[kind]
    if not any((root / name / file).is_file() for file in wanted):
        raise ModelFolderError(f"{root} is missing component '{name}' (no folder {name}/ with {' or '.join(wanted)})")


# What a non-model component must hold; tokenizers and processors save a config next to their vocab files.
_CONFIG_FILES = {
    "scheduler": ("scheduler_config.json",),
    "tokenizer": ("tokenizer_config.json",),
    "processor": ("processor_config.json", "preprocessor_config.json"),
}


def _kind(class_name: str) -> str:
    """By class name, since the classes themselves need not be imported to check a folder."""
    if "Scheduler" in class_name:
        return "scheduler"
    if "Tokenizer" in class_name:
        return "tokenizer"
    if "Processor" in class_name or "FeatureExtractor" in class_name:
        return "processor"
    return "model"


def _check_weights(root: Path, name: str) -> None:
    folder = root / name
    weights = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not (folder / "config.json").is_file() or not (weights or _pickle_weights(folder)):
        raise ModelFolderError(
            f"{root} is missing component '{name}' (no folder {name}/ with config.json and *.safetensors)")
    if not weights:
        raise ModelFolderError(f"{folder} has only {_pickle_weights(folder)[0].suffix} weights; "
                               f"convert to safetensors (pickle is never loaded)")
    _check_shards_present(folder)
    for file in weights:
        _check_safetensors_complete(file)


def _pickle_weights(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if f.suffix in PICKLE_SUFFIXES) if folder.is_dir() else []


def _check_shards_present(folder: Path) -> None:
    """A sharded model lists its shards in *.safetensors.index.json; a partial download lacks some."""
    for index_file in folder.glob("*.safetensors.index.json"):
        try:
            shards = set(json.loads(index_file.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            raise ModelFolderError(f"{index_file} cannot be read: {exc!r}") from None
        missing = sorted(shard for shard in shards if not (folder / shard).is_file())
        if missing:
            raise ModelFolderError(f"{folder} is incomplete: {len(missing)} of {len(shards)} shards named in "
                                   f"{index_file.name} are missing, e.g. {missing[0]}")


def _check_safetensors_complete(file: Path) -> None:
    """Compare the size the header promises with the file's: catches truncated downloads and Git LFS pointers
    while reading only the header."""
    size = file.stat().st_size
    try:
        with file.open("rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(header_len))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, struct.error) as exc:
        raise ModelFolderError(f"{file} is not a safetensors file ({exc}); download it again") from None
    if size < 8 + header_len + end:
        raise ModelFolderError(f"{file} is truncated ({size} of {8 + header_len + end} bytes); download it again")


# -- Z-Image from ComfyUI's single files -------------------------------------------------------------------------

# What ZImagePipeline renders for one user message with enable_thinking=True, as Qwen3's own template does. Set on
# every Z-Image tokenizer loaded from single files: ComfyUI's Qwen tokenizer folder carries Qwen2.5's template, which
# adds a system prompt the model was not trained with.
ZIMAGE_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)


def load_zimage_single_files(transformer_path, text_encoder_path=None, vae_path=None, *, config_folder,
                             tokenizer_folder=None, dtype: torch.dtype | None = None, device=None) -> dict:
    """Z-Image from ComfyUI's single files: diffusion_models/z_image_turbo_bf16.safetensors (original Z-Image keys),
    text_encoders/qwen_3_4b.safetensors (transformers Qwen3 keys) and vae/ae.safetensors (Flux's original VAE keys).

    Single files carry no configs: they come from `config_folder`, a diffusers Z-Image folder of which only the
    configs of transformer/, vae/, text_encoder/ and scheduler/ are read (its weights, if any, are not). The
    tokenizer comes from `tokenizer_folder` (default config_folder/tokenizer; ComfyUI's qwen25_tokenizer fits too).
    Returns ZImagePipeline's keyword arguments: transformer and scheduler, text_encoder and tokenizer when
    text_encoder_path is given, vae when vae_path is given. dtype None keeps the files' dtype."""
    configs = Path(config_folder)
    tokenizer_folder = Path(tokenizer_folder or configs / "tokenizer")
    # Everything is checked before anything is read: a wrong path is found in a second, not after 12 GB.
    wanted = {"transformer": transformer_path, "vae": vae_path, "text_encoder": text_encoder_path}
    wanted = {name: Path(path) for name, path in wanted.items() if path is not None}
    for name, path in wanted.items():
        _config_dir(configs, name)
        _check_single_file(path)
    _config_dir(configs, "scheduler", "scheduler_config.json")
    if "text_encoder" in wanted and not (tokenizer_folder / "tokenizer_config.json").is_file():
        raise ModelFolderError(f"{tokenizer_folder} is not a tokenizer folder (no tokenizer_config.json); "
                               f"the text encoder needs Qwen's tokenizer")

    loaders = {"transformer": _load_zimage_transformer, "vae": _load_flux_vae, "text_encoder": _load_qwen3}
    components = {name: loaders[name](path, configs / name, dtype, device) for name, path in wanted.items()}
    components["scheduler"] = _load_scheduler(configs / "scheduler")
    if "text_encoder" in wanted:
        components["tokenizer"] = _load_zimage_tokenizer(tokenizer_folder)
    return components


def _config_dir(configs: Path, name: str, file: str = "config.json") -> Path:
    if not (configs / name / file).is_file():
        raise ModelFolderError(f"{configs} has no {name}/{file}, which the single files need")
    return configs / name


def _check_single_file(file: Path) -> None:
    if not file.is_file():
        raise ModelFolderError(f"{file} does not exist")
    if file.suffix != ".safetensors":
        raise ModelFolderError(f"{file} is not a .safetensors file; convert it (pickle is never loaded)")
    _check_safetensors_complete(file)


def _load_zimage_transformer(path: Path, config_dir: Path, dtype, device):
    from diffusers import ZImageTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers

    state = convert_z_image_transformer_checkpoint_to_diffusers(_read(path))
    return _load_diffusers_model(ZImageTransformer2DModel, config_dir, path, state, dtype, device)


def _load_flux_vae(path: Path, config_dir: Path, dtype, device):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    state = convert_ldm_vae_checkpoint(_read(path), AutoencoderKL.load_config(config_dir))
    return _load_diffusers_model(AutoencoderKL, config_dir, path, state, dtype, device)


def _load_diffusers_model(cls, config_dir: Path, path: Path, state: dict, dtype, device):
    """The model is built on the meta device and takes the converted tensors as its weights. Keys and shapes must
    match exactly: diffusers' from_single_file would leave missing weights on meta and only log extra ones."""
    with torch.device("meta"):
        model = cls.from_config(cls.load_config(config_dir))
    _check_keys(path, cls.__name__, model.state_dict(), state)
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, assign=True)
    return model.eval()


def _load_qwen3(path: Path, config_dir: Path, dtype, device):
    from transformers import Qwen3Config, Qwen3Model

    config = Qwen3Config.from_pretrained(config_dir, local_files_only=True)
    # ComfyUI's file has Qwen3ForCausalLM's keys: "model." prefixed, maybe a (tied, unused) lm_head.
    state = {k.removeprefix("model."): v for k, v in _read(path).items() if not k.startswith("lm_head.")}
    with torch.device("meta"):
        expected = Qwen3Model(config).state_dict()
    _check_keys(path, "Qwen3Model", expected, state)
    # from_pretrained, not load_state_dict: it also builds the rotary embedding's non-persistent buffers.
    kwargs = {} if dtype is None else {"dtype": dtype}
    model = Qwen3Model.from_pretrained(None, config=config, state_dict=state, **kwargs)
    return model.to(device) if device is not None else model


def _load_scheduler(config_dir: Path):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_pretrained(config_dir, local_files_only=True)


def _load_zimage_tokenizer(folder: Path):
    from transformers import Qwen2Tokenizer

    tokenizer = Qwen2Tokenizer.from_pretrained(folder, local_files_only=True)
    tokenizer.chat_template = ZIMAGE_CHAT_TEMPLATE
    return tokenizer


def _read(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


def _check_keys(path: Path, class_name: str, expected: dict, state: dict) -> None:
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise ModelFolderError(f"{path} is not a {class_name} checkpoint: {len(missing)} weights missing "
                               f"{missing[:1]}, {len(unexpected)} unexpected {unexpected[:1]}")
    wrong = next((k for k in expected if expected[k].shape != state[k].shape), None)
    if wrong:
        raise ModelFolderError(f"{path} does not fit the {class_name} config: {wrong} is "
                               f"{tuple(state[wrong].shape)}, the config wants {tuple(expected[wrong].shape)}")
