"""What the user asked for reaches the trainer: resolution, regularization, validation, resume, safe saves.

User journeys on folders built here, with the tiny random-weight SD1.5 of tests/trainer_fixtures.py on CPU.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from curate.cli import app
from tests.trainer_fixtures import make_dataset, sd15_dir  # noqa: F401  (pytest fixtures)
from trainer_bridge import TrainConfig, TrainError, train
from trainer_bridge.export import load_lora

# tiny, fast settings for every CLI run (fp32 on CPU, rank 4, one epoch, batches of 2)
TINY = ["network_dim=4", "network_alpha=4", "mixed_precision='no'", "batch_size=2", "epochs=1",
        "unet_lr=1e-2", "log_every_n_steps=1", "seed=7"]  # fmt: skip


def cli(*args: str, sets: list[str] = TINY) -> tuple[int, str]:
    r = CliRunner().invoke(app, [*args, *(a for s in sets for a in ("--set", s))])
    return r.exit_code, r.output


def one_line_error(out: str, *needles: str) -> None:
    """A single `error: ...` line naming what is wrong, and no traceback."""
    lines = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in out, out
    for n in needles:
        assert n in lines[0], (n, out)


def picture(path: Path, w: int, h: int, seed: int) -> None:
    low = np.random.default_rng(seed).uniform(0, 255, (4, 4, 3)).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(low).resize((w, h), Image.BILINEAR).save(path)


def no_model_loads(monkeypatch) -> None:
    """Any attempt to load the base model or encode latents fails the test (errors must come first)."""
    from trainer_bridge import data as D
    from trainer_bridge import models as M

    def boom(*a, **k):
        raise AssertionError("the model was loaded before the error")

    monkeypatch.setattr(M, "load_base", boom)
    monkeypatch.setattr(D, "encode_latents", boom)


# ---------------------------------------------------------------- resolution and model family (issue 11 item 4)


@pytest.mark.slow
def test_set_resolution_beats_the_dataset_toml_and_caches_64px_latents(sd15_dir, tmp_path):  # noqa: F811
    img = tmp_path / "img" / "2_sks"
    for i, (w, h) in enumerate([(256, 256), (384, 256), (256, 384)]):
        picture(img / f"{i}.png", w, h, i)
    toml = tmp_path / "dataset.toml"  # what an earlier export wrote: resolution 256, buckets from 128
    toml.write_text(
        f"[[datasets]]\nresolution = 256\nmin_bucket_reso = 128\nmax_bucket_reso = 512\nbucket_reso_steps = 64\n"
        f'[[datasets.subsets]]\nimage_dir = "{img}"\nnum_repeats = 2\n'
    )
    out = tmp_path / "out"
    code, text = cli("train", str(toml), "--base", str(sd15_dir), "--output-dir", str(out),
                     sets=[*TINY, "resolution=64"])  # fmt: skip
    assert code == 0, text
    assert "model family sd15 (read from the base model: StableDiffusionPipeline" in text
    assert "resolution 64 (set in the training config), buckets 64-128 step 64" in text
    assert "the dataset TOML's resolution 256 and its bucket sizes are not used" in text
    cached = [load_file(str(p)) for p in (out / "cache").glob("*.safetensors")]
    # 64 px buckets at step 64: every image lands in 64x64, so every latent is 8x8 (the VAE's /8), not 32x32
    assert len(cached) == 3 and {tuple(t["latent"].shape) for t in cached} == {(4, 8, 8)}
    meta = load_lora(out / "lora.safetensors")[1]
    assert meta["ss_resolution"] == "(64, 64)" and meta["modelspec.resolution"] == "64x64"
    assert (meta["ss_min_bucket_reso"], meta["ss_max_bucket_reso"]) == ("64", "128")
    assert meta["ss_base_model_version"] == "sd_v1"

    # without --set the dataset TOML's resolution (and its buckets) hold: 256 px area -> 32x32 latents
    code, text = cli("train", str(toml), "--base", str(sd15_dir), "--output-dir", str(tmp_path / "o2"))
    assert code == 0 and "resolution 256 (from the dataset TOML), buckets 128-512 step 64" in text, text
    shapes = {
        tuple(load_file(str(p))["latent"].shape) for p in (tmp_path / "o2" / "cache").glob("*.safetensors")
    }
    assert (4, 32, 32) in shapes and len(shapes) == 3  # 256x256, 320x192 and 192x320 buckets


def test_family_default_resolution_and_bucket_checks(tmp_path):
    """No resolution anywhere: the family's (sd15 512, sdxl 1024); bucket limits checked as sd-scripts does."""
    from trainer_bridge import data as D

    img = tmp_path / "1_x"
    picture(img / "a.png", 600, 400, 0)
    for fam, res, lo, hi in (("sd15", 512, 256, 1024), ("sdxl", 1024, 256, 2048)):
        spec = D.read_dataset(TrainConfig(data=str(tmp_path)), fam)
        assert (spec.resolution, spec.min_bucket_reso, spec.max_bucket_reso) == (res, lo, hi)
    spec = D.read_dataset(TrainConfig(data=str(tmp_path), resolution=64), "sdxl")
    assert (spec.resolution, spec.min_bucket_reso, spec.max_bucket_reso) == (64, 64, 128)
    assert D.list_items(spec.subsets, spec)[0].bucket == (64, 64)
    # sd-scripts rounds min down / max up to the step, then requires min <= resolution <= max
    spec = D.read_dataset(TrainConfig(data=str(tmp_path), min_bucket_reso=300, max_bucket_reso=1000), "sd15")
    assert (spec.min_bucket_reso, spec.max_bucket_reso) == (256, 1024)
    with pytest.raises(TrainError, match="min_bucket_reso 576 is above the resolution 512"):
        D.read_dataset(TrainConfig(data=str(tmp_path), min_bucket_reso=600), "sd15")
    with pytest.raises(TrainError, match="max_bucket_reso 384 is below the resolution 512"):
        D.read_dataset(TrainConfig(data=str(tmp_path), max_bucket_reso=384), "sd15")
    with pytest.raises(TrainError, match="bucket_reso_steps 12 must be a multiple of 8"):
        D.read_dataset(TrainConfig(data=str(tmp_path), bucket_reso_steps=12), "sd15")


