"""Every private name of another library hf_memopt uses goes through ``hf_memopt.core.compat``, has the shape hf_memopt
needs in the installed versions, behaves as hf_memopt relies on, and fails with a clear error when it changes.

A failure here after an upgrade of transformers, accelerate or torch names the accessor whose library changed; the
table in docs/architecture.md says what each one is for. (The stock ``optim`` handler table, the target rule and the
decay rule are pinned in ``tests/test_stock_optim.py``.)
"""

from __future__ import annotations

import ast
import logging
import threading
from pathlib import Path

import pytest
import torch
from conftest import TokenDataset, tiny_llama, training_args
from torch import nn
from transformers import Trainer

from hf_memopt.core import compat
from hf_memopt.core.compat import LibraryChangedError

PACKAGE = Path(__file__).resolve().parent.parent / "hf_memopt"


# ---- no private name outside compat.py --------------------------------------------------------------------------------


def _own_names(trees: dict[Path, ast.AST]) -> set[str]:
    """Names hf_memopt defines itself (functions, classes, attributes and variables it assigns, its arguments)."""
    own: set[str] = set()
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                own.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                own.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                own.add(node.id)
            elif isinstance(node, ast.arg):
                own.add(node.arg)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hf_memopt"):
                own.update(alias.asname or alias.name for alias in node.names)
    return own


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_no_module_but_compat_reaches_a_private_name_of_another_library():
    trees = {path: ast.parse(path.read_text(), str(path)) for path in sorted(PACKAGE.rglob("*.py"))}
    # Python's own: a namedtuple's documented ``_fields``; importlib's ``ModuleSpec._initializing`` (read by
    # core/_post_import.py the way importlib._bootstrap reads it, to tell a module still being imported)
    own = _own_names(trees) | {"_fields", "_initializing"}
    found = []
    for path, tree in trees.items():
        if path.name == "compat.py":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and _private(node.attr) and node.attr not in own:
                found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {ast.unparse(node)}")
            elif isinstance(node, ast.ImportFrom) and not (node.module or "").startswith("hf_memopt"):
                found += [
                    f"{path.relative_to(PACKAGE.parent)}:{node.lineno} from {node.module} import {alias.name}"
                    for alias in node.names
                    if _private(alias.name) or any(_private(part) for part in (node.module or "").split("."))
                ]
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("getattr", "hasattr", "setattr", "delattr")
                and len(node.args) >= 2
                and isinstance(node.args[1], ast.Constant)
                and isinstance(node.args[1].value, str)
                and _private(node.args[1].value)
                and node.args[1].value not in own
            ):
                found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {ast.unparse(node)}")
    assert not found, "private names of other libraries outside hf_memopt/core/compat.py:\n" + "\n".join(found)


# ---- transformers -------------------------------------------------------------------------------------------------


@pytest.fixture
def trainer(tmp_path):
    args = training_args(tmp_path, max_steps=1, save_strategy="steps", save_steps=1)
    return Trainer(model=tiny_llama(), args=args, train_dataset=TokenDataset(n=8))


def test_save_checkpoint_wrapper_runs_for_each_checkpoint_and_sees_the_internal_save_model(trainer, tmp_path):
    """hf_memopt tells checkpoint saves from user saves by ``_save_checkpoint``; inside it the Trainer calls
    ``save_model(..., _internal_call=True)``, and a user's ``save_model(dir)`` has ``_internal_call=False``."""
    events = []

    def record_checkpoint(original):
        def wrapper(*args, **kwargs):
            events.append("checkpoint begins")
            try:
                return original(*args, **kwargs)
            finally:
                events.append("checkpoint ends")

        return wrapper

    def record_save_model(original):
        def wrapper(output_dir=None, _internal_call=False, **kwargs):
            events.append(f"save_model internal={_internal_call}")
            return original(output_dir, _internal_call=_internal_call, **kwargs)

        return wrapper

    compat.wrap_save_checkpoint(trainer, record_checkpoint)
    compat.wrap_save_model(trainer, record_save_model)
    trainer.train()
    assert events == ["checkpoint begins", "save_model internal=True", "checkpoint ends"]
    assert (tmp_path / "checkpoint-1" / "trainer_state.json").exists()
    trainer.save_model(str(tmp_path / "user"))
    assert events[-1] == "save_model internal=False"


def test_create_model_card_wrapper_replaces_the_method_on_this_instance_only(trainer):
    calls = []
    compat.wrap_create_model_card(trainer, lambda original: lambda *a, **k: calls.append(original))
    trainer.create_model_card(model_name="x")
    assert len(calls) == 1 and calls[0].__func__ is Trainer.create_model_card
    assert "create_model_card" not in vars(Trainer(model=tiny_llama(), args=trainer.args))


