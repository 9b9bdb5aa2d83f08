"""Both tagger backends on one tiny timm model (safetensors + config.json, and the same weights as model.onnx):
equal scores, the v3 reference preprocessing, backend choice, CPU fallback notices, the CLI journey."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
from PIL import Image

import tests.tiny_wd14 as tiny_wd14
from curate import Dataset
from curate.errors import CurateError
from curate.models import wd14

pytest.importorskip("timm")
torch = pytest.importorskip("torch")

SIZES = [(50, 30), (20, 41), (32, 32), (120, 64), (33, 90), (64, 64)]


def _img(w: int, h: int, seed: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.uniform(0, 255, (h // 4 + 1, w // 4 + 1, 3)).astype(np.uint8)
    img = Image.fromarray(base).resize((w, h), Image.BILINEAR)
    if mode == "RGBA":
        a = np.full((h, w), 255, np.uint8)
        a[: h // 2] = 0
        img = img.convert("RGBA")
        img.putalpha(Image.fromarray(a))
    return img


@pytest.fixture(scope="module")
def timm_dir(tmp_path_factory):
    return tiny_wd14.build_timm(tmp_path_factory.mktemp("wd") / "tagger")


@pytest.fixture()
def ds_path(tmp_path):
    root = tmp_path / "ds"
    root.mkdir()
    for i, (w, h) in enumerate(SIZES):
        _img(w, h, i).save(root / f"img{i}.png")
    _img(40, 24, 99, "RGBA").save(root / "alpha.png")
    _img(300, 200, 7).save(root / "photo.jpg", quality=90)
    with Dataset.open(root) as ds:
        ds.scan()
    return root


@pytest.fixture(autouse=True)
def _fresh_cache():
    wd14._CACHE.clear()
    yield
    wd14._CACHE.clear()


def _stored(ds: Dataset, model: str) -> dict[str, dict[str, float]]:
    from curate.stages.tag import load_scores, model_key

    return load_scores(ds.manifest, model_key(model))


def reference_v3(img: Image.Image, folder) -> np.ndarray:
    """SmilingWolf's v3 timm recipe written out with timm's own transform: ensure RGB on white, pad to a
    centred white square, timm eval transform from pretrained_cfg, RGB -> BGR, model, sigmoid."""
    import timm
    from safetensors.torch import load_file
    from timm.data import create_transform

    cfg = json.loads((folder / "config.json").read_text())
    net = timm.create_model(cfg["architecture"], num_classes=cfg["num_classes"], **cfg["model_args"]).eval()
    net.load_state_dict(load_file(str(folder / "model.safetensors")))
    pre = cfg["pretrained_cfg"]
    transform = create_transform(
        input_size=tuple(pre["input_size"]), interpolation=pre["interpolation"], crop_pct=pre["crop_pct"],
        crop_mode=pre["crop_mode"], mean=tuple(pre["mean"]), std=tuple(pre["std"]),
    )  # fmt: skip
    if img.mode == "RGBA":
        canvas = Image.new("RGBA", img.size, (255, 255, 255))
        canvas.alpha_composite(img)
        img = canvas.convert("RGB")
    px = max(img.size)
    square = Image.new("RGB", (px, px), (255, 255, 255))
    square.paste(img, ((px - img.size[0]) // 2, (px - img.size[1]) // 2))
    x = transform(square).unsqueeze(0)[:, [2, 1, 0]]
    with torch.inference_mode():
        return torch.sigmoid(net(x))[0].numpy()


def test_both_backends_equal_the_v3_reference(ds_path, timm_dir):
    names = [n for n, _ in tiny_wd14.TAGS]
    with Dataset.open(ds_path) as ds:
        onnx_run = ds.tag(model=str(timm_dir), backend="onnx", device="cpu").run
        assert (onnx_run.backend, onnx_run.inferred) == ("onnx", 8)
        by_onnx = _stored(ds, str(timm_dir))
        torch_run = ds.tag(model=str(timm_dir), backend="torch", device="cpu", force=True).run
        assert (torch_run.backend, torch_run.device, torch_run.inferred) == ("torch", "cpu", 8)
        by_torch = _stored(ds, str(timm_dir))
        assert by_onnx.keys() == by_torch.keys() and len(by_torch) == 8
        spread = []
        for rec in ds.kept():
            ref = reference_v3(Image.open(ds_path / rec.path), timm_dir)
            a, b = by_onnx[rec.sha256], by_torch[rec.sha256]
            assert (
                a.keys()
                == b.keys()
                == {n for n, p in zip(names, ref, strict=True) if p >= 0.05 or n in names[:4]}
            )
            for n, p in b.items():
                assert abs(p - ref[names.index(n)]) < 2e-4, (rec.path, n)
                assert abs(p - a[n]) < 2e-4
            spread.append(len([p for n, p in b.items() if p >= 0.35]))
        assert len(set(spread)) > 1  # the scores differ between images: the comparison is not vacuous


def test_predict_batches_agree_unrounded(timm_dir):
    onnx_t = wd14.load_tagger(str(timm_dir), "cpu", "onnx")
    torch_t = wd14.load_tagger(str(timm_dir), "cpu", "torch")
    imgs = [_img(w, h, 10 + i) for i, (w, h) in enumerate(SIZES)]
    xo = np.stack([onnx_t.preprocess_image(im) for im in imgs])
    xt = np.stack([torch_t.preprocess_image(im) for im in imgs])
    assert xt.dtype == np.uint8 and np.array_equal(xo, xt[..., ::-1].astype(np.float32))  # same pixels
    po, pt = onnx_t.predict(xo), torch_t.predict(xt)
    assert po.shape == pt.shape == (len(imgs), len(tiny_wd14.TAGS))
    assert np.abs(po - pt).max() < 1e-5
    assert np.abs(pt - torch_t.predict(xt[:1])).max(axis=1)[0] < 1e-5  # batch of one: same first row


def test_cli_torch_backend_end_to_end_then_rethreshold_without_model(ds_path, timm_dir, tmp_path):
    from typer.testing import CliRunner

    from curate.cli import app

    model = tmp_path / "moved" / "tagger"
    shutil.copytree(timm_dir, model)
    (model / "model.onnx").unlink()  # a torch-only folder: auto takes torch even without CUDA
    r = CliRunner()
    res = r.invoke(app, ["tag", str(ds_path), "--model", str(model), "--general", "0.3", "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["run"]["backend"] == "torch" and d["run"]["inferred"] == 8 and d["run"]["images_per_second"] > 0
    assert ("torch sees CUDA" if torch.cuda.is_available() else "only timm weights") in d["run"]["why"]
    low = {p.name: p.read_text() for p in ds_path.glob("*.txt")}
    assert len(low) == 8
    shutil.rmtree(model)  # stored scores re-threshold with no model on disk
    res = r.invoke(app, ["tag", str(ds_path), "--model", str(model), "--general", "0.8", "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["run"]["inferred"] == 0 and d["run"]["cached"] == 8 and d["run"]["backend"] == ""
    high = {p.name: p.read_text() for p in ds_path.glob("*.txt")}
    assert sum(c.count(",") for c in high.values()) < sum(c.count(",") for c in low.values())
    assert len(high) == 8


def test_cli_summary_line_and_explain_device(ds_path, timm_dir):
    from typer.testing import CliRunner

    from curate.cli import app

    r = CliRunner()
    res = r.invoke(app, ["tag", str(ds_path), "--model", str(timm_dir), "--device", "cpu", "--explain-device",
                         "--json"])  # fmt: skip
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["backend"] == "onnx" and "CPUExecutionProvider" in d["runtime"] and "--device cpu" in d["why"]
    assert "onnxruntime" in d and "torch" in d
    with Dataset.open(ds_path) as ds:
        assert not _stored(ds, str(timm_dir))  # explaining ran no tagging
    res = r.invoke(
        app, ["tag", str(ds_path), "--model", str(timm_dir), "--backend", "torch", "--device", "cpu"]
    )
    assert res.exit_code == 0, res.output
    assert "tagger ran on torch" in res.output and "img/s" in res.output and "--backend torch" in res.output
    res = r.invoke(app, ["tag", str(ds_path), "--model", str(timm_dir), "--backend", "tpu"])
    assert res.exit_code == 2 and "auto, torch or onnx" in res.output


def test_auto_backend_choice(timm_dir, tmp_path, monkeypatch):
    files = wd14.locate(str(timm_dir))
    assert files.onnx and files.has_torch and files.tags
    monkeypatch.setattr(wd14, "_torch_cuda", lambda: True)
    assert wd14.choose_backend(files, "auto")[0] == "torch"
    assert wd14.choose_backend(files, "cuda:0")[0] == "torch"
    assert wd14.choose_backend(files, "cpu")[0] == "onnx"  # the ONNX model is the CPU path
    monkeypatch.setattr(wd14, "_torch_cuda", lambda: False)
    backend, why = wd14.choose_backend(files, "auto")
    assert backend == "onnx" and "no CUDA" in why
    only_onnx = tiny_wd14.build(tmp_path / "v2")
    monkeypatch.setattr(wd14, "_torch_cuda", lambda: True)
    assert wd14.choose_backend(wd14.locate(str(only_onnx)), "auto")[0] == "onnx"
    with pytest.raises(CurateError, match="unknown tagger backend"):
        wd14.choose_backend(files, "auto", "jax")
    with pytest.raises(CurateError) as e:  # torch asked of a folder without timm weights
        wd14.load_tagger(str(only_onnx), "cpu", "torch")
    assert "lacks model.safetensors and config.json" in e.value.message


def test_onnx_cuda_without_provider_runs_on_cpu_with_notice(timm_dir, monkeypatch):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime here has CUDA")
    t = wd14.WD14Tagger(str(timm_dir), device="cuda")
    assert t.session.get_providers()[0] == "CPUExecutionProvider" and t.device == "cpu"
    assert len(t.notices) == 1 and "pip install 'curate[tag-gpu]'" in t.notices[0]
    # A provider list that claims CUDA but a session that cannot start it (onnxruntime-gpu without its CUDA
    # libraries) falls back quietly in onnxruntime; curate says so.
    real = ort.get_available_providers()
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", *real])
    t = wd14.WD14Tagger(str(timm_dir), device="cuda")
    assert t.session.get_providers()[0] == "CPUExecutionProvider"
    assert any("did not start" in n for n in t.notices)
    x = np.stack([t.preprocess_image(_img(40, 30, 1))])
    assert t.predict(x).shape == (1, len(tiny_wd14.TAGS))


def test_torch_cuda_request_without_cuda_is_one_line_error(timm_dir):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(CurateError) as e:
        wd14.load_tagger(str(timm_dir), "cuda", "torch")
    assert "sees no CUDA GPU" in e.value.message and "--device cpu" in e.value.message
    assert "\n" not in e.value.message


def test_missing_repo_names_hf_download_for_each_backend(ds_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(ds_path / "no-cache"))
    repo = "SmilingWolf/wd-vit-tagger-v3"
    with Dataset.open(ds_path) as ds:
        with pytest.raises(CurateError) as e:
            ds.tag(model=repo, backend="torch", device="cpu")
        assert f"hf download {repo} model.safetensors config.json selected_tags.csv" in e.value.message
        with pytest.raises(CurateError) as e:
            ds.tag(model=repo, backend="onnx")
        assert f"hf download {repo} model.onnx selected_tags.csv" in e.value.message


def test_bad_timm_files_are_one_line_errors(timm_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(timm_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_args"]["depth"] = 3  # weights for 2 blocks
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CurateError) as e:
        wd14.load_tagger(str(bad), "cpu", "torch")
    assert "does not fit vit_base_patch16_224" in e.value.message and "\n" not in e.value.message
    cfg["architecture"] = "no_such_net_v9"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CurateError, match="cannot build 'no_such_net_v9'"):
        wd14.load_tagger(str(bad), "cpu", "torch")
    (bad / "config.json").write_text("{not json")
    with pytest.raises(CurateError, match="cannot read timm config"):
        wd14.load_tagger(str(bad), "cpu", "torch")


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_process_decoding_gives_the_thread_scores_and_reports_broken_files(ds_path, timm_dir, backend):
    from curate.stages.tag import TagConfig, tag_images

    with Dataset.open(ds_path) as ds:
        base = TagConfig(
            model=str(timm_dir), backend=backend, device="cpu", force=True, batch_size=3, workers=2
        )
        by_threads = tag_images(ds.manifest, dataclasses.replace(base, decode="threads"))
        assert by_threads.decode == "threads x 2" and by_threads.inferred == 8
        want = _stored(ds, str(timm_dir))
        (ds_path / "img3.png").write_bytes(b"\x89PNG\r\n\x1a\n broken after the scan")
        run = tag_images(ds.manifest, dataclasses.replace(base, decode="processes"))
        # ONNX takes float32 BGR, which the shared uint8 slots do not hold: it stays on threads.
        assert run.decode == ("processes x 2" if backend == "torch" else "threads x 2")
        assert run.inferred == 7 and [p for p, _ in run.failed] == ["img3.png"]
        got = _stored(ds, str(timm_dir))
        for sha, scores in got.items():
            assert scores == want[sha]
