"""The model folders a loader offers: diffusers folders (a model_index.json) under ComfyUI's "diffusers" model
paths (models/diffusers and extra_model_paths.yaml), filtered by the pipeline class the index names.

folder_paths.get_filename_list("diffusers") lists files only (its extension "folder" matches none), so the folders
are walked here, as ComfyUI's own DiffusersLoader does. INPUT_TYPES calls this on every /object_info and prompt
validation: a folder added while ComfyUI runs shows up on the next refresh."""
from __future__ import annotations

import os

import folder_paths

from ..models.loading import ModelFolderError, detect_pipeline

FOLDER_KIND = "diffusers"
INDEX = "model_index.json"


def list_model_folders(pipeline: str) -> list[str]:
    """Names (paths relative to their diffusers root, "/"-separated) of the folders holding `pipeline`."""
    names: list[str] = []
    for root in folder_paths.get_folder_paths(FOLDER_KIND):
        if not os.path.isdir(root):
            continue
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            if INDEX not in filenames:
                dirnames.sort()
                continue
            dirnames[:] = []  # a pipeline's component folders are not pipelines
            try:
                if detect_pipeline(dirpath) != pipeline:
                    continue
            except ModelFolderError:
                continue
            name = os.path.relpath(dirpath, root).replace(os.sep, "/")
            if name != "." and name not in names:
                names.append(name)
    return sorted(names)


def model_folder_path(name: str) -> str:
    """The folder a combo value names: the first diffusers root that has it (as the list above found it)."""
    parts = name.replace("\\", "/").split("/")
    if not name or os.path.isabs(name) or ".." in parts:
        raise ModelFolderError(f"{name!r} is not a model folder name under models/{FOLDER_KIND}")
    for root in folder_paths.get_folder_paths(FOLDER_KIND):
        path = os.path.join(root, *parts)
        if os.path.isfile(os.path.join(path, INDEX)):
            return os.path.abspath(path)
    roots = ", ".join(folder_paths.get_folder_paths(FOLDER_KIND))
    raise ModelFolderError(f"no model folder {name!r} (with {INDEX}) under {roots}")
