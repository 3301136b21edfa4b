"""Test and demo fixtures: tiny random causal LMs and a character-level tokenizer, built locally.

For tests, benchmarks and the paper pipeline's demo only. Product code (`lopd.storage`,
`lopd.server`, `lopd.client`) never imports this package. Needs the `teacher` extra (torch,
transformers, tokenizers); importing the package itself is light.
"""

from .tiny_models import ARCHES, build_tiny_model, build_tokenizer

__all__ = ["ARCHES", "build_tiny_model", "build_tokenizer"]
