"""``compare(..., workers=N)``: runs spread over spawned worker processes give the records of
one process, keep the runs that share cached work together, save what finished when a run
fails, and refuse bad settings with a message that names them.

Runs use scikit-learn digits and LeNet-300-100 with one epoch (24 steps): seconds per run. Each
spawned worker imports torch and imc_prune first (a few seconds).
"""

import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from imc_kernels import _dispatch
from imc_prune import _parallel, cli, experiment
from imc_prune.experiment import RunSpec, compare

TRAIN = {"epochs": 1}
SMALL_IMC = {"hessian_batch_size": 256, "k": 4, "n_probes": 2, "steps": 16, "n_directions": 1}
# Fields that differ between two executions of the same run: clocks and the finish date.
TIMING = ("wall_s", "elapsed_s", "environment")


def _spec(method, remaining=0.3, seed=0, imc=None):
    """A digits LeNet-300-100 run of one epoch (IMC with a small spectrum)."""
    analysis = SMALL_IMC if imc is None and method.startswith("imc") else (imc or {})
    return RunSpec("digits", "lenet300100", method, remaining, seed, train=TRAIN, imc=analysis)


def _without_clocks(record: dict) -> dict:
    data = {k: v for k, v in record.items() if k not in TIMING}
    data["phases"] = [{k: v for k, v in p.items() if k != "wall_s"} for p in data["phases"]]
    if data.get("imc"):
        data["imc"] = {k: v for k, v in data["imc"].items() if k != "timings"}
    if data.get("imp"):
        data["imp"] = [{k: v for k, v in r.items() if k != "wall_s"} for r in data["imp"]]
    return data


def _one_thread_compare(specs, out, cache):
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers' thread count: the same sums, the same bits
    try:
        return compare(specs, out, data_cache=cache, device="cpu")
    finally:
        torch.set_num_threads(before)


