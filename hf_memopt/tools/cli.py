"""The ``hf-memopt`` command.

    hf-memopt train RECIPE.yaml [--method NAME] [--set key=value ...] [--resume [CHECKPOINT]]
    hf-memopt compare RECIPE.yaml --methods adamw,galore,blockllm,loqt,velora,zo [--set key=value ...]
    hf-memopt methods
    hf-memopt estimate --model CONFIG_OR_ID --method NAME [--rank R] [--batch B] [--seq S] [--set key=value ...]
    hf-memopt --version

Every error ends with one line on stderr, no traceback: exit status 2 for a bad command line, recipe or setting (a
method's own checks when it is attached included, e.g. a target name that matches no layer), 1 for a failure from
outside (a model the offline Hub cannot give, a full disk). ``--debug`` (or ``HF_MEMOPT_DEBUG=1``) shows the
traceback instead. Heavy libraries (torch, transformers, datasets) are imported by the command that needs them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

__all__ = ["main"]

EXIT_FAILURE = 1
EXIT_USAGE = 2
MB = 2**20


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints usage + message and exits; we want one line
        raise CLIError(f"{message} (see `{self.prog} --help`)")


def _version() -> str:
    from hf_memopt import __version__

    return __version__


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hf-memopt", description="Memory-efficient training methods for the Hugging Face Trainer.")
    parser.add_argument("--version", action="version", version=f"hf-memopt {_version()}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    # --debug is accepted after the subcommand too; SUPPRESS keeps the subcommand from resetting it to False
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of an error"
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = sub.add_parser("train", help="run a recipe with one method", parents=[common])
    train.add_argument("recipe", help="recipe YAML file (see recipes/)")
    train.add_argument("--method", help="method to run (adamw, a registered name, or a+b); replaces method.name")
    train.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe value, e.g. --set method.rank=64 --set training.max_steps=10",
    )
    train.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="CHECKPOINT",
        help="continue this run: from its last complete checkpoint, or from the CHECKPOINT folder given",
    )
    train.add_argument("--no-progress", action="store_true", help="no progress bar")

    compare = sub.add_parser(
        "compare", parents=[common], help="run a recipe once per method, each in a fresh process; table + chart"
    )
    compare.add_argument("recipe", help="recipe YAML file")
    compare.add_argument("--methods", required=True, help="comma-separated methods, e.g. adamw,galore,blockllm")
    compare.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe value for every run (per method: methods.<name>.<field>=...)",
    )

    sub.add_parser("methods", help="list the registered methods", parents=[common])

    estimate = sub.add_parser(
        "estimate", help="predicted memory of a method from the model config alone", parents=[common]
    )
    estimate.add_argument("--model", required=True, help="a config.json path, a model folder or a Hub id")
    estimate.add_argument("--method", required=True, help="adamw or a registered method name")
    estimate.add_argument("--rank", type=int, default=None, help="rank of low-rank methods")
    estimate.add_argument("--batch", type=int, default=1, help="micro-batch size")
    estimate.add_argument("--seq", type=int, default=512, help="sequence length")
    estimate.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="other method settings passed to the estimator, e.g. --set sparsity=0.9",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``hf-memopt``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    _quiet()
    debug = os.environ.get("HF_MEMOPT_DEBUG", "") not in ("", "0")
    try:
        args = _parser().parse_args(argv)
        debug = debug or args.debug
        handler = {"train": _train, "compare": _compare, "methods": _methods, "estimate": _estimate}[args.command]
        return handler(args, argv)
    except CLIError as err:
        _fail(str(err))
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("hf-memopt: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # a recipe or setting (ValueError) or a failure from outside: one line either way
        if debug:
            raise
        if isinstance(err, ValueError):  # RecipeError, the config classes' checks, attach-time checks of a method
            _fail(_one_line(err))
            return EXIT_USAGE
        _fail(f"{_one_line(err)} (--debug shows the traceback)")
        return EXIT_FAILURE


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    if isinstance(err, (ValueError, OSError, RuntimeError, ImportError)) and text:
        return text  # these carry their own explanation
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _fail(message: str) -> None:
    print(f"hf-memopt: error: {message}", file=sys.stderr)


class _CpuAcceleratorNotice(logging.Filter):
    """Drops DeepSpeed's "Setting accelerator to CPU" notice on a machine where torch sees no GPU either (it is said
    on every import there); kept where torch does see one, since DeepSpeed then missed it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "Setting accelerator to CPU" not in record.getMessage():
            return True
        torch = sys.modules.get("torch")
        return torch is not None and torch.cuda.is_available()


