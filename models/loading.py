"""Loading diffusers model folders, shared by the Z-Image and GLM-Image loaders.

A user's folder is checked before anything heavy is loaded, so a wrong or half-downloaded folder gives one clear
line instead of a traceback minutes into loading a 6 B model. Components load one at a time (GLM-Image's rank 0
alone loads the AR model), from safetensors only: pickle files (.bin, .pt, .ckpt) can run code and are never read.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import struct
from pathlib import Path

import diffusers
import torch
import transformers

from . import weights

# Only classes from these libraries (and diffusers' pipeline packages) are instantiated from a folder's
# model_index.json: the index is user data.
TRUSTED_LIBRARIES = ("diffusers", "transformers")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# A causal LM's checkpoint holds its output head; loaded as the bare encoder (Qwen3Model), that head is unused.
CAUSAL_LM_HEAD = "lm_head.weight"


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
    dtype = dtype or torch.float32
    device = torch.device(device or "cpu")
    if issubclass(cls, diffusers.ModelMixin):
        return load_diffusers_model(cls, cls.load_config(folder), sorted(folder.glob("*.safetensors")),
                                    dtype, device, source=str(folder))
    config = cls.config_class.from_pretrained(folder, local_files_only=True)
    model = load_transformers_model(cls, config, sorted(folder.glob("*.safetensors")), dtype, device,
                                    source=str(folder), unused=(CAUSAL_LM_HEAD,))
    if model.can_generate() and (folder / "generation_config.json").is_file():
        # as from_pretrained: the checkpoint's sampling settings (a model built from its config has defaults)
        model.generation_config = transformers.GenerationConfig.from_pretrained(folder, local_files_only=True)
    return model


def model_config(path, name: str):
    """A diffusers model component's config as the loaded model carries it (defaults filled in), without reading
    its weights: for ranks that need a model's settings but not the model."""
    root = Path(path)
    library, class_name = _components(_read_index(root))[name]
    cls = _resolve_class(root, name, library, class_name)
    return weights.empty_model(lambda: cls.from_config(cls.load_config(root / name))).config


def load_diffusers_model(cls, config: dict, files: list[Path], dtype: torch.dtype, device: torch.device, *,
                         source: str, tensors=None):
    """A diffusers model built on the meta device from `config` and filled from `files` (models/weights.py),
    or from `tensors` ((name, tensor) pairs, e.g. converted from another layout)."""
    model = weights.empty_model(lambda: cls.from_config(config))
    if tensors is None:
        tensors = weights.tensors(weights.headers(files), device)
    return weights.fill(model, tensors, source=source, device=device, dtype=dtype).eval()


def load_transformers_model(cls, config, files: list[Path], dtype: torch.dtype, device: torch.device, *,
                            source: str, unused: tuple[str, ...] = ()):
    """A transformers model built on `device` (its non-persistent buffers, such as rotary frequencies, are computed
    by its own constructor there) and filled from `files`. A bare model (e.g. Qwen3Model) also loads from its causal
    LM's checkpoint, whose keys carry the base model's prefix ("model."), as transformers' from_pretrained allows;
    `unused` names the tensors such a file holds that the bare model has no place for (its output head)."""
    with torch.device(device), default_dtype(dtype):  # as from_pretrained(dtype=...) builds: one copy, in dtype
        model = cls(config)
    infos = weights.headers(files)
    unused = tuple(k for k in unused if k not in model.state_dict())
    prefix = f"{cls.base_model_prefix}."
    strip = not any(k.startswith(prefix) for k in model.state_dict()) and all(
        k.startswith(prefix) or k in unused for k in infos)
    tensors = ((k.removeprefix(prefix) if strip else k, tensor)
               for k, tensor in weights.tensors({k: info for k, info in infos.items() if k not in unused}, device))
    return weights.fill(model, tensors, source=source, device=device, dtype=dtype).eval()


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """torch's default dtype set for building a model in it, as transformers' from_pretrained(dtype=...) does."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


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
