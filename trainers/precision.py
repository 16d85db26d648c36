"""The one dtype policy of training, applied here and nowhere else.

``--mixed-precision no | fp16 | bf16 | auto`` chooses the *compute dtype* (``auto``: bf16 on a GPU
that supports it, fp16 on another GPU, fp32 elsewhere — ``compute_dtype``); then:

- UNet forward: under ``torch.autocast`` in the compute dtype on the training device; the
  frozen UNet weights are stored in the compute dtype (half the memory of fp32);
- trainable parameters (LoRA, ControlNet) and the optimizer state: fp32, whatever the compute
  dtype, so updates far below the weights' fp16/bf16 resolution are not lost;
- VAE: fp32 (SD and SDXL VAEs overflow in fp16; its encode runs once per image, or is cached);
- text encoders: the compute dtype (frozen, run without gradients, their outputs cached);
- fp16: a ``torch.amp.GradScaler`` scales the losses so small gradients do not underflow; the
  fair combiner divides that scale out of the Gramian before solving the weights, the scaler
  unscales the combined gradient, and a step whose gradients overflowed is skipped by the
  scaler's rule (and counted as a ``nan`` event with cause "gradient overflow");
- bf16: fp32's exponent range, so no scaler.

``--base-weights fp8`` stores the frozen denoiser's weights as float8_e4m3fn (a byte each) and
upcasts each layer to the compute dtype for its forward (diffusers' layerwise casting: norms,
embeddings and the LoRA layers themselves keep their dtype, as diffusers' skip patterns say; so do
convolutions, ``KEEP_IN_COMPUTE_DTYPE``: the linear layers are what is stored in fp8, nearly all of
a transformer's weights, about half of a UNet's).
It needs gradient checkpointing: without it autograd keeps every layer's upcast weight until the
backward pass, so the step's peak would hold the fp8 weights *and* a compute-dtype copy of almost
all of them. Every compute dtype works (the upcast is to it); a ControlNet is refused, since it is
initialised from the denoiser's weights and trained beside them.

The CPU runs both (``torch.autocast("cpu")`` supports bf16 and fp16), slowly; that is how this
policy is tested without a GPU.
"""
from __future__ import annotations

import contextlib
import functools

import torch

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
NAMES = {dtype: name for name, dtype in DTYPES.items()}
AUTO = "auto"
# --base-weights: how the frozen denoiser's weights are stored ("compute": in the compute dtype)
STORAGE_DTYPES = {"compute": None, "fp8": torch.float8_e4m3fn}
# Autograd saves a convolution's weight tensor itself for the backward pass, which the layerwise
# hook has turned back to the storage dtype by then (a Linear saves a view of the upcast copy).
KEEP_IN_COMPUTE_DTYPE = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.ConvTranspose1d,
                         torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)


def compute_dtype(name: str, device: str | torch.device) -> torch.dtype:
    """The compute dtype ``--mixed-precision NAME`` means on ``device``. ``auto``: bf16 on a CUDA
    device that supports it, else fp16 there (with loss scaling); fp32 on a CPU, where autocast
    only saves memory at a large cost in speed."""
    if name != AUTO:
        return DTYPES[name]
    device = torch.device(device)
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


@functools.lru_cache(maxsize=None)
def autocast_works(device_type: str, dtype: torch.dtype) -> bool:
    """Whether autocast on ``device_type`` computes a matmul in ``dtype`` (probed once)."""
    if not torch.amp.autocast_mode.is_autocast_available(device_type):
        return False
    try:
        x = torch.ones(2, 2, device=device_type)
        with torch.autocast(device_type, dtype=dtype):
            return (x @ x).dtype == dtype
    except (RuntimeError, TypeError, AssertionError):
        return False


