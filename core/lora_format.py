"""LoRA files in the kohya layout, which ComfyUI, A1111/Forge and diffusers all load.

One safetensors file; for each adapted UNet module (its diffusers path with ``.`` -> ``_``)::

    lora_unet_<module>.lora_down.weight   (rank, in)    = peft lora_A
    lora_unet_<module>.lora_up.weight     (out, rank)   = peft lora_B
    lora_unet_<module>.alpha              scalar        update = up @ down * alpha / rank

A Flux transformer's LoRA has the same layout with the prefix ``lora_transformer_`` (the model
family's ``lora_prefix``), which both ComfyUI's Flux key map and diffusers' Flux loader take. A
prefix ending in a dot keeps the module path's dots: Z-Image's ``diffusion_model.<module>.lora_down.weight``
(the diffusers module path, which ComfyUI's Z-Image key map and diffusers' Z-Image loader take).

Diffusers module names are understood by ComfyUI (``comfy.utils.unet_to_diffusers`` maps them to
its own UNet for SD1.5 and SDXL) and by diffusers' ``load_lora_weights``. The header metadata is
str -> str: kohya's ``ss_*`` keys for kohya-aware tools, and this pack's ``fairhuman.*`` keys whose
values are JSON-encoded (so ``read_lora_metadata`` returns them with their types).
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Mapping

import torch

from .families import LORA_PREFIXES, denoiser_architecture
from .fileio import atomic_path

PREFIX = "lora_unet_"
META_PREFIX = "fairhuman."
# peft names: [unet. | base_model.model.]<module>.lora_A[.<adapter>].weight
_PEFT_KEY = re.compile(r"^(?:unet\.|base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
# any family's prefix (lora_unet_, Flux's lora_transformer_), kept in the match
_KOHYA_KEY = re.compile(r"^(?P<prefix>" + "|".join(map(re.escape, sorted(set(LORA_PREFIXES.values())))) +
                        r")(?P<name>[^.]+)\.(?P<part>lora_down\.weight|lora_up\.weight|alpha)$")
_ARCH_NAMES = {  # ss_base_model_version / modelspec.architecture, as kohya's sd-scripts write them
    "sd15": ("sd_v1", "stable-diffusion-v1/lora"),
    "sdxl": ("sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora"),
    "flux": ("flux1", "flux-1-dev/lora"),
    "sd3": ("sd3", "stable-diffusion-3/lora"),  # kohya: "stable-diffusion-3", a suffix naming the variant
}


def kohya_name(module: str, prefix: str = PREFIX) -> str:
    """``down_blocks.1.attentions.0...to_q`` -> ``lora_unet_down_blocks_1_attentions_0_..._to_q``;
    a prefix ending in ``.`` keeps the dots (``diffusion_model.layers.0.attention.to_q``)."""
    return prefix + (module if prefix.endswith(".") else module.replace(".", "_"))


def _split_peft(state_dict: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{module: {"A": tensor, "B": tensor}} from a peft-named LoRA state dict (one adapter)."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    adapters = set()
    for key, tensor in state_dict.items():
        if "lora_magnitude_vector" in key or "lora_embedding" in key:
            raise ValueError(f"{key}: DoRA and embedding LoRAs have no kohya LoRA equivalent")
        match = _PEFT_KEY.match(key)
        if match is None:
            raise ValueError(f"{key!r} is not a peft LoRA weight name (<module>.lora_A/lora_B[.<adapter>].weight)")
        adapters.add(match["adapter"])
        modules.setdefault(match["module"], {})[match["ab"]] = tensor
    if len(adapters) > 1:
        raise ValueError(f"state dict holds several adapters {sorted(map(str, adapters))}; export one at a time")
    for module, pair in modules.items():
        if set(pair) != {"A", "B"}:
            raise ValueError(f"{module}: has lora_{''.join(pair)} but not both lora_A and lora_B")
    if not modules:
        raise ValueError("no LoRA weights to export")
    return modules


def peft_state_to_kohya(state_dict: Mapping[str, torch.Tensor], *,
                        alpha: float | Mapping[str, float], prefix: str = PREFIX) -> dict[str, torch.Tensor]:
    """Kohya tensors of a peft LoRA state dict (names as in ``unet.named_parameters()`` or
    ``get_peft_model_state_dict``; an optional ``unet.`` prefix is dropped). ``alpha``: peft's
    ``lora_alpha`` (scale alpha / rank, as in kohya), one number or one per module name;
    ``prefix``: the model family's (``lora_unet_``, Flux: ``lora_transformer_``, Z-Image: ``diffusion_model.``)."""
    out = {}
    for module, pair in _split_peft(state_dict).items():
        a = alpha[module] if isinstance(alpha, Mapping) else alpha
        name = kohya_name(module, prefix)
        out[f"{name}.lora_down.weight"] = pair["A"]
        out[f"{name}.lora_up.weight"] = pair["B"]
        out[f"{name}.alpha"] = torch.tensor(float(a))
    return out