def _quiet() -> None:
    """Silence what is noise for a command-line user; real warnings stay.

    Dropped: bitsandbytes' report of optional CPU kernels it could not load, DeepSpeed's CPU notice, and
    transformers' deprecation notice for ``gradient_checkpointing`` arguments the recipes do not pass; the progress
    bars of loading and writing weights and of each dataset step, in :func:`_quiet_loading` (the Trainer's training
    bar stays; ``--no-progress`` hides it).
    """
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    logging.getLogger("DeepSpeed").addFilter(_CpuAcceleratorNotice())
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing.* is deprecated", category=FutureWarning)


def _quiet_loading() -> None:
    """No progress bars for loading / writing weights (transformers) and tokenizing (datasets): each lasts a moment
    and, printed between the training logs, buries them. Imports both, so only commands that train call it."""
    import datasets
    from transformers.utils import logging as transformers_logging

    datasets.disable_progress_bars()
    transformers_logging.disable_progress_bar()


# ---------------------------------------------------------------------------------------------------------------


def _methods(args: argparse.Namespace, argv: list[str]) -> int:
    import hf_memopt  # noqa: F401  (importing the package registers every method)
    from hf_memopt.core.registry import METHODS
    from hf_memopt.tools.recipes.recipe import BASELINE

    width = max(len(name) for name in [BASELINE, *METHODS])
    print(f"{BASELINE:<{width}}  {'-':<16}  baseline: the Trainer's own AdamW, no hf_memopt method")
    for name in sorted(METHODS):
        spec = METHODS[name]
        extra = "" if spec.sets_optimizer else " (keeps the Trainer's optimizer; composes with others via +)"
        print(f"{name:<{width}}  {spec.config_cls.__name__:<16}  {spec.summary}{extra}")
    return 0


def _load(path: str, sets: list[str], method: str | None):
    import hf_memopt  # noqa: F401
    from hf_memopt.tools.recipes.recipe import load_recipe

    return load_recipe(path, sets, method=method)


def _train(args: argparse.Namespace, argv: list[str]) -> int:
    recipe = _load(args.recipe, args.sets, args.method)
    resume = _checkpoint_to_resume(recipe.run_dir, args.resume)
    _quiet_loading()
    from hf_memopt.tools.memory import MemoryBreakdown, format_breakdown_table
    from hf_memopt.tools.recipes.run import run_recipe

    where = getattr(recipe.data, "name", None) or recipe.task
    start = f" (resuming from {resume})" if resume else ""
    print(
        f"hf-memopt: {recipe.task} ({where}) on {recipe.model} with {recipe.method} -> {recipe.run_dir}{start}",
        flush=True,
    )
    command = shlex.join(["hf-memopt", *argv])
    results = run_recipe(recipe, progress=not args.no_progress, command=command, resume_from_checkpoint=resume)
    memory = MemoryBreakdown(**results["memory_bytes"])
    print(f"\nMemory breakdown ({recipe.method}):")
    print(format_breakdown_table({recipe.method: memory}))
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in results["metrics"].items()) or "none (no evaluation set)"
    loss = results["final_loss"]
    print(
        f"\nFinal: {results['steps']} steps, {results['median_step_seconds']:.3f} s/step (median), "
        f"final train loss {loss:.4f}"
        if loss is not None
        else "\nFinal: no loss logged"
    )
    print(f"Eval metrics: {metrics}")
    print(f"Results: {Path(recipe.run_dir) / 'results.json'}")
    return 0