def test_prepare_inputs_returns_the_batch_on_the_trainers_device(trainer):
    batch = {"input_ids": torch.zeros(2, 4, dtype=torch.long), "labels": torch.zeros(2, 4, dtype=torch.long)}
    prepared = compat.prepare_inputs(trainer, batch)
    assert set(prepared) == set(batch)
    assert all(t.device == trainer.args.device for t in prepared.values())


def test_attn_implementation_reads_the_kernel_a_model_runs():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)
    config._attn_implementation = "eager"  # what from_pretrained(attn_implementation="eager") sets
    assert compat.attn_implementation(config) == "eager"
    assert compat.attn_implementation(LlamaForCausalLM(config).config) == "eager"


def test_output_collector_holds_the_dict_capture_hooks_fill_during_a_forward():
    """ZO2 offload reads (and, for its second stream, replaces) this dict while a block runs."""
    model = tiny_llama().eval()
    collector = compat.output_collector()
    seen = []
    model.model.layers[0].register_forward_hook(lambda module, args, out: seen.append(collector.get()))
    with torch.no_grad():
        out = model(torch.zeros(1, 4, dtype=torch.long), output_hidden_states=True)
    assert collector.get() is None
    assert isinstance(seen[0], dict) and "hidden_states" in seen[0]
    assert seen[0]["hidden_states"] is not None and len(out.hidden_states) == 3


def test_a_meta_forward_needs_the_packed_sequence_check_answered_and_only_meta_calls_change():
    """If transformers drops the value-reading packed-sequence check, the ``raises`` fails: the swap can go."""
    from transformers import masking_utils

    config = tiny_llama().config
    config.use_cache = False  # training without a cache: the check runs (with a cache it is skipped)
    with torch.device("meta"):
        model = type(tiny_llama())(config).train()
    ids = torch.zeros(1, 4, dtype=torch.long, device="meta")
    with pytest.raises((RuntimeError, NotImplementedError)):
        model(ids)
    original = masking_utils.find_packed_sequence_indices
    packed = torch.tensor([[0, 1, 0, 1]])
    with compat.meta_tensors_are_not_packed():
        assert model(ids).logits.shape == (1, 4, 64)
        torch.testing.assert_close(masking_utils.find_packed_sequence_indices(packed), original(packed))
    assert masking_utils.find_packed_sequence_indices is original


# ---- accelerate ---------------------------------------------------------------------------------------------------


def test_prepare_model_wrapper_receives_evaluation_mode_on_this_accelerator_only(trainer):
    """``evaluation_mode=True`` is how ``keep_model_out_of_ddp`` skips the DDP wrap (exercised across real ranks in
    tests/test_distributed.py)."""
    from accelerate import Accelerator

    seen = []

    def record(original):
        def prepare(model, device_placement=None, evaluation_mode=False):
            seen.append(evaluation_mode)
            return original(model, device_placement=device_placement, evaluation_mode=True)

        return prepare

    compat.wrap_prepare_model(trainer.accelerator, record)
    model = nn.Linear(2, 2)
    assert trainer.accelerator.prepare_model(model) is model and seen == [False]
    assert type(trainer.accelerator).prepare_model is Accelerator.prepare_model  # the class is left alone


# ---- torch --------------------------------------------------------------------------------------------------------


def test_ignored_names_are_what_ddp_leaves_alone_and_earlier_names_are_kept(tmp_path):
    import torch.distributed as dist

    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    model._ddp_params_and_buffers_to_ignore = ["0.bias"]  # set by the user or another library
    compat.ignore_in_ddp(model, ["1.running_mean", "1.running_var"])
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(model)
        assert ddp.parameters_to_ignore == {"0.bias", "1.running_mean", "1.running_var"}
    finally:
        if started:
            dist.destroy_process_group()


def test_tensor_version_counts_in_place_writes_only():
    x = torch.zeros(3)
    before = compat.tensor_version(x)
    _ = x + 1
    assert compat.tensor_version(x) == before
    x.add_(1)
    x[0] = 5
    assert compat.tensor_version(x) == before + 2


def test_view_base_is_the_viewed_tensor_or_none():
    x = torch.zeros(4)
    assert compat.view_base(x) is None
    assert compat.view_base(x.view(2, 2)) is x
    assert compat.view_base(x[1:]) is x
    assert compat.view_base(x.clone()) is None


def test_storage_key_is_shared_by_views_and_differs_between_storages_on_meta():
    a = torch.empty(4, device="meta")
    b = torch.empty(4, device="meta")
    assert compat.storage_key(a) == compat.storage_key(a.view(2, 2)) == compat.storage_key(a[1:])
    assert compat.storage_key(a) != compat.storage_key(b)