def base_weights_problem(base_weights: str, gradient_checkpointing: bool, trainable_kind: str = "lora") -> str | None:
    """Why ``--base-weights`` cannot work with these options (one line), or None."""
    if base_weights not in STORAGE_DTYPES:
        return f"--base-weights {base_weights!r} must be one of {', '.join(STORAGE_DTYPES)}"
    if base_weights == "compute":
        return None
    if trainable_kind != "lora":
        return (f"--base-weights {base_weights} trains LoRA only: a {trainable_kind} is initialised from the "
                "denoiser's weights and trained beside them; use --base-weights compute")
    if not gradient_checkpointing:
        return (f"--base-weights {base_weights} needs --gradient-checkpointing true: without it autograd keeps "
                "every layer's upcast weight for the backward pass, and the step's peak memory exceeds that of "
                "--base-weights compute")
    return None


class Precision:
    """The policy for one compute dtype on one device, and how the frozen denoiser is stored."""

    def __init__(self, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 base_weights: str = "compute"):
        if dtype not in NAMES:
            raise ValueError(f"unsupported compute dtype {dtype}; expected one of {sorted(DTYPES)}")
        if base_weights not in STORAGE_DTYPES:
            raise ValueError(base_weights_problem(base_weights, True))
        self.dtype, self.device = dtype, torch.device(device)
        self.mode = NAMES[dtype]
        self.base_weights = base_weights

    @classmethod
    def from_name(cls, name: str, device: str | torch.device) -> "Precision":
        if name not in DTYPES:
            raise ValueError(f"--mixed-precision {name!r}: use no, fp16 or bf16")
        return cls(DTYPES[name], device)

    @property
    def mixed(self) -> bool:
        return self.dtype != torch.float32

    def check(self) -> None:
        """A clear error where this device cannot compute in this dtype."""
        if not self.mixed:
            return
        if self.device.type == "cuda" and self.dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            raise ValueError("--mixed-precision bf16 needs a GPU with bf16 support (Ampere or later); "
                             "use --mixed-precision fp16")
        if not autocast_works(self.device.type, self.dtype):
            raise ValueError(f"--mixed-precision {self.mode} is not supported by torch {torch.__version__} "
                             f"on {self.device.type}; use --mixed-precision no")

    def apply(self, pipe) -> None:
        """Cast the frozen modules: VAE fp32, text encoders and the denoiser (UNet or transformer)
        in the compute dtype (the trainable is attached afterwards and keeps fp32)."""
        if getattr(pipe, "vae", None) is not None and pipe.vae.dtype != torch.float32:
            pipe.vae.to(dtype=torch.float32)
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3", "unet", "transformer"):
            module = getattr(pipe, name, None)
            if module is not None and module.dtype != self.dtype:
                module.to(dtype=self.dtype)

    def store(self, denoiser) -> None:
        """The frozen denoiser's storage (``--base-weights``), applied once its LoRA is attached:
        diffusers then skips the LoRA layers (they stay fp32 and trainable) and keeps peft from
        casting their inputs to the storage dtype."""
        storage = STORAGE_DTYPES[self.base_weights]
        if storage is not None:
            denoiser.enable_layerwise_casting(storage_dtype=storage, compute_dtype=self.dtype,
                                              skip_modules_classes=KEEP_IN_COMPUTE_DTYPE)

    def autocast(self):
        """The context of a UNet forward (a no-op in fp32)."""
        if not self.mixed:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def generate(self, family, prompt, **kwargs) -> list:
        """PIL images from a model family's pipeline under this policy: the denoising loop under
        autocast, the VAE decode in fp32 outside it (``ModelFamily.render``)."""
        return family.render(prompt, autocast=self.autocast() if self.mixed else None, **kwargs)

    def make_scaler(self, init_scale: float = 2.0**16) -> torch.amp.GradScaler:
        """A GradScaler for fp16; a disabled one (every call a pass-through) otherwise."""
        return torch.amp.GradScaler(self.device.type, init_scale=init_scale,
                                    enabled=self.dtype == torch.float16)

    def describe(self) -> str:
        stored = "" if self.base_weights == "compute" else f", frozen denoiser stored in {self.base_weights}"
        if not self.mixed:
            return "fp32 throughout" + stored
        scaler = "GradScaler loss scaling" if self.dtype == torch.float16 else "no loss scaling"
        return (f"UNet forward under {self.mode} autocast on {self.device.type}, frozen UNet and text encoders "
                f"in {self.mode}, VAE fp32, trainable parameters and optimizer state fp32, {scaler}{stored}")
