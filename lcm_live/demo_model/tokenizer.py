"""A real CLIPTokenizer built from our own tiny BPE vocabulary (grammar words + all 256 bytes)."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import CLIPTokenizer

from .world import WORDS


BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet: each of the 256 bytes as a printable character."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _merge(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    """Merge every occurrence of pair in word."""
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def build_vocab(words=WORDS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocab (token -> id) and BPE merges (rank order) that spell every word as one token."""
    symbols = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for s in symbols + [s + "</w>" for s in symbols]:
        vocab.setdefault(s, len(vocab))
    merges: list[tuple[str, str]] = []
    spelled = [tuple(w[:-1]) + (w[-1] + "</w>",) for w in words]
    while any(len(w) > 1 for w in spelled):  # real BPE training: merge the most frequent pair
        counts: dict[tuple[str, str], int] = {}
        for w in spelled:
            for pair in zip(w, w[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        pair = max(sorted(counts), key=counts.get)
        merges.append(pair)
        vocab.setdefault(pair[0] + pair[1], len(vocab))
        spelled = [_merge(w, pair) for w in spelled]
    for tok in (BOS, EOS):
        vocab[tok] = len(vocab)
    return vocab, merges


def save_tokenizer_files(folder: str | Path) -> Path:
    """Write vocab.json and merges.txt into folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def make_tokenizer(folder: str | Path | None = None) -> CLIPTokenizer:
    """A CLIPTokenizer over our vocabulary (also writes vocab.json/merges.txt to folder if given)."""
    if folder is not None:
        save_tokenizer_files(folder)
    vocab, merges = build_vocab()
    return CLIPTokenizer(
        vocab=vocab, merges=merges, bos_token=BOS, eos_token=EOS, pad_token=EOS, unk_token=EOS, model_max_length=77
    )
