"""The one harness every benchmark script uses (DESIGN section 8, STYLE "Benchmarks").

Rules it encodes, after Liger-Kernel ``benchmark/scripts/utils.py`` and xformers
``benchmark_main_helper``:

* correctness before timing: :func:`check_close` raises before a wrong method is timed;
* fresh random inputs: :func:`measure` takes a ``setup`` callable whose result (new random
  inputs each repeat) is passed to the timed function, and setup is not timed;
* medians with 20th/80th percentiles (:class:`Measurement`), ratios taken against baselines
  measured in the same run (the scripts do that, the harness only supplies the numbers);
* results appended to ``benchmarks/results/<device>.csv`` (:func:`append_csv`), keyed by a
  filesystem-safe device name (:func:`device_name`), with the commit, versions and command;
* a compact table printed last (:func:`print_table`) and a markdown copy for the summary file
  (:func:`markdown_table`).

It also holds the GEMM cost model of ``notes/kernel_design.md`` section 1
(:func:`flops_per_hvp`, :func:`flops_per_gradient`), shared by the HVP and eigen benchmarks.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"


# --------------------------------------------------------------------------------------
# Timing


@dataclasses.dataclass(frozen=True)
class Measurement:
    """Wall-clock times of repeated calls, in seconds.

    ``median``, ``p20`` and ``p80`` are the 50th, 20th and 80th percentiles of ``times``
    (linear interpolation between order statistics, as ``numpy.percentile``).
    """

    median: float
    p20: float
    p80: float
    n: int
    times: tuple[float, ...]

    @classmethod
    def of(cls, times: Sequence[float]) -> Measurement:
        if not times:
            raise ValueError("a measurement needs at least one time")
        ordered = sorted(times)
        return cls(
            median=_percentile(ordered, 0.5),
            p20=_percentile(ordered, 0.2),
            p80=_percentile(ordered, 0.8),
            n=len(ordered),
            times=tuple(times),
        )

    def per(self, count: int) -> Measurement:
        """Times divided by ``count`` (e.g. a block call of b products -> per product)."""
        return Measurement.of([t / count for t in self.times])

    def ms(self) -> str:
        """``median [p20, p80]`` in milliseconds, for tables."""
        return f"{_sig(self.median * 1e3)} [{_sig(self.p20 * 1e3)}, {_sig(self.p80 * 1e3)}]"


def _percentile(ordered: Sequence[float], q: float) -> float:
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def synchronizer(device: torch.device | str | None) -> Callable[[], None]:
    """What to call so that the clock is read after the device has finished its work.

    CUDA kernels are asynchronous: without ``torch.cuda.synchronize`` the host clock would
    time the launches, not the work. CPU ops are synchronous, so the CPU synchronizer is a
    no-op. ``None`` means: synchronize CUDA if it is in use in this process.
    """
    if device is None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            return torch.cuda.synchronize
        return _no_sync
    device = torch.device(device)
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return _no_sync


def _no_sync() -> None:
    return None


def measure(
    fn: Callable[..., object],
    *,
    warmup: int = 1,
    min_repeats: int = 5,
    min_time_s: float = 0.0,
    max_repeats: int = 10_000,
    setup: Callable[[], tuple] | None = None,
    sync: Callable[[], None] | torch.device | str | None = None,
) -> Measurement:
    """Time ``fn`` by wall clock (``time.perf_counter``), one call per repeat.

    Repeats until at least ``min_repeats`` calls were timed and their times add up to at
    least ``min_time_s`` (or ``max_repeats`` is reached), after ``warmup`` untimed calls.

    Args:
        fn: the work to time; called as ``fn(*setup())`` or ``fn()``.
        warmup: untimed calls first (allocator warm-up, lazy init, autotuning).
        min_repeats: at least this many timed calls.
        min_time_s: and at least this much timed time in total.
        max_repeats: never more timed calls than this.
        setup: returns the arguments of one call, e.g. fresh random inputs; run before each
            call (warm-up included) and not timed.
        sync: a callable, a device (see :func:`synchronizer`), or None (synchronize CUDA if
            it is initialized). Called before the clock starts and before it stops.

    Returns:
        The :class:`Measurement` of the timed calls.

    Example:
        >>> m = measure(lambda x: x @ x, setup=lambda: (torch.randn(64, 64),), min_repeats=3)
        >>> m.n >= 3
        True
    """
    if min_repeats < 1:
        raise ValueError(f"min_repeats must be at least 1, got {min_repeats}")
    if not callable(sync):
        sync = synchronizer(sync)
    for _ in range(warmup):
        args = setup() if setup is not None else ()
        fn(*args)
    sync()
    times: list[float] = []
    total = 0.0
    while len(times) < max_repeats and (len(times) < min_repeats or total < min_time_s):
        args = setup() if setup is not None else ()
        sync()  # setup's asynchronous work (e.g. torch.randn on CUDA) stays out of the time
        start = time.perf_counter()
        fn(*args)
        sync()
        elapsed = time.perf_counter() - start
        times.append(elapsed)
        total += elapsed
    return Measurement.of(times)


def measure_interleaved(
    calls: dict[str, tuple[Callable[..., object], Callable[[], tuple]]],
    rounds: int,
    sync: Callable[[], None] | torch.device | str | None = None,
) -> dict[str, Measurement]:
    """Time ``{name: (fn, setup)}`` in ``rounds`` rounds of one call each, after one warm-up
    call each (which also compiles Triton kernels): a load change on a shared machine hits
    every method alike. ``setup`` returns one call's arguments (``tuple`` for none), untimed.

    Returns:
        ``{name: Measurement}`` of the ``rounds`` timed calls of each.
    """
    if not callable(sync):
        sync = synchronizer(sync)
    for fn, setup in calls.values():
        fn(*setup())
    sync()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, (fn, setup) in calls.items():
            measured = measure(fn, warmup=0, min_repeats=1, max_repeats=1, setup=setup, sync=sync)
            times[name].extend(measured.times)
    return {name: Measurement.of(values) for name, values in times.items()}


# --------------------------------------------------------------------------------------
# Devices and run metadata


def device_name(device: torch.device | str) -> str:
    """A filesystem-safe key for the device: results files are named after it.

    CUDA: the device name, e.g. ``nvidia-h100-80gb-hbm3``. CPU: ``cpu-<model>-<n>c`` with the
    model name from ``/proc/cpuinfo`` stripped of trademarks and clock speed, and ``n`` the
    cores this process may run on (``cpu-amd-epyc-2c``, ``cpu-intel-xeon-platinum-8480-16c``).
    """
    device = torch.device(device)
    if device.type == "cuda":
        return _slug(torch.cuda.get_device_name(device))
    if device.type != "cpu":
        return _slug(device.type)
    return f"cpu-{_slug(_cpu_model()) or 'unknown'}-{_cpu_count()}c"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.lower().startswith("model name"):
                    return _shorten_cpu_model(line.split(":", 1)[1])
    except OSError:
        pass
    return _shorten_cpu_model(platform.processor() or platform.machine())


def _shorten_cpu_model(name: str) -> str:
    # "Intel(R) Xeon(R) Platinum 8480+ CPU @ 2.00GHz" -> "Intel Xeon Platinum 8480+";
    # "AMD EPYC 7763 64-Core Processor" -> "AMD EPYC 7763".
    name = re.sub(r"\((R|TM|C)\)", " ", name, flags=re.IGNORECASE)
    name = re.sub(r"@.*$", " ", name)
    name = re.sub(r"\b\d+-Core\b|\bProcessor\b|\bCPU\b", " ", name, flags=re.IGNORECASE)
    return " ".join(name.split())


def _cpu_count() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower().replace("+", "plus")).strip("-")


def git_commit() -> str:
    """Short hash of HEAD, with ``+dirty`` when tracked files differ; "" outside git."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        )
        if commit.returncode != 0:
            return ""
        # --no-optional-locks: a benchmark must not write the index of a shared checkout.
        status = subprocess.run(
            ["git", "--no-optional-locks", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    dirty = "+dirty" if status.returncode == 0 and status.stdout.strip() else ""
    return commit.stdout.strip() + dirty


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command that produced a result, with the script path relative to the repo."""
    argv = list(sys.argv if argv is None else argv)
    if argv:
        script = Path(argv[0])
        try:
            argv[0] = str(script.resolve().relative_to(REPO_ROOT))
        except ValueError:
            pass
    return shlex.join(["python", *argv])


def run_metadata(device: torch.device | str, argv: Sequence[str] | None = None) -> dict:
    """Columns every result row carries: when, where, what code, which command."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    return {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device),
        "commit": git_commit(),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "load": load_average(),
        "command": command_line(argv),
    }


# --------------------------------------------------------------------------------------
# Results: CSV and tables


def load_average() -> float | str:
    """1-minute load average ("" where unknown): timings taken on a loaded machine are noisy,
    and a result file should say so."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return ""


def busy_machine_warning(device: torch.device | str) -> str | None:
    """A warning when other processes already use the CPU cores this run needs."""
    load = load_average()
    cores = _cpu_count()
    if load == "" or load < 0.5 * cores:
        return None
    target = "the host side of the run" if torch.device(device).type == "cuda" else "timings"
    return (
        f"warning: 1-minute load average {load} on {cores} cores before the run; "
        f"{target} will be noisy (compare percentiles, rerun on an idle machine to quote)"
    )


def results_path(out_dir: str | Path, device: torch.device | str, suffix: str = ".csv") -> Path:
    """``<out_dir>/<device_name><suffix>``, e.g. ``benchmarks/results/cpu-amd-epyc-2c.csv``."""
    return Path(out_dir) / f"{device_name(device)}{suffix}"


def append_csv(path: str | Path, rows: Iterable[Mapping[str, object]]) -> Path:
    """Append dict rows to a CSV file, writing the header once.

    The columns are the union of the keys: an existing file keeps its column order and new
    keys go at the end, in the order they first appear. When new keys appear the file is
    rewritten with the wider header (old rows get empty cells), so one device file can hold
    the rows of every benchmark script.

    Returns:
        The path written.
    """
    path = Path(path)
    rows = [dict(row) for row in rows]
    if not rows:
        return path
    header: list[str] = []
    old_rows: list[dict] = []
    if path.exists() and path.stat().st_size > 0:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            header = list(reader.fieldnames or [])
            old_rows = list(reader)
    new_keys = _union_keys(rows, start=header)
    path.parent.mkdir(parents=True, exist_ok=True)
    if header and new_keys == header:
        with path.open("a", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=header, restval="")
            writer.writerows(rows)
        return path
    # New file, or new columns: (re)write everything under the union header. Written to a
    # temporary file first so an interrupted run never truncates earlier results.
    partial = path.with_name(path.name + ".partial")
    with partial.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=new_keys, restval="")
        writer.writeheader()
        writer.writerows(old_rows)
        writer.writerows(rows)
    partial.replace(path)
    return path


def _union_keys(rows: Iterable[Mapping[str, object]], start: Sequence[str] = ()) -> list[str]:
    keys = list(start)
    seen = set(keys)
    for row in rows:
        for key in row:
            if key not in seen:
                seen.add(key)
                keys.append(key)
    return keys


Columns = Sequence[str | tuple[str, str]]


def _columns(columns: Columns) -> list[tuple[str, str]]:
    return [(c, c) if isinstance(c, str) else (c[0], c[1]) for c in columns]


def _sig(value: float, digits: int = 3) -> str:
    """``digits`` significant digits, without scientific notation for table-sized numbers."""
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    magnitude = math.floor(math.log10(abs(value)))
    if magnitude >= digits - 1:
        return f"{value:.0f}"
    if magnitude < -4:
        return f"{value:.{digits - 1}e}"
    return f"{value:.{digits - 1 - magnitude}f}"


def format_cell(value: object) -> str:
    """Table text for one value: floats to 3 significant digits, None as empty."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return _sig(value)
    if isinstance(value, Measurement):
        return value.ms()
    return str(value)


def _is_numeric(text: str) -> bool:
    return bool(re.fullmatch(r"[-+]?[\d.]+(e[-+]?\d+)?( \[.*\])?x?", text))


def _cells(rows: Sequence[Mapping[str, object]], columns: Columns):
    cols = _columns(columns)
    body = [[format_cell(row.get(key)) for key, _ in cols] for row in rows]
    headers = [header for _, header in cols]
    numeric = [
        bool(body) and all(_is_numeric(line[i]) or not line[i] for line in body)
        for i in range(len(cols))
    ]
    widths = [max([len(headers[i]), *(len(line[i]) for line in body)]) for i in range(len(cols))]
    return headers, body, numeric, widths


def markdown_table(rows: Sequence[Mapping[str, object]], columns: Columns) -> str:
    """A GitHub markdown table; numeric columns right-aligned.

    Args:
        rows: dicts; a missing key is an empty cell.
        columns: keys, or ``(key, header)`` pairs, in display order.

    Example:
        >>> print(markdown_table([{"b": 1, "ms": 2.5}], ["b", ("ms", "time (ms)")]))
        |   b | time (ms) |
        | --: | --------: |
        |   1 |      2.50 |
    """
    headers, body, numeric, widths = _cells(rows, columns)
    widths = [max(width, 3) for width in widths]  # a rule needs at least "--:"

    def line(cells):
        return (
            "| "
            + " | ".join(
                cell.rjust(w) if num else cell.ljust(w)
                for cell, w, num in zip(cells, widths, numeric)
            )
            + " |"
        )

    rule = " | ".join(("-" * (w - 1) + ":") if n else "-" * w for w, n in zip(widths, numeric))
    return "\n".join([line(headers), f"| {rule} |", *(line(cells) for cells in body)])


def print_table(
    rows: Sequence[Mapping[str, object]],
    columns: Columns,
    *,
    title: str | None = None,
    file=None,
) -> None:
    """Print a compact aligned text table (the last thing a benchmark prints)."""
    file = sys.stdout if file is None else file
    headers, body, numeric, widths = _cells(rows, columns)

    def line(cells):
        return "  ".join(
            cell.rjust(w) if num else cell.ljust(w) for cell, w, num in zip(cells, widths, numeric)
        ).rstrip()

    if title:
        print(title, file=file)
    print(line(headers), file=file)
    print("  ".join("-" * w for w in widths), file=file)
    for cells in body:
        print(line(cells), file=file)
    file.flush()


# --------------------------------------------------------------------------------------
# Correctness


class CorrectnessError(AssertionError):
    """A benchmarked method disagrees with its reference; it must not be timed."""


def relative_error(
    actual: torch.Tensor, expected: torch.Tensor, dim: int | None = None
) -> torch.Tensor:
    """``||actual - expected|| / ||expected||`` (2-norm), overall or along ``dim``."""
    diff = (actual.double() - expected.double()).norm(dim=dim)
    scale = expected.double().norm(dim=dim)
    return diff / scale.clamp_min(torch.finfo(torch.float64).tiny)


def check_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    *,
    rtol: float,
    atol: float = 0.0,
    what: str,
    dim: int | None = None,
) -> float:
    """Raise unless ``||actual - expected|| <= atol + rtol * ||expected||``.

    Norm-wise rather than elementwise: a product computed in another order (reverse-over-
    reverse vs forward-over-reverse) differs by rounding that is small against the vector's
    norm but not against entries that cancel to nearly zero. With ``dim`` the test is made
    per slice (e.g. ``dim=0`` for each column of a ``(d, b)`` block) and the worst counts.

    Returns:
        The worst relative error (``||actual - expected|| / ||expected||``).

    Raises:
        CorrectnessError: shape mismatch, non-finite values, or too large an error.
    """
    if actual.shape != expected.shape:
        raise CorrectnessError(
            f"{what}: shape {tuple(actual.shape)} but the reference has {tuple(expected.shape)}"
        )
    if not bool(torch.isfinite(actual).all()):
        raise CorrectnessError(f"{what}: the result has non-finite entries")
    diff = (actual.double() - expected.double()).norm(dim=dim)
    scale = expected.double().norm(dim=dim)
    bad = diff > atol + rtol * scale
    worst = float((diff / scale.clamp_min(torch.finfo(torch.float64).tiny)).max())
    if bool(bad.any()):
        raise CorrectnessError(
            f"{what}: relative error {worst:.3g} exceeds rtol={rtol:g} (atol={atol:g}); "
            f"||expected|| = {float(scale.max()):.4g}"
        )
    return worst


