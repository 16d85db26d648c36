"""Model-based scorers load from a folder the user supplies; nothing is downloaded."""
from __future__ import annotations

from pathlib import Path

import torch


def require_folder(name: str, model) -> Path:
    """The scorer's weights folder, or an error naming the option that sets it."""
    if not model or not Path(model).is_dir():
        raise FileNotFoundError(
            f"the {name} scorer needs its weights in a local folder: pass --scorer-model {name}=FOLDER "
            f"(or model=FOLDER in Python); got {model!r}. See docs/scorers.md for the layouts.")
    return Path(model)


def find_weights(folder, patterns: tuple[str, ...]):
    """The first file in ``folder`` matching one of ``patterns``, or None."""
    for pattern in patterns:
        found = sorted(folder.glob(pattern))
        if found:
            return found[0]
    return None


def load_state_dict(path) -> dict:
    """Tensors of a .safetensors file, or of a torch file (its ``state_dict`` entry if any)."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def require_complete(source, missing, unexpected) -> None:
    """Refuse weights that leave parameters at their random initialisation (a wrong folder)."""
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"{source} does not fit the model's config.json: {len(missing)} tensors missing "
                         f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {list(unexpected)[:2]})")


def embedding(out) -> torch.Tensor:
    """``get_image_features``/``get_text_features``' result as a tensor (transformers 5 may
    return an output object whose ``pooler_output`` holds it)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output
