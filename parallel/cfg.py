"""CFG parallelism: the guidance branches of one step run on different rank groups and are exchanged once."""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from .comm import Comm


def run_branches(comm: Comm, branches: Sequence[Callable[[], torch.Tensor]]) -> list[torch.Tensor]:
    """Evaluate every branch (e.g. [conditional, unconditional]) and return all results on every rank.

    With cfg degree 2, cfg group i evaluates branch i only and one all-gather shares the predictions."""
    if comm.layout.cfg == 1 or len(branches) == 1:
        return [branch() for branch in branches]
    if len(branches) != comm.layout.cfg:
        raise ValueError(f"cfg degree {comm.layout.cfg} needs {comm.layout.cfg} branches, got {len(branches)}")
    mine = branches[comm.cfg_rank]()
    return list(comm.all_gather(mine.unsqueeze(0), "cfg", dim=0).unbind(0))
