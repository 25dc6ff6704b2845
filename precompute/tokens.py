"""Display strings for every token id: the token's exact text, or its bytes when they are not valid UTF-8.

Byte-level BPE tokenizers (GPT-2, Llama-3, SmolLM2) store tokens in a printable byte alphabet ('Ġ' for a
space); sentencepiece ones use '▁' and <0xNN> byte pieces. Both are mapped back to raw bytes; a token that
is only part of a UTF-8 character is shown as its bytes, e.g. '\\xe2\\x80'.
"""

from __future__ import annotations

import re
from functools import lru_cache

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _bytes_repr(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "".join(f"\\x{b:02x}" for b in raw)


def token_strings(tokenizer) -> list[str]:
    n = max(len(tokenizer), max(tokenizer.get_vocab().values()) + 1)
    pieces = tokenizer.convert_ids_to_tokens(list(range(n)))
    dec = _byte_decoder()
    special = set(tokenizer.all_special_tokens)
    byte_level = sum(1 for p in pieces[:5000] if p and "Ġ" in p) > 10
    out = []
    for p in pieces:
        if p is None:
            out.append("")
        elif p in special:
            out.append(p)
        elif m := _BYTE_PIECE.match(p):
            out.append(_bytes_repr(bytes([int(m.group(1), 16)])))
        elif byte_level and all(ch in dec for ch in p):
            out.append(_bytes_repr(bytes(dec[ch] for ch in p)))
        else:
            out.append(p.replace("▁", " "))
    return out
