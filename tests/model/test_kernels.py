"""model/kernels.py against the plain lax references and small float64 numpy formulas.

Tolerances: the GEMM kernels sum the same products as XLA's convolution in another order, so
float32 results differ by a few ulps of the accumulated magnitude; 1e-5 relative to the
output's scale (K up to ~600 products here) is ~100x that rounding, far below any real bug.
Max pooling and its gradient are exact (selection and sums of at most kh*kw equal terms).
"""
from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import kernels

RTOL = 1e-5

CONV_CASES = [
    # (N, C, H, W, O, k, stride, pad, dilation, groups)
    (2, 3, 15, 15, 4, 5, 2, 0, 1, 1),   # conv1-like: stride, no pad
    (2, 4, 9, 9, 6, 3, 1, 1, 1, 2),     # conv2/4/5-like: grouped, pad 1
    (1, 6, 11, 8, 6, 3, 1, 2, 2, 3),    # dilation, non-square, 3 groups
    (2, 2, 7, 7, 3, 1, 1, 0, 1, 1),     # 1x1
    (1, 2, 10, 10, 2, (3, 2), (2, 1), (1, 0), 1, 1),  # rectangular kernel/stride/pad
    (1, 3, 23, 23, 2, 7, 4, 0, 1, 1),   # conv1-like: kernel > stride 4, four phases
    (2, 2, 17, 16, 3, 4, 3, 2, 1, 1),   # stride 3, padded, uneven phases
]
PLANS = kernels.CANDIDATE_PLANS


