"""Tables and plots of pruning runs: markdown, and matplotlib PNGs (Agg, no display).

Everything here works on plain JSON-ready data, so a report can be rebuilt from a
``runs.jsonl`` without rerunning anything:

* :func:`spectrum_data` turns IMC's :class:`~imc_prune.imc.Spectrum` and
  :class:`~imc_prune.imc.Gap` into a small dict (the SLQ nodes and weights, the smoothing
  width, the exact top eigenvalues, the gap, the Lipschitz estimate); :func:`plot_spectrum`
  draws it: the smoothed density on a log axis, the top eigenvalues as ticks, the chosen gap
  shaded and labelled with ``n``, ``c L`` and the prune rate, and the cumulative distribution
  ``Phi`` the prune rate is read from.
* :func:`aggregate` groups run records (the dicts of
  :meth:`imc_prune.experiment.RunRecord.to_dict`) by dataset, model, method and target and
  takes the mean and spread over seeds; :func:`results_markdown` and :func:`plot_accuracy`
  show the groups: accuracy against weights remaining, one line per method, the dense
  network as a horizontal band.

matplotlib is optional (``pip install 'imc_kernels[plots]'``): without it the tables and JSON
still work, the ``plot_*`` functions raise an ImportError that says what to install, and
:func:`plotting_available` lets a caller skip them.

Example:
    >>> rows = aggregate(records)
    >>> print(results_markdown(rows))
    >>> plot_accuracy(rows, "accuracy.png")
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imc_kernels.linalg.slq import density_on_grid

#: What to install for the plots (matplotlib is optional: the tables need only numpy).
PLOTS_INSTALL_HINT = "pip install matplotlib (or pip install 'imc_kernels[plots]')"

#: Plot order of the methods (others follow alphabetically).
METHOD_ORDER = (
    "dense",
    "imc-magnitude",
    "imc-leverage",
    "imc-curvature",
    "magnitude-warmup",
    "random",
    "snip",
    "grasp",
    "synflow",
    "oneshot",
    "imp",
)

# Points of the density grid in a spectrum plot: fine enough that a gap of 1/1000 of the
# spectrum's range spans a couple of points; the curve is recomputed from the stored nodes.
_SPECTRUM_GRID = 4000
# The log axis of the density stops this far below its peak: the Gaussian tails of the
# smoothing fall to 1e-300 and would squash the bulk into a line.
_DENSITY_FLOOR = 1e-9


# --------------------------------------------------------------------------------------------
# Spectrum


def spectrum_data(spectrum, gap=None, lipschitz: float | None = None) -> dict[str, Any]:
    """The JSON-ready content of a spectrum plot.

    Args:
        spectrum: an :class:`imc_prune.imc.Spectrum` (SLQ density plus top eigenpairs).
        gap: the :class:`imc_prune.imc.Gap` chosen on it (or its ``dataclasses.asdict``), or
            None.
        lipschitz: the Lipschitz estimate ``L`` of the nonlinear remainder, or None.

    Returns:
        ``{"nodes", "weights", "sigma", "dim", "top_eigenvalues", "gap", "lipschitz",
        "n_hvps"}`` with lists of floats (nodes and weights per probe, as SLQ gave them).

    Example:
        >>> data = spectrum_data(result.spectrum, result.gap, result.lipschitz.value)
        >>> plot_spectrum(data, "spectrum.png")
    """
    density = spectrum.density
    if gap is not None and dataclasses.is_dataclass(gap):
        gap = dataclasses.asdict(gap)
    return {
        "nodes": density.nodes.detach().cpu().double().tolist(),
        "weights": density.weights.detach().cpu().double().tolist(),
        "sigma": float(spectrum.sigma),
        "dim": int(spectrum.dim),
        "top_eigenvalues": [float(x) for x in spectrum.top_eigenvalues],
        "gap": _finite_or_none(gap) if gap is not None else None,
        "lipschitz": None if lipschitz is None else float(lipschitz),
        "n_hvps": int(spectrum.n_hvps),
    }


def _finite_or_none(mapping: Mapping[str, Any]) -> dict[str, Any]:
    """JSON has no infinity: a gap with no upper edge stores None there."""
    return {
        key: (None if isinstance(value, float) and not math.isfinite(value) else value)
        for key, value in mapping.items()
    }


def spectrum_curve(data: Mapping[str, Any], n_grid: int = _SPECTRUM_GRID):
    """The smoothed density and its cumulative distribution over the whole spectrum.

    Unlike :meth:`imc_prune.imc.Spectrum.curve`, the grid reaches past the largest exact
    eigenvalue (the SLQ nodes alone may stop short of the outliers).

    Args:
        data: a dict from :func:`spectrum_data`.
        n_grid: grid points.

    Returns:
        ``(grid, density, cdf)`` numpy float64 arrays.
    """
    nodes = torch.as_tensor(data["nodes"], dtype=torch.float64)
    weights = torch.as_tensor(data["weights"], dtype=torch.float64)
    sigma = float(data["sigma"])
    top = list(data.get("top_eigenvalues") or [])
    lo = float(nodes.min()) - 5 * sigma
    hi = max([float(nodes.max()), *top]) + 5 * sigma
    grid = torch.linspace(lo, hi, n_grid, dtype=torch.float64)
    grid, density, cdf = density_on_grid(nodes, weights, grid=grid, sigma=sigma)
    return grid.numpy(), density.numpy(), cdf.numpy()


def _gap_label(gap: Mapping[str, Any], lipschitz: float | None) -> str:
    lines = []
    if gap.get("source") == "none":
        lines.append("no gap wider than c·L: nothing pruned")
    else:
        lines.append(f"gap [{gap['lower']:.4g}, {gap['upper']:.4g}] ({gap['source']})")
        lines.append(f"n = {gap['n']:,} of d = {gap['dim']:,}")
    lines.append(f"c·L = {gap['c']:g} × {_fmt(lipschitz)} = {gap['threshold']:.3g}")
    lines.append(f"prune rate 1 - n/d = {100 * gap['prune_rate']:.2f} %")
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "?" if value is None else f"{value:.3g}"


def plotting_available() -> bool:
    """Whether matplotlib is installed, so that the ``plot_*`` functions can run.

    The markdown and JSON reports never need it; :func:`imc_prune.experiment.write_results`
    and ``imc-prune`` skip the PNGs without it and say so.
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _pyplot():
    """matplotlib's pyplot with the Agg backend (files only: no display on the CPU machines or
    in CI), imported on first use; an ImportError that says what to install otherwise."""
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError(f"imc_prune's plots need matplotlib: {PLOTS_INSTALL_HINT}") from exc
    if "matplotlib.pyplot" not in sys.modules:  # else keep the backend the caller chose
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_spectrum(
    data: Mapping[str, Any],
    path: str | os.PathLike,
    *,
    title: str | None = None,
    xscale: str = "linear",
) -> Path:
    """Plot a Hessian spectrum with the IMC gap: density (log y) above, ``Phi`` below.

    Args:
        data: a dict from :func:`spectrum_data` (``gap`` and ``lipschitz`` may be None).
        path: the PNG to write (its folder is created).
        title: the figure title; default states ``d`` and the Hessian-vector products.
        xscale: ``"linear"`` or ``"symlog"`` (the bulk near 0 and far outliers together).

    Returns:
        The path written.

    Raises:
        ValueError: an unknown ``xscale``; ``data`` without nodes.
        ImportError: matplotlib is not installed (see :func:`plotting_available`).

    Example:
        >>> plot_spectrum(spectrum_data(res.spectrum, res.gap, res.lipschitz.value), "s.png")
    """
    if xscale not in ("linear", "symlog"):
        raise ValueError(f"xscale must be 'linear' or 'symlog', got {xscale!r}")
    if not data.get("nodes"):
        raise ValueError("spectrum data has no SLQ nodes to plot")
    plt = _pyplot()
    grid, density, cdf = spectrum_curve(data)
    top = np.asarray(data.get("top_eigenvalues") or [], dtype=np.float64)
    gap = data.get("gap")
    lipschitz = data.get("lipschitz")

    fig, (ax, ax_cdf) = plt.subplots(
        2, 1, figsize=(8, 6.5), sharex=True, gridspec_kw={"height_ratios": [2.2, 1]}
    )
    peak = float(density.max()) if density.size else 1.0
    ax.semilogy(grid, np.maximum(density, peak * _DENSITY_FLOOR), color="C0", lw=1.4)
    ax.set_ylim(peak * _DENSITY_FLOOR, peak * 3)
    ax.set_ylabel("smoothed spectral density")
    if top.size:
        # Exact eigenvalues as a rug on the bottom edge and markers on the top edge.
        ax.vlines(top, 0, 0.07, transform=ax.get_xaxis_transform(), color="C3", lw=1)
        ax.plot(
            top,
            np.full(top.shape, 0.93),
            "v",
            color="C3",
            ms=4,
            transform=ax.get_xaxis_transform(),
            label=f"top {top.size} eigenvalues (Lanczos)",
        )
    ax_cdf.plot(grid, cdf, color="C0", lw=1.4)
    ax_cdf.set_ylabel("Φ(λ)")
    ax_cdf.set_ylim(-0.02, 1.02)
    ax_cdf.set_xlabel("eigenvalue λ of the loss Hessian at W*")

    if gap:
        label = _gap_label(gap, lipschitz)
        if gap.get("source") != "none" and gap.get("upper") is not None:
            for axis in (ax, ax_cdf):
                axis.axvspan(gap["lower"], gap["upper"], color="C2", alpha=0.3, lw=0)
                # Edges drawn too: a gap in the bulk can be narrower than a pixel.
                axis.axvline(gap["lower"], color="C2", lw=0.8, ls="--")
                axis.axvline(gap["upper"], color="C2", lw=0.8, ls="--")
            ax_cdf.axhline(1 - gap["prune_rate"], color="C2", lw=0.8, ls=":")
        ax.text(
            0.98,
            0.80,
            label,
            transform=ax.transAxes,
            ha="right",
            va="top",
            fontsize=8.5,
            bbox={"boxstyle": "round", "facecolor": "white", "edgecolor": "C2", "alpha": 0.9},
        )
    if top.size:
        ax.legend(loc="upper left", fontsize=8)
    for axis in (ax, ax_cdf):
        axis.set_xscale(xscale)
        axis.grid(alpha=0.3)
    if title is None:
        title = f"Hessian spectrum, d = {data.get('dim', 0):,} ({data.get('n_hvps', 0):,} HVPs)"
    ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path)


