"""``HessianOperator(..., cuda_graph=True)``: the fused block product captured in a CUDA graph.

On CPU: the errors, and the capture-safety of the work a graph captures, read off a trace of
the product's ATen calls (no host reads of device data, the same ops on the same shapes for
every block of a width). On CUDA (``gpu`` marker): graph replays against the eager fused path,
several blocks per graph, two widths side by side, the output copy, ``n_products``, the
finiteness check after replay and replays that never synchronise.

Tolerance graph against eager: 1e-6 relative per column. The graph replays the eager
product's kernels, but cuBLAS/cuDNN may pick other algorithms on the capture stream's handle
and workspace, and scatter-add (overlapping max pooling) adds in a run-dependent order: a few
fp32 ulps of each column's norm, as for a block against its columns in ``test_gpu.py``.
Replays of one graph on one block are compared bitwise where no atomics are involved.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from imc_kernels import HessianOperator
from imc_kernels._dispatch import ENV_BACKEND

# One MLP with second-derivative activation terms, cross-entropy with ignored rows (the loss
# kernel's target handling), and two small CNNs: grouped and strided convolutions, and
# ReLU/LeakyReLU with max pooling, overlapping windows included (scatter-add).
GRAPH_CASES = ["mlp_gelu", "ce_ignore_index", "conv_conv_groups_stride", "conv_relu_maxpool_twice"]
# No scatter-add in these: eager and replays are deterministic on CUDA, so bits can be compared.
DETERMINISTIC_CASES = ["mlp_gelu", "conv_conv_groups_stride"]
BLOCKS = [1, 4, 32]
GRAPH_TOL = 1e-6


def _problem(dropout=False):
    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        layers = [nn.Linear(5, 7), nn.Tanh()]
        layers += [nn.Dropout(0.3)] if dropout else []
        model = nn.Sequential(*layers, nn.Linear(7, 4))
    x = torch.randn(6, 5, generator=gen)
    return model, (x, torch.randint(0, 4, (6,), generator=gen))


# ================================================================== errors (any machine)


def test_cuda_graph_needs_a_cuda_device():
    model, batch = _problem()
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device.*cpu"):
        HessianOperator(model, None, batch, engine="fused", cuda_graph=True)


@pytest.mark.parametrize("engine", ["func", "double_backward"])
def test_cuda_graph_needs_the_fused_engine(engine):
    model, batch = _problem()
    with pytest.raises(ValueError, match=f"fused engine.*engine='{engine}'"):
        HessianOperator(model, None, batch, engine=engine, cuda_graph=True)


def test_cuda_graph_refuses_train_mode_with_dropout():
    model, batch = _problem(dropout=True)
    model.train()
    with pytest.raises(ValueError, match=r"cuda_graph=True: mode='train' with Dropout '2'"):
        HessianOperator(model, None, batch, mode="train", cuda_graph=True)


def test_cuda_graph_flag_must_be_a_bool():
    model, batch = _problem()
    with pytest.raises(TypeError, match="cuda_graph must be True or False"):
        HessianOperator(model, None, batch, cuda_graph="yes")


def test_without_cuda_graph_nothing_changes(device):
    model, (x, y) = _problem()
    model, batch = model.to(device), (x.to(device), y.to(device))
    op = HessianOperator(model, None, batch)
    assert op.cuda_graph is False and op.graphs is None
    op.reset_graphs()  # nothing to free
    block = torch.randn(op.dim, 3, device=device)
    first = op.matmat(block, copy=False)
    assert torch.equal(op.matmat(block), first)
    assert op.matmat(block, copy=False).data_ptr() != first.data_ptr()  # a new tensor each time
    assert op.n_products == 9


# ============================================== capture-safety of the captured work (CPU)

# ATen calls that read device data on the host (a stream sync, forbidden during capture):
# .item()/bool()/float() of a tensor, comparisons to a Python bool, and ops whose output
# shape depends on the data.
_HOST_READS = {
    "aten::_local_scalar_dense",
    "aten::item",
    "aten::is_nonzero",
    "aten::equal",
    "aten::allclose",
    "aten::nonzero",
    "aten::masked_select",
    "aten::unique_consecutive",
    "aten::unique_dim",
    "aten::_unique2",
}


class _Trace(TorchDispatchMode):
    """Every ATen call with the shapes and dtypes of its tensor arguments."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [
            t
            for t in torch.utils._pytree.tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor)
        ]
        self.calls.append((func._schema.name, tuple((tuple(t.shape), t.dtype) for t in tensors)))
        return func(*args, **kwargs)

    def host_reads(self) -> list[str]:
        reads = [name for name, _ in self.calls if name in _HOST_READS]
        # Boolean-mask indexing: the result's size is the mask's count, read on the host.
        reads += [
            name
            for name, shapes in self.calls
            if name == "aten::index" and any(dtype == torch.bool for _, dtype in shapes[1:])
        ]
        return reads