def test_family_is_read_from_the_base_model(sd15_dir, tmp_path):  # noqa: F811
    from trainer_bridge.models import check_family

    assert check_family(str(sd15_dir), "")[0] == "sd15"
    idx = json.loads((sd15_dir / "model_index.json").read_text())
    xl = tmp_path / "xl"
    xl.mkdir()
    (xl / "model_index.json").write_text(json.dumps({**idx, "_class_name": "StableDiffusionXLPipeline"}))
    fam, why = check_family(str(xl), "")
    assert fam == "sdxl" and "StableDiffusionXLPipeline in model_index.json" in why
    # single files: the key layout says which
    save_file(
        {"conditioner.embedders.1.model.ln_final.weight": torch.zeros(2)}, str(tmp_path / "xl.safetensors")
    )
    save_file({"cond_stage_model.transformer.x": torch.zeros(2)}, str(tmp_path / "v1.safetensors"))
    assert check_family(str(tmp_path / "xl.safetensors"), "")[0] == "sdxl"
    assert check_family(str(tmp_path / "v1.safetensors"), "")[0] == "sd15"
    with pytest.raises(TrainError, match="is SD1.5 .* but model_family is sdxl"):
        check_family(str(tmp_path / "v1.safetensors"), "sdxl")


def test_bad_model_and_bucket_input_is_one_line_before_the_model_loads(sd15_dir, tmp_path, monkeypatch):  # noqa: F811
    data = make_dataset(tmp_path / "d")
    base = ["--base", str(sd15_dir), "--output-dir", str(tmp_path / "o")]
    no_model_loads(monkeypatch)
    code, out = cli("train", str(data), *base, "--family", "sdxl")
    assert code == 2
    one_line_error(out, "is SD1.5 (StableDiffusionPipeline in model_index.json) but model_family is sdxl")
    code, out = cli("train", str(data), *base, sets=[*TINY, "resolution=64", "min_bucket_reso=128"])
    assert code == 2
    one_line_error(out, "min_bucket_reso 128 is above the resolution 64", "sd-scripts refuses this too")
    for name in ("../../x", "a/b", "/tmp/x", ".."):
        code, out = cli("train", str(data), *base, sets=[*TINY, f"output_name={json.dumps(name)}"])
        assert code == 2
        one_line_error(out, "must be a plain file name")
    assert not (tmp_path / "x.safetensors").exists() and not list(tmp_path.parent.glob("x.safetensors"))
    # a local path that does not exist: no download advice
    code, out = cli("train", str(data), "--base", str(tmp_path / "models" / "nope"))
    assert code == 2 and "download" not in out
    one_line_error(out, "no such folder")
    code, out = cli("train", str(data), "--base", "someone/not-downloaded")
    one_line_error(out, "`hf download someone/not-downloaded`")
    assert "huggingface-cli" not in out
    # a UNet stored only as a pickle is refused, with the conversion
    pickled = tmp_path / "pickled"
    shutil.copytree(sd15_dir, pickled)
    (pickled / "unet" / "diffusion_pytorch_model.safetensors").rename(
        pickled / "unet" / "diffusion_pytorch_model.bin"
    )
    code, out = cli("train", str(data), "--base", str(pickled))
    assert code == 2
    one_line_error(
        out, "unet of", "has only pickle weights (diffusion_pytorch_model.bin)", "safe_serialization=True"
    )
    (tmp_path / "model.ckpt").write_bytes(b"x")
    code, out = cli("train", str(data), "--base", str(tmp_path / "model.ckpt"))
    one_line_error(out, "pickle checkpoint")


