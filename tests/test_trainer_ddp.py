"""Data-parallel LoRA training on CPU (gloo): 2 ranks compute what 1 process with twice the grad_accum computes."""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load_file

from tests.test_trainer_train import tiny_config
from tests.trainer_fixtures import make_dataset, sd15_dir, sdxl_dir  # noqa: F401  (pytest fixtures)
from trainer_bridge import train
from trainer_bridge.data import BucketBatchSampler
from trainer_bridge.dist import cpu_threads, micro_batches

# every random stream and both DDP-wrapped modules (UNet + text-encoder LoRA), a warmup+cosine schedule; 4 images
# x 3 repeats in batches of 2 = 7 batches per epoch, so with 2 batches per step the last step of each epoch has one
# batch: rank 1 runs a dummy batch there (loss x 0). A state is saved after epoch 1 (step 4) for the resume test.
KW = dict(epochs=2, text_encoder_lr=5e-3, shuffle_caption=True, keep_tokens=1, caption_dropout=0.2, flip_aug=True,
          noise_offset=0.05, multires_noise_iterations=2, network_dropout=0.1, lr_scheduler="cosine",
          lr_warmup_steps=2, save_state=True, save_every_n_epochs=1, log_every_n_steps=2)  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("ddp_data"), repeats=3, val=3)


@pytest.fixture(scope="module", autouse=True)
def rank_threads():
    """1-process runs here use the intra-op thread count of a CPU rank of 2 (dist.worker sets it), so both sum in the
    same order and agree to the last bit; on 2 cores this also avoids 4 OpenMP threads spinning on 2 cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(cpu_threads(2))
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def one_process(sd15_dir, data, tmp_path_factory):  # noqa: F811
    """The reference: 1 process, grad_accum 2 (global batch 4)."""
    return train(tiny_config(sd15_dir, data, tmp_path_factory.mktemp("one"), grad_accum=2, **KW))


def _counting_rank(rank: int, world: int, port: int, cfg, queue) -> None:
    """dist.worker, counting this rank's VAE image loads and LoRA saves into <output_dir>/../counts.<rank>."""
    from pathlib import Path

    from trainer_bridge import data as D
    from trainer_bridge import dist
    from trainer_bridge import export as E

    counts = {"load_image": 0, "save_lora": 0}
    load_image, save_lora = D.load_image, E.save_lora

    def counting_load(*a, **k):
        counts["load_image"] += 1
        return load_image(*a, **k)

    def counting_save(*a, **k):
        counts["save_lora"] += 1
        return save_lora(*a, **k)

    D.load_image, E.save_lora = counting_load, counting_save
    r = dist.worker(rank, world, port, cfg, queue)
    counts.update(
        lora_path=str(r.lora_path) if r.lora_path else None, losses=r.losses, val_losses=r.val_losses
    )
    (Path(cfg.output_dir).parent / f"counts.{rank}").write_text(json.dumps(counts))


@pytest.fixture(scope="module")
def two_ranks(sd15_dir, data, tmp_path_factory):  # noqa: F811
    """2 gloo ranks (spawned as `train(gpus=2)` does), grad_accum 1 (global batch 4): (rank 0's result, reports)."""
    from trainer_bridge.dist import spawn

    out = tmp_path_factory.mktemp("two") / "out"
    result = spawn(tiny_config(sd15_dir, data, out, grad_accum=1, gpus=2, **KW), target=_counting_rank)
    return result, [json.loads((out.parent / f"counts.{r}").read_text()) for r in range(2)]


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.slow
def test_two_ranks_equal_one_process_with_double_grad_accum(one_process, two_ranks):
    two, (r0, r1) = two_ranks
    assert one_process.steps == two.steps == 8  # ceil(7 / 2) steps per epoch x 2 epochs
    a = load_file(str(one_process.state_path / "lora.safetensors"))  # fp32 copies in the resumable states
    b = load_file(str(two.state_path / "lora.safetensors"))
    assert any(k.startswith("lora_te_") for k in a) and any(k.startswith("lora_unet_") for k in a)
    # the LoRA moved (lora_up starts at zero) and both runs land on the same weights, text encoder's included
    assert max(v.abs().max().item() for k, v in a.items() if "lora_up" in k) > 1e-3
    diff = _max_diff(a, b)
    assert diff < 1e-5, diff
    # the train loss (mean over both ranks' batches per log interval) and the gathered val loss agree too
    assert len(two.losses) == 4 and two.losses == pytest.approx(one_process.losses, abs=1e-5)
    assert len(two.val_losses) == 2 and two.val_losses == pytest.approx(one_process.val_losses, abs=1e-6)
    assert r1["val_losses"] == r0["val_losses"] == two.val_losses  # every rank gets the all-reduced value


