"""Test configuration.

Without a GPU, Triton kernels run in the interpreter: ``TRITON_INTERPRET=1`` must be set
before triton (and so imc_kernels) is imported, because ``@triton.jit`` decides at decoration
time whether it returns an interpreted function.
"""

import os
import shutil
import subprocess


def _has_cuda_device() -> bool:
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return False
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


if not _has_cuda_device():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; runs on the lent GPU machine")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)