def test_workers_give_the_records_of_one_process(cache, tmp_path):
    methods = ["random", "snip", "imc-magnitude", "imc-leverage", "imp", "oneshot"]
    specs = experiment.grid_specs(
        "digits", ["lenet300100"], methods, [0.3, 0.1], [0, 1], train=TRAIN, imc=SMALL_IMC
    )
    serial = _one_thread_compare(specs, tmp_path / "serial", cache)
    seen = []
    parallel = compare(
        specs,
        tmp_path / "parallel",
        device="cpu",
        workers=2,
        threads=1,
        on_record=lambda r: seen.append(r.key),
    )
    keys = [spec.key for spec in specs]
    assert [r.key for r in parallel.records] == [r.key for r in serial.records] == keys
    assert sorted(parallel.ran) == sorted(keys) and sorted(seen) == sorted(keys)
    for a, b in zip(serial.records, parallel.records, strict=True):
        assert _without_clocks(a.to_dict()) == _without_clocks(b.to_dict()), a.label
    # Sharing survived the split: IMC runs after the first of a seed reused its analysis,
    # IMP and one-shot runs the seed's dense training.
    reused = {
        (r.label, r.target, r.seed): [p["reused"] for p in r.phases] for r in parallel.records
    }
    assert reused[("imc-leverage", 0.1, 1)][:2] == [True, True]
    assert reused[("oneshot", 0.3, 0)][0] is True
    # Only the parent wrote runs.jsonl: one whole line per run.
    lines = (tmp_path / "parallel" / "runs.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["key"] for line in lines) == sorted(keys)
    # The IMP rounds were saved where a restarted comparison finds them.
    assert any((tmp_path / "parallel" / "imp").rglob("*.pt"))


def test_runs_sharing_work_stay_in_one_group():
    specs = [
        _spec("random", 0.3),
        _spec("imc-magnitude", 0.3),
        _spec("imp", 0.3),
        _spec("imc-leverage", "auto"),
        _spec("imc-magnitude", 0.3, seed=1),
        _spec("dense", 1.0),
        _spec("random", 0.1),
        _spec("oneshot", 0.1),
        _spec("imp", 0.3, seed=1),
    ]
    groups = _parallel.affinity_groups(specs)
    labels = [[(s.label, s.target, s.seed) for s in group] for group in groups]
    assert labels == [
        # IMP trajectories first, one per seed, in the given order
        [("imp", 0.3, 0), ("dense", 1.0, 0), ("oneshot", 0.1, 0)],
        [("imp", 0.3, 1)],
        # then the rest: IMC of a seed shares one analysis across scores and targets
        [("random", 0.3, 0)],
        [("imc-magnitude", 0.3, 0), ("imc-leverage", "auto", 0)],
        [("imc-magnitude", 0.3, 1)],
        [("random", 0.1, 0)],
    ]
    # Other analysis settings are another analysis.
    other = _spec("imc-magnitude", 0.3, imc={**SMALL_IMC, "k": 5})
    assert len(_parallel.affinity_groups([specs[1], other])) == 2


def test_a_failing_run_is_raised_and_the_finished_ones_stay(cache, tmp_path):
    good = _spec("random", 0.3)
    # A warm-up lr that diverges: only the warm-up itself finds out, inside the worker (the
    # spec checks the settings' ranges, not where training goes).
    bad = _spec("imc-magnitude", 0.3, imc={**SMALL_IMC, "warmup_lr": 1e6})
    with pytest.raises(FloatingPointError, match="warm-up diverged") as caught:
        compare([good, bad], tmp_path, device="cpu", devices=["cpu"], threads=1)
    notes = "\n".join(getattr(caught.value, "__notes__", []))
    assert "in compare worker 0 (cpu), run imc-magnitude target 0.3 seed 0" in notes
    assert "Traceback" in notes  # the worker's own
    lines = (tmp_path / "runs.jsonl").read_text().splitlines()
    assert [json.loads(line)["key"] for line in lines] == [good.key]
    # Started again without the bad run: nothing left to do.
    again = compare([good], tmp_path, data_cache=cache, device="cpu")
    assert again.ran == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"workers": 0}, "workers must be an int >= 1, got 0"),
        ({"workers": True}, "workers must be an int >= 1, got True"),
        ({"workers": 2, "threads": 0}, "threads must be an int >= 1 or None, got 0"),
        ({"devices": "cpu"}, "devices must be a non-empty list"),
        ({"devices": []}, "devices must be a non-empty list"),
        ({"devices": ["gpu7"]}, "'gpu7' is not a device"),
    ],
)
def test_bad_worker_settings(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        compare([_spec("random")], tmp_path, device="cpu", **kwargs)
    assert not (tmp_path / "runs.jsonl").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_cuda_workers_without_cuda_are_refused(tmp_path):
    with pytest.raises(ValueError, match="sees no CUDA device"):
        compare([_spec("random")], tmp_path, device="cuda", workers=2)
    with pytest.raises(ValueError, match="sees no CUDA device"):
        compare([_spec("random")], tmp_path, devices=["cpu", "cuda:1"])


def test_devices_and_threads_shared_out(monkeypatch):
    cpu = torch.device("cpu")
    assert _parallel.worker_devices("cpu", None, 3) == [cpu] * 3
    assert _parallel.worker_devices(None, ["cpu", "meta"], 3) == [cpu, torch.device("meta"), cpu]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    spread = _parallel.worker_devices("cuda", None, 3)
    assert [str(d) for d in spread] == ["cuda:0", "cuda:1", "cuda:0"]
    assert [str(d) for d in _parallel.worker_devices("cuda:1", None, 2)] == ["cuda:1"] * 2
    with pytest.raises(ValueError, match="cuda:2 asked for, but torch sees 2 CUDA"):
        _parallel.worker_devices(None, ["cuda:2"], 1)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    assert _parallel.default_threads(3, [cpu] * 3) == 2
    assert _parallel.default_threads(16, [cpu] * 16) == 1


def test_a_worker_that_dies_is_reported():
    alive = types.SimpleNamespace(exitcode=None)
    killed = types.SimpleNamespace(exitcode=-9)
    _parallel._check_alive([alive, alive])  # still working: no error
    with pytest.raises(RuntimeError, match=r"worker 1 died \(exit code -9\).*saved"):
        _parallel._check_alive([alive, killed])
    finished = types.SimpleNamespace(exitcode=0)
    with pytest.raises(RuntimeError, match="ended before every run was reported"):
        _parallel._check_alive([finished, finished])


def test_cli_compare_with_workers(tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", "--methods", "random", "snip", "--remaining", "0.3", "--seeds", "0"]
    argv += ["--workers", "2", "--worker-threads", "1", "--out", str(out)]
    argv += ["--dataset", "digits", "--quick", "--no-progress"]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "3 runs (0 done already" in text and ", 2 workers" in text
    assert "| random |" in text and "| snip |" in text
    saved = json.loads((out / "results.json").read_text())
    assert {r["method"] for r in saved["records"]} == {"dense", "random", "snip"}
    with pytest.raises(SystemExit):
        cli.main(["compare", "--workers", "0", "--dataset", "digits", "--quick"])
    assert "--workers" in capsys.readouterr().err


SCRIPT = """
import sys
from imc_prune.experiment import RunSpec, compare
if __name__ == "__main__":
    specs = [RunSpec("digits", "lenet300100", "random", 0.3, seed, train={"epochs": 5000})
             for seed in range(4)]
    print("started", flush=True)
    compare(specs, sys.argv[1], device="cpu", workers=2, threads=1)
"""


def _children(pid: int) -> set[int]:
    found = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found.update(int(p) for p in text)
    return found


def _running(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\\nState:\\tZ" not in status  # a zombie is dead, only not reaped


@pytest.mark.skipif(
    not Path("/proc/self/task").exists()
    or not Path(f"/proc/self/task/{os.getpid()}/children").exists(),
    reason="needs Linux /proc children lists",
)
def test_workers_die_with_a_killed_parent(tmp_path):
    script = tmp_path / "sweep.py"
    script.write_text(SCRIPT)
    env = {**os.environ, _dispatch.ENV_BACKEND: "reference"}
    parent = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "out")], env=env, stdout=subprocess.PIPE
    )
    try:
        assert parent.stdout.readline().strip() == b"started"
        deadline = time.monotonic() + 60
        workers: set[int] = set()
        while len(workers) < 2 and time.monotonic() < deadline:
            # The spawn machinery's resource tracker is a child too; workers run imc_prune.
            workers = {
                pid
                for pid in _children(parent.pid)
                if b"multiprocessing.spawn" in Path(f"/proc/{pid}/cmdline").read_bytes()
            }
            time.sleep(0.2)
        assert len(workers) == 2, "the workers did not start"
        parent.send_signal(signal.SIGTERM)  # as `timeout` stops a command: no cleanup runs
        parent.wait(timeout=30)
        # Each worker is minutes into a 5000-epoch run: only the kernel stops it this soon.
        deadline = time.monotonic() + 10
        while any(_running(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_running(pid) for pid in workers), "workers outlived their parent"
    finally:
        if parent.poll() is None:
            parent.kill()
