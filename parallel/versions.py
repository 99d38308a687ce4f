"""Library internals the project relies on, the versions they were tested with, and the gate that keeps a path
built on them off where they may have changed.

A Path names the private functions, attributes and signatures it reads or copies. It is taken only where the
installed library's minor version is one it was tested with and every internal is still there; elsewhere
`available()` warns once, naming the reason, and the caller takes the supported API instead (slower, the same
result), so a newer library costs speed, never a wrong image. tests/test_versions.py checks every Path against the
installed libraries and the gate itself. Models' paths are in models/internals.py; torch's are here.
"""
from __future__ import annotations

import importlib
import inspect
import logging
import warnings
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Internal:
    """`target`, a dotted name (module path, then attributes), must exist; `params`: its parameters begin with
    these names, in order; `mentions`: names its source must contain (attributes it sets or reads at run time)."""
    target: str
    params: tuple[str, ...] = ()
    mentions: tuple[str, ...] = ()

    def problem(self) -> str | None:
        try:
            obj = resolve(self.target)
        except (ImportError, AttributeError) as exc:
            return f"{self.target} is missing ({exc})"
        if self.params:
            names = parameter_names(obj)
            if tuple(names[:len(self.params)]) != self.params:
                return f"{self.target} takes ({', '.join(names)}), not ({', '.join(self.params)}, ...)"
        if self.mentions:
            source = inspect.getsource(obj)
            absent = [name for name in self.mentions if name not in source]
            if absent:
                return f"{self.target} no longer uses {', '.join(absent)}"
        return None


@dataclass(frozen=True)
class Path:
    name: str  # what the path does, for the warning
    package: str  # the library whose version is checked
    tested: tuple[str, ...]  # its minor versions ("5.24") the path was tested with
    internals: tuple[Internal, ...]
    fallback: str  # what runs instead, for the warning

    def problems(self) -> list[str]:
        """Why the path must not be taken with the installed libraries; empty where it may."""
        version = installed_version(self.package)
        found = [] if minor(version) in self.tested else [
            f"{self.package} {version} is untested (tested: {', '.join(self.tested)})"]
        return found + [p for p in (internal.problem() for internal in self.internals) if p]

    def available(self) -> bool:
        """Whether the path may be taken; warns once per process (and reason) where not. Checked once per installed
        version (reading sources takes about 0.1 s)."""
        key = (self.name, installed_version(self.package))
        if key not in _checked:
            _checked[key] = self.problems()
        problems = _checked[key]
        if problems:
            message = f"{self.name} is off: {'; '.join(problems)}. {self.fallback}"
            if message not in _warned:
                _warned.add(message)
                log.warning(message)
                warnings.warn(message, RuntimeWarning, stacklevel=2)
        return not problems


_checked: dict[tuple[str, str], list[str]] = {}
_warned: set[str] = set()


def installed_version(package: str) -> str:
    return importlib.import_module(package).__version__


def minor(version: str) -> str:
    """'2.11.0+cu130' -> '2.11'."""
    return ".".join(version.split("+")[0].split(".")[:2])


def resolve(target: str):
    """The object a dotted name names: the longest importable module prefix, then attributes."""
    parts = target.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            if i == 1:
                raise
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(target)


def parameter_names(obj) -> list[str]:
    """A Python callable's parameters, or a torch operator's schema arguments."""
    schema = getattr(getattr(obj, "default", None), "_schema", None)
    if schema is not None:
        return [argument.name for argument in schema.arguments]
    return list(inspect.signature(obj).parameters)


# comm.py: small sums through CUDA symmetric memory, torch's private one-shot all-reduce (measured on torch 2.11).
SYMMETRIC_MEMORY = Path(
    name="Small all-reduces through CUDA symmetric memory",
    package="torch",
    tested=("2.11",),
    internals=(
        Internal("torch.distributed._symmetric_memory.enable_symm_mem_for_group", ("group_name",)),
        Internal("torch.distributed._symmetric_memory.empty", ("size", "dtype", "device")),
        Internal("torch.distributed._symmetric_memory.rendezvous", ("tensor", "group")),
        Internal("torch.ops.symm_mem.one_shot_all_reduce_copy",
                 ("symm_buffer", "local_input", "reduce_op", "group_name")),
    ),
    fallback="All-reduces stay on NCCL.",
)

# comm.py: collectives torch.compile traces into a graph. Not gated: requirements.txt bounds torch (< 2.14), a
# missing one fails loudly (at import or at the call), and test_versions.py checks them in the installed torch.
FUNCTIONAL_COLLECTIVES = (
    Internal("torch.distributed._functional_collectives.all_reduce", ("self", "reduceOp", "group")),
    Internal("torch.distributed._functional_collectives.all_gather_tensor", ("self", "gather_dim", "group")),
    Internal("torch.distributed._functional_collectives.broadcast", ("self", "src", "group")),
)
