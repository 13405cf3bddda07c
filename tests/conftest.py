"""Tiny models and data shared by the tests (built from configs in a few lines; no downloads)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))


def tiny_llama(seed: int = 0, vocab: int = 64, hidden: int = 32, layers: int = 2, dtype=torch.float32):
    """A 2-layer LLaMA causal LM (~40k parameters)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden + 8,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).to(dtype)


def tiny_bert_classifier(seed: int = 0, num_labels: int = 2):
    """A 2-layer BERT sequence classifier."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=72,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        num_labels=num_labels,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(config)


class TokenDataset(torch.utils.data.Dataset):
    """Deterministic random token sequences for causal-LM training (labels = inputs)."""

    def __init__(self, n: int = 32, seq: int = 16, vocab: int = 64, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        # a learnable pattern: each sequence is an arithmetic progression mod vocab
        starts = torch.randint(0, vocab, (n, 1), generator=g)
        steps = torch.randint(1, 4, (n, 1), generator=g)
        self.ids = (starts + steps * torch.arange(seq)) % vocab

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def training_args(output_dir, **overrides):
    from transformers import TrainingArguments

    kwargs = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        max_steps=6,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


@pytest.fixture
def token_dataset():
    return TokenDataset()
