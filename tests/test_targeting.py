"""target_modules: the "all-linear" rule (peft's: no output embedding, no task head), peft wrappers, messages that say
what to write, and the first-call defaults of the issue (GaLore / LoQT on a classifier, the estimate CLI, fp16 on CPU).
"""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import TokenDataset, tiny_bert_classifier, tiny_llama, training_args
from transformers import Trainer
from transformers.pytorch_utils import Conv1D

from hf_memopt import GaLoreConfig, LoQTConfig, attach
from hf_memopt.shared.targeting import head_module_names, match_target_modules

SMALL = dict(hidden_size=32, intermediate_size=72, num_hidden_layers=1, num_attention_heads=4, vocab_size=64)


def tiny_roberta_classifier():
    from transformers import RobertaConfig, RobertaForSequenceClassification

    return RobertaForSequenceClassification(RobertaConfig(**SMALL, max_position_embeddings=64, num_labels=2))


def tiny_llama_classifier():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    return LlamaForSequenceClassification(LlamaConfig(**SMALL, num_key_value_heads=2, num_labels=3, pad_token_id=0))


def tiny_bart_classifier():
    from transformers import BartConfig, BartForSequenceClassification

    sizes = dict(encoder_layers=1, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4)
    config = BartConfig(d_model=32, encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=64, num_labels=3, **sizes)
    return BartForSequenceClassification(config)


def tiny_t5_classifier():
    from transformers import T5Config, T5ForSequenceClassification

    return T5ForSequenceClassification(T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=4, d_kv=8, vocab_size=64))


def tiny_xlnet_classifier():
    from transformers import XLNetConfig, XLNetForSequenceClassification

    return XLNetForSequenceClassification(XLNetConfig(d_model=32, n_layer=1, n_head=4, d_inner=64, vocab_size=64))


def tiny_bert_qa():
    from transformers import BertConfig, BertForQuestionAnswering

    return BertForQuestionAnswering(BertConfig(**SMALL, max_position_embeddings=64))


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=64, n_positions=64))


class LabelDataset(torch.utils.data.Dataset):
    """Random token sequences with a learnable label (the parity of the first token)."""

    def __init__(self, n: int = 16, seq: int = 8):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, 64, (n, seq), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i, 0] % 2}


# ---------------------------------------------------------------------------------------------------------------
# "all-linear": every Linear except the output layer


@pytest.mark.parametrize(
    "make, heads, kept",
    [
        (tiny_bert_classifier, ["classifier"], "bert.pooler.dense"),
        (tiny_roberta_classifier, ["classifier", "classifier.dense", "classifier.out_proj"], "roberta.encoder"),
        (tiny_llama_classifier, ["score"], "model.layers.0.mlp.down_proj"),
        (tiny_bart_classifier, ["classification_head"], "model.decoder.layers.0.fc1"),
        (tiny_t5_classifier, ["classification_head"], "transformer.decoder.block.0.layer.2.DenseReluDense.wi"),
        (tiny_xlnet_classifier, ["sequence_summary", "logits_proj"], "transformer.layer.0.ff.layer_1"),
        (tiny_bert_qa, ["qa_outputs"], "bert.encoder"),
        (tiny_llama, ["lm_head"], "model.layers.0.self_attn.q_proj"),
    ],
    ids=[
        "bert-classifier",
        "roberta-classifier-subtree",
        "llama-score",
        "bart-classification-head",
        "t5-classification-head",
        "xlnet-summary-and-logits",
        "bert-qa",
        "llama-lm-head",
    ],
)
def test_all_linear_leaves_out_the_output_embedding_and_task_head(make, heads, kept):
    model = make()
    found = match_target_modules(model, "all-linear")
    for head in heads:
        assert head not in found
    assert any(n.startswith(kept) for n in found)
    linear = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(found) == {n for n in linear if not any(n == h or n.startswith(h + ".") for h in heads)}


def test_head_module_names_reports_the_heads_left_out():
    assert head_module_names(tiny_bert_classifier()) == ["classifier"]
    assert head_module_names(tiny_llama()) == ["lm_head"]


