"""Read a GGUF file's header without loading the model.

Called before every load (to pick a backend and to fail early with a useful message), so it
parses the header itself from a memory map: only the key/value section and the tensor table are
touched, never the gigabyte of weights. It also checks that the file is as long as its tensor
table says, which catches interrupted downloads before llama.cpp does with a vaguer error.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from bot.errors import LoopbotError

GGUF_MAGIC = b"GGUF"
_DEFAULT_ALIGNMENT = 32

# GGUF value types: id -> struct format of a scalar.
_SCALARS: dict[int, str] = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
    10: "<Q", 11: "<q", 12: "<d",
}
_STRING = 8
_U64 = struct.Struct("<Q")
_ARRAY = 9


class GGUFError(LoopbotError, ValueError):
    """The file is missing, not GGUF, or truncated; the message names the file."""


@dataclass(frozen=True)
class TensorEntry:
    name: str
    shape: tuple[int, ...]  # ggml order: ne[0] (row length) first
    ggml_type: int
    offset: int


@dataclass(frozen=True)
class GGUFInfo:
    path: Path
    file_size: int
    version: int
    architecture: str
    name: str
    file_type: int | None
    quantization: str  # "Q8_0", "F16", ... (from general.file_type, else from the tensors)
    context_length: int | None
    embedding_length: int | None
    block_count: int | None
    feed_forward_length: int | None
    head_count: int | None
    head_count_kv: int | None
    vocab_size: int | None
    chat_template: str | None
    tokenizer_model: str | None
    tokenizer_pre: str | None
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None
    add_bos_token: bool | None
    # Id -> token text of the special ids above (and any other *_token_id key).
    special_tokens: Mapping[int, str]
    tensor_count: int
    parameter_count: int
    tied_embeddings: bool  # no output.weight: the output projection reuses token_embd
    # Every scalar and string key/value; arrays are left out (see array_lengths).
    metadata: Mapping[str, Any] = field(repr=False)
    array_lengths: Mapping[str, int] = field(repr=False)
    tensors: tuple[TensorEntry, ...] = field(repr=False)

    @property
    def size_mb(self) -> float:
        return self.file_size / 1e6


class _Cursor:
    def __init__(self, buf: mmap.mmap, path: Path) -> None:
        self.buf = buf
        self.pos = 0
        self.path = path
        self.size = len(buf)

    def _need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise GGUFError(f"{self.path}: truncated GGUF header ({what} at byte {self.pos} "
                            f"runs past the end of the {self.size}-byte file)")

    def scalar(self, fmt: str, what: str) -> Any:
        n = struct.calcsize(fmt)
        self._need(n, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return value

    def string(self, what: str) -> str:
        n = self.scalar("<Q", what)
        self._need(n, what)
        raw = self.buf[self.pos:self.pos + n]
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int, what: str) -> Any:
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype], what)
        if vtype == _STRING:
            return self.string(what)
        raise GGUFError(f"{self.path}: unknown GGUF value type {vtype} for {what}")


def _read_array(cur: _Cursor, key: str, keep: bool) -> tuple[int, list[int]]:
    """Skip (or note string offsets of) an array; returns its length and element offsets."""
    etype = cur.scalar("<I", key)
    count = cur.scalar("<Q", key)
    offsets: list[int] = []
    if etype in _SCALARS:
        width = struct.calcsize(_SCALARS[etype])
        cur._need(width * count, key)
        cur.pos += width * count
    elif etype == _STRING:
        # The hot loop of the whole parse (151,936 tokens + 151,387 merges for Qwen): kept to
        # one unpack per element; an overrun shows up as struct.error or pos past the end.
        unpack = _U64.unpack_from
        buf, pos = cur.buf, cur.pos
        try:
            for _ in range(count):
                if keep:
                    offsets.append(pos)
                pos += 8 + unpack(buf, pos)[0]
        except struct.error:
            pos = cur.size + 1
        cur.pos = min(pos, cur.size + 1)
        if pos > cur.size:
            raise GGUFError(f"{cur.path}: truncated GGUF header (array {key} runs past the "
                            f"end of the {cur.size}-byte file)")
    elif etype == _ARRAY:
        for _ in range(count):
            _read_array(cur, key, False)
    else:
        raise GGUFError(f"{cur.path}: unknown GGUF array element type {etype} for {key}")
    return count, offsets


def _quant_name(file_type: int | None, tensors: tuple[TensorEntry, ...]) -> str:
    from gguf.constants import GGMLQuantizationType, LlamaFileType

    if file_type is not None:
        try:
            name = LlamaFileType(file_type).name
        except ValueError:
            return f"file type {file_type}"
        for prefix in ("MOSTLY_", "ALL_"):
            name = name.removeprefix(prefix)
        return name
    # No general.file_type: name the type holding most of the matrix weights.
    weights: dict[int, int] = {}
    for t in tensors:
        if len(t.shape) >= 2:
            n = 1
            for d in t.shape:
                n *= d
            weights[t.ggml_type] = weights.get(t.ggml_type, 0) + n
    if not weights:
        return "unknown"
    top = max(weights, key=weights.__getitem__)
    try:
        return GGMLQuantizationType(top).name
    except ValueError:
        return f"ggml type {top}"


def _tensor_bytes(t: TensorEntry) -> int | None:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(t.ggml_type)]
    except (ValueError, KeyError):
        return None
    n = 1
    for d in t.shape:
        n *= d
    return n // block * type_size


def read_gguf_info(path: str | os.PathLike[str]) -> GGUFInfo:
    """Parse the GGUF header of ``path``; raises GGUFError for anything that is not a whole,
    readable GGUF file."""
    p = Path(path).expanduser()
    try:
        size = p.stat().st_size
        if not p.is_file():
            raise GGUFError(f"{p}: not a regular file")
        if size < 24:
            raise GGUFError(f"{p}: not a GGUF file (only {size} bytes)")
        with p.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _parse(p, size, buf)
    except FileNotFoundError:
        raise GGUFError(f"{p}: no such model file") from None
    except (PermissionError, IsADirectoryError) as exc:
        raise GGUFError(f"{p}: cannot read model file ({exc.strerror})") from None


def _parse(p: Path, size: int, buf: mmap.mmap) -> GGUFInfo:
    cur, version, n_tensors, n_kv = _read_preamble(p, buf)
    meta, arrays, token_offsets = _read_metadata(cur, n_kv)
    tensors = _read_tensors(cur, p, n_tensors)
    _check_length(p, size, cur.pos, meta, tensors)
    specials = _special_tokens(cur, meta, token_offsets)
    arch = str(meta.get("general.architecture", ""))
    if not arch:
        raise GGUFError(f"{p}: GGUF file without general.architecture")
    return _info(p, size, version, arch, meta, arrays, specials, tuple(tensors))


def _read_preamble(p: Path, buf: mmap.mmap) -> tuple[_Cursor, int, int, int]:
    """Magic and version checked; returns a cursor past the counts, the version, the tensor
    count and the key/value count."""
    magic = buf[:4]
    if magic != GGUF_MAGIC:
        raise GGUFError(f"{p}: not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    cur = _Cursor(buf, p)
    cur.pos = 4
    version = cur.scalar("<I", "version")
    if version not in (2, 3):
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        hint = " (a big-endian GGUF file?)" if swapped in (2, 3) else " (expected 2 or 3)"
        raise GGUFError(f"{p}: unsupported GGUF version {version}{hint}")
    n_tensors = cur.scalar("<Q", "tensor count")
    n_kv = cur.scalar("<Q", "key/value count")
    return cur, version, n_tensors, n_kv


def _read_metadata(cur: _Cursor, n_kv: int) -> tuple[dict[str, Any], dict[str, int], list[int]]:
    """Scalar and string values, array lengths, and the offsets of the vocabulary's tokens
    (to look special tokens up later without decoding the whole vocabulary)."""
    meta: dict[str, Any] = {}
    arrays: dict[str, int] = {}
    token_offsets: list[int] = []
    for i in range(n_kv):
        key = cur.string(f"key #{i}")
        vtype = cur.scalar("<I", key)
        if vtype == _ARRAY:
            keep = key == "tokenizer.ggml.tokens"
            count, offsets = _read_array(cur, key, keep)
            arrays[key] = count
            if keep:
                token_offsets = offsets
        else:
            meta[key] = cur.value(vtype, key)
    return meta, arrays, token_offsets


def _read_tensors(cur: _Cursor, p: Path, n_tensors: int) -> list[TensorEntry]:
    tensors = []
    for i in range(n_tensors):
        name = cur.string(f"tensor #{i} name")
        n_dims = cur.scalar("<I", name)
        if n_dims > 8:
            raise GGUFError(f"{p}: tensor {name} claims {n_dims} dimensions (corrupt header)")
        shape = tuple(cur.scalar("<Q", name) for _ in range(n_dims))
        ggml_type = cur.scalar("<I", name)
        offset = cur.scalar("<Q", name)
        tensors.append(TensorEntry(name, shape, ggml_type, offset))
    return tensors


def _check_length(p: Path, size: int, header_end: int, meta: Mapping[str, Any],
                  tensors: list[TensorEntry]) -> None:
    """Refuse a file shorter than its tensor table says (an interrupted download)."""
    alignment = int(meta.get("general.alignment", _DEFAULT_ALIGNMENT)) or _DEFAULT_ALIGNMENT
    data_start = -(-header_end // alignment) * alignment
    data_end = data_start
    for t in tensors:
        nbytes = _tensor_bytes(t)
        if nbytes is not None:
            data_end = max(data_end, data_start + t.offset + nbytes)
    if data_end > size:
        raise GGUFError(f"{p}: truncated GGUF file: its tensors need {data_end} bytes but the "
                        f"file has {size} (an interrupted download or copy?)")


def _special_tokens(cur: _Cursor, meta: Mapping[str, Any],
                    token_offsets: list[int]) -> dict[int, str]:
    """Id -> token text for every ``tokenizer.ggml.*_token_id`` key within the vocabulary."""

    def special_text(token_id: int) -> str | None:
        if 0 <= token_id < len(token_offsets):
            cur.pos = token_offsets[token_id]
            return cur.string("token")
        return None

    specials: dict[int, str] = {}
    for key, value in meta.items():
        if key.startswith("tokenizer.ggml.") and key.endswith("_token_id") and isinstance(
            value, int
        ):
            text = special_text(value)
            if text is not None:
                specials[value] = text
    return specials


def _info(p: Path, size: int, version: int, arch: str, meta: dict[str, Any],
          arrays: dict[str, int], specials: dict[int, str],
          tensors: tuple[TensorEntry, ...]) -> GGUFInfo:
    """The GGUFInfo of the parsed header (``arch``: general.architecture, checked present)."""

    def arch_int(suffix: str) -> int | None:
        value = meta.get(f"{arch}.{suffix}")
        return value if isinstance(value, int) else None

    def opt_int(key: str) -> int | None:
        value = meta.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    def opt_str(key: str) -> str | None:
        value = meta.get(key)
        return value if isinstance(value, str) else None

    parameter_count = 0
    for t in tensors:
        n = 1
        for d in t.shape:
            n *= d
        parameter_count += n
    names = {t.name for t in tensors}
    file_type = opt_int("general.file_type")
    add_bos = meta.get("tokenizer.ggml.add_bos_token")
    return GGUFInfo(
        path=p,
        file_size=size,
        version=version,
        architecture=arch,
        name=opt_str("general.name") or p.stem,
        file_type=file_type,
        quantization=_quant_name(file_type, tensors),
        context_length=arch_int("context_length"),
        embedding_length=arch_int("embedding_length"),
        block_count=arch_int("block_count"),
        feed_forward_length=arch_int("feed_forward_length"),
        head_count=arch_int("attention.head_count"),
        head_count_kv=arch_int("attention.head_count_kv"),
        vocab_size=arrays.get("tokenizer.ggml.tokens", arch_int("vocab_size")),
        chat_template=opt_str("tokenizer.chat_template"),
        tokenizer_model=opt_str("tokenizer.ggml.model"),
        tokenizer_pre=opt_str("tokenizer.ggml.pre"),
        bos_token_id=opt_int("tokenizer.ggml.bos_token_id"),
        eos_token_id=opt_int("tokenizer.ggml.eos_token_id"),
        pad_token_id=opt_int("tokenizer.ggml.padding_token_id"),
        add_bos_token=add_bos if isinstance(add_bos, bool) else None,
        special_tokens=MappingProxyType(specials),
        tensor_count=len(tensors),
        parameter_count=parameter_count,
        tied_embeddings="token_embd.weight" in names and "output.weight" not in names,
        metadata=MappingProxyType(meta),
        array_lengths=MappingProxyType(arrays),
        tensors=tensors,
    )


def describe(info: GGUFInfo) -> list[str]:
    """Human-readable lines for ``loopbot model info``."""

    def token(token_id: int | None) -> str:
        if token_id is None:
            return "-"
        text = info.special_tokens.get(token_id)
        return f"{token_id} {text}" if text is not None else str(token_id)

    def num(value: int | None) -> str:
        return "-" if value is None else str(value)

    lines = [
        f"file:            {info.path}",
        f"size:            {info.file_size / 2**20:.1f} MiB ({info.file_size} bytes)",
        f"name:            {info.name}",
        f"architecture:    {info.architecture}",
        f"quantisation:    {info.quantization}",
        f"parameters:      {info.parameter_count / 1e6:.1f} M in {info.tensor_count} tensors"
        + (" (tied embeddings)" if info.tied_embeddings else ""),
        f"context length:  {num(info.context_length)}",
        f"embedding size:  {num(info.embedding_length)}",
        f"layers:          {num(info.block_count)}",
        f"heads:           {num(info.head_count)} (kv {num(info.head_count_kv)})",
        f"feed-forward:    {num(info.feed_forward_length)}",
        f"vocabulary:      {num(info.vocab_size)} tokens, tokenizer "
        f"{info.tokenizer_model or '-'} (pre {info.tokenizer_pre or '-'})",
        f"bos / eos / pad: {token(info.bos_token_id)} / {token(info.eos_token_id)} / "
        f"{token(info.pad_token_id)}; add bos: {info.add_bos_token}",
        f"GGUF version:    {info.version}",
    ]
    # Escaped, not rendered: the template's exact characters (newlines) are what matters.
    template = info.chat_template
    shown = json.dumps(template, ensure_ascii=False) if template else "-"
    lines.append(f"chat template:   {shown}")
    return lines
