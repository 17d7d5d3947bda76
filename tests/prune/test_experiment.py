"""The experiment runner and the report: specs, one run per method, IMP trajectories against
:func:`imc_prune.baselines.imp`, the resumable comparison, tables and plots.

Runs use scikit-learn digits (1437 training samples, 8x8) and LeNet-300-100 (50,890 weights
to prune) with one epoch of the LTH Adam schedule (24 steps): seconds per run, and accuracy
far above chance (10 %) for every method at 30 % of the weights.
"""

import json
import math
import sys

import pytest
import torch

from imc_prune import baselines, experiment, report
from imc_prune.experiment import ImpCache, RunRecord, RunSpec, compare, run_one
from imc_prune.models import build_model

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TRAIN = {"epochs": 1}
# A small spectrum: enough to exercise every IMC step in about a second on digits.
SMALL_IMC = {"hessian_batch_size": 256, "k": 4, "n_probes": 2, "steps": 16, "n_directions": 1}
N_PRUNABLE = 64 * 300 + 300 * 100 + 100 * 10
# Chance is 10 %; one epoch at 30 % of the weights reaches 75-95 % on digits.
ABOVE_CHANCE = 0.5


def _spec(method, remaining=0.3, seed=0, **kw):
    kw.setdefault("train", TRAIN)
    if method.startswith("imc"):
        kw.setdefault("imc", SMALL_IMC)
    return RunSpec("digits", "lenet300100", method, remaining, seed, **kw)


# --------------------------------------------------------------------------------------------
# RunSpec


def test_spec_spellings_share_a_key():
    a = RunSpec("digits", "LeNet-300-100", "imc-leverage", 0.1)
    b = RunSpec("Digits", "lenet300100", "IMC", 0.1, imc={"score": "leverage"})
    assert a.key == b.key and a.label == b.label == "imc-leverage"
    assert a.method == "imc" and a.imc == {"score": "leverage"}
    assert RunSpec("digits", "lenet300100", "imc", 0.1).label == "imc-magnitude"
    assert RunSpec.from_dict(a.to_dict()).key == a.key


def test_spec_key_changes_with_every_field():
    base = _spec("random")
    keys = {
        base.key,
        _spec("random", seed=1).key,
        _spec("random", remaining=0.2).key,
        _spec("snip").key,
        _spec("random", train={"epochs": 2}).key,
        _spec("random", baseline={"scope": "layerwise"}).key,
        _spec("random", train_subset=100).key,
    }
    assert len(keys) == 7


def test_spec_key_includes_the_mask_structure():
    block = {"granularity": "block", "block_size": 2}
    keys = {
        _spec("random").key,
        _spec("random", baseline=block).key,
        _spec("random", baseline={**block, "block_size": 4}).key,
        _spec("random", 0.5).key,
        _spec("random", 0.5, baseline={"granularity": "2:4"}).key,
        _spec("imc").key,
        _spec("imc", imc={**SMALL_IMC, **block}).key,
    }
    assert len(keys) == 7
    # The default spelled out is the same run (and the key of runs from before the setting).
    spelled = _spec("random", baseline={"granularity": "element", "block_size": None})
    assert spelled.key == _spec("random").key and spelled.baseline == {}
    # IMC reads its structure from imc=, the other methods from baseline=.
    assert _spec("imc", imc={**SMALL_IMC, **block}).granularity == "block"
    assert _spec("random", imc=block).granularity == "element"
    assert _spec("random", baseline=block).block_size == 2


