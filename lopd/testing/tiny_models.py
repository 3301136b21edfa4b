"""Tiny real models and a tokenizer, built locally.

No model hub is reachable where this project is developed and tested, so tests, benchmarks and
the demo build small but real transformers models (Llama, Qwen2, ...) with random weights from a
fixed seed, plus a character-level tokenizer with a chat template. They exercise exactly the
code paths a real teacher does: `from_pretrained`, safetensors weights, a fast tokenizer,
chat templates, padded vocabularies.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any, Literal

Arch = Literal["llama", "qwen2", "mistral"]
ARCHES: tuple[str, ...] = ("llama", "qwen2", "mistral")

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
SPECIAL_TOKENS = (PAD, BOS, EOS, "<unk>", *ROLE_TOKENS)

# Each message is wrapped in role markers; the assistant turn ends with <|end|>, which is what a
# policy samples to stop, so it is part of the response when rollouts are given as messages.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer(out_dir: str | Path | None = None) -> Any:
    """A character-level fast tokenizer over printable ASCII plus chat special tokens.

    Returns a `PreTrainedTokenizerFast`; saves it to `out_dir` when given.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\x0b\x0c\r"]
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token="<unk>",
        additional_special_tokens=list(ROLE_TOKENS),
    )
    tok.chat_template = CHAT_TEMPLATE
    if out_dir is not None:
        tok.save_pretrained(str(out_dir))
    return tok


def _config(arch: str, vocab_size: int, hidden: int, layers: int, max_positions: int, **kw: Any) -> Any:
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    common.update(kw)
    if arch == "llama":
        return LlamaConfig(tie_word_embeddings=False, **common)
    if arch == "qwen2":
        return Qwen2Config(tie_word_embeddings=True, **common)
    if arch == "mistral":
        return MistralConfig(tie_word_embeddings=False, **common)
    raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {', '.join(ARCHES)}")


def build_tiny_model(
    out_dir: str | Path,
    arch: str = "llama",
    *,
    seed: int = 0,
    hidden: int = 64,
    layers: int = 2,
    max_positions: int = 1024,
    vocab_size: int | None = None,
    pad_vocab: bool = True,
    init_std: float = 0.2,
    **config_overrides: Any,
) -> Path:
    """Build a randomly initialised causal LM with the tiny tokenizer and save both to `out_dir`.

    `vocab_size` defaults to the tokenizer's size rounded up to a multiple of 64, as real models pad
    their embedding (`pad_vocab=False`: exactly the tokenizer's size). A trained model never samples
    its padding rows; a random one would, and precompute refuses ids the tokenizer does not have,
    so a padded model's generation config suppresses them: `generate` samples only real tokens
    (other samplers, such as vLLM, do not read that setting: sample from `pad_vocab=False` models).
    `init_std` is larger than the usual 0.02 so that the random model has peaked, varied
    next-token distributions (log-probs far from uniform) that make exactness tests bite.
    """
    import torch
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out)
    vocab = vocab_size if vocab_size is not None else (-(-len(tok) // 64) * 64 if pad_vocab else len(tok))
    config = _config(arch, vocab, hidden, layers, max_positions, initializer_range=init_std, **config_overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if vocab > len(tok):
        model.generation_config.suppress_tokens = list(range(len(tok), vocab))
    model.save_pretrained(str(out))
    return out
