"""Tiny randomly initialised Hugging Face models saved to a directory, as a member would point
``[model] text_model`` at a local model (tests only: no download, a few layers)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

#: the families the tests cover: a BERT-like encoder and a LLaMA-like decoder
FAMILIES = ("bert", "llama")


def save_tiny(out: Path, family: str = "llama", *, layers: int = 2, hidden: int = 32,
              seed: int = 1234, dtype: torch.dtype = torch.float32, causal_lm: bool = False
              ) -> Path:
    """Write a ``layers``-layer random ``family`` model and a tokenizer (the bundled MiniLM's
    WordPiece vocabulary) to ``out``; returns ``out``.  The same seed gives the same weights.
    ``dtype``: the type the weights are saved in (Hub LLMs are mostly bfloat16);
    ``causal_lm``: a LLaMA saved with its language-model head, as the Hub has them."""
    from transformers import (
        AutoTokenizer,
        BertConfig,
        BertModel,
        LlamaConfig,
        LlamaForCausalLM,
        LlamaModel,
    )

    from p2pfed.model.textbase import _bundled_path

    config: Any
    make: Any
    if family == "bert":
        config = BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers,
                            num_attention_heads=2, intermediate_size=2 * hidden,
                            max_position_embeddings=64)
        make = BertModel
    elif family == "llama":
        config = LlamaConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers,
                             num_attention_heads=2, num_key_value_heads=2,
                             intermediate_size=2 * hidden, max_position_embeddings=64)
        make = LlamaForCausalLM if causal_lm else LlamaModel
    else:
        raise ValueError(f"unknown family {family!r}")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = make(config).to(dtype)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(_bundled_path()).save_pretrained(str(out))
    return out


if __name__ == "__main__":  # python -m tests.tiny_hf OUT [bert|llama] [LAYERS]
    import sys

    args = sys.argv[1:]
    if not 1 <= len(args) <= 3:
        sys.exit("usage: python -m tests.tiny_hf OUT [bert|llama] [LAYERS]")
    where = save_tiny(Path(args[0]), args[1] if len(args) > 1 else "llama",
                      layers=int(args[2]) if len(args) > 2 else 2)
    print(f"wrote a tiny random model to {where}")
