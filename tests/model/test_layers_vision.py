"""Convolution, Pooling and LRN against float64 NumPy transcriptions of Caffe's loops
(conv_layer.cpp via im2col, pooling_layer.cpp, lrn_layer.cpp), forward and backward."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data.errors import ImagenetError
from layer_testing import close, make, rand


def run(layer, bottoms, blobs=()):
    """Jitted forward (also proves the layer is jittable; compiles faster than eager ops)."""
    f = jax.jit(lambda bl, bo: layer.forward(bl, bo, rng=None, train=False))
    return f([jnp.asarray(b) for b in blobs], [jnp.asarray(b) for b in bottoms])


def run_vjp(layer, x, dy, blobs=()):
    """Jitted forward of bottom 0 and its vjp with cotangent dy: (y, dx, dblobs)."""

    def f(bl, x, dy):
        y, vjp = jax.vjp(lambda bl, x: layer.forward(bl, [x], rng=None, train=True)[0], bl, x)
        dbl, dx = vjp(dy)
        return y, dx, dbl

    return jax.jit(f)([jnp.asarray(b) for b in blobs], jnp.asarray(x), jnp.asarray(dy))


# -- Convolution --------------------------------------------------------------------------
def conv_ref(x, w, b, stride, pad, dil, group):
    x, w = x.astype(np.float64), w.astype(np.float64)
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    oh = (h + 2 * pad[0] - (dil[0] * (kh - 1) + 1)) // stride[0] + 1
    ow = (wd + 2 * pad[1] - (dil[1] * (kw - 1) + 1)) // stride[1] + 1
    xp = np.pad(x, ((0, 0), (0, 0), (pad[0], pad[0]), (pad[1], pad[1])))
    y = np.zeros((n, o, oh, ow))
    og = o // group
    for g in range(group):
        for i in range(kh):
            for j in range(kw):
                patch = xp[:, g * cg:(g + 1) * cg,
                           i * dil[0]: i * dil[0] + stride[0] * (oh - 1) + 1: stride[0],
                           j * dil[1]: j * dil[1] + stride[1] * (ow - 1) + 1: stride[1]]
                y[:, g * og:(g + 1) * og] += np.einsum("nchw,oc->nohw", patch, w[g * og:(g + 1) * og, :, i, j])
    if b is not None:
        y += b.astype(np.float64)[None, :, None, None]
    return y


@pytest.mark.parametrize("text,shape,stride,pad,dil,group", [
    ("num_output: 6 kernel_size: 3", (2, 4, 7, 6), (1, 1), (0, 0), (1, 1), 1),
    ("num_output: 6 kernel_size: 3 stride: 2 pad: 1", (2, 4, 7, 6), (2, 2), (1, 1), (1, 1), 1),
    ("num_output: 6 kernel_size: 3 group: 2 pad: 1", (2, 4, 7, 6), (1, 1), (1, 1), (1, 1), 2),
    ("num_output: 4 kernel_size: 3 dilation: 2 pad: 2", (1, 2, 9, 8), (1, 1), (2, 2), (2, 2), 1),
    ("num_output: 4 kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 1 pad_h: 1 pad_w: 0",
     (1, 2, 7, 5), (2, 1), (1, 0), (1, 1), 1),
    ("num_output: 6 kernel_size: 5 kernel_size: 3 stride: 3 stride: 2 group: 3 bias_term: false",
     (2, 6, 11, 9), (3, 2), (0, 0), (1, 1), 3),
])
def test_convolution_matches_reference(text, shape, stride, pad, dil, group):
    layer = make(f'name: "c" type: "Convolution" convolution_param {{ {text} }}', shape)
    w_shape = layer.blobs[0].shape
    x, w = rand(*shape, seed=1), rand(*w_shape, seed=2)
    b = rand(w_shape[0], seed=3) if len(layer.blobs) == 2 else None
    ref = conv_ref(x, w, b, stride, pad, dil, group)
    assert layer.top_shapes == [ref.shape]
    assert w_shape == (w_shape[0], shape[1] // group) + w_shape[2:]
    (y,) = run(layer, [x], [w] + ([b] if b is not None else []))
    close(y, ref)


def test_convolution_blob_specs_and_gradients():
    text = '''name: "c" type: "Convolution" convolution_param { num_output: 4 kernel_size: 3
        group: 2 stride: 2 pad: 1 weight_filler { type: "gaussian" std: 0.01 } }'''
    layer = make(text, (2, 4, 6, 5))
    assert [s.shape for s in layer.blobs] == [(4, 2, 3, 3), (4,)]
    assert layer.blobs[0].filler.type == "gaussian" and layer.blobs[0].filler.std == pytest.approx(0.01)
    # Caffe's default bias filler: constant 0.
    assert layer.blobs[1].filler.type == "constant" and layer.blobs[1].filler.value == 0
    x, w, b = rand(2, 4, 6, 5, seed=4), rand(4, 2, 3, 3, seed=5), rand(4, seed=6)
    dy = rand(*layer.top_shapes[0], seed=7)
    _, dx, (dw, db) = run_vjp(layer, x, dy, [w, b])
    # The convolution is linear: its gradients are the reference's adjoints, computed by
    # finite differences of the exact float64 reference (step 1: exact for a linear map).
    ref = lambda x, w: conv_ref(x, w, None, (2, 2), (1, 1), (1, 1), 2)
    dy64 = dy.astype(np.float64)
    ref_dx = np.zeros(x.shape)
    for idx in np.ndindex(x.shape):
        e = np.zeros(x.shape); e[idx] = 1
        ref_dx[idx] = np.sum(ref(e, w) * dy64)
    ref_dw = np.zeros(w.shape)
    for idx in np.ndindex(w.shape):
        e = np.zeros(w.shape); e[idx] = 1
        ref_dw[idx] = np.sum(ref(x, e) * dy64)
    close(dx, ref_dx, 1e-5)
    close(dw, ref_dw, 1e-5)
    close(db, dy64.sum(axis=(0, 2, 3)), 1e-5)


@pytest.mark.parametrize("text,msg", [
    ("num_output: 5 kernel_size: 3 group: 2", "group 2 must divide"),
    ("num_output: 4 kernel_size: 3 kernel_h: 3 kernel_w: 3", "not both"),
    ("num_output: 4 kernel_h: 3", "must both be given"),
    ("num_output: 4 kernel_size: 9", "larger than padded input"),
    ("kernel_size: 3", "num_output must be positive"),
])
def test_convolution_rejects_bad_params(text, msg):
    with pytest.raises(ImagenetError, match=msg):
        make(f'name: "c" type: "Convolution" convolution_param {{ {text} }}', (1, 4, 5, 5))


# -- Pooling ------------------------------------------------------------------------------
def pool_out(size, k, s, p, mode="ceil"):
    import math
    rnd = math.ceil if mode == "ceil" else math.floor
    o = int(rnd((size + 2 * p - k) / s)) + 1
    if p and (o - 1) * s >= size + p:
        o -= 1
    return o


def pool_ref(x, k, s, p, method, mode="ceil", dy=None):
    """pooling_layer.cpp Forward_cpu/Backward_cpu, float64; returns (y, dx)."""
    x = x.astype(np.float64)
    n, c, h, w = x.shape
    oh, ow = pool_out(h, k[0], s[0], p[0], mode), pool_out(w, k[1], s[1], p[1], mode)
    y = np.zeros((n, c, oh, ow))
    dx = np.zeros_like(x)
    dy = np.ones_like(y) if dy is None else dy.astype(np.float64)
    for nn in range(n):
        for cc in range(c):
            for ph in range(oh):
                for pw in range(ow):
                    hs, ws = ph * s[0] - p[0], pw * s[1] - p[1]
                    if method == "MAX":
                        he, we = min(hs + k[0], h), min(ws + k[1], w)
                        hs, ws = max(hs, 0), max(ws, 0)
                        best, arg = -np.finfo(np.float32).max, None
                        for hh in range(hs, he):
                            for ww in range(ws, we):
                                if x[nn, cc, hh, ww] > best:
                                    best, arg = x[nn, cc, hh, ww], (hh, ww)
                        y[nn, cc, ph, pw] = best
                        dx[nn, cc, arg[0], arg[1]] += dy[nn, cc, ph, pw]
                    else:
                        he, we = min(hs + k[0], h + p[0]), min(ws + k[1], w + p[1])
                        size = (he - hs) * (we - ws)
                        hs, ws, he, we = max(hs, 0), max(ws, 0), min(he, h), min(we, w)
                        y[nn, cc, ph, pw] = x[nn, cc, hs:he, ws:we].sum() / size
                        dx[nn, cc, hs:he, ws:we] += dy[nn, cc, ph, pw] / size
    return y, dx


POOL_CASES = [
    # (k, s, p, H, W): chosen so that ceil and floor differ, windows run past the padding, the
    # "last window starts inside the padding" rule fires, and padded AVE divisors vary.
    ((3, 3), (2, 2), (0, 0), 6, 7),   # ceil 3 vs floor 2 rows; last window clipped
    ((3, 3), (2, 2), (1, 1), 6, 5),   # ceil 4 vs floor 3; divisor of the last window is 2*...
    ((2, 2), (2, 2), (1, 1), 5, 5),   # ceil gives 4, minus one: last window would start in pad
    ((3, 2), (2, 1), (1, 0), 7, 5),   # kernel_h/kernel_w, stride_h/stride_w, pad_h/pad_w
    ((3, 3), (1, 1), (0, 0), 4, 4),
]


def _pool_text(method, k, s, p, extra=""):
    if k[0] == k[1] and s[0] == s[1] and p[0] == p[1]:
        geo = f"kernel_size: {k[0]} stride: {s[0]} pad: {p[0]}"
    else:
        geo = (f"kernel_h: {k[0]} kernel_w: {k[1]} stride_h: {s[0]} stride_w: {s[1]} "
               f"pad_h: {p[0]} pad_w: {p[1]}")
    return f'name: "p" type: "Pooling" pooling_param {{ pool: {method} {geo} {extra} }}'


@pytest.mark.parametrize("method", ["MAX", "AVE"])
@pytest.mark.parametrize("mode", ["ceil", "floor"])
@pytest.mark.parametrize("k,s,p,h,w", POOL_CASES)
def test_pooling_forward_backward(method, mode, k, s, p, h, w):
    extra = "round_mode: FLOOR" if mode == "floor" else ""
    layer = make(_pool_text(method, k, s, p, extra), (2, 3, h, w))
    x = rand(2, 3, h, w, seed=8)
    ref_y0, _ = pool_ref(x, k, s, p, method, mode)
    dy = rand(*ref_y0.shape, seed=9)
    ref_y, ref_dx = pool_ref(x, k, s, p, method, mode, dy)
    assert layer.top_shapes == [ref_y.shape]
    y, dx, _ = run_vjp(layer, x, dy)
    close(y, ref_y)
    close(dx, ref_dx)


def test_pooling_ceil_and_floor_sizes_differ():
    ceil = make(_pool_text("MAX", (3, 3), (2, 2), (0, 0)), (1, 1, 6, 6))
    floor = make(_pool_text("MAX", (3, 3), (2, 2), (0, 0), "round_mode: FLOOR"), (1, 1, 6, 6))
    assert ceil.top_shapes == [(1, 1, 3, 3)] and floor.top_shapes == [(1, 1, 2, 2)]
    # Padding rule: ceil((5+2-2)/2)+1 = 4 would start the last window in the padding -> 3.
    assert make(_pool_text("AVE", (2, 2), (2, 2), (1, 1)), (1, 1, 5, 5)).top_shapes == [(1, 1, 3, 3)]


def test_ave_pool_padded_divisor_counts_padding_inside_h_plus_pad():
    layer = make(_pool_text("AVE", (3, 3), (2, 2), (1, 1)), (1, 1, 4, 4))
    (y,) = run(layer, [np.ones((1, 1, 4, 4), np.float32)])
    # Per axis the windows are [-1, 2), [1, 4) and [3, 5) (clipped at H + pad = 5, not at
    # 3 + 3 = 6): divisors 3, 3, 2 holding 2, 3, 1 real pixels. Padded positions inside
    # H + pad count in the divisor but add 0; positions beyond H + pad do not count.
    per_axis = np.array([2 / 3, 3 / 3, 1 / 2])
    expected = np.outer(per_axis, per_axis)
    close(y[0, 0], expected)


def test_max_pool_gradient_goes_to_first_max_on_ties():
    """All-equal inputs: every window's gradient lands on its first (top-left) element, as
    Caffe's strict `>` scan does; padded positions never win."""
    for k, s, p in [((3, 3), (2, 2), (0, 0)), ((3, 3), (2, 2), (1, 1)), ((2, 2), (1, 1), (0, 0))]:
        layer = make(_pool_text("MAX", k, s, p), (1, 2, 5, 5))
        x = np.full((1, 2, 5, 5), 0.5, np.float32)
        x[0, 1, 2:4, 1:3] = 2.0  # a tied 2x2 plateau in channel 1
        ref_y, _ = pool_ref(x, k, s, p, "MAX")
        dy = np.arange(1, ref_y.size + 1, dtype=np.float32).reshape(ref_y.shape)
        _, ref_dx = pool_ref(x, k, s, p, "MAX", dy=dy)
        _, dx, _ = run_vjp(layer, x, dy)
        np.testing.assert_array_equal(np.asarray(dx), ref_dx.astype(np.float32))


