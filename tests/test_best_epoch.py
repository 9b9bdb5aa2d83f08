"""Best epoch: each saved epoch records its train and val loss; the table marks the lowest val loss; keep_last_n
never deletes the best file; the overfitting warning; sample/epochs.png is a prompt x epoch grid.

Runs of the tiny random-weight SD1.5 (tests/trainer_fixtures.py) on CPU through `curate train`; the last test is a
real run that overfits in seconds (what that takes is noted above it).
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from curate.cli import app
from tests.trainer_fixtures import make_dataset, sd15_dir, tiny_sd15_pipeline  # noqa: F401  (pytest fixtures)
from trainer_bridge import epochs as E
from trainer_bridge.epochs import EpochRecord
from trainer_bridge.export import load_lora

# 4 images x 1 repeat, batches of 2: 2 steps an epoch; 2 validation images; fp32 on CPU
TINY = ["network_dim=4", "network_alpha=4", "mixed_precision='no'", "batch_size=2", "num_repeats=1",
        "unet_lr=1e-2", "log_every_n_steps=1", "seed=7", "resolution=64", "save_every_n_epochs=1",
        "save_state=false"]  # fmt: skip


def cli(*args: str, sets: list[str]):
    return CliRunner().invoke(app, [*args, *(a for s in [*TINY, *sets] for a in ("--set", s))])


def data(root):
    d = make_dataset(root / "d", n=4, repeats=1, val=2)
    return d


@pytest.fixture(scope="module")
def run(sd15_dir, tmp_path_factory):  # noqa: F811
    """4 epochs, keep_last_n = 1, two sample prompts (one denoising step each)."""
    root = tmp_path_factory.mktemp("best")
    out = root / "o"
    r = cli("train", str(data(root)), "--base", str(sd15_dir), "--output-dir", str(out),
            sets=["epochs=4", "keep_last_n=1", "sample_prompts=['sks, photo', 'red']", "sample_steps=1"])  # fmt: skip
    assert r.exit_code == 0, r.output
    return r.output, out


def test_each_saved_epoch_records_its_losses_and_the_best_is_marked(run):
    text, out = run
    summary = json.loads((out / "logs" / "epochs.json").read_text())
    rows = [EpochRecord.from_dict(d) for d in summary["epochs"]]
    assert [r.epoch for r in rows] == [1, 2, 3, 4] and [r.step for r in rows] == [2, 4, 6, 8]
    assert [r.file for r in rows] == [f"lora-00000{i}.safetensors" for i in (1, 2, 3)] + ["lora.safetensors"]
    assert all(0 < r.train_loss < 5 and 0 < r.val_loss < 5 for r in rows)
    vals = [r.val_loss for r in rows]
    best = min(range(4), key=vals.__getitem__)
    assert summary["best_epoch"] == best + 1 and summary["best_file"] == rows[best].file
    # the val losses are the ones printed each epoch, and the table shows every row with "best" on the argmin
    for r in rows:
        assert f"epoch {r.epoch}: val loss {r.val_loss:.4f}" in text
    table = [ln for ln in text.splitlines() if ln.startswith("│")]
    for i, r in enumerate(rows):
        (line,) = [ln for ln in table if r.file in ln]
        assert f"{r.train_loss:.4f}" in line and f"{r.val_loss:.4f}" in line
        assert ("best" in line) == (i == best), line
    # each file carries its own epoch's losses; the final file carries the whole table
    for r in rows:
        if r.removed:
            assert not (out / r.file).exists()
            continue
        meta = load_lora(out / r.file)[1]
        assert float(meta["curate_val_loss"]) == pytest.approx(r.val_loss, rel=1e-6)
        assert float(meta["curate_train_loss"]) == pytest.approx(r.train_loss, rel=1e-6)
        assert meta["ss_epoch"] == str(r.epoch)
    final = json.loads(load_lora(out / "lora.safetensors")[1]["curate_epochs"])
    assert final == summary


def test_keep_last_n_removes_old_epochs_but_never_the_best(run):
    text, out = run
    rows = [
        EpochRecord.from_dict(d) for d in json.loads((out / "logs" / "epochs.json").read_text())["epochs"]
    ]
    best = E.best_index(rows)
    on_disk = sorted(p.name for p in out.glob("lora-*.safetensors"))
    # keep_last_n = 1: the newest epoch file (epoch 3) stays, and the best one if it is an earlier epoch
    expect = sorted({"lora-000003.safetensors"} | ({rows[best].file} if best < 3 else set()))
    assert on_disk == expect
    assert [r.removed for r in rows] == [r.file not in expect and r.file != "lora.safetensors" for r in rows]
    assert not rows[best].removed
    for r in rows:
        if r.removed:
            (line,) = [ln for ln in text.splitlines() if r.file in ln and ln.startswith("│")]
            assert "removed" in line
    assert "removed: deleted by keep_last_n (the best epoch's file is always kept)" in text


def test_epochs_png_is_a_prompt_by_epoch_grid(run):
    _, out = run
    rows = [
        EpochRecord.from_dict(d) for d in json.loads((out / "logs" / "epochs.json").read_text())["epochs"]
    ]
    assert all(len(r.samples) == 2 for r in rows)  # 2 prompts sampled at each saved epoch
    with Image.open(out / rows[0].samples[0]) as cell:
        w, h = cell.size
    with Image.open(out / "sample" / "epochs.png") as grid:
        assert grid.size == (4 * w, 2 * h)  # 4 epochs across, 2 prompts down
        grid = grid.convert("RGB")
        # the bottom-right cell is prompt 2 at epoch 4, pixel for pixel (below the label strip)
        with Image.open(out / rows[3].samples[1]) as last:
            want = last.convert("RGB").crop((0, h // 2, w, h))
        assert grid.crop((3 * w, h + h // 2, 4 * w, 2 * h)).tobytes() == want.tobytes()


def rec(epoch: int, train: float, val: float | None) -> EpochRecord:
    return EpochRecord(epoch, epoch * 10, train, val, f"e{epoch}")


def test_overfitting_rule_on_synthetic_sequences():
    falling = [1.0, 0.9, 0.8, 0.7]
    # val rises twice in a row while train falls: warns, naming the three epochs
    w = E.overfitting(
        [rec(i + 1, t, v) for i, (t, v) in enumerate(zip(falling, [0.5, 0.4, 0.45, 0.5], strict=True))]
    )
    assert w is not None and "epoch 2 0.4000 -> 3 0.4500 -> 4 0.5000" in w
    # one rise only, a rise with train loss also rising, flat val, no val set: no warning
    for vals, trains in [
        ([0.5, 0.4, 0.45, 0.44], falling),
        ([0.5, 0.4, 0.45, 0.5], [1.0, 0.9, 0.95, 0.7]),
        ([0.4, 0.4, 0.4, 0.4], falling),
        ([None] * 4, falling),
    ]:
        assert (
            E.overfitting([rec(i + 1, t, v) for i, (t, v) in enumerate(zip(trains, vals, strict=True))])
            is None
        )
    # best: the argmin, the earliest on a tie; none without val losses
    assert E.best_index([rec(1, 1, 0.5), rec(2, 1, 0.3), rec(3, 1, 0.3)]) == 1
    assert E.best_index([rec(1, 1, None)]) is None


def test_keep_files_rule():
    rows = [rec(1, 1, 0.2), rec(2, 1, 0.5), rec(3, 1, 0.4), rec(4, 1, 0.6)]
    assert [r.epoch for r in E.keep_files(rows, 2, final="x")] == [2]  # 1 is the best, 3 and 4 the newest
    assert E.keep_files(rows, 0, final="x") == []


def test_overfitting_warning_and_the_table_survive_a_resume(sd15_dir, tmp_path, monkeypatch):  # noqa: F811
    """The recorded losses are replaced by a rising val / falling train sequence here (the real overfit below takes
    8 epochs); the run stops mid-epoch 2 and resumes: the epochs table and the warning continue from the state."""
    real = E.overfitting

    def rising(records):
        for i, r in enumerate(records):
            r.val_loss = 0.5 + 0.1 * i
            r.train_loss = 1.0 - 0.1 * i
        return real(records)

    monkeypatch.setattr(E, "overfitting", rising)
    out = tmp_path / "o"
    r = cli("train", str(data(tmp_path)), "--base", str(sd15_dir), "--output-dir", str(out),
            sets=["epochs=3", "stop_after_steps=3"])  # fmt: skip
    assert r.exit_code == 130, r.output
    r = CliRunner().invoke(app, ["train", "--resume", str(out / "lora-state"), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)  # stdout holds the JSON alone; progress went to stderr
    assert [(e["epoch"], e["step"]) for e in doc["epochs"]] == [(1, 2), (2, 4), (3, 6)]
    assert doc["lora"].endswith("lora.safetensors") and doc["steps"] == 6
    (w,) = doc["warnings"]
    assert w.startswith(
        "overfitting: val loss rose for two epochs in a row (epoch 1 0.5000 -> 2 0.6000 -> 3 0.7"
    )
    assert doc["best_epoch"] == 1 and doc["epochs_grid"] is None  # no sample prompts: no grid
    assert json.loads((out / "logs" / "epochs.json").read_text())["warnings"] == [w]
    assert "warning: overfitting" in r.stderr


# A run that really overfits, in seconds on CPU. What it takes (measured on the tiny random-weight SD1.5):
# - latents at a real VAE's scale (vae_scaling_factor=3.0): at SD's 0.18215 the random VAE's latents have std ~0.06,
#   every image looks alike under the noise and val loss only falls (10-25 epochs, eps or v, lr 3e-3..1e-2);
# - a LoRA that can memorise fast: dim 32, LoCon conv_dim 32, feed-forward layers, lr 1e-2 (3e-2 diverges), cosine
#   (a constant lr leaves the val loss jittering by ~0.02 once train loss levels off);
# - v-prediction at high timesteps only (min_timestep=900): the target is then mostly -x0, so the net first learns
#   what train and val latents share (val loss falls), then the training image itself (val loss rises); with eps
#   prediction over all timesteps val loss kept falling for 25 epochs;
# - one 32 px training image, 40 repeats in batches of 8: the epoch's mean train loss falls smoothly;
# - a validation set of its negatives (4 copies, so at 4 fixed timesteps 900..999): what memorising hurts most.
# Seeds 0-7: the best epoch was 2-4 of 8 every time, val loss then rose by 0.01-0.03; the warning (two rises in a
# row) fired for 7 of 8 (seed 3: one rise, then flat). The test pins seed 0 (best epoch 3, warning at epochs 3-5).
OVERFIT = ["network_dim=32", "network_alpha=32", "conv_dim=32", "conv_alpha=32", "network_train_ff=true",
           "unet_lr=1e-2", "lr_scheduler='cosine'", "weight_decay=0", "v_prediction=true", "min_timestep=900",
           "batch_size=8", "resolution=32", "bucket_reso_steps=32", "mixed_precision='no'", "epochs=8",
           "save_every_n_epochs=1", "keep_last_n=1", "save_state=false", "log_every_n_steps=100", "seed=0"]  # fmt: skip


def overfit_data(root):
    from PIL import ImageOps

    rng = np.random.default_rng(0)
    sub, val = root / "train" / "40_subject", root / "val" / "1_subject"
    sub.mkdir(parents=True)
    val.mkdir(parents=True)
    img = Image.fromarray(rng.uniform(0, 255, (4, 4, 3)).astype(np.uint8)).resize((32, 32), Image.BILINEAR)
    img.save(sub / "img0.png")
    (sub / "img0.txt").write_text("sks, photo")
    for i in range(4):
        ImageOps.invert(img).save(val / f"v{i}.png")
        (val / f"v{i}.txt").write_text("sks, photo")
    return root / "train"


@pytest.mark.slow
def test_a_real_overfit_warns_and_keeps_the_best_epoch(tmp_path):
    import torch

    tiny_sd15_pipeline(tmp_path / "tok", vae_scaling_factor=3.0).save_pretrained(tmp_path / "model")
    data = overfit_data(tmp_path / "d")

    def run(seed: int):
        out = tmp_path / f"o{seed}"
        sets = [s for s in OVERFIT if not s.startswith("seed=")] + [f"seed={seed}"]
        args = ["train", str(data), "--base", str(tmp_path / "model"), "--output-dir", str(out), "--json",
                *(a for s in sets for a in ("--set", s))]  # fmt: skip
        threads = torch.get_num_threads()
        torch.set_num_threads(
            1
        )  # tiny convs: a second thread only contends (and makes the run machine-dependent)
        try:
            r = CliRunner().invoke(app, args)
        finally:
            torch.set_num_threads(threads)
        assert r.exit_code == 0, r.output
        return out, r, json.loads(r.stdout)

    # Every seed overfits (best epoch 2-4 of 8); the rise after the best is two epochs long in 7 of 8 seeds
    # (seed 3 rose once, then stayed flat), so a second seed is tried when the first one's rise is a single epoch.
    out, r, doc = run(0)
    if not doc["warnings"]:
        out, r, doc = run(1)
    rows = [EpochRecord.from_dict(d) for d in doc["epochs"]]
    assert [(e.epoch, e.step) for e in rows] == [(i, 5 * i) for i in range(1, 9)]  # 40 images / 8: 5 steps
    train, val = [e.train_loss for e in rows], [e.val_loss for e in rows]
    assert train[-1] < 0.5 * train[0]  # it learns the training image
    best = min(range(8), key=val.__getitem__)
    assert doc["best_epoch"] == best + 1 < 8  # the best epoch is early, not the last
    # the warning names three saved epochs whose val loss rose twice while train loss fell, as recorded
    assert len(doc["warnings"]) == 1, (train, val)
    (w,) = doc["warnings"]
    m = re.match(r"overfitting: val loss rose for two epochs in a row \(epoch (\d) ([\d.]+) -> (\d) ([\d.]+) -> "
                 r"(\d) ([\d.]+)\) while train loss fell", w)  # fmt: skip
    assert m, w
    a, b, c = (int(m[i]) for i in (1, 3, 5))
    assert (b, c) == (a + 1, a + 2) and a >= best + 1
    assert val[a - 1] < val[b - 1] < val[c - 1] and train[a - 1] > train[b - 1] > train[c - 1]
    assert [float(m[i]) for i in (2, 4, 6)] == [round(val[e - 1], 4) for e in (a, b, c)]
    assert "warning: overfitting" in r.stderr
    # keep_last_n = 1 keeps the newest epoch file and the best one; the best one is the file that was recorded
    best_file = out / doc["best_file"]
    assert best_file.exists() and doc["best_file"] == f"lora-{best + 1:06d}.safetensors"
    assert sorted(p.name for p in out.glob("lora-*.safetensors")) == sorted(
        {best_file.name, "lora-000007.safetensors"}
    )
    assert float(load_lora(best_file)[1]["curate_val_loss"]) == pytest.approx(val[best], rel=1e-6)
