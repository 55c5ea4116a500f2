"""Test set-up: without CUDA, Triton kernels run in the interpreter on CPU tensors.

TRITON_INTERPRET must be set before triton compiles anything, so it is set here, before any test
module imports switchcit.kernels. With CUDA the same tests run the compiled kernels on the GPU.

Property tests (hypothesis) draw a few dozen examples each by default; ``HYPOTHESIS_PROFILE=thorough``
draws 1,000: ``HYPOTHESIS_PROFILE=thorough python -m pytest -q tests/ops -k property``.
"""
import os
import tempfile

import pytest
import torch
from hypothesis import settings

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# No deadline: an example's time depends on its shapes and on the Triton interpreter. No example
# database: a failure prints its example (and the seed of its tensors). Hypothesis's own caches go to
# the temporary directory, not into the checkout.
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", os.path.join(tempfile.gettempdir(), "switchcit-hypothesis"))
settings.register_profile("quick", max_examples=30, deadline=None, database=None, print_blob=True)
settings.register_profile("thorough", max_examples=1000, deadline=None, database=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "quick"))

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
