"""The fast training step: forward + backward, and the optimizer step, each replayed as one CUDA graph.

The plain step launches a few thousand kernels from Python per step; on a slow host that, not the GPU, sets the
speed (the step time stays flat from batch 1 to 16). Here each bucket shape's forward + backward is captured once
into a CUDA graph over static input buffers, and gradient clipping + fused AdamW + zeroing the gradients into
another; a step is then a handful of copies and two graph replays. The random draws (noise, timesteps) happen
outside the graphs with the plain step's generator, in the plain step's order, so both paths compute the same
numbers (tests/test_fast_step.py). Gradients live in fixed buffers and accumulate in place (grad_accum works).

    fast = make_fast_step(cfg, ...)   # None: use the plain step (CPU, DDP, fp16, trained text encoder, ...)
    loss = fast.micro_step(x, emb, added, gen, rng)   # per micro-batch, instead of diffusion_loss + backward
    fast.optimizer_step()                               # instead of clip + optimizer.step + zero_grad
"""

from __future__ import annotations

import random
import warnings
from typing import Any

MODES = ("auto", "graph", "eager", "off")


def why_not(cfg: Any, device_type: str, world: int, train_te: bool, scaler: Any) -> str:
    """Why the graphed step cannot run with these settings ("" when it can)."""
    if device_type != "cuda":
        return "CUDA graphs need a CUDA GPU"
    if world > 1:
        return "data-parallel runs (gpus > 1) use the plain step"
    if scaler is not None:
        return "fp16 with a gradient scaler uses the plain step; use mixed_precision = 'bf16'"
    if train_te:
        return "a trained text encoder (text_encoder_lr > 0) uses the plain step"
    if cfg.gradient_checkpointing:
        return "gradient checkpointing uses the plain step"
    return ""


