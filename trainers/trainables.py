"""What is trained: a LoRA adapter on the denoiser (a UNet or a Flux transformer), or a ControlNet
beside a UNet.

One loop serves both. A trainable owns its parameters (fp32, whatever the compute dtype), its
checkpoint state, how it changes the UNet call (``unet_kwargs``: nothing for a LoRA, whose
layers sit inside the UNet; the down/mid residuals for a ControlNet), how to switch itself off
(``disabled``: the frozen base model, HG-DPO's and LAN's reference) and its export file.

``attach(unet, dtype, ...)`` is called once by ``TrainableModel`` after the base is frozen, with
the model family's ``lora_targets`` as ``targets_for`` (the modules a requested name means there),
on the CPU; ``to(device)`` then moves it with the pipeline.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from .config import LORA_TARGETS


class Trainable:
    kind: str = ""

    def attach(self, unet, dtype: torch.dtype, gradient_checkpointing: bool, targets_for=list) -> None:
        raise NotImplementedError

    def named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        raise NotImplementedError

    def to(self, device: torch.device) -> None:
        """Move what the denoiser does not hold to ``device`` (a LoRA moves with its denoiser)."""

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for _, p in self.named_parameters()]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The trained tensors (detached CPU copies) under stable names, for checkpoints."""
        return {n: p.detach().cpu().clone() for n, p in self.named_parameters()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.named_parameters())
        missing = set(params) - set(state)
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} {self.kind} tensors, e.g. {sorted(missing)[0]}")
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(state[name])

    def unet_kwargs(self, noisy, timesteps, hidden, added, condition) -> dict:
        """Extra keyword arguments of this step's UNet call."""
        return {}

    @contextlib.contextmanager
    def disabled(self):
        yield

    def train(self, mode: bool = True) -> None:
        pass

    def metadata(self) -> dict:
        """Facts about the trained thing for the exported file's metadata."""
        return {}

    def export(self, path: Path, metadata: dict) -> Path:
        raise NotImplementedError


class LoraTrainable(Trainable):
    """A peft LoRA adapter on the denoiser's ``target_modules``, exported in the kohya layout."""

    kind = "lora"

    def __init__(self, rank: int, alpha: float | None = None, target_modules=LORA_TARGETS, init_seed: int = 0):
        self.rank, self.alpha = rank, float(alpha if alpha is not None else rank)
        self.target_modules, self.init_seed = list(target_modules), init_seed
        self.unet = None

    def attach(self, unet, dtype, gradient_checkpointing, targets_for=list) -> None:
        from peft import LoraConfig

        self.unet = unet
        torch.manual_seed(self.init_seed)  # peft draws LoRA A from the global generator
        unet.add_adapter(LoraConfig(r=self.rank, lora_alpha=self.alpha, target_modules=targets_for(self.target_modules),
                                    init_lora_weights=True))
        for param in self.parameters():
            param.data = param.data.float()

    def named_parameters(self):
        return [(n, p) for n, p in self.unet.named_parameters() if "lora_" in n]

    @contextlib.contextmanager
    def disabled(self):
        self.unet.disable_adapters()
        try:
            yield
        finally:
            self.unet.enable_adapters()

    def metadata(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "target_modules": self.target_modules}

    def export(self, path: Path, metadata: dict) -> Path:
        from core.lora_format import save_lora

        return save_lora(path, self.unet, metadata=metadata)


class ControlNetTrainable(Trainable):
    """A diffusers ControlNet initialized from the base UNet (``ControlNetModel.from_unet``: the
    encoder copied, zero convolutions on every residual, so training starts at the base model).
    Its condition is an RGB image in [0, 1] at the image's pixel size; exported as one
    diffusers-layout safetensors, which ComfyUI's ControlNetLoader takes."""

    kind = "controlnet"

    def __init__(self, conditioning_scale: float = 1.0):
        self.conditioning_scale = float(conditioning_scale)
        self.controlnet = None
        self._off = False

    def attach(self, unet, dtype, gradient_checkpointing, targets_for=list) -> None:
        from diffusers import ControlNetModel

        self.controlnet = ControlNetModel.from_unet(unet).to(unet.device, torch.float32)
        self.controlnet.requires_grad_(True)
        if gradient_checkpointing:
            self.controlnet.enable_gradient_checkpointing()
        self.controlnet.train()

    def named_parameters(self):
        return list(self.controlnet.named_parameters())

    def to(self, device: torch.device) -> None:
        self.controlnet.to(device)

    def unet_kwargs(self, noisy, timesteps, hidden, added, condition) -> dict:
        if self._off or condition is None:
            return {}
        net = self.controlnet
        down, mid = net(
            noisy.to(net.dtype), timesteps, encoder_hidden_states=hidden.to(net.dtype),
            controlnet_cond=condition.to(noisy.device, net.dtype), conditioning_scale=self.conditioning_scale,
            added_cond_kwargs=None if added is None else {k: v.to(net.dtype) for k, v in added.items()},
            return_dict=False,
        )
        dtype = noisy.dtype  # the UNet's compute dtype (fp32 parameters here)
        return {"down_block_additional_residuals": [r.to(dtype) for r in down],
                "mid_block_additional_residual": mid.to(dtype)}

    @contextlib.contextmanager
    def disabled(self):
        self._off = True
        try:
            yield
        finally:
            self._off = False

    def train(self, mode: bool = True) -> None:
        self.controlnet.train(mode)

    def metadata(self) -> dict:
        return {"conditioning_scale": self.conditioning_scale,
                "parameters": sum(p.numel() for p in self.controlnet.parameters())}

    def export(self, path: Path, metadata: dict) -> Path:
        return save_controlnet(path, self.controlnet, metadata)


def save_controlnet(path, controlnet, metadata: dict, dtype: torch.dtype | None = None) -> Path:
    """The ControlNet's diffusers state dict (``controlnet_cond_embedding.*``, ``controlnet_down_blocks.*``
    ...) as one safetensors written atomically; ``metadata`` as ``fairhuman.<key>`` JSON strings
    (what ``read_lora_metadata`` and the pack's loader read) plus the diffusers config."""
    from core.lora_format import META_PREFIX, write_safetensors_atomic

    tensors = {k: (v.to(dtype) if dtype else v).detach().cpu().contiguous().clone()
               for k, v in controlnet.state_dict().items()}
    header = {META_PREFIX + k: json.dumps(v, default=str, sort_keys=True) for k, v in metadata.items()}
    header[META_PREFIX + "diffusers_config"] = json.dumps(dict(controlnet.config), default=str, sort_keys=True)
    return write_safetensors_atomic(path, tensors, header)