def test_a_head_named_explicitly_is_targeted():
    assert list(match_target_modules(tiny_bert_classifier(), ["classifier"])) == ["classifier"]


def test_all_linear_takes_gpt2_conv1d_where_the_method_accepts_it():
    model = tiny_gpt2()
    found = match_target_modules(model, "all-linear", allowed_types=(torch.nn.Linear, Conv1D))
    assert "lm_head" not in found
    assert {n for n, m in model.named_modules() if isinstance(m, Conv1D)} == set(found)
    with pytest.raises(ValueError, match="matches no Linear layer of GPT2LMHeadModel"):
        match_target_modules(model, "all-linear", allowed_types=(torch.nn.Linear,))


def test_a_listed_container_says_which_layers_to_write_instead():
    with pytest.raises(ValueError, match=r"entry 'attention' .* name the layers inside it instead, e\.g\. \['output"):
        match_target_modules(tiny_bert_classifier(), ["attention"])
    with pytest.raises(ValueError, match=r"entry 'LayerNorm' .* of type LayerNorm; .*: leave it out"):
        match_target_modules(tiny_bert_classifier(), ["LayerNorm"])


# ---------------------------------------------------------------------------------------------------------------
# the first calls


@pytest.mark.parametrize("config", [GaLoreConfig(rank=8), LoQTConfig(rank=8)], ids=["galore", "loqt"])
def test_rank_8_attaches_and_trains_on_a_sequence_classifier(tmp_path, config, one_thread):
    model = tiny_bert_classifier()
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=2), train_dataset=LabelDataset())
    attach(trainer, config)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))


def test_estimate_cli_galore_on_minilm_leaves_the_classifier_out(capsys):
    from hf_memopt.tools.cli import main
    from hf_memopt.tools.estimate import estimate_memory

    result = estimate_memory("minilm", "galore", seq=8)
    assert "classifier" not in result["targets"]
    assert "bert.encoder.layer.0.attention.self.query" in result["targets"]
    assert main(["estimate", "--model", "minilm", "--method", "galore"]) == 0
    assert "galore" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------------
# precision on CPU


def test_fp16_on_cpu_warns_once_and_trains_exactly_as_float32(tmp_path, caplog, one_thread):
    weights = {}
    for fp16 in (False, True):
        model = tiny_llama()
        trainer = Trainer(
            model=model, args=training_args(tmp_path, fp16=fp16, max_steps=2), train_dataset=TokenDataset()
        )
        with caplog.at_level(logging.WARNING, logger="hf_memopt.core.attach"):
            caplog.clear()
            attach(trainer, GaLoreConfig(rank=4))
        warned = [r for r in caplog.records if "fp16=True has no effect on CPU" in r.getMessage()]
        assert len(warned) == int(fp16)
        trainer.train()
        weights[fp16] = {k: v.clone() for k, v in model.state_dict().items()}
    for key, value in weights[False].items():
        torch.testing.assert_close(weights[True][key], value, rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("path", ["stock-optim-name", "recipe-run-without-method"])
def test_fp16_on_cpu_is_said_on_the_paths_that_do_not_attach(tmp_path, caplog, path):
    from hf_memopt.tools.recipes.result import train_and_measure

    overrides = {"optim": "galore_adamw", "optim_target_modules": ["q_proj"]} if path.startswith("stock") else {}
    args = training_args(tmp_path, fp16=True, max_steps=1, **overrides)
    trainer = Trainer(model=tiny_llama(), args=args, train_dataset=TokenDataset())
    with caplog.at_level(logging.WARNING, logger="hf_memopt.core.attach"):
        if path.startswith("stock"):
            trainer.create_optimizer()
        else:
            train_and_measure(trainer)
    assert [r for r in caplog.records if "fp16=True has no effect on CPU" in r.getMessage()]


def test_bf16_on_a_machine_without_gpu_needs_use_cpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("transformers only refuses bf16 without use_cpu where no accelerator supports it")
    with pytest.raises(ValueError, match="use_cpu"):
        training_args(tmp_path, bf16=True, use_cpu=False)
    assert training_args(tmp_path, bf16=True).bf16  # use_cpu=True (the fixture's default) runs CPU autocast