# ---------------------------------------------------------------- concepts and regularization (items 6 and 7)


def concept_toml(root: Path, reg_seed: int = 100) -> Path:
    """Two concept folders as `curate export` writes them (one image without a caption) and a reg subset."""
    alice, bob, reg = root / "img" / "2_alice woman", root / "img" / "1_bob man", root / "reg" / "1_woman"
    for i in range(2):
        picture(alice / f"a{i}.png", 64, 64, i)
        picture(bob / f"b{i}.png", 64, 64, 10 + i)
    (alice / "a0.txt").write_text("Alice, Red Hair\nsecond line is ignored, as sd-scripts reads line 1\n")
    (bob / "b0.txt").write_text("bob man, hat")
    (bob / "b1.txt").write_text("bob man")
    for i in range(3):
        picture(reg / f"r{i}.png", 64, 64, reg_seed + i)
    toml = root / "dataset.toml"
    toml.write_text(
        '[general]\ncaption_extension = ".txt"\n[[datasets]]\nresolution = 64\nmin_bucket_reso = 64\n'
        "max_bucket_reso = 128\nbucket_reso_steps = 64\n"
        f'[[datasets.subsets]]\nimage_dir = "{alice}"\nnum_repeats = 2\nclass_tokens = "alice woman"\n'
        f'[[datasets.subsets]]\nimage_dir = "{bob}"\nnum_repeats = 1\nclass_tokens = "bob man"\n'
        f'[[datasets.subsets]]\nimage_dir = "{reg}"\nnum_repeats = 1\nis_reg = true\nclass_tokens = "woman"\n'
    )
    return toml


def tiny(base, data, out, **kw) -> TrainConfig:
    values = dict(base=str(base), data=str(data), output_dir=str(out), batch_size=2, network_dim=4, network_alpha=4,
                  mixed_precision="no", log_every_n_steps=1, unet_lr=1e-2, seed=7, epochs=1, save_state=False)  # fmt: skip
    return TrainConfig(**{**values, **kw})


def test_reg_balance_is_sd_scripts_rule():
    from trainer_bridge import data as D

    def items(train_reps: list[int], reg_reps: list[int]):
        mk = [D.Item(Path(f"{i}"), "", D.Subset(Path("t"), r)) for i, r in enumerate(train_reps)]
        return mk + [
            D.Item(Path(f"r{i}"), "", D.Subset(Path("r"), r, is_reg=True)) for i, r in enumerate(reg_reps)
        ]

    # 2x2 + 2x1 = 6 training image-repeats; 3 reg images (1 repeat) -> 3, then one more each round-robin
    assert D.epoch_repeats(items([2, 2, 1, 1], [1, 1, 1])) == [2, 2, 1, 1, 2, 2, 2]
    # more reg images than needed: the first ones fill the quota, the rest are not used (sd-scripts warns)
    assert D.epoch_repeats(items([1, 1], [1, 1, 1, 1])) == [1, 1, 1, 1, 0, 0]
    assert D.epoch_repeats(items([3], [2, 5])) == [3, 2, 5]  # first pass takes each reg image's own repeats


