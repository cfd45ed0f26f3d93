"""The project's own sampler for the nano SD1.5 model: DDIM (eta 0) or Euler, classifier-free guidance.

SD1.5's model sampling: 1000 training steps, scaled-linear betas 0.00085 -> 0.012
(``beta_t = linspace(sqrt(0.00085), sqrt(0.012), 1000)[t] ** 2``), epsilon prediction, the U-Net
sees latents already multiplied by 0.18215 (everything here lives in that space).

Deterministic: the initial noise comes from ``torch.Generator().manual_seed(seed)``; DDIM with
eta 0 and Euler add no further noise.
"""

from __future__ import annotations

from typing import Callable

import torch

NUM_TRAIN_TIMESTEPS = 1000
BETA_START = 0.00085
BETA_END = 0.012
METHODS = ("ddim", "euler")


def sd15_alphas_cumprod(num_steps: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """[1000] float64 cumulative products of (1 - beta) for SD1.5's scaled-linear schedule."""
    betas = torch.linspace(BETA_START ** 0.5, BETA_END ** 0.5, num_steps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def add_noise(latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
              alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """q(x_t | x_0): sqrt(a_t) x_0 + sqrt(1 - a_t) eps; latents / noise [B, C, H, W], timesteps [B]."""
    a = alphas_cumprod.to(latents.device)[timesteps].to(latents.dtype)[:, None, None, None]
    return a.sqrt() * latents + (1 - a).sqrt() * noise


def sampling_timesteps(steps: int, num_train: int = NUM_TRAIN_TIMESTEPS) -> list[int]:
    """``steps`` timesteps from num_train - 1 down to 0, evenly spaced (descending)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return torch.linspace(num_train - 1, 0, steps).round().long().tolist()


def guided_eps(unet: Callable, x: torch.Tensor, t: int, context: torch.Tensor, uncond: torch.Tensor | None,
               guidance: float) -> torch.Tensor:
    """eps_uncond + guidance * (eps_cond - eps_uncond), one batched U-Net call (cond and uncond)."""
    timesteps = torch.full((x.shape[0],), t, dtype=torch.long)
    if uncond is None or guidance == 1.0:
        return unet(x, timesteps, context)
    eps = unet(torch.cat([x, x]), torch.cat([timesteps, timesteps]), torch.cat([context, uncond]))
    cond, unc = eps.chunk(2)
    return unc + guidance * (cond - unc)


@torch.no_grad()
def sample(unet: Callable, context: torch.Tensor, uncond_context: torch.Tensor | None = None, *, steps: int = 20,
           guidance: float = 5.0, seed: int = 0, method: str = "ddim", latent_shape: tuple[int, int, int] = (4, 8, 8),
           ) -> torch.Tensor:
    """Generate U-Net-space latents [B, *latent_shape].

    unet(x [B, 4, h, w], timesteps [B], context [B, 77, 768]) -> eps.
    context [B, 77, 768]; uncond_context [B or 1, 77, 768] (the empty caption's encoding) or None
    (no guidance).
    """
    if method not in METHODS:
        raise ValueError(f"sampler method must be one of {METHODS}, got {method!r}")
    batch = context.shape[0]
    if uncond_context is not None:
        uncond_context = uncond_context.expand(batch, -1, -1).to(context.dtype)
    alphas = sd15_alphas_cumprod().float()
    noise = torch.randn((batch, *latent_shape), generator=torch.Generator().manual_seed(int(seed)))
    noise = noise.to(context.dtype)
    ts = sampling_timesteps(steps)
    if method == "ddim":
        x = noise
        for i, t in enumerate(ts):
            eps = guided_eps(unet, x, t, context, uncond_context, guidance)
            a_t = alphas[t]
            a_prev = alphas[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0)
            x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        return x
    # Euler on the k-diffusion ODE: x = x0 + sigma * eps, sigma = sqrt((1 - a) / a); the U-Net sees
    # x / sqrt(1 + sigma^2) (the variance-preserving x_t) at timestep t.
    sigmas = [((1 - alphas[t]) / alphas[t]).sqrt() for t in ts] + [torch.tensor(0.0)]
    x = noise * (1 + sigmas[0] ** 2).sqrt()  # SD's Euler starts at sqrt(1 + sigma_max^2) x noise
    for i, t in enumerate(ts):
        sigma = sigmas[i]
        eps = guided_eps(unet, x / (1 + sigma ** 2).sqrt(), t, context, uncond_context, guidance)
        x = x + eps * (sigmas[i + 1] - sigma)
    return x
