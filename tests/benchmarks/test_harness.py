"""Fast tests of the benchmark harness, models and HVP baselines (CPU, a few seconds).

The baselines are checked against a dense fp64 Hessian from ``torch.func.hessian`` on tiny
models: the benchmark's correctness oracle (``jvp_grad``) and its GGN reference must be
right before they can judge anything else.
"""

import copy
import csv
import re
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # `benchmarks` is a folder of scripts, not installed
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import _harness as harness  # noqa: E402
from benchmarks import hvp, models  # noqa: E402

# --------------------------------------------------------------------------------------
# measure


def test_measure_noop_percentiles_are_ordered():
    m = harness.measure(lambda: None, warmup=1, min_repeats=7)
    assert m.n == 7 and len(m.times) == 7
    assert 0 <= min(m.times) <= m.p20 <= m.median <= m.p80 <= max(m.times)
    assert m.median < 0.01  # a no-op: anything near 10 ms means the clock is wrong


def test_measure_sleep_and_min_time():
    m = harness.measure(lambda: time.sleep(0.002), warmup=0, min_repeats=2, min_time_s=0.02)
    assert m.median >= 0.002  # sleep never returns early
    assert sum(m.times) >= 0.02 and m.n >= 2


def test_measure_setup_is_fresh_and_not_timed():
    calls = []
    counter = iter(range(1000))

    def setup():
        time.sleep(0.02)
        return (next(counter),)

    m = harness.measure(calls.append, warmup=2, min_repeats=4, setup=setup)
    assert calls == list(range(6))  # warm-up calls get fresh inputs too
    assert m.n == 4
    assert m.median < 0.01  # the 20 ms of setup is outside the clock


def test_measure_caps_repeats_and_checks_arguments():
    m = harness.measure(lambda: None, warmup=0, min_repeats=1, min_time_s=100.0, max_repeats=3)
    assert m.n == 3
    with pytest.raises(ValueError, match="min_repeats"):
        harness.measure(lambda: None, min_repeats=0)


def test_measurement_percentiles_interpolate_like_numpy():
    m = harness.Measurement.of([5.0, 1.0, 4.0, 2.0, 3.0])
    # numpy.percentile([1..5], [20, 50, 80]) = 1.8, 3.0, 4.2
    assert (m.p20, m.median, m.p80) == pytest.approx((1.8, 3.0, 4.2))
    half = m.per(2)
    assert (half.p20, half.median, half.p80) == pytest.approx((0.9, 1.5, 2.1))
    assert m.ms() == "3000 [1800, 4200]"


# --------------------------------------------------------------------------------------
# device names, metadata, CSV, tables


def test_device_name_is_filesystem_safe():
    name = harness.device_name("cpu")
    assert re.fullmatch(r"cpu-[a-z0-9-]+-\d+c", name), name


@pytest.mark.parametrize(
    ("raw", "short"),
    [
        ("Intel(R) Xeon(R) Platinum 8480+ CPU @ 2.00GHz", "Intel Xeon Platinum 8480+"),
        ("AMD EPYC 7763 64-Core Processor", "AMD EPYC 7763"),
        ("AMD EPYC", "AMD EPYC"),
    ],
)
def test_cpu_model_is_shortened(raw, short):
    assert harness._shorten_cpu_model(raw) == short


def test_slug_matches_cuda_naming():
    assert harness._slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


def test_run_metadata_has_the_provenance_columns():
    meta = harness.run_metadata("cpu", ["benchmarks/hvp.py", "--quick"])
    for key in ("timestamp", "device", "commit", "torch", "triton", "command", "threads"):
        assert key in meta
    assert meta["command"] == "python benchmarks/hvp.py --quick"
    assert meta["torch"] == torch.__version__


def _read_csv(path):
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_append_csv_writes_the_header_once(tmp_path):
    path = tmp_path / "results" / "dev.csv"
    harness.append_csv(path, [{"model": "a", "ms": 1.5}, {"model": "b", "ms": 2.0}])
    harness.append_csv(path, [{"model": "c", "ms": 3.0}])
    lines = path.read_text().splitlines()
    assert lines[0] == "model,ms"
    assert sum(line.startswith("model,") for line in lines) == 1
    assert [row["model"] for row in _read_csv(path)] == ["a", "b", "c"]