def make_fast_step(cfg: Any, *, unet_fwd, params, optimizer, alphas_cumprod, loss_kw: dict, device,
                   world: int = 1, train_te: bool = False, scaler: Any = None) -> FastStep | None:  # fmt: skip
    """The FastStep for cfg.fast ("auto": graphs where they work, else None = the plain step), or None.

    Falls back with a one-line warning (never an error) when "auto" / "graph" cannot run on CUDA; on a CPU
    "auto" is the plain step without a word. "eager" runs the fast step's code without capturing graphs."""
    from trainer_bridge.config import TrainError

    mode = getattr(cfg, "fast", "auto") or "auto"
    if mode not in MODES:
        raise TrainError(f"fast must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "off":
        return None
    if mode == "eager":  # the settings graphs need, minus the GPU
        reason = why_not(cfg, "cuda", world, train_te, scaler)
        if reason:
            warnings.warn(f"fast step off: {reason}", stacklevel=2)
            return None
        return _new(cfg, unet_fwd, params, optimizer, alphas_cumprod, loss_kw, capture=False)
    reason = why_not(cfg, device.type, world, train_te, scaler)
    if not reason and mode == "auto" and getattr(cfg, "compile", False) is True:
        reason = "compile = true runs without CUDA graphs (set fast = 'graph' to capture the compiled step)"
    if reason:
        if device.type == "cuda" or mode == "graph":
            warnings.warn(f"fast step off: {reason}", stacklevel=2)
        return None
    return _new(cfg, unet_fwd, params, optimizer, alphas_cumprod, loss_kw, capture=True)


def _new(cfg, unet_fwd, params, optimizer, alphas_cumprod, loss_kw, capture: bool) -> FastStep:
    return FastStep(unet_fwd, params, optimizer, alphas_cumprod, loss_kw, grad_accum=cfg.grad_accum,
                    max_grad_norm=cfg.max_grad_norm, capture=capture)  # fmt: skip


def draw_noise(latents, gen, loss_kw: dict, rng: random.Random | None):
    """Noise and timesteps exactly as trainer_bridge.loss.diffusion_loss draws them (same generator, same order)."""
    import torch

    from trainer_bridge.loss import multires_noise

    b, dev = latents.shape[0], latents.device
    noise = torch.randn(latents.shape, device=dev, generator=gen)
    if loss_kw.get("noise_offset"):
        noise = noise + loss_kw["noise_offset"] * torch.randn(
            (b, latents.shape[1], 1, 1), device=dev, generator=gen
        )
    if loss_kw.get("multires_iterations"):
        noise = multires_noise(noise, loss_kw["multires_iterations"], loss_kw.get("multires_discount", 0.3),
                               rng or random.Random(0))  # fmt: skip
    t = torch.randint(loss_kw.get("min_timestep", 0), loss_kw.get("max_timestep", 1000), (b,), device=dev,
                      generator=gen)  # fmt: skip
    return noise, t


class _Static:
    """The fixed input buffers, captured graph and loss output of one input shape."""

    def __init__(self, inputs: dict):
        self.inputs = {k: v.clone() for k, v in inputs.items()}
        self.graph = None
        self.loss = None


class FastStep:
    """Forward + backward per micro-batch and the optimizer step, as CUDA graph replays (capture=True)."""

    def __init__(self, unet_fwd, params, optimizer, alphas_cumprod, loss_kw: dict, *, grad_accum: int = 1,
                 max_grad_norm: float = 0.0, capture: bool = True) -> None:  # fmt: skip
        import torch

        self.unet_fwd, self.params, self.optimizer = unet_fwd, list(params), optimizer
        self.alphas, self.grad_accum, self.max_grad_norm = alphas_cumprod, grad_accum, max_grad_norm
        self.draw_kw = {k: loss_kw[k] for k in ("noise_offset", "multires_iterations", "multires_discount",
                                                 "min_timestep", "max_timestep") if k in loss_kw}  # fmt: skip
        self.model_kw = {k: v for k, v in loss_kw.items() if k not in self.draw_kw}
        self.capture = capture
        self.shapes: dict[tuple, _Static] = {}
        self.pool = None  # one memory pool shared by every shape's graph (they never run at the same time)
        self.opt_graph = None
        self.lr_t: list = []
        self.lr_now: list = []
        self.grads: list = []
        self.captures = 0  # graphs captured so far (one per bucket shape, + 1 for the optimizer)
        dev = self.params[0].device
        self.div = torch.tensor(float(grad_accum), device=dev)
        self.fused_adamw = (
            type(optimizer) is torch.optim.AdamW
            and all(g.get("fused") for g in optimizer.param_groups)
            and not any(g.get("amsgrad") for g in optimizer.param_groups)
        )

    # ------------------------------------------------------------ pieces

    def _ensure_grads(self) -> None:
        """Gradients as fixed buffers (zeros), so backward accumulates into the same memory every replay."""
        import torch

        if not self.grads:
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            self.grads = [p.grad for p in self.params]

    def _fwd_bwd(self, st: _Static):
        from trainer_bridge.loss import diffusion_loss

        s = st.inputs
        extra = {k[2:]: v for k, v in s.items() if k.startswith("k_")}
        added = {k[2:]: v for k, v in s.items() if k.startswith("a_")} or None
        loss = diffusion_loss(self.unet_fwd, s["x"], s["emb"], added, self.alphas, None, noise=s["noise"],
                              timesteps=s["t"], **self.model_kw, **extra)  # fmt: skip
        (loss / self.div).backward()
        return loss.detach()

    def _capture_fwd_bwd(self, st: _Static) -> None:
        import torch

        saved = [g.clone() for g in self.grads]  # warm-up must leave the accumulated gradients as they were
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(side):
                for _ in range(2):  # cuBLAS / cuDNN / compile warm-up outside the capture
                    self._fwd_bwd(st)
            torch.cuda.current_stream().wait_stream(side)
        finally:
            torch._foreach_copy_(self.grads, saved)
        del saved
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # give the warm-up's cached blocks back, so the graph's pool can take them
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self.pool):
            st.loss = self._fwd_bwd(st)
        self.pool = g.pool()
        st.graph = g
        self.captures += 1

    def _opt_body(self) -> None:
        import torch

        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        torch._foreach_zero_(self.grads)

    def _init_adamw_state(self) -> None:
        """AdamW's lazily created state, made before the capture (inside it, the zero fill would be replayed)."""
        import torch

        for p in self.params:
            st = self.optimizer.state[p]
            if not st:
                st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _capture_opt(self) -> None:
        """Clip + fused AdamW + zero grads in one graph; the learning rate is read from a device tensor."""
        import torch

        self._init_adamw_state()
        groups = self.optimizer.param_groups
        self.lr_now = [float(g["lr"]) for g in groups]
        self.lr_t = [
            torch.tensor(lr, dtype=torch.float32, device=self.params[0].device) for lr in self.lr_now
        ]
        old = [(g["lr"], g.get("capturable", False)) for g in groups]
        torch.cuda.synchronize()
        try:
            for g, lr in zip(groups, self.lr_t, strict=True):
                g["lr"], g["capturable"] = lr, True
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self._opt_body()
        finally:
            # back to the float lr that the scheduler and the state files see
            for g, (lr, cap) in zip(groups, old, strict=True):
                g["lr"], g["capturable"] = lr, cap
        self.opt_graph = graph
        self.captures += 1

    def _fallback(self, what: str, err: Exception) -> None:
        warnings.warn(f"fast step: capturing {what} failed ({type(err).__name__}: {str(err)[:120]}); "
                      "continuing without CUDA graphs", stacklevel=3)  # fmt: skip
        self.capture = False

    # ------------------------------------------------------------ the two calls

    def micro_step(self, x, emb, added: dict | None, gen, rng: random.Random | None = None, **tensors):
        """Loss of one micro-batch (a device scalar, not synced) with its gradients accumulated into .grad.

        Extra keyword tensors (e.g. per-sample loss weights) are passed on to diffusion_loss."""
        noise, t = draw_noise(x, gen, self.draw_kw, rng)
        inputs = {"x": x, "emb": emb, "noise": noise, "t": t}
        inputs.update({f"a_{k}": v for k, v in (added or {}).items()})
        inputs.update({f"k_{k}": v for k, v in tensors.items()})
        key = tuple((k, tuple(v.shape), v.dtype, v.stride()) for k, v in sorted(inputs.items()))
        self._ensure_grads()
        st = self.shapes.get(key)
        if st is None:
            st = self.shapes[key] = _Static(inputs)
            if self.capture:
                try:
                    self._capture_fwd_bwd(st)
                except Exception as e:  # noqa: BLE001 - any capture problem: the eager step still works
                    st.graph = None
                    self._fallback("the forward/backward", e)
        else:
            for k, v in inputs.items():
                st.inputs[k].copy_(v)
        if st.graph is not None and self.capture:
            st.graph.replay()
            return st.loss.clone()  # the graph overwrites st.loss at the next replay
        return self._fwd_bwd(st)

    def optimizer_step(self) -> None:
        """Clip the gradients, step the optimizer and zero the gradients in place (one replay for fused AdamW)."""
        self._ensure_grads()
        if self.capture and self.fused_adamw and self.opt_graph is None:
            try:
                self._capture_opt()
            except Exception as e:  # noqa: BLE001
                self.opt_graph = None
                self._fallback("the optimizer step", e)
        if self.opt_graph is not None and self.capture:
            for i, g in enumerate(self.optimizer.param_groups):
                if float(g["lr"]) != self.lr_now[i]:  # the scheduler's new lr, without a host sync
                    self.lr_now[i] = float(g["lr"])
                    self.lr_t[i].fill_(self.lr_now[i])
            self.opt_graph.replay()
            return
        self._opt_body()
