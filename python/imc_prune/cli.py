"""``imc-prune``: the command line of the pruning layer.

Subcommands:

* ``run``: one method on one model at one target (or IMC's automatic sparsity), next to the
  dense network of the same seed; prints the dense accuracy, the method's decision, the
  weights remaining and the pruned accuracy, and where the files are.
* ``compare``: methods x targets x seeds (dense added per seed), resumable: a comparison
  killed midway and started again with the same arguments skips the finished runs.
* ``spectrum``: IMC's analysis only (warm-up, spectral density, top eigenvalues, Lipschitz
  estimate, gap); prints the gap and writes ``spectrum.json`` and ``spectrum.png``.

Every subcommand writes into ``--out`` (default ``runs/<dataset>-<model>-<subcommand or
method>``): ``runs.jsonl`` (one line per finished run), ``results.json``, ``results.md`` and
PNG plots (when matplotlib is installed; the files list says so when it is not). Without
``--dataset`` the data is Fashion-MNIST, or scikit-learn digits with a
printed note when Fashion-MNIST is not installed.

Example:
    $ imc-prune run --method imc                       # Fashion-MNIST, LeNet-300-100
    $ imc-prune run --method snip --remaining 5%
    $ imc-prune run --remaining auto 5% 2%            # IMC at its own sparsity and two more
    $ imc-prune compare --methods imc-magnitude snip imp --remaining 0.2 0.05 auto --seeds 0 1
    $ imc-prune compare --methods imc snip --remaining 0.2 --granularity block --block-size 2
    $ imc-prune spectrum --model conv2 --k 64
    $ python -m imc_prune run --quick --method imc     # a smoke test in seconds
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

from imc_prune import experiment, report
from imc_prune.data import DATASET_NAMES, DatasetNotFoundError
from imc_prune.masks import GRANULARITIES, SCOPES
from imc_prune.models import MODEL_NAMES

DEFAULT_DATASET = "fashion-mnist"
FALLBACK_DATASET = "digits"
DEFAULT_MODEL = "lenet300100"
DEFAULT_TARGETS = ("0.2", "0.1", "0.05", "0.02", "auto")
# --quick: a smoke test in seconds, not a measurement.
QUICK_TRAIN = {"epochs": 1}
QUICK_SUBSETS = {"train_subset": 5000, "test_subset": 2000}
QUICK_IMC = {"hessian_batch_size": 256, "k": 8, "n_probes": 4, "steps": 24, "n_directions": 1}
QUICK_BASELINE = {"synflow_iterations": 20}

# --option -> imc() keyword (only the options given on the command line go into the spec, so
# runs with the defaults keep the same key whatever the defaults print as).
_IMC_OPTIONS = {
    "score": "score",
    "warmup_steps": "warmup_steps",
    "warmup_lr": "warmup_lr",
    "warmup_batch": "warmup_batch_size",
    "hessian_batch": "hessian_batch_size",
    "k": "k",
    "probes": "n_probes",
    "lanczos_steps": "steps",
    "eps": "eps",
    "directions": "n_directions",
    "c": "c",
    "rewind": "rewind_to",
    "curvature": "curvature",
    "engine": "engine",
}
_TRAIN_OPTIONS = {
    "preset": "preset",
    "epochs": "epochs",
    "steps": "steps",
    "optimizer": "optimizer",
    "lr": "lr",
    "batch_size": "batch_size",
}


class CLIError(Exception):
    """A problem with the request that the user can fix; printed without a traceback."""


def parse_remaining(text: str) -> float | str:
    """A target weights remaining: ``"auto"``, a fraction (``"0.05"``) or a percentage
    (``"5%"``), in ``(0, 1]``.

    Raises:
        argparse.ArgumentTypeError: anything else.

    Example:
        >>> parse_remaining("5%"), parse_remaining("0.2"), parse_remaining("auto")
        (0.05, 0.2, 'auto')
    """
    value = text.strip().lower()
    if value == "auto":
        return "auto"
    try:
        number = float(value[:-1]) / 100 if value.endswith("%") else float(value)
    except ValueError:
        number = math.nan
    if not (math.isfinite(number) and 0 < number <= 1):
        raise argparse.ArgumentTypeError(
            f"weights remaining must be 'auto', a fraction in (0, 1] or a percentage "
            f"(e.g. 0.05 or 5%), got {text!r}"
        )
    return number


def _name(names: Sequence[str], what: str):
    """An argparse type that accepts a name of ``names`` in any spelling and says the valid
    names otherwise."""

    def parse(text: str) -> str:
        try:
            return experiment._canonical(text, names, what)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = what
    return parse


def _device(text: str):
    """``--device``: checked when the arguments are read (a CUDA device on a machine without
    one is an argument error, not an assertion from inside torch)."""
    try:
        return experiment.resolve_device(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _common(parser: argparse.ArgumentParser, *, many_models: bool) -> None:
    data = parser.add_argument_group("data and model")
    data.add_argument(
        "--dataset",
        type=_name(DATASET_NAMES, "dataset"),
        default=None,
        help=f"dataset (default {DEFAULT_DATASET}; {FALLBACK_DATASET} when it is not installed "
        f"and --dataset is not given); one of {', '.join(DATASET_NAMES)}",
    )
    data.add_argument("--data-root", default=None, help="folder holding the dataset files")
    model_help = f"one of {', '.join(MODEL_NAMES)} (default {DEFAULT_MODEL})"
    if many_models:
        data.add_argument(
            "--model",
            nargs="+",
            type=_name(MODEL_NAMES, "model"),
            default=[DEFAULT_MODEL],
            help="models: " + model_help,
        )
    else:
        data.add_argument(
            "--model", type=_name(MODEL_NAMES, "model"), default=DEFAULT_MODEL, help=model_help
        )

    training = parser.add_argument_group("training (defaults: the model's LTH preset)")
    training.add_argument(
        "--preset", default=None, help="a preset of imc_prune.train.PRESETS (e.g. lth_lenet)"
    )
    length = training.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=_positive_int, default=None, help="training epochs")
    length.add_argument("--steps", type=_positive_int, default=None, help="training SGD steps")
    training.add_argument("--optimizer", choices=("adam", "sgd", "adamw"), default=None)
    training.add_argument("--lr", type=_positive_float, default=None, help="learning rate")
    training.add_argument("--batch-size", type=_positive_int, default=None)
    training.add_argument(
        "--train-subset", type=_positive_int, default=None, help="train on n samples only"
    )
    training.add_argument(
        "--test-subset", type=_positive_int, default=None, help="evaluate on n samples only"
    )

    general = parser.add_argument_group("general")
    general.add_argument("--out", default=None, help="output folder (default runs/<...>)")
    general.add_argument(
        "--device",
        type=_device,
        default="auto",
        help="cpu, cuda, cuda:1, ... or auto (default)",
    )
    general.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bars (default: on when stderr is a terminal)",
    )
    general.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: 1 epoch, 5000 training and 2000 test samples, a small spectrum",
    )


def _imc_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("IMC (defaults: DESIGN section 5)")
    group.add_argument("--score", choices=experiment.IMC_SCORES, default=None)
    group.add_argument("--warmup-steps", type=int, default=None, help="SGD warm-up steps (10)")
    group.add_argument("--warmup-lr", type=_positive_float, default=None, help="(0.1)")
    group.add_argument("--warmup-batch", type=_positive_int, default=None, help="(128)")
    group.add_argument(
        "--hessian-batch", type=_positive_int, default=None, help="Hessian batch samples (1024)"
    )
    group.add_argument("--k", type=_positive_int, default=None, help="top eigenpairs (32)")
    group.add_argument("--probes", type=_positive_int, default=None, help="SLQ probes (8)")
    group.add_argument(
        "--lanczos-steps", type=_positive_int, default=None, help="SLQ steps per probe (64)"
    )
    group.add_argument("--eps", type=_positive_float, default=None, help="Lipschitz radius (0.01)")
    group.add_argument(
        "--directions", type=_positive_int, default=None, help="Lipschitz directions (3)"
    )
    group.add_argument("--c", type=_positive_float, default=None, help="gap constant (4)")
    group.add_argument("--curvature", choices=("hessian", "ggn"), default=None)
    group.add_argument("--engine", default=None, help="HVP engine (auto)")


def _pruning_options(parser: argparse.ArgumentParser) -> None:
    _imc_options(parser)
    parser.add_argument(
        "--rewind", choices=("init", "warmup"), default=None, help="IMC: rewind to W0 or keep W*"
    )
    group = parser.add_argument_group("baselines")
    group.add_argument(
        "--scope", choices=SCOPES, default=None, help="mask scope, IMC's too (global)"
    )
    group.add_argument(
        "--granularity",
        choices=GRANULARITIES,
        default=None,
        help="mask structure, IMC's too: single weights (element, the default), square tiles "
        "of --block-size (block), or 2 of every 4 along the input dimension (2:4, at 50 %% "
        "remaining only, not with imp)",
    )
    group.add_argument(
        "--block-size",
        type=_positive_int,
        default=None,
        help="tile edge for --granularity block; must divide both dimensions of every weight "
        "matrix (2 for LeNet-300-100: its last layer has 10 outputs)",
    )
    group.add_argument("--imp-rate", type=float, default=None, help="IMP rate per round (0.2)")
    group.add_argument(
        "--rewind-step", type=int, default=None, help="IMP/one-shot rewind step (0 = W0)"
    )
    group.add_argument("--fresh", action="store_true", help="recompute runs found in --out")


def build_parser() -> argparse.ArgumentParser:
    """The ``imc-prune`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="imc-prune",
        description="One-shot pruning from the loss Hessian's spectral gap (IMC), baselines "
        "and sparse-masked training.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="one method on one model, next to the dense network")
    run.add_argument(
        "--method",
        type=_name(experiment.METHODS, "method"),
        default="imc",
        help=f"one of {', '.join(experiment.METHODS)} (default imc)",
    )
    run.add_argument(
        "--remaining",
        nargs="+",
        type=parse_remaining,
        default=None,
        help="weights remaining: fractions, percentages or auto (IMC; the default for IMC); "
        "other methods need a number; several targets share the dense run (and IMC's spectrum)",
    )
    run.add_argument("--seed", type=int, default=0)
    _common(run, many_models=False)
    _pruning_options(run)

    cmp = commands.add_parser("compare", help="methods x weights remaining x seeds, resumable")
    cmp.add_argument(
        "--methods",
        nargs="+",
        type=_name(experiment.METHODS, "method"),
        default=list(experiment.DEFAULT_COMPARE_METHODS),
        help="methods (default: all but dense; dense always runs)",
    )
    cmp.add_argument(
        "--remaining",
        nargs="+",
        type=parse_remaining,
        default=[parse_remaining(t) for t in DEFAULT_TARGETS],
        help="targets (default 0.2 0.1 0.05 0.02 auto; auto applies to IMC only)",
    )
    cmp.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    cmp.add_argument(
        "--workers",
        type=_positive_int,
        default=1,
        help="processes running runs side by side (default 1); with --device cuda they "
        "spread over every visible GPU; runs sharing an IMP trajectory or an IMC analysis "
        "stay in one worker",
    )
    cmp.add_argument(
        "--worker-threads",
        type=_positive_int,
        default=None,
        help="CPU threads per worker (default: the cores shared out)",
    )
    _common(cmp, many_models=True)
    _pruning_options(cmp)

    spec = commands.add_parser("spectrum", help="IMC's spectrum, Lipschitz estimate and gap")
    spec.add_argument("--seed", type=int, default=0)
    _common(spec, many_models=False)
    _imc_options(spec)
    return parser


# --------------------------------------------------------------------------------------------
# From arguments to specs


def _pick(args, names: dict) -> dict:
    return {
        key: getattr(args, option)
        for option, key in names.items()
        if getattr(args, option, None) is not None
    }


def _settings(args) -> dict:
    """The RunSpec fields shared by every spec of the command."""
    train = dict(QUICK_TRAIN) if args.quick and args.epochs is None and args.steps is None else {}
    train.update(_pick(args, _TRAIN_OPTIONS))
    imc = dict(QUICK_IMC) if args.quick else {}
    imc.update(_pick(args, _IMC_OPTIONS))
    # IMC's masks too, not only the baselines'.
    for option in ("scope", "granularity", "block_size"):
        if getattr(args, option, None) is not None:
            imc[option] = getattr(args, option)
    baseline = dict(QUICK_BASELINE) if args.quick else {}
    for option, key in (
        ("scope", "scope"),
        ("granularity", "granularity"),
        ("block_size", "block_size"),
        ("imp_rate", "imp_rate"),
        ("rewind_step", "rewind_step"),
    ):
        if getattr(args, option, None) is not None:
            baseline[key] = getattr(args, option)
    subsets = dict(QUICK_SUBSETS) if args.quick else {}
    for key in ("train_subset", "test_subset"):
        if getattr(args, key) is not None:
            subsets[key] = getattr(args, key)
    return {"train": train, "imc": imc, "baseline": baseline, **subsets}


def _choose_dataset(args, cache: experiment.DataCache) -> str:
    """``--dataset``, or Fashion-MNIST, or digits (with a note) when Fashion-MNIST is not
    installed and no dataset was asked for."""
    if args.dataset is not None:
        try:
            cache.get(args.dataset)
        except DatasetNotFoundError as exc:
            raise CLIError(str(exc)) from None
        return args.dataset
    try:
        cache.get(DEFAULT_DATASET)
        return DEFAULT_DATASET
    except DatasetNotFoundError as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else DEFAULT_DATASET
        print(
            f"note: {DEFAULT_DATASET} is not installed ({first_line}); using scikit-learn "
            f"{FALLBACK_DATASET} instead (apt-get install dataset-fashion-mnist, or "
            "--data-root / IMC_DATA, for the real thing)",
            file=sys.stderr,
        )
        return FALLBACK_DATASET


def _out_dir(args, dataset: str, suffix: str) -> Path:
    if args.out is not None:
        return Path(args.out)
    models = args.model if isinstance(args.model, list) else [args.model]
    return Path("runs") / f"{dataset}-{'+'.join(models)}-{suffix}"


def _progress(args) -> bool:
    return sys.stderr.isatty() if args.progress is None else bool(args.progress)


def _specs(make) -> list:
    try:
        return make()
    except (ValueError, TypeError) as exc:
        raise CLIError(str(exc)) from None


def _check_structure(specs, cache: experiment.DataCache) -> None:
    """The mask structure against each model's weights, before anything is trained."""
    for spec in {spec.model: spec for spec in specs if spec.method != "dense"}.values():
        splits = cache.get(spec.dataset, spec.train_subset, spec.test_subset)
        try:
            experiment.check_structure(spec, splits)
        except ValueError as exc:
            raise CLIError(f"{spec.model}: {exc}") from None


def _structure(args) -> str:
    """The mask structure of the command, for titles: ``""`` or ``", masks block 2"``."""
    label = report.structure_label(args.granularity or "element", args.block_size)
    return f", masks {label}" if label else ""


# --------------------------------------------------------------------------------------------
# Printing


def _pct(value: float) -> str:
    """A percentage with two decimals, more when two would round a fraction that is not 0
    or 1 to 0 % or 100 % (IMC's automatic prune rate is often a few weights in 10^5)."""
    pct = 100 * value
    digits = 2
    while digits < 6 and round(pct, digits) in (0.0, 100.0) and pct not in (0.0, 100.0):
        digits += 1
    return f"{pct:.{digits}f} %"


def _files_line(files: dict) -> list[str]:
    lines = [f"  {path}" for _, path in sorted(files.items(), key=lambda item: str(item[1]))]
    if not report.plotting_available():
        lines.append(f"  (no plots: matplotlib is not installed; {report.PLOTS_INSTALL_HINT})")
    return lines


def _describe_imc(info: dict) -> list[str]:
    """IMC's decision in a few lines, from :meth:`IMCResult.summary` plus
    ``auto_remaining``."""
    gap = info["gap"]
    lines = [
        f"IMC       {info['settings']['warmup_steps']} warm-up steps, "
        f"{info['n_hvps']:,} Hessian-vector products, score {info['settings']['score']}",
        f"          Lipschitz L = {info['lipschitz']:.4g}, c·L = {gap['threshold']:.4g}",
    ]
    if gap["source"] == "none":
        lines.append("          no spectral gap wider than c·L: the gap prunes nothing")
    else:
        lines.append(
            f"          gap [{gap['lower']:.4g}, {gap['upper']:.4g}] ({gap['source']}): "
            f"n = {gap['n']:,} of d = {gap['dim']:,}, prune rate {_pct(gap['prune_rate'])}"
        )
    lines.append(f"          automatic weights remaining {_pct(info['auto_remaining'])}")
    return lines


# --------------------------------------------------------------------------------------------
# Subcommands


def _cmd_run(args) -> int:
    cache = experiment.DataCache(args.data_root)
    dataset = _choose_dataset(args, cache)
    targets = args.remaining
    if targets is None:
        if args.method.startswith("imc"):
            targets = ["auto"]
        elif args.method == "dense":
            targets = [1.0]
        else:
            raise CLIError(f"--remaining is needed for method {args.method!r} (e.g. 0.05 or 5%)")
    settings = _settings(args)
    specs = _specs(
        lambda: [
            experiment.RunSpec(dataset, args.model, "dense", 1.0, args.seed, **settings),
            *(
                experiment.RunSpec(dataset, args.model, args.method, target, args.seed, **settings)
                for target in targets
            ),
        ]
    )
    _check_structure(specs, cache)
    out = _out_dir(args, dataset, args.method)
    splits = cache.get(dataset, specs[0].train_subset, specs[0].test_subset)
    print(
        f"dataset   {dataset}: {len(splits.train):,} train / {len(splits.test):,} test samples; "
        f"model {args.model}; seed {args.seed}{_structure(args)}"
    )
    started = time.perf_counter()
    result = experiment.compare(
        specs,
        out,
        progress=_progress(args),
        resume=not args.fresh,
        device=args.device,
        data_cache=cache,
        title=f"imc-prune run: {specs[-1].label} on {dataset}, {args.model}{_structure(args)}",
    )
    dense = result.records[0]
    epochs = len(dense.history)
    print(
        f"dense     final test accuracy {_pct(dense.final_acc)} (mean of the last 3 epochs "
        f"{_pct(dense.mean_last3_acc)}), {epochs} epochs, {dense.wall_s:.1f} s"
    )
    described = False
    for pruned in result.records[1:]:
        if pruned.key == dense.key:
            continue
        if pruned.imc is not None and not described:
            for line in _describe_imc(pruned.imc):
                print(line)
            described = True
        name = report.method_name(
            {
                "label": pruned.label,
                "granularity": pruned.granularity,
                "block_size": pruned.block_size,
            }
        )
        print(
            f"{name:<9} weights remaining {_pct(pruned.weights_remaining)} "
            f"(target {report.target_label(pruned.target)}): final test accuracy "
            f"{_pct(pruned.final_acc)} (mean of the last 3 epochs {_pct(pruned.mean_last3_acc)})"
        )
        print(
            f"          compute {pruned.compute['total']:,.0f} gradient-equivalents "
            f"({pruned.compute['sgd_steps']:,} SGD steps), {pruned.wall_s:.1f} s"
        )
    reused = [r.label for r in result.records if r.key not in result.ran]
    if reused:
        print(
            f"note      reused {', '.join(reused)} from {out / 'runs.jsonl'} (--fresh recomputes)"
        )
    print(f"time      {time.perf_counter() - started:.1f} s in all")
    print("files")
    for line in _files_line(result.files):
        print(line)
    return 0


def _cmd_compare(args) -> int:
    cache = experiment.DataCache(args.data_root)
    dataset = _choose_dataset(args, cache)
    settings = _settings(args)
    specs = _specs(
        lambda: experiment.grid_specs(
            dataset, args.model, args.methods, args.remaining, args.seeds, **settings
        )
    )
    _check_structure(specs, cache)
    out = _out_dir(args, dataset, "compare")
    done = set(experiment.read_runs(out / "runs.jsonl")) if not args.fresh else set()
    todo = sum(spec.key not in done for spec in {s.key: s for s in specs}.values())
    print(
        f"compare   {dataset}, {', '.join(args.model)}: {len(specs)} runs "
        f"({len(specs) - todo} done already in {out}), seeds {args.seeds}{_structure(args)}"
        + (f", {args.workers} workers" if args.workers > 1 else "")
    )
    started = time.perf_counter()
    result = experiment.compare(
        specs,
        out,
        progress=_progress(args),
        resume=not args.fresh,
        device=args.device,
        data_cache=cache,
        title=f"imc-prune compare: {dataset}, {', '.join(args.model)}{_structure(args)}",
        workers=args.workers,
        threads=args.worker_threads,
    )
    print(report.results_markdown(result.rows))
    print(f"time      {time.perf_counter() - started:.1f} s")
    print("files")
    for line in _files_line(result.files):
        print(line)
    return 0


def _cmd_spectrum(args) -> int:
    imc_module = importlib.import_module("imc_prune.imc")  # imc_prune.imc is the function

    cache = experiment.DataCache(args.data_root)
    dataset = _choose_dataset(args, cache)
    settings = _settings(args)
    spec = _specs(
        lambda: experiment.RunSpec(
            dataset,
            args.model,
            "imc",
            "auto",
            args.seed,
            imc=settings["imc"],
            train_subset=settings.get("train_subset"),
            test_subset=settings.get("test_subset"),
        )
    )
    splits = cache.get(dataset, spec.train_subset, spec.test_subset)
    device = experiment.resolve_device(args.device)
    model = experiment._build(spec, splits).to(device)
    dim = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"spectrum  {dataset}, {args.model} (d = {dim:,}), seed {args.seed}")
    started = time.perf_counter()
    try:
        result = imc_module.imc(
            model, splits, sparsity="auto", seed=spec.seed, progress=_progress(args), **spec.imc
        )
    except (ValueError, TypeError) as exc:
        raise CLIError(str(exc)) from None
    elapsed = time.perf_counter() - started
    data = report.spectrum_data(result.spectrum, result.gap, result.lipschitz.value)
    out = _out_dir(args, dataset, "spectrum")
    out.mkdir(parents=True, exist_ok=True)
    summary = result.summary()
    payload = {
        "dataset": dataset,
        "model": args.model,
        "seed": args.seed,
        "auto_remaining": 1.0 - result.auto_sparsity,
        "seconds": elapsed,
        "spectrum": data,
        **{
            k: summary[k]
            for k in (
                "auto_sparsity",
                "lipschitz",
                "lipschitz_per_direction",
                "gap",
                "top_residuals",
                "warmup_losses",
                "timings",
                "n_hvps",
                "settings",
            )
        },
    }
    json_path = out / "spectrum.json"
    experiment._write_text(json_path, json.dumps(experiment._json_safe(payload), indent=1))
    written = {"json": json_path}
    if report.plotting_available():
        written["png"] = report.plot_spectrum(
            data, out / "spectrum.png", title=f"{dataset}, {args.model}: Hessian spectrum at W*"
        )
    top = result.spectrum.top_eigenvalues.tolist()
    shown = ", ".join(f"{x:.4g}" for x in top[:8]) + (", ..." if len(top) > 8 else "")
    print(f"top       {len(top)} eigenvalues: {shown}")
    for line in _describe_imc({**summary, "auto_remaining": 1.0 - result.auto_sparsity}):
        print(line)
    print(f"time      {elapsed:.1f} s ({result.n_hvps:,} Hessian-vector products)")
    print("files")
    for line in _files_line(written):
        print(line)
    return 0


_COMMANDS = {"run": _cmd_run, "compare": _cmd_compare, "spectrum": _cmd_spectrum}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``imc-prune`` and ``python -m imc_prune``.

    Args:
        argv: the arguments without the program name (None: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success, 1 when the data is missing or a run fails on a
        setting, 2 for bad arguments (argparse exits with 2 itself).

    Example:
        >>> main(["run", "--dataset", "digits", "--method", "imc", "--quick"])
        0
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():
            # The files list says it (_files_line); write_results' warning would repeat it.
            warnings.filterwarnings("ignore", message="no plots in ")
            return _COMMANDS[args.command](args)
    except CLIError as exc:
        print(f"imc-prune {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except DatasetNotFoundError as exc:
        print(f"imc-prune {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