def test_train_kwargs_default_to_the_model_preset():
    assert _spec("random").train_kwargs() == {"epochs": 1, "preset": "lth_lenet"}
    conv = RunSpec("digits", "conv2", "dense")
    assert conv.train_kwargs() == {"preset": "lth_conv2"}
    assert (
        RunSpec("digits", "conv2", "dense", train={"preset": None, "epochs": 3}).train_kwargs()[
            "preset"
        ]
        is None
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"method": "magnitude"}, "unknown method 'magnitude'; valid names: dense, imc"),
        ({"model": "lenet5"}, "unknown model 'lenet5'; valid names: lenet300100"),
        ({"dataset": "mnist"}, "unknown dataset 'mnist'"),
        ({"method": "random", "remaining": "auto"}, "IMC's spectral gap"),
        ({"method": "random", "remaining": 0.0}, r"in \(0, 1\]"),
        ({"method": "random", "remaining": 1.5}, r"in \(0, 1\]"),
        ({"method": "random", "remaining": True}, r"in \(0, 1\]"),
        ({"method": "dense", "remaining": 0.5}, "dense.*remaining must be 1"),
        ({"method": "imc-leverage", "imc": {"score": "curvature"}}, "contradicts"),
        ({"method": "imc", "imc": {"score": "hessian"}}, "score must be one of"),
        ({"method": "imc", "imc": {"sparsity": 0.5}}, "comes from the spec"),
        ({"method": "random", "train": {"seed": 3}}, "not part of a spec"),
        ({"method": "random", "baseline": {"rate": 0.2}}, "unknown baseline settings"),
        ({"method": "random", "train_subset": 0}, "train_subset must be a positive int"),
        ({"baseline": {"granularity": "tile"}}, "granularity must be one of"),
        ({"imc": {"granularity": "block"}}, "needs a block_size"),
        ({"baseline": {"granularity": "block", "block_size": 0}}, "at least 1, got 0"),
        ({"baseline": {"block_size": 2}}, "only used with granularity='block'"),
        ({"baseline": {"granularity": "2:4"}}, "remaining must be 0.5, got 0.3"),
        (
            {"method": "imc", "remaining": "auto", "imc": {"granularity": "2:4"}},
            "remaining must be 0.5, not 'auto'",
        ),
        (
            {"method": "imp", "remaining": 0.5, "baseline": {"granularity": "2:4"}},
            "method 'imp' cannot prune to granularity '2:4'",
        ),
    ],
)
def test_spec_rejects_bad_input(kwargs, match):
    fields = {"dataset": "digits", "model": "lenet300100", "method": "random", "remaining": 0.3}
    fields.update(kwargs)
    with pytest.raises(ValueError, match=match):
        RunSpec(**fields)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        # Each was accepted and failed (or not) only when run_one reached it.
        ({"train": {"epoch": 1}}, ValueError, r"unknown train settings \['epoch'\]; train\(\)"),
        ({"train": {"lr": -1.0}}, ValueError, "train settings: lr must be finite and >= 0"),
        ({"train": {"lr": "x"}}, TypeError, "train settings: lr must be a real number"),
        ({"train": {"eval_batch_size": 0}}, ValueError, "eval_batch_size must be a positive int"),
        ({"imc": {"kk": 3}}, ValueError, r"unknown imc settings \['kk'\]; imc\(\) takes"),
        ({"imc": {"k": 0}}, ValueError, "imc settings: k must be a positive int, got 0"),
        ({"imc": {"k": "4"}}, TypeError, "imc settings: k must be an int"),
        ({"imc": {"c": -1.0}}, ValueError, "imc settings: c must be positive"),
        ({"imc": {"reuse": None}}, ValueError, "'reuse' comes from the spec"),
        ({"baseline": {"imp_rate": 2}}, ValueError, r"setting 'imp_rate' must lie in \(0, 1\)"),
        ({"baseline": {"scope": "foo"}}, ValueError, "baseline setting 'scope' must be one of"),
        ({"baseline": {"rewind_step": -1}}, ValueError, "baseline setting 'rewind_step'"),
        ({"baseline": {"synflow_iterations": 0}}, ValueError, "'synflow_iterations' must be"),
    ],
)  # fmt: skip
def test_spec_checks_settings_when_it_is_made(kwargs, error, match):
    method = "imc" if "imc" in kwargs else "imp"
    with pytest.raises(error, match=match):
        RunSpec("digits", "lenet300100", method, 0.3, **kwargs)