@pytest.mark.slow
def test_concepts_and_reg_subset_reach_the_lora_metadata_and_the_loss(sd15_dir, tmp_path, monkeypatch):  # noqa: F811
    from trainer_bridge import loss as LS

    seen: list[list[float]] = []
    real = LS.diffusion_loss

    def recording(*a, **k):
        if k.get("weights") is not None and k.get("noise") is None:  # training batches, not validation
            seen.append(k["weights"].tolist())
        return real(*a, **k)

    monkeypatch.setattr(LS, "diffusion_loss", recording)
    r = train(tiny(sd15_dir, concept_toml(tmp_path / "a"), tmp_path / "o", prior_loss_weight=0.25))
    meta = load_lora(r.lora_path)[1]
    # 2 alice x 2 repeats + 2 bob x 1 = 6 training image-repeats; 3 reg images -> 3 (as sd-scripts counts them)
    assert (meta["ss_num_train_images"], meta["ss_num_reg_images"], meta["ss_prior_loss_weight"]) == (
        "6",
        "3",
        "0.25",
    )
    assert json.loads(meta["ss_dataset_dirs"]) == {
        "2_alice woman": {"n_repeats": 2, "img_count": 2},
        "1_bob man": {"n_repeats": 1, "img_count": 2},
    }
    assert json.loads(meta["ss_reg_dataset_dirs"]) == {"1_woman": {"n_repeats": 1, "img_count": 3}}
    # per concept folder; a1.png has no caption file and trains on its class tokens; tags lower-cased
    assert json.loads(meta["ss_tag_frequency"]) == {
        "2_alice woman": {"alice": 1, "red hair": 1, "alice woman": 1},
        "1_bob man": {"bob man": 2, "hat": 1},
        "1_woman": {"woman": 3},
    }
    # reg images sit in the batches beside the training images, balanced to 6 per epoch, at weight 0.25
    flat = [w for b in seen for w in b]
    assert sorted(flat) == [0.25] * 6 + [1.0] * 6 and any(0.25 in b and 1.0 in b for b in seen), seen
    assert meta["ss_num_batches_per_epoch"] == "6" and r.steps == 6


@pytest.mark.slow
def test_prior_loss_weight_zero_means_reg_images_do_not_move_the_lora(sd15_dir, tmp_path):  # noqa: F811
    """Same layout, different reg pictures: identical LoRA at prior_loss_weight 0, different at 1."""
    runs = {}
    for name, seed, w in (("a", 100, 0.0), ("b", 200, 0.0), ("c", 200, 1.0)):
        r = train(
            tiny(sd15_dir, concept_toml(tmp_path / name, seed), tmp_path / f"o{name}", prior_loss_weight=w)
        )
        runs[name] = load_file(str(r.lora_path))
    a, b, c = runs["a"], runs["b"], runs["c"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(b[k], c[k]) for k in b)


# ---------------------------------------------------------------- validation from a curated folder (item 8)


@pytest.mark.slow
def test_val_loss_from_a_curated_export(sd15_dir, tmp_path):  # noqa: F811
    ds = tmp_path / "ds"
    for i in range(8):
        picture(ds / f"p{i}.png", 96 if i % 2 else 64, 64, i)
        (ds / f"p{i}.txt").write_text(f"sks, photo, tag{i % 3}")
    code, out = cli("scan", str(ds), sets=[])
    assert code == 0, out
    code, out = cli("split", str(ds), "--val", "0.25", "--seed", "0", sets=[])
    assert code == 0, out
    code, out = cli("export", str(ds), str(tmp_path / "exp"), "--format", "kohya", "--repeats", "1", sets=[])
    assert code == 0, out
    assert (tmp_path / "exp" / "dataset_val.toml").is_file()
    o = tmp_path / "o"
    code, out = cli("train", str(tmp_path / "exp" / "dataset.toml"), "--base", str(sd15_dir), "--output-dir", str(o),
                    sets=[*TINY, "epochs=2", "resolution=64"])  # fmt: skip
    assert code == 0, out
    assert f"validation set: {tmp_path / 'exp' / 'dataset_val.toml'}" in out.replace("\n", "")
    assert re.findall(r"epoch (\d+): val loss \d\.\d{4} \((\d+) images\)", out) == [("1", "2"), ("2", "2")], (
        out
    )
    meta = load_lora(o / "lora.safetensors")[1]
    losses = json.loads(meta["curate_val_losses"])
    assert len(losses) == 2 and all(v > 0 for v in losses) and float(meta["curate_val_loss"]) == losses[-1]
    assert meta["ss_num_validation_images"] == "2"  # 8 images, --val 0.25
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = (o / "logs").glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events))
    acc.Reload()
    assert "loss/val" in acc.Tags()["scalars"]
    assert [e.value for e in acc.Scalars("loss/val")] == pytest.approx(losses, rel=1e-5)


