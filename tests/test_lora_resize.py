"""lora-resize: SVD truncation of LoRA/LoCon files keeps the effective weight and reports its error."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from trainer_bridge.resize import ResizeError, choose_rank, resize_lora


def _effective(path):
    with safe_open(str(path), framework="pt") as f:
        t = {k: f.get_tensor(k).float() for k in f.keys()}
        meta = f.metadata()
    out = {}
    for k in t:
        if k.endswith(".lora_down.weight"):
            n = k[: -len(".lora_down.weight")]
            d, u = t[k], t[f"{n}.lora_up.weight"]
            r = d.shape[0]
            out[n] = (u.reshape(u.shape[0], r) @ d.reshape(r, -1)) * (float(t[f"{n}.alpha"]) / r)
    return out, meta


def _lora(path, rank=8, alpha=4.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = {
        "lora_unet_attn_to_q.lora_down.weight": torch.randn(rank, 32, generator=g),
        "lora_unet_attn_to_q.lora_up.weight": torch.randn(24, rank, generator=g),
        "lora_unet_attn_to_q.alpha": torch.tensor(alpha),
        "lora_unet_conv1.lora_down.weight": torch.randn(rank, 6, 3, 3, generator=g),
        "lora_unet_conv1.lora_up.weight": torch.randn(10, rank, 1, 1, generator=g),
        "lora_unet_conv1.alpha": torch.tensor(alpha),
    }
    save_file(t, str(path), metadata={"ss_network_dim": str(rank), "ss_network_alpha": str(alpha)})
    return path


def test_full_rank_reproduces_input(tmp_path):
    src = _lora(tmp_path / "a.safetensors")
    resize_lora(src, tmp_path / "b.safetensors", rank=8)
    a, _ = _effective(src)
    b, _ = _effective(tmp_path / "b.safetensors")
    for n in a:
        assert torch.allclose(a[n], b[n], atol=1e-5, rtol=0), n


def test_lower_rank_reports_true_error_and_never_upscales(tmp_path):
    src = _lora(tmp_path / "a.safetensors")
    note = resize_lora(src, tmp_path / "b.safetensors", rank=3)
    a, _ = _effective(src)
    b, meta = _effective(tmp_path / "b.safetensors")
    for n in a:
        err = float(torch.linalg.norm(a[n] - b[n]) / torch.linalg.norm(a[n]))
        assert note["modules"][n]["rank"] == 3
        assert abs(note["modules"][n]["rel_fro_error"] - err) < 1e-4
        assert 0.05 < err < 1
    assert meta["ss_network_dim"] == "3" and json.loads(meta["curate_resize"])["param"] == 3
    note = resize_lora(src, tmp_path / "c.safetensors", rank=64)
    assert {m["rank"] for m in note["modules"].values()} == {8}


def test_dynamic_methods_on_planted_spectra():
    s = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.1])
    assert choose_rank(s, "sv_ratio", 6.0, None) == 3  # 10/2 = 5 < 6 kept, 10/1 = 10 dropped
    assert choose_rank(s, "sv_ratio", 5.0, None) == 2  # strict, as sd-scripts
    assert choose_rank(s, "threshold", 1.5, None) == 3  # 10, 5, 2 > 1.5
    # Frobenius fraction: sqrt(100/130.01)=0.877, sqrt(125/130.01)=0.9805
    assert choose_rank(s, "sv_fro", 0.9, None) == 2
    assert choose_rank(s, "sv_fro", 0.85, None) == 1
    # cumulative sum: 10/18.1=0.552, 15/18.1=0.829, 17/18.1=0.939
    assert choose_rank(s, "sv_cumulative", 0.9, None) == 3
    assert choose_rank(s, "sv_cumulative", 0.9, 2) == 2


def test_refuses_overwrite_and_lycoris(tmp_path):
    src = _lora(tmp_path / "a.safetensors")
    with pytest.raises(ResizeError, match="differ"):
        resize_lora(src, src, rank=2)
    save_file({"lora_unet_x.hada_w1_a": torch.zeros(2, 2)}, str(tmp_path / "h.safetensors"))
    with pytest.raises(ResizeError, match="LoRA/LoCon"):
        resize_lora(tmp_path / "h.safetensors", tmp_path / "o.safetensors", rank=2)


def test_alpha_ratio_kept(tmp_path):
    src = _lora(tmp_path / "a.safetensors", rank=8, alpha=4.0)
    resize_lora(src, tmp_path / "b.safetensors", rank=2)
    with safe_open(str(tmp_path / "b.safetensors"), framework="pt") as f:
        assert float(f.get_tensor("lora_unet_conv1.alpha")) == 1.0  # 4/8 * 2
        assert f.get_tensor("lora_unet_conv1.lora_down.weight").shape == (2, 6, 3, 3)
        assert f.get_tensor("lora_unet_conv1.lora_up.weight").shape == (10, 2, 1, 1)
        assert f.metadata()["ss_network_alpha"] == "1"


def _cli(*args):
    from typer.testing import CliRunner

    from curate.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.mark.slow
def test_cli_journey_diffusers_loads_resized(tmp_path):
    import copy

    from tests.trainer_fixtures import tiny_sd15_pipeline
    from trainer_bridge import lora as L
    from trainer_bridge.export import save_lora

    pipe = tiny_sd15_pipeline(tmp_path / "tok")
    unet = copy.deepcopy(pipe.unet)
    mods = L.inject_unet(unet, rank=4, alpha=2, ff=True, conv_dim=4, conv_alpha=8, sdxl=False)
    mods += L.inject_text_encoder(copy.deepcopy(pipe.text_encoder), "lora_te", rank=4, alpha=4)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in mods:
            m.lora_down.weight.copy_(torch.randn(m.lora_down.weight.shape, generator=g) * 0.2)
            m.lora_up.weight.copy_(torch.randn(m.lora_up.weight.shape, generator=g) * 0.2)
    src = save_lora(tmp_path / "x.safetensors", L.lora_state_dict(mods, torch.float32),
                    {"ss_network_dim": 4, "ss_network_alpha": "2"})  # fmt: skip
    src_bytes = src.read_bytes()

    r = _cli("lora-resize", src, "--rank", 4, "--out", tmp_path / "full.safetensors", "--json")
    assert r.exit_code == 0, r.output
    assert max(m["rel_fro_error"] for m in json.loads(r.output)["modules"].values()) < 1e-5
    r = _cli("lora-resize", src, "--dynamic", "sv_fro=0.8", "--rank", 3, "--out", tmp_path / "s.safetensors")
    assert r.exit_code == 0, r.output
    assert "rel. error" in r.output and src.read_bytes() == src_bytes
    r = _cli("lora-resize", src, "--rank", 2, "--out", src)
    assert r.exit_code != 0 and "differ" in r.output and src.read_bytes() == src_bytes

    with safe_open(str(src), framework="pt") as f:
        keys = set(f.keys())
    with safe_open(str(tmp_path / "s.safetensors"), framework="pt") as f:
        assert set(f.keys()) == keys  # kohya key format unchanged
        ranks = {f.get_tensor(k).shape[0] for k in keys if k.endswith("lora_down.weight")}
    assert ranks <= {1, 2, 3} and ranks

    info = json.loads(_cli("lora-info", tmp_path / "s.safetensors", "--json").output)
    assert info["resize"]["method"] == "sv_fro" and info["rank"] == max(ranks)
    assert "resize" in _cli("lora-info", tmp_path / "s.safetensors").output

    # diffusers loads both; the full-rank resize gives the input's output
    x = torch.randn(1, 4, 8, 8, generator=g)
    h = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=g)
    t = torch.tensor([300])
    outs = []
    for path in (src, tmp_path / "full.safetensors", tmp_path / "s.safetensors"):
        p = copy.deepcopy(pipe)
        p.load_lora_weights(str(path))
        with torch.no_grad():
            outs.append(p.unet(x, t, h).sample)
    with torch.no_grad():
        base = pipe.unet(x, t, h).sample
    assert (outs[1] - outs[0]).norm() / (outs[0] - base).norm() < 1e-4
    assert 1e-4 < (outs[2] - outs[0]).norm() / (outs[0] - base).norm() < 1
    # the per-module-rank file: diffusers' output equals the base UNet plus our effective deltas
    deltas, _ = _effective(tmp_path / "s.safetensors")
    merged = copy.deepcopy(pipe.unet)
    with torch.no_grad():
        for name, mod in merged.named_modules():
            key = "lora_unet_" + name.replace(".", "_")
            if key in deltas:
                mod.weight += deltas.pop(key).reshape(mod.weight.shape)
        predicted = merged(x, t, h).sample
    assert not [k for k in deltas if k.startswith("lora_unet_")]
    # one alpha for every module (trainer_bridge/resize.py): diffusers applies the file as written
    assert (outs[2] - predicted).norm() / (predicted - base).norm() < 1e-4


def test_dynamic_resize_scales_every_module_right_in_diffusers(tmp_path):
    """A per-module-rank resize (sv_fro) loads in diffusers with each module at its own alpha / rank: the UNet
    output is the base plus the file's effective deltas, and the change from the input LoRA's output is the size
    the reported per-module errors say. (Per-module alphas broke this: diffusers gave attention modules the most
    common alpha.)"""
    import copy

    from tests.trainer_fixtures import tiny_sd15_pipeline
    from trainer_bridge import lora as L
    from trainer_bridge.export import save_lora

    pipe = tiny_sd15_pipeline(tmp_path / "tok")
    mods = L.inject_unet(
        copy.deepcopy(pipe.unet), rank=4, alpha=2, ff=True, conv_dim=4, conv_alpha=8, sdxl=False
    )
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in mods:
            m.lora_down.weight.copy_(torch.randn(m.lora_down.weight.shape, generator=g) * 0.2)
            m.lora_up.weight.copy_(torch.randn(m.lora_up.weight.shape, generator=g) * 0.2)
    src = save_lora(tmp_path / "x.safetensors", L.lora_state_dict(mods, torch.float32),
                    {"ss_network_dim": 4, "ss_network_alpha": "2"})  # fmt: skip
    r = _cli("lora-resize", src, "--dynamic", "sv_fro=0.9", "--out", tmp_path / "s.safetensors", "--json")
    assert r.exit_code == 0, r.output
    note = json.loads(r.output)["modules"]
    assert len({m["rank"] for m in note.values()}) > 1  # per-module ranks
    errs = [m["rel_fro_error"] for m in note.values()]

    x = torch.randn(1, 4, 8, 8, generator=g)
    h = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=g)
    t = torch.tensor([300])
    outs = []
    for path in (src, tmp_path / "s.safetensors"):
        p = copy.deepcopy(pipe)
        p.load_lora_weights(str(path))
        with torch.no_grad():
            outs.append(p.unet(x, t, h).sample)
    deltas, _ = _effective(tmp_path / "s.safetensors")
    merged = copy.deepcopy(pipe.unet)
    with torch.no_grad():
        base = pipe.unet(x, t, h).sample
        for name, mod in merged.named_modules():
            key = "lora_unet_" + name.replace(".", "_")
            if key in deltas:
                mod.weight += deltas.pop(key).reshape(mod.weight.shape)
        predicted = merged(x, t, h).sample
    assert not deltas
    # diffusers applies exactly the file's deltas (was 0.0032 off: attention modules at the wrong alpha)
    assert (outs[1] - predicted).norm() / (predicted - base).norm() < 1e-4
    # the output moved from the input LoRA's by the order of the reported weight errors: measured 0.63 against
    # module errors of mean 0.35, max 0.43 (they compound through the ~100 modules of this random-weight UNet)
    rel = float((outs[1] - outs[0]).norm() / (outs[0] - base).norm())
    mean = sum(errs) / len(errs)
    assert 0.5 * mean < rel < 2 * max(errs), (rel, mean, max(errs))
