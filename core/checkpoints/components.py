"""Reading safetensors files and building diffusers / transformers components from converted
state dicts, shared by the SD single-file loader and the DiT files loader."""
from __future__ import annotations

from pathlib import Path

from .convert import clip_config, drop_ignored, load_into


def read_file(path: Path) -> tuple[dict, dict]:
    """(tensors, metadata) of a safetensors file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            return {k: handle.get_tensor(k) for k in handle.keys()}, metadata
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"cannot read checkpoint {path}: {err}") from None


def read_shapes(path: Path) -> tuple[dict, dict]:
    """({key: shape}, metadata) from the file's header only: what is checked before loading."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return ({k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}, handle.metadata() or {})
    except Exception as err:
        raise ValueError(f"cannot read checkpoint {path}: {err}") from None


def build(factory, state: dict, dtype, what: str):
    """``factory()`` built on the meta device, then given ``state`` (every parameter covered)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = factory()
    return load_into(model, drop_ignored(state), dtype, what)


def clip_text_encoder(state: dict, base: str, component: str, cls, tok, structure: dict, dtype, what: str):
    """A CLIP text tower (``text_model.*`` keys) with the shipped config ``base``, widths from the
    tensors, and the tokenizer's special token ids."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = clip_config(state, base, component, structure)
    # Token ids from the tokenizer: the text tower pools at the first end-of-text token.
    config.update(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if cls is CLIPTextModel:  # flattened in transformers >= 5.6: no text_model level
        state = {k.removeprefix("text_model."): v for k, v in state.items() if k != "text_projection.weight"}
    return build(lambda: cls(CLIPTextConfig(**config)), state, dtype, what)