def test_val_data_may_be_a_folder_or_a_toml(tmp_path):
    from trainer_bridge import data as D

    train_dir = make_dataset(tmp_path / "d")
    val_dir = tmp_path / "d" / "val"
    toml = tmp_path / "v.toml"
    toml.write_text(
        f'[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = "{val_dir / "1_subject"}"\n'
    )
    for val in (str(val_dir), str(toml)):
        spec = D.read_dataset(TrainConfig(data=str(train_dir), val_data=val, resolution=64), "sd15")
        assert [s.image_dir for s in spec.val_subsets] == [val_dir / "1_subject"]
    with pytest.raises(TrainError, match="validation data not found"):
        D.read_dataset(TrainConfig(data=str(train_dir), val_data=str(tmp_path / "nope")), "sd15")


# ---------------------------------------------------------------- resume as printed, Ctrl-C (item 9)


@pytest.fixture(scope="module")
def stopped(sd15_dir, tmp_path_factory):  # noqa: F811
    """A run stopped after 2 of its 4 steps through the CLI (stop_after_steps does what Ctrl-C does)."""
    root = tmp_path_factory.mktemp("resume")
    data = make_dataset(root / "d")
    out = root / "o"
    code, text = cli("train", str(data), "--base", str(sd15_dir), "--output-dir", str(out),
                     sets=[*TINY, "resolution=64", "stop_after_steps=2"])  # fmt: skip
    return code, text, out


@pytest.mark.slow
def test_printed_resume_command_works_as_printed(stopped, tmp_path, monkeypatch):
    code, text, out = stopped
    assert code == 130, text  # interrupted, as after Ctrl-C
    (line,) = [ln for ln in text.splitlines() if "resume with: " in ln]
    cmd = shlex.split(line.split("resume with: ")[1])
    assert cmd[:3] == ["curate", "train", "--resume"] and len(cmd) == 4
    state = Path(cmd[3])
    assert state == (out / "lora-state").resolve() and (state / "state.json").is_file()
    assert (out / "lora-step000002.safetensors").is_file() and not list(out.glob("*-state-*"))
    monkeypatch.chdir(tmp_path)  # the printed command works from anywhere: the state records absolute paths
    r = CliRunner().invoke(app, cmd[1:])
    assert r.exit_code == 0, r.output
    meta = load_lora(out / "lora.safetensors")[1]
    # 4 images x 2 repeats / batch 2 = 4 steps: the resumed run finished the remaining 2, with the same settings
    assert (meta["ss_steps"], meta["ss_network_dim"], meta["ss_resolution"]) == ("4", "4", "(64, 64)")
    info = json.loads((out / "lora-state" / "state.json").read_text())["info"]
    assert info["step"] == 4 and info["config"]["data"] == str((out.parent / "d").resolve() / "train")


@pytest.mark.slow
def test_bad_resume_is_one_line_before_anything_loads(stopped, tmp_path, monkeypatch):
    _, _, out = stopped
    good = out / "lora-state"
    no_model_loads(monkeypatch)
    code, text = cli("train", "--resume", str(tmp_path / "missing"), sets=[])
    assert code == 2
    one_line_error(text, "resume state not found: no such folder")
    (tmp_path / "empty").mkdir()
    code, text = cli("train", "--resume", str(tmp_path / "empty"), sets=[])
    one_line_error(text, "is not a training state folder (no state.json)")

    def broken(name: str, how) -> str:
        d = tmp_path / name
        shutil.copytree(good, d)
        how(d)
        code, text = cli("train", "--resume", str(d), sets=[])
        assert code == 2, text
        return text

    one_line_error(
        broken("garbage", lambda d: (d / "state.json").write_text("{not json")), "state.json is damaged"
    )
    one_line_error(
        broken("nolora", lambda d: (d / "lora.safetensors").unlink()), "lora.safetensors is missing"
    )

    def drop_tensor(d: Path) -> None:
        t = load_file(str(d / "optimizer.safetensors"))
        t.pop(next(k for k in t if k.startswith("opt.state.")))
        save_file(t, str(d / "optimizer.safetensors"))

    one_line_error(broken("notensor", drop_tensor), "optimizer.safetensors lacks the tensor")
    one_line_error(
        broken("trunc", lambda d: (d / "optimizer.safetensors").write_bytes(b"\x10")), "is damaged"
    )
    # a state from another network shape
    code, text = cli("train", "--resume", str(good), sets=["network_dim=8"])
    one_line_error(text, "was written with network_dim = 4, this run has 8")


