"""Fixtures for the eigensolver tests: synthetic symmetric operators with known spectra."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    # The solvers make many small BLAS calls; on a shared 2-core machine two OpenMP threads
    # spin against the other jobs and run ~40x slower (measured: 22 ms against 0.6 ms for a
    # 2000 x 60 by 2000 x 10 product). Results do not depend on the thread count.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    """Haar-distributed ``n x n`` orthogonal matrix, float64 (QR of a Gaussian, signs fixed)."""
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def spectrum_matrix(eigenvalues: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``A = Q diag(eigenvalues) Q^T`` built in float64 and symmetrized exactly.

    Returns:
        ``(A, Q)``: the float64 matrix and its eigenvectors (columns, in the given order).
    """
    eigenvalues = eigenvalues.to(torch.float64)
    q = random_orthogonal(eigenvalues.numel(), seed)
    a = (q * eigenvalues) @ q.T
    return 0.5 * (a + a.T), q


@pytest.fixture(scope="session")
def make_spectrum_matrix():
    return spectrum_matrix
