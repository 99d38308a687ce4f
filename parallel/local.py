"""Runs stages in this process, world size 1: the single-process reference path, and the 1-GPU path of the nodes."""
from __future__ import annotations

from types import ModuleType
from typing import Any, Callable

import torch

from .comm import Comm
from .executor import execute
from .layout import Layout
from .stage import StageContext


class LocalRunner:
    def __init__(self, plugin: ModuleType, device: str = "cpu", dtype: torch.dtype = torch.float32):
        self.layout = Layout()
        self.stages = plugin.STAGES
        self.loaders = plugin.LOADERS
        self.ctx = StageContext(comm=Comm.single(device), dtype=dtype)
        self.models: dict[str, tuple[tuple, Any]] = {}

    def load(self, key: str, loader: str, **args: Any) -> None:
        spec = (loader, tuple(sorted(args.items())))
        if key in self.models and self.models[key][0] == spec:
            return
        self.models[key] = (spec, self.loaders[loader].fn(self.ctx, **args))

    def unload(self, key: str | None = None) -> None:
        for k in [key] if key else list(self.models):
            self.models.pop(k, None)

    def run(self, stage: str, model_key: str | None, inputs: dict[str, Any], *,
            on_progress: Callable[[str, int, int], None] | None = None,
            should_cancel: Callable[[], bool] | None = None, collect: str = "main") -> Any:
        self.ctx.report = on_progress or (lambda what, done, total: None)
        self.ctx.cancel_requested = should_cancel or (lambda: False)
        model = self.models[model_key][1] if model_key else None
        result = execute(self.stages[stage], self.ctx, model, inputs)
        return [result] if collect == "all" else result

    def close(self) -> None:
        self.models.clear()
