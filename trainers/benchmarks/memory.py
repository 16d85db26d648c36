"""``python -m trainers bench memory``: the GPU memory a rank-32 MPD LoRA at 1024² needs on each
diffusion-transformer family, calculated (not measured) from the full-size architectures.

Every model is built from its published shape on the meta device (no weights, no memory), so
the parameter counts are exact; the rest is arithmetic, each term printed:

- **base weights**: the frozen transformer, 2 bytes a parameter in bf16; with ``--base-weights
  fp8`` the bytes the trainer's own storage policy leaves (``trainers.precision``, applied to the
  meta model: linear layers in fp8, norms, embeddings and the layers diffusers marks precision
  sensitive, such as Flux's modulation, in bf16); the VAE beside it in fp32 (it encodes each
  step's images);
- **LoRA state**: the LoRA's parameters (fp32), Adam's two moments (fp32), and the gradients
  of MPD: one per objective (K = 3: global, face, hand) plus the combined one, all fp32;
- **activations**: a transformer block keeps about 34·s·h bytes for its backward in 16-bit
  compute (s tokens, h width, batch 1; Korthikanti et al. 2022, "Reducing Activation
  Recomputation in Large Transformer Models", without the attention-score term, which fused
  attention kernels do not store). MPD runs one forward and K backward passes through the same
  graph, so it keeps one forward's activations. With ``--gradient-checkpointing`` a block keeps
  only its input (2·s·h) and one block at a time is recomputed (34·s·h);
- **text encoders**: only while captions are encoded (``--unload-text-encoders`` drops them
  before the first step), so they are a separate, earlier peak.

Not counted: the CUDA context and allocator slack (about 0.5-1 GB), the LoRA's own rank-32
intermediates (r·s per adapted layer: a few MB).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

GB = 1e9
OBJECTIVES = 3  # global, face, hand
SIDE = 1024
ACTIVATION_BYTES = 34  # per token and width unit, per block, 16-bit (see the module docstring)


@dataclass(frozen=True)
class Family:
    name: str
    family: str  # core.families name: its LoRA targets
    transformer: object  # () -> the transformer on the meta device
    blocks: dict  # {tokens kind: number of blocks}: "joint" (image + text), "image", "text"
    width: int
    text_tokens: int  # the caption tokens the transformer attends to, as its pipeline pads them
    encoders: tuple  # () -> text encoder on the meta device, each


def _flux():
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(num_layers=19, num_single_layers=38, attention_head_dim=128,
                                  num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                                  guidance_embeds=True, axes_dims_rope=(16, 56, 56))


def _sd3(layers: int, max_size: int, dual: tuple):
    from diffusers import SD3Transformer2DModel

    return lambda: SD3Transformer2DModel(
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=layers, attention_head_dim=64,
        num_attention_heads=layers, joint_attention_dim=4096, caption_projection_dim=64 * layers,
        pooled_projection_dim=2048, pos_embed_max_size=max_size, dual_attention_layers=dual, qk_norm="rms_norm")


def _zimage():
    from diffusers import ZImageTransformer2DModel

    return ZImageTransformer2DModel()  # diffusers' defaults are Z-Image's 6B shape


def _clip_l():
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig())  # 768 wide, 12 layers: CLIP ViT-L/14's text tower


def _clip_g():
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    return CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                                      num_attention_heads=20, projection_dim=1280))


def _t5_xxl():
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(d_model=4096, d_ff=10240, d_kv=64, num_layers=24, num_heads=64,
                                   feed_forward_proj="gated-gelu", vocab_size=32128))


def _qwen3_4b():
    from transformers import Qwen3Config, Qwen3Model

    return Qwen3Model(Qwen3Config(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                                  num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936))


FAMILIES = [
    Family("Flux.1 dev / schnell", "flux", _flux, {"joint": 19 + 38}, 3072, 512, (_clip_l, _t5_xxl)),
    Family("SD3.5 Medium", "sd3", _sd3(24, 384, tuple(range(13))), {"joint": 24}, 1536, 77 + 256,
           (_clip_l, _clip_g, _t5_xxl)),
    Family("SD3.5 Large", "sd3", _sd3(38, 192, ()), {"joint": 38}, 2432, 77 + 256, (_clip_l, _clip_g, _t5_xxl)),
    Family("Z-Image", "zimage", _zimage, {"joint": 30, "image": 2, "text": 2}, 3840, 512, (_qwen3_4b,)),
]


def on_meta(build):
    with torch.device("meta"):
        return build()


def parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())


def lora_parameters(model, family: str, rank: int) -> int:
    """Parameters of a rank-``rank`` LoRA on the family's default targets: r·(in + out) for each
    Linear whose name ends with a target (peft's suffix match)."""
    from core.families import FAMILIES as PACK_FAMILIES
    from trainers.config import LORA_TARGETS

    targets = PACK_FAMILIES[family].lora_targets(list(LORA_TARGETS))
    return sum(rank * (m.in_features + m.out_features) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets))


