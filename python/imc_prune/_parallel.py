"""Runs of :func:`imc_prune.experiment.compare` spread over worker processes.

A comparison is embarrassingly parallel except where runs share work: the runs of one IMP
trajectory (``dense``, ``oneshot`` and ``imp`` of a seed and settings) rest on the same
rounds, and the IMC runs of a seed share one spectral analysis. Such runs form one *group*,
which one worker runs in the given order with its own caches, exactly as the sequential
comparison would; groups go to whichever worker is free, the IMP trajectories (the longest
chains of training runs) first.

Workers are spawned processes (safe with CUDA and with OpenMP thread pools), each on one
device and with its own number of CPU threads. Every finished run comes back to the parent,
which alone writes ``runs.jsonl`` (append, flush, fsync: a comparison killed midway resumes as
before). A run that raises stops the comparison: the other workers are terminated, the runs
finished so far stay saved, and the run's own exception is raised in the parent with the
worker's traceback attached as a note.

Results do not depend on the number of workers: every random choice of a run derives from its
seed, and a group sees the same cache states as in the sequential order. On a CPU the thread
count of the worker still changes the order of floating-point sums inside torch's kernels, so
runs are bitwise reproducible for a given ``threads``.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import pickle
import queue
import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import torch

from imc_prune._checks import resolve_device

# Methods whose runs are rounds of one IMP trajectory.
TRAJECTORY_METHODS = ("dense", "oneshot", "imp")
# How often the parent looks at its workers while it waits for a result (seconds).
_POLL_S = 0.5
# How long a worker that has finished its last run may take to exit before it is terminated.
_EXIT_S = 30.0


def affinity_groups(specs: Sequence) -> list[list]:
    """Split specs into groups that share cached work, in the order they should start.

    Runs of one IMP trajectory form a group, so do the IMC runs with one spectral analysis;
    every other run is a group of its own. Trajectory groups come first (their rounds are
    the longest sequential work), then the rest; within each kind and within a group the
    given order is kept.

    Args:
        specs: :class:`~imc_prune.experiment.RunSpec` objects (distinct keys).

    Returns:
        The groups, each a list of specs.
    """
    from imc_prune.experiment import ImcCache, ImpTrajectory

    groups: dict[str, list] = {}
    for spec in specs:
        if spec.method in TRAJECTORY_METHODS:
            key = "imp:" + ImpTrajectory.key_of(spec)
        elif spec.method == "imc":
            key = "imc:" + ImcCache.key_of(spec)
        else:
            key = "run:" + spec.key
        groups.setdefault(key, []).append(spec)
    chains = [group for key, group in groups.items() if key.startswith("imp:")]
    others = [group for key, group in groups.items() if not key.startswith("imp:")]
    return chains + others


def worker_devices(device, devices: Sequence | None, workers: int) -> list[torch.device]:
    """The device of each worker.

    Args:
        device: the comparison's ``device`` (``None``/``"auto"``, ``"cpu"``, ``"cuda"``,
            ``"cuda:1"``, a ``torch.device``); used when ``devices`` is None. ``"cuda"``
            without an index spreads the workers over every visible GPU.
        devices: explicit devices, assigned to the workers in turn.
        workers: the number of workers.

    Raises:
        ValueError: an empty ``devices``, a device name torch does not know, or a CUDA
            device that is not there (from :func:`imc_prune._checks.resolve_device`).
    """
    if devices is not None:
        if isinstance(devices, (str, torch.device)) or len(devices) == 0:
            raise ValueError(f"devices must be a non-empty list of devices, got {devices!r}")
        pool = [resolve_device(d) for d in devices]
    else:
        resolved = resolve_device(device)
        if resolved.type == "cuda" and resolved.index is None:
            pool = [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
        else:
            pool = [resolved]
    return [pool[i % len(pool)] for i in range(workers)]


def default_threads(workers: int, devices: Sequence[torch.device]) -> int:
    """CPU threads per worker: the parent's torch threads shared out (CPU workers), or the
    machine's cores shared out (GPU workers, whose CPU threads only feed the device)."""
    if all(d.type == "cpu" for d in devices):
        total = torch.get_num_threads()
    else:
        total = os.cpu_count() or 1
    return max(1, total // workers)


def run_parallel(
    groups: list[list],
    *,
    devices: Sequence[torch.device],
    threads: int,
    data_root,
    imp_dir,
    on_result: Callable[[dict], None],
) -> None:
    """Run the groups on ``len(devices)`` spawned workers; ``on_result(record_dict)`` is
    called in the parent for each finished run, in the order they finish.

    Raises:
        The first failing run's exception (or a RuntimeError when it cannot be sent back, or
        when a worker dies without one: killed, out of memory), after terminating the
        workers.
    """
    context = multiprocessing.get_context("spawn")
    tasks = context.Queue()
    results = context.Queue()
    n_workers = min(len(devices), len(groups))
    for group in groups:
        tasks.put(group)
    for _ in range(n_workers):
        tasks.put(None)
    expected = sum(len(group) for group in groups)
    processes = []
    try:
        for index in range(n_workers):
            process = context.Process(
                target=_worker,
                args=(
                    index,
                    str(devices[index]),
                    threads,
                    data_root,
                    imp_dir,
                    tasks,
                    results,
                    os.getpid(),
                ),
                name=f"imc-prune-worker-{index}",
                daemon=True,
            )
            process.start()
            processes.append(process)
        received = 0
        while received < expected:
            try:
                kind, index, payload = results.get(timeout=_POLL_S)
            except queue.Empty:
                _check_alive(processes)
                continue
            if kind == "error":
                _raise_from_worker(index, devices[index], payload)
            received += 1
            on_result(payload)
        for process in processes:  # each has read its end mark; let it exit on its own
            process.join(timeout=_EXIT_S)
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
        for process in processes:
            process.join()
        # Nothing is left to read or write: let the queues go without waiting on their pipes.
        for channel in (tasks, results):
            channel.cancel_join_thread()
            channel.close()


def _check_alive(processes) -> None:
    if all(process.exitcode == 0 for process in processes):
        raise RuntimeError("the compare workers ended before every run was reported")
    for index, process in enumerate(processes):
        if process.exitcode not in (None, 0):
            raise RuntimeError(
                f"compare worker {index} died (exit code {process.exitcode}) without reporting "
                "an error: killed, or out of memory? (A script that calls compare with workers "
                "> 1 needs an `if __name__ == '__main__':` guard, or every worker fails as it "
                "starts: see the traceback above.) The runs finished so far are saved; run the "
                "comparison again to resume, with fewer workers if memory ran out"
            )


def _raise_from_worker(index: int, device, payload: dict) -> None:
    where = (
        f"in compare worker {index} ({device}), run {payload['label']} target "
        f"{payload['target']} seed {payload['seed']}; the worker's traceback:\n"
        f"{payload['traceback']}"
    )
    exc = payload["exception"]
    if exc is None:
        raise RuntimeError(f"{payload['summary']}\n{where}")
    exc.add_note(where)
    raise exc


def _portable(exc: BaseException) -> BaseException | None:
    """``exc`` if it survives pickling (to cross the queue), else None."""
    try:
        copy = pickle.loads(pickle.dumps(exc))
    except Exception:
        return None
    return copy if type(copy) is type(exc) else None


def _die_with_parent(parent: int) -> None:
    """Have the kernel kill this worker when the parent dies (Linux ``PR_SET_PDEATHSIG``).

    A parent stopped by a signal (``timeout``, a job scheduler's SIGTERM, a kill) runs no
    cleanup, so without this its workers would train on, holding CPU cores or a GPU, with
    nobody left to save their runs.
    """
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):  # pragma: no cover - no prctl
            pass
    if os.getppid() != parent:  # it died before prctl took effect
        os._exit(1)


def _worker(index, device, threads, data_root, imp_dir, tasks, results, parent) -> None:
    _die_with_parent(parent)
    torch.set_num_threads(threads)
    from imc_prune.experiment import DataCache, ImcCache, ImpCache, run_one

    data_cache = DataCache(data_root)
    imp_cache = ImpCache(imp_dir)
    imc_cache = ImcCache()
    while True:
        group = tasks.get()
        if group is None:
            return
        for spec in group:
            try:
                record = run_one(
                    spec,
                    data_cache=data_cache,
                    imp_cache=imp_cache,
                    imc_cache=imc_cache,
                    device=device,
                    progress=False,
                )
            except BaseException as exc:  # noqa: BLE001 - every failure goes to the parent
                payload: dict[str, Any] = {
                    "label": spec.label,
                    "target": spec.target,
                    "seed": spec.seed,
                    "exception": _portable(exc),
                    "summary": f"{type(exc).__name__}: {exc}",
                    "traceback": traceback.format_exc(),
                }
                results.put(("error", index, payload))
                return
            results.put(("record", index, record.to_dict()))
