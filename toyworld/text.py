"""The toy-world base's text side: a CLIP tokenizer over the world's vocabulary and a
small CLIPTextModel (toyworld/base.py trains it jointly with the UNet)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from .world import VOCABULARY

MAX_TOKENS = 24  # tokenizer model_max_length: the longest caption is 18 tokens


def tokenizer_word_order(words: tuple[str, ...] | list[str]) -> list[str]:
    """An order of `words` in which tuneqdm.testing.write_clip_tokenizer_files makes
    every word a single token.

    That function adds each word's merges left to right, so a merge of an earlier word
    ("t r" of "triangle") can split a later one ("s t r i p e d"). Longest words first,
    then moving words that still split to the front, reaches a fixed point quickly.
    """
    from transformers import CLIPTokenizer

    from tuneqdm.testing import write_clip_tokenizer_files

    order = sorted(dict.fromkeys(words), key=lambda w: (-len(w), w))
    for _ in range(20):
        with tempfile.TemporaryDirectory() as folder:
            write_clip_tokenizer_files(folder, order, max_length=MAX_TOKENS)
            tokenizer = CLIPTokenizer.from_pretrained(folder)
            split = [w for w in order if len(tokenizer(w, add_special_tokens=False).input_ids) != 1]
        if not split:
            return order
        order = split + [w for w in order if w not in split]
    raise RuntimeError(f"no word order makes these single tokens: {split}")


def build_tokenizer(folder: str | Path):
    """Write the world's CLIP tokenizer files to `folder` and load them."""
    from transformers import CLIPTokenizer

    from tuneqdm.testing import write_clip_tokenizer_files

    write_clip_tokenizer_files(folder, tokenizer_word_order(VOCABULARY), max_length=MAX_TOKENS)
    tokenizer = CLIPTokenizer.from_pretrained(str(folder))
    if len(tokenizer) < 256 or tokenizer.model_max_length != MAX_TOKENS:
        raise RuntimeError(f"tokenizer at {folder} loaded wrong ({len(tokenizer)} tokens)")
    return tokenizer


def build_text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=MAX_TOKENS,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """(B, MAX_TOKENS) int64 ids, padded as StableDiffusionPipeline pads."""
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids
