"""Tiny transformers models built from configs, shared by the test files (random weights, a fixed seed, no Hub).

Each builder seeds torch, then builds the model from a small config; keyword arguments override config fields, so a
test that needs another size says only what differs. (`tests/scripts/train_parity.py` keeps its own dropout-free BERT:
it also runs as a `torchrun` script, outside pytest.)
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    MobileBertConfig,
    MobileBertForSequenceClassification,
    PreTrainedModel,
)

#: The tiny BERT: one layer, 16 wide, a 64-token vocabulary.
TINY_BERT = dict(
    vocab_size=64,
    hidden_size=16,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=32,
    max_position_embeddings=32,
    num_labels=2,
)
#: The tiny GPT-2 language model (its `lm_head` is tied to `transformer.wte`).
TINY_GPT2 = dict(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=16, bos_token_id=0, eos_token_id=0)
#: The tiny MobileBERT: one layer, 32 wide with 16-wide bottlenecks, dropout off.
TINY_MOBILEBERT = dict(
    vocab_size=64,
    hidden_size=32,
    embedding_size=16,
    true_hidden_size=16,
    intra_bottleneck_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_feedforward_networks=1,
    max_position_embeddings=16,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)


def tiny_bert(
    seed: int = 0, *, model_class: type[PreTrainedModel] = BertForSequenceClassification, **overrides: Any
) -> PreTrainedModel:
    """A tiny BERT (`TINY_BERT` with `overrides`), a sequence classifier unless `model_class` says otherwise."""
    torch.manual_seed(seed)
    return model_class(BertConfig(**{**TINY_BERT, **overrides}))


def tiny_gpt2_lm(seed: int = 0, **overrides: Any) -> GPT2LMHeadModel:
    """A tiny GPT-2 language model (`TINY_GPT2` with `overrides`)."""
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(**{**TINY_GPT2, **overrides}))


def tiny_mobilebert(seed: int = 0, **overrides: Any) -> MobileBertForSequenceClassification:
    """A tiny MobileBERT sequence classifier (`TINY_MOBILEBERT` with `overrides`)."""
    torch.manual_seed(seed)
    return MobileBertForSequenceClassification(MobileBertConfig(**{**TINY_MOBILEBERT, **overrides}))
