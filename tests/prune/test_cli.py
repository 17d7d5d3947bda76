"""``imc-prune``: run, compare and spectrum end to end on scikit-learn digits (--quick), the
files they promise, resuming, and the errors a user sees."""

import json
import subprocess
import sys
import warnings

import pytest
import torch

from imc_prune import cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
QUICK = ["--dataset", "digits", "--quick", "--no-progress"]


def _png(path):
    return path.read_bytes()[:8] == PNG_MAGIC


def test_run_imc_prints_the_decision_and_writes_the_files(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["run", "--remaining", "auto", "30%", "--out", str(out), *QUICK]) == 0
    text = capsys.readouterr().out
    assert "dense     final test accuracy" in text
    assert "Lipschitz L =" in text and "automatic weights remaining" in text
    assert "imc-magnitude weights remaining 30.00 % (target 30%)" in text
    assert "(target auto)" in text
    for name in ("results.json", "results.md", "runs.jsonl"):
        assert (out / name).exists(), name
        assert str(out / name) in text  # where the files are
    assert _png(out / "accuracy_digits_lenet300100.png")
    assert _png(out / "spectrum_digits_lenet300100.png")
    records = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert [r["label"] for r in records] == ["dense", "imc-magnitude", "imc-magnitude"]
    fixed = next(r for r in records if r["target"] == 0.3)
    assert fixed["weights_remaining"] == pytest.approx(0.3, abs=1e-4)
    auto = next(r for r in records if r["target"] == "auto")
    assert auto["weights_remaining"] == pytest.approx(auto["imc"]["auto_remaining"], abs=1e-4)

    # The same command again: nothing is recomputed.
    assert cli.main(["run", "--remaining", "auto", "30%", "--out", str(out), *QUICK]) == 0
    assert "note      reused dense, imc-magnitude" in capsys.readouterr().out
    assert len((out / "runs.jsonl").read_text().splitlines()) == 3


def test_compare_grid_and_resume(tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", "--methods", "random", "snip", "--remaining", "0.3", "0.1"]
    argv += ["--seeds", "0", "--out", str(out), *QUICK]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "5 runs (0 done already" in text and "| random |" in text and "| snip |" in text
    saved = json.loads((out / "results.json").read_text())
    assert {(r["method"], r["target"]) for r in saved["rows"]} == {
        ("dense", 1.0),
        ("random", 0.3),
        ("random", 0.1),
        ("snip", 0.3),
        ("snip", 0.1),
    }
    assert cli.main(argv) == 0
    assert "5 runs (5 done already" in capsys.readouterr().out


# LeNet-300-100 on digits: (300, 64), (100, 300) and (10, 100) weights.
N_PRUNABLE = 300 * 64 + 100 * 300 + 10 * 100


def test_run_granularity_reaches_the_results_and_the_run_identity(tmp_path, capsys):
    out = tmp_path / "block"
    block = ["--granularity", "block", "--block-size", "2"]
    argv = ["run", "--method", "random", "--remaining", "30%", "--out", str(out), *QUICK]
    assert cli.main([*argv, *block]) == 0
    text = capsys.readouterr().out
    assert "masks block 2" in text and "random (block 2) weights remaining" in text
    saved = json.loads((out / "results.json").read_text())
    pruned = next(r for r in saved["records"] if r["method"] == "random")
    assert pruned["granularity"] == "block" and pruned["block_size"] == 2
    assert pruned["spec"]["baseline"]["granularity"] == "block"
    assert pruned["spec"]["imc"]["block_size"] == 2  # IMC's masks too
    # Whole 2 x 2 tiles: every layer keeps a multiple of 4, 30 % of the tiles in all.
    kept = [layer["kept"] for layer in pruned["layers"].values()]
    assert all(k % 4 == 0 for k in kept) and sum(kept) == 4 * round(0.3 * N_PRUNABLE / 4)
    assert {row["method"] for row in saved["rows"]} == {"dense", "random (block 2)"}

    # Element masks in the same folder are another run, not the block run resumed ...
    assert cli.main(argv) == 0
    assert "note      reused" not in capsys.readouterr().out
    records = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert [(r["label"], r["granularity"]) for r in records] == [
        ("dense", "block"),
        ("random", "block"),
        ("dense", "element"),
        ("random", "element"),
    ]
    # ... and the block run again is found.
    assert cli.main([*argv, *block]) == 0
    assert "note      reused dense, random" in capsys.readouterr().out
    assert len((out / "runs.jsonl").read_text().splitlines()) == 4


def test_compare_two_four(tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", "--methods", "random", "oneshot", "--remaining", "0.5", "--seeds", "0"]
    assert cli.main([*argv, "--granularity", "2:4", "--out", str(out), *QUICK]) == 0
    assert "| random (2:4) |" in capsys.readouterr().out
    saved = json.loads((out / "results.json").read_text())
    for record in saved["records"]:
        assert record["granularity"] == "2:4" and record["block_size"] is None
        if record["method"] != "dense":
            # 2 of every 4 weights of every row: exactly half of every layer.
            assert all(2 * v["kept"] == v["total"] for v in record["layers"].values())
    assert {row["method"] for row in saved["rows"]} == {"dense", "random (2:4)", "oneshot (2:4)"}


def test_spectrum_writes_json_and_plot(tmp_path, capsys):
    out = tmp_path / "spec"
    assert cli.main(["spectrum", "--out", str(out), *QUICK]) == 0
    text = capsys.readouterr().out
    assert "Lipschitz L =" in text and "gap" in text
    data = json.loads((out / "spectrum.json").read_text())
    assert data["gap"]["n"] <= data["gap"]["dim"] and len(data["spectrum"]["top_eigenvalues"]) == 8
    assert _png(out / "spectrum.png")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["run", "--method", "snip"], "--remaining is needed for method 'snip'"),
        (["run", "--remaining", "150%"], "weights remaining must be 'auto'"),
        (["run", "--method", "magnitude"], "unknown method"),
        (["run", "--model", "lenet5"], "unknown model"),
        (["run", "--granularity", "tile"], "invalid choice: 'tile'"),
        (["run", "--granularity", "block"], "needs a block_size"),
        (["run", "--granularity", "block", "--block-size", "0"], "expected a positive integer"),
        (["run", "--block-size", "2"], "only used with granularity='block'"),
        # Before any training: LeNet-300-100's last weight is (10, 100).
        (
            ["run", "--granularity", "block", "--block-size", "4"],
            "lenet300100: granularity='block': weight '5.weight' has shape (10, 100)",
        ),
        (["run", "--granularity", "2:4"], "remaining must be 0.5, not 'auto'"),
        (
            ["run", "--method", "snip", "--remaining", "30%", "--granularity", "2:4"],
            "remaining must be 0.5, got 0.3",
        ),
        (
            ["compare", "--methods", "imp", "--remaining", "0.5", "--granularity", "2:4"],
            "method 'imp' cannot prune to granularity '2:4'",
        ),
    ],
)
def test_bad_arguments_say_what_is_wrong(tmp_path, capsys, argv, message):
    try:
        status = cli.main([*argv, "--out", str(tmp_path), *QUICK])
    except SystemExit as exit_:  # argparse's own errors
        status = exit_.code
    assert status in (1, 2)
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs.jsonl").exists()  # nothing ran