def kohya_to_peft_state(kohya_state: Mapping[str, torch.Tensor], module_names=None
                        ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """(peft state dict ``<module>.lora_A.weight`` / ``.lora_B.weight``, {module: alpha}).

    Kohya names lose the dots of the module path; ``module_names`` (e.g. the names of a UNet's or
    a Flux transformer's modules) resolves them exactly. Without it, dots are restored by the
    diffusers models' naming rules (every ``_`` is a dot except inside the known compound names).
    One file holds one family's keys (``lora_unet_`` or Flux's ``lora_transformer_``)."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    prefixes = set()
    for key, tensor in kohya_state.items():
        match = _KOHYA_KEY.match(key)
        if match is None:
            raise ValueError(f"{key!r} is not a kohya LoRA key ({'|'.join(sorted(set(LORA_PREFIXES.values())))}"
                             "<module>.lora_down.weight|lora_up.weight|alpha)")
        prefixes.add(match["prefix"])
        groups.setdefault(match["prefix"] + match["name"], {})[match["part"]] = tensor
    if len(prefixes) > 1:
        raise ValueError(f"keys of several model families ({', '.join(sorted(prefixes))}) in one LoRA")
    prefix = prefixes.pop() if prefixes else PREFIX
    lookup = {kohya_name(m, prefix): m for m in module_names} if module_names is not None else None
    state, alphas = {}, {}
    for name, parts in groups.items():
        if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
            raise ValueError(f"{name}: needs both lora_down.weight and lora_up.weight")
        module = lookup.get(name) if lookup is not None else _guess_module(name[len(prefix):])
        if module is None:
            raise ValueError(f"{name}: no module of that name in the given model")
        down = parts["lora_down.weight"]
        state[f"{module}.lora_A.weight"] = down
        state[f"{module}.lora_B.weight"] = parts["lora_up.weight"]
        # No alpha means alpha == rank (scale 1), as in kohya's and ComfyUI's loaders.
        alphas[module] = float(parts["alpha"]) if "alpha" in parts else float(down.shape[0])
    return state, alphas


# Compound names inside diffusers UNet and Flux transformer module paths, whose underscores are
# not path separators (a longer name before the shorter one it contains).
_COMPOUND = ("down_blocks", "up_blocks", "mid_block", "single_transformer_blocks", "transformer_blocks", "to_q",
             "to_k", "to_v", "to_out", "to_add_out", "add_q_proj", "add_k_proj", "add_v_proj", "proj_in",
             "proj_out", "proj_mlp", "conv_in", "conv_out", "conv_norm_out", "conv_shortcut", "time_emb_proj",
             "time_embedding", "add_embedding", "linear_1", "linear_2")


def _guess_module(name: str) -> str:
    """A kohya module name without its prefix, with its dots restored."""
    dotted = name.replace("_", ".")
    for compound in _COMPOUND:
        dotted = dotted.replace(compound.replace("_", "."), compound)
    return dotted


def lora_modules(unet) -> dict[str, torch.nn.Module]:
    """{module name: peft LoRA layer} of a model carrying a peft adapter."""
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in unet.named_modules() if isinstance(m, LoraLayer)}


def _from_model(unet, adapter: str | None) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    layers = lora_modules(unet)
    if not layers:
        raise ValueError(f"{type(unet).__name__} carries no peft LoRA adapter")
    state, alphas = {}, {}
    for name, layer in layers.items():
        names = list(layer.lora_A.keys())
        key = adapter or (names[0] if len(names) == 1 else None)
        if key is None or key not in layer.lora_A:
            raise ValueError(f"{name}: adapters {names}; pass adapter= to choose one")
        state[f"{name}.lora_A.weight"] = layer.lora_A[key].weight
        state[f"{name}.lora_B.weight"] = layer.lora_B[key].weight
        # kohya alpha = scale * rank reproduces peft's scale whatever its rule (alpha/r, rsLoRA).
        alphas[name] = float(layer.scaling[key]) * layer.r[key]
    return state, alphas


def _summary(values) -> float | list[float]:
    distinct = sorted(set(values))
    return distinct[0] if len(distinct) == 1 else distinct


def _metadata(tensors: dict[str, torch.Tensor], metadata: Mapping, arch: str | None) -> dict[str, str]:
    ranks = [t.shape[0] for k, t in tensors.items() if k.endswith("lora_down.weight")]
    alphas = [round(float(t), 6) for k, t in tensors.items() if k.endswith(".alpha")]
    rank, alpha = Counter(ranks).most_common(1)[0][0], Counter(alphas).most_common(1)[0][0]
    out = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(int(alpha) if float(alpha).is_integer() else alpha),
        "ss_network_args": json.dumps({"rank_values": sorted(set(ranks))}) if len(set(ranks)) > 1 else "{}",
    }
    if arch in _ARCH_NAMES:
        out["ss_base_model_version"], out["modelspec.architecture"] = _ARCH_NAMES[arch]
        out["ss_sd_model_name"] = str(metadata.get("base", ""))
    ours = {"rank": _summary(ranks), "alpha": _summary(alphas), **dict(metadata)}
    if arch is not None:
        ours.setdefault("base_arch", arch)
    for key, value in ours.items():
        if key.startswith(("ss_", "modelspec.")):
            out[key] = value if isinstance(value, str) else json.dumps(value, default=str)
        else:
            name = key if key.startswith(META_PREFIX) else META_PREFIX + key
            out[name] = json.dumps(value, default=str, sort_keys=True)
    return out


def write_safetensors_atomic(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                             metadata: dict[str, str] | None = None) -> Path:
    """Write a safetensors file so that ``path`` is either the old file or the complete new one."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(path)


def save_lora(path: str | os.PathLike, unet_or_state, *, metadata: Mapping | None = None,
              alpha: float | Mapping[str, float] | None = None, adapter: str | None = None,
              dtype: torch.dtype | None = None) -> Path:
    """Write a kohya-layout LoRA file atomically.

    ``unet_or_state``: a model carrying a peft adapter (alpha read from each layer's scaling), or
    a peft-named state dict (then ``alpha`` is required). ``metadata``: this pack's fields
    (method, base_arch, objectives, config ...), stored as ``fairhuman.<key>`` JSON strings;
    ``ss_*`` keys pass through. ``dtype``: tensor dtype in the file (default: as trained — keep
    fp32 for exact round trips, fp16 halves the size)."""
    metadata = dict(metadata or {})
    if isinstance(unet_or_state, torch.nn.Module):
        state, alphas = _from_model(unet_or_state, adapter)
        arch = metadata.get("base_arch") or denoiser_architecture(unet_or_state)
    else:
        if alpha is None:
            raise ValueError("save_lora(state_dict) needs alpha= (peft's lora_alpha)")
        state, alphas, arch = unet_or_state, alpha, metadata.get("base_arch")
    tensors = {}
    for key, tensor in peft_state_to_kohya(state, alpha=alphas, prefix=LORA_PREFIXES.get(arch, PREFIX)).items():
        tensor = tensor.detach().to("cpu")
        if dtype is not None and not key.endswith(".alpha"):
            tensor = tensor.to(dtype)
        tensors[key] = tensor.contiguous().clone()  # clone: safetensors refuses shared storage
    return write_safetensors_atomic(path, tensors, _metadata(tensors, metadata, arch))


def _open(path: str | os.PathLike):
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file not found: {path}")
    try:
        return safe_open(str(path), framework="pt")
    except Exception as err:  # safetensors' own error types for truncated / non-safetensors files
        raise ValueError(f"LoRA file {path} is not a readable safetensors file ({err})") from None


def read_lora_metadata(path: str | os.PathLike) -> dict:
    """The header metadata; ``fairhuman.*`` values JSON-decoded, the others as stored (str)."""
    with _open(path) as handle:
        raw = handle.metadata() or {}
    out = {}
    for key, value in raw.items():
        if key.startswith(META_PREFIX):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass  # written by another tool as a plain string
        out[key] = value
    return out


# what a LoRA's keys say of its base when its metadata does not: the first key's start
_KEY_ARCHITECTURES = {"lora_transformer_": "flux/sd3", "transformer.": "flux/sd3", "lora_unet_": "sd15/sdxl",
                      "unet.": "sd15/sdxl"}


def lora_architecture(path: str | os.PathLike) -> str | None:
    """The base architecture (``sd15``, ``sdxl``, ``flux``, ``sd3``, ``zimage``) as the file's
    metadata records it (ours, or kohya's ``ss_base_model_version`` / ``modelspec.architecture``);
    without it, what its keys say: ``flux/sd3`` (``lora_transformer_``), ``sd15/sdxl``
    (``lora_unet_``: the keys do not tell the two apart); None when neither says."""
    meta = read_lora_metadata(path)
    if meta.get(META_PREFIX + "base_arch") in LORA_PREFIXES:  # ours: any family the pack trains
        return meta[META_PREFIX + "base_arch"]
    for arch, names in _ARCH_NAMES.items():
        if meta.get("ss_base_model_version") == names[0] or meta.get("modelspec.architecture") == names[1]:
            return arch
    with _open(path) as handle:
        first = next(iter(handle.keys()), "")
    return next((arch for start, arch in _KEY_ARCHITECTURES.items() if first.startswith(start)), None)


def lora_fits(lora_arch: str | None, base_arch: str) -> bool:
    """Whether a LoRA of ``lora_architecture`` ``lora_arch`` is for a base of ``base_arch`` (a
    LoRA that does not say is let through: the loader then finds whether its tensors fit)."""
    return lora_arch is None or base_arch in lora_arch.split("/")


def load_lora_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The kohya tensors of a LoRA file, checked to be a LoRA of one family in this layout."""
    with _open(path) as handle:
        try:
            state = {k: handle.get_tensor(k) for k in handle.keys()}
        except Exception as err:
            raise ValueError(f"LoRA file {path} is corrupt ({err})") from None
    if not state:
        raise ValueError(f"LoRA file {path} holds no tensors")
    try:
        kohya_to_peft_state(state)
    except ValueError as err:
        raise ValueError(f"LoRA file {path}: {err}") from None
    return state


def load_into_pipeline(family, path: str | os.PathLike, adapter_name: str) -> None:
    """Load a LoRA file into ``family``'s pipeline as adapter ``adapter_name`` (then
    ``set_adapters`` / ``disable_lora`` apply). Where diffusers' loader of the family reads no
    kohya keys (SD3: peft keys under ``transformer.`` and no alphas, so scale 1), the pack's file is
    converted to that, each module's alpha / rank folded into its up weights; a file in another
    layout goes to diffusers' loader as it is."""
    if not family.diffusers_reads_kohya:
        try:
            kohya = load_lora_state(path)
        except ValueError:  # not a kohya file: diffusers' own layouts
            kohya = None
        if kohya is not None:
            names = [name for name, _ in family.denoiser.named_modules()]
            state, alphas = kohya_to_peft_state(kohya, module_names=names)
            for module, alpha in alphas.items():
                up = state[f"{module}.lora_B.weight"]
                state[f"{module}.lora_B.weight"] = up * (alpha / up.shape[1])
            prefix = family.denoiser_attribute
            family.pipe.load_lora_weights({f"{prefix}.{k}": v for k, v in state.items()}, adapter_name=adapter_name)
            return
    family.pipe.load_lora_weights(str(path), adapter_name=adapter_name)