def test_append_csv_widens_the_header_keeping_its_order(tmp_path):
    path = tmp_path / "dev.csv"
    harness.append_csv(path, [{"model": "a", "ms": 1.0}])
    harness.append_csv(path, [{"ms": 2.0, "block": 8, "model": "b"}])  # new key, other order
    rows = _read_csv(path)
    assert path.read_text().splitlines()[0] == "model,ms,block"
    assert rows[0] == {"model": "a", "ms": "1.0", "block": ""}
    assert rows[1] == {"model": "b", "ms": "2.0", "block": "8"}
    harness.append_csv(path, [])  # nothing to add: file unchanged
    assert len(_read_csv(path)) == 2


def test_markdown_table_formats_and_aligns():
    rows = [
        {"model": "mlp", "b": 1, "ms": 2.5, "note": "x"},
        {"model": "cnn_small", "b": 32, "ms": 0.01234},
    ]
    table = harness.markdown_table(rows, ["model", "b", ("ms", "time (ms)"), "note"])
    assert table.splitlines() == [
        "| model     |   b | time (ms) | note |",
        "| --------- | --: | --------: | ---- |",
        "| mlp       |   1 |      2.50 | x    |",
        "| cnn_small |  32 |    0.0123 |      |",
    ]


def test_format_cell_significant_digits():
    assert [harness.format_cell(v) for v in (1234.5, 12.345, 0.0012345, 1e-9, None, 3)] == [
        "1234",
        "12.3",
        "0.00123",
        "1.00e-09",
        "",
        "3",
    ]


def test_print_table(capsys):
    harness.print_table([{"a": "x", "b": 1.0}], ["a", "b"], title="T")
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "T"
    assert out[1].split() == ["a", "b"]
    assert set(out[2].replace(" ", "")) == {"-"}
    assert out[3].split() == ["x", "1.00"]


# --------------------------------------------------------------------------------------
# check_close


def test_check_close_passes_and_reports_the_error():
    expected = torch.ones(10, 2, dtype=torch.float64)
    actual = expected + 1e-6
    assert harness.check_close(actual, expected, rtol=1e-4, what="x") == pytest.approx(1e-6)


def test_check_close_raises_with_a_message():
    expected = torch.ones(10)
    with pytest.raises(harness.CorrectnessError, match=r"my method.*relative error 0\.1"):
        harness.check_close(expected * 1.1, expected, rtol=1e-4, what="my method")
    with pytest.raises(harness.CorrectnessError, match="non-finite"):
        harness.check_close(torch.full((10,), float("nan")), expected, rtol=1, what="m")
    with pytest.raises(harness.CorrectnessError, match="shape"):
        harness.check_close(torch.ones(9), expected, rtol=1, what="m")


def test_check_close_per_column_catches_a_small_wrong_column():
    expected = torch.cat([torch.full((100, 1), 1e3), torch.ones(100, 1)], dim=1)
    actual = expected.clone()
    actual[:, 1] *= 1.01  # 1% off, invisible against the big column's norm
    harness.check_close(actual, expected, rtol=1e-4, what="whole")
    with pytest.raises(harness.CorrectnessError):
        harness.check_close(actual, expected, rtol=1e-4, what="columns", dim=0)


def test_parse_helpers():
    assert harness.parse_list(None, ["a", "b"], "x") == ["a", "b"]
    assert harness.parse_list("b", ["a", "b"], "x") == ["b"]
    with pytest.raises(SystemExit, match="unknown x: c"):
        harness.parse_list("a,c", ["a", "b"], "x")
    assert harness.parse_ints("1,8,32", "--blocks") == [1, 8, 32]
    with pytest.raises(SystemExit):
        harness.parse_ints("0", "--blocks")


# --------------------------------------------------------------------------------------
# models and the cost model


