"""Machinery used by more than one method; methods import from here, never from each other.

* :mod:`hf_memopt.shared.projector`: the low-rank gradient projector and its refresh (GaLore's projection, LoQT's P);
* :mod:`hf_memopt.shared.layerwise`: per-parameter updates inside backward (GaLore's layer-wise mode, LoQT's
  ``layerwise=True``);
* :mod:`hf_memopt.shared.modules`: a method-neutral mark on modules whose computation a method has rewritten, so
  another method does not silently replace them.
"""