def _checkpoint_to_resume(run_dir: str, resume: str | bool | None) -> str | None:
    """The checkpoint ``--resume`` names (``True``: the last complete one in ``run_dir``); without ``--resume``, a run
    folder that holds checkpoints of an earlier run is refused rather than mixed with this one's."""
    from hf_memopt.tools.checkpoints import is_complete_checkpoint, last_complete_checkpoint

    if resume is True:
        found = last_complete_checkpoint(run_dir)
        if found is None:
            raise CLIError(
                f"--resume: no complete checkpoint in {run_dir} (recipes save one every training.save_steps "
                "updates); run without --resume to start"
            )
        return found
    if resume is not None:
        if not is_complete_checkpoint(resume):
            raise CLIError(
                f"--resume {resume}: not a complete checkpoint-<step> folder (its trainer_state.json is "
                "missing or does not match); give another, or --resume alone for the last complete one"
            )
        return str(resume)
    earlier = sorted(p.name for p in Path(run_dir).glob("checkpoint-*") if p.is_dir())
    if earlier:
        raise CLIError(
            f"{run_dir} holds checkpoints of an earlier run ({', '.join(earlier)}): continue it with "
            "--resume, or delete them (or --set output_dir=...) to start over"
        )
    return None


# ---------------------------------------------------------------------------------------------------------------