@pytest.mark.parametrize(
    ("name", "count"),
    [("mlp_lenet", 266_610), ("cnn_small", 20_490), ("mlp_wide", 1_863_690), ("cnn_deep", 871_018)],
)
def test_models_have_their_parameter_counts(name, count):
    model = models.build_model(name, seed=0)
    assert sum(p.numel() for p in model.parameters()) == count
    assert isinstance(model, nn.Sequential) and not model.training
    images, targets = models.make_batch(name, 3, seed=0)
    assert model(images).shape == (3, models.N_CLASSES)


def test_models_are_deterministic_by_seed():
    a, b, c = (models.build_model("cnn_deep", seed=s) for s in (1, 1, 2))
    for pa, pb in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(pa, pb)
    assert not torch.equal(a[0].weight, c[0].weight)
    bn = a[1]
    assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))  # calibrated


def test_make_batch():
    images, targets = models.make_batch("mlp_lenet", 64, seed=3)
    assert images.shape == (64, 1, 28, 28) and images.dtype == torch.float32
    assert targets.dtype == torch.int64 and 0 <= targets.min() and targets.max() < 10
    again, _ = models.make_batch("mlp_lenet", 64, seed=3)
    other, _ = models.make_batch("mlp_lenet", 64, seed=4)
    assert torch.equal(images, again) and not torch.equal(images, other)
    with pytest.raises(KeyError):
        models.make_batch("resnet", 1, seed=0)


def test_flops_model_for_linear_layers():
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    n = 7
    first, second = n * 6 * 5, n * 5 * 3
    assert harness.flops_per_hvp(model, (n, 1, 2, 3)) == 4 * first + 12 * second
    assert harness.flops_per_hvp(model, (n, 1, 2, 3), "ggn") == 4 * first + 8 * second
    assert harness.flops_per_gradient(model, (n, 1, 2, 3)) == 4 * first + 6 * second


def test_flops_model_for_convolutions():
    layers = harness.gemm_layers(models.cnn_small(), (5, 1, 28, 28))
    # rows = batch x output positions, k = C_in * 3 * 3, m = C_out
    assert [(layer.rows, layer.k, layer.m) for layer in layers] == [
        (5 * 28 * 28, 9, 16),
        (5 * 14 * 14, 144, 32),
        (5, 1568, 10),
    ]


# --------------------------------------------------------------------------------------
# the baselines against dense fp64 curvature


def _tiny_mlp():
    # Tanh: a non-zero second derivative, so a dropped act'' term would show.
    return nn.Sequential(nn.Flatten(), nn.Linear(4 * 6, 5), nn.Tanh(), nn.Linear(5, 3))


def _tiny_cnn():
    return nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1),
        nn.BatchNorm2d(2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * 2 * 3, 3),
    )


def _tiny_problem(build):
    torch.manual_seed(0)
    model = build().double().eval()
    bn = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for module in bn:  # non-trivial eval statistics
        module.running_mean.uniform_(-0.5, 0.5)
        module.running_var.uniform_(0.5, 2.0)
    inputs = torch.randn(7, 1, 4, 6, dtype=torch.float64)
    targets = torch.randint(0, 3, (7,))
    return hvp.Problem(model, inputs, targets)


def _flat_function(problem, fn):
    """``fn(params tuple)`` as a function of one flat vector."""

    def of_flat(flat):
        pieces = tuple(
            flat[off : off + n].view(p.shape)
            for off, n, p in zip(problem.offsets, problem.numels, problem.params)
        )
        return fn(pieces)

    flat = torch.cat([p.detach().reshape(-1) for p in problem.params])
    return of_flat, flat


def _dense_hessian(problem):
    of_flat, flat = _flat_function(problem, problem.functional_loss())
    return torch.func.hessian(of_flat)(flat)


def _dense_ggn(problem):
    of_flat, flat = _flat_function(problem, problem.functional_output())
    jac = torch.func.jacrev(of_flat)(flat)  # (N, C, d)
    probs = torch.softmax(of_flat(flat), dim=-1)
    n = probs.shape[0]
    # mean cross-entropy: H_n = (diag(p_n) - p_n p_n^T) / N for every sample n
    loss_hessians = (torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]) / n
    return torch.einsum("nci,ncd,ndj->ij", jac, loss_hessians, jac)


