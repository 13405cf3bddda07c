"""Names of other libraries that are not part of their documented API, reached in one place.

Each accessor checks the library version against the range hf_memopt was tested with and the shape of what it
reads, and returns ``None`` with the reason instead of raising, so a changed library degrades one feature (with one
logged warning, decided by the caller) rather than ``import hf_memopt``. ``tests/test_stock_optim.py`` pins every
accessor against the installed versions, so an upgrade that changes one fails loudly there.

transformers (tested range ``TRANSFORMERS_TESTED``):

* ``transformers.trainer_optimizer._OPTIMIZER_HANDLERS``: the dict through which ``Trainer`` turns
  ``TrainingArguments.optim`` into an optimizer (``Trainer.get_optimizer_cls_and_kwargs`` looks the name up in the
  same dict object, imported into ``transformers.trainer``). Rerouting the stock ``galore_*`` names means replacing
  six of its entries.
* ``transformers.trainer_utils.check_target_module_exists``: the rule by which the stock ``optim_target_modules``
  selects modules. It has no leading underscore but is not documented; the stock path calls it rather than copying
  it, so the selection is transformers' own.
* ``Trainer.get_decay_parameter_names`` called without a ``Trainer`` (``self=None``): the stock path has no trainer
  instance, and the method reads no instance state in the tested versions; it decides which parameters (biases,
  normalisation weights) get no weight decay.

The names below are needed, not optional: their accessors raise :class:`LibraryChangedError` (naming the library, its
version and the name) when the name is missing or its signature changed, and log one warning per library when its
version is outside the tested range (:data:`TESTED`) but the shape still matches. Each is pinned by
``tests/test_compat.py``; docs/architecture.md says why no public hook suffices for each.

transformers:

* ``Trainer._save_checkpoint(model, trial)``, wrapped on one trainer instance (:func:`wrap_save_checkpoint`): the
  only place where a checkpoint's ``save_model`` can be told apart from a user's (``_internal_call=True`` is used by
  ``push_to_hub`` too).
* ``Trainer.save_model(output_dir, _internal_call)`` and ``Trainer.create_model_card``, public methods wrapped on one
  instance (:func:`wrap_save_model`, :func:`wrap_create_model_card`); ``_internal_call`` is a private parameter.
* ``Trainer._prepare_inputs(inputs)`` (:func:`prepare_inputs`): moves a batch to the device as ``training_step``
  does; a replacement training step must prepare its inputs the same way.
* ``PretrainedConfig._attn_implementation`` (:func:`attn_implementation`): which attention kernel a model runs.
* ``transformers.utils.output_capturing._active_collector`` (:func:`output_collector`): where hidden states,
  attentions and router logits are recorded during a forward.
* ``transformers.masking_utils.find_packed_sequence_indices`` (:func:`meta_tensors_are_not_packed`): replaced for
  meta tensors during the estimator's trace (its check reads tensor values).

accelerate:

* ``Accelerator.prepare_model(model, device_placement, evaluation_mode)``, wrapped on one accelerator instance
  (:func:`wrap_prepare_model`): ``evaluation_mode=True`` prepares a model without wrapping it in DDP.

torch:

* ``DistributedDataParallel._set_params_and_buffers_to_ignore_for_model`` and the ``_ddp_params_and_buffers_to_ignore``
  attribute it sets (:func:`ignore_in_ddp`): which parameters and buffers DDP leaves alone.
* ``Tensor._version`` (:func:`tensor_version`), ``Tensor._base`` (:func:`view_base`) and
  ``UntypedStorage._cdata`` (:func:`storage_key`): a tensor's in-place version counter, the tensor a view was taken
  of, and the identity of a storage (meta storages have no data pointer).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NoReturn

from packaging.version import Version

__all__ = [
    "LibraryChangedError",
    "STOCK_GALORE_NAMES",
    "TESTED",
    "TRANSFORMERS_TESTED",
    "attn_implementation",
    "decay_rule",
    "ignore_in_ddp",
    "meta_tensors_are_not_packed",
    "optimizer_handlers",
    "output_collector",
    "prepare_inputs",
    "reroute_stock_galore_names",
    "storage_key",
    "target_module_rule",
    "tensor_version",
    "view_base",
    "wrap_create_model_card",
    "wrap_prepare_model",
    "wrap_save_checkpoint",
    "wrap_save_model",
]

# transformers' stock GaLore ``optim`` names -> (GaLoreConfig.optimizer, layerwise)
STOCK_GALORE_NAMES: dict[str, tuple[str, bool]] = {
    "galore_adamw": ("adamw", False),
    "galore_adamw_8bit": ("adamw_8bit", False),
    "galore_adafactor": ("adafactor", False),
    "galore_adamw_layerwise": ("adamw", True),
    "galore_adamw_8bit_layerwise": ("adamw_8bit", True),
    "galore_adafactor_layerwise": ("adafactor", True),
}
_warned_not_rerouted = False

# [lowest, first untested) version of transformers whose private names below were checked
TRANSFORMERS_TESTED = (Version("5.0.0"), Version("6.0.0"))
# library -> [lowest, first untested) version whose private names below were checked
TESTED: dict[str, tuple[Version, Version]] = {
    "transformers": TRANSFORMERS_TESTED,
    "accelerate": (Version("1.1.0"), Version("2.0.0")),
    "torch": (Version("2.6.0"), Version("3.0.0")),
}
_version_checked: set[str] = set()


def _transformers_version_problem() -> str | None:
    import transformers

    version = Version(transformers.__version__)
    low, high = TRANSFORMERS_TESTED
    if not low <= Version(version.base_version) < high:
        return f"transformers {transformers.__version__} is outside the tested range [{low}, {high})"
    return None


def optimizer_handlers(names: Iterable[str]) -> tuple[dict[Any, Any] | None, str]:
    """transformers' ``optim`` name -> handler table, if it has the tested shape and holds every one of ``names``.

    Returns ``(table, "")``, or ``(None, reason)`` when the version is untested, the table is missing or not a dict,
    ``transformers.trainer`` looks names up in another object, or a name is not an ``OptimizerNames`` member in it.
    """
    problem = _transformers_version_problem()
    if problem:
        return None, problem
    from transformers import trainer as trainer_module
    from transformers import trainer_optimizer
    from transformers.training_args import OptimizerNames

    table = getattr(trainer_optimizer, "_OPTIMIZER_HANDLERS", None)
    if not isinstance(table, dict):
        return None, "transformers.trainer_optimizer._OPTIMIZER_HANDLERS is missing or not a dict"
    if getattr(trainer_module, "_OPTIMIZER_HANDLERS", None) is not table:
        return None, "transformers.trainer no longer looks optim names up in trainer_optimizer._OPTIMIZER_HANDLERS"
    for name in names:
        try:
            member = OptimizerNames(name)
        except ValueError:
            return None, f"{name!r} is no longer a transformers OptimizerNames value"
        if member not in table:
            return None, f"{name!r} has no entry in transformers.trainer_optimizer._OPTIMIZER_HANDLERS"
    return table, ""


def target_module_rule() -> tuple[Callable[..., Any] | None, str]:
    """``transformers.trainer_utils.check_target_module_exists(targets, name, return_is_regex=True)``, checked.

    Returns ``(function, "")`` or ``(None, reason)``. The function returns ``(matched, is_regex)``: a list entry
    matches a full module name by equality, as a substring, or as a full-match regex; a single string as a
    full-match regex.
    """
    problem = _transformers_version_problem()
    if problem:
        return None, problem
    from transformers import trainer_utils

    rule = getattr(trainer_utils, "check_target_module_exists", None)
    if not callable(rule):
        return None, "transformers.trainer_utils.check_target_module_exists is missing"
    try:
        if rule(["attn"], "h.0.attn.q", return_is_regex=True) != (True, False):
            return None, "transformers.trainer_utils.check_target_module_exists changed behaviour"
    except TypeError:
        return None, "transformers.trainer_utils.check_target_module_exists changed signature"
    return rule, ""


def decay_rule() -> tuple[Callable[[Any], list[str]] | None, str]:
    """``model -> names of the parameters that get weight decay``, by the Trainer's rule, without a Trainer.

    Returns ``(function, "")`` or ``(None, reason)``; checked on a Linear + LayerNorm probe (only the Linear weight
    decays).
    """
    problem = _transformers_version_problem()
    if problem:
        return None, problem
    from torch import nn
    from transformers import Trainer

    def rule(model: Any) -> list[str]:
        return list(Trainer.get_decay_parameter_names(None, model))

    try:
        decayed = rule(nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2)))
    except (AttributeError, TypeError) as err:
        return None, f"Trainer.get_decay_parameter_names needs a Trainer instance now ({err})"
    if decayed != ["0.weight"]:
        return None, f"Trainer.get_decay_parameter_names changed behaviour (probe gave {decayed})"
    return rule, ""


def reroute_stock_galore_names(handler: Callable[[Any], Any]) -> bool:
    """Point the six stock GaLore names of transformers' handler table at ``handler``; returns whether it did.

    When the table, the target rule or the decay rule the handler relies on is missing or changed, the names are
    left to transformers and one warning (the first time only, in this process) says so.
    """
    global _warned_not_rerouted
    table, reason = optimizer_handlers(STOCK_GALORE_NAMES)
    for accessor in (target_module_rule, decay_rule):
        reason = reason or accessor()[1]
    if table is None or reason:
        if not _warned_not_rerouted:
            _warned_not_rerouted = True
            logging.getLogger("hf_memopt.galore.stock").warning(
                "hf_memopt: TrainingArguments(optim='galore_*') is NOT rerouted to hf_memopt (%s); those names use "
                "transformers' own GaLore handler. hf_memopt.attach(trainer, GaLoreConfig(...)) works as usual",
                reason,
            )
        return False
    from transformers.training_args import OptimizerNames

    for name in STOCK_GALORE_NAMES:
        table[OptimizerNames(name)] = handler
    return True


# ---- names hf_memopt needs (raise when changed) ----------------------------------------------------------------------


class LibraryChangedError(RuntimeError):
    """A private name of another library that hf_memopt needs is missing or changed shape in the installed version."""


def _version(library: str) -> str:
    import importlib

    return getattr(importlib.import_module(library), "__version__", "?")


def _warn_if_untested(library: str) -> None:
    """One warning per library and process when its version is outside :data:`TESTED` (the shape is still checked)."""
    if library in _version_checked:
        return
    _version_checked.add(library)
    version = _version(library)
    low, high = TESTED[library]
    if not low <= Version(Version(version).base_version) < high:
        logging.getLogger("hf_memopt").warning(
            "hf_memopt: %s %s is outside the range whose private names hf_memopt checked [%s, %s); the names it uses "
            "still have the expected shape, so it goes on (see hf_memopt.core.compat)",
            library,
            version,
            low,
            high,
        )


def _fail(library: str, name: str, problem: str, purpose: str) -> NoReturn:
    low, high = TESTED[library]
    raise LibraryChangedError(
        f"{library} {_version(library)}: {name} {problem}; hf_memopt uses it to {purpose} (checked with {library} "
        f">={low},<{high}). Install a {library} version in that range, or an hf_memopt release that supports yours"
    )


def _require_method(owner: type, name: str, params: tuple[str, ...], library: str, purpose: str) -> None:
    """Raise :class:`LibraryChangedError` unless ``owner.name`` is callable and takes every one of ``params``."""
    _warn_if_untested(library)
    qualified = f"{owner.__name__}.{name}"
    method = getattr(owner, name, None)
    if not callable(method):
        _fail(library, qualified, "is missing", purpose)
    accepted = inspect.signature(method).parameters
    missing = [p for p in params if p not in accepted]
    if missing:
        _fail(library, qualified, f"no longer takes {missing} (signature {inspect.signature(method)})", purpose)


def _wrap_on_instance(instance: Any, name: str, make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
    """Replace ``instance.name`` (for this instance only) by ``make(current bound method or earlier wrapper)``."""
    setattr(instance, name, make(getattr(instance, name)))


def wrap_save_checkpoint(trainer: Any, make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
    """``trainer._save_checkpoint = make(trainer._save_checkpoint)`` on this instance, after checking the name."""
    _require_method(
        type(trainer), "_save_checkpoint", ("model", "trial"), "transformers", "tell checkpoint saves from user saves"
    )
    _wrap_on_instance(trainer, "_save_checkpoint", make)


def wrap_save_model(trainer: Any, make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
    """``trainer.save_model = make(trainer.save_model)`` on this instance; the wrapper must pass ``_internal_call``
    through (``True`` for the Trainer's own saves: checkpoints, ``push_to_hub``)."""
    _require_method(
        type(trainer),
        "save_model",
        ("output_dir", "_internal_call"),
        "transformers",
        "write the model card into each folder a user saves to",
    )
    _wrap_on_instance(trainer, "save_model", make)


def wrap_create_model_card(trainer: Any, make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
    """``trainer.create_model_card = make(trainer.create_model_card)`` on this instance (``push_to_hub`` and TRL's
    checkpoint hook call it)."""
    _require_method(type(trainer), "create_model_card", (), "transformers", "replace transformers' model card")
    _wrap_on_instance(trainer, "create_model_card", make)


def prepare_inputs(trainer: Any, inputs: Any) -> Any:
    """``trainer._prepare_inputs(inputs)``: the batch on the trainer's device, as ``Trainer.training_step`` gets it."""
    _require_method(
        type(trainer), "_prepare_inputs", ("inputs",), "transformers", "prepare a batch in a replaced training step"
    )
    return trainer._prepare_inputs(inputs)


def attn_implementation(config: Any) -> str | None:
    """``config._attn_implementation``: the attention kernel the model runs (``"eager"``, ``"sdpa"`` ...), or None."""
    from transformers import PretrainedConfig

    _warn_if_untested("transformers")
    if not isinstance(getattr(PretrainedConfig, "_attn_implementation", None), property):
        _fail("transformers", "PretrainedConfig._attn_implementation", "is no longer a property", "read the kernel")
    return config._attn_implementation


def output_collector() -> Any:
    """``transformers.utils.output_capturing._active_collector``: the context variable (``get`` / ``set`` / ``reset``)
    whose value is the dict the ``capture_outputs`` forward hooks append hidden states, attentions and router logits
    to during a forward (``None`` outside one)."""
    _warn_if_untested("transformers")
    purpose = "record the outputs of a forward it runs block by block (ZO2 offload)"
    try:
        from transformers.utils import output_capturing
    except ImportError:
        _fail("transformers", "transformers.utils.output_capturing", "is missing", purpose)
    collector = getattr(output_capturing, "_active_collector", None)
    if not all(callable(getattr(collector, m, None)) for m in ("get", "set", "reset")):
        _fail(
            "transformers",
            "transformers.utils.output_capturing._active_collector",
            "is missing or not a context variable (get/set/reset)",
            purpose,
        )
    return collector


@contextlib.contextmanager
def meta_tensors_are_not_packed() -> Iterator[None]:
    """Inside: ``transformers.masking_utils.find_packed_sequence_indices`` answers ``None`` (not packed) for meta
    tensors, and is unchanged for all others.

    # NOTE: the check reads position values, which meta tensors do not have; the function is looked up as a global of
    # ``masking_utils`` at each call, so the swap is visible to every thread while the context is open (it only
    # changes meta-tensor calls, which cannot succeed otherwise).
    """
    from transformers import masking_utils

    _warn_if_untested("transformers")
    name = "transformers.masking_utils.find_packed_sequence_indices"
    original = getattr(masking_utils, "find_packed_sequence_indices", None)
    if not callable(original):
        _fail("transformers", name, "is missing", "trace a forward on meta tensors (memory estimator)")
    if list(inspect.signature(original).parameters) != ["position_ids"]:
        _fail("transformers", name, "changed signature", "trace a forward on meta tensors (memory estimator)")

    def find_packed_sequence_indices(position_ids):
        return None if position_ids.device.type == "meta" else original(position_ids)

    masking_utils.find_packed_sequence_indices = find_packed_sequence_indices
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = original


def wrap_prepare_model(accelerator: Any, make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
    """``accelerator.prepare_model = make(accelerator.prepare_model)`` on this instance, after checking it takes
    ``evaluation_mode`` (``True``: prepare without wrapping the model in DDP)."""
    _require_method(
        type(accelerator),
        "prepare_model",
        ("model", "device_placement", "evaluation_mode"),
        "accelerate",
        "keep a model that reduces its own gradients out of DDP",
    )
    _wrap_on_instance(accelerator, "prepare_model", make)


def ignore_in_ddp(model: Any, names: Iterable[str]) -> None:
    """Add ``names`` (parameter and buffer names of ``model``) to those ``DistributedDataParallel`` will neither
    broadcast nor reduce when it wraps ``model``; names set earlier (by the user or another method) are kept."""
    from torch.nn.parallel import DistributedDataParallel

    _warn_if_untested("torch")
    purpose = "keep buffers every rank computes itself out of DDP's broadcasts"
    _require_method(
        DistributedDataParallel,
        "_set_params_and_buffers_to_ignore_for_model",
        ("module", "params_and_buffers_to_ignore"),
        "torch",
        purpose,
    )
    ignored = getattr(model, "_ddp_params_and_buffers_to_ignore", [])
    if not isinstance(ignored, (list, tuple, set)):
        _fail("torch", "Module._ddp_params_and_buffers_to_ignore", "is no longer a collection of names", purpose)
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, [*ignored, *names])


def tensor_version(tensor: Any) -> int:
    """``tensor._version``: the counter every in-place write to the tensor's data increments."""
    value = getattr(tensor, "_version", None)
    if not isinstance(value, int):
        _warn_if_untested("torch")
        _fail("torch", "Tensor._version", "is missing", "tell whether a cached tensor was written in place")
    return value


def view_base(tensor: Any) -> Any:
    """``tensor._base``: the tensor ``tensor`` is a view of, or ``None`` when it is not a view."""
    try:
        return tensor._base
    except AttributeError:
        _warn_if_untested("torch")
        _fail("torch", "Tensor._base", "is missing", "refuse in-place writes into views shared by two streams")


def storage_key(tensor: Any) -> int:
    """``tensor.untyped_storage()._cdata``: an identity of the storage, shared by all views of it and valid for meta
    tensors (whose ``data_ptr()`` is 0); unique while the storage lives."""
    value = getattr(tensor.untyped_storage(), "_cdata", None)
    if not isinstance(value, int):
        _warn_if_untested("torch")
        _fail("torch", "UntypedStorage._cdata", "is missing", "count each saved storage once (memory estimator)")
    return value
