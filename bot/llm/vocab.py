"""Byte-level BPE vocabularies in the form llama.cpp's "gpt2" tokenizer expects.

llama.cpp stores a byte-level BPE as token strings in GPT-2's byte-to-unicode alphabet plus an
ordered merge list ("left right", the index is the merge rank). Two sources are built here:
Qwen's real vocabulary (the tiktoken rank file shipped in the ``dashscope`` package, read at run
time and never committed), and a tiny vocabulary trained on a few sentiment sentences so that
test models stay small but still tokenise the labels into few tokens.
"""

from __future__ import annotations

import base64
import collections
import importlib.util
import itertools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from bot.errors import LoopbotError

# Values of gguf.TokenType; kept here so this module does not import gguf.
TOKEN_NORMAL = 1
TOKEN_CONTROL = 3
TOKEN_UNUSED = 5

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
QWEN_SPECIALS = (ENDOFTEXT, IM_START, IM_END)

# Qwen's pre-tokenizer (dashscope/tokenizers/qwen_tokenizer.py); llama.cpp's "qwen2" pre-type
# applies the same expression, which is what makes the two tokenisations comparable.
QWEN_SPLIT_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Qwen1.5-Chat's tokenizer_config.json chat template, verbatim.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

QWEN_VOCAB_SIZE = 151936  # embedding rows of Qwen1.5 (tokenizer ids + unused padding)
QWEN_RANK_COUNT = 151643


class VocabError(LoopbotError, RuntimeError):
    """A vocabulary source is missing or malformed."""


@dataclass(frozen=True)
class Vocab:
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    bos_id: int
    eos_id: int
    pad_id: int
    source: str

    def __len__(self) -> int:
        return len(self.tokens)

    def id_of(self, token: str) -> int:
        return self.tokens.index(token)


@cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the alphabet llama.cpp decodes)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def byte_order() -> list[int]:
    """Byte values in GPT-2's (and Qwen's rank 0..255) order: printable ones first."""
    return list(bytes_to_unicode())


def encode_token(raw: bytes) -> str:
    table = bytes_to_unicode()
    return "".join(table[b] for b in raw)


def _finish(pieces: Sequence[bytes], merges: list[tuple[bytes, bytes]], pad_to: int,
            source: str) -> Vocab:
    tokens = [encode_token(p) for p in pieces]
    types = [TOKEN_NORMAL] * len(tokens)
    specials = {}
    for name in QWEN_SPECIALS:
        specials[name] = len(tokens)
        tokens.append(name)
        types.append(TOKEN_CONTROL)
    # Qwen's embedding matrix has rows beyond its tokenizer; converters name them [PADn].
    while len(tokens) < pad_to:
        tokens.append(f"[PAD{len(tokens)}]")
        types.append(TOKEN_UNUSED)
    return Vocab(
        tokens=tokens,
        token_types=types,
        merges=[f"{encode_token(a)} {encode_token(b)}" for a, b in merges],
        bos_id=specials[ENDOFTEXT],
        eos_id=specials[IM_END],
        pad_id=specials[ENDOFTEXT],
        source=source,
    )


# --- Qwen's real vocabulary -------------------------------------------------------------------

def qwen_tiktoken_path() -> Path | None:
    spec = importlib.util.find_spec("dashscope")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "resources" / "qwen.tiktoken"
        if candidate.is_file():
            return candidate
    return None


