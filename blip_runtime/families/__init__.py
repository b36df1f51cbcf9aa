"""The runtime's model families: a bundle's manifest "family" -> the module that runs it.

Each module (imported only when a bundle of its family is opened) exposes:
  dims_from_dict(data) -> the family's dims object (from the manifest's "dims"),
  axes(dims, limits) -> {axis: (min, opt, max)} of its graphs' symbolic axes,
  more_profiles(graph, dims, limits) (optional) -> further axes dicts, one more TensorRT optimization
    profile each, for a graph whose calls come in shapes far apart (the runtime runs each call on the
    first profile that holds it),
  runtime_class() -> its BlipRuntime subclass (the task API),
  MANIFEST_SCHEMA: extra (key, JSON type, required) rows of the manifest schema (e.g. its dims).
Adding a family: its folder and one line here.
"""

from __future__ import annotations

import importlib
from types import ModuleType

FAMILIES = {
    "blip": "blip_runtime.families.blip",
    "blip-2": "blip_runtime.families.blip2",
}


class UnknownFamily(ValueError):
    pass


def family(name: str) -> ModuleType:
    """The module of family `name`; UnknownFamily (one line, listing the known ones) otherwise."""
    module = FAMILIES.get(name) if isinstance(name, str) else None
    if module is None:
        raise UnknownFamily(f"family {name!r} is not one this runtime knows (it knows {', '.join(map(repr, sorted(FAMILIES)))})")
    return importlib.import_module(module)