def test_ctrl_c_exits_130_with_and_without_a_state(sd15_dir, tmp_path, monkeypatch):  # noqa: F811
    """A real SIGINT: during the loop a state is written and the exit is 130; during setup no state, also 130."""
    import signal

    from trainer_bridge import data as D

    data = make_dataset(tmp_path / "d")
    real = D.encode_latents

    def interrupted(*a, **k):
        signal.raise_signal(signal.SIGINT)
        return real(*a, **k)

    monkeypatch.setattr(D, "encode_latents", interrupted)
    code, out = cli("train", str(data), "--base", str(sd15_dir), "--output-dir", str(tmp_path / "o"),
                    sets=[*TINY, "resolution=64"])  # fmt: skip
    assert code == 130 and "Traceback" not in out and "interrupted" in out, out
    assert not list((tmp_path / "o").glob("*state*"))


@pytest.mark.slow
@pytest.mark.parametrize(("signame", "code"), [("SIGINT", 130), ("SIGTERM", 143)])
def test_signal_to_a_training_process_exits_with_a_resumable_state(sd15_dir, tmp_path, signame, code):  # noqa: F811
    """Ctrl-C and SIGTERM (a scheduler, a closed terminal) both save a resumable state after the step."""
    data = make_dataset(tmp_path / "d")
    out = tmp_path / "o"
    script = (
        "import os, signal, sys\n"
        "from trainer_bridge import lora as L\n"
        "real, n = L.scale_weight_norms, []\n"
        "def hook(mods, m):\n"
        "    n.append(1)\n"
        f"    if len(n) == 2: os.kill(os.getpid(), signal.{signame})\n"  # a real signal during step 2
        "    return real(mods, m)\n"
        "L.scale_weight_norms = hook\n"
        "from curate.cli import main\n"
        "sys.argv = ['curate'] + sys.argv[1:]\n"
        "main()\n"
    )
    args = ["train", str(data), "--base", str(sd15_dir), "--output-dir", str(out)]
    for s in [*TINY, "resolution=64", "scale_weight_norms=10.0"]:
        args += ["--set", s]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    p = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, env=env, timeout=300
    )
    assert p.returncode == code, p.stdout + p.stderr
    assert "Traceback" not in p.stderr and "resume with: curate train --resume" in p.stdout
    assert json.loads((out / "lora-state" / "state.json").read_text())["info"]["step"] == 2


# ---------------------------------------------------------------- disk full during the save (issue 12)


@pytest.mark.parametrize("fail_at", [1, 2])
def test_disk_full_during_save_is_one_line_and_leaves_nothing_complete(
    sd15_dir,  # noqa: F811
    tmp_path,
    monkeypatch,
    fail_at,
):
    """ENOSPC at the LoRA write (1) or at the state write after it (2): one line, no half file under a real name."""
    data = make_dataset(tmp_path / "d", n=2, val=0)
    calls = []
    real = os.fsync

    def full(fd):
        calls.append(fd)
        if len(calls) >= fail_at:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(os, "fsync", full)
    out = tmp_path / "o"
    code, text = cli("train", str(data), "--base", str(sd15_dir), "--output-dir", str(out),
                     sets=[*TINY, "resolution=64"])  # fmt: skip
    assert code == 2
    one_line_error(text, "no space left on the disk", "nothing was left half-written")
    left = sorted(p.name for p in out.iterdir())
    assert not any(n.endswith((".tmp", ".old")) for n in left), left
    assert "lora-state" not in left
    assert ("lora.safetensors" in left) == (
        fail_at == 2
    )  # a LoRA written before the state failed is complete
    if fail_at == 2:
        load_lora(out / "lora.safetensors")