@pytest.mark.slow
def test_only_rank0_writes_and_latents_encoded_once(one_process, two_ranks):
    two, (r0, r1) = two_ranks
    out = two.lora_path.parent
    # rank 0 decodes 4 train images (their flipped copies are the decoded images mirrored) and 3 val images once;
    # rank 1 only reads the disk cache
    assert (r0["load_image"], r1["load_image"]) == (4 + 3, 0)
    assert (r0["save_lora"], r1["save_lora"]) == (2, 0)  # epoch 1 + final
    assert r0["lora_path"] == str(out / "lora.safetensors") and r1["lora_path"] is None
    assert r1["losses"] == r0["losses"]  # logged values are all-reduced, but only rank 0 writes them

    def files(root):
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())

    # the output folder holds what a 1-process run writes: LoRAs, states, one tensorboard file, 7 cached latents
    names, single = files(out), files(one_process.lora_path.parent)
    assert [n for n in names if not n.startswith("logs/")] == [n for n in single if not n.startswith("logs/")]
    assert len([n for n in names if n.startswith("logs/events.out.tfevents")]) == 1
    assert len([n for n in names if n.startswith("cache/")]) == 7


@pytest.mark.slow
def test_resume_from_two_ranks_on_one_process(one_process, two_ranks, sd15_dir, data, tmp_path):  # noqa: F811
    """The state the 2-rank run saved after epoch 1 (step 4) resumed on 1 process with grad_accum 2 (the same global
    batch) ends where the uninterrupted 1-process run ends."""
    state = two_ranks[0].lora_path.parent / "lora-000001-state"
    info = json.loads((state / "state.json").read_text())["info"]
    assert (info["step"], info["epoch"], info["batch"], info["per_step"], info["world"]) == (4, 1, 0, 2, 2)
    rest = train(tiny_config(sd15_dir, data, tmp_path, grad_accum=2, resume=str(state), **KW))
    # the val losses and the epochs table continue from the state: epoch 1 from the 2-rank run, epoch 2 from this one
    assert rest.steps == 8 and len(rest.val_losses) == 2
    assert [(r.epoch, r.step) for r in rest.epochs] == [(1, 4), (2, 8)]
    assert rest.val_losses == pytest.approx(one_process.val_losses, abs=1e-6)
    diff = _max_diff(
        load_file(str(one_process.state_path / "lora.safetensors")),
        load_file(str(rest.state_path / "lora.safetensors")),
    )
    assert diff < 1e-5, diff
    assert rest.val_losses[-1] == pytest.approx(one_process.val_losses[-1], abs=1e-6)


@pytest.mark.slow
def test_sdxl_two_ranks_with_both_text_encoders(sdxl_dir, data, tmp_path):  # noqa: F811
    """SDXL: CLIP-L's last layer feeds nothing (penultimate states are used), so its DDP wrapper must tolerate LoRA
    weights without gradients; with gradient checkpointing on, 2 ranks still equal 1 process."""
    kw = dict(model_family="sdxl", epochs=1, text_encoder_lr=5e-3, gradient_checkpointing=True, caption_dropout=0.2,
              flip_aug=True, save_state=True)  # fmt: skip
    one = train(tiny_config(sdxl_dir, data, tmp_path / "one", grad_accum=2, **kw))
    two = train(tiny_config(sdxl_dir, data, tmp_path / "two", grad_accum=1, gpus=2, **kw))
    a = load_file(str(one.state_path / "lora.safetensors"))
    assert one.steps == two.steps == 4
    assert sum(k.startswith("lora_te1_") for k in a) == sum(k.startswith("lora_te2_") for k in a) == 36
    diff = _max_diff(a, load_file(str(two.state_path / "lora.safetensors")))
    assert diff < 1e-5, diff
    assert two.val_losses == pytest.approx(one.val_losses, abs=1e-6)


def _interrupted_rank(rank: int, world: int, port: int, cfg, queue) -> None:
    """dist.worker where rank 1 alone gets SIGINT during its 2nd optimizer step (as the single-GPU Ctrl-C test)."""
    import signal

    from trainer_bridge import dist
    from trainer_bridge import lora as L

    real, calls = L.scale_weight_norms, []

    def interrupting(mods, max_norm):
        calls.append(1)
        if rank == 1 and len(calls) == 2:
            signal.raise_signal(signal.SIGINT)
        return real(mods, max_norm)

    L.scale_weight_norms = interrupting
    dist.worker(rank, world, port, cfg, queue)


@pytest.mark.slow
@pytest.mark.timeout(
    300
)  # a rank left waiting for a peer's all-reduce would otherwise hang for the 2 h group timeout
def test_ctrl_c_on_one_rank_stops_all_at_the_same_step(sd15_dir, data, tmp_path):  # noqa: F811
    from trainer_bridge.dist import spawn

    cfg = tiny_config(sd15_dir, data, tmp_path, epochs=1, gpus=2, scale_weight_norms=1.0)
    r = spawn(cfg, target=_interrupted_rank)  # returns: rank 0 did not wait for a step that never comes
    assert r.interrupted and r.steps == 2
    info = json.loads((r.state_path / "state.json").read_text())["info"]
    assert (info["step"], info["epoch"], info["batch"]) == (2, 0, 4)  # 2 steps x 2 ranks x 1 batch