def test_spec_keys_of_valid_specs_are_unchanged():
    # Keys of runs.jsonl written before the settings were checked (computed then).
    specs = {
        "e8915ef9d73f2ce8": RunSpec(
            "digits", "lenet300100", "imc-leverage", 0.1, imc={"k": 8, "c": 2.0},
            train={"epochs": 2, "lr": 1e-3},
        ),
        "55566274ffc0f3ec": RunSpec(
            "digits", "lenet300100", "imp", 0.2, seed=3,
            baseline={"imp_rate": 0.3, "scope": "layerwise"},
            train={"steps": 50, "eval_batch_size": 500},
        ),
        "ef187409e1d14b62": RunSpec(
            "fashion-mnist", "conv2", "snip", 0.05,
            baseline={"granularity": "block", "block_size": 2},
        ),
    }  # fmt: skip
    assert {spec.key: key for key, spec in specs.items()} == {key: key for key in specs}


def test_spec_rejects_non_int_seed():
    with pytest.raises(TypeError, match="seed must be an int"):
        RunSpec("digits", "lenet300100", "random", 0.3, seed=1.5)


# --------------------------------------------------------------------------------------------
# run_one


# 0.3 is a round count (15,267 of 50,890); 0.137 is not (6,971.93 rounds to 6,972).
@pytest.mark.parametrize(
    "method, remaining",
    [
        (method, remaining)
        for method in ("random", "snip", "grasp", "synflow", "magnitude-warmup", "imc-curvature")
        for remaining in (0.3, 0.137)
        # One target is enough for the slower scores.
        if method not in ("grasp", "synflow") or remaining == 0.3
    ],
)
def test_run_one_masks_at_the_requested_weights_remaining(cache, method, remaining):
    record = run_one(_spec(method, remaining), data_cache=cache, device="cpu")
    kept = round(remaining * N_PRUNABLE)
    assert sum(layer["kept"] for layer in record.layers.values()) == kept
    assert record.weights_remaining == pytest.approx(kept / N_PRUNABLE, abs=0)
    assert sum(int(m.sum()) for m in record.masks.values()) == kept
    # The trained network keeps its pruned weights at exactly zero.
    params = dict(record.network.named_parameters())
    for name, mask in record.masks.items():
        assert torch.count_nonzero(params[name].detach().cpu()[~mask]) == 0
    assert record.final_acc > ABOVE_CHANCE and record.mean_last3_acc > ABOVE_CHANCE
    assert record.label == method and record.target == remaining
    assert record.phases[-1]["name"] == "train" and record.phases[-1]["sgd_steps"] == 24
    assert record.compute["sgd_steps"] == sum(p["sgd_steps"] for p in record.phases)
    assert record.compute["total"] == pytest.approx(sum(p["grad_equiv"] for p in record.phases))
    json.dumps(record.to_dict())  # JSON-ready


def test_run_one_imc_records_the_decision(cache):
    record = run_one(_spec("imc", "auto"), data_cache=cache, device="cpu")
    info = record.imc
    assert record.target == "auto" and record.label == "imc-magnitude"
    assert record.weights_remaining == pytest.approx(info["auto_remaining"], abs=1 / N_PRUNABLE)
    assert info["gap"]["n"] <= info["gap"]["dim"] and info["lipschitz"] > 0
    # Spectral work: HVPs x 2 x Hessian batch (256) / training batch (60).
    spectral = next(p for p in record.phases if p["name"] == "imc-spectral")
    assert spectral["hvps"] == info["n_hvps"] == record.compute["spectral_hvps"]
    assert spectral["grad_equiv"] == pytest.approx(info["n_hvps"] * 2 * 256 / 60)
    warm = next(p for p in record.phases if p["name"] == "imc-warmup")
    assert warm["sgd_steps"] == 10 and warm["grad_equiv"] == pytest.approx(10 * 128 / 60)
    assert len(info["spectrum"]["nodes"]) == 2  # the probes, for the plot


