"""Find the last *complete* Trainer checkpoint, for resuming a run that was killed.

``transformers.Trainer`` writes ``checkpoint-<step>`` in place, file by file (``_save_checkpoint``: the weights through
``save_model``, then ``optimizer.pt`` / ``scheduler.pt``, the RNG states, and ``trainer_state.json`` last). A process
killed in the middle of that (SIGKILL, out-of-memory killer, pre-emption) leaves a folder with the newest step number
and only some of the files. ``transformers.trainer_utils.get_last_checkpoint`` (and ``resume_from_checkpoint=True``)
picks the folder with the largest step number whatever it holds, so the restarted run fails on the missing
``trainer_state.json`` (or on a truncated file), and keeps failing on every restart, since that folder stays the newest.

:func:`last_complete_checkpoint` skips such folders: a checkpoint is complete when its ``trainer_state.json`` (written
last) parses and names the folder's own step. The weights' layout is not checked: it depends on the engine
(``model.safetensors``, a sharded index, an FSDP ``pytorch_model_fsdp_0/`` folder, DeepSpeed's ``global_step*/``), and
all of it is written before ``trainer_state.json``.
"""

from __future__ import annotations

import json
import logging
import os
import re

__all__ = ["is_complete_checkpoint", "last_complete_checkpoint"]

logger = logging.getLogger(__name__)

_CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")  # transformers' PREFIX_CHECKPOINT_DIR pattern
_TRAINER_STATE = "trainer_state.json"
def _step_of(path: str) -> int | None:
    match = _CHECKPOINT_DIR.match(os.path.basename(os.path.normpath(path)))
    return int(match.group(1)) if match else None


def is_complete_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a ``checkpoint-<step>`` folder the Trainer finished writing.

    ``trainer_state.json`` is the last file ``Trainer._save_checkpoint`` writes, so its presence means the weights,
    optimizer, scheduler and RNG files before it were written in full; it must parse (a kill during its own write
    leaves it truncated) and record the folder's step.
    """
    path = os.fspath(path)
    step = _step_of(path)
    if step is None or not os.path.isdir(path):
        return False
    try:
        with open(os.path.join(path, _TRAINER_STATE), encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and state.get("global_step") == step


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The complete checkpoint with the largest step in ``output_dir`` (``None`` when there is none).

    Use it as ``trainer.train(resume_from_checkpoint=last_complete_checkpoint(args.output_dir))`` instead of
    ``resume_from_checkpoint=True``. Incomplete folders are skipped with a warning and left in place: the resumed run
    writes the same step again, over them.
    """
    output_dir = os.fspath(output_dir)
    if not os.path.isdir(output_dir):
        return None
    candidates = [os.path.join(output_dir, name) for name in os.listdir(output_dir) if _CHECKPOINT_DIR.match(name)]
    for path in sorted((p for p in candidates if os.path.isdir(p)), key=_step_of, reverse=True):
        if is_complete_checkpoint(path):
            return path
        logger.warning("skipping incomplete checkpoint %s (the run was stopped while writing it)", path)
    return None
