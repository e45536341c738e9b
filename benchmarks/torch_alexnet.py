"""The PyTorch reference for the training benchmark: bvlc_alexnet exactly (same shapes,
groups, LRN, dropout, fillers), trained with SGD momentum + weight decay with Caffe's per-blob
lr_mult / decay_mult (weights 1/1, biases 2/0), fed the same uint8 host batches as our trainer
(the mean subtraction and mirror run in PyTorch, on its device, as ours run in the jitted step).

PyTorch is given its best configuration where it helps it: a shift-sum LRN (PyTorch's own
LocalResponseNorm is several times slower on CPU: docs/MACHINE_NOTES.md; identical formula),
channels_last on GPU (NCHW measured faster on the 2-core CPU), cuDNN autotuning, and autocast
bfloat16 for --precision bf16. Float32 on GPU is true float32 on both sides (no TF32: our
layers use Precision.HIGHEST to stay within float32 rounding of Caffe). torch is imported lazily: the project never depends on it.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

# bvlc_alexnet hyper-parameters (model/zoo/bvlc_alexnet/train_val.prototxt, solver.prototxt).
LRN_SIZE, LRN_ALPHA, LRN_BETA, LRN_K = 5, 1e-4, 0.75, 1.0
DROPOUT = 0.5
BASE_LR, MOMENTUM, WEIGHT_DECAY = 0.01, 0.9, 5e-4
BIAS_LR_MULT = 2.0
CROP = 227


def lrn_module(torch: Any, lrn_impl: str) -> Any:
    """Caffe's LRN ACROSS_CHANNELS as a module: "shiftsum" (the window sum as n shifted adds
    of the zero-padded squares) or "torch" (nn.LocalResponseNorm, the same formula)."""
    nn = torch.nn
    F = torch.nn.functional

    class ShiftSumLRN(nn.Module):
        """x * (k + alpha/n * sum_{window} x^2)^-beta."""

        def forward(self, x):
            sq = x * x
            half = LRN_SIZE // 2
            padded = F.pad(sq, (0, 0, 0, 0, half, half))
            c = x.shape[1]
            acc = padded[:, 0:c]
            for i in range(1, LRN_SIZE):
                acc = acc + padded[:, i:i + c]
            return x * (LRN_K + (LRN_ALPHA / LRN_SIZE) * acc).pow(-LRN_BETA)

    if lrn_impl == "torch":
        return nn.LocalResponseNorm(LRN_SIZE, alpha=LRN_ALPHA, beta=LRN_BETA, k=LRN_K)
    return ShiftSumLRN()


def _build_model(torch: Any, lrn_impl: str) -> Any:
    nn = torch.nn

    def lrn():
        return lrn_module(torch, lrn_impl)

    model = nn.Sequential(
        nn.Conv2d(3, 96, 11, stride=4), nn.ReLU(inplace=True), lrn(),
        nn.MaxPool2d(3, 2, ceil_mode=True),
        nn.Conv2d(96, 256, 5, padding=2, groups=2), nn.ReLU(inplace=True), lrn(),
        nn.MaxPool2d(3, 2, ceil_mode=True),
        nn.Conv2d(256, 384, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(384, 384, 3, padding=1, groups=2), nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, 3, padding=1, groups=2), nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2, ceil_mode=True),
        nn.Flatten(),
        nn.Linear(256 * 6 * 6, 4096), nn.ReLU(inplace=True), nn.Dropout(DROPOUT),
        nn.Linear(4096, 4096), nn.ReLU(inplace=True), nn.Dropout(DROPOUT),
        nn.Linear(4096, 1000),
    )
    # Caffe's fillers: gaussian std 0.01 (fc6, fc7: 0.005); bias 0.1 for conv2/4/5 and fc6/7.
    convs = [m for m in model if isinstance(m, (nn.Conv2d, nn.Linear))]
    stds = [0.01, 0.01, 0.01, 0.01, 0.01, 0.005, 0.005, 0.01]
    biases = [0.0, 0.1, 0.0, 0.1, 0.1, 0.1, 0.1, 0.0]
    with torch.no_grad():
        for m, std, b in zip(convs, stds, biases):
            m.weight.normal_(0, std)
            m.bias.fill_(b)
    return model


def make_trainer(*, mean: np.ndarray, device: str = "cpu", precision: str = "float32",
                 lrn_impl: str = "shiftsum", channels_last: bool = True,
                 threads: int | None = None) -> tuple[Callable[[Any], float], str]:
    """(step, description): step(hb) trains bvlc_alexnet one iteration on a HostBatch-like
    object (uint8 .images (N,3,227,227), .mirror (N,), .labels (N,)) and returns the loss.

    `mean` is the (3, 227, 227) float32 centre crop of the mean file."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    dev = torch.device("cuda" if device == "gpu" else "cpu")
    if dev.type == "cuda":
        # Same arithmetic as ours: model/layers/vision.py runs float32 convolutions and GEMMs
        # at Precision.HIGHEST (no TF32), so PyTorch's float32 gets no TF32 either.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    model = _build_model(torch, lrn_impl).to(dev)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    bias = [p for n, p in model.named_parameters() if n.endswith("bias")]
    # Caffe's SGD: history = momentum*history + lr*(g + wd*w); PyTorch's SGD keeps lr outside
    # the buffer, equal while lr is constant (it is over a benchmark's few iterations).
    opt = torch.optim.SGD([{"params": weights, "lr": BASE_LR, "weight_decay": WEIGHT_DECAY},
                           {"params": bias, "lr": BASE_LR * BIAS_LR_MULT, "weight_decay": 0.0}],
                          lr=BASE_LR, momentum=MOMENTUM)
    mean_t = torch.from_numpy(np.ascontiguousarray(mean, np.float32)).to(dev)
    loss_fn = torch.nn.CrossEntropyLoss()
    amp = precision == "bf16"
    model.train()

    def step(hb: Any) -> float:
        x = torch.from_numpy(hb.images).to(dev, non_blocking=True).float() - mean_t
        flip = torch.from_numpy(np.asarray(hb.mirror, bool)).to(dev)
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
        x = x.contiguous(memory_format=fmt)
        y = torch.from_numpy(np.asarray(hb.labels, np.int64)).to(dev)
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=amp):
            loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        return float(loss.detach())  # one host sync per step, as our trainer's loss read

    cfg = (f"torch {torch.__version__}, {dev.type}, {precision}, LRN {lrn_impl}, "
           f"{'channels_last' if channels_last else 'NCHW'}, threads {torch.get_num_threads()}")
    return step, cfg


def available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True

