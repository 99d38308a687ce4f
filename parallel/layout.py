"""How a world of ranks is split: world = cfg x ulysses, and the checks a requested split must pass."""
from __future__ import annotations

from dataclasses import dataclass


class LayoutError(ValueError):
    """A parallel layout that cannot run; the message says what would work instead."""


@dataclass(frozen=True)
class Layout:
    world_size: int = 1
    cfg: int = 1  # 2: the conditional and unconditional branches run on different rank groups
    ulysses: int = 1  # sequence-parallel degree by all-to-all over attention heads

    @classmethod
    def for_world(cls, world_size: int, cfg: int = 1, ulysses: int | None = None) -> "Layout":
        """Fill in the Ulysses degree from the others (the common case: the user names GPUs and cfg only)."""
        if world_size < 1:
            raise LayoutError(f"world size must be >= 1, got {world_size}")
        if ulysses is None:
            if world_size % cfg:
                raise LayoutError(
                    f"world size {world_size} is not divisible by cfg {cfg}; try cfg in {_divisors(world_size)}"
                )
            ulysses = world_size // cfg
        layout = cls(world_size, cfg, ulysses)
        layout.check()
        return layout

    @property
    def sp(self) -> int:
        """The sequence-parallel degree: Ulysses covers every degree (heads are padded)."""
        return self.ulysses

    def check(self) -> None:
        for name in ("cfg", "ulysses"):
            if getattr(self, name) < 1:
                raise LayoutError(f"{name} degree must be >= 1, got {getattr(self, name)}")
        if self.cfg not in (1, 2):
            raise LayoutError(f"cfg degree must be 1 or 2 (two guidance branches), got {self.cfg}")
        if self.cfg * self.ulysses != self.world_size:
            raise LayoutError(
                f"cfg {self.cfg} x ulysses {self.ulysses} = {self.cfg * self.ulysses}, but the world size is "
                f"{self.world_size}; "
                f"for {self.world_size} ranks use e.g. {_suggest(self.world_size)}"
            )

    def check_devices(self, device: str, available: int) -> None:
        """More ranks than GPUs would put two ranks on one GPU: refuse with the number present."""
        if device == "cuda" and self.world_size > available:
            raise LayoutError(
                f"{self.world_size} ranks requested but only {available} CUDA GPU(s) are visible; "
                f"use a world size of at most {available}"
            )

    def check_branches(self, branches: int) -> None:
        """CFG-parallel needs two branches: with guidance off there is only one."""
        if self.cfg > 1 and branches < 2:
            raise LayoutError(
                f"cfg degree {self.cfg} needs classifier-free guidance (two branches per step), but this run has "
                f"one; use cfg 1 (ulysses {self.world_size}) or a guidance that enables CFG"
            )

    def describe(self) -> str:
        return f"{self.world_size} rank(s): cfg {self.cfg} x ulysses {self.ulysses}"


def _divisors(n: int) -> list[int]:
    return [d for d in (1, 2) if n % d == 0]


def _suggest(world_size: int) -> str:
    options = [f"ulysses {world_size}"]
    if world_size % 2 == 0 and world_size > 1:
        options.append(f"cfg 2 x ulysses {world_size // 2}")
    return " or ".join(options)
