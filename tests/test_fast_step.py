"""The fast training step (trainer_bridge/fast_step.py) computes what the plain step computes.

On a CPU the graphs cannot be captured, so `fast = "eager"` runs the fast step's own code (noise drawn outside,
fixed input buffers, gradients accumulated in place, clip + AdamW + zero in place) and must give the plain step's
losses and LoRA weights. The graphed step itself is checked on a GPU in tests/test_fast_step_gpu.py.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from tests.test_trainer_train import tiny_config
from tests.trainer_fixtures import dataset, sd15_dir, sdxl_dir  # noqa: F401  (pytest fixtures)
from trainer_bridge import TrainError, train
from trainer_bridge.export import load_lora


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_fast_step_matches_plain_step(family, sd15_dir, sdxl_dir, dataset, tmp_path):  # noqa: F811
    """Same seed, 8 optimizer steps over 3 bucket shapes, with grad accumulation, clipping, noise offset,
    min-SNR and a warm-up schedule: the two paths give the same loss curve and the same LoRA file."""
    base = sdxl_dir if family == "sdxl" else sd15_dir
    kw = dict(model_family=family, max_steps=8, grad_accum=2, max_grad_norm=0.05, noise_offset=0.05, min_snr_gamma=5.0, flip_aug=True,
              lr_scheduler="constant_with_warmup", lr_warmup_steps=3, log_every_n_steps=1, save_state=False)  # fmt: skip
    plain = train(tiny_config(base, dataset, tmp_path / "plain", fast="off", **kw))
    fast = train(tiny_config(base, dataset, tmp_path / "fast", fast="eager", **kw))
    assert plain.steps == fast.steps == 8
    assert (plain.timings["step"], fast.timings["step"], fast.timings["norms"]) == ("plain", "eager", "none")
    assert len(plain.losses) == 8 and plain.losses[0] != plain.losses[1]  # real, varying numbers
    torch.testing.assert_close(torch.tensor(fast.losses), torch.tensor(plain.losses), rtol=1e-5, atol=1e-6)
    a, _ = load_lora(plain.lora_path)
    b, _ = load_lora(fast.lora_path)
    assert a.keys() == b.keys()
    moved = [k for k in a if k.endswith("lora_up.weight") and a[k].abs().max() > 0]
    assert moved  # lora_up left its zero init, so the comparison is not of two zero tensors
    for k in a:
        torch.testing.assert_close(b[k].float(), a[k].float(), rtol=1e-3, atol=1e-5, msg=k)


def test_fast_option_on_cpu(sd15_dir, dataset, tmp_path):  # noqa: F811
    """On a CPU, auto is the plain step (no warning), graph warns in one line, a bad value is a TrainError."""
    from trainer_bridge.fast_step import make_fast_step

    cfg = tiny_config(sd15_dir, dataset, tmp_path, fast="auto")
    args = dict(unet_fwd=None, params=[torch.zeros(2, requires_grad=True)], optimizer=None,
                alphas_cumprod=None, loss_kw={}, device=torch.device("cpu"))  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert make_fast_step(cfg, **args) is None
    with pytest.warns(UserWarning, match="fast step off: CUDA graphs need a CUDA GPU"):
        assert make_fast_step(cfg.override({"fast": "graph"}), **args) is None
    assert make_fast_step(cfg.override({"fast": "off"}), **args) is None
    # on CUDA, settings the graphs cannot take fall back to the plain step with one warning line, no error
    cuda = {**args, "device": torch.device("cuda")}
    with pytest.warns(UserWarning, match="fast step off: data-parallel runs"):
        assert make_fast_step(cfg, **cuda, world=2) is None
    with pytest.warns(UserWarning, match="fast step off: compile = true runs without CUDA graphs"):
        assert make_fast_step(cfg.override({"compile": True}), **cuda) is None
    with pytest.warns(UserWarning, match="fast step off: a trained text encoder"):
        assert make_fast_step(cfg.override({"fast": "eager"}), **args, train_te=True) is None
    with pytest.raises(TrainError, match="fast must be one of auto, graph, eager, off"):
        make_fast_step(cfg.override({"fast": "fastest"}), **args)


REGIONS = {"sd15": 20, "sdxl": 20}  # region blocks of the tiny UNets (tests/trainer_fixtures.py)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_regional_compile_matches_plain_step(family, sd15_dir, sdxl_dir, dataset, tmp_path, monkeypatch, capsys):  # noqa: F811  # fmt: skip
    """compile = "regional" (each UNet block compiled on its own, trainer_bridge/regions.py) under the fast
    step's code gives the plain step's losses and LoRA file, over 3 bucket shapes and grad accumulation.

    On a CPU the regions go through dynamo + AOTAutograd with the aot_eager backend (inductor's C++ kernels
    take minutes to build here): what is checked is that the compiled regions trace the LoRA UNet without
    graph breaks, that identical blocks share compiled graphs and that forward and backward give the same
    numbers. The inductor kernels inside CUDA graphs are checked in tests/test_fast_step_gpu.py."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    import trainer_bridge.regions as R

    monkeypatch.setattr(R, "BACKEND", "aot_eager")
    base = sdxl_dir if family == "sdxl" else sd15_dir
    kw = dict(model_family=family, max_steps=4, grad_accum=2, max_grad_norm=0.05, noise_offset=0.05,
              flip_aug=True, log_every_n_steps=1, save_state=False)  # fmt: skip
    plain = train(tiny_config(base, dataset, tmp_path / "plain", fast="off", **kw))
    torch._dynamo.reset()
    counters.clear()
    try:
        regional = train(
            tiny_config(base, dataset, tmp_path / "regional", fast="eager", compile="regional", **kw)
        )
        graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    finally:
        torch._dynamo.reset()
    assert breaks == 0, dict(counters["graph_break"])
    said = capsys.readouterr().out
    assert said.count("warning: compile on a CPU") == 1, (
        said
    )  # the regional run says it is slow here; plain not
    # identical blocks share a graph: fewer graphs than region blocks x 3 bucket shapes
    assert 0 < graphs < REGIONS[family] * 3, graphs
    assert plain.losses[0] != plain.losses[1]
    torch.testing.assert_close(
        torch.tensor(regional.losses), torch.tensor(plain.losses), rtol=1e-5, atol=1e-6
    )
    a, _ = load_lora(plain.lora_path)
    b, _ = load_lora(regional.lora_path)
    assert a.keys() == b.keys()
    # the regions run channels-last, which sums in another order: the same numbers to fp32 rounding, which the
    # fp16 file then rounds. lora_up starts at zero (its values are the update): compared as a whole. lora_down
    # (|w| < 0.25 here, where one fp16 step is 2^-13): at most one fp16 step apart, in a few % of the elements
    ups = [k for k in a if k.endswith("lora_up.weight")]
    moved = sum(a[k].float().norm() ** 2 for k in ups) ** 0.5
    off = sum((b[k].float() - a[k].float()).norm() ** 2 for k in ups) ** 0.5
    assert moved > 0 and off / moved < 1e-3, (off, moved)  # measured 2.5e-5 (sd15), 7.2e-5 (sdxl)
    downs = [k for k in a if k.endswith("lora_down.weight")]
    assert max(float(a[k].float().abs().max()) for k in downs) < 0.25
    worst = max(float((b[k].float() - a[k].float()).abs().max()) for k in downs)
    differ = sum(int((b[k] != a[k]).sum()) for k in downs) / sum(a[k].numel() for k in downs)
    assert worst <= 2**-13 and differ < 0.05, (worst, differ)  # measured: 1.05 % differ (sdxl), by one step


def test_compile_option_values(sd15_dir, dataset, tmp_path):  # noqa: F811
    """compile takes true, false or "regional"; anything else is one TrainError line."""
    cfg = tiny_config(sd15_dir, dataset, tmp_path)
    assert cfg.override(["compile=regional"]).compile == "regional"
    assert cfg.override(["compile=true"]).compile is True
    for bad in ("compile=whole", "compile=1"):
        with pytest.raises(TrainError, match="compile must be true, false or 'regional'"):
            cfg.override([bad])