def load_qwen_ranks(path: Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(path.read_bytes().splitlines(), start=1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
        except ValueError as exc:
            raise VocabError(f"{path}:{lineno}: not a 'base64 rank' line") from exc
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise VocabError(f"{path}: ranks are not the dense range 0..{len(ranks) - 1}")
    return ranks


def _split_by_bpe(token: bytes, ranks: dict[bytes, int], max_rank: int) -> list[bytes]:
    """Run tiktoken's BPE on ``token`` using only merges ranked below ``max_rank``."""
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 1:
        best_rank = max_rank
        best = -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best_rank:
                best_rank = rank
                best = i
        if best < 0:
            break
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    return parts


def merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Recover the merge list from tiktoken ranks.

    A token of rank r is the merge of the two pieces that BPE, stopped before rank r, leaves of
    its bytes; ordering merges by r reproduces tiktoken's priorities in llama.cpp.
    """
    merges: list[tuple[bytes, bytes]] = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) == 1:
            continue
        parts = _split_by_bpe(token, ranks, rank)
        if len(parts) != 2:
            raise VocabError(f"rank {rank} ({token!r}) is not the merge of two lower ranks")
        merges.append((parts[0], parts[1]))
    return merges


def qwen_vocab(path: Path | None = None) -> Vocab:
    """Qwen1.5's full vocabulary (151,643 ranks + 3 specials, padded to 151,936 rows)."""
    path = path or qwen_tiktoken_path()
    if path is None:
        raise VocabError("the dashscope package (Qwen's qwen.tiktoken) is not installed")
    ranks = load_qwen_ranks(path)
    if len(ranks) != QWEN_RANK_COUNT:
        raise VocabError(f"{path}: expected {QWEN_RANK_COUNT} ranks, found {len(ranks)}")
    pieces = sorted(ranks, key=ranks.__getitem__)
    return _finish(pieces, merges_from_ranks(ranks), QWEN_VOCAB_SIZE, f"qwen.tiktoken ({path})")


# --- Small trained vocabularies ------------------------------------------------------------------

# A rough stand-in for Qwen's split (stdlib ``re`` has no \p{L}); it only shapes which merges
# are learned, llama.cpp still applies the real qwen2 expression when tokenising.
_TRAIN_SPLIT = re.compile(r" ?[^\W\d_]+|\d| ?[^\w\s]+|\s+", re.UNICODE)


def train_byte_bpe(texts: Iterable[str], n_merges: int, *, min_count: int = 2) -> Vocab:
    """Learn up to ``n_merges`` byte-pair merges from ``texts`` (ties broken deterministically)."""
    words: collections.Counter[tuple[bytes, ...]] = collections.Counter()
    for text in texts:
        for chunk in _TRAIN_SPLIT.findall(text):
            raw = chunk.encode("utf-8")
            words[tuple(raw[i:i + 1] for i in range(len(raw)))] += 1
    pieces = [bytes([b]) for b in byte_order()]
    known = set(pieces)
    merges: list[tuple[bytes, bytes]] = []
    while len(merges) < n_merges:
        pairs: collections.Counter[tuple[bytes, bytes]] = collections.Counter()
        for word, count in words.items():
            for pair in itertools.pairwise(word):
                pairs[pair] += count
        if not pairs:
            break
        pair, count = max(pairs.items(), key=lambda item: (item[1], item[0]))
        if count < min_count:
            break
        merged = pair[0] + pair[1]
        merges.append(pair)
        if merged not in known:
            known.add(merged)
            pieces.append(merged)
        words = collections.Counter({_apply_merge(w, pair, merged): c for w, c in words.items()})
    return _finish(pieces, merges, 0, f"byte-level BPE with {len(merges)} trained merges")


def _apply_merge(word: tuple[bytes, ...], pair: tuple[bytes, bytes],
                 merged: bytes) -> tuple[bytes, ...]:
    out: list[bytes] = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == pair[0] and word[i + 1] == pair[1]:
            out.append(merged)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def byte_level_vocab(texts: Iterable[str], n_merges: int, pad_to: int) -> Vocab:
    """Fallback for the big shape: trained merges, rows padded with unused tokens."""
    small = train_byte_bpe(texts, n_merges)
    tokens = list(small.tokens)
    types = list(small.token_types)
    while len(tokens) < pad_to:
        tokens.append(f"[PAD{len(tokens)}]")
        types.append(TOKEN_UNUSED)
    return Vocab(tokens, types, small.merges, small.bos_id, small.eos_id, small.pad_id,
                 f"{small.source}, padded to {pad_to} rows")
