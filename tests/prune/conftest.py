"""The pruning layer's tests exercise the pipeline, not the kernels.

Without a GPU, the Triton kernels run in the interpreter, which makes every Hessian-vector
product and optimizer step thousands of times slower; the kernels are checked against their
twins in ``tests/ops`` and ``tests/masked``. Here the pure-PyTorch twins run instead (on a GPU
the real kernels run, as users get them).
"""

import pytest
import torch

from imc_kernels import _dispatch


@pytest.fixture(scope="module", autouse=True)
def _twins_instead_of_the_interpreter():
    # Module scope, so that module-scoped fixtures (trained networks) use the twins too.
    with pytest.MonkeyPatch.context() as patch:
        if _dispatch.triton_interpret() and not torch.cuda.is_available():
            patch.setenv(_dispatch.ENV_BACKEND, "reference")
        yield


@pytest.fixture(scope="module")
def cache():
    """Datasets loaded once per module (scikit-learn digits in most tests)."""
    from imc_prune.experiment import DataCache

    return DataCache()
