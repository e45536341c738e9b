"""Fast, numerically faithful compute kernels for XLA's CPU backend.

Measured on this project's 2-core AMD Zen 3 (AVX2) machines (../shared/docs/MACHINE_NOTES.md
and benchmarks/layers.py), XLA's CPU code ran convolution *weight gradients* at 9-45 GFLOP/s
against ~110 GFLOP/s for a large float32 matmul, grouped convolutions (feature_group_count)
several times slower than the same work split per group, and max-pool's backward
(select_and_scatter) ~3.5x slower than PyTorch's. On AVX-512 machines jax 0.10's XLA hands
convolutions to YNNPACK, and which pass is faster changes with the CPU and the dtype. This
module owns drop-in replacements and lets the machine choose among them (model/autotune.py):

- `conv2d`: Caffe's convolution (src/caffe/layers/base_conv_layer.cpp, util/im2col.cpp), each
  group computed separately (Caffe's `group`: the same arithmetic as per-group convolutions).
  A `ConvPlan` says how each pass runs: forward as XLA's convolution or im2col + one GEMM;
  input gradient as XLA's transposed convolution or W^T @ dY + col2im; weight gradient as the
  GEMM dW = dY @ cols^T or XLA's own (a `jax.custom_vjp`; the all-XLA plan is plain XLA).
  For 3x3 stride-1 float32 convolutions any pass can also be Winograd's F(2x2, 3x3) (52%
  of the multiplications on AlexNet's 13x13 layers).
  Which plan is fastest depends on the CPU and shape: model/autotune.py measures them once
  per machine; `heuristic_plan` is the rule for shapes nobody measured.
- `max_pool2d`: Caffe's MAX pooling (src/caffe/layers/pooling_layer.cpp): ceil-mode output
  size, windows clipped to the image, and a backward that routes each output gradient to the
  FIRST maximum of its window in row-major order (Caffe's strict `>` scan, its `mask`), as a
  first-max index computed in the forward pass, scattered back by unstrided pads into the
  stride x stride phases of the image: no select_and_scatter.

Results equal the plain `lax` reference up to float32 summation order (tests/model/
test_kernels.py). Both are pure, jittable functions of arrays in Caffe's NCHW layout and
weights in Caffe's (num_output, channels/group, kh, kw) layout.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Pair = tuple[int, int]
# Full float32 GEMMs on every backend (TF32 on a GPU would break "equal within float32
# rounding"); on CPU this is what XLA does anyway.
GEMM_PRECISION = lax.Precision.HIGHEST

# How each pass of a convolution is computed. Forward: "lax" = XLA's own convolution (on CPU a
# library call: YNNPACK in jax 0.10) or "gemm" = Caffe's im2col + one GEMM. Input gradient:
# "lax" = XLA's transposed convolution or "col2im" = the GEMM W^T @ dY and Caffe's col2im
# scatter-add. Weight gradient: "gemm" = dY @ cols^T or "lax" = XLA's own. "winograd", in any
# pass, is Winograd's F(2x2, 3x3) (`winograd_applies` says for which convolutions).
FORWARD_METHODS = ("lax", "gemm", "winograd")
INPUT_GRAD_METHODS = ("lax", "col2im", "winograd")
WEIGHT_GRAD_METHODS = ("gemm", "lax", "winograd")


@dataclass(frozen=True)
class ConvPlan:
    """Which implementation each pass of `conv2d` uses. The all-"lax" plan is XLA's convolution
    differentiated by XLA itself (no custom gradient at all)."""

    forward: str = "lax"
    input_grad: str = "lax"
    weight_grad: str = "gemm"

    def __post_init__(self) -> None:
        for what, value, valid in (("forward", self.forward, FORWARD_METHODS),
                                   ("input_grad", self.input_grad, INPUT_GRAD_METHODS),
                                   ("weight_grad", self.weight_grad, WEIGHT_GRAD_METHODS)):
            if value not in valid:
                raise ValueError(f"ConvPlan.{what} {value!r}; valid: {valid}")

    @property
    def name(self) -> str:
        """`fwd=gemm dx=col2im dw=gemm`: how plans are written in caches and benchmarks."""
        return f"fwd={self.forward} dx={self.input_grad} dw={self.weight_grad}"

    @classmethod
    def parse(cls, name: str) -> "ConvPlan":
        """The inverse of `name` (ValueError on anything else)."""
        fields = dict(part.split("=", 1) for part in name.split() if "=" in part)
        if sorted(fields) != ["dw", "dx", "fwd"]:
            raise ValueError(f"not a ConvPlan name: {name!r} (want 'fwd=.. dx=.. dw=..')")
        return cls(fields["fwd"], fields["dx"], fields["dw"])

    @property
    def uses_winograd(self) -> bool:
        return "winograd" in (self.forward, self.input_grad, self.weight_grad)

    @property
    def is_xla(self) -> bool:
        return (self.forward, self.input_grad, self.weight_grad) == ("lax", "lax", "lax")


DEFAULT_PLAN = ConvPlan(forward="lax", input_grad="col2im")
GEMM_PLAN = ConvPlan(forward="gemm", input_grad="col2im")
XLA_PLAN = ConvPlan(forward="lax", input_grad="lax", weight_grad="lax")
WINOGRAD_PLAN = ConvPlan(forward="winograd", input_grad="winograd", weight_grad="winograd")
# Every combination of the direct methods: what model/autotune.py measures on each machine,
# with WINOGRAD_PLANS added where `winograd_applies`.
CANDIDATE_PLANS = tuple(ConvPlan(f, d, w) for f in FORWARD_METHODS[:2]
                        for d in INPUT_GRAD_METHODS[:2] for w in WEIGHT_GRAD_METHODS[:2])
WINOGRAD_PLANS = (WINOGRAD_PLAN, ConvPlan("winograd", "winograd", "gemm"))
# Largest kernel area whose stride-1 forward goes through im2col + GEMM (the built-in rule).
GEMM_FORWARD_MAX_AREA = 9


def heuristic_plan(stride: Pair, kernel: Pair = (1, 1)) -> ConvPlan:
    """The built-in rule, measured on a 2-core AMD EPYC Zen 3 (AVX2) with benchmarks/layers.py
    at batch 32 under jemalloc (benchmarks/README.md): the input gradient as GEMM + col2im beat
    XLA's transposed convolution on every AlexNet shape (conv2 72 vs 126 ms per group, conv3
    82 vs 101, conv4 31 vs 41, conv5 25 vs 36); the forward as im2col + GEMM won for strided
    convolutions (conv1: XLA's stride-4 convolution 2.7x slower) and 3x3 kernels (conv3 82 vs
    104 ms), whose columns the weight gradient reuses; XLA's own forward won for conv2's 5x5.
    Other CPUs differ: model/autotune.py measures the candidates once per machine, and this
    rule is only what a shape nobody measured gets."""
    if max(stride) > 1 or kernel[0] * kernel[1] <= GEMM_FORWARD_MAX_AREA:
        return GEMM_PLAN
    return DEFAULT_PLAN


# -- GEMMs --------------------------------------------------------------------------------
def _gemm(a: jax.Array, b: jax.Array, contracting: tuple[tuple[int], tuple[int]]
          ) -> jax.Array:
    """a . b over the `contracting` axes, full precision. bfloat16 operands are multiplied as
    bfloat16 with float32 sums, the result rounded to bfloat16: asked for plainly (bf16 in,
    bf16 out), jax 0.10's XLA:CPU converts both operands to float32 first and runs a float32
    GEMM; with a float32 result type it hands the bf16 operands to YNNPACK (avx512_bf16 / AMX
    dot products). 2048^3 on the 2-core Zen 4: 56 vs 25 GFLOP/s (float32 31), under load."""
    dims = (contracting, ((), ()))
    if a.dtype == jnp.bfloat16 and b.dtype == jnp.bfloat16:
        return lax.dot_general(a, b, dims, precision=GEMM_PRECISION,
                               preferred_element_type=jnp.float32).astype(jnp.bfloat16)
    return lax.dot_general(a, b, dims, precision=GEMM_PRECISION)


@jax.custom_vjp
def _bf16_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    return _gemm(x, w, ((1,), (0,)))


def _bf16_matmul_fwd(x, w):
    return _gemm(x, w, ((1,), (0,))), (x, w)


def _bf16_matmul_bwd(res, ct):
    # JAX's own transpose of a bf16 -> f32 dot multiplies a float32 cotangent by the bf16
    # operand: the slow float32 GEMM again. Here both gradients stay bf16 x bf16.
    x, w = res
    ct = ct.astype(jnp.bfloat16)
    return _gemm(ct, w, ((1,), (1,))), _gemm(x, ct, ((0,), (0,)))


_bf16_matmul.defvjp(_bf16_matmul_fwd, _bf16_matmul_bwd)


def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x (M, K) @ w (K, N) at full float32 precision; for bfloat16 operands a bf16 GEMM with
    float32 sums in both passes (see _gemm). Caffe's InnerProduct is this GEMM."""
    if x.dtype == jnp.bfloat16 and w.dtype == jnp.bfloat16:
        return _bf16_matmul(x, w)
    return jnp.dot(x, w, precision=GEMM_PRECISION)


