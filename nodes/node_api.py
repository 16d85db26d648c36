"""ComfyUI's versioned node API, as the pack uses it: the one place that names the version.

``comfy_api.v0_0_2`` is the newest version module that every supported ComfyUI ships (0.3.64,
0.8.0 and 0.33.0 each have ``v0_0_1``, ``v0_0_2`` and ``latest``; ``latest`` moves with ComfyUI,
a version module is its promise). Every node of the pack is an ``io.ComfyNode`` declared by
``define_schema``; ``comfy_entrypoint`` (the pack's ``__init__.py``) returns ``PackExtension``.

The Train nodes' inputs are declared without ComfyUI in ``train_inputs`` (tests read them there);
``schema_inputs`` turns those declarations into the schema's inputs, so they are written once.
"""
from __future__ import annotations

import importlib
import pkgutil

from comfy_api.v0_0_2 import ComfyExtension, io, ui

from .train_inputs import Input

__all__ = ["ComfyExtension", "io", "ui", "PackExtension", "schema_inputs", "schema_outputs", "pack_nodes"]

# train_inputs' option names -> the io inputs' keyword arguments (where they differ)
_KEYWORDS = {"forceInput": "force_input"}
_WIDGETS = {"INT": io.Int, "FLOAT": io.Float, "STRING": io.String, "BOOLEAN": io.Boolean}


def schema_input(name: str, declared: Input, optional: bool, model_files):
    """One ``train_inputs.Input`` as the io input ComfyUI reads (``model_files(folder)``: the file
    names of a ComfyUI models folder)."""
    options = {_KEYWORDS.get(key, key): value for key, value in declared.options.items()}
    choices = declared.choices(model_files)
    if choices is not None:
        return io.Combo.Input(name, options=choices, optional=optional, **options)
    kind = _WIDGETS.get(declared.kind) or io.Custom(declared.kind)
    return kind.Input(name, optional=optional, **options)


def schema_inputs(inputs: dict, model_files) -> list:
    """The io inputs of a Train node's ``train_inputs`` declaration, required then optional, in order."""
    return [schema_input(name, declared, group == "optional", model_files)
            for group in ("required", "optional") for name, declared in inputs[group].items()]


def schema_outputs(outputs) -> list:
    """io outputs of (name, type, tooltip) triples. The name is the output's display name (what
    RETURN_NAMES was); ids are left to ComfyUI, since an output may share its name with an input."""
    return [io.Custom(kind).Output(display_name=name, tooltip=tooltip) for name, kind, tooltip in outputs]


def pack_nodes() -> list:
    """Every node class of the pack: the ``NODES`` of each module of this package (importing them
    also registers the routes and the mediapipe models folder)."""
    from . import __path__ as package_path

    found = []
    for info in sorted(pkgutil.iter_modules(package_path), key=lambda m: m.name):
        if not info.name.startswith("_"):
            found += getattr(importlib.import_module(f"{__package__}.{info.name}"), "NODES", [])
    return found


class PackExtension(ComfyExtension):
    async def get_node_list(self) -> list:
        return pack_nodes()