def test_lora_info_reads_odd_metadata_without_a_traceback(tmp_path):
    from trainer_bridge import lora as L
    from trainer_bridge.export import save_lora

    mod = L.LoRAModule(torch.nn.Linear(8, 8), rank=2, alpha=1)
    mod.kohya_name = "lora_unet_x"
    path = save_lora(tmp_path / "odd.safetensors", L.lora_state_dict([mod]),
                     {"ss_network_dim": "abc", "ss_network_alpha": "?", "ss_tag_frequency": ["not", "a", "dict"],
                      "ss_network_args": "[1]"})  # fmt: skip
    code, out = cli("lora-info", str(path), "--json", sets=[])
    assert code == 0, out
    info = json.loads(out)
    assert (info["rank"], info["alpha"], info["top_tags"], info["network_args"]) == (2, 1.0, [], {})


def test_curated_dataset_trains_at_set_plan_or_family_resolution(sd15_dir, tmp_path, monkeypatch):  # noqa: F811
    """`curate train DS`: the export's TOML (1024 from the default bucket settings) does not pick the resolution."""
    import trainer_bridge
    from trainer_bridge.train import TrainResult

    ds = tmp_path / "ds"
    for i in range(4):
        picture(ds / f"p{i}.png", 64, 64, i)
    assert cli("scan", str(ds), sets=[])[0] == 0
    xl = tmp_path / "xl"  # only model_index.json is read before training starts
    xl.mkdir()
    idx = json.loads((sd15_dir / "model_index.json").read_text())
    (xl / "model_index.json").write_text(json.dumps({**idx, "_class_name": "StableDiffusionXLPipeline"}))
    got = []
    monkeypatch.setattr(
        trainer_bridge, "train", lambda cfg: got.append(cfg) or TrainResult(Path("x"), None, 1, 1)
    )
    plan = tmp_path / "plan.toml"
    plan.write_text(f'[train]\nresolution = 768\nbase = "{sd15_dir}"\n')
    for args, want in (
        (["--base", str(sd15_dir)], 512),
        (["--base", str(xl)], 1024),
        (["--base", str(sd15_dir), "--set", "resolution=64"], 64),
        (["--config", str(plan)], 768),
    ):
        code, out = cli("train", str(ds), "--output-dir", str(tmp_path / "o"), *args, sets=[])
        assert code == 0, out
        assert got[-1].resolution == want and got[-1].data.endswith("dataset.toml"), (args, got[-1])


@pytest.mark.slow
def test_two_concept_kohya_folder_with_reg_round_trips_into_the_lora(sd15_dir, tmp_path):  # noqa: F811
    """`curate train DS --reg REG` on kohya-layout input: concepts, repeats, class tokens and reg images arrive."""
    ds, reg = tmp_path / "ds", tmp_path / "reg"
    for i in range(2):
        picture(ds / "3_alice woman" / f"a{i}.png", 64, 64, i)
        picture(ds / "1_bob man" / f"b{i}.png", 64, 64, 10 + i)
        picture(reg / f"r{i}.png", 64, 64, 20 + i)
    (ds / "3_alice woman" / "a0.txt").write_text("alice woman, red hair")
    assert cli("scan", str(ds), sets=[])[0] == 0
    out = tmp_path / "o"
    code, text = cli("train", str(ds), "--reg", str(reg), "--base", str(sd15_dir), "--output-dir", str(out),
                     sets=[*TINY, "resolution=64"])  # fmt: skip
    assert code == 0, text
    meta = load_lora(out / "lora.safetensors")[1]
    dirs = json.loads(meta["ss_dataset_dirs"])
    assert {k: v["n_repeats"] for k, v in dirs.items()} == {"3_alice woman": 3, "1_bob man": 1}, dirs
    assert meta["ss_num_train_images"] == str(2 * 3 + 2 * 1) and int(meta["ss_num_reg_images"]) == 2 * int(
        next(iter(json.loads(meta["ss_reg_dataset_dirs"]).values()))["n_repeats"]
    )
    freq = json.loads(meta["ss_tag_frequency"])
    assert freq["3_alice woman"]["red hair"] == 1 and freq["1_bob man"]["bob man"] == 2, freq
