"""Content fingerprints of models and tokenizers.

A teacher log-prob is only meaningful together with the exact teacher that produced it and the
exact tokenizer that defines its token ids. Names and paths are not identities (a path can be
overwritten, a hub name can point at a new revision), so stores record a hash of the content:

* `model_fingerprint` hashes the canonical config plus every weight tensor (name, dtype, shape,
  bytes) in name order, so re-sharding a checkpoint or re-saving it with a newer library keeps
  the fingerprint, while changing any single weight changes it.
* `tokenizer_fingerprint` hashes the (token, id) mapping, so two tokenizers agree iff every id
  means the same token.

This module is imported by the light training client, so it imports nothing heavy at module
level: safetensors headers are parsed by hand and transformers is imported only when a tokenizer
has to be loaded from a path.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import re
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lopd.errors import InvalidInput

FINGERPRINT_PREFIX = "sha256:"
_FINGERPRINT_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_MODEL_DOMAIN = b"lopd-model-fingerprint-v1\0"
_TOKENIZER_DOMAIN = b"lopd-tokenizer-fingerprint-v1\0"

# Config keys that describe how a checkpoint was saved or how it is run, not the function it
# computes: dropping them keeps the fingerprint stable across re-saves and library upgrades.
# The weights' dtype is hashed per tensor, so the config's default-dtype entry is redundant.
_VOLATILE_CONFIG_KEYS = frozenset(
    {
        "transformers_version",
        "use_cache",
        "torch_dtype",
        "dtype",
        "return_dict",
        "output_attentions",
        "output_hidden_states",
        "attn_implementation",
    }
)
_MAX_SAFETENSORS_HEADER = 100 * 2**20  # the format's own limit
_HASH_BLOCK = 64 * 2**20


def is_fingerprint(s: str) -> bool:
    """True for strings of the form `sha256:<64 lowercase hex>`."""
    return isinstance(s, str) and _FINGERPRINT_RE.match(s) is not None


def short_fingerprint(fp: str) -> str:
    """A 12-hex-digit prefix for display (`sha256:1a2b3c4d5e6f`); other strings are returned as-is."""
    if is_fingerprint(fp):
        return fp[: len(FINGERPRINT_PREFIX) + 12]
    return str(fp)


def _canonical_config(config_path: Path) -> bytes:
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InvalidInput(f"cannot read model config {config_path}: {e}") from e
    if not isinstance(config, dict):
        raise InvalidInput(f"model config {config_path} is not a JSON object")
    kept = {k: v for k, v in config.items() if k not in _VOLATILE_CONFIG_KEYS and not k.startswith("_")}
    return json.dumps(kept, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("utf-8")


def _weight_files(model_dir: Path, ext: tuple[str, ...], index_name: str, single_name: str) -> list[Path]:
    """The files that make up the checkpoint: those named by the shard index, else the single-file
    checkpoint, else every file with a matching extension (mirroring how loaders pick files)."""
    index = model_dir / index_name
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise InvalidInput(f"cannot read shard index {index}: {e}") from e
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise InvalidInput(f"shard index {index} names missing files: {', '.join(missing)}")
        return files
    if (model_dir / single_name).is_file():
        return [model_dir / single_name]
    return sorted(p for p in model_dir.iterdir() if p.is_file() and p.name.endswith(ext))


def _read_safetensors_header(path: Path) -> tuple[int, dict[str, Any]]:
    """(offset of the data section, {tensor name: header entry}) without loading any tensor."""
    with open(path, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) != 8:
            raise InvalidInput(f"{path} is not a valid safetensors file (shorter than 8 bytes)")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > _MAX_SAFETENSORS_HEADER:
            raise InvalidInput(f"{path} is not a valid safetensors file (header length {header_len})")
        try:
            header = json.loads(f.read(header_len))
        except ValueError as e:
            raise InvalidInput(f"{path} is not a valid safetensors file (bad JSON header: {e})") from e
    header.pop("__metadata__", None)
    return 8 + header_len, header


def _safetensors_tensors(files: list[Path]) -> Iterator[tuple[str, str, list[int], Path, int, int]]:
    """(name, dtype, shape, file, absolute start, absolute end) for every tensor, in name order."""
    entries: dict[str, tuple[str, list[int], Path, int, int]] = {}
    for path in files:
        data_start, header = _read_safetensors_header(path)
        size = path.stat().st_size
        for name, meta in header.items():
            try:
                begin, end = (int(x) for x in meta["data_offsets"])
                dtype, shape = str(meta["dtype"]), [int(d) for d in meta["shape"]]
            except (KeyError, TypeError, ValueError) as e:
                raise InvalidInput(f"{path}: malformed safetensors entry for tensor {name!r}") from e
            if not (0 <= begin <= end and data_start + end <= size):
                raise InvalidInput(f"{path}: tensor {name!r} lies outside the file (truncated download?)")
            if name in entries:
                raise InvalidInput(f"tensor {name!r} appears in both {entries[name][2]} and {path}")
            entries[name] = (dtype, shape, path, data_start + begin, data_start + end)
    for name in sorted(entries):
        dtype, shape, path, begin, end = entries[name]
        yield name, dtype, shape, path, begin, end


def _update_framed(h: Any, data: bytes) -> None:
    """Length-prefix every field so that no two different field sequences hash the same bytes."""
    h.update(struct.pack("<Q", len(data)))
    h.update(data)


def _hash_file_range(h: Any, path: Path, begin: int, end: int) -> None:
    h.update(struct.pack("<Q", end - begin))
    if end == begin:
        return
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        view = memoryview(mm)
        try:
            for pos in range(begin, end, _HASH_BLOCK):
                h.update(view[pos : min(pos + _HASH_BLOCK, end)])
        finally:
            view.release()


# Hashing a large teacher reads every byte of its weights (tens of GB); within one process the
# same directory is often fingerprinted more than once (consistency gate, then backend), so results
# are memoised, keyed by every file's size and modification time so that any rewrite invalidates.
_memo: dict[tuple[Any, ...], str] = {}


def _dir_state(path: Path) -> tuple[Any, ...]:
    entries = sorted((p.name, st.st_size, st.st_mtime_ns) for p in path.iterdir() if p.is_file() for st in [p.stat()])
    return (str(path.resolve()), tuple(entries))


def model_fingerprint(model_dir: str | Path) -> str:
    """`sha256:<hex>` of a local model directory's config and weights.

    Weights in safetensors are hashed per tensor (name, dtype, shape, raw bytes, in name order), so
    the result does not depend on how the checkpoint is split into shards. Directories with only
    pickled weights (`*.bin`, `*.pt`, `*.pth`) fall back to hashing those files' bytes, which does
    depend on the sharding.
    """
    path = Path(model_dir)
    if not path.is_dir():
        raise InvalidInput(f"model directory {path} does not exist or is not a directory")
    key = _dir_state(path)
    if key not in _memo:
        _memo[key] = _compute_model_fingerprint(path)
    return _memo[key]


def _compute_model_fingerprint(path: Path) -> str:
    config_path = path / "config.json"
    if not config_path.is_file():
        raise InvalidInput(f"{path} has no config.json; it is not a transformers model directory")
    h = hashlib.sha256(_MODEL_DOMAIN)
    _update_framed(h, _canonical_config(config_path))

    st_files = _weight_files(path, (".safetensors",), "model.safetensors.index.json", "model.safetensors")
    if st_files:
        h.update(b"safetensors\0")
        n = 0
        for name, dtype, shape, file, begin, end in _safetensors_tensors(st_files):
            _update_framed(h, json.dumps([name, dtype, shape], separators=(",", ":")).encode("utf-8"))
            _hash_file_range(h, file, begin, end)
            n += 1
        if n == 0:
            raise InvalidInput(f"the safetensors files in {path} contain no tensors")
        return FINGERPRINT_PREFIX + h.hexdigest()

    pickled = _weight_files(path, (".bin", ".pt", ".pth"), "pytorch_model.bin.index.json", "pytorch_model.bin")
    if not pickled:
        raise InvalidInput(
            f"{path} has no model weights (*.safetensors, *.bin, *.pt or *.pth); is the download complete?"
        )
    h.update(b"pickled\0")
    for file in pickled:
        _update_framed(h, file.name.encode("utf-8"))
        _hash_file_range(h, file, 0, file.stat().st_size)
    return FINGERPRINT_PREFIX + h.hexdigest()


def tokenizer_fingerprint(tokenizer_or_dir: Any) -> str:
    """`sha256:<hex>` of a tokenizer's (token, id) mapping, added tokens included.

    Accepts a tokenizer object (anything with `get_vocab()`) or a path to load with
    `transformers.AutoTokenizer`. Normalisation and pre-tokenisation rules are deliberately left
    out: what must agree between teacher and student is what each id means.
    """
    tok = tokenizer_or_dir
    if isinstance(tokenizer_or_dir, (str, Path)):
        if not Path(tokenizer_or_dir).is_dir():
            raise InvalidInput(f"tokenizer directory {tokenizer_or_dir} does not exist")
        try:
            from transformers import AutoTokenizer
        except ImportError as e:
            raise InvalidInput(
                "loading a tokenizer from a path needs transformers: pip install 'lightning-opd[teacher]'"
            ) from e
        tok = AutoTokenizer.from_pretrained(str(tokenizer_or_dir))
    if not hasattr(tok, "get_vocab"):
        raise InvalidInput(f"{type(tok).__name__} is not a tokenizer (it has no get_vocab())")
    items = sorted((str(t), int(i)) for t, i in tok.get_vocab().items())
    payload = json.dumps(items, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return FINGERPRINT_PREFIX + hashlib.sha256(_TOKENIZER_DOMAIN + payload).hexdigest()


def resolve_model_fingerprint(model_dir_or_fingerprint: str) -> str:
    """A model directory's fingerprint, or the argument itself when it already is a fingerprint."""
    s = str(model_dir_or_fingerprint)
    if s.strip() and Path(s).is_dir():
        return model_fingerprint(s)
    if is_fingerprint(s):
        return s
    raise InvalidInput(
        f"{s!r} is neither a model directory nor a fingerprint (sha256:<64 hex>); "
        "run `lopd fingerprint MODEL_DIR` to get one"
    )
