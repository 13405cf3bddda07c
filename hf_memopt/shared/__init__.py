"""Machinery used by more than one method; methods import from here, never from each other.

* :mod:`hf_memopt.shared.projector`: the low-rank gradient projector and its refresh (GaLore's projection, LoQT's P);
* :mod:`hf_memopt.shared.layerwise`: per-parameter updates inside backward (GaLore's layer-wise mode, LoQT's
  ``layerwise=True``);
* :mod:`hf_memopt.shared.modules`: a method-neutral mark on modules whose computation a method has rewritten, so
  another method does not silently replace them;
* :mod:`hf_memopt.shared.estimate`: what a method's memory-estimate hook returns, and the byte rules of the optimizer
  states several methods share.
"""