def _pair(v: int | Sequence[int], name: str) -> Pair:
    if isinstance(v, (int, np.integer)):
        return int(v), int(v)
    t = tuple(int(a) for a in v)
    if len(t) != 2:
        raise ValueError(f"{name} must be an int or a pair, got {v!r}")
    return t  # type: ignore[return-value]


def conv_output_hw(hw: Pair, kernel: Pair, stride: Pair, pad: Pair, dilation: Pair) -> Pair:
    """Caffe's convolution output size (base_conv_layer.cpp compute_output_shape)."""
    out = []
    for size, k, s, p, d in zip(hw, kernel, stride, pad, dilation):
        extent = d * (k - 1) + 1
        out.append((size + 2 * p - extent) // s + 1)
    return out[0], out[1]


# -- im2col ------------------------------------------------------------------------------
def _im2col(x: jax.Array, kernel: Pair, stride: Pair, pad: Pair, dilation: Pair) -> jax.Array:
    """(N, C, H, W) -> (N, C*kh*kw, Ho*Wo), rows ordered (c, i, j) like Caffe's im2col_cpu
    so that a weight blob (O, C, kh, kw) reshaped to (O, C*kh*kw) multiplies it directly."""
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, pad, dilation
    ho, wo = conv_output_hw((h, w), kernel, stride, pad, dilation)
    xp = jnp.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw))) if (ph or pw) else x
    slices = []
    for i in range(kh):
        for j in range(kw):
            hs, ws = i * dh, j * dw
            slices.append(
                lax.slice(
                    xp,
                    (0, 0, hs, ws),
                    (n, c, hs + (ho - 1) * sh + 1, ws + (wo - 1) * sw + 1),
                    (1, 1, sh, sw),
                )
            )
    cols = jnp.stack(slices, axis=2)  # (N, C, kh*kw, Ho, Wo)
    return cols.reshape(n, c * kh * kw, ho * wo)


