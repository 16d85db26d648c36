"""Tokenizers for loaded text encoders, offline: the pack's tiny ones for tiny vocabularies, else
the files a ComfyUI tree ships (CLIP: ``comfy/sd1_tokenizer``; T5: ``comfy/text_encoders/t5_tokenizer``;
Qwen: ``comfy/text_encoders/qwen25_tokenizer``, Qwen3's vocabulary).

The tree is the one named by ``COMFYUI_PATH``, or the one holding any of the files being loaded
(``<tree>/models/...``) or the ``--tokenizer`` folder (``<tree>/comfy/sd1_tokenizer``).
"""
from __future__ import annotations

import os
from pathlib import Path

from ..tiny_models import QWEN_TOKENS, T5_TOKENS
from ..tiny_tokenizer import (QWEN_CHAT_TEMPLATE, qwen_vocabulary, t5_pieces, tiny_clip_tokenizer, tiny_qwen_tokenizer,
                              tiny_t5_tokenizer, vocabulary)

CLIP_VOCAB_SIZE = 49408
T5_MAX_TOKENS = 512  # Flux.1-dev's T5 sequence (the families take less where their pipeline does)
QWEN_MAX_TOKENS = 512  # ZImagePipeline's


def _bpe_folder(path: Path) -> Path | None:
    for folder in (path, path / "tokenizer"):
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            return folder
    return None


def _comfyui_trees(*hints) -> list[Path]:
    """ComfyUI trees to search: ``COMFYUI_PATH``, then the tree above each hint path (a model file
    under ``<tree>/models``, or a folder inside ``<tree>/comfy``)."""
    trees = []
    if os.environ.get("COMFYUI_PATH"):
        trees.append(Path(os.environ["COMFYUI_PATH"]).expanduser())
    for hint in hints:
        if not hint:
            continue
        for parent in Path(hint).expanduser().resolve().parents:
            if (parent / "comfy" / "sd1_tokenizer").is_dir() and parent not in trees:  # a tree's marker
                trees.append(parent)
                break
    return trees


def _tree_folder(relative: str, what: str, hints, needs: str) -> Path:
    searched = []
    for tree in _comfyui_trees(*hints):
        candidate = tree / relative
        searched.append(str(candidate))
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"{what} and no {needs} was found offline. Set COMFYUI_PATH to a ComfyUI tree (it ships "
        f"{relative}), or keep the model files inside one (<ComfyUI>/models/...)"
        + (f" (searched: {', '.join(searched)})" if searched else "")
    )


def find_clip_tokenizer(tokenizer: str | os.PathLike | None = None, checkpoint=None) -> Path:
    """Folder holding CLIP's BPE ``vocab.json`` + ``merges.txt``, searched in order: the
    ``tokenizer`` argument (the folder, or a diffusers folder with ``tokenizer/``), then ComfyUI's
    ``comfy/sd1_tokenizer`` in the tree named by ``COMFYUI_PATH`` or holding the checkpoint
    (``checkpoint``: one path or several)."""
    if tokenizer is not None:
        folder = _bpe_folder(Path(tokenizer).expanduser())
        if folder is None:
            raise FileNotFoundError(f"tokenizer folder {tokenizer} has no vocab.json and merges.txt")
        return folder
    hints = checkpoint if isinstance(checkpoint, (list, tuple)) else [checkpoint]
    searched = []
    for tree in _comfyui_trees(*hints):
        candidate = tree / "comfy" / "sd1_tokenizer"
        searched.append(str(candidate))
        if _bpe_folder(candidate):
            return candidate
    raise FileNotFoundError(
        "this checkpoint's text encoder uses the real CLIP vocabulary (49408 tokens) and no CLIP "
        "tokenizer was found offline. Pass a folder with CLIP's vocab.json and merges.txt "
        "(--tokenizer, e.g. <ComfyUI>/comfy/sd1_tokenizer or a diffusers model's tokenizer/), "
        "or set COMFYUI_PATH to a ComfyUI tree"
        + (f" (searched: {', '.join(searched)})" if searched else "")
    )


def clip_tokenizer(vocab_size: int, *, pad_token: str | None = None, tokenizer=None, checkpoint=None):
    """The tokenizer matching a CLIP text encoder's vocabulary size, without a hub."""
    if vocab_size == len(vocabulary()[0]):
        return tiny_clip_tokenizer()  # pads with <|endoftext|>; tiny SDXL uses it for both
    if vocab_size != CLIP_VOCAB_SIZE:
        raise ValueError(f"text encoder has a {vocab_size}-token vocabulary; expected CLIP's {CLIP_VOCAB_SIZE}")
    from transformers import CLIPTokenizer

    folder = find_clip_tokenizer(tokenizer, checkpoint)
    kwargs = {"pad_token": pad_token} if pad_token else {}
    # ComfyUI's copy declares model_max_length 8192; SD's text encoders take 77 positions.
    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True, model_max_length=77, **kwargs)


def t5_tokenizer(vocab_size: int, hints=()):
    """T5 v1.1's sentencepiece tokenizer (ComfyUI's copy), or the tiny one for the tiny vocabulary."""
    if vocab_size == len(t5_pieces()):
        return tiny_t5_tokenizer(T5_TOKENS)
    from transformers import T5TokenizerFast

    folder = _tree_folder("comfy/text_encoders/t5_tokenizer", "this T5 encoder uses the real T5 vocabulary",
                          hints, "T5 tokenizer")
    return T5TokenizerFast.from_pretrained(str(folder), local_files_only=True, model_max_length=T5_MAX_TOKENS)


def qwen_tokenizer(vocab_size: int, hints=()):
    """Qwen's byte-level BPE (ComfyUI's qwen25_tokenizer: Qwen3 shares its vocabulary), or the tiny
    one. The chat template is Qwen3's (no default system turn: what Z-Image's own tokenizer and
    ComfyUI's Z-Image template write), not the Qwen2.5 one that folder declares."""
    if vocab_size == len(qwen_vocabulary()[0]):
        return tiny_qwen_tokenizer(QWEN_TOKENS)
    from transformers import Qwen2Tokenizer

    folder = _tree_folder("comfy/text_encoders/qwen25_tokenizer", "this Qwen3 encoder uses the real Qwen vocabulary",
                          hints, "Qwen tokenizer")
    return Qwen2Tokenizer.from_pretrained(str(folder), local_files_only=True, model_max_length=QWEN_MAX_TOKENS,
                                          chat_template=QWEN_CHAT_TEMPLATE)
