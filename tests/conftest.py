"""Test set-up: without CUDA, Triton kernels run in the interpreter on CPU tensors.

TRITON_INTERPRET must be set before triton compiles anything, so it is set here, before any test
module imports switchcit.kernels. With CUDA the same tests run the compiled kernels on the GPU.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# Max abs error allowed vs the float64 reference, relative to (1 + max |reference|).
TOLERANCE = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2, torch.float64: 1e-12}


def assert_close_to_reference(got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.shape == expected.shape, (got.shape, expected.shape)
    assert torch.isfinite(got).all()
    error = (got.double() - expected.double()).abs().max().item() if got.numel() else 0.0
    bound = TOLERANCE[dtype] * (1 + (expected.abs().max().item() if expected.numel() else 0.0))
    assert error <= bound, f"max abs error {error:.3g} > {bound:.3g} ({dtype})"


@pytest.fixture
def generator():
    """Fresh random inputs per test, reproducible from the printed seed on failure."""
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)