def test_mid_epoch_resume_with_another_step_size(sd15_dir, data, tmp_path):  # noqa: F811
    """A resume with another global batch (e.g. 2 GPUs -> 1 GPU without raising grad_accum) keeps the data position
    (per-device batches consumed in the epoch) and goes on with the new step size; nothing is repeated or skipped."""
    kw = dict(epochs=1, save_state=True)
    part = train(tiny_config(sd15_dir, data, tmp_path, grad_accum=2, stop_after_steps=2, **kw))
    info = json.loads((part.state_path / "state.json").read_text())["info"]
    assert (info["step"], info["epoch"], info["batch"], info["per_step"]) == (2, 0, 4, 2)
    rest = train(tiny_config(sd15_dir, data, tmp_path, grad_accum=1, resume=str(part.state_path), **kw))
    # batches 4, 5, 6 of the 7 remain: 3 more steps of one batch each (the schedule length follows the new size)
    assert rest.steps == 5


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("accum", [1, 2, 3])
def test_sharded_steps_cover_each_batch_once(world, accum):
    """Each optimizer step's batches over all ranks == 1 process's batches with grad_accum * world; per epoch every
    batch exactly once, whatever the remainder; all ranks run the same number of micro-steps (DDP stays in step)."""
    per_step = accum * world
    for n in range(1, 3 * per_step + 2):
        seen = []
        for pos in range(0, n, per_step):
            ranks = [micro_batches(n, pos, per_step, world, r) for r in range(world)]
            assert len({len(m) for m in ranks}) == 1
            assert len(ranks[0]) == min(accum, -(-(min(pos + per_step, n) - pos) // world))
            step = sorted(j for m in ranks for j in m if j is not None)
            assert step == micro_batches(n, pos, per_step, 1, 0)  # the single-process step
            seen += step
        assert seen == list(range(n))
    # and over a real bucketed epoch: the ranks' batches together hold every item x repeat exactly once
    buckets = [random.Random(i).choice([(64, 64), (80, 48), (48, 80)]) for i in range(11)]
    sampler = BucketBatchSampler(buckets, [2] * 11, 3, seed=5)
    batches = sampler.epoch(1)
    got = [
        i
        for pos in range(0, len(batches), per_step)
        for r in range(world)
        for j in micro_batches(len(batches), pos, per_step, world, r)
        if j is not None
        for i in batches[j]
    ]
    assert sorted(got) == sorted(list(range(11)) * 2)
    assert all(len({buckets[i] for i in b}) == 1 for b in batches)


def test_cli_gpus_option_reaches_the_config(tmp_path, monkeypatch):
    import typer
    from typer.testing import CliRunner

    import trainer_bridge
    from curate.commands.train import register

    seen = {}

    def fake_train(cfg):
        seen["cfg"] = cfg
        return trainer_bridge.TrainResult(tmp_path / "x.safetensors", None, 3, 1)

    monkeypatch.setattr(trainer_bridge, "train", fake_train)
    app = typer.Typer()
    register(app)
    (tmp_path / "1_x").mkdir()
    r = CliRunner().invoke(app, ["train", str(tmp_path), "--gpus", "2", "--set", "grad_accum=2"])
    assert r.exit_code == 0, r.output
    assert (seen["cfg"].gpus, seen["cfg"].grad_accum, seen["cfg"].ddp_backend) == (2, 2, "")
    r = CliRunner().invoke(app, ["train", str(tmp_path), "--gpus", "0"])
    assert r.exit_code == 2 and "gpus must be >= 1" in r.output
    # under torchrun: ranks other than 0 print nothing; a curated dataset must be exported once beforehand
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(trainer_bridge, "train", lambda cfg: trainer_bridge.TrainResult(None, None, 3, 1))
    r = CliRunner().invoke(app, ["train", str(tmp_path)])
    assert r.exit_code == 0 and r.output == ""
    (tmp_path / "ds" / ".curate").mkdir(parents=True)
    (tmp_path / "ds" / ".curate" / "manifest.db").touch()
    r = CliRunner().invoke(app, ["train", str(tmp_path / "ds")])
    assert r.exit_code == 2 and "export the dataset once before torchrun: curate export" in r.output


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_two_gpus_nccl_equal_one_gpu(sd15_dir, data, tmp_path):  # noqa: F811
    """The same equivalence over NCCL on 2 GPUs (fp32, so the only differences are CUDA reduction orders)."""
    kw = dict(KW, epochs=1, save_every_n_epochs=0, mixed_precision="no")
    one = train(tiny_config(sd15_dir, data, tmp_path / "one", grad_accum=2, **kw))
    two = train(tiny_config(sd15_dir, data, tmp_path / "two", grad_accum=1, gpus=2, **kw))
    assert one.steps == two.steps == 4
    diff = _max_diff(
        load_file(str(one.state_path / "lora.safetensors")),
        load_file(str(two.state_path / "lora.safetensors")),
    )
    assert diff < 1e-3, diff
    assert two.val_losses[-1] == pytest.approx(one.val_losses[-1], rel=1e-3)
