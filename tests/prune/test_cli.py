"""``imc-prune``: run, compare and spectrum end to end on scikit-learn digits (--quick), the
files they promise, resuming, and the errors a user sees."""

import json

import pytest

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
    ],
)
def test_bad_arguments_say_what_is_wrong(tmp_path, capsys, argv, message):
    try:
        status = cli.main([*argv, "--out", str(tmp_path), *QUICK])
    except SystemExit as exit_:  # argparse's own errors
        status = exit_.code
    assert status in (1, 2)
    assert message in capsys.readouterr().err


def test_missing_dataset_is_a_clear_error(tmp_path, capsys):
    argv = ["run", "--dataset", "cifar10", "--data-root", str(tmp_path), "--out", str(tmp_path)]
    assert cli.main([*argv, "--quick", "--no-progress"]) == 1
    assert "cifar-10 not found" in capsys.readouterr().err.lower()
