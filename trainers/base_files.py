"""The flags that name a base model's separate files, shared by every command that takes --base."""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--text-encoders", nargs="+", default=[], metavar="FILE",
                        help="with a Flux.1, SD3.5 or Z-Image diffusion model as --base: its text encoder files from "
                             "ComfyUI's models/text_encoders (Flux: CLIP-L and T5-XXL; SD3.5: CLIP-L, CLIP-G and "
                             "T5-XXL unless the checkpoint holds them; Z-Image: Qwen3-4B), in any order")
    parser.add_argument("--vae", default=None, metavar="FILE",
                        help="with a Flux.1, SD3.5 or Z-Image diffusion model as --base: its VAE file from ComfyUI's "
                             "models/vae (Flux and Z-Image: ae.safetensors)")


def load_pipeline_of(args):
    """The ``--base`` pipeline of a command, or ``error: ...`` and exit status 1 for a base that
    cannot load (a missing text encoder, a file of no known layout), without a traceback."""
    from core.checkpoints import load_pipeline

    try:
        return load_pipeline(args.base, **load_kwargs(args))
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from None


def load_kwargs(args) -> dict:
    """load_pipeline's keyword arguments from parsed flags (--tokenizer and the two above)."""
    return {"tokenizer": getattr(args, "tokenizer", None), "text_encoders": args.text_encoders, "vae": args.vae}
