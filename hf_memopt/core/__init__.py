"""The spine: ``attach()`` (:mod:`~hf_memopt.core.attach`), the method registry (:mod:`~hf_memopt.core.registry`),
and the other libraries' private names hf_memopt depends on, each version-checked (:mod:`~hf_memopt.core.compat`).

Methods (``hf_memopt.galore``, ``.blockllm``, ``.loqt``, ``.velora``, ``.zo``) register themselves here and build on
:mod:`hf_memopt.shared`; the user tools (CLI, recipes, estimator, memory report, model cards) live in
:mod:`hf_memopt.tools` and read the registry.
"""