@pytest.mark.parametrize("build", [_tiny_mlp, _tiny_cnn], ids=["mlp_tanh", "cnn_bn_pool"])
@pytest.mark.parametrize("b", [1, 3])
def test_baselines_match_the_dense_hessian(build, b):
    problem = _tiny_problem(build)
    dense = _dense_hessian(problem)
    assert torch.allclose(dense, dense.T, atol=1e-12)
    block = torch.randn(problem.dim, b, dtype=torch.float64)
    expected = dense @ block
    for name, method in hvp.BASELINE_CLASSES.items():
        product = method(problem)(block)
        # fp64 and ~100 parameters: rounding is ~1e-15 of the norm; 1e-10 leaves room for
        # the different evaluation orders while a wrong term would be O(1e-2) or more.
        harness.check_close(product, expected, rtol=1e-10, what=name, dim=0)


@pytest.mark.parametrize("build", [_tiny_mlp, _tiny_cnn], ids=["mlp_tanh", "cnn_bn_pool"])
def test_ggn_reference_matches_the_dense_ggn(build):
    problem = _tiny_problem(build)
    dense = _dense_ggn(problem)
    block = torch.randn(problem.dim, 3, dtype=torch.float64)
    harness.check_close(hvp.ggn_reference(problem, block), dense @ block, rtol=1e-10, what="ggn")
    # and the GGN is not the Hessian here (tanh/BN make them differ), so the test has teeth
    hessian = _dense_hessian(problem)
    assert (hessian - dense).norm() > 1e-3 * dense.norm()


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_references_check_against_float64(curvature):
    # The fp32 problem's oracle columns, its float64 twin's columns (the dense Hessian / GGN
    # of the float64 model, to 1e-10), and the tolerance built from the gap between them.
    tiny = _tiny_problem(_tiny_cnn)
    model32 = copy.deepcopy(tiny.model).float()
    problem = hvp.Problem(model32, tiny.inputs.float(), tiny.targets)
    # The dense oracle of the fp32 weights and inputs, exactly representable in float64.
    dense = (_dense_hessian if curvature == "hessian" else _dense_ggn)(hvp.float64_problem(problem))
    check = torch.randn(problem.dim, 3)
    references = hvp.References(problem, check, sync=lambda: None)
    truth = references.truth(curvature, 3)
    assert truth.dtype == torch.float64
    harness.check_close(truth, dense @ check.double(), rtol=1e-10, what="truth", dim=0)
    assert next(model32.parameters()).dtype == torch.float32  # the copy left it alone
    fp32 = references.get(curvature, 2)
    assert fp32.dtype == torch.float32 and fp32.shape == (problem.dim, 2)
    error = references.oracle_error(curvature, 3)
    assert 0 < error < 1e-5  # fp32 rounding on a tiny, smooth problem
    assert references.rtol(curvature, 3) == hvp.RTOL_FP32
    # Where the fp32 oracle is far from float64, the tolerance follows it.
    references.columns[(curvature, torch.float32)] = (truth * (1 + 1e-3)).float()
    assert references.rtol(curvature, 3) == pytest.approx(hvp.FP32_ORACLE_SLACK * 1e-3, rel=1e-3)


def test_cross_entropy_hessian_closed_form():
    logits = torch.randn(5, 4, dtype=torch.float64)
    targets = torch.randint(0, 4, (5,))
    tangent = torch.randn(5, 4, dtype=torch.float64)
    dense = torch.func.hessian(lambda z: nn.functional.cross_entropy(z, targets))(logits)
    expected = torch.einsum("ncmd,md->nc", dense, tangent)
    assert torch.allclose(hvp.cross_entropy_hessian_product(logits, tangent), expected)


def test_variants_pair_methods_with_curvatures():
    chosen = hvp.variants(["jvp_grad", "ours_fused", "ours_double_backward"], ["hessian", "ggn"])
    assert [(v.method, v.curvature) for v in chosen] == [
        ("jvp_grad", "hessian"),
        ("ours_fused", "hessian"),
        ("ours_fused", "ggn"),
        ("ours_double_backward", "hessian"),
    ]
    assert hvp.variants(["jvp_grad"], ["ggn"]) == []


