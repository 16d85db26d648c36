"""Real tokenizers over small vocabularies written in code: CLIP byte-level BPE, T5 Unigram
(``tiny_t5_tokenizer``, for tiny-flux) and Qwen byte-level BPE with its chat template
(``tiny_qwen_tokenizer``, for tiny-zimage).

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


T5_SPECIALS = ("<pad>", "</s>", "<unk>")  # T5's ids 0, 1, 2


@lru_cache(maxsize=1)
def t5_pieces() -> tuple[tuple[str, float], ...]:
    """(piece, log-probability) of the tiny T5 vocabulary: the specials, the words above as whole
    pieces (▁ marks a word start, as in sentencepiece), then single characters so any prompt of
    ASCII letters and digits still spells out."""
    chars = "abcdefghijklmnopqrstuvwxyz0123456789.,'-"
    pieces = dict.fromkeys(T5_SPECIALS, 0.0)
    pieces["▁"] = -2.0
    for word in _WORDS:
        pieces.setdefault("▁" + word, -1.0)
    for char in chars:
        pieces.setdefault("▁" + char, -5.0)
        pieces.setdefault(char, -6.0)
    return tuple(pieces.items())


def tiny_t5_tokenizer(max_length: int = 32):
    """A real sentencepiece-style Unigram tokenizer (what Flux's T5 uses) over ``t5_pieces``,
    built in code: lower-cased input, ``</s>`` appended, padding with ``<pad>``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pieces = list(t5_pieces())
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=T5_SPECIALS.index("<unk>")))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", T5_SPECIALS.index("</s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", model_max_length=max_length)


QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Qwen's chat format as the Qwen3 template writes it: turns framed by <|im_start|>role ... <|im_end|>,
# the assistant turn opened by add_generation_prompt, an empty think block when thinking is off.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


@lru_cache(maxsize=1)
def qwen_vocabulary() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """(vocab, merges) of the tiny Qwen tokenizer: byte-level BPE without CLIP's word-end marks,
    each prompt word merged, then merged with the space before it (``Ġ``), then Qwen's specials."""
    byte = _bytes_to_unicode()
    tokens = [byte[b] for b in range(256)]
    merges: list[tuple[str, str]] = []
    for word in _WORDS:
        pieces = list(word)
        while len(pieces) > 1:
            if (pieces[0], pieces[1]) not in merges:
                merges.append((pieces[0], pieces[1]))
                tokens.append(pieces[0] + pieces[1])
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
        merges.append((byte[ord(" ")], word))
        tokens.append(byte[ord(" ")] + word)
    vocab: dict[str, int] = {}
    for tok in tokens + list(QWEN_SPECIALS):
        vocab.setdefault(tok, len(vocab))
    return vocab, tuple(merges)


def tiny_qwen_tokenizer(max_length: int = 64):
    """A real ``Qwen2Tokenizer`` (the tokenizer class of Qwen3, Z-Image's text encoder) over
    ``qwen_vocabulary``, with the chat template; pads with ``<|endoftext|>`` as Qwen does."""
    from transformers import Qwen2Tokenizer

    vocab, merges = qwen_vocabulary()
    tokenizer = Qwen2Tokenizer(vocab=dict(vocab), merges=list(merges), eos_token="<|im_end|>",
                               pad_token="<|endoftext|>", model_max_length=max_length,
                               chat_template=QWEN_CHAT_TEMPLATE)
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIALS)})
    return tokenizer
