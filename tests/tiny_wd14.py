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


# A tiny timm ViT laid out like the SmilingWolf v3 repos: model.safetensors + config.json (timm hub form) +
# selected_tags.csv, and optionally model.onnx exported from the same weights with the v3 ONNX layout
# (NHWC float32 0-255 BGR in, normalisation and sigmoid inside the graph).
TIMM_SIZE = 32
TIMM_CONFIG = {
    "architecture": "vit_base_patch16_224",
    "num_classes": len(TAGS),
    "num_features": 32,
    "global_pool": "avg",
    "model_args": {"img_size": TIMM_SIZE, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2,
                   "class_token": False, "global_pool": "avg", "fc_norm": False, "act_layer": "gelu_tanh"},
    "pretrained_cfg": {"custom_load": False, "input_size": [3, TIMM_SIZE, TIMM_SIZE], "fixed_input_size": False,
                       "interpolation": "bicubic", "crop_pct": 1.0, "crop_mode": "center",
                       "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "num_classes": len(TAGS)},
}  # fmt: skip


def build_timm(folder: Path, *, onnx: bool = True, seed: int = 0, config: dict | None = None) -> Path:
    """Write model.safetensors + config.json + selected_tags.csv (+ model.onnx) of one random tiny timm model."""
    import json

    import timm
    import torch
    from safetensors.torch import save_file

    cfg = config or TIMM_CONFIG
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    net = timm.create_model(cfg["architecture"], pretrained=False, num_classes=cfg["num_classes"],
                            **cfg["model_args"]).eval()  # fmt: skip
    with torch.no_grad():  # spread the scores over (0, 1) so thresholds pick different tags per image
        head = net.get_classifier()
        head.weight.mul_(60.0)
        head.bias.copy_(torch.linspace(-2.0, 2.0, head.bias.numel()))
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    with open(folder / "selected_tags.csv", "w", newline="") as fh:
        wr = csv.writer(fh)
        wr.writerow(["tag_id", "name", "category", "count"])
        for i, (name, cat) in enumerate(TAGS[: cfg["num_classes"]]):
            wr.writerow([1000 + i, name, cat, 500 - i])
    if onnx:
        export_v3_onnx(net, cfg, folder / "model.onnx")
    return folder


def export_v3_onnx(net, cfg: dict, path: Path, opset: int = 17) -> Path:
    """Export ``net`` as the v3 ONNX taggers are laid out: NHWC BGR 0-255 in, sigmoid scores out."""
    import torch

    pre = cfg["pretrained_cfg"]
    size = pre["input_size"][-1]

    class V3Layout(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net
            self.register_buffer("mean", torch.tensor(pre["mean"][::-1]).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(pre["std"][::-1]).view(1, 3, 1, 1))

        def forward(self, x):
            x = x.permute(0, 3, 1, 2) / 255.0
            return torch.sigmoid(self.net((x - self.mean) / self.std))

    tmp = path.with_suffix(".tmp")
    torch.onnx.export(
        V3Layout().eval(),
        (torch.zeros(1, size, size, 3),),
        str(tmp),
        input_names=["input"],
        output_names=["output"],
        dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
        opset_version=opset,
        dynamo=False,
    )
    tmp.replace(path)
    return path
