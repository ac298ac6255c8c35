"""Smoothness penalties for training models that compress well (the `onnxcompress[torch]` extra).

Train with these terms added to the loss, export with `export_onnx`, then compress the ONNX
file with `--method svd|aasvd|id`. torch is imported when a function here is called, never
when `onnxcompress` is imported; the rest of the package does not need it.

Axes. A weight W has shape (out, in) for a linear layer, (out, in, kh, kw) for a 2-D convolution
(any (out, in, *kernel) works). Its matricization is the matrix the low-rank split factorizes,

    M(W) = W.reshape(out, in * kh * kw),   row o = every weight feeding output channel o.

The three penalties (Runkel et al., *Smooth Model Compression without Fine-Tuning*, 2025):

* nuclear norm:  R_*(W) = ||M(W)||_* = sum_j sigma_j(M(W)), the convex surrogate of rank; it
  pushes the spectrum to decay, so the truncated SVD loses less.
* first order:   R_1(W) = sum_{a in axes} ||D_a W||_F^2, with the forward difference along axis a
  (D_a W)[..., i, ...] = W[..., i+1, ...] - W[..., i, ...]. Along "out" (axis 0) it compares
  neighbouring rows of M(W): adjacent output channels become similar. Along "kernel" (axes 2, 3,
  ...) it compares neighbouring taps inside each filter. R_1 = 0 iff W is constant along those
  axes.
* second order:  R_2(W) = sum_{a in axes} ||D_a^2 W||_F^2, D_a^2 W[i] = W[i+2] - 2 W[i+1] + W[i]
  (the discrete second derivative). R_2 = 0 iff W is affine (linear in the index) along every
  penalized axis.

An axis of length 1 (or 2, for the second order) has no differences and contributes 0. Biases and
other 1-D parameters (BatchNorm) are not penalized.

The paper regularizes the output-channel dimension after flattening the kernels into the rows
(its Fig. 1); the kernel axes are offered as well.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

AXES = ("out", "kernel")
#: the opset the exported models use (the tool's tests and benchmarks use the same)
OPSET = 17


def _torch():
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("onnxcompress.smooth needs torch: pip install 'onnxcompress[torch]'") from e
    return torch


def matricize(w):
    """M(W) = W.reshape(out, -1): (out, in * prod(kernel)), the matrix a low-rank split sees."""
    return w.reshape(w.shape[0], -1)


def nuclear_norm(w):
    """R_*(W) = sum of the singular values of M(W) (a 0-dim tensor; subgradient U V^T)."""
    torch = _torch()
    return torch.linalg.matrix_norm(matricize(w), ord="nuc")


def _axes(w, axes: Iterable[str]) -> list[int]:
    out = []
    for a in axes:
        if a == "out":
            out.append(0)
        elif a == "kernel":
            out.extend(range(2, w.dim()))
        else:
            raise ValueError(f"unknown axis {a!r}; choose from {', '.join(AXES)}")
    return out


def first_difference(w, axes: Iterable[str] = AXES):
    """R_1(W) = sum_{a in axes} sum_i ||W[.., i+1, ..] - W[.., i, ..]||_F^2 (axis a)."""
    torch = _torch()
    total = w.new_zeros(())
    for a in _axes(w, axes):
        if w.shape[a] > 1:
            total = total + torch.sum(torch.diff(w, n=1, dim=a) ** 2)
    return total


def second_difference(w, axes: Iterable[str] = AXES):
    """R_2(W) = sum_{a in axes} sum_i ||W[i+2] - 2 W[i+1] + W[i]||_F^2 (indices along axis a)."""
    torch = _torch()
    total = w.new_zeros(())
    for a in _axes(w, axes):
        if w.shape[a] > 2:
            total = total + torch.sum(torch.diff(w, n=2, dim=a) ** 2)
    return total


def penalized_weights(model) -> list:
    """The weights of every Linear and Conv (1-D, 2-D, 3-D) module of `model`, in module order."""
    torch = _torch()
    kinds = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
    return [m.weight for m in model.modules() if isinstance(m, kinds)]


@dataclass(frozen=True, kw_only=True)
class Penalties:
    """Per-term weights: penalty(model) = nuclear * sum R_* + first * sum R_1 + second * sum R_2,
    sums over `penalized_weights(model)`; `axes` selects the difference axes ("out", "kernel")."""

    nuclear: float = 0.0
    first: float = 0.0
    second: float = 0.0
    axes: tuple[str, ...] = AXES

    def __post_init__(self) -> None:
        for name in ("nuclear", "first", "second"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be a non-negative number, got {getattr(self, name)}")
        for a in self.axes:
            if a not in AXES:
                raise ValueError(f"unknown axis {a!r}; choose from {', '.join(AXES)}")

    def terms(self, model) -> dict:
        """The three unweighted sums over the model's weights (0-dim tensors), for logging."""
        ws = penalized_weights(model)
        torch = _torch()
        zero = torch.zeros(())
        return {"nuclear": sum((nuclear_norm(w) for w in ws), zero) if self.nuclear else zero,
                "first": sum((first_difference(w, self.axes) for w in ws), zero) if self.first else zero,
                "second": sum((second_difference(w, self.axes) for w in ws), zero) if self.second else zero}

    def __call__(self, model):
        t = self.terms(model)
        return self.nuclear * t["nuclear"] + self.first * t["first"] + self.second * t["second"]


def add_penalties(loss, model, penalties: Penalties):
    """loss + penalties(model): the training objective of a smooth model (gradients flow to every
    penalized weight)."""
    return loss + penalties(model)


def export_onnx(model, path, example, *, input_name: str = "input", output_name: str = "logits",
                opset: int = OPSET) -> Path:
    """Write `model` (switched to eval mode) to ONNX as the tool expects it.

    One input and one output, axis 0 dynamic ("batch"), opset `opset`, the TorchScript exporter,
    BatchNormalization kept as its own inference node (not folded into the Conv), no constant
    folding; weights as initializers. `example` is one batch (a tensor or numpy array). Returns
    the path.
    """
    torch = _torch()
    import warnings

    model.eval()
    x = example if isinstance(example, torch.Tensor) else torch.as_tensor(example)
    path = Path(path)
    with warnings.catch_warnings():  # deprecation notes of the TorchScript exporter
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=opset,
                          input_names=[input_name], output_names=[output_name],
                          dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}},
                          training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False)
    return path