def _compare(args: argparse.Namespace, argv: list[str]) -> int:
    import yaml

    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not names:
        raise CLIError("--methods needs at least one method name")
    if len(set(names)) != len(names):
        raise CLIError(f"--methods names a method twice: {args.methods}")
    recipes = {name: _load(args.recipe, args.sets, name) for name in names}  # all validated before anything runs
    from hf_memopt.tools.recipes.recipe import check_runnable

    for recipe in recipes.values():
        check_runnable(recipe)
    first = recipes[names[0]]
    out = Path(first.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, Any]] = {}
    failures: dict[str, str] = {}
    for i, (name, recipe) in enumerate(recipes.items(), 1):
        run_dir = Path(recipe.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        raw = dict(recipe.raw)
        raw["output_dir"] = str(out)
        # no checkpoints: writing one would count in the peak memory of the method that writes it (and a comparison
        # starts every method afresh, so it would never resume from them)
        raw["training"] = {"disable_tqdm": True, **(raw.get("training") or {}), "save_strategy": "no"}
        recipe_file = run_dir / "recipe.yaml"
        recipe_file.write_text(yaml.safe_dump(raw, sort_keys=False))
        (run_dir / "results.json").unlink(missing_ok=True)
        for old in run_dir.glob("checkpoint-*"):  # a comparison runs every method afresh
            shutil.rmtree(old)
        log = run_dir / "train.log"
        # A fresh interpreter per method: the peak RSS and allocator state are that method's own.
        cmd = [sys.executable, "-m", "hf_memopt.tools.cli", "train", str(recipe_file), "--no-progress"]
        print(f"[{i}/{len(recipes)}] {name}: training (log: {log})", flush=True)
        with open(log, "w") as f:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
        if proc.returncode == 0 and (run_dir / "results.json").exists():
            results[name] = json.loads((run_dir / "results.json").read_text())
            r = results[name]
            print(f"    {r['median_step_seconds']:.3f} s/step, final loss {r['final_loss']:.4f}", flush=True)
        else:
            lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
            failures[name] = lines[-1] if lines else f"exit status {proc.returncode}"
            print(f"    failed: {failures[name]}", flush=True)
    command = shlex.join(["hf-memopt", *argv])
    table = comparison_table(results, failures, recipe=first, command=command)
    (out / "comparison.md").write_text(table)
    (out / "comparison.json").write_text(
        json.dumps({"command": command, "results": results, "failures": failures}, indent=2, default=str)
    )
    if results:
        from hf_memopt.tools.memory import MemoryBreakdown, plot_memory_breakdown

        stem = Path(args.recipe).stem
        plot_memory_breakdown(
            {n: MemoryBreakdown(**r["memory_bytes"]) for n, r in results.items()},
            str(out / "memory.png"),
            title=f"{stem}: measured memory by method",
        )
    print("\n" + table)
    print(
        f"Written: {out / 'comparison.md'}, {out / 'comparison.json'}" + (f", {out / 'memory.png'}" if results else "")
    )
    return 0 if not failures else 1


def comparison_table(results: dict[str, dict[str, Any]], failures: dict[str, str], *, recipe: Any, command: str) -> str:
    """The Markdown comparison: memory breakdown (MB), ratio of tensor memory to adamw, time per step, loss, metrics."""
    from hf_memopt.tools.memory import MemoryBreakdown

    metric_names: list[str] = []
    for r in results.values():
        metric_names += [k for k in r["metrics"] if k not in metric_names]
    base = results.get("adamw")
    base_total = MemoryBreakdown(**base["memory_bytes"]).tensors_total if base else None
    header = ["method", *(p.replace("_", " ") for p in MemoryBreakdown.TENSOR_PARTS), "tensors total"]
    header += ["vs adamw"] if base_total else []
    header += ["peak RSS / GPU", "s / step", "steps", "final train loss", *[f"eval {m}" for m in metric_names]]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for name, r in results.items():
        b = MemoryBreakdown(**r["memory_bytes"])
        cells = [name] + [f"{getattr(b, p) / MB:.1f}" for p in MemoryBreakdown.TENSOR_PARTS]
        cells.append(f"{b.tensors_total / MB:.1f}")
        if base_total:
            cells.append(f"{b.tensors_total / base_total:.2f}x")
        cells += [
            f"{b.peak_process / MB:.0f}",
            f"{r['median_step_seconds']:.3f}",
            str(r["steps"]),
            "-" if r["final_loss"] is None else f"{r['final_loss']:.4f}",
        ]
        cells += [f"{r['metrics'][m]:.4f}" if m in r["metrics"] else "-" for m in metric_names]
        lines.append("| " + " | ".join(cells) + " |")
    for name, reason in failures.items():
        lines.append(f"| {name} | failed: {reason.replace('|', '/')} |" + " |" * (len(header) - 2))
    env = next(iter(results.values()))["environment"] if results else {}
    machine = (
        f"{env.get('device', '?')}, {env.get('cpu_count', '?')} CPUs ({env.get('processor', '?')})" if env else "?"
    )
    load = (
        f"; 1-min load average at the end of the first run {env['load_average_1m']:.1f}"
        if "load_average_1m" in env
        else ""
    )
    note = (
        f"\n\nMB = 2^20 bytes. Tensor parts are measured by `hf_memopt.tools.memory` (peaks over the run); peak RSS / GPU is "
        f"the process peak ({'CUDA max allocated' if env.get('device', 'cpu') != 'cpu' else 'resident set size'}), "
        f"one fresh process per method. s / step is the median wall time of an optimizer update. Final train loss is "
        f"the mean of the last 10% of logged losses.\n"
        f"Task {recipe.task}, model {recipe.model}. Machine: {machine}{load}; torch {env.get('torch', '?')}, "
        f"transformers {env.get('transformers', '?')}.\nCommand: `{command}`\n"
    )
    return "\n".join(lines) + note


# ---------------------------------------------------------------------------------------------------------------


def _estimate(args: argparse.Namespace, argv: list[str]) -> int:
    import yaml

    kwargs: dict[str, Any] = {}
    for assignment in args.sets:
        key, sep, text = assignment.partition("=")
        if not sep or not key.strip():
            raise CLIError(f"--set expects key=value; got {assignment!r}")
        kwargs[key.strip()] = yaml.safe_load(text) if text.strip() else ""
    try:
        from hf_memopt.tools.estimate import estimate_memory, format_estimate
    except ImportError as err:
        if err.name in ("hf_memopt.tools.estimate", None) or "estimate" in str(err):
            raise CLIError("the memory estimator (hf_memopt.tools.estimate) is not available in this installation") from None
        raise
    result = estimate_memory(args.model, args.method, args.rank, args.batch, args.seq, **kwargs)
    print(format_estimate(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
