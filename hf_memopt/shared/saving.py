"""Plain user saves of a model whose training form carries method state (extra buffers, replaced layers).

A Trainer checkpoint (``Trainer._save_checkpoint`` -> ``save_model`` -> ``save_pretrained``) must keep that state so
``resume_from_checkpoint`` restores the run exactly. Everything a *user* saves (``trainer.save_model(dir)``,
``model.save_pretrained``, ``push_to_hub``) should instead load into a plain ``from_pretrained`` of the model's own
class, with no unexpected keys. A method registers a *plain form* here: a function ``plain(model, kwargs)`` that
returns a context manager inside which ``save_pretrained(**kwargs)`` writes the plain model (it may edit ``kwargs``,
e.g. filter a ``state_dict`` the Trainer computed beforehand under FSDP or DeepSpeed).

One wrapper on the model instance's ``save_pretrained`` enters every registered plain form, except while the Trainer
writes a checkpoint: one wrapper on the trainer's ``_save_checkpoint`` (a private Trainer name, reached through
:func:`hf_memopt.core.compat.wrap_save_checkpoint`) marks that save as raw. ``Trainer.save_model`` cannot tell the two apart by itself: its ``_internal_call=True`` is used both by
checkpoints and by ``push_to_hub``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from torch import nn
from transformers import Trainer

from hf_memopt.core import compat

__all__ = ["register_plain_save"]

PlainForm = Callable[[nn.Module, dict[str, Any]], AbstractContextManager]

_PLAIN_FORMS = "_hf_memopt_plain_forms"  # on the model: the registered plain forms
_RAW_SAVE = "_hf_memopt_raw_save"  # on the model: True while the Trainer writes a checkpoint
_CHECKPOINT_HOOK = "_hf_memopt_checkpoint_hook"  # on the trainer: the models its checkpoint saves mark raw


def register_plain_save(trainer: Trainer, model: nn.Module, plain: PlainForm) -> None:
    """Make user saves of ``model`` write its plain form ``plain`` while ``trainer``'s checkpoints stay raw.

    Idempotent per (model, plain) pair; several methods' plain forms are entered together, in registration order.
    """
    # the checkpoint hook first: if transformers changed, it raises before anything is wrapped
    models: list[nn.Module] | None = trainer.__dict__.get(_CHECKPOINT_HOOK)
    if models is None:
        models = []

        def raw_while_saving(save_checkpoint):
            @functools.wraps(save_checkpoint)
            def _save_checkpoint(*args, **kwargs):
                for m in models:
                    m.__dict__[_RAW_SAVE] = True
                try:
                    return save_checkpoint(*args, **kwargs)
                finally:
                    for m in models:
                        m.__dict__[_RAW_SAVE] = False

            return _save_checkpoint

        compat.wrap_save_checkpoint(trainer, raw_while_saving)
        trainer.__dict__[_CHECKPOINT_HOOK] = models
    if not any(m is model for m in models):
        models.append(model)

    forms: list[PlainForm] | None = model.__dict__.get(_PLAIN_FORMS)
    if forms is None:
        forms = model.__dict__[_PLAIN_FORMS] = []
        inner = model.save_pretrained  # the class's method, or an earlier instance wrapper (kept, not bypassed)

        @functools.wraps(inner)
        def save_pretrained(save_directory, *args, **kwargs):
            if model.__dict__.get(_RAW_SAVE, False):
                return inner(save_directory, *args, **kwargs)
            with contextlib.ExitStack() as stack:
                for form in forms:
                    stack.enter_context(form(model, kwargs))
                return inner(save_directory, *args, **kwargs)

        model.save_pretrained = save_pretrained
    if plain not in forms:
        forms.append(plain)
