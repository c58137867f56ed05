"""The vocabulary bridge between a drafter and a target with different tokenizers (OmniDraft,
arXiv 2507.02659, section 3.1).

Draft tokens become target tokens in three ways, tried in this order at each draft position:

1. the n-gram cache: a run of n >= 2 draft tokens that, as text, is exactly one target token
   ('Ġsnowfl' 'ake' -> '▁snowflake'); learned online from the text the target commits
   (`NGramCache.learn`), bounded, evicted least-recently-used, saved to and loaded from JSON;
2. the direct map: a draft token whose text equals one target token's text, once both are
   normalised (byte-level 'Ġ' / SentencePiece '▁' -> ' ', byte tokens -> their character);
3. re-tokenisation: the remaining draft text, encoded by the target's tokenizer.

A merged token's probability is the product of its parts' probabilities.

Example (strings stand for ids): cache {('f', 'la', 'ke'): 'flake'}, direct map f->f, la->la:
draft ['f', 'la', 'ke', ' x'] -> target ['flake'] + direct(' x').
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from ...errors import InvalidOptionError
from ...store import atomic_write


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: printable stand-in character -> byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def token_bytes(tokenizer) -> list[bytes | None]:
    """The bytes of every token id's text, normalised: byte-level 'Ġ' and SentencePiece '▁' are a
    space, byte tokens their byte (None: a special or control token). Bytes, not characters: a
    byte-level token may hold part of a UTF-8 character."""
    vocab = tokenizer.get_vocab()
    size = max(vocab.values()) + 1
    texts: list[bytes | None] = [None] * size
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    # byte-level BPE (GPT-2 style: 'Ġ' is the space) or SentencePiece ('▁'); a large vocabulary may
    # hold the other scheme's marker as an ordinary token, so count which one starts more tokens
    byte_level = sum(t.startswith("Ġ") for t in vocab) > sum(t.startswith("▁") for t in vocab)
    decoder = _byte_decoder()
    for token, i in vocab.items():
        if i in special:
            continue
        if byte_level:
            try:
                texts[i] = bytes(decoder[c] for c in token)
            except KeyError:
                texts[i] = None
        elif token.startswith("<0x") and token.endswith(">") and len(token) == 6:
            texts[i] = bytes([int(token[3:5], 16)])
        elif token.startswith("<") and token.endswith(">"):
            texts[i] = None  # control tokens such as <start_of_turn>
        else:
            texts[i] = token.replace("▁", " ").encode("utf-8")
    return texts


class NGramCache:
    """Draft-token n-grams (n >= 2) -> one target token, least-recently-used first out."""

    def __init__(self, max_entries: int = 50_000, max_n: int = 4):
        self.max_entries, self.max_n = max_entries, max_n
        self.entries: OrderedDict[tuple[int, ...], int] = OrderedDict()

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, draft_ids: tuple[int, ...]) -> int | None:
        target = self.entries.get(draft_ids)
        if target is not None:
            self.entries.move_to_end(draft_ids)  # used: evicted last
        return target

    def add(self, draft_ids: tuple[int, ...], target_id: int) -> None:
        if not 2 <= len(draft_ids) <= self.max_n:
            return
        self.entries[draft_ids] = target_id
        self.entries.move_to_end(draft_ids)
        while len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)

    def to_dict(self) -> dict:
        return {"max_n": self.max_n, "entries": [[list(k), v] for k, v in self.entries.items()]}

    @classmethod
    def from_dict(cls, raw: dict, max_entries: int = 50_000) -> "NGramCache":
        cache = cls(max_entries, raw.get("max_n", 4))
        for k, v in raw["entries"]:
            cache.add(tuple(k), int(v))
        return cache

    def save(self, path: str | Path) -> None:
        atomic_write(path, json.dumps(self.to_dict()))  # never half a file, never two writers at once

    @classmethod
    def load(cls, path: str | Path, max_entries: int = 50_000) -> "NGramCache":
        """The cache saved at `path`; a file that is not one is the user's input error."""
        try:
            return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")), max_entries)
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
            raise InvalidOptionError(f"cannot read the n-gram cache {path}: {getattr(e, 'strerror', None) or e}") from None