# --------------------------------------------------------------------------------------
# the script end to end (tiny settings)

_SMOKE = ["--quick", "--models", "mlp_lenet", "--blocks", "1,2", "--seed", "1"]


def test_hvp_script_saves_csv_and_summary(tmp_path, capsys, monkeypatch):
    # Our operator may not exist yet, or may be mid-change: pretend it is missing, which
    # must be reported as unavailable, not as a failure.
    monkeypatch.setattr(hvp, "import_operator", lambda: (None, "not built in this test"))
    argv = [*_SMOKE, "--out", str(tmp_path), "--methods", "double_backward_reuse,ours_fused"]
    assert hvp.main(argv) == 0
    out = capsys.readouterr().out
    assert "ours_fused (hessian): unavailable -- not built in this test" in out
    csv_path = harness.results_path(tmp_path, "cpu")
    rows = _read_csv(csv_path)
    assert [(r["method"], r["block"]) for r in rows] == [
        ("gradient", ""),
        ("double_backward_reuse", "1"),
        ("double_backward_reuse", "2"),
    ]
    assert all(r["benchmark"] == "hvp" and r["device"] == harness.device_name("cpu") for r in rows)
    assert float(rows[1]["ratio_to_grad"]) > 0 and float(rows[1]["rel_err"]) < hvp.RTOL_FP32
    summary = harness.results_path(tmp_path, "cpu", "-hvp.md").read_text()
    command = summary.splitlines()[3]
    assert command.startswith("python benchmarks/hvp.py --quick")
    assert "--methods double_backward_reuse,ours_fused" in command
    assert "| mlp_lenet |" in summary


def test_hvp_script_refuses_to_time_a_wrong_method(capsys, monkeypatch):
    class Wrong(hvp.DoubleBackwardReuse):
        def __call__(self, block):
            return 1.001 * super().__call__(block)

    monkeypatch.setitem(hvp.BASELINE_CLASSES, "double_backward_reuse", Wrong)
    argv = [*_SMOKE, "--no-save", "--methods", "double_backward_reuse,vmap_jvp_grad"]
    assert hvp.main(argv) == 1
    out = capsys.readouterr().out
    assert "double_backward_reuse (hessian) b=1: FAILED" in out
    lines = out.splitlines()
    header = max(i for i, line in enumerate(lines) if line.split()[:3] == ["model", "b", "method"])
    timed = lines[header + 2 :]  # the final table
    assert not any("double_backward_reuse" in line for line in timed)
    assert any("vmap_jvp_grad" in line for line in timed)


def test_hvp_script_skips_block_sizes_past_the_call_limit(capsys):
    argv = [*_SMOKE, "--no-save", "--methods", "jvp_grad", "--max-call-s", "0"]
    assert hvp.main(argv) == 0
    out = capsys.readouterr().out
    assert "mlp_lenet jvp_grad (hessian) b=2: skipped -- " in out


# --------------------------------------------------------------------------------------
# eig.py: the interleaved head-to-head