def _channels_first_padded(x: jax.Array, rows: Pair, cols: Pair) -> jax.Array:
    """(N, C, H, W) -> (C, N, H', W') zero-padded by (low, high) rows and columns (a negative
    high crops): the layout the column and Winograd builders slice."""
    return lax.pad(jnp.transpose(x, (1, 0, 2, 3)), jnp.array(0, x.dtype),
                   ((0, 0, 0), (0, 0, 0), (rows[0], rows[1], 0), (cols[0], cols[1], 0)))


def _im2col_kn(x: jax.Array, kernel: Pair, stride: Pair, pad: Pair, dilation: Pair) -> jax.Array:
    """(N, C, H, W) -> (C*kh*kw, N*Ho*Wo): Caffe's column buffer for the whole batch, columns
    ordered (n, oh, ow), so that no transposing copy of the (large) columns is needed before
    the GEMMs; rows ordered (c, i, j) for stride 1 and as `_col_blocks` says for a strided
    convolution (`_weight_rows` orders the weights to match).

    Built from stride-1 slices only, which XLA's CPU code copies as whole rows: a strided
    convolution first splits the padded input into stride x stride phases (space-to-depth),
    so that window element (i, j) of output (oh, ow), input row s*oh + i, is row oh + i // s
    of phase i % s (measured on AlexNet's shapes: 5-10x faster than strided slices of the
    image stacked and transposed into this order). Each (i // s, j // s) then takes one slice
    of all the phases at once: conv1's 11x11 stride-4 columns from 9 slices instead of 121
    (XLA's concatenation slows down with the number of pieces: 22 vs 28-36 ms at batch 32)."""
    if dilation != (1, 1):
        return _im2col_kn_dilated(x, kernel, stride, pad, dilation)
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, pad
    ho, wo = conv_output_hw((h, w), kernel, stride, pad, dilation)
    # Rows and columns a window can reach, rounded up to whole phases; lax.pad crops (negative
    # high padding) what no window reads.
    hs, ws = sh * (ho + (kh - 1) // sh), sw * (wo + (kw - 1) // sw)
    xt = _channels_first_padded(x, (ph, hs - h - ph), (pw, ws - w - pw))
    if max(stride) > 1:
        # (C, phase row a, phase column b, N, H/sh, W/sw)
        phases = jnp.transpose(xt.reshape(c, n, hs // sh, sh, ws // sw, sw), (0, 3, 5, 1, 2, 4))
        # Each block keeps its (N, Ho, Wo) axes until the end: merged into one axis before
        # the concatenation, XLA's index arithmetic made it 40 ms instead of 22 for conv1.
        return jnp.concatenate(
            [phases[:, :na, :nb, :, qi:qi + ho, qj:qj + wo].reshape(c * na * nb, n, ho, wo)
             for qi, qj, na, nb in _col_blocks(kernel, stride)], axis=0).reshape(-1, n * ho * wo)
    rows = []
    for i in range(kh):
        band = lax.slice_in_dim(xt, i, i + ho, axis=2)  # (C, N, Ho, W)
        rows.append(jnp.stack([lax.slice_in_dim(band, j, j + wo, axis=3) for j in range(kw)],
                              axis=1))  # (C, kw, N, Ho, Wo)
    return jnp.stack(rows, axis=1).reshape(c * kh * kw, n * ho * wo)


def _col_blocks(kernel: Pair, stride: Pair) -> list[tuple[int, int, int, int]]:
    """The row blocks of a strided convolution's columns, in order: (qi, qj, na, nb) holds
    window elements i = sh*qi + a, j = sw*qj + b for a < na, b < nb, its rows ordered
    (c, a, b)."""
    (kh, kw), (sh, sw) = kernel, stride
    return [(qi, qj, min(sh, kh - sh * qi), min(sw, kw - sw * qj))
            for qi in range(-(-kh // sh)) for qj in range(-(-kw // sw))]


def _weight_rows(w: jax.Array, stride: Pair, dilation: Pair) -> jax.Array:
    """(O, C, kh, kw) -> (O, C*kh*kw) with columns in `_im2col_kn`'s row order."""
    o = w.shape[0]
    if max(stride) == 1 or dilation != (1, 1):
        return w.reshape(o, -1)
    sh, sw = stride
    return jnp.concatenate(
        [w[:, :, sh * qi:sh * qi + na, sw * qj:sw * qj + nb].reshape(o, -1)
         for qi, qj, na, nb in _col_blocks((w.shape[2], w.shape[3]), stride)], axis=1)


def _weight_from_rows(rows: jax.Array, w_shape: tuple[int, ...], stride: Pair,
                      dilation: Pair) -> jax.Array:
    """The inverse of `_weight_rows` (for the weight gradient)."""
    if max(stride) == 1 or dilation != (1, 1):
        return rows.reshape(w_shape)
    o, c, kh, kw = w_shape
    parts: dict[tuple[int, int], jax.Array] = {}
    start = 0
    for qi, qj, na, nb in _col_blocks((kh, kw), stride):
        parts[qi, qj] = rows[:, start:start + c * na * nb].reshape(o, c, na, nb)
        start += c * na * nb
    qh, qw = -(-kh // stride[0]), -(-kw // stride[1])
    return jnp.concatenate([jnp.concatenate([parts[qi, qj] for qj in range(qw)], axis=3)
                            for qi in range(qh)], axis=2)


def _im2col_kn_dilated(x: jax.Array, kernel: Pair, stride: Pair, pad: Pair, dilation: Pair
                       ) -> jax.Array:
    """`_im2col_kn` for dilated kernels (none in the model zoo): strided slices, stacked."""
    n, c, _, _ = x.shape
    cols = _im2col(jnp.transpose(x, (1, 0, 2, 3)).reshape(1, c * n, *x.shape[2:]),
                   kernel, stride, pad, dilation)  # (1, C*N*kh*kw, P) ordered (c, n, i, j)
    kk = kernel[0] * kernel[1]
    p = cols.shape[-1]
    return jnp.transpose(cols.reshape(c, n, kk, p), (0, 2, 1, 3)).reshape(c * kk, n * p)


def _lax_conv(x: jax.Array, w: jax.Array, stride: Pair, pad: Pair, dilation: Pair) -> jax.Array:
    return lax.conv_general_dilated(
        x, w, window_strides=stride, padding=[(pad[0], pad[0]), (pad[1], pad[1])],
        rhs_dilation=dilation, dimension_numbers=("NCHW", "OIHW", "NCHW"),
        precision=GEMM_PRECISION,
    )


def _gemm_conv(x: jax.Array, w: jax.Array, stride: Pair, pad: Pair, dilation: Pair
               ) -> tuple[jax.Array, jax.Array]:
    """Forward by im2col + GEMM; also returns the columns, which the weight gradient reuses."""
    n, _, h, wd = x.shape
    o = w.shape[0]
    kernel = (w.shape[2], w.shape[3])
    ho, wo = conv_output_hw((h, wd), kernel, stride, pad, dilation)
    cols = _im2col_kn(x, kernel, stride, pad, dilation)  # (K, N*P)
    # (O, K) @ (K, N*P): one GEMM over the whole batch (Caffe's forward_cpu_gemm per image).
    y = _gemm(_weight_rows(w, stride, dilation), cols, ((1,), (0,)))
    return jnp.transpose(y.reshape(o, n, ho, wo), (1, 0, 2, 3)), cols


# -- Winograd F(2x2, 3x3) ----------------------------------------------------------------
# Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks" (CVPR 2016): each 2x2
# block of outputs is computed from a 4x4 input tile with 16 multiplications per (input,
# output) channel pair where the direct convolution needs 36: Y = A^T [(G g G^T) . (B^T d B)] A.
# The 16 products of every tile are one batched GEMM (16, O, C) @ (16, C, tiles); the
# transforms are additions and halvings. All three passes of a 3x3 stride-1 convolution have
# this form: the input gradient is the convolution of dY with the flipped, transposed
# filters, and the weight gradient is the GEMM of the transformed dY (A dY A^T) with the
# forward's transformed tiles, summed over the tiles and mapped back by G^T . G. AlexNet's
# conv3-5 at 13x13: 7x7 tiles cover 14x14, so the GEMMs do 16 * 49 / (9 * 169) = 52% of the
# direct multiplications; float32 error against float64 was 3-9e-7 of the output's scale, as
# for im2col + GEMM (tests/model/test_kernels.py). The transposed transforms are written out
# like the forward ones: jax.linear_transpose of the forward's made one zero-padded
# full-size array per tile position and summed them (conv3's weight gradient 20 ms slower
# than the im2col GEMM's instead of faster).
def winograd_applies(kernel: Sequence[int], stride: Sequence[int], pad: Sequence[int],
                     dilation: Sequence[int], dtype: object = jnp.float32) -> bool:
    """Whether the Winograd methods can compute this convolution: 3x3 kernels, stride 1, no
    dilation, padding 0-2 (the input gradient pads dY by 2 - pad), float32 (bfloat16
    transforms would round away what the fewer multiplications gain)."""
    return (tuple(kernel) == (3, 3) and tuple(stride) == (1, 1) and tuple(dilation) == (1, 1)
            and max(pad) <= 2 and min(pad) >= 0 and jnp.dtype(dtype) == jnp.float32)


def candidate_plans(kernel: Sequence[int], stride: Sequence[int], pad: Sequence[int],
                    dilation: Sequence[int], dtype: object) -> tuple[ConvPlan, ...]:
    """The plans model/autotune.py times for a convolution of this geometry."""
    if winograd_applies(kernel, stride, pad, dilation, dtype):
        return CANDIDATE_PLANS + WINOGRAD_PLANS
    return CANDIDATE_PLANS


def _winograd_tiles(hw: Pair, pad: Pair) -> tuple[int, int, int, int]:
    """Output height and width of the 3x3 stride-1 convolution, and tiles per axis."""
    ho, wo = hw[0] + 2 * pad[0] - 2, hw[1] + 2 * pad[1] - 2
    return ho, wo, -(-ho // 2), -(-wo // 2)


def _winograd_bt(d: Sequence[jax.Array]) -> list[jax.Array]:
    """B^T applied along one axis of a tile, given its 4 rows (or columns) d0..d3."""
    return [d[0] - d[2], d[1] + d[2], d[2] - d[1], d[1] - d[3]]


def _winograd_input(x: jax.Array, pad: Pair) -> jax.Array:
    """(N, C, H, W) -> V (16, C, N*th*tw): B^T d B of every 4x4 tile (tiles 2 apart), in the
    (c, n, tile) column order the batched GEMM takes without a transposing copy. The tiles
    are read from the 2x2 phases of the padded input (row 2t + a is row t + a // 2 of phase
    a % 2), so every slice is unstrided (see `_im2col_kn`)."""
    n, c, h, w = x.shape
    _, _, th, tw = _winograd_tiles((h, w), pad)
    xt = _channels_first_padded(x, (pad[0], 2 * th + 2 - h - pad[0]),
                                (pad[1], 2 * tw + 2 - w - pad[1]))
    phases = xt.reshape(c, n, th + 1, 2, tw + 1, 2)
    rows = [phases[:, :, a // 2:a // 2 + th, a % 2] for a in range(4)]  # (C, N, th, tw+1, 2)
    out = []
    for r in _winograd_bt(rows):
        out += _winograd_bt([r[:, :, :, b // 2:b // 2 + tw, b % 2] for b in range(4)])
    return jnp.stack(out).reshape(16, c, n * th * tw)


def _winograd_g(g: Sequence[jax.Array]) -> list[jax.Array]:
    """G applied along one axis of a 3x3 filter, given its 3 rows (or columns) g0..g2."""
    half = [v * 0.5 for v in g]
    return [g[0], half[0] + half[1] + half[2], half[0] - half[1] + half[2], g[2]]


def _winograd_filter(w: jax.Array) -> jax.Array:
    """(O, C, 3, 3) -> U (16, O, C): G g G^T of every filter, written out as sums (an einsum
    with G took 7.4 ms for conv3's filters, as much as the input's transform)."""
    o, c = w.shape[:2]
    out = []
    for r in _winograd_g([w[:, :, i, :] for i in range(3)]):  # (O, C, 3) each
        out += _winograd_g([r[:, :, j] for j in range(3)])
    return jnp.stack(out).reshape(16, o, c)


def _winograd_output(m: jax.Array, n: int, ho: int, wo: int) -> jax.Array:
    """M (16, O, N*th*tw) -> (N, O, ho, wo): A^T m A of every tile, interleaved into the
    image and cropped to the output size."""
    o = m.shape[1]
    th, tw = -(-ho // 2), -(-wo // 2)
    m = m.reshape(4, 4, o, n, th, tw)
    t = [m[0] + m[1] + m[2], m[1] - m[2] - m[3]]  # A^T along the tile's rows: (4, O, N, th, tw)
    y = jnp.stack([jnp.stack([r[0] + r[1] + r[2], r[1] - r[2] - r[3]], axis=-1) for r in t],
                  axis=3)  # (O, N, th, 2, tw, 2)
    y = y.reshape(o, n, 2 * th, 2 * tw)[:, :, :ho, :wo]
    return jnp.transpose(y, (1, 0, 2, 3))


def _winograd_conv(x: jax.Array, w: jax.Array, pad: Pair) -> tuple[jax.Array, jax.Array]:
    """3x3 stride-1 convolution by F(2x2, 3x3); also returns the transformed input tiles V,
    which the Winograd weight gradient reuses."""
    n, _, h, wd = x.shape
    ho, wo, _, _ = _winograd_tiles((h, wd), pad)
    v = _winograd_input(x, pad)
    m = lax.dot_general(_winograd_filter(w), v, (((2,), (1,)), ((0,), (0,))),
                        precision=GEMM_PRECISION)  # (16, O, tiles)
    return _winograd_output(m, n, ho, wo), v


def _winograd_input_grad(dy: jax.Array, w: jax.Array, pad: Pair) -> jax.Array:
    """dX of a 3x3 stride-1 convolution: dY convolved with the filters flipped and with input
    and output channels swapped, padded by 2 - pad (the full correlation, cropped)."""
    w_t = jnp.transpose(jnp.flip(w, (2, 3)), (1, 0, 2, 3))
    return _winograd_conv(dy, w_t, (2 - pad[0], 2 - pad[1]))[0]


def _winograd_at_t(d: Sequence[jax.Array]) -> list[jax.Array]:
    """The transpose of A^T along one axis: a tile's 2 output rows -> its 4 product rows."""
    return [d[0], d[0] + d[1], d[0] - d[1], -d[1]]


def _winograd_g_t(u: Sequence[jax.Array]) -> list[jax.Array]:
    """The transpose of G along one axis: 4 transformed rows -> the filter's 3 rows."""
    h1, h2 = u[1] * 0.5, u[2] * 0.5
    return [u[0] + h1 + h2, h1 - h2, h1 + h2 + u[3]]


def _winograd_weight_grad(dy: jax.Array, v: jax.Array) -> jax.Array:
    """dW (O, C, 3, 3) from dY and the forward's transformed tiles V (16, C, tiles): the
    transposed output transform of dY, the GEMM dU = dM @ V^T summed over every tile, and the
    transposed filter transform."""
    n, o, ho, wo = dy.shape
    th, tw = -(-ho // 2), -(-wo // 2)
    d = _channels_first_padded(dy, (0, 2 * th - ho), (0, 2 * tw - wo)).reshape(o, n, th, 2, tw, 2)
    out = []
    for r in _winograd_at_t([d[:, :, :, 0], d[:, :, :, 1]]):  # (O, N, th, tw, 2) each
        out += _winograd_at_t([r[..., 0], r[..., 1]])
    dm = jnp.stack(out).reshape(16, o, n * th * tw)
    du = lax.dot_general(dm, v, (((2,), (2,)), ((0,), (0,))), precision=GEMM_PRECISION)
    du = du.reshape(4, 4, o, -1)
    rows = _winograd_g_t([du[a] for a in range(4)])  # (4, O, C) each, over the columns
    return jnp.stack([jnp.stack(_winograd_g_t([r[b] for b in range(4)]), axis=-1)
                      for r in rows], axis=-2)


def _lax_conv_any(x: jax.Array, w: jax.Array, stride: Pair, pad: Pair, dilation: Pair,
                  plan: ConvPlan) -> jax.Array:
    return _lax_conv(x, w, stride, pad, dilation)


def _conv_primal(x: jax.Array, w: jax.Array, stride: Pair, pad: Pair, dilation: Pair,
                 plan: ConvPlan) -> jax.Array:
    if plan.forward == "gemm":
        return _gemm_conv(x, w, stride, pad, dilation)[0]
    if plan.forward == "winograd":
        return _winograd_conv(x, w, pad)[0]
    return _lax_conv(x, w, stride, pad, dilation)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _conv_single(
    x: jax.Array, w: jax.Array, stride: Pair, pad: Pair, dilation: Pair, plan: ConvPlan
) -> jax.Array:
    return _conv_primal(x, w, stride, pad, dilation, plan)


def _conv_single_fwd(x, w, stride, pad, dilation, plan):
    if plan.forward == "gemm" and plan.weight_grad == "gemm":
        # The GEMM forward's columns are kept for the weight gradient (conv1's: 140 MB at
        # batch 32, and one im2col fewer per step).
        y, cols = _gemm_conv(x, w, stride, pad, dilation)
        return y, (x, w, cols)
    if plan.forward == "winograd" and plan.weight_grad == "winograd":
        # Likewise the transformed tiles V (conv3's: 26 MB at batch 32).
        y, v = _winograd_conv(x, w, pad)
        return y, (x, w, v)
    return _conv_primal(x, w, stride, pad, dilation, plan), (x, w, None)


def _conv_single_bwd(stride, pad, dilation, plan, res, dy):
    x, w, kept = res  # the forward's im2col columns or Winograd tiles, or None
    o = w.shape[0]
    kernel = (w.shape[2], w.shape[3])
    n = x.shape[0]
    dy_t = None
    if plan.weight_grad == "gemm" or plan.input_grad == "col2im":
        # dY in the (O, N*P) layout both GEMMs take.
        dy_t = jnp.transpose(dy.reshape(n, o, -1), (1, 0, 2)).reshape(o, -1)
    if plan.weight_grad == "gemm":
        cols_kn = kept
        if cols_kn is None:
            # No columns kept by the forward: built here, in the (K, N*P) layout that feeds
            # the GEMM without a transposing copy.
            cols_kn = _im2col_kn(x, kernel, stride, pad, dilation)  # (K, N*P)
        # dW = dY (O, N*P) @ cols^T: one GEMM over the whole batch (Caffe: one per image).
        dw = _weight_from_rows(_gemm(dy_t, cols_kn, ((1,), (1,))), w.shape, stride, dilation)
    elif plan.weight_grad == "winograd":
        dw = _winograd_weight_grad(dy, kept if kept is not None else _winograd_input(x, pad))
    else:
        _, dw_vjp = jax.vjp(lambda b: _lax_conv(x, b, stride, pad, dilation), w)
        (dw,) = dw_vjp(dy)
    if plan.input_grad == "col2im":
        # Caffe's backward_cpu_gemm: dcols = W^T dY, then col2im, the transpose of im2col
        # (here XLA's transpose of `_im2col_kn`: the slices' pads summed), in the (K, N*P)
        # layout dY already has for the weight gradient.
        dcols = _gemm(_weight_rows(w, stride, dilation), dy_t, ((0,), (0,)))  # (K, N*P)
        _, im2col_vjp = jax.vjp(lambda a: _im2col_kn(a, kernel, stride, pad, dilation), x)
        (dx,) = im2col_vjp(dcols.astype(x.dtype))
    elif plan.input_grad == "winograd":
        dx = _winograd_input_grad(dy, w, pad)
    else:
        _, conv_vjp = jax.vjp(lambda a: _lax_conv(a, w, stride, pad, dilation), x)
        (dx,) = conv_vjp(dy)
    return dx, dw.astype(w.dtype)


_conv_single.defvjp(_conv_single_fwd, _conv_single_bwd)


def conv2d(
    x: jax.Array,
    w: jax.Array,
    b: jax.Array | None = None,
    stride: int | Sequence[int] = 1,
    pad: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    plan: ConvPlan | None = None,
) -> jax.Array:
    """Caffe's Convolution forward: x (N, C, H, W), w (O, C/groups, kh, kw), b (O,) or None.

    Same signature as model.layers.vision.conv2d. Groups are computed one by one (each a
    GEMM) and concatenated along channels, as Caffe's forward_cpu_gemm loops over groups.
    """
    stride_, pad_, dil_ = _pair(stride, "stride"), _pair(pad, "pad"), _pair(dilation, "dilation")
    c, o = x.shape[1], w.shape[0]
    if groups < 1 or c % groups or o % groups or w.shape[1] * groups != c:
        raise ValueError(
            f"conv2d: input channels {c}, weights {tuple(w.shape)} and groups {groups} disagree"
        )
    if plan is None:
        # Measured once per machine where that pays (model/autotune.py), else the built-in
        # rule. Imported here: autotune measures this module's own conv2d.
        from model import autotune

        plan = autotune.conv_plan(tuple(x.shape), tuple(w.shape), stride_, pad_, dil_, groups,
                                  jnp.dtype(x.dtype).name)
    if plan.uses_winograd and not winograd_applies(w.shape[2:], stride_, pad_, dil_, x.dtype):
        raise ValueError(f"conv2d: plan {plan.name!r} needs a 3x3 stride-1 float32 convolution "
                         f"with pad <= 2, not kernel {tuple(w.shape[2:])} stride {stride_} pad "
                         f"{pad_} dilation {dil_} {jnp.dtype(x.dtype).name}")
    # XLA's own plan is differentiated by XLA: no custom gradient to wrap it in.
    single = _lax_conv_any if plan.is_xla else _conv_single
    if groups == 1:
        y = single(x, w, stride_, pad_, dil_, plan)
    else:
        cg, og = c // groups, o // groups
        y = jnp.concatenate(
            [
                single(
                    x[:, g * cg:(g + 1) * cg], w[g * og:(g + 1) * og], stride_, pad_, dil_, plan
                )
                for g in range(groups)
            ],
            axis=1,
        )
    if b is not None:
        y = y + b.reshape(1, o, 1, 1).astype(y.dtype)
    return y


def conv2d_reference(
    x: jax.Array,
    w: jax.Array,
    b: jax.Array | None = None,
    stride: int | Sequence[int] = 1,
    pad: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
) -> jax.Array:
    """The plain lax convolution (feature_group_count) that `conv2d` must match."""
    stride_, pad_, dil_ = _pair(stride, "stride"), _pair(pad, "pad"), _pair(dilation, "dilation")
    y = lax.conv_general_dilated(
        x, w, window_strides=stride_, padding=[(pad_[0], pad_[0]), (pad_[1], pad_[1])],
        rhs_dilation=dil_, dimension_numbers=("NCHW", "OIHW", "NCHW"),
        feature_group_count=groups,
    )
    if b is not None:
        y = y + b.reshape(1, -1, 1, 1).astype(y.dtype)
    return y


# -- max pooling -------------------------------------------------------------------------
def pool_output_hw(hw: Pair, kernel: Pair, stride: Pair, pad: Pair) -> Pair:
    """Caffe's pooling output size (pooling_layer.cpp Reshape): ceil mode, minus one when
    the last window would start inside the padding."""
    out = []
    for size, k, s, p in zip(hw, kernel, stride, pad):
        o = -(-(size + 2 * p - k) // s) + 1
        if p > 0 and (o - 1) * s >= size + p:
            o -= 1
        out.append(o)
    return out[0], out[1]


def _window_pads(hw: Pair, kernel: Pair, stride: Pair, pad: Pair) -> tuple[Pair, Pair]:
    """(low, high) padding per axis that makes Caffe's ceil-mode windows fit exactly; high may
    be negative (the last rows are in no window) or exceed pad (the last window is clipped)."""
    out = pool_output_hw(hw, kernel, stride, pad)
    return tuple(  # type: ignore[return-value]
        (p, (o - 1) * s + k - size - p) for size, o, k, s, p in zip(hw, out, kernel, stride, pad)
    )


def _pool_windows(x: jax.Array, kernel: Pair, stride: Pair, pads: tuple[Pair, Pair]
                  ) -> list[jax.Array]:
    """The kh*kw strided views of x padded with -inf (so windows clipped to the image, as in
    Caffe's hstart/hend clipping, ignore the padding): window element (i, j) of every output."""
    n, c, h, w = x.shape
    (kh, kw), (sh, sw) = kernel, stride
    (plh, phh), (plw, phw) = pads
    ho, wo = (h + plh + phh - kh) // sh + 1, (w + plw + phw - kw) // sw + 1
    neg = jnp.array(-jnp.inf, x.dtype)
    # lax.pad takes negative high padding as a crop of the rows no window reaches.
    xp = lax.pad(x, neg, ((0, 0, 0), (0, 0, 0), (plh, phh, 0), (plw, phw, 0)))
    return [
        lax.slice(xp, (0, 0, i, j), (n, c, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1),
                  (1, 1, sh, sw))
        for i in range(kh) for j in range(kw)
    ]


@partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool(x: jax.Array, kernel: Pair, stride: Pair, pads: tuple[Pair, Pair]) -> jax.Array:
    views = _pool_windows(x, kernel, stride, pads)
    y = views[0]
    for v in views[1:]:
        y = jnp.maximum(y, v)
    return y


def _max_pool_fwd(x, kernel, stride, pads):
    views = _pool_windows(x, kernel, stride, pads)
    y = views[0]
    idx = jnp.zeros(y.shape, jnp.int8 if len(views) < 128 else jnp.int32)
    # Caffe scans the window row-major and replaces only on a strictly greater value, so the
    # first maximum wins: keep the index of the first element that beats the running max.
    for k, v in enumerate(views[1:], start=1):
        better = v > y
        y = jnp.where(better, v, y)
        idx = jnp.where(better, jnp.asarray(k, idx.dtype), idx)
    return y, (idx, x.shape)


def _max_pool_bwd(kernel, stride, pads, res, dy):
    idx, x_shape = res
    n, c, h, w = x_shape
    (kh, kw), (sh, sw) = kernel, stride
    (plh, _), (plw, _) = pads
    ho, wo = dy.shape[2], dy.shape[3]
    # The padded input as stride x stride phases (as `_im2col_kn` splits it): window element
    # (i, j) of output (oh, ow) is element (oh + i // sh, ow + j // sw) of phase
    # (i % sh, j % sw), so element (p, q) of that phase takes dY[p - i // sh, q - j // sw]
    # where the window's first maximum is (i, j); the phases are interleaved once at the end
    # (measured: pool1 1.8x, pool2 1.6x faster than interior-padding each of the kh*kw
    # contributions to the full image). dY and the indices are padded once (the indices with
    # -1, which no window element has) so that each contribution is a plain slice of them:
    # padding each contribution instead made XLA check bounds per element (pool1 forward +
    # backward 28.3 vs 9.5 ms, pool2 17.7 vs 6.6 at batch 32 on the 2-core Zen 4).
    hq, wq = ho + (kh - 1) // sh, wo + (kw - 1) // sw
    mh, mw = (kh - 1) // sh, (kw - 1) // sw
    zero = jnp.array(0, dy.dtype)
    grid = ((0, 0, 0), (0, 0, 0), (mh, hq - ho, 0), (mw, wq - wo, 0))
    dyp = lax.pad(dy, zero, grid)
    idxp = lax.pad(idx, jnp.array(-1, idx.dtype), grid)
    phases: dict[Pair, jax.Array] = {}
    for k in range(kh * kw):
        (qi, a), (qj, b) = divmod(k // kw, sh), divmod(k % kw, sw)
        rows, cols = slice(mh - qi, mh - qi + hq), slice(mw - qj, mw - qj + wq)
        contrib = jnp.where(idxp[:, :, rows, cols] == k, dyp[:, :, rows, cols], zero)
        phases[a, b] = contrib + phases[a, b] if (a, b) in phases else contrib
    none = jnp.zeros((n, c, hq, wq), dy.dtype)
    dxp = jnp.stack([jnp.stack([phases.get((a, b), none) for b in range(sw)], axis=-1)
                     for a in range(sh)], axis=3).reshape(n, c, hq * sh, wq * sw)
    # Back to the image: drop the low padding, crop or zero-fill the high side.
    return (lax.pad(dxp, zero, ((0, 0, 0), (0, 0, 0), (-plh, h + plh - hq * sh, 0),
                                (-plw, w + plw - wq * sw, 0))),)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def max_pool2d_windows(
    x: jax.Array, kernel: Pair, stride: Pair, pads: Sequence[tuple[int, int]]
) -> jax.Array:
    """MAX pooling with explicit window padding ((low, high) per axis, high possibly negative
    or beyond pad, as model.layers.vision.max_pool2d takes it; covers ceil and floor modes).
    Forward: max of the kh*kw strided views; gradient to each window's first maximum."""
    (plh, phh), (plw, phw) = (tuple(int(v) for v in p) for p in pads)
    kernel_, stride_ = _pair(kernel, "kernel"), _pair(stride, "stride")
    if min(plh, plw) < 0 or plh >= kernel_[0] or plw >= kernel_[1]:
        raise ValueError(f"max_pool2d: low padding {(plh, plw)} must be in [0, kernel {kernel_})")
    return _max_pool(x, kernel_, stride_, ((plh, phh), (plw, phw)))


def max_pool2d(
    x: jax.Array,
    kernel: int | Sequence[int],
    stride: int | Sequence[int] = 1,
    pad: int | Sequence[int] = 0,
) -> jax.Array:
    """Caffe MAX pooling of x (N, C, H, W) with Caffe's output size and first-max gradient."""
    kernel_, stride_, pad_ = _pair(kernel, "kernel"), _pair(stride, "stride"), _pair(pad, "pad")
    if pad_[0] >= kernel_[0] or pad_[1] >= kernel_[1]:
        # pooling_layer.cpp CHECK_LT(pad_h_, kernel_h_): a window inside the padding only.
        raise ValueError(f"max_pool2d: pad {pad_} must be smaller than kernel {kernel_}")
    pads = _window_pads((x.shape[2], x.shape[3]), kernel_, stride_, pad_)
    return _max_pool(x, kernel_, stride_, pads)


def max_pool2d_reference(
    x: jax.Array,
    kernel: int | Sequence[int],
    stride: int | Sequence[int] = 1,
    pad: int | Sequence[int] = 0,
) -> jax.Array:
    """reduce_window max with Caffe's output size (gradient: XLA's select_and_scatter)."""
    kernel_, stride_, pad_ = _pair(kernel, "kernel"), _pair(stride, "stride"), _pair(pad, "pad")
    h, w = x.shape[2], x.shape[3]
    ho, wo = pool_output_hw((h, w), kernel_, stride_, pad_)
    hi_h = (ho - 1) * stride_[0] + kernel_[0] - h - pad_[0]
    hi_w = (wo - 1) * stride_[1] + kernel_[1] - w - pad_[1]
    return lax.reduce_window(
        x, -jnp.inf, lax.max, (1, 1) + kernel_, (1, 1) + stride_,
        ((0, 0), (0, 0), (pad_[0], max(hi_h, 0)), (pad_[1], max(hi_w, 0))),
    )


__all__ = [
    "ConvPlan",
    "CANDIDATE_PLANS",
    "DEFAULT_PLAN",
    "GEMM_PLAN",
    "WINOGRAD_PLAN",
    "WINOGRAD_PLANS",
    "XLA_PLAN",
    "candidate_plans",
    "heuristic_plan",
    "matmul",
    "conv2d",
    "conv2d_reference",
    "conv_output_hw",
    "max_pool2d",
    "max_pool2d_reference",
    "max_pool2d_windows",
    "pool_output_hw",
    "winograd_applies",
]
