"""Model and tokenizer fingerprints: what must change them, and what must not."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lopd.errors import InvalidInput
from lopd.fingerprint import (
    FINGERPRINT_PREFIX,
    is_fingerprint,
    model_fingerprint,
    resolve_model_fingerprint,
    short_fingerprint,
    tokenizer_fingerprint,
)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(model_dir: Path, **changes: object) -> None:
    path = model_dir / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config, indent=4))


def test_fingerprint_format_helpers() -> None:
    fp = FINGERPRINT_PREFIX + "0123456789abcdef" * 4
    assert is_fingerprint(fp)
    assert not is_fingerprint(fp.upper())
    assert not is_fingerprint(fp[:-1])
    assert not is_fingerprint("md5:" + "0" * 64)
    assert short_fingerprint(fp) == "sha256:0123456789ab"
    assert short_fingerprint("not-a-fingerprint") == "not-a-fingerprint"


def test_model_fingerprint_is_stable_and_distinguishes_models(
    tiny_llama_dir: Path, tiny_llama_b_dir: Path, tiny_qwen2_dir: Path
) -> None:
    fp = model_fingerprint(tiny_llama_dir)
    assert is_fingerprint(fp)
    assert model_fingerprint(str(tiny_llama_dir)) == fp
    assert model_fingerprint(tiny_llama_b_dir) != fp  # same architecture, other weights
    assert model_fingerprint(tiny_qwen2_dir) not in (fp, model_fingerprint(tiny_llama_b_dir))


def test_changing_one_weight_changes_the_fingerprint(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    model_dir = _copy(tiny_llama_dir, tmp_path / "m")
    before = model_fingerprint(model_dir)
    weights = model_dir / "model.safetensors"
    tensors = load_file(str(weights))
    name = sorted(tensors)[len(tensors) // 2]
    tensors[name].view(-1)[7] += 1e-3
    save_file(tensors, str(weights), metadata={"format": "pt"})
    assert model_fingerprint(model_dir) != before


def test_flipping_one_raw_bit_changes_the_fingerprint(tiny_llama_dir: Path, tmp_path: Path) -> None:
    model_dir = _copy(tiny_llama_dir, tmp_path / "m")
    before = model_fingerprint(model_dir)
    weights = model_dir / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0x01  # the lowest bit of the last byte of the last tensor
    weights.write_bytes(bytes(raw))
    assert model_fingerprint(model_dir) != before


def test_resharding_keeps_the_fingerprint(tiny_llama_dir: Path, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32)
    sharded = tmp_path / "sharded"
    model.save_pretrained(str(sharded), max_shard_size="100KB")
    assert len(list(sharded.glob("*.safetensors"))) > 1
    assert (sharded / "model.safetensors.index.json").is_file()
    assert model_fingerprint(sharded) == model_fingerprint(tiny_llama_dir)


def test_config_changes_that_matter_change_the_fingerprint(tiny_llama_dir: Path, tmp_path: Path) -> None:
    before = model_fingerprint(tiny_llama_dir)
    volatile = _copy(tiny_llama_dir, tmp_path / "volatile")
    _edit_config(volatile, transformers_version="0.0.1", _name_or_path="/elsewhere", use_cache=False)
    assert model_fingerprint(volatile) == before
    changed = _copy(tiny_llama_dir, tmp_path / "changed")
    _edit_config(changed, rms_norm_eps=1e-5)
    assert model_fingerprint(changed) != before


def test_pickled_weights_fallback(tmp_path: Path) -> None:
    model_dir = tmp_path / "bin"
    model_dir.mkdir()
    (model_dir / "config.json").write_text('{"model_type": "llama"}')
    (model_dir / "pytorch_model.bin").write_bytes(b"\x00" * 64)
    first = model_fingerprint(model_dir)
    assert is_fingerprint(first)
    (model_dir / "pytorch_model.bin").write_bytes(b"\x00" * 63 + b"\x01")
    assert model_fingerprint(model_dir) != first


def test_directories_that_are_not_models_are_rejected(tiny_llama_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="does not exist"):
        model_fingerprint(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InvalidInput, match=r"no config\.json") as e:
        model_fingerprint(empty)
    assert str(empty) in str(e.value)
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    shutil.copy(tiny_llama_dir / "config.json", no_weights / "config.json")
    with pytest.raises(InvalidInput, match="no model weights") as e:
        model_fingerprint(no_weights)
    assert str(no_weights) in str(e.value)
    truncated = _copy(tiny_llama_dir, tmp_path / "truncated")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(InvalidInput, match="outside the file"):
        model_fingerprint(truncated)


def test_fingerprint_module_stays_light(tiny_llama_dir: Path) -> None:
    """The light client imports this module; hashing weights must not pull in torch either."""
    code = (
        "import sys; from lopd.fingerprint import model_fingerprint; "
        f"fp = model_fingerprint({str(tiny_llama_dir)!r}); "
        "heavy = [m for m in ('torch', 'transformers', 'safetensors') if m in sys.modules]; "
        "assert not heavy, heavy; print(fp)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == model_fingerprint(tiny_llama_dir)


def test_tokenizer_fingerprint_same_tokenizer(tokenizer, tokenizer_dir: Path) -> None:  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    from lopd.testing import build_tokenizer

    fp = tokenizer_fingerprint(tokenizer)
    assert is_fingerprint(fp)
    assert tokenizer_fingerprint(tokenizer_dir) == fp
    assert tokenizer_fingerprint(str(tokenizer_dir)) == fp
    assert tokenizer_fingerprint(AutoTokenizer.from_pretrained(str(tokenizer_dir))) == fp
    assert tokenizer_fingerprint(build_tokenizer()) == fp


def test_tokenizer_fingerprint_sees_vocabulary_changes(tokenizer_dir: Path) -> None:
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    base = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    fp = tokenizer_fingerprint(base)

    added = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    added.add_tokens(["<tool>"])
    assert tokenizer_fingerprint(added) != fp

    vocab = base.get_vocab()
    swapped = dict(vocab)
    swapped["a"], swapped["b"] = vocab["b"], vocab["a"]  # same tokens, two ids exchanged
    core = Tokenizer(models.WordLevel(vocab=swapped, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    other = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>")
    assert sorted(other.get_vocab()) == sorted(vocab)
    assert tokenizer_fingerprint(other) != fp

    same_core = Tokenizer(models.WordLevel(vocab=dict(vocab), unk_token="<unk>"))
    assert tokenizer_fingerprint(PreTrainedTokenizerFast(tokenizer_object=same_core)) == fp


def test_tokenizer_fingerprint_rejects_non_tokenizers(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput):
        tokenizer_fingerprint(tmp_path / "missing")
    with pytest.raises(InvalidInput, match="not a tokenizer"):
        tokenizer_fingerprint(object())


def test_resolve_model_fingerprint(tiny_llama_dir: Path) -> None:
    fp = model_fingerprint(tiny_llama_dir)
    assert resolve_model_fingerprint(str(tiny_llama_dir)) == fp
    assert resolve_model_fingerprint(fp) == fp
    for garbage in ("", "sha256:xyz", "/no/such/model/dir", fp.upper()):
        with pytest.raises(InvalidInput, match="lopd fingerprint MODEL_DIR"):
            resolve_model_fingerprint(garbage)
