"""The spine: ``attach()`` (:mod:`~hf_memopt.core.attach`), which alone applies the :class:`MethodPlan` a method
declares (:mod:`~hf_memopt.core.plan`), every change it makes to a Trainer or its accelerator
(:mod:`~hf_memopt.core.trainer_hooks`), the method registry (:mod:`~hf_memopt.core.registry`), and the other
libraries' private names hf_memopt depends on, each version-checked (:mod:`~hf_memopt.core.compat`).

Methods (``hf_memopt.galore``, ``.blockllm``, ``.loqt``, ``.velora``, ``.zo``) register themselves here and build on
:mod:`hf_memopt.shared`; the user tools (CLI, recipes, estimator, memory report, model cards) live in
:mod:`hf_memopt.tools` and read the registry.
"""