def test_imc_runs_of_a_seed_share_one_analysis(cache):
    from imc_prune.experiment import ImcCache

    imc_cache = ImcCache()
    first = run_one(_spec("imc-leverage", 0.3), data_cache=cache, imc_cache=imc_cache)
    second = run_one(_spec("imc-curvature", 0.2), data_cache=cache, imc_cache=imc_cache)
    alone = run_one(_spec("imc-curvature", 0.2), data_cache=cache)
    spectral = [next(p for p in r.phases if p["name"] == "imc-spectral") for r in (first, second)]
    assert [p["reused"] for p in spectral] == [False, True]
    # The reused analysis is still the method's cost, and the masks are those of a fresh run.
    assert second.compute == alone.compute and second.imc["gap"] == alone.imc["gap"]
    for name, mask in alone.masks.items():
        assert torch.equal(second.masks[name], mask)
    other_seed = run_one(_spec("imc-curvature", 0.2, seed=1), data_cache=cache, imc_cache=imc_cache)
    assert not next(p for p in other_seed.phases if p["name"] == "imc-spectral")["reused"]


def test_magnitude_warmup_equals_imc_magnitude_masks(cache):
    """Same warm-up, same |W*| score: the masks of IMC at a fixed sparsity."""
    from imc_prune.imc import imc

    record = run_one(_spec("magnitude-warmup", 0.2), data_cache=cache, device="cpu")
    splits = cache.get("digits")
    model = build_model("lenet300100", input_shape=splits.input_shape, seed=0)
    reference = imc(model, splits, sparsity=0.8, seed=0, **SMALL_IMC)
    assert record.masks.keys() == reference.masks.keys()
    for name, mask in reference.masks.items():
        assert torch.equal(record.masks[name], mask)


def test_run_one_is_deterministic(cache):
    first = run_one(_spec("snip", 0.1, seed=3), data_cache=cache, device="cpu")
    second = run_one(_spec("snip", 0.1, seed=3), data_cache=cache, device="cpu")
    assert first.history == second.history
    for name in first.masks:
        assert torch.equal(first.masks[name], second.masks[name])
    other = run_one(_spec("snip", 0.1, seed=4), data_cache=cache, device="cpu")
    assert other.history != first.history