def stored_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def fp8_bytes(family: Family) -> int:
    """The transformer's bytes under ``--base-weights fp8`` with bf16 compute, as the trainer stores it."""
    from trainers.precision import Precision

    model = on_meta(family.transformer).to(torch.bfloat16)
    Precision(torch.bfloat16, "cpu", base_weights="fp8").store(model)
    return stored_bytes(model)


def vae_parameters() -> int:
    from diffusers import AutoencoderKL

    return parameters(on_meta(lambda: AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        use_quant_conv=False, use_post_quant_conv=False)))


def budget(family: Family, rank: int, side: int = SIDE) -> dict:
    """Every term of the calculation for one family, in bytes (and the counts behind them)."""
    model = on_meta(family.transformer)
    params, lora = parameters(model), lora_parameters(model, family.family, rank)
    image_tokens = (side // 16) ** 2  # 8× VAE, 2×2 patches
    tokens = {"joint": image_tokens + family.text_tokens, "image": image_tokens, "text": family.text_tokens}
    block_inputs = sum(n * 2 * tokens[kind] * family.width for kind, n in family.blocks.items())
    largest_block = ACTIVATION_BYTES * tokens["joint"] * family.width
    every_block = sum(n * ACTIVATION_BYTES * tokens[kind] * family.width for kind, n in family.blocks.items())
    encoders = sum(parameters(on_meta(build)) for build in family.encoders)
    vae = 4 * vae_parameters()
    lora_state = lora * 4 * (1 + 2 + OBJECTIVES + 1)  # weights, Adam's m and v, K gradients and their sum
    out = dict(params=params, lora=lora, encoders=encoders, vae=vae, lora_state=lora_state,
               activations_checkpointed=block_inputs + largest_block, activations_full=every_block,
               weights_bf16=2 * params, weights_fp8=fp8_bytes(family), encoders_bf16=2 * encoders)
    for weights in ("bf16", "fp8"):
        out[f"train_{weights}"] = out[f"weights_{weights}"] + vae + lora_state + out["activations_checkpointed"]
    return out


def table(rank: int, side: int = SIDE) -> str:
    rows = ["| family | transformer | LoRA r{r} | base weights bf16 / fp8 | LoRA state (fp32, Adam, K={k}+1 grads) "
            "| activations, checkpointed (all kept) | training peak, bf16 / fp8 weights | text encoders (bf16, "
            "before training) |".format(r=rank, k=OBJECTIVES), "|---|---|---|---|---|---|---|---|"]
    for family in FAMILIES:
        b = budget(family, rank, side)
        rows.append(
            f"| {family.name} | {b['params'] / 1e9:.2f} B | {b['lora'] / 1e6:.0f} M | {b['weights_bf16'] / GB:.1f} / "
            f"{b['weights_fp8'] / GB:.1f} GB | {b['lora_state'] / GB:.2f} GB | "
            f"{b['activations_checkpointed'] / GB:.1f} GB ({b['activations_full'] / GB:.0f} GB) | "
            f"**{b['train_bf16'] / GB:.1f} / {b['train_fp8'] / GB:.1f} GB** | {b['encoders_bf16'] / GB:.1f} GB |")
    return "\n".join(rows)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rank", type=int, default=32, help="LoRA rank")
    parser.add_argument("--side", type=int, default=SIDE, help="image side in pixels")


def run(args: argparse.Namespace) -> int:
    print(f"GPU memory of an MPD LoRA (rank {args.rank}, {args.side}², batch 1, bf16 compute), calculated from "
          f"the full-size architectures (python -m trainers bench memory; terms: trainers/benchmarks/memory.py)")
    print(table(args.rank, args.side))
    return 0