def test_global_pooling():
    layer = make('name: "g" type: "Pooling" pooling_param { pool: AVE global_pooling: true }', (2, 3, 5, 4))
    x = rand(2, 3, 5, 4, seed=10)
    (y,) = run(layer, [x])
    assert layer.top_shapes == [(2, 3, 1, 1)]
    close(y, x.astype(np.float64).mean(axis=(2, 3), keepdims=True))
    layer = make('name: "g" type: "Pooling" pooling_param { pool: MAX global_pooling: true }', (2, 3, 5, 4))
    close(run(layer, [x])[0], x.max(axis=(2, 3), keepdims=True))


@pytest.mark.parametrize("text,msg", [
    ("pool: STOCHASTIC kernel_size: 2", "STOCHASTIC is not supported"),
    ("pool: MAX", "kernel_size OR kernel_h"),
    ("pool: MAX kernel_size: 2 pad: 2", "smaller than the kernel"),
    ("pool: AVE global_pooling: true kernel_size: 2", "cannot be specified"),
    ("pool: MAX kernel_h: 2", "both kernel_h and kernel_w"),
])
def test_pooling_rejects_bad_params(text, msg):
    with pytest.raises(ImagenetError, match=msg):
        make(f'name: "p" type: "Pooling" pooling_param {{ {text} }}', (1, 1, 6, 6))


