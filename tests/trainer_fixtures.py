"""Tiny random-weight SD1.5 / SDXL pipelines and a tiny kohya dataset, built in code for the trainer tests."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
from PIL import Image


def make_tokenizer(folder: Path):
    """A real CLIP BPE tokenizer built from open_clip's bundled merges (no download)."""
    import open_clip.tokenizer as ot
    from transformers import CLIPTokenizer

    merges = gzip.open(ot.default_bpe()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    vocab = list(ot.bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({v: i for i, v in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def _te(hidden: int, projection: int | None, seed: int):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, projection_dim=projection or hidden,
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)  # fmt: skip
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def _vae(seed: int):
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(16, 16, 32, 32), norm_num_groups=8, layers_per_block=1, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)  # fmt: skip


def tiny_sd15_pipeline(tok_dir: Path, seed: int = 0, vae_scaling_factor: float | None = None):
    """vae_scaling_factor: the random VAE's latents have std ~0.33, so SD's 0.18215 leaves them at ~0.06 and every
    image looks alike under the noise; 3.0 brings them to ~1, as a real VAE's scaled latents (images then differ)."""
    import torch
    from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=2, sample_size=8, norm_num_groups=8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=4)  # fmt: skip
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    tok = make_tokenizer(tok_dir)
    vae = _vae(seed + 1)
    if vae_scaling_factor:
        vae.register_to_config(scaling_factor=vae_scaling_factor)
    return StableDiffusionPipeline(vae=vae, text_encoder=_te(32, None, seed + 2), tokenizer=tok, unet=unet,
                                   scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)  # fmt: skip


def tiny_sdxl_pipeline(tok_dir: Path, seed: int = 0):
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=2, sample_size=8, norm_num_groups=8,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64,
                                attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2),
                                use_linear_projection=True, addition_embed_type="text_time",
                                addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32)  # fmt: skip
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    tok = make_tokenizer(tok_dir)
    return StableDiffusionXLPipeline(vae=_vae(seed + 1), text_encoder=_te(32, None, seed + 2),
                                     text_encoder_2=_te(32, 32, seed + 3), tokenizer=tok, tokenizer_2=tok, unet=unet,
                                     scheduler=sched)  # fmt: skip


def make_dataset(root: Path, n: int = 4, repeats: int = 2, val: int = 2, seed: int = 0) -> Path:
    """A kohya-layout folder root/train/<repeats>_subject with smooth random images + captions; root/val beside it."""
    rng = np.random.default_rng(seed)

    def image(w: int, h: int) -> Image.Image:
        low = rng.uniform(0, 255, (4, 4, 3)).astype(np.uint8)  # smooth, learnable structure
        return Image.fromarray(low).resize((w, h), Image.BILINEAR)

    sizes = [(64, 64), (96, 64), (64, 64), (64, 96)]
    sub = root / "train" / f"{repeats}_subject"
    sub.mkdir(parents=True)
    for i in range(n):
        image(*sizes[i % len(sizes)]).save(sub / f"img{i}.png")
        (sub / f"img{i}.txt").write_text(f"sks, photo, tag{i % 2}, red")
    vdir = root / "val" / "1_subject"
    vdir.mkdir(parents=True)
    for i in range(val):
        image(64, 64).save(vdir / f"v{i}.png")
        (vdir / f"v{i}.txt").write_text("sks, photo")
    return root / "train"


# ---------------------------------------------------------------- pytest fixtures (import them into a test module)
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def sd15_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("sd15")
    tiny_sd15_pipeline(d / "tok").save_pretrained(d / "model")
    return d / "model"


@pytest.fixture(scope="session")
def sdxl_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("sdxl")
    tiny_sdxl_pipeline(d / "tok").save_pretrained(d / "model")
    return d / "model"


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"))