# --------------------------------------------------------------------------------------------
# Aggregation over seeds


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    array = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if array.size == 0:
        return float("nan"), float("nan")
    std = float(array.std(ddof=1)) if array.size > 1 else 0.0
    return float(array.mean()), std


def method_rank(method: str) -> tuple[int, str]:
    """Sort key of a method label: :data:`METHOD_ORDER` (of the label without its structure,
    see :func:`method_name`), then alphabetical."""
    base = method.split(" (", 1)[0]
    return (METHOD_ORDER.index(base) if base in METHOD_ORDER else len(METHOD_ORDER), method)


def structure_label(granularity: str = "element", block_size: int | None = None) -> str:
    """A mask structure as tables show it: ``""`` for single weights, ``"block 16"``,
    ``"2:4"``.

    Example:
        >>> structure_label("block", 16), structure_label("element")
        ('block 16', '')
    """
    if granularity == "block":
        return f"block {block_size}"
    return "" if granularity == "element" else str(granularity)


def method_name(record: Mapping[str, Any]) -> str:
    """The method of a record as tables show it: its label, followed by its mask structure
    when that is not single weights (``"snip (block 16)"``); dense has no structure.

    Example:
        >>> method_name({"label": "snip", "granularity": "2:4"})
        'snip (2:4)'
    """
    label = record["label"]
    structure = structure_label(record.get("granularity", "element"), record.get("block_size"))
    return f"{label} ({structure})" if structure and label != "dense" else label


