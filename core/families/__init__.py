"""Model families: one small module per architecture behind ``base.ModelFamily``.

``family_of(pipe, device)`` returns the family bound to a loaded diffusers pipeline;
``architecture_of(pipe)`` only its name (``sd15``, ``sdxl``, ``flux``, ``zimage``). A new family is a module
with a ``ModelFamily`` subclass and an entry in ``FAMILIES`` (and, if its denoiser config is
new, a line in ``base.denoiser_architecture``).
"""
from __future__ import annotations

import torch

from .base import Conditioning, ModelFamily, denoiser_architecture
from .flux import FluxFamily
from .sd3 import SD3Family
from .unet import UNetFamily
from .zimage import ZImageFamily

FAMILIES = {"sd15": UNetFamily, "sdxl": UNetFamily, "flux": FluxFamily, "zimage": ZImageFamily,
            "sd3": SD3Family}
LORA_PREFIXES = {name: family.lora_prefix for name, family in FAMILIES.items()}


def denoiser_of(pipe) -> torch.nn.Module:
    """The pipeline's denoiser: its transformer (Flux, Z-Image) or its UNet."""
    return pipe.transformer if getattr(pipe, "transformer", None) is not None else pipe.unet


def architecture_of(pipe) -> str:
    """'sd15', 'sdxl', 'flux' or 'zimage', read from the pipeline's denoiser config."""
    return denoiser_architecture(denoiser_of(pipe))


def family_of(pipe, device: str | torch.device = "cpu") -> ModelFamily:
    return FAMILIES[architecture_of(pipe)](pipe, torch.device(device))


__all__ = ["Conditioning", "ModelFamily", "FAMILIES", "LORA_PREFIXES", "architecture_of", "denoiser_architecture",
           "denoiser_of", "family_of"]
