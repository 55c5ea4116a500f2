"""``switchcit.ops.linear`` (the C++ kernel for decode-sized batches, else ``F.linear``) against the
float64 matmul: ragged shapes on both sides of the row threshold, batch invariance (bitwise), empty
sizes, strided inputs, the fallbacks (grad mode, dtypes, layouts), and the custom op under opcheck and
torch.compile."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_to_reference

from switchcit.ops import cpp, linear
from switchcit.ops.dense import MAX_ROWS, uses_kernel

pytestmark = pytest.mark.skipif(not cpp.HAS_CPP_LINEAR, reason="C++ core not built")

DTYPES = (torch.float32, torch.bfloat16)


def make_linear(gen, rows, hidden, out_features, dtype=torch.float32, bias=True, lead=None):
    """x [*lead or rows, H], weight [O, H] scaled like a layer's (outputs of order 1), bias [O] or None."""
    x = torch.randn(*(lead or (rows,)), hidden, generator=gen).to(dtype)
    weight = (torch.randn(out_features, hidden, generator=gen) * max(hidden, 1) ** -0.5).to(dtype)
    b = torch.randn(out_features, generator=gen).to(dtype) if bias else None
    return x, weight, b


def shape_id(shape):
    return "M{}-H{}-O{}".format(*shape)


def reference(x, weight, bias):
    return F.linear(x.double(), weight.double(), None if bias is None else bias.double())


# (rows, H, O): H no multiple of the 8-float vector (and some that are), O no multiple of the 4-row block,
# rows around the tile heights (3, and 2 + 2 for the last four) and both sides of the kernel's row threshold.
SHAPES = [(1, 37, 13), (2, 8, 5), (3, 100, 33), (4, 576, 7), (5, 1, 1), (7, 19, 41), (16, 130, 29),
          (MAX_ROWS[torch.float32] - 1, 45, 18), (MAX_ROWS[torch.float32], 71, 11),
          (MAX_ROWS[torch.float32] + 1, 23, 9), (70, 64, 30),
          (MAX_ROWS[torch.bfloat16], 9, 6), (MAX_ROWS[torch.bfloat16] + 1, 12, 5)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_matches_float64_reference(shape, bias, dtype, generator):
    rows, hidden, out_features = shape
    x, weight, b = make_linear(generator, rows, hidden, out_features, dtype, bias)
    with torch.no_grad():
        assert uses_kernel(x, weight, b) == (rows <= MAX_ROWS[dtype])
        got = linear(x, weight, b)
    assert got.dtype == dtype
    assert_close_to_reference(got, reference(x, weight, b), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_leading_dimensions(dtype, generator):
    x, weight, b = make_linear(generator, 0, 57, 26, dtype, lead=(3, 5))
    with torch.inference_mode():
        assert uses_kernel(x, weight, b)
        got = linear(x, weight, b)
    assert got.shape == (3, 5, 26)
    assert_close_to_reference(got, reference(x, weight, b), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rows_of_a_batch_equal_each_row_alone_bitwise(dtype, generator):
    """A row's result depends on nothing but the row: not on M, its place in the batch or the thread count."""
    rows = int(torch.randint(2, MAX_ROWS[dtype] + 1, (), generator=generator))
    x, weight, b = make_linear(generator, rows, 203, 150, dtype)
    threads = torch.get_num_threads()
    with torch.no_grad():
        batch = linear(x, weight, b)
        alone = torch.cat([linear(x[i:i + 1], weight, b) for i in range(rows)])
        order = torch.randperm(rows, generator=generator)
        shuffled = linear(x[order], weight, b)
        try:
            torch.set_num_threads(1)
            one_thread = linear(x, weight, b)
        finally:
            torch.set_num_threads(threads)
    assert torch.equal(batch, alone)
    assert torch.equal(shuffled, batch[order])
    assert torch.equal(one_thread, batch)


@pytest.mark.parametrize("shape", [(0, 16, 9), (6, 16, 0), (0, 0, 0), (5, 0, 7)], ids=shape_id)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_empty_sizes(shape, bias, generator):
    """M = 0 or O = 0: an empty result; H = 0: an empty sum, so the bias (or zeros)."""
    x, weight, b = make_linear(generator, *shape, bias=bias)
    with torch.no_grad():
        assert uses_kernel(x, weight, b)
        got = linear(x, weight, b)
    assert got.shape == (shape[0], shape[2])
    assert torch.equal(got, reference(x, weight, b).float())


def test_strided_input_is_made_contiguous(generator):
    x, weight, b = make_linear(generator, 9, 40, 21)
    strided = torch.randn(40, 9, generator=generator).T  # [9, 40], column-major
    sliced = torch.randn(9, 80, generator=generator)[:, ::2]
    with torch.no_grad():
        for t in (strided, sliced):
            assert uses_kernel(t, weight, b)
            assert torch.equal(linear(t, weight, b), linear(t.contiguous(), weight, b))
            assert_close_to_reference(linear(t, weight, b), reference(t, weight, b), torch.float32)


def test_what_the_kernel_does_not_take_goes_to_f_linear(generator):
    """A strided weight or bias, float64, float16: F.linear's results, bitwise; mixed dtypes and
    mismatched shapes: F.linear's errors."""
    x, weight, b = make_linear(generator, 4, 24, 10)
    cases = [
        (x, weight.T.contiguous().T, b),
        (x, weight, torch.randn(20, generator=generator)[::2]),
        (x.double(), weight.double(), b.double()),
        (x.half(), weight.half(), b.half()),
    ]
    with torch.no_grad():
        for args in cases:
            assert not uses_kernel(*args)
            assert torch.equal(linear(*args), F.linear(*args))
        for args in ((x, weight[:, :20], b), (x, weight.bfloat16(), b), (x, weight, b.double())):
            with pytest.raises(RuntimeError):
                F.linear(*args)
            with pytest.raises(RuntimeError):
                linear(*args)


def test_grad_mode_runs_f_linear_and_its_gradients(generator):
    """With grad mode on, F.linear itself — also when nothing requires grad (training's frozen base
    layers keep F.linear's numerics) — and gradients flow to every input."""
    x, weight, b = make_linear(generator, 6, 33, 17)
    assert not uses_kernel(x, weight, b)
    assert torch.equal(linear(x, weight, b), F.linear(x, weight, b))
    leaves = [t.clone().requires_grad_() for t in (x, weight, b)]
    out = linear(*leaves)
    grad_out = torch.randn(out.shape, generator=generator)
    out.backward(grad_out)
    leaves64 = [t.double().requires_grad_() for t in (x, weight, b)]
    reference(*leaves64).backward(grad_out.double())
    for leaf, leaf64 in zip(leaves, leaves64):
        assert_close_to_reference(leaf.grad, leaf64.grad, torch.float32)


def test_cpp_linear_opcheck(generator):
    x, weight, b = make_linear(generator, 5, 24, 11)
    tests = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    for bias in (b, None):
        torch.library.opcheck(cpp.cpp_linear.op, (x, weight, bias), test_utils=tests)


def test_torch_compile_fullgraph(generator):
    x, weight, b = make_linear(generator, 7, 40, 19)

    def layer(x, weight, bias):
        return torch.relu(linear(x, weight, bias))

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        got = compiled(x, weight, b)
        assert torch.equal(got, layer(x, weight, b))
    assert_close_to_reference(got, torch.relu(reference(x, weight, b)), torch.float32)
