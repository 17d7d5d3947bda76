"""Pruning experiments: a method registry, one run, and a resumable comparison.

A run is described by a :class:`RunSpec` (dataset, model, method, target weights remaining,
seed, training and method settings) and produces a :class:`RunRecord` (accuracy, measured
sparsity, compute, wall time, and for IMC the spectral decision). :func:`run_one` executes one
spec; :func:`compare` executes many, appending each finished record to ``runs.jsonl`` at once,
so a comparison killed midway and started again skips what is done and loses nothing, then
writes ``results.json``, ``results.md`` and the plots.

Conventions:

* **Sparsity** is given as ``remaining``, the fraction of the prunable weights (weights of
  Linear and Conv2d layers; biases and normalisation layers are never pruned) that are kept,
  in ``(0, 1]``; or ``"auto"`` for IMC, which then takes the rate from the spectral gap.
  Records report the remaining fraction measured from the masks.
* **Compute** is counted in gradient-equivalents of one training batch (``B`` samples): an
  optimizer step of a training phase counts ``batch / B`` (1 for the training runs, which use
  ``B``; IMC's warm-up and the dense pre-training of one-shot and IMP are counted the same
  way, every IMP round included), a Hessian-vector product on ``n`` samples counts
  ``2 n / B`` (one HVP costs about two gradients), and the score of SNIP, GraSP and SynFlow
  is counted from the passes their formulas need. ``sgd_steps`` also reports the plain number
  of optimizer steps over all phases.
* **Determinism**: the model's initialisation, the batch order and every random choice of a
  method derive from ``seed``.
* **Mask structure**: ``granularity`` and ``block_size`` (:func:`imc_prune.masks.
  masks_from_scores`) are settings of IMC (``imc=``) and of the other methods
  (``baseline=``), ``"element"`` by default; they are part of a run's key, so runs with
  different structures never stand in for each other, and records report them. ``"2:4"``
  needs ``remaining=0.5`` and is refused for IMP. Training stays on the masked-dense path:
  the structured layers of :mod:`imc_kernels.sparse` are not swapped in.

Methods (:data:`METHODS`):

==================  =====================================================================
``dense``           no pruning (``remaining`` must be 1)
``imc``             IMC (:func:`imc_prune.imc.imc`); the score from ``imc={"score": ...}``
``imc-<score>``     the same with the score named: ``imc-magnitude``, ``imc-leverage``,
                    ``imc-curvature``
``magnitude-warmup``  ``|W*|`` after IMC's warm-up, rewound to ``W0``: IMC without spectrum
``random``          uniformly random masks
``snip``            SNIP at initialisation (Lee et al. 2019)
``grasp``           GraSP at initialisation (Wang et al. 2020)
``synflow``         SynFlow at initialisation (Tanaka et al. 2020)
``oneshot``         one-shot magnitude after full dense training, rewound to ``W0``
``imp``             iterative magnitude pruning with rewinding (LTH): 20 % of the remaining
                    weights per round, rewind to ``W0``
==================  =====================================================================

IMP: one trajectory per seed (and settings) serves every target: rounds 0 (dense training), 1,
2, ... each prune 20 % of the surviving weights by the magnitude of the previous round's
trained weights, rewind and train. A target ``r`` takes the last round ``k`` with more than
``r`` remaining and prunes from its trained weights straight to ``r`` (when 20 % lands exactly
on ``r`` that is round ``k + 1`` itself). Rounds are cached in memory and, in :func:`compare`,
on disk, so the targets of a seed share the rounds, and a restarted comparison reuses them;
the compute of a target counts all the rounds it rests on.

Example:
    >>> spec = RunSpec("digits", "lenet300100", "imc", remaining=0.1, train={"epochs": 2})
    >>> record = run_one(spec)
    >>> round(record.weights_remaining, 3), record.final_acc > 0.8
    (0.1, True)
    >>> compare([spec, RunSpec("digits", "lenet300100", "dense")], "runs/demo")
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import hashlib
import importlib
import inspect
import json
import numbers
import os
import platform
import shutil
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Subset
from tqdm.auto import tqdm

from imc_prune import _parallel, baselines, report
from imc_prune._checks import check_positive_int, check_seed, is_int, resolve_device
from imc_prune.data import DATASET_NAMES, DatasetSplits, iterate_batches, load_dataset
from imc_prune.masks import (
    SCOPES,
    check_granularity,
    dense_masks,
    masks_from_scores,
    prunable_parameters,
    sparsity_report,
    weights_per_unit,
)
from imc_prune.models import MODEL_NAMES, build_model
from imc_prune.train import resolve_config, train

# The module (``imc_prune.imc`` is the function, see the package docstring).
imc_module = importlib.import_module("imc_prune.imc")
IMC_SCORES = imc_module.SCORES
#: Every method name :class:`RunSpec` accepts.
METHODS = (
    "dense",
    "imc",
    *(f"imc-{score}" for score in IMC_SCORES),
    "magnitude-warmup",
    "random",
    "snip",
    "grasp",
    "synflow",
    "oneshot",
    "imp",
)
#: The methods a comparison runs by default (dense is always added).
DEFAULT_COMPARE_METHODS = (
    *(f"imc-{score}" for score in IMC_SCORES),
    "magnitude-warmup",
    "random",
    "snip",
    "grasp",
    "synflow",
    "oneshot",
    "imp",
)
#: The training schedule each model uses unless the spec says otherwise
#: (:data:`imc_prune.train.PRESETS`).
DEFAULT_PRESETS = {
    "lenet300100": "lth_lenet",
    "conv2": "lth_conv2",
    "conv4": "lth_conv4",
    "conv6": "lth_conv6",
    "vgg11": "lth_vgg",
    "vgg16": "lth_vgg",
    "resnet20": "lth_resnet",
    "resnet18": "lth_resnet",
}
#: Settings of the baselines (``RunSpec.baseline``) and their defaults.
BASELINE_DEFAULTS = {
    "scope": "global",  # masks over all prunable weights together, or per layer
    "imp_rate": 0.2,  # IMP: fraction of the surviving weights pruned per round
    "rewind_step": 0,  # IMP and one-shot: rewind to W0 (0) or to this training step
    "score_batch_size": 256,  # SNIP and GraSP: samples of their gradient batch
    "synflow_iterations": 100,  # SynFlow: rounds of its iterative pruning
    "granularity": "element",  # mask structure: "element", "block" or "2:4"
    "block_size": None,  # the tile edge of granularity="block"
}
# Train settings set per run (run_one's arguments), not by a spec.
_TRAIN_PER_RUN = ("seed", "device", "progress", "callback")
#: The settings a spec's ``train`` may hold: the keyword arguments of
#: :func:`imc_prune.train.train` that are not set per run.
TRAIN_SETTINGS = tuple(
    name
    for name, parameter in inspect.signature(train).parameters.items()
    if parameter.kind is inspect.Parameter.KEYWORD_ONLY and name not in _TRAIN_PER_RUN
)
# IMC settings run_one sets itself.
_IMC_PER_RUN = ("sparsity", "seed", "progress", "reuse")
# Structure settings at their defaults are dropped from a spec, so that spelling them out or
# not gives the same run (and the keys of runs from before these settings existed).
_STRUCTURE_DEFAULTS = {"granularity": "element", "block_size": None}
# IMC's warm-up settings that magnitude-warmup shares, so both see the same W*.
_WARMUP_KEYS = {"warmup_steps": "steps", "warmup_lr": "lr", "warmup_batch_size": "batch_size"}
_IMC_WARMUP_DEFAULTS = {"warmup_steps": 10, "warmup_lr": 0.1, "warmup_batch_size": 128}
# RunRecord fields that live in memory only.
_RUNTIME_FIELDS = frozenset({"masks", "network"})
# The record format; bumped when a field changes meaning (part of every run's key).
RECORD_VERSION = 1


def _canonical(name: str, names: Sequence[str], what: str) -> str:
    """Match ``name`` against ``names`` ignoring case, ``-`` and ``_``."""
    if not isinstance(name, str):
        raise TypeError(f"{what} must be a string, got {type(name).__name__}")
    key = name.lower().replace("-", "").replace("_", "")
    for candidate in names:
        if key == candidate.replace("-", "").replace("_", ""):
            return candidate
    raise ValueError(f"unknown {what} {name!r}; valid names: {', '.join(names)}")


def canonical_method(name: str) -> str:
    """The registry name of a method (``"IMC_leverage"`` -> ``"imc-leverage"``).

    Raises:
        ValueError: an unknown method; the message lists :data:`METHODS`.
    """
    return _canonical(name, METHODS, "method")


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_remaining(remaining, method: str):
    if remaining == "auto":
        if not method.startswith("imc"):
            raise ValueError(
                f"remaining='auto' takes the sparsity from IMC's spectral gap; method {method!r} "
                "needs a fraction of weights remaining in (0, 1]"
            )
        return "auto"
    if not _is_real(remaining) or not (0 < float(remaining) <= 1):
        raise ValueError(
            f"remaining must be the fraction of prunable weights kept, in (0, 1], or 'auto' "
            f"(IMC); got {remaining!r}"
        )
    if method == "dense" and float(remaining) != 1.0:
        raise ValueError(f"method 'dense' keeps every weight: remaining must be 1, got {remaining}")
    return float(remaining)


def _baseline_problem(key: str, value) -> str | None:
    """What is wrong with a baseline setting's value (None: nothing); ``granularity`` and
    ``block_size`` are checked together by :func:`imc_prune.masks.check_granularity`."""
    if key == "scope" and value not in SCOPES:
        return f"must be one of {', '.join(SCOPES)}"
    if key == "imp_rate" and not (_is_real(value) and 0 < value < 1):
        return "must lie in (0, 1) (the fraction of the surviving weights pruned per round)"
    if key == "rewind_step" and not (is_int(value) and value >= 0):
        return "must be an int >= 0 (0 rewinds to W0)"
    if key in ("score_batch_size", "synflow_iterations") and not (is_int(value) and value >= 1):
        return "must be a positive int"
    return None


def _plain(mapping, what: str) -> dict:
    """A JSON-comparable copy of a settings mapping (tuples become lists)."""
    if mapping is None:
        return {}
    if not isinstance(mapping, Mapping):
        raise TypeError(f"{what} must be a dict of settings, got {type(mapping).__name__}")
    try:
        return json.loads(json.dumps(dict(mapping), sort_keys=True))
    except TypeError as exc:
        raise TypeError(
            f"{what} settings must be JSON values (numbers, strings, lists): {exc}"
        ) from None


@dataclasses.dataclass
class RunSpec:
    """One pruning run.

    Attributes:
        dataset: a name of :data:`imc_prune.data.DATASET_NAMES`.
        model: a name of :data:`imc_prune.models.MODEL_NAMES`.
        method: a name of :data:`METHODS`; ``"imc-<score>"`` is stored as ``"imc"`` with
            ``imc["score"]`` set, so both spellings are the same run.
        remaining: fraction of the prunable weights kept, in ``(0, 1]``, or ``"auto"`` (IMC
            only: the gap decides). ``dense`` needs 1.
        seed: seeds the initialisation, the batch order and the method's random choices.
        train: keyword arguments of :func:`imc_prune.train.train` (``preset``, ``epochs``,
            ``lr``, ...); without ``preset``, ``epochs`` or ``steps`` the model's
            :data:`DEFAULT_PRESETS` entry is used.
        imc: keyword arguments of :func:`imc_prune.imc.imc` (``score``, ``c``, ``k``,
            ``granularity``, ``block_size``, ...); ``magnitude-warmup`` reads its warm-up
            settings from here too.
        baseline: settings of the baselines, see :data:`BASELINE_DEFAULTS`; their
            ``granularity`` and ``block_size`` are those of every method but IMC.
        train_subset: train on the first ``n`` of a seeded permutation of the training set
            (None: all of it); for quick runs.
        test_subset: evaluate on the first ``n`` test samples (None: all).

    Raises:
        ValueError, TypeError: an unknown dataset, model or method, a bad ``remaining``,
            ``seed`` or subset, a score that contradicts the method name, a bad granularity
            or block size, ``"2:4"`` with ``remaining`` other than 0.5 or with IMP; a
            ``train``, ``imc`` or ``baseline`` setting that the functions do not take
            (:data:`TRAIN_SETTINGS`, :data:`imc_prune.imc.SETTINGS`,
            :data:`BASELINE_DEFAULTS`) or whose value is out of range, checked when the spec
            is made rather than when the run reaches it.

    Example:
        >>> RunSpec("fashion-mnist", "lenet300100", "imc-leverage", remaining=0.05).label
        'imc-leverage'
    """

    dataset: str
    model: str
    method: str
    remaining: float | str = 1.0
    seed: int = 0
    train: dict = dataclasses.field(default_factory=dict)
    imc: dict = dataclasses.field(default_factory=dict)
    baseline: dict = dataclasses.field(default_factory=dict)
    train_subset: int | None = None
    test_subset: int | None = None

    def __post_init__(self):
        self.dataset = _canonical(self.dataset, DATASET_NAMES, "dataset")
        self.model = _canonical(self.model, MODEL_NAMES, "model")
        method = canonical_method(self.method)
        self.train = _plain(self.train, "train")
        self.imc = _plain(self.imc, "imc")
        self.baseline = _plain(self.baseline, "baseline")
        if method.startswith("imc-"):
            score = method[len("imc-") :]
            if self.imc.get("score", score) != score:
                raise ValueError(
                    f"method {method!r} contradicts imc score {self.imc['score']!r}; name one"
                )
            self.imc["score"] = score
            method = "imc"
        if method == "imc":
            self.imc.setdefault("score", "magnitude")
            if self.imc["score"] not in IMC_SCORES:
                raise ValueError(
                    f"imc score must be one of {', '.join(IMC_SCORES)}, got {self.imc['score']!r}"
                )
        for key in _IMC_PER_RUN:
            if key in self.imc:
                raise ValueError(f"imc setting {key!r} comes from the spec, not from imc=")
        self.method = method
        self.remaining = _check_remaining(self.remaining, method)
        self.seed = check_seed(self.seed)
        for key in _TRAIN_PER_RUN:
            if key in self.train:
                raise ValueError(f"train setting {key!r} is not part of a spec; it is set per run")
        self._check_train()
        try:
            imc_module.check_settings(self.imc)  # names and ranges
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"imc settings: {exc}") from None
        unknown = set(self.baseline) - set(BASELINE_DEFAULTS)
        if unknown:
            raise ValueError(
                f"unknown baseline settings {sorted(unknown)}; known: "
                f"{', '.join(BASELINE_DEFAULTS)}"
            )
        for key, value in self.baseline.items():
            problem = _baseline_problem(key, value)
            if problem is not None:
                raise ValueError(f"baseline setting {key!r} {problem}, got {value!r}")
        for name in ("train_subset", "test_subset"):
            value = getattr(self, name)
            if value is not None and not (is_int(value) and value >= 1):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        for settings in (self.imc, self.baseline):
            check_granularity(settings.get("granularity", "element"), settings.get("block_size"))
            for key, default in _STRUCTURE_DEFAULTS.items():
                if key in settings and settings[key] == default:
                    del settings[key]
        self._check_structure()

    def _check_train(self) -> None:
        """The train settings against :func:`imc_prune.train.train`'s arguments and
        :func:`imc_prune.train.resolve_config`'s ranges."""
        unknown = sorted(set(self.train) - set(TRAIN_SETTINGS))
        if unknown:
            raise ValueError(
                f"unknown train settings {unknown}; train() takes {', '.join(TRAIN_SETTINGS)}"
            )
        kwargs = self.train_kwargs()
        try:
            if "eval_batch_size" in kwargs:
                check_positive_int(kwargs.pop("eval_batch_size"), "eval_batch_size")
            resolve_config(**kwargs)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"train settings: {exc}") from None

    def _check_structure(self) -> None:
        if self.method == "dense" or self.granularity != "2:4":
            return
        if self.remaining == "auto":
            raise ValueError(
                "granularity '2:4' keeps exactly 2 of every 4 weights: remaining must be 0.5, "
                "not 'auto' (the spectral gap's rate)"
            )
        if self.remaining != 0.5:
            raise ValueError(
                f"granularity '2:4' keeps exactly 2 of every 4 weights: remaining must be 0.5, "
                f"got {self.remaining}"
            )
        if self.method == "imp":
            raise ValueError(
                "method 'imp' cannot prune to granularity '2:4' (2:4 masks exist at 50 % only, "
                "there are no rounds of 20 % to take); use 'oneshot'"
            )

    @property
    def label(self) -> str:
        """The method as tables show it: ``imc-<score>`` for IMC, else the method name."""
        return f"imc-{self.imc['score']}" if self.method == "imc" else self.method

    @property
    def target(self) -> float | str:
        """``remaining`` (a float) or ``"auto"``."""
        return self.remaining

    @property
    def granularity(self) -> str:
        """The mask structure of the method: IMC's ``imc["granularity"]``, the baselines'
        ``baseline["granularity"]``; ``"element"`` unless set."""
        settings = self.imc if self.method == "imc" else self.baseline
        return settings.get("granularity", "element")

    @property
    def block_size(self) -> int | None:
        """The tile edge of ``granularity="block"``, else None."""
        settings = self.imc if self.method == "imc" else self.baseline
        return settings.get("block_size")

    def baseline_setting(self, name: str):
        """A baseline setting, the spec's or :data:`BASELINE_DEFAULTS`'."""
        return self.baseline.get(name, BASELINE_DEFAULTS[name])

    def train_kwargs(self) -> dict:
        """Keyword arguments of :func:`imc_prune.train.train`, the default preset filled in."""
        kwargs = dict(self.train)
        # The model's schedule unless the spec names one (``"preset": None``: none at all);
        # explicit settings, ``epochs`` or ``steps`` included, override the preset's.
        kwargs.setdefault("preset", DEFAULT_PRESETS[self.model])
        if isinstance(kwargs.get("lr_milestones"), list):
            kwargs["lr_milestones"] = tuple(kwargs["lr_milestones"])
        return kwargs

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunSpec:
        """Inverse of :meth:`to_dict`."""
        return cls(**data)

    @property
    def key(self) -> str:
        """A stable hash of the spec: equal specs (any spelling) have equal keys."""
        payload = json.dumps({"v": RECORD_VERSION, **self.to_dict()}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclasses.dataclass
class RunRecord:
    """The outcome of one :class:`RunSpec`.

    Attributes:
        key: :attr:`RunSpec.key`.
        spec: :meth:`RunSpec.to_dict`.
        dataset, model, method, label, seed, target: from the spec (``label`` names the IMC
            score; ``target`` is the requested weights remaining or ``"auto"``).
        weights_remaining: fraction of the prunable weights kept, measured from the masks.
        layers: per prunable parameter ``{"total", "kept", "fraction"}``.
        final_acc: test accuracy after the last epoch.
        mean_last3_acc: mean test accuracy of the last three epochs.
        history: the final training run's per-epoch history.
        compute: ``{"total", "sgd_steps", "spectral_hvps", "spectral", "convention"}``:
            ``total`` in gradient-equivalents of one training batch (module docstring).
        phases: each phase's ``name``, ``sgd_steps``, ``grad_equiv``, ``wall_s`` and
            ``reused`` (computed earlier for another target or run of the same seed).
        wall_s: wall time of all phases (a reused phase counts with its original time).
        elapsed_s: wall time this call actually took.
        imc: for IMC: the auto sparsity and remaining fraction, Lipschitz estimate, gap, top
            eigenvalues, timings, settings, and the spectrum data of
            :func:`imc_prune.report.spectrum_data`; else None.
        imp: for IMP: every round used, ``{"round", "weights_remaining", "final_acc",
            "mean_last3_acc", "sgd_steps"}``; else None.
        granularity, block_size: the spec's mask structure (:attr:`RunSpec.granularity`);
            records written before they existed read as ``"element"``.
        train_config: the resolved training settings.
        environment: device, torch and Python versions, date.
        masks: the masks (CPU bool tensors); only on a record :func:`run_one` returned, not
            saved.
        network: the trained masked network; only on a record :func:`run_one` returned, not
            saved.
    """

    key: str
    spec: dict
    dataset: str
    model: str
    method: str
    label: str
    seed: int
    target: float | str
    weights_remaining: float
    layers: dict
    final_acc: float
    mean_last3_acc: float
    history: list
    compute: dict
    phases: list
    wall_s: float
    elapsed_s: float
    imc: dict | None = None
    imp: list | None = None
    granularity: str = "element"
    block_size: int | None = None
    train_config: dict = dataclasses.field(default_factory=dict)
    environment: dict = dataclasses.field(default_factory=dict)
    masks: dict | None = dataclasses.field(default=None, repr=False, compare=False)
    network: nn.Module | None = dataclasses.field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (without ``masks`` and ``network``)."""
        return {
            field.name: copy.deepcopy(getattr(self, field.name))
            for field in dataclasses.fields(self)
            if field.name not in _RUNTIME_FIELDS
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunRecord:
        """Inverse of :meth:`to_dict` (unknown keys are ignored)."""
        names = {field.name for field in dataclasses.fields(cls)} - _RUNTIME_FIELDS
        return cls(**{k: v for k, v in data.items() if k in names})


# --------------------------------------------------------------------------------------------
# Data


class DataCache:
    """Loaded datasets, so a comparison reads each dataset once.

    Args:
        root: the folder passed to :func:`imc_prune.data.load_dataset` (None: its search).

    Example:
        >>> cache = DataCache()
        >>> cache.get("digits") is cache.get("digits")
        True
    """

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = root
        self._full: dict[str, DatasetSplits] = {}
        self._views: dict[tuple, DatasetSplits] = {}

    def get(
        self, dataset: str, train_subset: int | None = None, test_subset: int | None = None
    ) -> DatasetSplits:
        """The dataset's splits, cut to the subsets.

        The training subset is the first ``train_subset`` of a permutation seeded by 0 (a
        class-balanced draw on datasets stored by class); the test subset is the first
        ``test_subset`` samples.

        Raises:
            DatasetNotFoundError, ValueError: from :func:`imc_prune.data.load_dataset`.
        """
        key = (dataset, train_subset, test_subset)
        if key in self._views:
            return self._views[key]
        if dataset not in self._full:
            self._full[dataset] = load_dataset(dataset, self.root)
        full = self._full[dataset]
        train_set, test_set = full.train, full.test
        if train_subset is not None and train_subset < len(train_set):
            order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(0))
            train_set = Subset(train_set, order[:train_subset].tolist())
        if test_subset is not None and test_subset < len(test_set):
            test_set = Subset(test_set, list(range(test_subset)))
        view = dataclasses.replace(full, train=train_set, test=test_set)
        self._views[key] = view
        return view


# --------------------------------------------------------------------------------------------
# Phases and compute


def _phase(name: str, steps: int, batch: int, train_batch: int, wall: float, reused=False):
    return {
        "name": name,
        "sgd_steps": int(steps),
        "grad_equiv": float(steps) * batch / train_batch,
        "wall_s": float(wall),
        "reused": bool(reused),
    }


def _spectral_phase(result, hessian_batch: int, train_batch: int, reused: bool = False) -> dict:
    """IMC's spectral work (spectrum, Lipschitz, gap, scores) as a phase."""
    timings = result.timings
    wall = sum(v for k, v in timings.items() if k != "warmup")
    return {
        "name": "imc-spectral",
        "sgd_steps": 0,
        "hvps": int(result.n_hvps),
        "grad_equiv": result.gradient_equivalents() * hessian_batch / train_batch,
        "wall_s": float(wall),
        "reused": bool(reused),
    }


def _compute_summary(phases: list[dict], hessian_batch: int | None, train_batch: int) -> dict:
    spectral = [p for p in phases if p["name"] == "imc-spectral"]
    hvps = sum(p.get("hvps", 0) for p in spectral)
    return {
        "total": sum(p["grad_equiv"] for p in phases),
        "sgd_steps": sum(p["sgd_steps"] for p in phases),
        "spectral_hvps": hvps,
        "spectral": sum(p["grad_equiv"] for p in spectral),
        "train_batch": train_batch,
        "hessian_batch": hessian_batch,
        "convention": (
            "gradient-equivalents of one training batch: optimizer steps x batch / train batch "
            "+ HVPs x 2 x Hessian batch / train batch"
        ),
    }


# --------------------------------------------------------------------------------------------
# IMP trajectories


def _state_cpu(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().to("cpu", copy=True) for name, value in model.state_dict().items()}


def _next_kept(kept: int, rate: float) -> int:
    """Survivors after one IMP round: ``rate`` of ``kept`` removed, at least one weight
    (the rule of :func:`imc_prune.baselines.imp_schedule`)."""
    return min(kept - 1, int(round(kept * (1.0 - rate))))


@dataclasses.dataclass
class ImpRound:
    """One trained network of an IMP trajectory.

    Attributes:
        index: round number: 0 is the dense network, round ``i`` has the masks chosen from
            round ``i - 1``'s trained weights.
        parent: index of the round whose trained weights chose the masks (None for round 0).
        masks: CPU masks of the round.
        trained: CPU ``state_dict`` after training.
        kept, total: prunable weights kept, and in all.
        final_acc, mean_last3_acc, history, sgd_steps, wall_s: of the round's training.
        config: the resolved training settings.
    """

    index: int
    parent: int | None
    masks: dict
    trained: dict
    kept: int
    total: int
    final_acc: float
    mean_last3_acc: float
    history: list
    sgd_steps: int
    wall_s: float
    config: dict

    @property
    def weights_remaining(self) -> float:
        return self.kept / self.total

    def summary(self) -> dict[str, Any]:
        """JSON-ready: round, weights remaining, accuracies, SGD steps, wall time."""
        return {
            "round": self.index,
            "weights_remaining": self.weights_remaining,
            "final_acc": self.final_acc,
            "mean_last3_acc": self.mean_last3_acc,
            "sgd_steps": self.sgd_steps,
            "wall_s": self.wall_s,
        }


class ImpTrajectory:
    """The dense training and the IMP rounds of one seed, computed on demand and cached.

    Round 0 trains the dense network from ``W0`` (capturing the rewind point). Round ``i``
    keeps the largest trained weights of round ``i - 1`` among its survivors (pruned weights
    never return), ``imp_rate`` fewer per round, rewinds them and trains. :meth:`target`
    lands exactly on a requested count from the last round above it, as
    :func:`imc_prune.baselines.imp` does, so its masks equal that function's.

    Args:
        spec: any spec of the trajectory: its dataset, model, seed, training settings,
            subsets and the baseline settings ``scope``, ``imp_rate``, ``rewind_step``,
            ``granularity`` and ``block_size`` define it (:meth:`key_of`). With
            ``granularity="block"`` the rounds count tiles, so each removes whole tiles.
        splits: the data.
        device: where to train.
        directory: where rounds are saved (``<parent>-<kept>.pt``, written atomically) and
            reloaded from; None keeps them in memory only.
        progress: tqdm bars for the training runs.

    Raises:
        ValueError: a bad ``scope``, ``imp_rate``, ``rewind_step``, ``granularity`` or
            ``block_size``.
    """

    def __init__(
        self,
        spec: RunSpec,
        splits: DatasetSplits,
        *,
        device=None,
        directory: str | os.PathLike | None = None,
        progress: bool = False,
    ):
        self.spec = spec
        self.splits = splits
        self.device = device
        self.directory = Path(directory) if directory is not None else None
        self.progress = progress
        self.scope = spec.baseline_setting("scope")
        self.rate = spec.baseline_setting("imp_rate")
        self.rewind_step = spec.baseline_setting("rewind_step")
        if self.scope not in SCOPES:
            raise ValueError(f"baseline scope must be one of {SCOPES}, got {self.scope!r}")
        if not _is_real(self.rate) or not 0 < self.rate < 1:
            raise ValueError(f"imp_rate must lie in (0, 1), got {self.rate!r}")
        if not isinstance(self.rewind_step, int) or self.rewind_step < 0:
            raise ValueError(f"rewind_step must be an int >= 0, got {self.rewind_step!r}")
        self.granularity = spec.baseline_setting("granularity")
        self.block_size = spec.baseline_setting("block_size")
        # Weights kept or pruned together: counts of the rounds are multiples of it.
        self.unit = weights_per_unit(self.granularity, self.block_size)
        self._rounds: dict[tuple[int | None, int], ImpRound] = {}
        self._chain: list[ImpRound] = []
        self._rewind_state: dict[str, torch.Tensor] | None = None
        # Rounds trained (not taken from the cache) by the current request.
        self._fresh: set[tuple[int | None, int | None]] = set()

    @staticmethod
    def key_of(spec: RunSpec) -> str:
        """The key shared by every spec whose IMP rounds are the same."""
        payload = {
            "v": RECORD_VERSION,
            "dataset": spec.dataset,
            "model": spec.model,
            "seed": spec.seed,
            "train": spec.train,
            "train_subset": spec.train_subset,
            "test_subset": spec.test_subset,
            "scope": spec.baseline_setting("scope"),
            "imp_rate": spec.baseline_setting("imp_rate"),
            "rewind_step": spec.baseline_setting("rewind_step"),
        }
        # Only when set: trajectories of element masks keep the keys (and the saved rounds)
        # they had before the structure settings existed.
        for key in _STRUCTURE_DEFAULTS:
            if key in spec.baseline:
                payload[key] = spec.baseline[key]
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    # Storage ----------------------------------------------------------------------------

    def _path(self, cache_key) -> Path | None:
        if self.directory is None:
            return None
        parent, kept = cache_key
        return self.directory / f"{'dense' if parent is None else parent}-{kept}.pt"

    def _load(self, cache_key) -> ImpRound | None:
        path = self._path(cache_key)
        if path is None or not path.exists():
            return None
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - unreadable (e.g. torn by a kill): train it again
            return None
        rewind_state = payload.pop("rewind_state", None)
        if cache_key[0] is None:
            if rewind_state is None:
                return None
            self._rewind_state = rewind_state
        return ImpRound(**payload)

    def _save(self, cache_key, round_: ImpRound) -> None:
        # Stored under the key it is looked up by (the dense round's is (None, None)).
        path = self._path(cache_key)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = dataclasses.asdict(round_)
        if round_.parent is None:
            payload["rewind_state"] = self._rewind_state
        partial = path.with_suffix(".partial")
        torch.save(payload, partial)
        os.replace(partial, path)  # atomic: a kill leaves the whole file or none

    # Rounds -----------------------------------------------------------------------------

    def _train(self, masks: dict | None) -> tuple[nn.Module, Any]:
        """Train from ``W0`` densely (``masks=None``, capturing the rewind point) or from
        the rewind point with ``masks``."""
        model = _build(self.spec, self.splits)
        callback = None
        if masks is None:
            self._rewind_state = _state_cpu(model) if self.rewind_step == 0 else None

            def callback(step, net):
                if self.rewind_step and step == self.rewind_step:
                    self._rewind_state = _state_cpu(net)

        else:
            model.load_state_dict(self._rewind_state)
        result = train(
            model,
            masks,
            self.splits,
            seed=self.spec.seed,
            device=self.device,
            progress=self.progress,
            callback=callback,
            **self.spec.train_kwargs(),
        )
        if self._rewind_state is None:
            raise ValueError(
                f"rewind_step {self.rewind_step} is past the end of a training run "
                f"({result.steps} steps)"
            )
        return model, result

    def _make_round(self, index: int, parent: ImpRound | None, kept: int | None) -> ImpRound:
        cache_key = (None if parent is None else parent.index, kept)
        if cache_key in self._rounds:
            return self._rounds[cache_key]
        loaded = self._load(cache_key)
        if loaded is not None:
            self._rounds[cache_key] = loaded
            return loaded
        self._fresh.add(cache_key)
        if parent is None:
            model, result = self._train(None)
            masks = {name: mask.cpu() for name, mask in dense_masks(model).items()}
        else:
            masks = self._prune(parent, kept)
            model, result = self._train(masks)
        round_ = ImpRound(
            index=index,
            parent=None if parent is None else parent.index,
            masks=masks,
            trained=_state_cpu(model),
            kept=sum(int(mask.sum()) for mask in masks.values()),
            total=sum(mask.numel() for mask in masks.values()),
            final_acc=float(result.final_acc),
            mean_last3_acc=float(result.mean_last3_acc),
            history=result.history,
            sgd_steps=int(result.sgd_steps),
            wall_s=float(result.wall_s),
            config=_json_safe(result.config),
        )
        self._rounds[cache_key] = round_
        self._save(cache_key, round_)
        return round_

    def _prune(self, parent: ImpRound, kept: int) -> dict[str, torch.Tensor]:
        """Keep the ``kept`` largest trained weights of ``parent`` among its survivors."""
        scores = {
            # Below every magnitude: a pruned weight never comes back, even against a 0.
            name: parent.trained[name].abs().masked_fill(~mask, -1.0)
            for name, mask in parent.masks.items()
        }
        return masks_from_scores(
            scores,
            1.0 - kept / parent.total,
            scope=self.scope,
            granularity=self.granularity,
            block_size=self.block_size,
        )

    def _next(self, kept: int) -> int:
        """Survivors after one round from ``kept``, in whole units."""
        return _next_kept(kept // self.unit, self.rate) * self.unit

    def dense(self) -> ImpRound:
        """Round 0: the dense network trained from ``W0``."""
        if not self._chain:
            self._chain.append(self._make_round(0, None, None))
        return self._chain[0]

    def round(self, index: int) -> ImpRound:
        """Round ``index`` of the trajectory that removes ``imp_rate`` per round."""
        self.dense()
        while len(self._chain) <= index:
            parent = self._chain[-1]
            kept = self._next(parent.kept)
            if kept < 1:
                raise ValueError(f"IMP cannot prune below one weight (round {len(self._chain)})")
            self._chain.append(self._make_round(len(self._chain), parent, kept))
        return self._chain[index]

    def _kept_for(self, remaining: float) -> int:
        dense = self.dense()
        kept = int(round(remaining * dense.total / self.unit)) * self.unit
        if kept < 1:
            raise ValueError(f"remaining={remaining} keeps no weight of {dense.total}")
        return kept

    def target(self, remaining: float) -> list[ImpRound]:
        """The rounds behind the IMP network with ``remaining`` of the prunable weights.

        Rounds 0, 1, ... while the next round would keep more than the target, then one
        round from the last of them to exactly ``round(remaining * total)`` weights.

        Returns:
            The rounds in order; the last one is the result.
        """
        kept = self._kept_for(remaining)
        chain = [self.dense()]
        while chain[-1].kept > kept:
            last = chain[-1]
            if self._next(last.kept) <= kept:
                chain.append(self._make_round(last.index + 1, last, kept))
            else:
                chain.append(self.round(last.index + 1))
        return chain

    def oneshot(self, remaining: float) -> list[ImpRound]:
        """One-shot magnitude pruning of the trained dense network, rewound: round 0, then
        one round pruned straight to ``remaining``."""
        kept = self._kept_for(remaining)
        dense = self.dense()
        if kept >= dense.total:
            return [dense]
        return [dense, self._make_round(1, dense, kept)]

    def rounds_for(self, method: str, remaining: float = 1.0) -> list[ImpRound]:
        """The rounds behind ``method`` (``"dense"``, ``"oneshot"`` or ``"imp"``) at
        ``remaining``; starts a request for :meth:`reused`."""
        self._fresh = set()
        if method == "dense":
            return [self.dense()]
        if method == "oneshot":
            return self.oneshot(remaining)
        if method == "imp":
            if self.granularity == "2:4":
                raise ValueError("IMP cannot prune to granularity '2:4'; use 'oneshot'")
            return self.target(remaining)
        raise ValueError(f"an IMP trajectory serves dense, oneshot and imp, not {method!r}")

    def reused(self, round_: ImpRound) -> bool:
        """True when ``round_`` came from the cache (memory or disk) rather than being
        trained by the last :meth:`rounds_for` request."""
        key = (round_.parent, None if round_.parent is None else round_.kept)
        return key not in self._fresh


class ImpCache:
    """IMP trajectories by seed and settings, optionally persisted under ``directory``.

    Args:
        directory: folder of the saved rounds (one subfolder per trajectory), or None.

    Example:
        >>> cache = ImpCache("runs/demo/imp")
        >>> record = run_one(spec, imp_cache=cache)  # later IMP specs of the seed reuse rounds
    """

    def __init__(self, directory: str | os.PathLike | None = None):
        self.directory = Path(directory) if directory is not None else None
        self._trajectories: dict[str, ImpTrajectory] = {}

    def trajectory(self, spec: RunSpec, splits, *, device=None, progress=False) -> ImpTrajectory:
        """The trajectory of ``spec`` (created on first use)."""
        key = ImpTrajectory.key_of(spec)
        if key not in self._trajectories:
            self._trajectories[key] = ImpTrajectory(
                spec,
                splits,
                device=device,
                directory=None if self.directory is None else self.directory / key,
                progress=progress,
            )
        trajectory = self._trajectories[key]
        trajectory.progress = progress
        return trajectory


class ImcCache:
    """IMC's spectral analysis (warm-up, spectrum, Lipschitz, gap) of the latest seeds, so
    that the scores and targets of one seed share one analysis (:func:`imc_prune.imc.imc`'s
    ``reuse``). Each record still counts the analysis' HVPs as its own compute; its
    ``imc-spectral`` phase says ``reused``.

    Args:
        size: how many analyses to keep (a comparison runs seed by seed, so 1 or 2 suffice;
            each holds the top eigenvectors, ``k x d`` floats).
    """

    def __init__(self, size: int = 2):
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        self.size = size
        self._results: dict[str, Any] = {}

    @staticmethod
    def key_of(spec: RunSpec) -> str:
        analysis = {k: v for k, v in spec.imc.items() if k in imc_module.ANALYSIS_SETTINGS}
        payload = {
            "dataset": spec.dataset,
            "model": spec.model,
            "seed": spec.seed,
            "train_subset": spec.train_subset,
            "test_subset": spec.test_subset,
            "imc": analysis,
        }
        return json.dumps(payload, sort_keys=True, default=str)

    def get(self, spec: RunSpec):
        return self._results.get(self.key_of(spec))

    def put(self, spec: RunSpec, result) -> None:
        if self.size == 0:
            return
        key = self.key_of(spec)
        self._results.pop(key, None)
        self._results[key] = result
        while len(self._results) > self.size:
            self._results.pop(next(iter(self._results)))


def _json_safe(value):
    return json.loads(
        json.dumps(value, default=lambda v: list(v) if isinstance(v, tuple) else str(v))
    )


# --------------------------------------------------------------------------------------------
# One run


def _build(spec: RunSpec, splits: DatasetSplits) -> nn.Module:
    return build_model(
        spec.model, num_classes=splits.num_classes, input_shape=splits.input_shape, seed=spec.seed
    )


def check_structure(spec: RunSpec, splits: DatasetSplits) -> None:
    """Check that the spec's mask structure fits its model's weights, before any training.

    Args:
        spec: the run.
        splits: its data (the model's input shape and classes depend on it).

    Raises:
        ValueError: a block size that does not divide a weight matrix, or rows that groups of
            4 do not divide (``"2:4"``); the message names the weight and its shape.

    Example:
        >>> splits = DataCache().get("digits")
        >>> check_structure(RunSpec("digits", "lenet300100", "random", 0.5,
        ...                         baseline={"granularity": "block", "block_size": 4}), splits)
        Traceback (most recent call last):
        ValueError: granularity='block': weight '5.weight' has shape (10, 100), a (10, 100) matrix
        that block_size 4 does not divide (remainders 2 and 0); choose a block size that divides
        both
    """
    if spec.method == "dense" or spec.granularity == "element":
        return
    model = _build(spec, splits)
    check_granularity(
        spec.granularity,
        spec.block_size,
        shapes={name: param.shape for name, param in prunable_parameters(model).items()},
    )


def _environment(device) -> dict[str, Any]:
    return {
        "device": str(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def run_one(
    spec: RunSpec,
    *,
    data_cache: DataCache | None = None,
    imp_cache: ImpCache | None = None,
    imc_cache: ImcCache | None = None,
    device=None,
    progress: bool = False,
) -> RunRecord:
    """Run one spec: prune (or not), train the masked network from the rewound weights.

    Args:
        spec: the :class:`RunSpec`.
        data_cache: a :class:`DataCache` to load the dataset from (a fresh one if None).
        imp_cache: an :class:`ImpCache` whose IMP rounds (and dense training) this run may
            reuse and extend (a fresh in-memory one if None). ``dense``, ``oneshot`` and
            ``imp`` of a seed share its round 0.
        imc_cache: an :class:`ImcCache` whose spectral analysis IMC runs of the same seed and
            settings share (none kept if None).
        device: ``"cpu"``, ``"cuda"``, a ``torch.device`` or None/``"auto"`` (CUDA when
            available).
        progress: tqdm bars for training and IMC.

    Returns:
        A :class:`RunRecord`.

    Raises:
        DatasetNotFoundError: the dataset is not installed.
        ValueError: a method setting out of range (and the errors of the steps).

    Example:
        >>> record = run_one(RunSpec("digits", "lenet300100", "snip", remaining=0.1,
        ...                          train={"epochs": 1}))
        >>> round(record.weights_remaining, 3)
        0.1
    """
    if not isinstance(spec, RunSpec):
        raise TypeError(f"run_one takes a RunSpec, got {type(spec).__name__}")
    started = time.perf_counter()
    device = resolve_device(device)
    data_cache = data_cache if data_cache is not None else DataCache()
    imp_cache = imp_cache if imp_cache is not None else ImpCache()
    splits = data_cache.get(spec.dataset, spec.train_subset, spec.test_subset)
    check_structure(spec, splits)
    train_kwargs = spec.train_kwargs()
    config = resolve_config(**{k: v for k, v in train_kwargs.items() if k != "eval_batch_size"})
    train_batch = int(config["batch_size"])

    if spec.method in ("dense", "oneshot", "imp"):
        return _run_trajectory(spec, splits, imp_cache, device, progress, train_batch, started)

    model = _build(spec, splits).to(device)
    phases: list[dict] = []
    imc_info = None
    hessian_batch = None
    if spec.method == "imc":
        sparsity = "auto" if spec.remaining == "auto" else 1.0 - spec.remaining
        earlier = None if imc_cache is None else imc_cache.get(spec)
        result = imc_module.imc(
            model,
            splits,
            sparsity=sparsity,
            seed=spec.seed,
            progress=progress,
            reuse=earlier,
            **spec.imc,
        )
        if imc_cache is not None:
            imc_cache.put(spec, result)
        settings = result.settings
        hessian_batch = min(int(settings["hessian_batch_size"]), len(splits.train))
        phases.append(
            _phase(
                "imc-warmup",
                result.warmup.steps,
                result.warmup.batch_size,
                train_batch,
                result.timings["warmup"],
                reused=earlier is not None,
            )
        )
        phases.append(_spectral_phase(result, hessian_batch, train_batch, earlier is not None))
        model, masks = result.model, result.masks
        imc_info = _imc_summary(result)
    elif spec.method == "magnitude-warmup":
        warm_kwargs = {**_IMC_WARMUP_DEFAULTS, **spec.imc}
        began = time.perf_counter()
        warm = imc_module.warmup(
            model,
            splits.train,
            seed=spec.seed,
            **{short: warm_kwargs[long] for long, short in _WARMUP_KEYS.items()},
        )
        phases.append(
            _phase(
                "warmup",
                warm.steps,
                warm.batch_size,
                train_batch,
                time.perf_counter() - began,
            )
        )
        scores = imc_module.scores(model, None, method="magnitude")
        masks = masks_from_scores(
            scores,
            1.0 - spec.remaining,
            scope=spec.baseline_setting("scope"),
            granularity=spec.granularity,
            block_size=spec.block_size,
        )
        imc_module.rewind(model, masks, warm, to="init")
    else:
        began = time.perf_counter()
        masks, score_equiv = _baseline_masks(spec, model, splits, device, train_batch)
        phases.append(
            {
                "name": f"{spec.method}-score",
                "sgd_steps": 0,
                "grad_equiv": float(score_equiv),
                "wall_s": time.perf_counter() - began,
                "reused": False,
            }
        )

    result = train(
        model,
        masks,
        splits,
        seed=spec.seed,
        device=device,
        progress=progress,
        **train_kwargs,
    )
    phases.append(_phase("train", result.sgd_steps, train_batch, train_batch, result.wall_s))
    return _record(
        spec,
        model,
        masks,
        result,
        phases,
        hessian_batch=hessian_batch,
        train_batch=train_batch,
        started=started,
        device=device,
        imc=imc_info,
    )


def _record(
    spec, model, masks, outcome, phases, *, hessian_batch, train_batch, started, device, **extra
) -> RunRecord:
    """The record of a finished run; ``outcome`` has ``final_acc``, ``mean_last3_acc``,
    ``history`` and ``config`` (a :class:`~imc_prune.train.TrainResult` or an IMP round)."""
    layers = sparsity_report(model, {name: m.to(_model_device(model)) for name, m in masks.items()})
    return RunRecord(
        key=spec.key,
        spec=spec.to_dict(),
        dataset=spec.dataset,
        model=spec.model,
        method=spec.method,
        label=spec.label,
        seed=spec.seed,
        target=spec.target,
        weights_remaining=float(layers["weights_remaining"]),
        layers=layers["layers"],
        final_acc=float(outcome.final_acc),
        mean_last3_acc=float(outcome.mean_last3_acc),
        history=outcome.history,
        compute=_compute_summary(phases, hessian_batch, train_batch),
        phases=phases,
        wall_s=sum(p["wall_s"] for p in phases),
        elapsed_s=time.perf_counter() - started,
        imc=extra.get("imc"),
        imp=extra.get("imp"),
        granularity=spec.granularity,
        block_size=spec.block_size,
        train_config=_json_safe(outcome.config),
        environment=_environment(device),
        masks={name: mask.detach().cpu() for name, mask in masks.items()},
        network=model,
    )


def _model_device(model: nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return torch.device("cpu") if first is None else first.device


def _run_trajectory(spec, splits, imp_cache, device, progress, train_batch, started) -> RunRecord:
    """``dense``, ``oneshot`` and ``imp``: rounds of the seed's IMP trajectory."""
    trajectory = imp_cache.trajectory(spec, splits, device=device, progress=progress)
    rounds = trajectory.rounds_for(spec.method, spec.remaining)
    last = rounds[-1]
    phases = []
    for i, round_ in enumerate(rounds):
        # The last training is the result; the dense one before it is pre-training.
        name = "train" if i == len(rounds) - 1 else ("pretrain" if i == 0 else f"imp-round-{i}")
        phases.append(
            _phase(
                name,
                round_.sgd_steps,
                train_batch,
                train_batch,
                round_.wall_s,
                reused=trajectory.reused(round_),
            )
        )
    model = _build(spec, splits)
    model.load_state_dict(last.trained)
    model.to(device)
    return _record(
        spec,
        model,
        last.masks,
        last,
        phases,
        hessian_batch=None,
        train_batch=train_batch,
        started=started,
        device=device,
        imp=[r.summary() for r in rounds] if spec.method == "imp" else None,
    )


def _imc_summary(result) -> dict[str, Any]:
    summary = result.summary()
    summary.pop("layers", None)  # the record's own per-layer report
    summary["auto_remaining"] = 1.0 - result.auto_sparsity
    summary["spectrum"] = report.spectrum_data(result.spectrum, result.gap, result.lipschitz.value)
    return _json_safe(summary)


def _score_batch(spec: RunSpec, splits: DatasetSplits, device) -> tuple[torch.Tensor, ...]:
    """A random training batch of ``score_batch_size`` samples, drawn from the seed."""
    size = min(int(spec.baseline_setting("score_batch_size")), len(splits.train))
    generator = torch.Generator().manual_seed(spec.seed)
    inputs, targets = next(iterate_batches(splits.train, size, shuffle=True, generator=generator))
    return inputs.to(device), targets.to(device)


def _baseline_masks(spec: RunSpec, model, splits, device, train_batch) -> tuple[dict, float]:
    """Masks of ``random``, ``snip``, ``grasp`` or ``synflow`` at the spec's sparsity, and
    the cost of their scores in gradient-equivalents of one training batch.

    Costs: SNIP one gradient on its batch; GraSP one gradient and one Hessian-vector product
    (two gradients); SynFlow one forward and backward pass of a single input per iteration.
    """
    sparsity = 1.0 - spec.remaining
    structure = {
        "scope": spec.baseline_setting("scope"),
        "granularity": spec.granularity,
        "block_size": spec.block_size,
    }
    if spec.method == "random":
        return baselines.random(model, sparsity, seed=spec.seed, **structure), 0.0
    if spec.method == "synflow":
        iterations = int(spec.baseline_setting("synflow_iterations"))
        masks = baselines.synflow(
            model, sparsity, input_shape=splits.input_shape, iterations=iterations, **structure
        )
        # 2:4 scores the dense network once (baselines.synflow).
        passes = 1 if spec.granularity == "2:4" else iterations
        return masks, passes / train_batch
    batch = _score_batch(spec, splits, device)
    samples = batch[1].shape[0]
    if spec.method == "snip":
        return baselines.snip(model, batch, sparsity, **structure), samples / train_batch
    if spec.method == "grasp":
        masks = baselines.grasp(model, batch, sparsity, **structure)
        return masks, 3.0 * samples / train_batch
    raise ValueError(f"no baseline named {spec.method!r}")  # RunSpec checked the name


# --------------------------------------------------------------------------------------------
# Comparison


@dataclasses.dataclass
class CompareResult:
    """What :func:`compare` produced.

    Attributes:
        records: one :class:`RunRecord` per distinct spec, in the order given.
        rows: :func:`imc_prune.report.aggregate` of the records.
        files: name -> path of every file written (``runs``, ``results_json``,
            ``results_md``, ``accuracy_<dataset>_<model>``, ``spectrum_<dataset>_<model>``).
        ran: keys of the specs run by this call (the others came from ``runs.jsonl``).
    """

    records: list[RunRecord]
    rows: list[dict]
    files: dict[str, Path]
    ran: list[str]


def read_runs(path: str | os.PathLike) -> dict[str, dict]:
    """The records of a ``runs.jsonl``, by key (a later line wins).

    A line torn by a kill while it was written (not valid JSON) is dropped.

    Example:
        >>> records = read_runs("runs/demo/runs.jsonl")
    """
    path = Path(path)
    records: dict[str, dict] = {}
    if not path.exists():
        return records
    with path.open("r", encoding="utf-8") as handle:
        for line in handle:
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and "key" in record:
                records[record["key"]] = record
    return records


def _repair_tail(path: Path) -> None:
    """Cut a torn last line (no newline) so the next append starts on a line of its own."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with path.open("rb+") as handle:
        data = handle.read()
        if data.endswith(b"\n"):
            return
        cut = data.rfind(b"\n") + 1
        handle.truncate(cut)


def _append(path: Path, record: RunRecord) -> None:
    line = json.dumps(record.to_dict(), sort_keys=True, allow_nan=True)
    with path.open("a", encoding="utf-8") as handle:
        handle.write(line + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def compare(
    specs: Iterable[RunSpec],
    out_dir: str | os.PathLike,
    *,
    progress: bool = False,
    resume: bool = True,
    data_root: str | os.PathLike | None = None,
    device=None,
    data_cache: DataCache | None = None,
    on_record: Callable[[RunRecord], object] | None = None,
    title: str | None = None,
    workers: int = 1,
    devices: Sequence | None = None,
    threads: int | None = None,
) -> CompareResult:
    """Run specs, saving each record as it finishes; then write the tables and plots.

    Files under ``out_dir``: ``runs.jsonl`` (one record per line, appended, flushed and
    synced as each run finishes), ``imp/`` (IMP rounds, reused across targets and restarts),
    ``results.json`` (records and aggregated rows), ``results.md`` (tables),
    ``accuracy_<dataset>_<model>.png`` and, when IMC ran, ``spectrum_<dataset>_<model>.png``.

    Args:
        specs: the runs; duplicates (equal :attr:`RunSpec.key`) run once.
        out_dir: the output folder (created).
        progress: tqdm bars (over the runs, and inside each).
        resume: skip specs whose record is in ``runs.jsonl`` already; False moves an old
            ``runs.jsonl`` to ``runs.jsonl.bak``, drops the IMP cache and runs everything.
        data_root: the dataset folder (see :func:`imc_prune.data.load_dataset`).
        device: as for :func:`run_one`.
        data_cache: a :class:`DataCache` to share (default: a new one over ``data_root``).
        on_record: called with each new record after it is saved (with ``workers > 1`` a
            record read back from its worker: no ``masks`` or ``network``).
        title: heading of ``results.md``.
        workers: processes that run specs side by side (default 1: in this process). Runs
            that share cached work (an IMP trajectory's rounds, an IMC seed's spectral
            analysis) stay together in one worker, in order; results do not depend on the
            number of workers (see :mod:`imc_prune._parallel`). Only the parent writes files.
        devices: the workers' devices, assigned in turn (default: from ``device``; ``"cuda"``
            without an index spreads them over every visible GPU).
        threads: CPU threads of each worker (default: this process's torch threads shared
            out among CPU workers, or the machine's cores among GPU workers).

    Returns:
        A :class:`CompareResult`.

    Raises:
        TypeError: an item that is not a :class:`RunSpec`.
        ValueError: no specs; bad ``workers``, ``devices`` or ``threads``.
        Exception: a failing run's own error (from a worker: with its traceback as a note,
            after the other workers are stopped; the runs finished before stay saved).

    Example:
        >>> specs = [RunSpec("digits", "lenet300100", m, remaining=0.1, train={"epochs": 1})
        ...          for m in ("random", "imc")]
        >>> out = compare(specs, "runs/demo")
        >>> out.files["results_md"]
        PosixPath('runs/demo/results.md')
    """
    specs = list(specs)
    if not specs:
        raise ValueError("compare needs at least one RunSpec")
    for spec in specs:
        if not isinstance(spec, RunSpec):
            raise TypeError(f"compare takes RunSpecs, got {type(spec).__name__}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an int >= 1, got {workers!r}")
    if threads is not None and (
        isinstance(threads, bool) or not isinstance(threads, int) or threads < 1
    ):
        raise ValueError(f"threads must be an int >= 1 or None, got {threads!r}")
    worker_devices = (
        _parallel.worker_devices(device, devices, workers)
        if workers > 1 or devices is not None
        else None
    )
    unique: dict[str, RunSpec] = {}
    for spec in specs:
        unique.setdefault(spec.key, spec)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs_path = out_dir / "runs.jsonl"
    imp_dir = out_dir / "imp"
    if not resume:
        if runs_path.exists():
            os.replace(runs_path, out_dir / "runs.jsonl.bak")
        if imp_dir.exists():
            shutil.rmtree(imp_dir)
    _repair_tail(runs_path)
    done = read_runs(runs_path)
    data_cache = data_cache if data_cache is not None else DataCache(data_root)
    imp_cache = ImpCache(imp_dir)
    imc_cache = ImcCache()
    todo = [spec for key, spec in unique.items() if key not in done]
    ran: list[str] = []
    bar = tqdm(total=len(todo), desc="runs", unit="run", disable=not progress)

    def save(record: RunRecord) -> None:
        _append(runs_path, record)
        done[record.key] = record.to_dict()
        ran.append(record.key)
        bar.update(1)
        if on_record is not None:
            on_record(record)

    def describe(spec) -> str:
        return f"{spec.label} {report.target_label(spec.target)} seed {spec.seed}"

    try:
        if worker_devices is None:
            for spec in todo:
                bar.set_description(describe(spec))
                save(
                    run_one(
                        spec,
                        data_cache=data_cache,
                        imp_cache=imp_cache,
                        imc_cache=imc_cache,
                        device=device,
                        progress=progress,
                    )
                )
        elif todo:
            groups = _parallel.affinity_groups(todo)
            bar.set_description(f"runs on {min(workers, len(groups))} workers")

            def finished(data: dict) -> None:
                record = RunRecord.from_dict(data)
                bar.set_postfix_str(f"last: {describe(record)}")
                save(record)

            _parallel.run_parallel(
                groups,
                devices=worker_devices,
                threads=threads or _parallel.default_threads(workers, worker_devices),
                data_root=data_cache.root,
                imp_dir=imp_dir,
                on_result=finished,
            )
    finally:
        bar.close()
    records = [RunRecord.from_dict(done[key]) for key in unique]
    files = write_results(records, out_dir, title=title)
    files["runs"] = runs_path
    return CompareResult(
        records=records, rows=report.aggregate(r.to_dict() for r in records), files=files, ran=ran
    )


def write_results(
    records: Sequence[RunRecord], out_dir: str | os.PathLike, *, title: str | None = None
) -> dict[str, Path]:
    """Write ``results.json``, ``results.md`` and the plots of ``records`` into ``out_dir``.

    The plots need matplotlib; without it they are skipped with a warning that says what to
    install (the tables and JSON are written either way).

    Args:
        records: the runs.
        out_dir: the folder (created).
        title: heading of ``results.md``.

    Returns:
        name -> path of each file written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dicts = [r.to_dict() for r in records]
    rows = report.aggregate(dicts)
    files: dict[str, Path] = {}
    results_json = out_dir / "results.json"
    _write_text(
        results_json,
        json.dumps({"rows": rows, "records": dicts}, indent=1, sort_keys=True, allow_nan=True),
    )
    files["results_json"] = results_json
    results_md = out_dir / "results.md"
    _write_text(results_md, report.results_markdown(rows, title=title or "Pruning results"))
    files["results_md"] = results_md
    if not report.plotting_available():
        warnings.warn(
            f"no plots in {out_dir}: matplotlib is not installed ({report.PLOTS_INSTALL_HINT})",
            stacklevel=2,
        )
        return files
    pairs = sorted({(r["dataset"], r["model"]) for r in rows})
    for dataset, model in pairs:
        members = [r for r in rows if (r["dataset"], r["model"]) == (dataset, model)]
        name = f"accuracy_{dataset}_{model}"
        files[name] = report.plot_accuracy(members, out_dir / f"{name}.png")
        with_spectrum = sorted(
            (r for r in records if r.imc and (r.dataset, r.model) == (dataset, model)),
            key=lambda r: (r.seed, str(r.target)),
        )
        if with_spectrum:
            first = with_spectrum[0]
            name = f"spectrum_{dataset}_{model}"
            files[name] = report.plot_spectrum(
                first.imc["spectrum"],
                out_dir / f"{name}.png",
                title=f"{dataset}, {model}: Hessian spectrum at W* (seed {first.seed})",
            )
    return files


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def grid_specs(
    dataset: str,
    models: Sequence[str],
    methods: Sequence[str],
    remaining: Sequence[float | str],
    seeds: Sequence[int],
    **common,
) -> list[RunSpec]:
    """The specs of a comparison: methods x targets x seeds per model, plus dense per seed.

    ``"auto"`` applies to IMC methods only (the others need a fraction and skip it).

    Args:
        dataset: the dataset name.
        models: model names.
        methods: names of :data:`METHODS` (``dense`` may be left out: it is always added).
        remaining: targets (fractions in ``(0, 1]`` and/or ``"auto"``).
        seeds: seeds.
        **common: the other :class:`RunSpec` fields (``train``, ``imc``, ``baseline``,
            subsets), shared by every spec.

    Returns:
        The specs, seed-major (all runs of seed 0 first, so the first seed's table is
        complete early).

    Example:
        >>> len(grid_specs("digits", ["lenet300100"], ["imc", "random"], [0.1, "auto"], [0, 1]))
        8
    """
    methods = [canonical_method(m) for m in methods]
    specs = []
    for seed in seeds:
        for model in models:
            specs.append(RunSpec(dataset, model, "dense", 1.0, seed, **common))
            for method in methods:
                if method == "dense":
                    continue
                for target in remaining:
                    if target == "auto" and not method.startswith("imc"):
                        continue
                    specs.append(RunSpec(dataset, model, method, target, seed, **common))
    return specs
