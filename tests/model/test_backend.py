"""model/backend.py: kernels and XLA options follow the platform a computation is compiled for
(a GPU gets XLA's own convolution and pooling and no XLA:CPU option; --gpu=-1 on a GPU host
gets the CPU kernels)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from model import backend, kernels
from model.layers import vision


def test_kernels_follow_the_platform_traced_for(monkeypatch) -> None:
    calls: list[str] = []
    real_conv, real_pool = kernels.conv2d, kernels.max_pool2d_windows

    def conv(*a, **k):
        calls.append("conv")
        return real_conv(*a, **k)

    def pool(*a, **k):
        calls.append("pool")
        return real_pool(*a, **k)

    monkeypatch.setattr(kernels, "conv2d", conv)
    monkeypatch.setattr(kernels, "max_pool2d_windows", pool)
    x, w = jnp.ones((2, 3, 8, 8)), jnp.ones((4, 3, 3, 3))

    def net(x, w):
        y = vision.conv2d(x, w, None, (1, 1), (1, 1), (1, 1), 1)
        return vision.max_pool2d(y, (2, 2), (2, 2), [(0, 0), (0, 0)])

    on_gpu = jax.make_jaxpr(backend.traced_for(net, "gpu"))(x, w)
    assert calls == [] and "conv_general_dilated" in str(on_gpu)
    assert "reduce_window_max" in str(on_gpu)
    jax.make_jaxpr(backend.traced_for(net, "cpu"))(x, w)
    assert calls == ["conv", "pool"]
    assert backend.platform() == jax.default_backend()  # outside a trace: the default


def test_xla_cpu_options_only_on_the_cpu() -> None:
    assert backend.train_step_options("cpu") == {
        "xla_cpu_copy_insertion_use_region_analysis": True}
    assert backend.train_step_options("gpu") == {} == backend.train_step_options("tpu")