def test_oneshot_block_prunes_whole_tiles(cache):
    spec = _spec("oneshot", 0.3, baseline={"granularity": "block", "block_size": 2})
    record = run_one(spec, data_cache=cache, device="cpu")
    for name, mask in record.masks.items():
        tiles = mask.reshape(mask.shape[0] // 2, 2, mask.shape[1] // 2, 2)
        assert torch.equal(tiles.all(dim=(1, 3)), tiles.any(dim=(1, 3))), name
    kept = sum(int(m.sum()) for m in record.masks.values())
    assert kept == 4 * round(0.3 * N_PRUNABLE / 4)
    assert record.granularity == "block" and record.block_size == 2
    saved = RunRecord.from_dict(json.loads(json.dumps(record.to_dict())))
    assert saved.granularity == "block" and saved.block_size == 2


def test_structure_that_does_not_fit_fails_before_training(cache, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("the structure must be checked before training")

    monkeypatch.setattr(experiment, "train", no_training)
    # LeNet-300-100 on digits ends in a (10, 100) layer: tiles of 4 do not fit.
    spec = _spec("oneshot", 0.3, baseline={"granularity": "block", "block_size": 4})
    with pytest.raises(ValueError, match=r"'5.weight' has shape \(10, 100\)"):
        run_one(spec, data_cache=cache, device="cpu")


def test_run_one_rejects_non_spec():
    with pytest.raises(TypeError, match="RunSpec"):
        run_one({"method": "dense"})


# --------------------------------------------------------------------------------------------
# IMP, one-shot and dense share one trajectory


@pytest.fixture(scope="module")
def imp_runs(cache):
    """IMP at two targets, one-shot and dense of one seed through one cache, counting the
    training runs."""
    calls = []
    original = experiment.train

    def counting_train(*args, **kwargs):
        calls.append(kwargs.get("seed"))
        return original(*args, **kwargs)

    experiment.train = counting_train
    try:
        imp_cache = ImpCache()
        runs = {}
        sizes = []
        for method, remaining in [("imp", 0.5), ("imp", 0.37), ("oneshot", 0.37), ("dense", 1.0)]:
            runs[(method, remaining)] = run_one(
                _spec(method, remaining), data_cache=cache, imp_cache=imp_cache, device="cpu"
            )
            sizes.append(len(calls))
    finally:
        experiment.train = original
    return runs, sizes


def test_imp_masks_equal_baselines_imp(cache, imp_runs):
    """The trajectory lands on each target as imc_prune.baselines.imp does."""
    runs, _ = imp_runs
    splits = cache.get("digits")
    for remaining in (0.5, 0.37):
        model = build_model("lenet300100", input_shape=splits.input_shape, seed=0)
        masks, info = baselines.imp(
            model,
            splits,
            1 - remaining,
            train_kwargs={"preset": "lth_lenet", "epochs": 1, "seed": 0},
        )
        record = runs[("imp", remaining)]
        for name, mask in masks.items():
            assert torch.equal(record.masks[name], mask)
        # Rounds before the final training: the same sparsities and accuracies.
        assert [r["final_acc"] for r in record.imp[:-1]] == info.accuracies
        assert record.compute["sgd_steps"] == info.sgd_steps + 24


def test_imp_block_trajectory_equals_baselines_imp(cache):
    """With tiles, the trajectory counts its rounds in tiles, as imc_prune.baselines.imp."""
    block = {"granularity": "block", "block_size": 2}
    record = run_one(_spec("imp", 0.4, baseline=block), data_cache=cache, device="cpu")
    splits = cache.get("digits")
    model = build_model("lenet300100", input_shape=splits.input_shape, seed=0)
    masks, info = baselines.imp(
        model, splits, 0.6, train_kwargs={"preset": "lth_lenet", "epochs": 1, "seed": 0}, **block
    )
    assert all(torch.equal(record.masks[name], mask) for name, mask in masks.items())
    assert [r["final_acc"] for r in record.imp[:-1]] == info.accuracies
    kept = sum(int(m.sum()) for m in record.masks.values())
    assert kept == 4 * round(0.4 * N_PRUNABLE / 4)


def test_imp_rounds_are_shared_across_targets(imp_runs):
    runs, sizes = imp_runs
    half, third = runs[("imp", 0.5)], runs[("imp", 0.37)]
    # 0.5: rounds 0-3 (1, 0.8, 0.64, 0.512) then 0.5: five trainings.
    assert [round(r["weights_remaining"], 3) for r in half.imp] == [1.0, 0.8, 0.64, 0.512, 0.5]
    assert sizes[0] == 5
    # 0.37: rounds 0-4 (round 4 = 0.41) then 0.37; only round 4 and the last are new.
    assert [round(r["weights_remaining"], 3) for r in third.imp] == [
        1,
        0.8,
        0.64,
        0.512,
        0.41,
        0.37,
    ]
    assert sizes[1] - sizes[0] == 2
    assert [p["reused"] for p in third.phases] == [True] * 4 + [False, False]
    assert third.compute["sgd_steps"] == 6 * 24
    # One-shot reuses the dense round; dense reuses it again.
    assert sizes[2] - sizes[1] == 1 and sizes[3] == sizes[2]
    dense = runs[("dense", 1.0)]
    assert dense.weights_remaining == 1.0 and dense.final_acc == half.imp[0]["final_acc"]
    oneshot = runs[("oneshot", 0.37)]
    assert [p["name"] for p in oneshot.phases] == ["pretrain", "train"]
    assert oneshot.compute["sgd_steps"] == 48
    assert oneshot.final_acc > ABOVE_CHANCE and third.final_acc > ABOVE_CHANCE


def test_oneshot_masks_equal_baselines_one_shot_magnitude(cache, imp_runs):
    runs, _ = imp_runs
    splits = cache.get("digits")
    model = build_model("lenet300100", input_shape=splits.input_shape, seed=0)
    masks, _ = baselines.one_shot_magnitude(
        model, splits, 0.63, train_kwargs={"preset": "lth_lenet", "epochs": 1, "seed": 0}
    )
    for name, mask in masks.items():
        assert torch.equal(runs[("oneshot", 0.37)].masks[name], mask)


def test_imp_rounds_persist_on_disk(cache, tmp_path, monkeypatch):
    spec = _spec("imp", 0.7)
    first = run_one(spec, data_cache=cache, imp_cache=ImpCache(tmp_path), device="cpu")
    assert len(list(tmp_path.rglob("*.pt"))) == 3  # dense, 0.8, 0.7

    def no_training(*args, **kwargs):
        raise AssertionError("a saved round was trained again")

    monkeypatch.setattr(experiment, "train", no_training)
    again = run_one(spec, data_cache=cache, imp_cache=ImpCache(tmp_path), device="cpu")
    assert again.final_acc == first.final_acc and all(p["reused"] for p in again.phases)


# --------------------------------------------------------------------------------------------
# compare: resumable


def test_compare_resumes_after_a_kill(cache, tmp_path, monkeypatch):
    specs = [_spec("random", 0.3), _spec("snip", 0.3), _spec("random", 0.3)]  # a duplicate
    calls = []
    original = experiment.run_one

    def counting_run_one(spec, **kwargs):
        calls.append(spec.key)
        return original(spec, **kwargs)

    monkeypatch.setattr(experiment, "run_one", counting_run_one)

    class Killed(Exception):
        pass

    def kill(record):
        raise Killed(record.key)

    with pytest.raises(Killed):
        compare(specs, tmp_path, data_cache=cache, device="cpu", on_record=kill)
    lines = (tmp_path / "runs.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["key"] == specs[0].key
    assert calls == [specs[0].key]

    # A kill in the middle of a write leaves a torn line; the restart drops it.
    with (tmp_path / "runs.jsonl").open("a") as handle:
        handle.write('{"key": "torn", "final_a')
    result = compare(specs, tmp_path, data_cache=cache, device="cpu")
    assert calls == [specs[0].key, specs[1].key]  # the first run was not repeated
    assert result.ran == [specs[1].key]
    assert [r.key for r in result.records] == [specs[0].key, specs[1].key]
    lines = (tmp_path / "runs.jsonl").read_text().splitlines()
    assert [json.loads(line)["key"] for line in lines] == [specs[0].key, specs[1].key]

    saved = json.loads((tmp_path / "results.json").read_text())
    assert {r["key"] for r in saved["records"]} == {specs[0].key, specs[1].key}
    assert {row["method"] for row in saved["rows"]} == {"random", "snip"}
    markdown = (tmp_path / "results.md").read_text()
    assert "| random |" in markdown and "| snip |" in markdown
    png = result.files["accuracy_digits_lenet300100"]
    assert png.read_bytes()[:8] == PNG_MAGIC

    # Nothing left to do: a third call runs nothing and writes the same results.
    calls.clear()
    again = compare(specs, tmp_path, data_cache=cache, device="cpu")
    assert calls == [] and again.ran == []
    assert [r.final_acc for r in again.records] == [r.final_acc for r in result.records]

    # resume=False starts over, keeping the old file aside.
    fresh = compare(specs[:1], tmp_path, data_cache=cache, device="cpu", resume=False)
    assert fresh.ran == [specs[0].key] and (tmp_path / "runs.jsonl.bak").exists()


def test_compare_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="at least one"):
        compare([], tmp_path)
    with pytest.raises(TypeError, match="RunSpec"):
        compare([{"method": "dense"}], tmp_path)


def test_grid_specs():
    specs = experiment.grid_specs(
        "digits", ["lenet300100"], ["imc-leverage", "random"], [0.1, "auto"], [0, 1]
    )
    # Per seed: dense, imc-leverage at 0.1 and auto, random at 0.1 (auto is IMC only).
    assert [(s.label, s.target, s.seed) for s in specs[:4]] == [
        ("dense", 1.0, 0),
        ("imc-leverage", 0.1, 0),
        ("imc-leverage", "auto", 0),
        ("random", 0.1, 0),
    ]
    assert len(specs) == 8


# --------------------------------------------------------------------------------------------
# report


def _record(method, target, seed, acc, remaining=None, total=100.0):
    return {
        "dataset": "digits",
        "model": "lenet300100",
        "label": method,
        "target": target,
        "seed": seed,
        "weights_remaining": remaining
        if remaining is not None
        else (1.0 if target == "auto" else target),
        "final_acc": acc,
        "mean_last3_acc": acc - 0.01,
        "compute": {"total": total, "sgd_steps": 24},
        "wall_s": 2.0,
    }


def test_aggregate_mean_and_sample_std():
    records = [
        _record("random", 0.1, 0, 0.80),
        _record("random", 0.1, 1, 0.90),
        _record("random", 0.1, 2, 0.85),
        _record("dense", 1.0, 0, 0.95),
        _record("imc-magnitude", "auto", 0, 0.91, remaining=0.031),
    ]
    rows = report.aggregate(records)
    assert [(r["method"], r["target"]) for r in rows] == [
        ("dense", 1.0),
        ("imc-magnitude", "auto"),
        ("random", 0.1),
    ]
    random_row = rows[2]
    assert random_row["final_acc"][0] == pytest.approx(0.85)
    assert random_row["final_acc"][1] == pytest.approx(0.05)  # sample std of .80 .90 .85
    assert random_row["seeds"] == [0, 1, 2] and rows[0]["final_acc"][1] == 0.0
    text = report.results_markdown(rows, title="t")
    assert "| random | 85.00 ± 5.00 |  |" in text  # no auto target for random
    assert "| imc-magnitude |  | 91.00 ± 0.00 |" in text
    assert "| imc-magnitude | auto | 3.100 ± 0.000 |" in text  # measured weights remaining


def test_aggregate_keeps_mask_structures_apart():
    element = _record("snip", 0.1, 0, 0.80)
    block = {**_record("snip", 0.1, 0, 0.70), "granularity": "block", "block_size": 2}
    two_four = {**_record("snip", 0.5, 0, 0.75), "granularity": "2:4"}
    dense = {**_record("dense", 1.0, 0, 0.95), "granularity": "block", "block_size": 2}
    rows = report.aggregate([two_four, block, element, dense, _record("random", 0.1, 0, 0.5)])
    assert [(r["method"], r["target"]) for r in rows] == [
        ("dense", 1.0),
        ("random", 0.1),
        ("snip", 0.1),
        ("snip (2:4)", 0.5),
        ("snip (block 2)", 0.1),
    ]
    assert rows[4]["final_acc"][0] == pytest.approx(0.70)


def test_markdown_table_aligns_numbers():
    text = report.markdown_table(["method", "acc"], [["snip", "91.2 ± 0.1"], ["imp", "n/a"]])
    assert text.splitlines() == [
        "| method | acc |",
        "|:--|--:|",
        "| snip | 91.2 ± 0.1 |",
        "| imp | n/a |",
    ]


def test_plots_write_png(tmp_path):
    rows = report.aggregate(
        [
            _record("random", 0.1, 0, 0.80),
            _record("random", 0.02, 0, 0.60),
            _record("dense", 1.0, 0, 0.95),
            _record("imc-magnitude", "auto", 0, 0.91, remaining=0.031),
        ]
    )
    path = report.plot_accuracy(rows, tmp_path / "sub" / "acc.png", metric="last3_acc")
    assert path.read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(ValueError, match="metric"):
        report.plot_accuracy(rows, tmp_path / "x.png", metric="acc")
    with pytest.raises(ValueError, match="no results"):
        report.plot_accuracy([], tmp_path / "x.png")

    # A spectrum with a bulk near 0 and two outliers, a gap between them, and none.
    nodes = [[-0.1, 0.0, 0.05, 0.2], [-0.05, 0.01, 0.1, 0.3]]
    weights = [[0.25] * 4, [0.25] * 4]
    gap = {
        "n": 98, "lower": 0.3, "upper": 5.0, "width": 4.7, "threshold": 0.4, "c": 4.0,
        "n_nonpositive": 40, "dim": 100, "prune_rate": 0.02, "source": "bulk-edge",
        "resolution": 1e-3,
    }  # fmt: skip
    data = {
        "nodes": nodes,
        "weights": weights,
        "sigma": 0.01,
        "dim": 100,
        "top_eigenvalues": [9.0, 5.0],
        "gap": gap,
        "lipschitz": 0.1,
        "n_hvps": 50,
    }
    grid, density, cdf = report.spectrum_curve(data)
    assert grid[-1] > 9.0 and cdf[-1] == pytest.approx(1.0)
    assert report.plot_spectrum(data, tmp_path / "s.png").read_bytes()[:8] == PNG_MAGIC
    none = dict(data, gap=dict(gap, source="none", upper=None, width=None, prune_rate=0.0, n=100))
    out = report.plot_spectrum(none, tmp_path / "n.png", xscale="symlog")
    assert out.read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(ValueError, match="xscale"):
        report.plot_spectrum(data, tmp_path / "x.png", xscale="log")


def test_record_round_trip():
    fields = {f: None for f in ("key", "dataset", "model", "method", "label", "target")}
    record = RunRecord(
        **fields,
        spec={},
        seed=0,
        weights_remaining=0.5,
        layers={},
        final_acc=0.9,
        mean_last3_acc=0.9,
        history=[],
        compute={},
        phases=[],
        wall_s=1.0,
        elapsed_s=1.0,
        masks={"w": torch.ones(2, dtype=torch.bool)},
    )
    data = record.to_dict()
    assert "masks" not in data and "network" not in data
    assert RunRecord.from_dict({**data, "extra": 1}).to_dict() == data
    assert math.isclose(data["final_acc"], 0.9)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_run_one_on_a_device_that_is_not_there(cache):
    with pytest.raises(ValueError, match="sees no CUDA device"):
        run_one(_spec("random"), data_cache=cache, device="cuda")
    with pytest.raises(ValueError, match="'tpu' is not a device"):
        run_one(_spec("random"), data_cache=cache, device="tpu")


def test_write_results_without_matplotlib_warns_and_writes_the_tables(tmp_path, monkeypatch):
    records = [
        RunRecord.from_dict(
            {
                **_record(m, t, 0, acc),
                "key": m,
                "method": m,
                "spec": {},
                "layers": {},
                "history": [],
                "phases": [],
                "elapsed_s": 1.0,
            }
        )
        for m, t, acc in (("dense", 1.0, 0.95), ("random", 0.1, 0.8))
    ]
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # optional: no import of it works
    with pytest.warns(UserWarning, match="no plots in .*: matplotlib is not installed"):
        files = experiment.write_results(records, tmp_path)
    assert sorted(files) == ["results_json", "results_md"]
    assert not list(tmp_path.glob("*.png"))