def test_eig_head_to_head_interleaves_and_takes_per_round_ratios(monkeypatch):
    """Ours and the fastest right peer alternate (order flipped each round), and the recorded
    ratio is the median of per-round peer / ours times; a slower or not-right peer is not
    the one compared."""
    from benchmarks import eig

    calls = []
    # Each method's time doubles every round: block timing would see a drifting machine,
    # per-round ratios do not.
    clock = {"round": 0}

    def runner(name, seconds):
        def run(problem, k, setting, counter):
            calls.append((name, setting))
            time.sleep(seconds * (1 + 0.5 * clock["round"]) / 200)
            if name == "peer_fast":
                clock["round"] += 1

        return run

    monkeypatch.setattr(
        eig,
        "RUNNERS",
        {
            "ours": runner("ours", 1.0),
            "peer_fast": runner("peer_fast", 3.0),
            "peer_slow": runner("peer_slow", 9.0),
        },
    )
    problem = type("P", (), {"name": "m"})()
    report = eig.Report()
    common = {"model": "m", "k": 4, "status": "ok", "setting": "default", "hvps": 9}
    common.update(res=1e-5, err=1e-7)
    report.rows = [
        {
            **common,
            "method": method,
            "time_s": time_s,
            "right": right,
            "reaches": True,
            "_entry": ("default", {"knob": method}, 0.0),
        }  # as run_model records each run
        for method, time_s, right in (
            ("ours", 0.005, True),
            ("peer_fast", 0.015, True),
            ("peer_wrong", 0.001, False),
            ("peer_slow", 0.045, True),
        )
    ]
    settings = eig.dataclasses.replace(eig.FULL, h2h_rounds=4)
    eig.head_to_head(problem, 4, report, settings, lambda: None)
    order = [name for name, _ in calls]
    assert order == ["ours", "peer_fast", "peer_fast", "ours"] * 2
    assert all(setting == {"knob": "peer_fast"} for name, setting in calls if name != "ours")
    ours = report.rows[0]
    assert ours["h2h_rounds"] == 4 and ours["h2h_peer"] == "peer_fast (default)"
    assert 2.0 < ours["h2h_ratio_min"] <= ours["h2h_ratio"] <= ours["h2h_ratio_max"] < 4.5
    # The per-method medians are recorded too (the peer's sleeps are ~3x ours').
    assert 2.0 < ours["h2h_peer_s"] / ours["h2h_ours_s"] < 4.5
    assert any(
        "Interleaved head-to-head (4 rounds" in line and "median times ours" in line
        for line in eig.target_lines(report)
    )
    # No right peer: nothing to compare.
    report.rows = [r for r in report.rows if r["method"] in ("ours", "peer_wrong")]
    del report.rows[0]["h2h_ratio"]
    eig.head_to_head(problem, 4, report, settings, lambda: None)
    assert "h2h_ratio" not in report.rows[0]


