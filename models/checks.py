"""Checks of single request values, shared by the models' check_inputs; each message says what would work."""
from __future__ import annotations

import math
import numbers

MAX_SEED = 2 ** 64 - 1  # what torch.Generator.manual_seed accepts (KSampler's range)


def integer(name: str, value, lo: int, hi: int | None = None, hint: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        allowed = f"from {lo} to {hi}" if hi is not None else f"{lo} or more"
        raise ValueError(f"{name} must be {allowed}, got {value}" + (f"; {hint}" if hint else ""))


def number(name: str, value, lo: float, hint: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}" + (f"; {hint}" if hint else ""))
    if value < lo:
        raise ValueError(f"{name} must be {lo} or more, got {value}" + (f"; {hint}" if hint else ""))


def seed(value) -> None:
    integer("seed", value, 0, MAX_SEED, "any integer from 0 to 2**64 - 1 works")


def side(model: str, name: str, value, multiple: int, largest: int, why: str = "") -> None:
    """An image height or width: a multiple of `multiple`, from `multiple` to `largest`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{model} {name} must be an integer, got {value!r}")
    if value > largest:
        raise ValueError(f"{model} {name} must be at most {largest}, got {value}; use {largest} or less")
    if value < multiple or value % multiple:
        lo = max(multiple, int(value) - int(value) % multiple)
        hi = lo + multiple if int(value) > lo else lo
        nearest = f"{lo}" if lo == hi else f"{lo} or {hi}"
        raise ValueError(f"{model} {name} must be a multiple of {multiple}{why}, got {value}; use {nearest}")