def _traced_product(op, block):
    with _Trace() as trace:
        op.matmat(block)
    return trace


# Every fused layer rule and both fused losses: what a graph of these models would capture.
SAFETY_CASES = GRAPH_CASES + [
    "mse_mean",
    "bn1d_affine",
    "linear_3d_bn1d_ncl",
    "conv_bn2d_affine_adaptive",
    "avgpool_pad_ceil_nocount",
]


@pytest.mark.parametrize("backend", ["default", "reference"])
@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
@pytest.mark.parametrize("case_name", SAFETY_CASES)
def test_products_never_read_the_device_on_the_host(
    oracles, device, case_name, curvature, backend, monkeypatch
):
    # "default" dispatch: Triton, in the interpreter on CPU (tests/conftest.py), compiled on
    # CUDA where its kernels are no ATen calls; "reference": the pure-PyTorch twins. With
    # check_finite off, the traced call is exactly what a graph captures.
    if backend == "reference":
        monkeypatch.setenv(ENV_BACKEND, backend)
    else:
        monkeypatch.delenv(ENV_BACKEND, raising=False)
    model, loss_fn, batch = oracles.build_case(case_name)
    model, batch = oracles.cast(model, batch, torch.float32, device)
    op = HessianOperator(
        model, loss_fn, batch, engine="fused", curvature=curvature, check_finite=False
    )
    trace = _traced_product(op, oracles.random_block(op.dim, 3, seed=5, device=device))
    assert trace.calls, "the trace saw no ATen call"
    assert trace.host_reads() == []


@pytest.mark.parametrize("case_name", SAFETY_CASES)
def test_products_run_the_same_ops_for_every_block(oracles, case_name):
    # A graph replays the ops and allocations of the captured product: they must not depend
    # on the block's values. Blocks with zeros, negatives and huge entries hit every branch
    # a data-dependent path would take.
    model, loss_fn, batch = oracles.build_case(case_name)
    op = HessianOperator(model, loss_fn, batch, engine="fused", check_finite=False)
    blocks = [
        oracles.random_block(op.dim, 4, seed=7),
        torch.zeros(op.dim, 4),
        -1e30 * oracles.random_block(op.dim, 4, seed=8).abs(),
    ]
    # On the CPU the first product of a block size allocates the rules' kept tangent buffers
    # (LayerRule.kept) and later ones slice them; on CUDA, where graphs run, every product
    # allocates. Warm up once so that only the blocks' values differ between the traces.
    op.matmat(blocks[0])
    traces = [_traced_product(op, block).calls for block in blocks]
    assert traces[1] == traces[0] and traces[2] == traces[0]


def test_the_finiteness_check_is_the_only_host_read(oracles):
    # Why the check runs on the replayed output, outside the graph, and why it is optional.
    model, loss_fn, batch = oracles.build_case("mlp_gelu")
    op = HessianOperator(model, loss_fn, batch, engine="fused", check_finite=True)
    trace = _traced_product(op, oracles.random_block(op.dim, 3, seed=9))
    assert trace.host_reads() == ["aten::_local_scalar_dense"]


# ============================================================================ on CUDA


def _cuda_problem(oracles, case_name, dtype=torch.float32):
    model, loss_fn, batch = oracles.build_case(case_name)
    model, batch = oracles.cast(model, batch, dtype, device="cuda")
    return model, loss_fn, batch