def _conv_numpy(x, w, b, stride, pad, dilation, groups):
    """float64 direct convolution, Caffe's definition (base_conv_layer.cpp)."""
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, pad, dilation
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    ho = (h + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1
    wo = (wd + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1
    y = np.zeros((n, o, ho, wo))
    og = o // groups
    for oc in range(o):
        g = oc // og
        for i, j in itertools.product(range(kh), range(kw)):
            patch = xp[:, g * cg:(g + 1) * cg, i * dh:i * dh + (ho - 1) * sh + 1:sh,
                       j * dw:j * dw + (wo - 1) * sw + 1:sw]
            y[:, oc] += np.einsum("nchw,c->nhw", patch, w[oc, :, i, j])
    return y + b[None, :, None, None]


def _pairs(*vals):
    return [kernels._pair(v, "t") for v in vals]


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv2d_forward_and_gradients_match_lax(case):
    n, c, h, w, o, k, stride, pad, dil, groups = case
    kh, kw = kernels._pair(k, "k")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    wt = rng.standard_normal((o, c // groups, kh, kw)).astype(np.float32)
    b = rng.standard_normal(o).astype(np.float32)
    expect = _conv_numpy(x.astype(np.float64), wt.astype(np.float64), b.astype(np.float64),
                         *_pairs(stride, pad, dil), groups)
    ref = kernels.conv2d_reference(x, wt, b, stride, pad, dil, groups)
    np.testing.assert_allclose(ref, expect, rtol=0, atol=RTOL * np.abs(expect).max())
    dy = rng.standard_normal(expect.shape).astype(np.float32)

    def loss(fn, xx, ww, bb):
        return jnp.sum(fn(xx, ww, bb, stride, pad, dil, groups) * dy)

    ref_grads = jax.grad(lambda *a: loss(kernels.conv2d_reference, *a), argnums=(0, 1, 2))(x, wt, b)

    def every_plan(xx, ww, bb):
        # One jit for all the plans: one compilation per case instead of one per plan.
        out = []
        for plan in PLANS:
            def ours(a, b_, c, plan=plan):
                return kernels.conv2d(a, b_, c, stride, pad, dil, groups, plan=plan)

            y = ours(xx, ww, bb)
            grads = jax.grad(lambda *a: jnp.sum(ours(*a) * dy), argnums=(0, 1, 2))(xx, ww, bb)
            out.append((y, grads))
        return out

    for plan, (y, grads) in zip(PLANS, jax.jit(every_plan)(x, wt, b)):
        assert y.shape == expect.shape
        np.testing.assert_allclose(y, expect, rtol=0, atol=RTOL * np.abs(expect).max(),
                                   err_msg=plan.name)
        for name, got, want in zip("xwb", grads, ref_grads):
            np.testing.assert_allclose(got, want, rtol=0, atol=RTOL * np.abs(want).max(),
                                       err_msg=f"d{name} {plan.name}")


def test_conv2d_rejects_bad_groups():
    x = jnp.zeros((1, 4, 5, 5))
    with pytest.raises(ValueError, match="groups 3"):
        kernels.conv2d(x, jnp.zeros((6, 4, 3, 3)), None, groups=3)
    with pytest.raises(ValueError, match="ConvPlan.forward"):
        kernels.ConvPlan(forward="fft")
    with pytest.raises(ValueError, match="ConvPlan.weight_grad"):
        kernels.ConvPlan(weight_grad="col2im")


WINOGRAD_CASES = [
    # (N, C, H, W, O, pad, groups)
    (2, 4, 9, 9, 6, 1, 2),    # conv4/5-like: grouped, pad 1, odd size (last tile half outside)
    (2, 3, 8, 7, 5, 0, 1),    # no padding, non-square, even and odd output sizes
    (1, 2, 6, 5, 3, 2, 1),    # pad 2: the input gradient's own padding is 0
    (2, 6, 1, 1, 3, 1, 3),    # a 1x1 image: one tile, mostly padding
]
# Plans using Winograd in one, two or three passes, with each of the other methods beside it.
WINOGRAD_USERS = kernels.WINOGRAD_PLANS + (
    kernels.ConvPlan("gemm", "winograd", "winograd"),
    kernels.ConvPlan("winograd", "col2im", "gemm"),
    kernels.ConvPlan("lax", "lax", "winograd"),
    kernels.ConvPlan("winograd", "lax", "lax"))


@pytest.mark.parametrize("case", WINOGRAD_CASES)
def test_winograd_plans_match_float64_and_lax_gradients(case):
    # Same tolerance as the direct methods: F(2x2, 3x3)'s transforms are sums and halvings, so
    # its float32 error stays at the GEMM's (measured 1e-7 to 6e-7 of the scale on AlexNet's
    # conv3-5 shapes against float64).
    n, c, h, w, o, pad, groups = case
    rng = np.random.default_rng(4)
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    wt = rng.standard_normal((o, c // groups, 3, 3)).astype(np.float32)
    b = rng.standard_normal(o).astype(np.float32)
    expect = _conv_numpy(x.astype(np.float64), wt.astype(np.float64), b.astype(np.float64),
                         *_pairs(1, pad, 1), groups)
    dy = rng.standard_normal(expect.shape).astype(np.float32)
    ref_grads = jax.grad(lambda *a: jnp.sum(
        kernels.conv2d_reference(*a, 1, pad, 1, groups) * dy), argnums=(0, 1, 2))(x, wt, b)
    for plan in WINOGRAD_USERS:
        def ours(a, b_, c_, plan=plan):
            return kernels.conv2d(a, b_, c_, 1, pad, 1, groups, plan=plan)

        y, grads = jax.jit(lambda *a: (ours(*a), jax.grad(lambda *g: jnp.sum(ours(*g) * dy),
                                                          argnums=(0, 1, 2))(*a)))(x, wt, b)
        np.testing.assert_allclose(y, expect, rtol=0, atol=RTOL * np.abs(expect).max(),
                                   err_msg=plan.name)
        for name, got, want in zip("xwb", grads, ref_grads):
            np.testing.assert_allclose(got, want, rtol=0, atol=RTOL * np.abs(want).max(),
                                       err_msg=f"d{name} {plan.name}")


@pytest.mark.parametrize("w_shape, stride, pad, dilation, dtype", [
    ((4, 2, 5, 5), 1, 2, 1, jnp.float32),     # 5x5 kernel
    ((4, 2, 3, 3), 2, 1, 1, jnp.float32),     # stride 2
    ((4, 2, 3, 3), 1, 3, 1, jnp.float32),     # pad 3: dY would need negative padding
    ((4, 2, 3, 3), 1, 1, 2, jnp.float32),     # dilated
    ((4, 2, 3, 3), 1, 1, 1, jnp.bfloat16),    # bfloat16
])
def test_winograd_is_refused_and_not_a_candidate_where_it_does_not_apply(w_shape, stride, pad,
                                                                          dilation, dtype):
    k, pairs = w_shape[2:], _pairs(stride, pad, dilation)
    assert kernels.WINOGRAD_PLAN not in kernels.candidate_plans(k, *pairs, jnp.dtype(dtype))
    x = jnp.zeros((1, 2, 9, 9), dtype)
    with pytest.raises(ValueError, match="needs a 3x3 stride-1 float32"):
        kernels.conv2d(x, jnp.zeros(w_shape, dtype), None, stride, pad, dilation,
                       plan=kernels.WINOGRAD_PLAN)
    # where it applies it is one more candidate, after the direct plans
    assert kernels.candidate_plans((3, 3), (1, 1), (1, 1), (1, 1), "float32") == (
        kernels.CANDIDATE_PLANS + kernels.WINOGRAD_PLANS)


def _max_pool_numpy(x, k, s, p):
    """Caffe's pooling_layer.cpp forward_cpu/backward_cpu (MAX): clipped windows, first max."""
    n, c, h, w = x.shape
    ho, wo = kernels.pool_output_hw((h, w), (k, k), (s, s), (p, p))
    y = np.empty((n, c, ho, wo), x.dtype)
    mask = np.empty((n, c, ho, wo), np.int64)
    for a, b, oh, ow in itertools.product(range(n), range(c), range(ho), range(wo)):
        hs, ws = oh * s - p, ow * s - p
        he, we = min(hs + k, h), min(ws + k, w)
        hs, ws = max(hs, 0), max(ws, 0)
        best, arg = -np.inf, -1
        for hh in range(hs, he):
            for ww in range(ws, we):
                if x[a, b, hh, ww] > best:
                    best, arg = x[a, b, hh, ww], hh * w + ww
        y[a, b, oh, ow], mask[a, b, oh, ow] = best, arg
    return y, mask


@pytest.mark.parametrize(
    "shape,k,s,p",
    [((2, 3, 13, 13), 3, 2, 0),    # AlexNet pool: overlapping, exact fit
     ((1, 2, 8, 8), 3, 2, 0),      # ceil mode: last window clipped
     ((1, 2, 7, 9), 3, 2, 1),      # padding
     ((1, 1, 6, 6), 2, 2, 0),      # non-overlapping
     ((1, 2, 11, 10), 2, 3, 1),    # stride above kernel: rows in no window
     ((1, 1, 7, 6), 3, 1, 1)],     # stride 1: one phase
)
def test_max_pool_matches_caffe_first_max(shape, k, s, p):
    rng = np.random.default_rng(1)
    # Few distinct values: many ties, so the first-max routing is really exercised.
    x = rng.integers(0, 4, size=shape).astype(np.float32)
    want_y, mask = _max_pool_numpy(x, k, s, p)
    y = jax.jit(kernels.max_pool2d, static_argnums=(1, 2, 3))(x, k, s, p)
    np.testing.assert_array_equal(y, want_y)
    np.testing.assert_array_equal(kernels.max_pool2d_reference(x, k, s, p), want_y)
    dy = rng.standard_normal(want_y.shape).astype(np.float32)
    want_dx = np.zeros(x.shape, np.float64)
    n, c, h, w = x.shape
    for a, b, oh, ow in itertools.product(*(range(d) for d in want_y.shape)):
        idx = mask[a, b, oh, ow]
        want_dx[a, b, idx // w, idx % w] += dy[a, b, oh, ow]
    dx = jax.jit(jax.grad(lambda xx: jnp.sum(kernels.max_pool2d(xx, k, s, p) * dy)))(x)
    np.testing.assert_allclose(dx, want_dx, rtol=0, atol=1e-6)


def test_max_pool_gradient_matches_select_and_scatter_without_ties():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 4, 27, 27)).astype(np.float32)
    dy = rng.standard_normal((2, 4, 13, 13)).astype(np.float32)
    got = jax.grad(lambda a: jnp.sum(kernels.max_pool2d(a, 3, 2) * dy))(x)
    want = jax.grad(lambda a: jnp.sum(kernels.max_pool2d_reference(a, 3, 2) * dy))(x)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_max_pool_rejects_pad_not_below_kernel():
    with pytest.raises(ValueError, match="pad"):
        kernels.max_pool2d(jnp.zeros((1, 1, 4, 4)), 2, 2, 2)


def test_max_pool_windows_with_cropping_high_padding_matches_cropped_input():
    # FLOOR-mode style: high padding -1 means the last row/column is in no window.
    rng = np.random.default_rng(3)
    x = rng.integers(0, 3, size=(1, 2, 8, 8)).astype(np.float32)
    pads = ((0, -1), (0, -1))
    got = kernels.max_pool2d_windows(x, (3, 3), (2, 2), pads)
    want = kernels.max_pool2d(x[:, :, :7, :7], 3, 2)
    np.testing.assert_array_equal(got, want)
    dy = rng.standard_normal(want.shape).astype(np.float32)
    dx = jax.grad(lambda a: jnp.sum(kernels.max_pool2d_windows(a, (3, 3), (2, 2), pads) * dy))(x)
    dx_crop = jax.grad(lambda a: jnp.sum(kernels.max_pool2d(a, 3, 2) * dy))(x[:, :, :7, :7])
    np.testing.assert_array_equal(dx[:, :, :7, :7], dx_crop)
    assert not np.any(dx[:, :, 7, :]) and not np.any(dx[:, :, :, 7])


@pytest.mark.parametrize("shape, kernel, stride, pad", [
    ((2, 3, 35, 35), (11, 11), (4, 4), (0, 0)),  # conv1's kernel and stride
    ((2, 4, 13, 13), (3, 3), (1, 1), (1, 1)),
    ((1, 2, 17, 16), (4, 3), (3, 2), (2, 1)),
    ((1, 2, 9, 12), (5, 5), (2, 3), (2, 0)),
])
def test_phase_split_im2col_equals_strided_slices(shape, kernel, stride, pad):
    # The fast column builder moves the same values as the plain strided-slice one, whose
    # rows are Caffe's (c, i, j); a strided convolution's rows come in blocks, in the order
    # _weight_rows puts the weights (checked by sending each weight's (c, i, j) index through).
    x = jnp.asarray(np.random.default_rng(3).standard_normal(shape, np.float32))
    fast = jax.jit(lambda a: kernels._im2col_kn(a, kernel, stride, pad, (1, 1)))(x)
    plain = jax.jit(lambda a: kernels._im2col_kn_dilated(a, kernel, stride, pad, (1, 1)))(x)
    c = shape[1]
    index = jnp.arange(c * kernel[0] * kernel[1]).reshape(1, c, *kernel)
    order = np.asarray(kernels._weight_rows(index, stride, (1, 1)))[0]
    assert sorted(order) == list(range(len(order)))
    assert fast.shape == plain.shape and np.array_equal(fast, np.asarray(plain)[order])
    w = jnp.asarray(np.random.default_rng(4).standard_normal((2, c, *kernel), np.float32))
    back = kernels._weight_from_rows(kernels._weight_rows(w, stride, (1, 1)), w.shape, stride,
                                     (1, 1))
    assert np.array_equal(back, w)


def test_bf16_gemms_sum_in_float32_in_both_passes():
    """kernels.matmul on bf16 operands (forward and its custom gradient): bf16 results within
    one bf16 rounding of float64 (every product of two bf16 numbers is exact in float32, and
    the sums are float32); float32 operands: exactly the plain full-precision dot."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((8, 512)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((512, 16)), jnp.bfloat16)
    ct = jnp.asarray(rng.standard_normal((8, 16)), jnp.bfloat16)
    y, vjp = jax.vjp(kernels.matmul, x, w)
    dx, dw = vjp(ct)
    x64, w64, ct64 = (np.asarray(a, np.float64) for a in (x, w, ct))
    for got, want in ((y, x64 @ w64), (dx, ct64 @ w64.T), (dw, x64.T @ ct64)):
        assert got.dtype == jnp.bfloat16
        # one bf16 rounding of the result (8 significant bits) on top of float32 sums
        np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=2 ** -8,
                                   atol=1e-6 * np.abs(want).max())
    # float32 operands: the plain full-precision dot, as before.
    np.testing.assert_array_equal(kernels.matmul(x64.astype(np.float32), w64.astype(np.float32)),
                                  jnp.dot(x64.astype(np.float32), w64.astype(np.float32),
                                          precision=jax.lax.Precision.HIGHEST))
