"""Pruning benchmark: IMC against the baselines under one training protocol.

The protocol (``--preset``, default ``lth_lenet``): Adam, learning rate 1.2e-3, batch 60,
10 epochs per training run; global pruning over the weight matrices (biases kept); IMP at 20 %
of the remaining weights per round, rewound to ``W0``; test accuracy after the last epoch and
the mean of the last three epochs. Weights remaining 20, 10, 5 and 2 % plus IMC's automatic
sparsity, seeds 0, 1, 2; mean and sample standard deviation over seeds.

Methods: IMC with each score (``imc-magnitude``, ``imc-leverage``, ``imc-curvature``);
``magnitude-warmup`` (``|W*|`` after the same 10 warm-up steps: the score the authors' later
code uses, so the baseline the spectrum must beat); ``random``; ``snip``, ``grasp``,
``synflow`` at initialisation; ``oneshot`` (magnitude after full training, rewound) and
``imp``. One IMP trajectory per seed serves every target, and the dense network is its round 0.
Compute is counted in gradient-equivalents of one training batch (all IMP rounds included; an
HVP on n samples counts 2 n / 60), see :mod:`imc_prune.experiment`.

Every finished run is appended to ``runs.jsonl`` in the output folder at once: a benchmark
killed midway and started again with the same command resumes and loses no finished run.

    python benchmarks/prune.py                          # Fashion-MNIST, LeNet-300-100 (CPU: ~1 h)
    python benchmarks/prune.py --models lenet300100,conv2
    python benchmarks/prune.py --quick                  # smoke run: 1 seed, 1 epoch, subsets

Writes ``<out>/<device>/<dataset>_<model>/`` (``runs.jsonl``, ``results.json``, ``results.md``,
``accuracy_*.png``, ``spectrum_*.png``; ``imp/`` holds the IMP rounds for resuming and is not
meant to be committed) and ``<out>/prune-<device>.md``: the command, the tables and the
targets of the pruning issue checked against the measured means.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import _harness  # noqa: E402
from imc_prune import cli, experiment, report  # noqa: E402
from imc_prune.data import DatasetNotFoundError  # noqa: E402

DEFAULT_MODELS = ("lenet300100",)
DEFAULT_REMAINING = (0.2, 0.1, 0.05, 0.02, "auto")
DEFAULT_SEEDS = (0, 1, 2)
IMC_LABELS = tuple(f"imc-{score}" for score in experiment.IMC_SCORES)
# The baselines that cost about what IMC costs: one training run plus a cheap score.
SAME_COMPUTE = ("magnitude-warmup", "snip", "grasp", "synflow", "random")
# The targets.
MARGIN_POINTS = 0.5
CLOSED_FRACTION = 0.5
COMPUTE_FRACTION = 0.1


def _parse_remaining(text: str) -> list[float | str]:
    """Comma-separated targets, each as ``imc-prune`` reads one (auto, 0.05 or 5%)."""
    return [cli.parse_remaining(part) for part in text.split(",")]


def _parse_names(text: str, allowed, what: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    bad = [name for name in names if name not in allowed]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"unknown {what} {', '.join(bad) or '(none)'}; valid: {', '.join(allowed)}"
        )
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--dataset", default="fashion-mnist", help="default fashion-mnist")
    parser.add_argument("--data-root", default=None, help="folder holding the dataset files")
    parser.add_argument(
        "--models",
        type=lambda t: _parse_names(t, experiment.MODEL_NAMES, "model"),
        default=list(DEFAULT_MODELS),
        help="comma-separated (default lenet300100; conv2 is the second model of the issue)",
    )
    parser.add_argument(
        "--methods",
        type=lambda t: _parse_names(t, experiment.METHODS, "method"),
        default=list(experiment.DEFAULT_COMPARE_METHODS),
        help="comma-separated (default: every method)",
    )
    parser.add_argument(
        "--remaining",
        type=_parse_remaining,
        default=list(DEFAULT_REMAINING),
        help="weights remaining, comma-separated fractions/percentages/auto "
        "(default 0.2,0.1,0.05,0.02,auto)",
    )
    parser.add_argument(
        "--seeds",
        type=lambda t: [int(s) for s in t.split(",")],
        default=list(DEFAULT_SEEDS),
        help="comma-separated seeds (default 0,1,2)",
    )
    parser.add_argument("--preset", default="lth_lenet", help="training preset (default lth_lenet)")
    parser.add_argument("--epochs", type=int, default=None, help="override the preset's length")
    parser.add_argument("--train-subset", type=int, default=None)
    parser.add_argument("--test-subset", type=int, default=None)
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    parser.add_argument(
        "--out", default=str(_harness.RESULTS_DIR), help="results folder (benchmarks/results)"
    )
    parser.add_argument("--progress", action="store_true", help="tqdm bars")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes running runs side by side (default 1; with --device cuda spread over "
        "the visible GPUs)",
    )
    parser.add_argument("--worker-threads", type=int, default=None, help="CPU threads per worker")
    parser.add_argument("--fresh", action="store_true", help="ignore finished runs, start over")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: seed 0, 1 epoch on 5000 samples, targets 5 %% and auto",
    )
    return parser


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _row(rows, method, target):
    for row in rows:
        if row["method"] == method and row["target"] == target:
            return row
    return None


def _acc(row, metric: str) -> float:
    return float("nan") if row is None else 100.0 * row[metric][0]


def _fmt(value: float, digits: int = 2) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def targets_section(rows: list[dict], metric: str = "final_acc") -> tuple[str, dict]:
    """The issue's targets checked on the aggregated rows of one (dataset, model).

    Returns the markdown section and a dict of the figures (for the closing note).
    """
    lines = [f"Accuracy metric: `{metric}` (mean over seeds, in points).", ""]
    figures: dict = {}
    imc_present = [label for label in IMC_LABELS if any(r["method"] == label for r in rows)]
    if not imc_present:
        return "No IMC run in these results.\n", figures
    table = []
    for target in (0.05, 0.02):
        baselines = {m: _acc(_row(rows, m, target), metric) for m in SAME_COMPUTE}
        baselines = {m: a for m, a in baselines.items() if not math.isnan(a)}
        if not baselines:
            continue
        best_base = max(baselines, key=baselines.get)
        for label in imc_present:
            acc = _acc(_row(rows, label, target), metric)
            margins = {m: acc - a for m, a in baselines.items()}
            worst = min(margins, key=margins.get)
            met = margins[worst] >= MARGIN_POINTS
            figures[(label, target)] = {"acc": acc, "margins": margins}
            table.append(
                [
                    f"{100 * target:g} %",
                    label,
                    _fmt(acc),
                    f"{best_base} {_fmt(baselines[best_base])}",
                    f"{_fmt(margins[worst])} vs {worst}",
                    "met" if met else "not met",
                ]
            )
    lines.append(
        f"**Target 1**: IMC ahead of every same-compute baseline ({', '.join(SAME_COMPUTE)}) by "
        f"at least {MARGIN_POINTS} points at 5 % and at 2 % weights remaining."
    )
    lines.append("")
    lines.append(
        report.markdown_table(
            ["remaining", "IMC", "acc", "best same-compute", "smallest margin", "target"], table
        )
    )
    lines.append("")
    imp = _row(rows, "imp", 0.02)
    base = {m: _row(rows, m, 0.02) for m in SAME_COMPUTE}
    base = {m: r for m, r in base.items() if r is not None}
    if imp is not None and base:
        best_name = max(base, key=lambda m: base[m][metric][0])
        best_acc = _acc(base[best_name], metric)
        imp_acc = _acc(imp, metric)
        gap = imp_acc - best_acc
        table = []
        for label in imc_present:
            row = _row(rows, label, 0.02)
            if row is None:
                continue
            acc = _acc(row, metric)
            closed = (acc - best_acc) / gap if gap > 0 else float("nan")
            ratio = row["compute"][0] / imp["compute"][0]
            met = closed >= CLOSED_FRACTION and ratio <= COMPUTE_FRACTION
            figures[(label, "closed")] = {"closed": closed, "compute_ratio": ratio}
            table.append(
                [
                    label,
                    _fmt(acc),
                    _fmt(100 * closed, 1) + " %",
                    f"{ratio:.3f}",
                    "met" if met else "not met",
                ]
            )
        lines.append(
            f"**Target 2** at 2 %: IMP {_fmt(imp_acc)}, best same-compute baseline {best_name} "
            f"{_fmt(best_acc)}, gap {_fmt(gap)} points. IMC must close at least "
            f"{100 * CLOSED_FRACTION:g} % of it at no more than {COMPUTE_FRACTION:g} of IMP's "
            f"compute (IMP: {imp['compute'][0]:,.0f} gradient-equivalents, "
            f"{imp['sgd_steps'][0]:,.0f} SGD steps)."
        )
        lines.append("")
        lines.append(
            report.markdown_table(
                ["IMC", "acc at 2 %", "gap closed", "compute / IMP", "target"], table
            )
        )
        lines.append("")
    autos = [(label, _row(rows, label, "auto")) for label in imc_present]
    autos = [(label, row) for label, row in autos if row is not None]
    if autos:
        label, row = autos[0]
        lines.append(
            f"IMC's automatic sparsity: {100 * row['remaining'][0]:.3f} % of the weights remain "
            f"(mean over seeds {row['seeds']}); accuracy {_fmt(_acc(row, metric))}."
        )
        lines.append("")
    return "\n".join(lines), figures


def _gap_lines(records) -> list[str]:
    """What the spectrum said, per seed: the gap IMC found and the Lipschitz estimate."""
    lines = []
    seen = set()
    for record in records:
        if not record.imc or record.seed in seen:
            continue
        seen.add(record.seed)
        info = record.imc
        gap = info["gap"]
        top = info.get("top_eigenvalues") or []
        width = gap.get("width")
        lines.append(
            f"- seed {record.seed}: L = {info['lipschitz']:.4g} (c L = "
            f"{gap['c'] * info['lipschitz']:.4g}); gap [{_fmt(gap['lower'], 4)}, "
            f"{_fmt(gap['upper'], 4) if gap['upper'] is not None else '-'}] "
            f"(width {_fmt(width, 4) if width is not None else '-'}, from {gap['source']}); "
            f"n = {gap['n']:,} of d = {gap['dim']:,}; {gap['n_nonpositive']:,} eigenvalues <= 0 "
            f"by the density; top eigenvalues {', '.join(f'{v:.4g}' for v in top[:6])}; "
            f"{info['n_hvps']} HVPs"
        )
    return lines


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.seeds = args.seeds[:1] if args.seeds != list(DEFAULT_SEEDS) else [0]
        args.remaining = [0.05, "auto"]
        args.epochs = args.epochs or 1
        args.train_subset = args.train_subset or 5000
        args.test_subset = args.test_subset or 2000
    device = _device(args.device)
    cache = experiment.DataCache(args.data_root)
    dataset = args.dataset
    try:
        cache.get(dataset, args.train_subset, args.test_subset)
    except DatasetNotFoundError as error:
        if args.dataset != "fashion-mnist":
            raise
        print(f"note: {error}\nfalling back to scikit-learn digits", file=sys.stderr)
        dataset = "digits"
    train = {"preset": args.preset}
    if args.epochs is not None:
        train["epochs"] = args.epochs
    common = {"train": train}
    if args.train_subset:
        common["train_subset"] = args.train_subset
    if args.test_subset:
        common["test_subset"] = args.test_subset
    device_key = _harness.device_name(device)
    out_root = Path(args.out)
    sections = []
    started = time.perf_counter()
    warning = _harness.busy_machine_warning(device)
    if warning:
        print(warning, file=sys.stderr)
    for model in args.models:
        specs = experiment.grid_specs(
            dataset, [model], args.methods, args.remaining, args.seeds, **common
        )
        folder = out_root / device_key / f"{dataset}_{model}{'_quick' if args.quick else ''}"
        print(f"{model}: {len(specs)} runs -> {folder}", flush=True)

        def on_record(record, _model=model):
            print(
                f"  {_model} seed {record.seed} {record.label:<17} target "
                f"{report.target_label(record.target):>6}: remaining "
                f"{100 * record.weights_remaining:7.3f} %, acc {100 * record.final_acc:.2f} "
                f"(last 3 {100 * record.mean_last3_acc:.2f}), {record.wall_s:.1f} s",
                flush=True,
            )

        result = experiment.compare(
            specs,
            folder,
            progress=args.progress,
            resume=not args.fresh,
            device=device,
            data_cache=cache,
            on_record=on_record,
            title=f"benchmarks/prune.py: {dataset}, {model}",
            workers=args.workers,
            threads=args.worker_threads,
        )
        targets, _ = targets_section(result.rows)
        targets_last3, _ = targets_section(result.rows, metric="last3_acc")
        gap_lines = _gap_lines(result.records)
        pictures = [
            f"![{name}]({path.relative_to(out_root).as_posix()})"
            for name, path in sorted(result.files.items())
            if path.suffix == ".png"
        ]
        sections.append(
            "\n".join(
                [
                    # results_markdown heads its tables with "## <dataset>, <model>".
                    report.results_markdown(result.rows),
                    "",
                    f"Files: `{folder.relative_to(out_root).as_posix()}/` (runs.jsonl, "
                    "results.json, results.md, plots).",
                    "",
                    "### Targets",
                    "",
                    targets,
                    "Same, on the mean of the last three epochs:",
                    "",
                    targets_last3,
                    "### What the spectrum said",
                    "",
                    *gap_lines,
                    "",
                    *pictures,
                    "",
                ]
            )
        )
    meta = _harness.run_metadata(device)
    header = [
        f"# Pruning benchmark on {device_key}",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Commit {meta['commit']}, torch {meta['torch']}, triton {meta['triton'] or '-'}, "
        f"Python {meta['python']}, {_parallelism(args, meta['threads'])}, load {meta['load']} "
        "at the end, "
        f"{meta['timestamp']}; {time.perf_counter() - started:.0f} s in this invocation "
        "(runs finished by an earlier invocation were read from runs.jsonl).",
        "",
        "Protocol: "
        + ", ".join(f"{k} {v}" for k, v in _preset_summary(args.preset, args.epochs).items())
        + "; global masks over weight matrices, biases kept; IMP 20 % per round, rewind to W0. "
        "Accuracy in %, mean ± sample std over seeds. Compute in gradient-equivalents of one "
        "training batch.",
        "",
    ]
    name = f"prune-{device_key}{'-quick' if args.quick else ''}.md"
    summary = out_root / name
    summary.parent.mkdir(parents=True, exist_ok=True)
    summary.write_text("\n".join(header + sections), encoding="utf-8")
    print(f"wrote {summary}")
    return 0


def _parallelism(args, threads: int) -> str:
    if args.workers <= 1:
        return f"{threads} threads"
    per_worker = args.worker_threads or "shared-out"
    return f"{args.workers} worker processes ({per_worker} threads each)"


def _preset_summary(preset: str, epochs: int | None) -> dict:
    from imc_prune.train import PRESETS

    config = dict(PRESETS.get(preset, {}))
    if epochs is not None:
        config.pop("steps", None)
        config["epochs"] = epochs
    return config


if __name__ == "__main__":
    sys.exit(main())
