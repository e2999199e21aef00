"""CLIP's byte-level BPE vocabulary, built for a small list of words: each word merges into one
token ("dog</w>"), any other text still tokenizes byte by byte. The tiny SD2.1 fixtures and the
ShapesWorld model use it, so their tokenizer/ folders have the layout of SD2.1's own."""

from __future__ import annotations

import json
from pathlib import Path


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible byte -> printable unicode character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def bpe(word: str, merges: list[tuple[str, str]]) -> list[str]:
    """CLIP's BPE of one lowercase ASCII word: repeatedly merge the adjacent pair of lowest rank."""
    rank = {m: i for i, m in enumerate(merges)}
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    while len(pieces) > 1:
        pairs = [(rank.get((a, b), len(rank)), i) for i, (a, b) in enumerate(zip(pieces, pieces[1:]))]
        r, i = min(pairs)
        if r == len(rank):
            break
        pieces[i:i + 2] = [pieces[i] + pieces[i + 1]]
    return pieces


def build_vocab(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The vocabulary laid out as CLIP's: the 256 byte characters, the same with "</w>", one
    token per merge in merge order, then <|startoftext|> and <|endoftext|> (so "!" is id 0, the
    pad token of SD2.1's tokenizer, and the end token has the largest id, as in CLIP).
    Each word gets merges until it is one token: d o -> do, do g</w> -> dog</w>."""
    base = list(bytes_to_unicode().values())
    vocab = base + [b + "</w>" for b in base]
    merges: list[tuple[str, str]] = []
    for word in words:
        # merge the word's current BPE pieces left to right until it is one token (a new merge
        # ranks after all others, so it never changes how the earlier words tokenize)
        while len(pieces := bpe(word, merges)) > 1:
            merges.append((pieces[0], pieces[1]))
    for a, b in merges:
        if a + b not in vocab:
            vocab.append(a + b)
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(set(vocab)) == len(vocab)
    return {t: i for i, t in enumerate(vocab)}, merges


def write_vocab_files(directory: Path, vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    """vocab.json and merges.txt in the layout of openai/clip-vit-large-patch14 and SD2.1's
    tokenizer/ (merges.txt starts with a "#version: 0.2" line)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")


SPECIAL_TOKENS_MAP = {  # what SD2.1's tokenizer/special_tokens_map.json says
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "pad_token": "!",
    "unk_token": "<|endoftext|>",
}
