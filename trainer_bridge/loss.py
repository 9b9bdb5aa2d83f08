"""Diffusion training loss: noising, targets (epsilon / v), min-SNR weighting, noise offset, multires noise."""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F


def snr(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at timesteps t."""
    a = alphas_cumprod[t]
    return a / (1 - a)


def min_snr_weight(snr_t: torch.Tensor, gamma: float, v_prediction: bool) -> torch.Tensor:
    """Min-SNR-gamma loss weight (Hang et al. 2023): min(snr, gamma)/snr for epsilon, /(snr+1) for v."""
    clipped = torch.clamp(snr_t, max=gamma)
    return clipped / (snr_t + 1) if v_prediction else clipped / snr_t


def multires_noise(noise: torch.Tensor, iterations: int, discount: float, rng: random.Random) -> torch.Tensor:
    """Pyramid noise: add upsampled low-resolution noise at decreasing weights, then renormalise."""
    b, c, h, w = noise.shape
    for i in range(1, iterations + 1):
        r = rng.random() * 2 + 2
        hn, wn = max(1, int(h / r**i)), max(1, int(w / r**i))
        low = torch.randn(b, c, hn, wn, device=noise.device, dtype=noise.dtype)
        noise = noise + F.interpolate(low, size=(h, w), mode="bilinear") * discount**i
        if hn == 1 or wn == 1:
            break
    return noise / noise.std()


def diffusion_loss(
    unet_fwd,
    latents: torch.Tensor,
    cond: torch.Tensor,
    added_cond: dict | None,
    alphas_cumprod: torch.Tensor,
    gen: torch.Generator,
    *,
    v_prediction: bool = False,
    min_snr_gamma: float = 0.0,
    noise_offset: float = 0.0,
    multires_iterations: int = 0,
    multires_discount: float = 0.3,
    min_timestep: int = 0,
    max_timestep: int = 1000,
    rng: random.Random | None = None,
    noise: torch.Tensor | None = None,
    timesteps: torch.Tensor | None = None,
    autocast_dtype: torch.dtype | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """One denoising loss on a batch of latents; stays on the device (no .item(), no host sync).

    weights: per-sample loss weights (prior_loss_weight for regularization images), applied before the batch mean."""
    b = latents.shape[0]
    dev = latents.device
    if noise is None:
        noise = torch.randn(latents.shape, device=dev, generator=gen)
        if noise_offset:
            noise = noise + noise_offset * torch.randn((b, latents.shape[1], 1, 1), device=dev, generator=gen)
        if multires_iterations:
            noise = multires_noise(noise, multires_iterations, multires_discount, rng or random.Random(0))
    if timesteps is None:
        timesteps = torch.randint(min_timestep, max_timestep, (b,), device=dev, generator=gen)
    a = alphas_cumprod[timesteps].view(b, 1, 1, 1)
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
    target = a.sqrt() * noise - (1 - a).sqrt() * latents if v_prediction else noise
    with torch.autocast(dev.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        kw = {"added_cond_kwargs": added_cond} if added_cond is not None else {}
        pred = unet_fwd(noisy, timesteps, cond, **kw).sample
    loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if min_snr_gamma:
        loss = loss * min_snr_weight(snr(alphas_cumprod, timesteps), min_snr_gamma, v_prediction)
    if weights is not None:
        loss = loss * weights
    return loss.mean()