def _target_rank(target) -> float:
    # Descending weights remaining, "auto" last.
    return 2.0 if target == "auto" else -float(target)


def aggregate(records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Mean and spread over seeds of each (dataset, model, method, target) group.

    The method is :func:`method_name`: runs of one method with different mask structures are
    different groups.

    Args:
        records: run records as dicts (:meth:`imc_prune.experiment.RunRecord.to_dict`): each
            has ``dataset``, ``model``, ``label``, ``target``, ``seed``,
            ``weights_remaining``, ``final_acc``, ``mean_last3_acc``, ``compute`` (with
            ``total``, ``sgd_steps``) and ``wall_s``; optionally ``granularity`` and
            ``block_size``.

    Returns:
        One dict per group, sorted by dataset, model, method, target: ``dataset``, ``model``,
        ``method``, ``target``, ``seeds``, and ``(mean, std)`` pairs under ``remaining``,
        ``final_acc``, ``last3_acc``, ``compute``, ``sgd_steps``, ``wall_s``.

    Example:
        >>> aggregate(records)[0]["final_acc"]
        (0.889, 0.002)
    """
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for record in records:
        key = (record["dataset"], record["model"], method_name(record), record["target"])
        groups.setdefault(key, []).append(record)
    rows = []
    for (dataset, model, method, target), members in groups.items():
        members = sorted(members, key=lambda r: r["seed"])
        rows.append(
            {
                "dataset": dataset,
                "model": model,
                "method": method,
                "target": target,
                "seeds": [r["seed"] for r in members],
                "remaining": _mean_std([r["weights_remaining"] for r in members]),
                "final_acc": _mean_std([r["final_acc"] for r in members]),
                "last3_acc": _mean_std([r["mean_last3_acc"] for r in members]),
                "compute": _mean_std([r["compute"]["total"] for r in members]),
                "sgd_steps": _mean_std([r["compute"]["sgd_steps"] for r in members]),
                "wall_s": _mean_std([r["wall_s"] for r in members]),
            }
        )
    rows.sort(
        key=lambda r: (
            r["dataset"],
            r["model"],
            method_rank(r["method"]),
            _target_rank(r["target"]),
        )
    )
    return rows


# --------------------------------------------------------------------------------------------
# Markdown


def _pct(pair: tuple[float, float], digits: int = 2) -> str:
    mean, std = pair
    if math.isnan(mean):
        return "n/a"
    return f"{100 * mean:.{digits}f} ± {100 * std:.{digits}f}"


def _human(value: float) -> str:
    """``12345 -> '12.3k'``: compute counts span five orders of magnitude."""
    if math.isnan(value):
        return "n/a"
    for factor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g}{suffix}"
    return f"{value:.3g}"


def target_label(target) -> str:
    """``0.05 -> '5%'``, ``'auto' -> 'auto'``."""
    if target == "auto":
        return "auto"
    return f"{100 * float(target):g}%"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; numeric-looking columns are right-aligned.

    Example:
        >>> print(markdown_table(["a", "b"], [[1, "x"]]))
        | a | b |
        |--:|:--|
        | 1 | x |
    """
    cells = [[str(c) for c in row] for row in rows]

    def numeric(column: int) -> bool:
        return all(
            row[column][:1].isdigit() or row[column][:1] in "-+" or row[column] == "n/a"
            for row in cells
        ) and bool(cells)

    align = ["--:" if numeric(i) else ":--" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


def results_markdown(rows: Sequence[Mapping[str, Any]], *, title: str | None = None) -> str:
    """Markdown report of aggregated rows: an accuracy grid and a detailed table per model.

    The grid has one row per method and one column per target weights remaining (each cell
    the final test accuracy, mean ± std over seeds, in percent); the detail table adds the
    mean of the last three epochs, the measured weights remaining, compute in
    gradient-equivalents (SGD steps plus spectral work) and wall time.

    Args:
        rows: from :func:`aggregate`.
        title: a level-1 heading to put first.

    Returns:
        The markdown text.
    """
    out = [f"# {title}", ""] if title else []
    by_pair: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for row in rows:
        by_pair.setdefault((row["dataset"], row["model"]), []).append(row)
    for (dataset, model), members in by_pair.items():
        out += [f"## {dataset}, {model}", ""]
        targets = sorted({r["target"] for r in members if r["method"] != "dense"}, key=_target_rank)
        methods = sorted({r["method"] for r in members}, key=method_rank)
        cell = {(r["method"], r["target"]): r for r in members}
        grid_rows = []
        for method in methods:
            if method == "dense":
                dense = [r for r in members if r["method"] == "dense"]
                grid_rows.append(["dense", *[_pct(dense[0]["final_acc"])] * len(targets)])
                continue
            grid_rows.append(
                [method]
                + [
                    _pct(cell[(method, t)]["final_acc"]) if (method, t) in cell else ""
                    for t in targets
                ]
            )
        out += [
            "Final test accuracy (%), mean ± std over seeds; columns: target weights remaining "
            "(dense: the unpruned network, repeated).",
            "",
            markdown_table(["method", *[target_label(t) for t in targets]], grid_rows),
            "",
        ]
        detail = [
            [
                r["method"],
                target_label(r["target"]),
                _pct(r["remaining"], 3),
                _pct(r["final_acc"]),
                _pct(r["last3_acc"]),
                _human(r["compute"][0]),
                _human(r["sgd_steps"][0]),
                f"{r['wall_s'][0]:.1f}",
                len(r["seeds"]),
            ]
            for r in members
        ]
        out += [
            markdown_table(
                [
                    "method",
                    "target",
                    "weights remaining (%)",
                    "final acc (%)",
                    "mean last-3 acc (%)",
                    "compute (grad-eq)",
                    "SGD steps",
                    "wall (s)",
                    "seeds",
                ],
                detail,
            ),
            "",
        ]
    out += [
        "Compute: training steps of every phase (warm-up, dense pre-training, every IMP round) "
        "plus spectral work in gradient-equivalents of one training batch: Hessian-vector "
        "products x 2 x Hessian batch / training batch.",
        "",
    ]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# Accuracy against weights remaining


def plot_accuracy(
    rows: Sequence[Mapping[str, Any]],
    path: str | os.PathLike,
    *,
    metric: str = "final_acc",
    title: str | None = None,
) -> Path:
    """Test accuracy against weights remaining (log x), one line per method.

    Error bars are the standard deviation over seeds; the dense network is a horizontal band
    (mean ± std); a target of ``"auto"`` (IMC's own sparsity) is drawn as a star at its
    measured weights remaining.

    Args:
        rows: from :func:`aggregate` (one dataset and model; filter first otherwise).
        path: the PNG to write (its folder is created).
        metric: ``"final_acc"`` or ``"last3_acc"``.
        title: the figure title.

    Returns:
        The path written.

    Raises:
        ValueError: an unknown ``metric``, or no rows.
        ImportError: matplotlib is not installed (see :func:`plotting_available`).

    Example:
        >>> plot_accuracy(aggregate(records), "accuracy.png")
    """
    if metric not in ("final_acc", "last3_acc"):
        raise ValueError(f"metric must be 'final_acc' or 'last3_acc', got {metric!r}")
    if not rows:
        raise ValueError("no results to plot")
    plt = _pyplot()
    from matplotlib.ticker import FuncFormatter

    fig, ax = plt.subplots(figsize=(8, 5))
    methods = sorted({r["method"] for r in rows}, key=method_rank)
    colors = {m: f"C{i % 10}" for i, m in enumerate(m for m in methods if m != "dense")}
    for method in methods:
        members = [r for r in rows if r["method"] == method]
        if method == "dense":
            mean, std = members[0][metric]
            ax.axhspan(100 * (mean - std), 100 * (mean + std), color="0.6", alpha=0.3, lw=0)
            ax.axhline(100 * mean, color="0.3", lw=1, ls="--", label=f"dense ({100 * mean:.2f} %)")
            continue
        members = sorted(members, key=lambda r: -r["remaining"][0])
        x = np.array([r["remaining"][0] for r in members])
        y = np.array([100 * r[metric][0] for r in members])
        err = np.array([100 * r[metric][1] for r in members])
        ax.errorbar(x, y, yerr=err, marker="o", ms=4, capsize=3, color=colors[method], label=method)
        auto = [i for i, r in enumerate(members) if r["target"] == "auto"]
        if auto:
            ax.plot(x[auto], y[auto], "*", ms=13, color=colors[method], mec="k", mew=0.6)
    ax.set_xscale("log")
    ax.invert_xaxis()  # sparser to the right, as in the lottery-ticket plots
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{100 * v:g}%"))
    ax.set_xlabel("weights remaining (log scale; ★ = IMC's automatic sparsity)")
    ax.set_ylabel(
        ("final" if metric == "final_acc" else "mean last-3-epoch") + " test accuracy (%)"
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower left")
    if title is None:
        title = f"{rows[0]['dataset']}, {rows[0]['model']}"
    ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(path, dpi=120)
    finally:
        _pyplot().close(fig)
    return path