@dataclass
class Bridged:
    target_ids: list[int]
    probs: list[float]  # the draft probability of each target token (product of its parts)
    draft_used: list[int]  # how many draft tokens each target token consumed (0: re-tokenised text)


class VocabularyBridge:
    def __init__(self, draft_tokenizer, target_tokenizer, cache: NGramCache | None = None):
        self.draft_tokenizer, self.target_tokenizer = draft_tokenizer, target_tokenizer
        self.draft_texts = token_bytes(draft_tokenizer)
        self.target_texts = token_bytes(target_tokenizer)
        target_strings = {t for t in self.target_texts if t}
        # a text may be several target tokens' text; map to the one the target's tokenizer itself gives
        shared = []
        for i, t in enumerate(self.draft_texts):
            if t and t in target_strings:
                try:
                    shared.append((i, t.decode("utf-8")))
                except UnicodeDecodeError:
                    pass  # part of a character
        encoded = target_tokenizer([t for _, t in shared], add_special_tokens=False).input_ids if shared else []
        self.direct = {i: ids[0] for (i, _), ids in zip(shared, encoded) if len(ids) == 1}
        self.cache = cache or NGramCache()

    def shared_vocabulary(self):
        """(draft ids [n], target ids [n]) of the direct map, one draft id per target id, sorted by
        draft id: the vocabulary on which the two models' distributions can be compared."""
        first: dict[int, int] = {}
        for d, t in sorted(self.direct.items()):
            first.setdefault(t, d)
        pairs = sorted((d, t) for t, d in first.items())
        return torch.tensor([d for d, _ in pairs]), torch.tensor([t for _, t in pairs])

    def to_target(self, draft_ids: list[int], draft_probs: list[float]) -> Bridged:
        """Target tokens for a chain of draft tokens (cache, then direct map, then re-tokenisation)."""
        out = Bridged([], [], [])
        i = 0
        while i < len(draft_ids):
            for n in range(min(self.cache.max_n, len(draft_ids) - i), 1, -1):
                hit = self.cache.get(tuple(draft_ids[i : i + n]))
                if hit is not None:
                    out.target_ids.append(hit)
                    out.probs.append(math.prod(draft_probs[i : i + n]))
                    out.draft_used.append(n)
                    i += n
                    break
            else:
                if draft_ids[i] in self.direct:
                    out.target_ids.append(self.direct[draft_ids[i]])
                    out.probs.append(draft_probs[i])
                    out.draft_used.append(1)
                    i += 1
                else:  # re-tokenise the rest of the draft text at this boundary
                    text = self.draft_tokenizer.decode(draft_ids[i:], skip_special_tokens=True)
                    ids = self.target_tokenizer(text, add_special_tokens=False).input_ids if text else []
                    out.target_ids += ids
                    out.probs += [math.prod(draft_probs[i:])] * len(ids)
                    out.draft_used += [0] * len(ids)
                    break
        return out

    def learn(self, draft_ids: list[int], target_ids: list[int]) -> int:
        """Add to the cache every target token that is exactly a run of >= 2 of these draft tokens
        (two tokenisations of the same text, aligned by byte offsets). Returns how many."""
        def ends(ids, texts):
            pos, out = 0, []
            for t in ids:
                s = texts[t] if 0 <= t < len(texts) else None
                if s is None:
                    return None
                pos += len(s)
                out.append(pos)
            return out

        d_end, t_end = ends(draft_ids, self.draft_texts), ends(target_ids, self.target_texts)
        if d_end is None or t_end is None:
            return 0
        starts = {0: 0}  # byte offset -> index of the draft token starting there
        for j, e in enumerate(d_end):
            starts[e] = j + 1
        ends_at = {e: j for j, e in enumerate(d_end)}
        learned, begin = 0, 0
        for k, e in enumerate(t_end):
            if begin in starts and e in ends_at:
                a, b = starts[begin], ends_at[e] + 1
                if b - a >= 2:
                    self.cache.add(tuple(draft_ids[a:b]), target_ids[k])
                    learned += 1
            begin = e
        return learned
