"""The tiny random model of the fast tests (TRL's habit: built from a config)."""

from __future__ import annotations

import torch


def tiny_llama(tokenizer, seed: int = 0):
    """A 2-layer, 16-wide Llama with the real tokenizer's vocabulary: fast, deterministic."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
        tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(cfg).eval()
