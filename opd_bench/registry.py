"""One generic registry for plugins: method plugins, task cards.

Plugins come from three places, in this order (a later one may not silently replace an earlier one):
  1. the package's own `opd_bench/methods/*.py` and `opd_bench/tasks/*.yaml` (they ship in the wheel);
  2. extra folders listed in the environment variable OPD_BENCH_PLUGIN_PATH (os.pathsep-separated),
     each searched for `methods/*.py` and `tasks/*.yaml`, or holding such files directly;
  3. installed packages' entry points in the groups `opd_bench.methods` and `opd_bench.tasks`.
A method file registers itself by calling `opd_bench.methods.base.register(method)`; a task card is a
YAML file whose `name` is its key.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Generic, TypeVar

from opd_bench.errors import UserError, did_you_mean

T = TypeVar("T")
PACKAGE = Path(__file__).resolve().parent


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}
        self._origin: dict[str, str] = {}

    def register(self, name: str, item: T, origin: str = "") -> T:
        if name in self._items and self._origin.get(name) != origin:
            raise UserError(f"{self.kind} {name!r} is defined twice ({self._origin[name]} and {origin}); "
                            f"rename one of them")
        self._items[name] = item
        self._origin[name] = origin
        return item

    def get(self, name: str) -> T:
        discover()
        if name not in self._items:
            raise UserError(f"unknown {self.kind} {name!r}{did_you_mean(name, self._items)}; "
                            f"`opd-bench list` shows them all")
        return self._items[name]

    def names(self) -> list[str]:
        discover()
        return sorted(self._items)

    def origin(self, name: str) -> str:
        return self._origin.get(name, "")


METHODS: Registry = Registry("method")
TASKS: Registry = Registry("task")


def plugin_folders() -> list[Path]:
    """Extra folders named by OPD_BENCH_PLUGIN_PATH (the built-in plugins are the package's own)."""
    return [Path(p) for p in os.environ.get("OPD_BENCH_PLUGIN_PATH", "").split(os.pathsep) if p]


_discovered: set[tuple[str, ...]] = set()


def discover() -> None:
    """Load every plugin once per distinct plugin path (tests may change OPD_BENCH_PLUGIN_PATH)."""
    key = tuple(str(p) for p in plugin_folders())
    if key in _discovered:
        return
    _discovered.add(key)
    from opd_bench.tasks import load_card  # the task-card schema lives with the tasks

    for path in sorted((PACKAGE / "methods").glob("*.py")):
        if not path.name.startswith("_"):
            importlib.import_module(f"opd_bench.methods.{path.stem}")
    for path in sorted((PACKAGE / "tasks").glob("*.yaml")):
        card = load_card(path)
        TASKS.register(card.name, card, origin=str(path))
    for folder in plugin_folders():
        for path in sorted(_glob(folder, "methods", "*.py")):
            _import_file(path)
        for path in sorted(_glob(folder, "tasks", "*.yaml")):
            card = load_card(path)
            TASKS.register(card.name, card, origin=str(path))
    for ep in entry_points(group="opd_bench.methods"):
        obj = ep.load()
        if ep.name not in METHODS._items:  # a module that registered itself on import is fine
            METHODS.register(ep.name, obj, origin=f"entry point {ep.value}")
    for ep in entry_points(group="opd_bench.tasks"):
        card = ep.load()
        card = load_card(Path(card)) if isinstance(card, (str, Path)) else card
        TASKS.register(card.name, card, origin=f"entry point {ep.value}")


def _glob(folder: Path, sub: str, pattern: str):
    inner = folder / sub
    paths = list(inner.glob(pattern)) if inner.is_dir() else []
    paths += list(folder.glob(pattern))  # an extra folder may hold plugin files directly
    return [p for p in paths if not p.name.startswith("_")]


def _import_file(path: Path) -> None:
    # Loaded under a private name: no top-level `methods` package is ever installed or shadowed.
    name = f"opd_bench_plugins.{path.parent.name}.{path.stem}".replace("-", "_")
    if name in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
