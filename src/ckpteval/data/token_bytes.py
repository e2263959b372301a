"""How many UTF-8 bytes each token id stands for: the denominator of bits per byte (bpb).

Built once per tokenizer as an int table indexed by token id (a vectorised lookup on the target ids):
- byte-level BPE (GPT-2, Llama 3, Qwen: a `ByteLevel` decoder/pre-tokenizer): each character of the token
  string is one byte through the GPT-2 byte<->unicode map;
- SentencePiece style: `<0xNN>` byte-fallback pieces are one byte, `▁` is a space, the rest is the UTF-8 of
  the piece (so a document's leading `▁` counts as the space it stands for);
- special tokens (and ids past the tokenizer, e.g. a padded embedding) count zero bytes: `run_eval` leaves
  them out of both sums of bpb.
"""

from __future__ import annotations

import json
import re

import numpy as np

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _bytes_to_unicode() -> dict[str, int]:
    """GPT-2's reversible byte -> printable character map, inverted (character -> byte)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, n = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def _is_byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    spec = json.loads(backend.to_str())
    return "ByteLevel" in json.dumps([spec.get("decoder"), spec.get("pre_tokenizer")])


def token_byte_lengths(tokenizer, size: int) -> np.ndarray:
    """int64 table of `size` entries: UTF-8 bytes of token id i (0 for special and unknown ids)."""
    table = np.zeros(size, dtype=np.int64)
    n = min(size, len(tokenizer))
    pieces = tokenizer.convert_ids_to_tokens(list(range(n)))
    byte_level = _is_byte_level(tokenizer)
    inverse = _bytes_to_unicode() if byte_level else {}
    for i, piece in enumerate(pieces):
        if piece is None:
            continue
        if byte_level:
            table[i] = sum(1 if ch in inverse else len(ch.encode("utf-8")) for ch in piece)
        elif _BYTE_PIECE.match(piece):
            table[i] = 1
        else:
            table[i] = len(piece.replace("▁", " ").encode("utf-8"))
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    for tid, added in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).items():
        if getattr(added, "special", False):
            special.add(int(tid))
    for tid in special:
        if 0 <= tid < size:
            table[tid] = 0
    return table