def test_missing_dataset_is_a_clear_error(tmp_path, capsys):
    argv = ["run", "--dataset", "cifar10", "--data-root", str(tmp_path), "--out", str(tmp_path)]
    assert cli.main([*argv, "--quick", "--no-progress"]) == 1
    assert "cifar-10 not found" in capsys.readouterr().err.lower()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_a_device_that_is_not_there_is_an_argument_error(capsys):
    # Before the check: torch's "Torch not compiled with CUDA enabled" assertion, a traceback.
    with pytest.raises(SystemExit) as exit_:
        cli.main(["run", "--device", "cuda", *QUICK])
    assert exit_.value.code == 2
    assert "sees no CUDA device; use cpu" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["spectrum", "--device", "gpu", *QUICK])
    assert "'gpu' is not a device" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["compare", "--device", "cuda:1", "--workers", "2", *QUICK])
    assert "argument --device: device cuda:1 asked for" in capsys.readouterr().err


def test_without_matplotlib_the_files_list_says_no_plots(tmp_path, capsys, monkeypatch):
    # matplotlib is optional ("plots" extra): an import of it fails from here on.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    from imc_prune import report

    assert not report.plotting_available()
    out = tmp_path / "run"
    argv = ["run", "--method", "random", "--remaining", "30%", "--out", str(out), *QUICK]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cli.main(argv) == 0
    # The CLI says it once, in its files list; write_results' warning is for library callers.
    assert not [w for w in caught if "matplotlib" in str(w.message)]
    text = capsys.readouterr().out
    assert "(no plots: matplotlib is not installed; pip install matplotlib" in text
    assert (out / "results.md").exists() and (out / "results.json").exists()
    assert not list(out.glob("*.png"))
    spec = tmp_path / "spec"
    assert cli.main(["spectrum", "--out", str(spec), *QUICK]) == 0
    assert "(no plots: matplotlib is not installed" in capsys.readouterr().out
    assert (spec / "spectrum.json").exists() and not (spec / "spectrum.png").exists()


def test_the_package_imports_without_matplotlib_and_scikit_learn(tmp_path):
    # A fresh interpreter, as after a plain `pip install .`: neither optional package imports.
    script = (
        "import sys\n"
        "sys.modules['matplotlib'] = sys.modules['sklearn'] = None\n"
        "from imc_prune import cli, data, experiment, report\n"
        "try:\n"
        "    report.plot_accuracy([{'method': 'dense'}], 'x.png')\n"
        "except ImportError as exc:\n"
        "    print('plots:', exc)\n"
        "try:\n"
        "    data.load_dataset('digits')\n"
        "except data.DatasetNotFoundError as exc:\n"
        "    print('digits:', exc)\n"
        "print('cli status', cli.main(['spectrum', '--dataset', 'digits', '--quick']))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr
    assert "plots: imc_prune's plots need matplotlib: pip install matplotlib" in run.stdout
    assert "digits: the digits data set ships with scikit-learn" in run.stdout
    assert "cli status 1" in run.stdout  # a clear error, not a traceback
    assert "pip install scikit-learn" in run.stderr and "Traceback" not in run.stderr
