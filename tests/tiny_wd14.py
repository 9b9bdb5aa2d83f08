"""A tiny ONNX model with the WD14 layout (NHWC float32 0-255 BGR in, sigmoid scores out) + its tag CSV."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

SIZE = 16
# (name, category): 4 ratings first, like the real selected_tags.csv
TAGS = [
    ("general", 9), ("sensitive", 9), ("questionable", 9), ("explicit", 9),
    ("1girl", 0), ("solo", 0), ("long_hair", 0), ("hair", 0), ("simple_background", 0),
    ("white_background", 0), ("smile", 0), ("^_^", 0), ("hatsune_miku_(cosplay)", 0), ("blue_eyes", 0),
    ("hatsune_miku", 4), ("kagamine_rin", 4),
]  # fmt: skip


def weights(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 1, (SIZE * SIZE * 3, len(TAGS))).astype(np.float32) / (SIZE * SIZE * 3) ** 0.5 / 60.0
    b = rng.normal(0, 1.5, len(TAGS)).astype(np.float32)
    return w, b


def reference_probs(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """What the ONNX graph computes, in numpy: sigmoid(flatten(x - 128) @ W + b)."""
    w, b = weights(seed)
    z = (x.reshape(len(x), -1).astype(np.float64) - 128.0) @ w.astype(np.float64) + b
    return 1.0 / (1.0 + np.exp(-z))


def build(folder: Path, *, batch: int | None = None, seed: int = 0) -> Path:
    """Write model.onnx (batch dim dynamic, or fixed to ``batch``) and selected_tags.csv into ``folder``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder.mkdir(parents=True, exist_ok=True)
    w, b = weights(seed)
    bdim = batch if batch is not None else "batch"
    inp = helper.make_tensor_value_info("input_1", TensorProto.FLOAT, [bdim, SIZE, SIZE, 3])
    out = helper.make_tensor_value_info("predictions_sigmoid", TensorProto.FLOAT, [bdim, len(TAGS)])
    inits = [
        numpy_helper.from_array(w, "W"),
        numpy_helper.from_array(b, "B"),
        numpy_helper.from_array(np.array([128.0], np.float32), "C"),
        numpy_helper.from_array(np.array([-1, SIZE * SIZE * 3], np.int64), "shape"),
    ]
    nodes = [
        helper.make_node("Sub", ["input_1", "C"], ["centred"]),
        helper.make_node("Reshape", ["centred", "shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "W"], ["mm"]),
        helper.make_node("Add", ["mm", "B"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], ["predictions_sigmoid"]),
    ]
    graph = helper.make_graph(nodes, "tiny_wd14", [inp], [out], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(folder / "model.onnx"))
    with open(folder / "selected_tags.csv", "w", newline="") as fh:
        wr = csv.writer(fh)
        wr.writerow(["tag_id", "name", "category", "count"])
        for i, (name, cat) in enumerate(TAGS):
            wr.writerow([1000 + i, name, cat, 500 - i])
    return folder