def test_total_max_norm_is_nan_or_inf_exactly_when_a_value_is():
    """``all_finite`` off CPU rests on ``torch.nn.utils.get_total_norm(tensors, inf)`` propagating NaN and Inf and not
    overflowing on large finite values."""
    from torch.nn.utils import get_total_norm

    inf = float("inf")
    assert torch.isnan(get_total_norm([torch.tensor([1.0]), torch.tensor([float("nan"), 2.0])], inf))
    assert get_total_norm([torch.tensor([1.0]), torch.tensor([-inf])], inf) == inf
    assert get_total_norm([torch.full((8,), 3e38), torch.tensor([-3e38])], inf) == 3e38


def test_the_estimators_attention_swap_is_local_to_its_thread():
    """The trace answers ``F.scaled_dot_product_attention`` through a TorchFunctionMode: the function object stays
    the same, and a call from another thread during the trace takes the normal path."""
    from hf_memopt.tools.estimate import _FusedAttentionOnMeta

    original = torch.nn.functional.scaled_dot_product_attention
    q = torch.empty(1, 2, 4, 8, device="meta", requires_grad=True)
    other: list = []
    with _FusedAttentionOnMeta():
        out = torch.nn.functional.scaled_dot_product_attention(q, q, q)
        thread = threading.Thread(
            target=lambda: other.append(torch.nn.functional.scaled_dot_product_attention(q, q, q))
        )
        thread.start()
        thread.join()
        assert torch.nn.functional.scaled_dot_product_attention is original
    assert type(out.grad_fn).__name__ == "_FusedAttentionBackward"
    assert type(other[0].grad_fn).__name__ != "_FusedAttentionBackward"


# ---- the guards ---------------------------------------------------------------------------------------------------


class _NoSaveCheckpoint:
    """A trainer from a transformers release without ``_save_checkpoint``."""


class _OldSaveCheckpoint:
    def _save_checkpoint(self, model):  # lost its ``trial`` parameter
        pass


class _OldAccelerator:
    def prepare_model(self, model, device_placement=None):
        return model


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda: compat.wrap_save_checkpoint(_NoSaveCheckpoint(), lambda f: f),
            r"transformers \S+: _NoSaveCheckpoint\._save_checkpoint is missing; hf_memopt uses it to",
        ),
        (
            lambda: compat.wrap_save_checkpoint(_OldSaveCheckpoint(), lambda f: f),
            r"_OldSaveCheckpoint\._save_checkpoint no longer takes \['trial'\]",
        ),
        (lambda: compat.prepare_inputs(_NoSaveCheckpoint(), {}), r"transformers .*\._prepare_inputs is missing"),
        (
            lambda: compat.wrap_prepare_model(_OldAccelerator(), lambda f: f),
            r"accelerate \S+: _OldAccelerator\.prepare_model no longer takes \['evaluation_mode'\]",
        ),
        (lambda: compat.view_base(object()), r"torch \S+: Tensor\._base is missing"),
        (lambda: compat.tensor_version(object()), r"torch \S+: Tensor\._version is missing"),
    ],
    ids=["missing", "signature", "prepare_inputs", "accelerate", "view_base", "tensor_version"],
)
def test_a_changed_name_raises_naming_library_version_and_name(call, message):
    with pytest.raises(LibraryChangedError, match=message) as info:
        call()
    assert "checked with" in str(info.value)


def test_nothing_is_wrapped_when_the_checkpoint_hook_cannot_be_installed(monkeypatch):
    from hf_memopt.shared.saving import register_plain_save

    model = nn.Linear(2, 2)
    model.save_pretrained = lambda *a, **k: None
    original = model.save_pretrained
    with pytest.raises(LibraryChangedError):
        register_plain_save(_NoSaveCheckpoint(), model, lambda m, kwargs: None)
    assert model.save_pretrained is original


def test_an_untested_version_warns_once_and_goes_on(monkeypatch, caplog):
    from packaging.version import Version

    monkeypatch.setitem(compat.TESTED, "torch", (Version("0.1"), Version("0.2")))
    monkeypatch.setattr(compat, "_version_checked", set())
    with caplog.at_level(logging.WARNING, logger="hf_memopt"):
        compat.ignore_in_ddp(nn.Linear(2, 2), ["bias"])
        compat.ignore_in_ddp(nn.Linear(2, 2), ["bias"])
    warnings = [r for r in caplog.records if "outside the range" in r.getMessage()]
    assert len(warnings) == 1 and "torch" in warnings[0].getMessage()