# -- LRN ----------------------------------------------------------------------------------
def lrn_across_ref(x, n, alpha, beta, k, dy):
    """lrn_layer.cpp CrossChannelForward_cpu / CrossChannelBackward_cpu in float64."""
    x, dy = x.astype(np.float64), dy.astype(np.float64)
    c = x.shape[1]
    pre = (n - 1) // 2
    scale = np.full_like(x, k)
    for ch in range(c):
        for j in range(ch - pre, ch - pre + n):
            if 0 <= j < c:
                scale[:, ch] += alpha / n * x[:, j] ** 2
    y = x * scale ** -beta
    # bottom_diff = top_diff * scale^-beta - 2*alpha*beta/n * x * sum_{c' : c in window(c')}
    #               top_diff[c'] * top[c'] / scale[c']
    ratio = dy * y / scale
    acc = np.zeros_like(x)
    for ch in range(c):
        for j in range(ch - (n - 1 - pre), ch + pre + 1):
            if 0 <= j < c:
                acc[:, ch] += ratio[:, j]
    dx = dy * scale ** -beta - 2 * alpha * beta / n * x * acc
    return y, dx


@pytest.mark.parametrize("n,alpha,beta,k,c", [
    (5, 1e-4, 0.75, 1.0, 7),     # AlexNet's settings, more channels than the window
    (3, 0.5, 0.75, 2.0, 2),      # window wider than the channel count: both edges padded
    (5, 0.3, 0.6, 1.5, 6),       # generic beta (pow path)
])
def test_lrn_across_channels(n, alpha, beta, k, c):
    layer = make(f'name: "n" type: "LRN" lrn_param {{ local_size: {n} alpha: {alpha} beta: {beta} k: {k} }}',
                 (2, c, 3, 4))
    x = 3 * rand(2, c, 3, 4, seed=11)
    dy = rand(2, c, 3, 4, seed=12)
    ref_y, ref_dx = lrn_across_ref(x, n, alpha, beta, k, dy)
    y, dx, _ = run_vjp(layer, x, dy)
    close(y, ref_y)
    close(dx, ref_dx, 1e-5)


def test_lrn_within_channel():
    n, alpha, beta = 3, 0.7, 0.75
    layer = make(f'name: "n" type: "LRN" lrn_param {{ local_size: {n} alpha: {alpha} beta: {beta} '
                 'norm_region: WITHIN_CHANNEL k: 5 }', (2, 2, 5, 4))
    x = 2 * rand(2, 2, 5, 4, seed=13)
    x64 = x.astype(np.float64)
    # Caffe: AVE pool of x^2 (kernel n, pad (n-1)/2, stride 1: divisor n*n everywhere),
    # then (1 + alpha * pooled)^-beta; k is not used in this mode.
    sq = np.pad(x64 ** 2, ((0, 0), (0, 0), (1, 1), (1, 1)))
    pooled = np.zeros_like(x64)
    for i in range(n):
        for j in range(n):
            pooled += sq[:, :, i:i + 5, j:j + 4]
    ref = x64 * (1 + alpha * pooled / (n * n)) ** -beta
    (y,) = run(layer, [x])
    close(y, ref)


def test_lrn_rejects_even_local_size():
    with pytest.raises(ImagenetError, match="odd values for local_size"):
        make('name: "n" type: "LRN" lrn_param { local_size: 4 }', (1, 4, 3, 3))
