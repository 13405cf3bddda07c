"""Tiny models and data shared by the tests (built from configs in a few lines; no downloads)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))
# transformers makes its log handler once, on the sys.stderr of its first import; imported here, that is the real
# stream, not the capture of whichever test happens to import it first (closed when that test ends).
import transformers  # noqa: E402, F401


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


def launch_ranks(script: str, out, world: int, **env_overrides: str) -> None:
    """Run ``script out`` under ``torchrun --nproc_per_node world`` on localhost (gloo, one thread per rank).

    The multi-process tests (test_distributed, test_fsdp) launch themselves once per module this way: the script's
    ``__main__`` is the worker and writes per-rank reports into ``out``.
    """
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    env.update(env_overrides)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={world}",
        "--master_addr=127.0.0.1",
        f"--master_port={port}",
        script,
        str(out),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


def assert_same_trained_model(straight, resumed, initial: dict) -> None:
    """Every parameter and buffer of ``resumed`` equals ``straight`` exactly, and training moved them from ``initial``
    (so the comparison is not vacuous). Used by the resume tests (checkpoint + resume, SIGKILL + resume)."""
    a, b = straight.state_dict(), resumed.state_dict()
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=key)
    assert any(not torch.equal(a[k], initial[k]) for k in initial if k in a), "nothing trained: a vacuous comparison"


@pytest.fixture
def one_thread():
    """Torch on one thread for the test: tiny steps run ~30x faster here, and a subprocess compared bit for bit with
    this one must use the same thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def refusal_of(run) -> dict | None:
    """``None`` when ``run()`` succeeds, else the exception's type name and message (the multi-process workers report
    refusals this way; the tests check the type and the words)."""
    try:
        run()
    except Exception as err:  # noqa: BLE001 - the caller checks the type
        return {"type": type(err).__name__, "message": str(err)}
    return None


def allocator_peak_of(work) -> int:
    """Bytes the CPU allocator held above its start at the peak of ``work()`` (transients included; the CPU's
    ``torch.cuda.max_memory_allocated``), read as the benchmarks read it (``benchmarks/common.py``)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    try:
        from common import allocator_peak_above_start
    finally:
        sys.path.pop(0)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        work()
    return allocator_peak_above_start(prof)