def _graph_and_eager(oracles, case_name, curvature="hessian", dtype=torch.float32, **kwargs):
    model, loss_fn, batch = _cuda_problem(oracles, case_name, dtype)
    make = dict(engine="fused", curvature=curvature, **kwargs)
    graph = HessianOperator(model, loss_fn, batch, cuda_graph=True, **make)
    eager = HessianOperator(model, loss_fn, batch, **make)
    return graph, eager


def _blocks(dim, b, seeds, dtype=torch.float32):
    from_seed = torch.Generator().manual_seed
    return [
        torch.randn(dim, b, generator=from_seed(s), dtype=torch.float64).to("cuda", dtype)
        for s in seeds
    ]


def _rel_err(result, reference):
    diff = torch.linalg.vector_norm((result - reference).double(), dim=0)
    return float((diff / torch.linalg.vector_norm(reference.double(), dim=0)).max())


@pytest.mark.gpu
@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
@pytest.mark.parametrize("b", BLOCKS)
@pytest.mark.parametrize("case_name", GRAPH_CASES)
def test_replays_match_the_eager_fused_path(oracles, case_name, b, curvature):
    graph, eager = _graph_and_eager(oracles, case_name, curvature)
    # The first block captures (and is answered by the first replay), the others replay.
    for block in _blocks(graph.dim, b, seeds=(11, 12, 13)):
        out = graph @ block
        assert out.shape == (graph.dim, b) and out.device.type == "cuda"
        assert out.dtype == torch.float32 and out.is_contiguous()
        assert _rel_err(out, eager @ block) <= GRAPH_TOL
    assert graph.graphs.widths == [(b, torch.float32)]
    if b == 1:  # vectors go through the same graph
        vector = _blocks(graph.dim, 1, seeds=(14,))[0][:, 0]
        out = graph @ vector
        assert out.shape == (graph.dim,)
        assert _rel_err(out[:, None], (eager @ vector)[:, None]) <= GRAPH_TOL
        assert len(graph.graphs) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("case_name", DETERMINISTIC_CASES)
def test_replays_are_deterministic(oracles, case_name):
    graph, _ = _graph_and_eager(oracles, case_name)
    block, other = _blocks(graph.dim, 8, seeds=(17, 18))
    first = graph @ block
    graph @ other
    assert torch.equal(graph @ block, first)


@pytest.mark.gpu
@pytest.mark.parametrize("case_name", ["mlp_gelu", "conv_conv_groups_stride"])
def test_two_widths_side_by_side(oracles, case_name):
    graph, eager = _graph_and_eager(oracles, case_name)
    seeds = iter(range(100, 200))
    for b in (4, 32, 4, 32, 32, 4):
        (block,) = _blocks(graph.dim, b, seeds=(next(seeds),))
        assert _rel_err(graph @ block, eager @ block) <= GRAPH_TOL
    assert graph.graphs.widths == [(4, torch.float32), (32, torch.float32)]


@pytest.mark.gpu
def test_float64_graphs(oracles):
    graph, eager = _graph_and_eager(oracles, "conv_conv_groups_stride", dtype=torch.float64)
    for block in _blocks(graph.dim, 4, seeds=(21, 22), dtype=torch.float64):
        # fp64 throughout: only summation orders can differ, ~1e-16 per column.
        assert _rel_err(graph @ block, eager @ block) <= 1e-12
    assert graph.graphs.widths == [(4, torch.float64)]


@pytest.mark.gpu
def test_results_are_copies_unless_asked_otherwise(oracles):
    graph, eager = _graph_and_eager(oracles, "mlp_gelu")
    first_block, second_block = _blocks(graph.dim, 4, seeds=(31, 32))
    first = graph @ first_block
    kept = first.clone()
    graph @ second_block
    assert torch.equal(first, kept)  # the next replay left the earlier result alone

    static = graph.matmat(first_block, copy=False)
    assert _rel_err(static, eager @ first_block) <= GRAPH_TOL
    # Poisoned: the next replay must write every element of the static output.
    static.fill_(float("nan"))
    again = graph.matmat(second_block, copy=False)
    assert again.data_ptr() == static.data_ptr()
    assert torch.isfinite(again).all()
    assert _rel_err(again, eager @ second_block) <= GRAPH_TOL