# --------------------------------------------------------------------------------------
# Command line


def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--quick``, ``--device``, ``--out``, ``--no-save``, ``--seed`` for every script."""
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smaller problems and fewer repeats: a smoke run, not numbers to quote",
    )
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="torch device to run on (default: cuda when available, else cpu)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=RESULTS_DIR,
        help=f"results folder (default: {RESULTS_DIR.relative_to(REPO_ROOT)})",
    )
    parser.add_argument(
        "--no-save", action="store_true", help="print the table only; write no result files"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of models, batches and vectors")
    return parser


def parse_list(text: str | None, allowed: Sequence[str], what: str) -> list[str]:
    """Comma-separated names checked against ``allowed``; None or "" means all of them."""
    if not text:
        return list(allowed)
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in allowed]
    if unknown:
        raise SystemExit(f"unknown {what}: {', '.join(unknown)} (choose from {', '.join(allowed)})")
    return names


def parse_ints(text: str, what: str) -> list[int]:
    try:
        values = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise SystemExit(f"{what} must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise SystemExit(f"{what} must be positive integers, got {text!r}")
    return values


# --------------------------------------------------------------------------------------
# Cost model (notes/kernel_design.md section 1)


@dataclasses.dataclass(frozen=True)
class GemmLayer:
    """One Linear or Conv2d as a GEMM: ``rows`` = batch x output positions, ``k`` inputs
    (``C_in/groups * kh * kw`` for a conv), ``m`` outputs (times ``groups`` for a conv)."""

    name: str
    rows: int
    k: int
    m: int

    @property
    def nkm(self) -> int:
        return self.rows * self.k * self.m


def gemm_layers(model: nn.Module, input_shape: Sequence[int]) -> list[GemmLayer]:
    """The Linear/Conv2d layers of ``model`` in call order, as GEMM shapes for one batch.

    Runs one forward on a single zero sample (shape ``input_shape[1:]``) with hooks, then
    scales the rows by the batch size ``input_shape[0]``.
    """
    layers: list[GemmLayer] = []
    names = {module: name for name, module in model.named_modules()}

    def hook(module, inputs, output):
        name = names.get(module, type(module).__name__)
        if isinstance(module, nn.Linear):
            rows = output.numel() // module.out_features
            layers.append(GemmLayer(name, rows, module.in_features, module.out_features))
        elif isinstance(module, nn.Conv2d):
            positions = output.shape[-1] * output.shape[-2]
            kh, kw = module.kernel_size
            k = module.in_channels // module.groups * kh * kw
            # A grouped conv is `groups` GEMMs of width out_channels/groups: same total NKM
            # as one GEMM with k = C_in/groups and m = out_channels.
            layers.append(GemmLayer(name, positions, k, module.out_channels))

    handles = [
        module.register_forward_hook(hook)
        for module in model.modules()
        if isinstance(module, (nn.Linear, nn.Conv2d))
    ]
    param = next(model.parameters())
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_shape[1:], dtype=param.dtype, device=param.device))
    finally:
        for handle in handles:
            handle.remove()
    batch = int(input_shape[0])
    return [dataclasses.replace(layer, rows=layer.rows * batch) for layer in layers]


def flops_per_gradient(model: nn.Module, input_shape: Sequence[int]) -> int:
    """GEMM FLOPs of one forward + backward: ``2NKM + 4NKM`` per layer, minus the input
    gradient of the first layer (``2NKM``), which nobody needs."""
    layers = gemm_layers(model, input_shape)
    return sum(6 * layer.nkm for layer in layers) - (2 * layers[0].nkm if layers else 0)


def flops_per_hvp(model: nn.Module, input_shape: Sequence[int], curvature: str = "hessian") -> int:
    """GEMM FLOPs of the tangent passes of ONE product, primal cached (kernel_design sec. 1).

    Per layer and vector, multiply-add = 2 FLOPs:

    * Hessian: tangent forward ``a dW^T + Ra W^T`` (4NKM), tangent backward
      ``Rg W + g dW`` (4NKM), weight product ``Rg^T a + g^T Ra`` (4NKM): 12 NKM.
    * GGN (``J^T H_L J v``): forward 4NKM, backward ``Rg W`` 2NKM, weight ``Rg^T a`` 2NKM:
      8 NKM.
    * First layer shortcut: its input carries no tangent (``Ra = 0``) and needs no input
      gradient, so only ``a dW^T`` and ``Rg^T a`` remain: 4 NKM for either curvature.

    Elementwise work (activations, pooling, BatchNorm, the loss) is not counted: it is
    memory-bound and small next to the GEMMs for these models.
    """
    if curvature not in ("hessian", "ggn"):
        raise ValueError(f"curvature must be 'hessian' or 'ggn', got {curvature!r}")
    per_layer = 12 if curvature == "hessian" else 8
    layers = gemm_layers(model, input_shape)
    if not layers:
        return 0
    return 4 * layers[0].nkm + sum(per_layer * layer.nkm for layer in layers[1:])
