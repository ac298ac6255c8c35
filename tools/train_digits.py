"""Train the two small digits models used by the README and the tests, and export them to ONNX.

Data: scikit-learn's digits (1797 8x8 grey images, pixel values 0..16, 10 classes), split 75/25
with a fixed seed. Inputs are normalized as ``x / 16`` (float32 in [0, 1]).

Writes into ``--out`` (default ``models/``):

* ``digits_mlp.onnx``: Gemm 64 -> 256 -> Relu -> Gemm 128 -> Relu -> Gemm 10;
  input ``input`` [batch, 64], output ``logits`` [batch, 10].
* ``digits_cnn.onnx``: three Conv-BatchNormalization-Relu blocks (one MaxPool), Flatten, two Gemm;
  input ``input`` [batch, 1, 8, 8], output ``logits`` [batch, 10]. BatchNormalization is kept as
  its own (inference-mode) node, not folded into the Conv.
* ``digits_calib.npz`` / ``digits_cnn_calib.npz``: key ``input``, 512 training samples.
* ``digits_val.npz`` / ``digits_cnn_val.npz``: key ``input``, 256 held-out test samples;
  ``digits_val_labels.npy``: their labels (int64).

torch is a tool-time dependency only; the package never imports it.
"""

from __future__ import annotations

import argparse
import json
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

SEED = 0
N_CALIB = 512
N_VAL = 256
OPSET = 17


def load_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return (x_train [N,64] float32, y_train [N] int64, x_test [M,64] float32, y_test [M] int64).

    Pixels are scaled to [0, 1] by dividing by 16; the split is stratified and seeded.
    """
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=0.25, random_state=SEED, stratify=y
    )
    return x_tr, y_tr, x_te, y_te


def make_mlp() -> nn.Module:
    """MLP mapping [B, 64] -> logits [B, 10] through hidden widths 256 and 128."""
    return nn.Sequential(OrderedDict(
        fc1=nn.Linear(64, 256), relu1=nn.ReLU(),
        fc2=nn.Linear(256, 128), relu2=nn.ReLU(),
        fc3=nn.Linear(128, 10),
    ))


def conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    """3x3 same-padding Conv (no bias: the BatchNormalization carries it), BN and ReLU."""
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]


def make_cnn() -> nn.Module:
    """CNN mapping [B, 1, 8, 8] -> logits [B, 10].

    [B,1,8,8] -conv1-> [B,32,8,8] -conv2-> [B,64,8,8] -pool-> [B,64,4,4] -conv3-> [B,64,4,4]
    -flatten (channel-major)-> [B,1024] -fc1-> [B,128] -fc2-> [B,10].
    """
    names = ["conv{}", "bn{}", "relu{}"]
    layers: list[tuple[str, nn.Module]] = []
    for i, (c_in, c_out) in enumerate([(1, 32), (32, 64), (64, 64)], start=1):
        layers += [(n.format(i), m) for n, m in zip(names, conv_bn_relu(c_in, c_out))]
        if i == 2:
            layers.append(("pool", nn.MaxPool2d(2)))
    layers += [
        ("flatten", nn.Flatten(1)),
        ("fc1", nn.Linear(64 * 4 * 4, 128)), ("relu4", nn.ReLU()),
        ("fc2", nn.Linear(128, 10)),
    ]
    return nn.Sequential(OrderedDict(layers))


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int) -> nn.Module:
    """Fit ``model`` on x [N, ...] float32, y [N] int64 with Adam and cross-entropy; return it in eval mode."""
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(SEED)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(xt), generator=gen).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def predict(model: nn.Module, x: np.ndarray) -> np.ndarray:
    """Logits [N, 10] float32 for inputs x [N, ...] (model in eval mode)."""
    return model(torch.from_numpy(x)).numpy()


def export(model: nn.Module, example: np.ndarray, path: Path) -> onnx.ModelProto:
    """Export an eval-mode model to ONNX (TorchScript exporter, opset 17, dynamic batch).

    ``TrainingMode.PRESERVE`` on an eval-mode model keeps BatchNormalization as its own
    inference node (running statistics, one output) instead of folding it into the Conv.
    """
    warnings.filterwarnings("ignore", "You are using the legacy TorchScript", DeprecationWarning)
    torch.onnx.export(
        model, (torch.from_numpy(example),), str(path),
        dynamo=False, opset_version=OPSET,
        input_names=["input"], output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False,
    )
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    return proto


def check_graph(proto: onnx.ModelProto, model: nn.Module) -> None:
    """Assert the graph is clean: weights are initializers, all used, BN in inference form.

    Every BatchNormalization must have one output and running statistics equal to torch's.
    """
    graph = proto.graph
    used = {name for node in graph.node for name in node.input}
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    assert set(inits) <= used, f"unused initializers: {set(inits) - used}"
    assert not {n.op_type for n in graph.node} & {"Constant", "Identity"}, "junk nodes in graph"
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    state = model.state_dict()
    for node in graph.node:
        if node.op_type == "BatchNormalization":
            assert len(node.output) == 1, f"{node.name} is a training-mode BatchNormalization"
            for name in node.input[3:5]:
                np.testing.assert_array_equal(inits[name], state[name].numpy())


def check_ort(path: Path, model: nn.Module, x: np.ndarray) -> None:
    """Assert ONNX Runtime and torch logits agree on x to max abs diff < 1e-4."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = sess.run(["logits"], {"input": x})
    diff = float(np.abs(got - predict(model, x)).max())
    assert diff < 1e-4, f"{path.name}: onnxruntime differs from torch by {diff}"


def build(name: str, model: nn.Module, data: tuple, shape: tuple, out: Path, epochs: int) -> dict:
    """Train, export, verify and write calibration/validation inputs for one model.

    ``shape`` is the per-sample input shape ((64,) or (1, 8, 8)); returns the summary dict.
    """
    x_tr, y_tr, x_te, y_te = (a.reshape(-1, *shape) if a.ndim == 2 else a for a in data)
    model = train(model, x_tr, y_tr, epochs)
    acc = float((predict(model, x_te).argmax(1) == y_te).mean())
    path = out / f"{name}.onnx"
    proto = export(model, x_te[:2], path)
    check_graph(proto, model)
    check_ort(path, model, x_te)
    stem = name.replace("_mlp", "")
    np.savez(out / f"{stem}_calib.npz", input=x_tr[:N_CALIB])
    np.savez(out / f"{stem}_val.npz", input=x_te[:N_VAL])
    return {
        "model": path.name, "test_accuracy": round(acc, 4), "test_samples": len(y_te),
        "params": sum(p.numel() for p in model.parameters()),
        "ops": [n.op_type for n in proto.graph.node],
    }


def main() -> None:
    """Parse ``--out``, build both models, write the labels, print one JSON line per model."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("models"), help="output directory")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    data = load_data()
    for name, model, shape, epochs in [
        ("digits_mlp", make_mlp, (64,), 40),
        ("digits_cnn", make_cnn, (1, 8, 8), 15),
    ]:
        torch.manual_seed(SEED)
        print(json.dumps(build(name, model(), data, shape, args.out, epochs)))
    np.save(args.out / "digits_val_labels.npy", data[3][:N_VAL])


if __name__ == "__main__":
    main()
