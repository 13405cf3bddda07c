"""What users run around training: the ``hf-memopt`` CLI (:mod:`~hf_memopt.tools.cli`), the YAML recipes
(:mod:`~hf_memopt.tools.recipes`), the memory estimator (:mod:`~hf_memopt.tools.estimate`), the measured memory report
(:mod:`~hf_memopt.tools.memory`), model cards (:mod:`~hf_memopt.tools.modelcard`), checkpoint lookup for resuming
(:mod:`~hf_memopt.tools.checkpoints`), the demo and step timing. Tools read the method registry; no method imports them.
"""