def test_eig_figure_plots_every_scored_run_once(tmp_path):
    """One panel per (model, k); each scored run is one point at (time, residual), filled
    when right and hollow when wrong; failed runs and runs without a finite residual are
    left out; the PNG is written and the summary links it."""
    from matplotlib.colors import to_rgba
    from matplotlib.ticker import NullFormatter

    from benchmarks import eig

    base = {"status": "ok", "setting": "default", "hvps": 10, "err": 1e-7}
    rows = [
        {**base, "model": "a", "k": 4, "method": "ours", "time_s": 0.5, "res": 8e-5, "right": True},
        {**base, "model": "a", "k": 4, "method": "peer", "time_s": 2.0, "res": 5e-5, "right": True},
        {
            **base,
            "model": "a",
            "k": 4,
            "method": "peer",
            "time_s": 1.0,
            "res": 3e-3,
            "right": False,
        },
        {**base, "model": "a", "k": 4, "method": "other", "time_s": 4.0, "res": float("nan")},
        {"model": "a", "k": 4, "method": "other", "setting": "x", "status": "failed"},
        {**base, "model": "b", "k": 8, "method": "ours", "time_s": 3.0, "res": 9e-5, "right": True},
    ]
    rows[0].update(h2h_ratio=4.0, h2h_peer="peer (default)")
    fig = eig.eig_figure(rows)
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title().splitlines()[0] for ax in panels] == ["a, k = 4", "b, k = 8"]
    # Minor ticks unlabelled: within a decade their labels overlapped (the stop-18 figure).
    assert all(isinstance(ax.xaxis.get_minor_formatter(), NullFormatter) for ax in panels)
    assert "ours 4.00x faster than peer (default)" in panels[0].get_title()
    points = {}
    for ax in panels:
        for collection in ax.collections:
            hollow = (
                to_rgba(collection.get_facecolor()[0])[3] == 0
                if len(collection.get_facecolor())
                else True
            )
            for x, y in collection.get_offsets():
                key = (ax.get_title().splitlines()[0], float(x), float(y))
                assert key not in points
                points[key] = hollow
    assert points == {
        ("a, k = 4", 0.5, 8e-5): False,
        ("a, k = 4", 2.0, 5e-5): False,
        ("a, k = 4", 1.0, 3e-3): True,
        ("b, k = 8", 3.0, 9e-5): False,
    }
    import matplotlib.pyplot as plt

    plt.close(fig)
    path = eig.save_eig_figure(rows, tmp_path / "eig.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert eig.eig_figure([rows[4]]) is None
    report = eig.Report()
    report.rows = rows
    metadata = {
        "command": "eig.py",
        "device": "cpu",
        "threads": 1,
        "load": 0.0,
        "timestamp": "t",
        "commit": "c",
        "torch": "x",
        "python": "y",
    }
    text = eig.markdown_summary(report, metadata, eig.QUICK, "data", "eig.png")
    assert "![time against residual, per model and k](eig.png)" in text


def test_eig_figure_is_skipped_without_matplotlib(tmp_path, monkeypatch, capsys):
    from benchmarks import eig

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    row = {"model": "a", "k": 1, "method": "ours", "status": "ok", "time_s": 1.0, "res": 1e-5}
    assert eig.save_eig_figure([row], tmp_path / "eig.png") is None
    assert not (tmp_path / "eig.png").exists()
    assert "matplotlib is not installed" in capsys.readouterr().out


def _grid_rows(eig, method, k, reach, time_of, settings):
    """Report rows for ``settings`` (entries of eig.settings_for) as run_model scores them,
    with ``reach(kwargs)`` deciding whether a run reached ours' residual."""
    rows = []
    for entry in settings:
        label, kwargs, _ = entry
        rows.append(
            {
                "model": "m",
                "k": k,
                "method": method,
                "setting": label,
                "_entry": entry,
                "status": "ok",
                "reaches": reach(kwargs),
                "right": True,
                "time_s": time_of(kwargs),
            }
        )
    return rows


def test_eig_refinement_bisects_a_peer_knob_between_grid_points():
    """The first grid point that reaches ours' residual can cost a third more than the peer
    needs (hessian-eigenthings at k = 32: 140 misses, 204 reaches): the knob is bisected
    between them, each run a scored row, and the fastest right peer is the refined one."""
    from benchmarks import eig

    k = 32
    grid = {entry[0]: entry for entry in eig.settings_for("eigenthings_lanczos", k)}
    assert "max_iter 140, reorth" in grid and "max_iter 204, reorth" in grid

    def size(kwargs):
        return kwargs.get("max_iter", 2 * k)

    report = eig.Report()
    report.rows = _grid_rows(
        eig,
        "eigenthings_lanczos",
        k,
        lambda kw: size(kw) >= 171,
        lambda kw: 0.04 * size(kw),
        [
            grid[f"default (max_iter {2 * k})"],
            grid["max_iter 140, reorth"],
            grid["max_iter 204, reorth"],
        ],
    )
    tried = []

    def run_setting(method, entry, target):
        tried.append(entry[1]["max_iter"])
        row = _grid_rows(
            eig, method, k, lambda kw: size(kw) >= 171, lambda kw: 0.04 * size(kw), [entry]
        )[0]
        report.rows.append(row)
        return row

    settings = eig.dataclasses.replace(eig.FULL, max_refine=4)
    eig.refine_setting("eigenthings_lanczos", k, "m", report, settings, run_setting, 1e-4)
    assert tried == [172, 156, 164, 168]
    peer = eig.fastest_right_peer(report.rows)
    assert peer["setting"] == "max_iter 172, reorth"
    assert peer["_entry"][1] == {"max_iter": 172, "reorthogonalize": True}
    # No refinement when off, or when nothing reached.
    tried.clear()
    eig.refine_setting(
        "eigenthings_lanczos",
        k,
        "m",
        report,
        eig.dataclasses.replace(settings, max_refine=0),
        run_setting,
        1e-4,
    )
    report_miss = eig.Report()
    report_miss.rows = [r for r in report.rows if not r["reaches"]]
    eig.refine_setting("eigenthings_lanczos", k, "m", report_miss, settings, run_setting, 1e-4)
    assert tried == []


def test_eig_refinement_of_a_tolerance_is_geometric():
    from benchmarks import eig

    grid = {entry[0]: entry for entry in eig.settings_for("scipy_eigsh_func", 32)}
    report = eig.Report()

    def reach(kwargs):
        return kwargs["tol"] <= 0.005

    report.rows = _grid_rows(
        eig,
        "scipy_eigsh_func",
        32,
        reach,
        lambda kw: 1.0 / kw["tol"],
        [grid["tol 0.1"], grid["tol 0.01"], grid["tol 0.001"]],
    )
    tried = []

    def run_setting(method, entry, target):
        tried.append(entry[1]["tol"])
        row = _grid_rows(eig, method, 32, reach, lambda kw: 1.0 / kw["tol"], [entry])[0]
        report.rows.append(row)
        return row

    eig.refine_setting("scipy_eigsh_func", 32, "m", report, eig.FULL, run_setting, 1e-4)
    # sqrt(0.01 * 0.001), then between 0.01 and 0.0032, then between 0.0057 and 0.0032;
    # 0.0057 / 0.0043 < 1.5 ends it.
    assert tried == [0.0032, 0.0057, 0.0043]
    assert eig.fastest_right_peer(report.rows)["setting"] == "tol 0.0043"
    # The default (tol 0) has no tolerance to bisect from.
    assert eig.between("scipy_eigsh_func", grid["tol 1e-05"], ("default (tol 0)", {}, 9)) is None
    assert eig.between("pyhessian", grid["tol 0.1"], grid["tol 0.01"]) is None


def test_eig_head_to_head_runs_a_refined_peer_setting(monkeypatch):
    from benchmarks import eig

    calls = []
    monkeypatch.setattr(
        eig,
        "RUNNERS",
        {
            "ours": lambda problem, k, setting, counter: calls.append(("ours", setting)),
            "eigenthings_lanczos": lambda problem, k, setting, counter: calls.append(
                ("peer", setting)
            ),
        },
    )
    refined = ("max_iter 172, reorth", {"max_iter": 172, "reorthogonalize": True}, 172.0)
    common = {"model": "m", "k": 32, "status": "ok", "right": True, "reaches": True}
    report = eig.Report()
    report.rows = [
        {**common, "method": "ours", "setting": "default", "time_s": 0.001},
        {
            **common,
            "method": "eigenthings_lanczos",
            "setting": refined[0],
            "time_s": 0.002,
            "_entry": refined,
        },
    ]
    problem = type("P", (), {"name": "m"})()
    settings = eig.dataclasses.replace(eig.FULL, h2h_rounds=2)
    eig.head_to_head(problem, 32, report, settings, lambda: None)
    assert ("peer", refined[1]) in calls
    assert report.rows[0]["h2h_peer"] == "eigenthings_lanczos (max_iter 172, reorth)"


@pytest.mark.parametrize("flag", ["--h2h-rounds", "--max-refine"])
def test_eig_rejects_a_negative_round_count(flag, capsys):
    from benchmarks import eig

    with pytest.raises(SystemExit):
        eig.parse_args(["--quick", flag, "-1"])
    assert f"{flag} must be >= 0, got -1" in capsys.readouterr().err
    assert getattr(eig.parse_args(["--quick", flag, "0"]), flag[2:].replace("-", "_")) == 0


def test_eig_reference_values_beyond_the_reference_are_empty_cells():
    from benchmarks import eig

    reference = torch.arange(9, 0, -1, dtype=torch.float64)  # k_ref = 9: a --ks 1 run
    assert eig.reference_value(reference, 1) == 9.0
    assert eig.reference_value(reference, 9) == 1.0
    assert eig.reference_value(reference, 10) is None  # was the 9th value, printed as lambda_10
    row = {"lambda_10": eig.reference_value(reference, 10), "lambda_1": 9.0}
    text = harness.markdown_table([row], [("lambda_1", "l1"), ("lambda_10", "l10")])
    assert text.splitlines()[-1].replace(" ", "") == "|9.00||"
