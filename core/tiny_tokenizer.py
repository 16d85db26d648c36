"""A real CLIP byte-level BPE tokenizer over a small vocabulary written in code.

The tiny models must not touch a hub or a file, yet the pipelines call a real ``CLIPTokenizer``.
The vocabulary holds every byte symbol (alone and word-final), the two specials, and the merges
that spell out a short list of words common in prompts about people, so real BPE merging runs.
"""
from __future__ import annotations

from functools import lru_cache

_WORDS = (
    "a photo of person people man woman child girl boy face faces hand hands holding waving "
    "portrait group smiling standing sitting with and the in on at two three friends family "
    "fingers close up outdoors indoors park street studio light high quality detailed"
).split()


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2 / CLIP byte-to-symbol table: printable bytes map to themselves, the rest to U+0100+.
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@lru_cache(maxsize=1)
def vocabulary() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """(vocab, merges) of the tiny tokenizer; ids are stable across runs and machines."""
    symbols = [_bytes_to_unicode()[b] for b in range(256)]
    tokens = symbols + [s + "</w>" for s in symbols]
    merges: list[tuple[str, str]] = []
    for word in _WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merged = pieces[0] + pieces[1]
            rule = (pieces[0], pieces[1])
            if rule not in merges:
                merges.append(rule)
                tokens.append(merged)
            pieces = [merged] + pieces[2:]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab: dict[str, int] = {}
    for tok in tokens:
        vocab.setdefault(tok, len(vocab))
    return vocab, tuple(merges)


def tiny_clip_tokenizer(max_length: int = 77):
    from transformers import CLIPTokenizer

    vocab, merges = vocabulary()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=max_length)