@pytest.mark.gpu
def test_n_products_counts_like_eager(oracles):
    graph, eager = _graph_and_eager(oracles, "mlp_gelu")
    widths = (4, 1, 4, 32, 1)
    for b in widths:
        (block,) = _blocks(graph.dim, b, seeds=(40 + b,))
        graph @ block
        eager @ block
    graph.matvec(block[:, 0])
    eager.matvec(block[:, 0])
    graph @ torch.zeros(graph.dim, 0, device="cuda")  # an empty block: no product, no graph
    assert graph.n_products == eager.n_products == sum(widths) + 1
    assert len(graph.graphs) == 3  # the warm-up and capture products are not counted


@pytest.mark.gpu
def test_finiteness_is_checked_on_the_replayed_output(oracles):
    graph, eager = _graph_and_eager(oracles, "mlp_gelu")
    good, bad = _blocks(graph.dim, 4, seeds=(51, 52))
    bad[3, 2] = float("nan")
    with pytest.raises(FloatingPointError, match="fused engine"):
        graph @ bad  # captures on a NaN block, replays, then checks
    assert _rel_err(graph @ good, eager @ good) <= GRAPH_TOL  # the graph is intact
    with pytest.raises(FloatingPointError, match="fused engine"):
        graph @ bad
    graph.check_finite = False
    assert not torch.isfinite(graph @ bad).all()
    assert graph.n_products == 8  # products that raised are not counted


@pytest.mark.gpu
def test_products_do_not_synchronise(oracles):
    # With check_finite=False neither an eager fused product (after one to compile the
    # kernels) nor a replay (after the capturing product) waits for the device.
    for cuda_graph in (False, True):
        model, loss_fn, batch = _cuda_problem(oracles, "ce_ignore_index")
        op = HessianOperator(
            model, loss_fn, batch, engine="fused", check_finite=False, cuda_graph=cuda_graph
        )
        first, second = _blocks(op.dim, 4, seeds=(61, 62))
        op @ first
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            op @ second
            op.matmat(first, copy=False)
        finally:
            torch.cuda.set_sync_debug_mode(previous)


@pytest.mark.gpu
def test_reset_graphs_frees_them_and_captures_again(oracles):
    graph, eager = _graph_and_eager(oracles, "conv_conv_groups_stride")
    block, other = _blocks(graph.dim, 4, seeds=(71, 72))
    graph @ block
    graph.reset_graphs()
    assert len(graph.graphs) == 0
    assert _rel_err(graph @ other, eager @ other) <= GRAPH_TOL
    assert graph.graphs.widths == [(4, torch.float32)]


@pytest.mark.gpu
def test_auto_engine_must_pick_fused():
    class Residual(nn.Module):  # not a Sequential: the fused engine cannot walk it
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(5, 5)

        def forward(self, x):
            return x + self.linear(x)

    model = Residual().cuda()
    batch = (torch.randn(6, 5, device="cuda"), torch.randint(0, 5, (6,), device="cuda"))
    with pytest.raises(ValueError, match="engine='auto' chose 'func'"):
        HessianOperator(model, None, batch, cuda_graph=True)
    op = HessianOperator(nn.Sequential(model.linear), None, batch, cuda_graph=True)
    assert op.engine == "fused" and op.graphs is not None


@pytest.mark.gpu
def test_train_mode_model_is_captured_in_eval_mode(oracles):
    # mode='eval' (the default) evaluates a train-mode model in eval mode: dropout off, so
    # the captured product is deterministic and equals the eager one.
    model, loss_fn, batch = _cuda_problem(oracles, "nested_dropout_identity")
    model.train()
    with pytest.warns(UserWarning, match="train mode"):
        graph = HessianOperator(model, loss_fn, batch, cuda_graph=True)
    with pytest.warns(UserWarning, match="train mode"):
        eager = HessianOperator(model, loss_fn, batch)
    for block in _blocks(graph.dim, 4, seeds=(81, 82)):
        assert _rel_err(graph @ block, eager @ block) <= GRAPH_TOL
    assert model.training  # the operator restored the model's mode
