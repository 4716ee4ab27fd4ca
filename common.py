"""Shared utilities for the three World Action Models (agra.py, mvwam.py, eawm.py).

Only what two or more files use lives here. Method contributions (the AGRA bridge and loss, the
MoT mask, the event gate) live in their own model file.

Flow-matching convention used everywhere in this repository (AGRA Eq. 8-9, MV-WAM Eq. 1 / 6, Wan):

    x_t = (1 - t) * x0 + t * noise,   t in [0, 1],   t = 1 is pure noise,
    velocity target v = noise - x0,   sampling integrates from t = 1 down to t = 0.

GR00T's action head uses the opposite convention (t = 1 clean); agra.py converts, never copies.

Shape letters: B batch, T frames (raw or latent), C channels, H/W height/width (pixels or
latent), h/w token grid, L tokens, D model width, d head width, K action horizon.

Sections: device | flow matching | normalization & embeddings | RoPE | attention |
Wan block | SigLIP vision tower | LoRA | tiny text encoder | pixel codec | checkpoints |
pretrained weights | kinematics & camera | raster | image files
"""
from __future__ import annotations

import difflib
import json
import math
import os
import re
import struct
import tempfile
import xml.etree.ElementTree as ET
import zlib
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

# -------------------------------------------------------------------------------------------------
# Device, dtype, distributed, config helpers
# -------------------------------------------------------------------------------------------------


def pick_device(name: str = "auto") -> torch.device:
    """cuda -> mps -> cpu, unless a device is named."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' = bf16 autocast on GPU, fp32 on CPU (nanochat)."""
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}; expected one of auto, {', '.join(table)}")
    return table[name]


def dist_info() -> tuple[bool, int, int, int]:
    """(is_ddp, rank, local_rank, world_size) from torchrun's environment variables."""
    if int(os.environ.get("RANK", -1)) == -1:
        return False, 0, 0, 1
    return True, int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])


def fsdp_units(model: nn.Module) -> list[list[nn.Module]]:
    """The module groups FSDP2 shards as one unit each, deepest first (fully_shard goes bottom-up):
    every child of an nn.ModuleList / nn.ModuleDict that holds parameters (the transformer blocks),
    except that the modules a model names in `layer_groups()` (run together as one layer, e.g.
    MV-WAM's paired experts) form one unit. The rest is the root unit, sharded last by the caller."""
    groups = [list(g) for g in model.layer_groups()] if hasattr(model, "layer_groups") else []
    taken = {id(m) for g in groups for m in g}
    containers = sorted(((n, m) for n, m in model.named_modules() if isinstance(m, (nn.ModuleList, nn.ModuleDict))),
                        key=lambda nm: -nm[0].count("."))
    units = []
    for _, container in containers:
        for child in container.children():
            if id(child) not in taken and any(True for _ in child.parameters()):
                units.append([child])
                taken.add(id(child))
    return units + groups


def config_to_dict(cfg) -> dict:
    return {f.name: getattr(cfg, f.name) for f in fields(cfg)}


def config_from_dict(cls, d: dict):
    """Build a Config dataclass, refusing unknown keys (with the list of valid ones)."""
    valid = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - valid)
    if unknown:
        raise ValueError(f"unknown {cls.__module__}.Config key(s) {unknown}; valid keys: {sorted(valid)}")
    kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()}
    return cls(**kw)


def parse_override(cfg, assignment: str):
    """Apply one `key=value` (from `--set`) to a Config dataclass, typed by the field's current value."""
    if "=" not in assignment:
        raise ValueError(f"--set expects key=value, got {assignment!r}")
    key, raw = assignment.split("=", 1)
    valid = {f.name: f for f in fields(cfg)}
    if key not in valid:
        close = difflib.get_close_matches(key, list(valid), n=3)
        hint = f" (did you mean {close}?)" if close else ""
        raise ValueError(f"unknown config key {key!r}{hint}; valid keys: {sorted(valid)}")
    cur = getattr(cfg, key)
    try:
        if isinstance(cur, bool):
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError(raw)
            val = raw.lower() in ("true", "1")
        elif isinstance(cur, int):
            val = int(raw)
        elif isinstance(cur, float):
            val = float(raw)
        elif isinstance(cur, tuple):
            val = tuple(type(cur[0])(x) if cur else int(x) for x in raw.strip("()[]").split(",") if x.strip())
        elif cur is None:
            val = json.loads(raw)
        else:
            val = raw
    except ValueError:
        raise ValueError(f"--set {key}: cannot parse {raw!r} as {type(cur).__name__} "
                         f"(current value {cur!r})") from None
    setattr(cfg, key, val)
    if hasattr(cfg, "__post_init__"):
        cfg.__post_init__()
    return cfg


def check_choice(name: str, value, choices):
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not valid; expected one of {list(choices)}")


def check_layers(name: str, layers, n: int):
    """Every index in `layers` must name one of n layers."""
    for l in layers:
        if not 0 <= l < n:
            raise ValueError(f"{name}={tuple(layers)}: layer {l} outside 0..{n - 1}")


def check_clip_frames(frames: int, q: int):
    """Causal video codecs / VAEs take 1 + q k raw frames (the first frame alone, then groups of q)."""
    if (frames - 1) % q:
        raise ValueError(f"frames={frames} must be 1 + latent_q * k (latent_q={q})")


def set_trainable(module: nn.Module, groups: list[dict]) -> list[dict]:
    """Freeze every parameter of `module`, then unfreeze those in the optimizer `groups`; returns groups."""
    for p in module.parameters():
        p.requires_grad_(False)
    for g in groups:
        for p in g["params"]:
            p.requires_grad_(True)
    return groups


def checkpointed(on: bool, fn, *args, **kwargs):
    """fn(*args, **kwargs), with activation checkpointing when `on` and autograd is recording: the
    call keeps only its inputs and recomputes its activations in backward (torch.utils.checkpoint,
    non-reentrant), one extra forward per block for a block's worth of activation memory."""
    if on and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, **kwargs)
    return fn(*args, **kwargs)


def set_grad_checkpointing(model: nn.Module, on: bool = True) -> int:
    """Switch activation checkpointing of every block loop in `model` (the modules with a
    `grad_checkpoint` attribute); returns how many loops were switched."""
    loops = [m for m in model.modules() if hasattr(m, "grad_checkpoint")]
    for m in loops:
        m.grad_checkpoint = on
    return len(loops)


def check_shape(name: str, x: torch.Tensor, expected: tuple):
    """Raise with expected vs received; None in `expected` matches any size."""
    ok = x.dim() == len(expected) and all(e is None or e == s for e, s in zip(expected, x.shape))
    if not ok:
        exp = "(" + ", ".join("*" if e is None else str(e) for e in expected) + ")"
        raise ValueError(f"{name}: expected shape {exp}, received {tuple(x.shape)}")


# -------------------------------------------------------------------------------------------------
# Flow matching: interpolation, parameterizations, timestep samplers, Euler sampler
# -------------------------------------------------------------------------------------------------


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t noise; t broadcasts from the left (B,) or (B, ..., T, ...)."""
    return (1 - t) * x0 + t * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """v = dx_t/dt = noise - x0."""
    return noise - x0


def sample_mean(err: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of a per-element loss (B, ...). keep (B,): a per-sample weight (a toy-world failing demo has
    0: its actions are not imitated); the mean then runs over the kept samples only, so a batch of all
    ones gives the plain mean and a batch of all zeros gives 0 (no gradient), not a division by zero."""
    if keep is None:
        return err.mean()
    keep = keep.to(err)
    return (err.flatten(1).mean(1) * keep).sum() / keep.sum().clamp(min=1.0)


def target_mask(batch, height: int, width: int) -> torch.Tensor:
    """batch["target_mask"] (B, H, W), the named object's pixels in the current frame, which stage "ground"
    (ours, toy only: AGRA's and MV-WAM's Model.ground_loss) trains against; checked."""
    mask = batch.get("target_mask")
    if mask is None:
        raise ValueError("stage 'ground' needs batch['target_mask'] (B, H, W): the named object's pixels in the "
                         "current frame, which the toy world's ClipDataset gives; real datasets have no such label")
    check_shape("batch['target_mask']", mask, (None, height, width))
    return mask


def referring_loss(logits: torch.Tensor, mask: torch.Tensor, grid: tuple[int, int]):
    """Stage "ground"'s objective (ours, toy only): logits (B, gh gw), one score per current-frame token
    (row-major), mask (B, H, W) the named object's pixels -> (loss, parts). Softmax over the tokens,
    cross-entropy against the named object's share of each token; samples where the object is hidden
    (in the bin, behind the arm) carry no loss. parts["ground_hit"]: the share of samples whose top token
    lies inside the object."""
    share = F.adaptive_avg_pool2d(mask[:, None].float(), grid).flatten(1)          # named object's share per token
    has = (share.sum(1) > 0).float()
    target = share / share.sum(1, keepdim=True).clamp_min(1e-8)
    loss = sample_mean(-(target * F.log_softmax(logits, -1)).sum(1, keepdim=True), has)
    with torch.no_grad():
        hit = (share.gather(1, logits.argmax(1, keepdim=True))[:, 0] > 0).float()
    return loss, {"ground": loss.detach(), "ground_hit": (hit * has).sum() / has.sum().clamp_min(1)}


def to_velocity(pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, param: str,
                eps: float = 1e-3) -> torch.Tensor:
    """Convert a network output in parameterization `param` to the sampling velocity (MV-WAM Table 6).

    v:   pred is the velocity.
    x0:  v = (x_t - x0_hat) / t           (t clamped >= eps near the clean end)
    eps: v = (eps_hat - x_t) / (1 - t)    (1 - t clamped >= eps near the noise end)
    """
    if param == "v":
        return pred
    if param == "x0":
        return (x_t - pred) / t.clamp(min=eps)
    if param == "eps":
        return (pred - x_t) / (1 - t).clamp(min=eps)
    raise ValueError(f"unknown parameterization {param!r}; expected 'v', 'x0' or 'eps'")


def shift_t(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Shifted schedule t' = s t / (1 + (s - 1) t) (SD3 / Wan, s = 5 for Wan)."""
    return shift * t / (1 + (shift - 1) * t)


def sample_t(kind: str, n: int, generator: torch.Generator | None = None, device=None,
             shift: float = 1.0, value: float = 1.0, mean: float = 0.0, std: float = 1.0,
             alpha: float = 1.5, beta: float = 1.0) -> torch.Tensor:
    """Timestep samplers, all in the t = 1-is-noise convention. Returns (n,) float32.

    uniform       t ~ U(0, 1)
    logit_normal  t = sigmoid(N(mean, std))                       (SD3 / rectified-flow default)
    shifted       t = shift_t(U(0, 1), shift)                       (Wan, shift = 5)
    beta          t = 0.001 + 0.999 * Beta(alpha, beta)             (pi0 / GR00T action time; with
                  Beta(1.5, 1) the mass leans to high noise, GR00T's 1 - t mapped to our convention)
    fixed         t = value
    """
    if kind == "uniform":
        t = torch.rand(n, generator=generator)
    elif kind == "logit_normal":
        t = torch.sigmoid(mean + std * torch.randn(n, generator=generator))
    elif kind == "shifted":
        t = shift_t(torch.rand(n, generator=generator), shift)
    elif kind == "beta":
        # Beta(a, b) via two Gammas drawn from the generator: X/(X+Y), X~Gamma(a), Y~Gamma(b).
        x = torch._standard_gamma(torch.full((n,), alpha), generator=generator)
        y = torch._standard_gamma(torch.full((n,), beta), generator=generator)
        t = 0.001 + 0.999 * x / (x + y)
    elif kind == "fixed":
        t = torch.full((n,), float(value))
    else:
        raise ValueError(f"unknown timestep sampler {kind!r}; expected uniform, logit_normal, shifted, beta, fixed")
    return t.to(device=device) if device is not None else t


def frame_times(t: torch.Tensor, T: int, cond_t: float = 0.0) -> torch.Tensor:
    """Per-latent-frame timesteps (B,) -> (B, T): frame 0, the given observation, at cond_t (clean:
    0 as Wan2.2 TI2V, 1e-4 as Cosmos' conditional frame), the future frames at t."""
    tt = t[:, None].repeat(1, T)
    tt[:, 0] = cond_t
    return tt


@torch.no_grad()
def euler_sample(velocity_fn, x: torch.Tensor, steps: int, clean_mask: torch.Tensor | None = None,
                 x_clean: torch.Tensor | None = None, shift: float = 1.0) -> torch.Tensor:
    """Integrate dx/dt = v from t = 1 (noise) to t = 0 with `steps` Euler steps.

    velocity_fn(x_t, t) -> v, where t is (B,) on the sampler's grid. With per-token timesteps the
    model itself gives clean tokens t = 0 (Wan2.2 TI2V / Cosmos condition frames); here tokens
    where `clean_mask` is True are reset to `x_clean` before each call and after each step.
    """
    ts = shift_t(torch.linspace(1.0, 0.0, steps + 1), shift) if shift != 1.0 else torch.linspace(1.0, 0.0, steps + 1)
    for i in range(steps):
        if clean_mask is not None:
            x = torch.where(clean_mask, x_clean, x)
        t = torch.full((x.shape[0],), float(ts[i]), device=x.device)
        v = velocity_fn(x, t)
        x = x + (ts[i + 1] - ts[i]).item() * v            # dt < 0: towards the data
    if clean_mask is not None:
        x = torch.where(clean_mask, x_clean, x)
    return x


def lr_schedule(kind: str, step: int, total: int, warmup_frac: float = 0.0, const_frac: float = 0.0) -> float:
    """Learning-rate multiplier in [0, 1].

    cosine                 linear warm-up over warmup_frac of the steps, then cosine to 0
                           (AGRA App. C.3: cosine with 5 % warm-up)
    constant_then_linear   constant for const_frac of the steps, then linear decay to 0
                           (MV-WAM Sec. 4.1: constant for 20 %, then linear)
    constant               1
    """
    total = max(total, 1)
    if kind == "cosine":
        warm = int(round(warmup_frac * total))
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(total - warm, 1)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    if kind == "constant_then_linear":
        hold = int(round(const_frac * total))
        if step < hold:
            return 1.0
        return max(0.0, 1 - (step - hold) / max(total - hold, 1))
    if kind == "constant":
        return 1.0
    raise ValueError(f"unknown lr schedule {kind!r}; expected cosine, constant_then_linear, constant")


def bell_weight(t: torch.Tensor, shift: float = 5.0, n: int = 1000) -> torch.Tensor:
    """Timestep loss weight of Wan's flow-matching trainer (DiffSynth-Studio's FlowMatchScheduler):

        w(t) = (exp(-2 (t - 1/2)^2) - m) / Z,   m = min over the training grid, Z = mean over it of the
        numerator, the grid being the n shifted sigmas shift_t(linspace(1, 0, n+1)[:-1], shift),

    a bell centred on t = 1/2, zero at the grid's extreme, mean 1 over the grid (EA-WM Eq. 8's w(t))."""
    grid = shift_t(torch.linspace(1.0, 0.0, n + 1)[:-1].double(), shift)
    y = torch.exp(-2 * (grid - 0.5) ** 2)
    m, Z = y.min(), (y - y.min()).mean()
    return ((torch.exp(-2 * (t.double() - 0.5) ** 2) - m) / Z).to(t.dtype if t.is_floating_point() else torch.float32)


def x0_space_weight(t: torch.Tensor, shift: float = 1.0, t_min: float = 0.0, n: int = 1000) -> torch.Tensor:
    """Timestep weight that turns a flow-matching velocity loss into the error of the implied clean
    sample: x0_hat = x_t - t v_hat, so t^2 |v_hat - v|^2 = |x0_hat - x0|^2 (any parametrization). t is
    clipped at t_min (the clip of an x0 / delta prediction's division), normalized to mean 1 over the
    training grid like bell_weight: w(t) = max(t, t_min)^2 / Z."""
    grid = shift_t(torch.linspace(1.0, 0.0, n + 1)[:-1].double(), shift)
    Z = grid.clamp_min(t_min).pow(2).mean()
    return (t.double().clamp_min(t_min).pow(2) / Z).to(t.dtype if t.is_floating_point() else torch.float32)


# -------------------------------------------------------------------------------------------------
# Normalization, modulation, timestep embedding
# -------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 (a precision island, as in Wan)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32, cast back."""

    def forward(self, x):
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).type_as(x)


def modulate(x, shift, scale):
    """adaLN: x * (1 + scale) + shift."""
    return x * (1 + scale) + shift


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0, cos_first: bool = True):
    """Sinusoidal embedding of (N,) or (N, L) timesteps -> (..., dim), frequencies max_period^(-i/half).

    cos_first=True gives [cos, sin] (Wan, Cosmos); False gives [sin, cos] (GR00T's action encoder).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64, device=t.device) / half)
    args = t.double().unsqueeze(-1) * freqs                 # (..., half)
    emb = torch.cat([torch.cos(args), torch.sin(args)] if cos_first else [torch.sin(args), torch.cos(args)], -1)
    return emb.float()


def axis_tables(sizes: tuple, dim: int, max_period: float = 100.0) -> list[torch.Tensor]:
    """Sin-cos position tables for the (t, h, w) axes, (size_i, dim) each: axis i fills its own third of
    the channels (an even number, the last third takes the rest) and leaves the others 0, so their sum
    is the concatenation of three 1D sin-cos codes (MAE's 2D sin-cos embedding, with a time axis)."""
    third = (dim // 3) // 2 * 2
    widths = [third, third, dim - 2 * third]
    out, start = [], 0
    for n, wd in zip(sizes, widths):
        table = torch.zeros(n, dim)
        table[:, start:start + wd] = timestep_embedding(torch.arange(n), wd, max_period)
        out.append(table)
        start += wd
    return out


# -------------------------------------------------------------------------------------------------
# Rotary position embedding (1D and 3D)
# -------------------------------------------------------------------------------------------------


def rope_inv_freq(dim: int, theta: float = 10000.0, ntk_scale: float = 1.0) -> torch.Tensor:
    """(dim/2,) inverse frequencies; NTK-aware theta' = theta * r^(dim/(dim-2)) (Cosmos rope3d)."""
    if ntk_scale != 1.0:
        theta = theta * ntk_scale ** (dim / (dim - 2))
    return 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)


def rope_1d(pos: torch.Tensor, head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """Angles (L, head_dim/2) for 1D positions (L,) (may be fractional)."""
    return pos.double().unsqueeze(-1) * rope_inv_freq(head_dim, theta).to(pos.device)


def rope_3d_split(head_dim: int) -> tuple[int, int, int]:
    """Wan/Cosmos split of head_dim over (t, h, w): d - 4*(d//6), 2*(d//6), 2*(d//6)."""
    s = head_dim // 6
    return head_dim - 4 * s, 2 * s, 2 * s


def rope_3d(t_pos, h_pos, w_pos, head_dim: int, theta: float = 10000.0, scale=(1.0, 1.0, 1.0)):
    """Angles (L, head_dim/2) for per-token (t, h, w) positions, each (L,) (t may be fractional)."""
    dims = rope_3d_split(head_dim)
    parts = [p.double().unsqueeze(-1) * rope_inv_freq(d, theta, s).to(p.device)
             for p, d, s in zip((t_pos, h_pos, w_pos), dims, scale)]
    return torch.cat(parts, -1)


def grid_positions(T: int, h: int, w: int, device=None):
    """(t, h, w) integer positions of a (T, h, w) token grid in raster order, each (T*h*w,)."""
    t, y, x = torch.meshgrid(torch.arange(T, device=device), torch.arange(h, device=device),
                             torch.arange(w, device=device), indexing="ij")
    return t.flatten(), y.flatten(), x.flatten()


def apply_rope(x: torch.Tensor, angles: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate x (B, heads, L, d) by angles (L, d/2) or (B, L, d/2), in float32.

    interleaved=True pairs adjacent elements (Wan, complex view); False pairs the two halves
    (rotate-half, Cosmos' [t,h,w]*2 layout).
    """
    if angles.dim() == 3:
        angles = angles.unsqueeze(1)                        # (B, 1, L, d/2)
    xf = x.float()
    if interleaved and x.device.type in ("cpu", "cuda") and not torch.compiler.is_compiling():
        # eager: the pairs as complex numbers x1 + i x2 times e^(i angle), the rotation below in one kernel (a tenth
        # of the time per call on CPU); torch.compile fuses the written-out rotation and has no code generation for complex ops
        angles = angles if angles.dtype == torch.float64 else angles.float()
        rot = torch.polar(torch.ones_like(angles), angles).to(torch.complex64)
        return torch.view_as_real(torch.view_as_complex(xf.unflatten(-1, (-1, 2)).contiguous()) * rot).flatten(-2).type_as(x)
    c, s = torch.cos(angles).float(), torch.sin(angles).float()
    if interleaved:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        out = torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2)
    else:
        x1, x2 = xf.chunk(2, dim=-1)
        out = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
    return out.type_as(x)


# -------------------------------------------------------------------------------------------------
# Attention
# -------------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head self/cross attention on F.scaled_dot_product_attention, with Wan parameter names.

    q, k, v, o: Linear layers; norm_q / norm_k: RMSNorm on q and k, either over the full width
    ("across_heads", Wan) or per head ("per_head", Cosmos). `inner_dim` (default: dim) is the width
    q, k, v live in; o maps it back to dim (MV-WAM's narrow expert joins a wider shared attention). RoPE (angles + layout) is applied to
    q and k after the norm. `mask` is boolean, True = may attend, broadcastable to (B, heads, Lq, Lk).
    """

    def __init__(self, dim: int, heads: int, ctx_dim: int | None = None, bias: bool = True,
                 qk_norm: str = "across_heads", eps: float = 1e-6, inner_dim: int | None = None):
        super().__init__()
        check_choice("qk_norm", qk_norm, ("across_heads", "per_head", "none"))
        inner = inner_dim or dim                             # attention width (MV-WAM: 768 -> 1536 -> 768)
        if inner % heads:
            raise ValueError(f"attention width {inner} is not divisible by heads={heads}")
        self.heads, self.head_dim = heads, inner // heads
        ctx_dim = ctx_dim or dim
        self.q = nn.Linear(dim, inner, bias=bias)
        self.k = nn.Linear(ctx_dim, inner, bias=bias)
        self.v = nn.Linear(ctx_dim, inner, bias=bias)
        self.o = nn.Linear(inner, dim, bias=bias)
        norm_dim = {"across_heads": inner, "per_head": self.head_dim}.get(qk_norm)
        self.qk_norm = qk_norm
        self.norm_q = RMSNorm(norm_dim, eps) if norm_dim else nn.Identity()
        self.norm_k = RMSNorm(norm_dim, eps) if norm_dim else nn.Identity()

    def split_heads(self, x):                                # (B, L, D) -> (B, heads, L, d)
        return x.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

    def qkv(self, x, ctx=None, rope=None, rope_k=None):
        """Projected, normalized, rotated q, k, v, each (B, heads, L, d). `rope` rotates q and (unless
        `rope_k` gives the context's own angles, for cross-attention between two token grids) k."""
        ctx = x if ctx is None else ctx
        q, k, v = self.q(x), self.k(ctx), self.v(ctx)
        if self.qk_norm == "across_heads":
            q, k = self.norm_q(q), self.norm_k(k)
        q, k, v = self.split_heads(q), self.split_heads(k), self.split_heads(v)
        if self.qk_norm == "per_head":
            q, k = self.norm_q(q), self.norm_k(k)
        if rope is not None:
            q = apply_rope(q, *rope)
            k = apply_rope(k, *(rope_k or rope))
        return q, k, v

    def forward(self, x, ctx=None, mask=None, rope=None, attn_out: list | None = None, rope_k=None):
        """x (B, Lq, D), ctx (B, Lk, Dc) or None for self-attention -> (B, Lq, D).

        If `attn_out` is a list, the attention weights (B, heads, Lq, Lk) are computed explicitly
        and appended to it (diagnostics only; the normal path is SDPA).
        """
        q, k, v = self.qkv(x, ctx, rope, rope_k)
        if attn_out is not None:
            w = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(self.head_dim)
            if mask is not None:
                w = w.masked_fill(~mask, float("-inf"))
            w = w.softmax(-1)
            attn_out.append(w.detach())
            out = (w.type_as(v) @ v)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o(out.transpose(1, 2).flatten(2))


# -------------------------------------------------------------------------------------------------
# Wan2.1 / Wan2.2 DiT block, original Wan parameter names (used by mvwam.py and eawm.py)
# -------------------------------------------------------------------------------------------------


class WanBlock(nn.Module):
    """One Wan DiT block; parameter names match Wan's original checkpoint (`blocks.i.*`).

    x += g_msa * SelfAttn(LN1(x) (1 + s_msa) + b_msa)      norm1: no affine
    x += CrossAttn(LN3(x), ctx)                            norm3: affine (cross_attn_norm), no gate
    x += g_ffn * FFN(LN2(x) (1 + s_ffn) + b_ffn)           norm2: no affine; FFN = Linear-GELU(tanh)-Linear
    modulation (1, 6, D) + e0 -> (shift_msa, scale_msa, gate_msa, shift_ffn, scale_ffn, gate_ffn), fp32.
    e0 is (B, 6, D) (Wan2.1, one t per sample) or (B, L, 6, D) (Wan2.2, per-token t).

    forward() = attn_input -> self_attn -> finish. The halves are public so that a mixture of
    transformers (MV-WAM) can run one shared attention over several experts' tokens in between.
    `attn_dim` (default dim) is the self-attention width (MV-WAM's action expert: 768 in a 1536 attention).
    """

    def __init__(self, dim: int, ffn_dim: int, heads: int, ctx_dim: int | None = None,
                 cross_attn_norm: bool = True, eps: float = 1e-6, attn_dim: int | None = None,
                 cross_heads: int | None = None, image: bool = False):
        super().__init__()
        self.norm1 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.self_attn = Attention(dim, heads, qk_norm="across_heads", eps=eps, inner_dim=attn_dim)
        self.norm3 = FP32LayerNorm(dim, eps, elementwise_affine=True) if cross_attn_norm else nn.Identity()
        if image:                                           # Wan I2V / WoW: + k_img, v_img, norm_k_img
            self.cross_attn = WanI2VCrossAttention(dim, cross_heads or heads, eps)
        else:
            self.cross_attn = Attention(dim, cross_heads or heads, ctx_dim=ctx_dim, qk_norm="across_heads", eps=eps)
        self.norm2 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim ** 0.5)

    def modulation_terms(self, e0):
        """-> 6 fp32 tensors (B, 1, D) or (B, L, D): shift/scale/gate for attention and FFN."""
        if e0.dim() == 3:                                   # (B, 6, D): one timestep per sample
            return (self.modulation.float() + e0.float()).unsqueeze(2).unbind(1)      # 6 x (B, 1, D)
        return (self.modulation.float().unsqueeze(0) + e0.float()).unbind(2)         # 6 x (B, L, D)

    def attn_input(self, x, mod):
        """The modulated input of self-attention, LN1(x) (1 + s_msa) + b_msa."""
        return modulate(self.norm1(x).float(), mod[0], mod[1]).type_as(x)

    def finish(self, x, y, mod, ctx, ctx_img=None):
        """Gated residual of the self-attention output y, then cross-attention (to the text, and to the
        embedded image tokens `ctx_img` in an image-input block) and the gated FFN."""
        x = x + (y.float() * mod[2]).type_as(x)
        c = self.norm3(x)
        x = x + (self.cross_attn(c, ctx) if ctx_img is None else self.cross_attn(c, ctx, ctx_img))
        y = self.ffn(modulate(self.norm2(x).float(), mod[3], mod[4]).type_as(x))
        return x + (y.float() * mod[5]).type_as(x)

    def forward(self, x, e0, ctx, rope=None, mask=None, ctx_img=None):
        mod = self.modulation_terms(e0)
        return self.finish(x, self.self_attn(self.attn_input(x, mod), mask=mask, rope=rope), mod, ctx, ctx_img)


class WanI2VCrossAttention(Attention):
    """Wan2.1 I2V cross-attention (also WoW-1.3B): the text attention plus a second attention of the
    same queries over the image tokens, with their own keys / values (k_img, v_img, RMSNorm norm_k_img),
    summed before the output projection o. Wan concatenates [image tokens (257), text tokens] into one
    context and splits it again here; passing the two apart is the same computation."""

    def __init__(self, dim: int, heads: int, eps: float = 1e-6):
        super().__init__(dim, heads, qk_norm="across_heads", eps=eps)
        self.k_img = nn.Linear(dim, dim)
        self.v_img = nn.Linear(dim, dim)
        self.norm_k_img = RMSNorm(dim, eps)

    def forward(self, x, ctx, ctx_img):
        """x (B, L, D), ctx (B, L_text, D), ctx_img (B, L_img, D) (both already embedded) -> (B, L, D)."""
        q, k, v = self.qkv(x, ctx)
        k_img = self.split_heads(self.norm_k_img(self.k_img(ctx_img)))
        v_img = self.split_heads(self.v_img(ctx_img))
        out = F.scaled_dot_product_attention(q, k, v) + F.scaled_dot_product_attention(q, k_img, v_img)
        return self.o(out.transpose(1, 2).flatten(2))


class WanHead(nn.Module):
    """Wan output head: LN (no affine) modulated by (modulation (1, 2, D) + e) -> Linear(D, p_t p_h p_w C)."""

    def __init__(self, dim: int, out: int, eps: float = 1e-6):
        super().__init__()
        self.norm = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.head = nn.Linear(dim, out)
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim ** 0.5)

    def forward(self, x, e):
        """x (B, L, D), e (B, D) or (B, L, D) (the unprojected time embedding)."""
        if e.dim() == 2:
            shift, scale = (self.modulation.float() + e.float().unsqueeze(1)).unsqueeze(2).unbind(1)   # (B, 1, D)
        else:
            shift, scale = (self.modulation.float().unsqueeze(0) + e.float().unsqueeze(2)).unbind(2)  # (B, L, D)
        return self.head(modulate(self.norm(x).float(), shift, scale).type_as(x))


class WanDiT(nn.Module):
    """The Wan2.1 / Wan2.2 DiT with Wan's original top-level names (`patch_embedding`, `text_embedding`,
    `time_embedding`, `time_projection`, `blocks.i`, `head`, `img_emb`), so a Wan state dict maps 1:1.

    Timesteps are per latent frame (B, T) (or (B,) = one per sample), expanded to tokens, which covers
    Wan2.1 (all equal) and Wan2.2 TI2V (the clean first frame at t = 0). The time embedding sees
    1000 t (Wan's timesteps). RoPE: 3D, interleaved pairs, head_dim split (d - 4 d/6, 2 d/6, 2 d/6).
    image_dim (Wan2.1 I2V, WoW: 1280 = CLIP ViT-H/14 tokens) adds the image input: img_emb (LayerNorm,
    Linear, GELU, Linear, LayerNorm) and an image cross-attention in every block. `from_pretrained`
    loads Wan2.1 / Wan2.2 / WoW weights (section "Pretrained weights").
    """
    grad_checkpoint = False                                  # recompute each block's activations in backward

    def __init__(self, in_dim: int, out_dim: int, dim: int, ffn_dim: int, heads: int, layers: int,
                 text_dim: int, patch=(1, 2, 2), freq_dim: int = 256, eps: float = 1e-6, rope_theta: float = 10000.0,
                 image_dim: int | None = None):
        super().__init__()
        self.dim, self.heads, self.patch, self.freq_dim, self.out_dim = dim, heads, tuple(patch), freq_dim, out_dim
        self.rope_theta = rope_theta
        self.sizes = dict(in_dim=in_dim, out_dim=out_dim, dim=dim, ffn_dim=ffn_dim, heads=heads, layers=layers,
                          text_dim=text_dim, patch=self.patch, freq_dim=freq_dim, image_dim=image_dim)
        self.patch_embedding = nn.Conv3d(in_dim, dim, kernel_size=self.patch, stride=self.patch)
        self.text_embedding = nn.Sequential(nn.Linear(text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        if image_dim:
            self.img_emb = nn.Module()
            self.img_emb.proj = nn.Sequential(FP32LayerNorm(image_dim), nn.Linear(image_dim, image_dim), nn.GELU(),
                                              nn.Linear(image_dim, dim), FP32LayerNorm(dim))
        self.blocks = nn.ModuleList([WanBlock(dim, ffn_dim, heads, eps=eps, image=bool(image_dim)) for _ in range(layers)])
        self.head = WanHead(dim, out_dim * math.prod(self.patch), eps)

    @classmethod
    def from_pretrained(cls, source: str, revision: str | None = None, subfolder: str | None = None,
                        dtype: torch.dtype | None = None, heads: int | None = None) -> "WanDiT":
        """Wan2.1-T2V-1.3B, Wan2.2-TI2V-5B or WoW weights from a Hub id or a local folder / file, in the
        original layout (names = ours) or the diffusers one (`subfolder="transformer"`; WAN_DIFFUSERS_KEYS).
        Sizes come from the weight shapes, the head count from config.json (num_heads / num_attention_heads;
        without one, `heads` or dim / 128, Wan's head width); a config.json that disagrees is an error.
        The image input is built when the weights have it. Memory-mapped, in the checkpoint's dtype
        unless `dtype` is given."""
        path = resolve_source(source, revision, subfolder, WAN_FILES)
        sd = read_weights(path)
        if any(k.startswith("condition_embedder.") for k in sd):
            sd = rename_keys(sd, WAN_DIFFUSERS_KEYS)
        kw = wan_config(sd, read_config(path), heads, what=path)
        return build_pretrained(lambda: cls(**kw), sd, what=f"Wan DiT weights {path}", ignore=WAN_IGNORED, dtype=dtype)

    def embed(self, x):
        """(B, C_in, T, H, W) -> tokens (B, L, D) and the token grid (T', h, w)."""
        x = self.patch_embedding(x)
        return x.flatten(2).transpose(1, 2), tuple(x.shape[2:])

    def time(self, t, grid):
        """t (B,) or (B, T) per latent frame -> e (B, L, D), e0 (B, L, 6, D), fp32."""
        T, h, w = grid
        if t.dim() == 1:
            t = t[:, None].expand(-1, T)
        e = self.time_embedding(timestep_embedding(1000 * t.flatten().float(), self.freq_dim).to(self.time_embedding[0].weight.dtype))
        e0 = self.time_projection(e).unflatten(-1, (6, self.dim))
        e, e0 = e.unflatten(0, t.shape).float(), e0.unflatten(0, t.shape).float()       # (B, T, D), (B, T, 6, D)
        return e.repeat_interleave(h * w, 1), e0.repeat_interleave(h * w, 1)

    def rope(self, grid, device=None):
        """(L, head_dim/2) angles of the video token grid, and the interleaved flag, for Attention."""
        t, y, x = grid_positions(*grid, device=device)
        return rope_3d(t, y, x, self.dim // self.heads, self.rope_theta), True

    def unpatchify(self, x, grid):
        """(B, L, p_t p_h p_w C) -> (B, C, T, H, W) (Wan's einsum 'fhwpqrc->cfphqwr')."""
        (T, h, w), (pt, ph, pw) = grid, self.patch
        x = x.reshape(x.shape[0], T, h, w, pt, ph, pw, self.out_dim)
        return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(x.shape[0], self.out_dim, T * pt, h * ph, w * pw)

    def image_context(self, ctx_img):
        """Embedded image tokens (B, L_img, D) of an image-input model, None for a text-only one."""
        has = hasattr(self, "img_emb")
        if has != (ctx_img is not None):
            raise ValueError("this Wan DiT " + ("has an image input (img_emb): pass ctx_img (B, L_img, image_dim), "
                             "e.g. 257 CLIP ViT-H/14 tokens" if has else "has no image input, but ctx_img was given"))
        return self.img_emb.proj(ctx_img) if has else None

    def forward(self, x, t, ctx, mask=None, ctx_img=None):
        """x (B, C_in, T, H, W), t (B,) or (B, T), ctx (B, L_text, text_dim), ctx_img (B, L_img, image_dim)
        for an image-input model -> (B, C_out, T, H, W)."""
        tokens, grid = self.embed(x)
        e, e0 = self.time(t, grid)
        ctx, ctx_img = self.text_embedding(ctx), self.image_context(ctx_img)
        rope = self.rope(grid, x.device)
        for block in self.blocks:
            tokens = checkpointed(self.grad_checkpoint, block, tokens, e0, ctx, rope=rope, mask=mask, ctx_img=ctx_img)
        return self.unpatchify(self.head(tokens, e), grid)


# -------------------------------------------------------------------------------------------------
# SigLIP / SigLIP2 vision tower (MV-WAM's image condition, AGRA's SigLIP teacher), checkpoint names
# -------------------------------------------------------------------------------------------------


class SiglipLayer(nn.Module):
    """Pre-LN ViT layer with SigLIP's names: x += attn(layer_norm1(x)); x += mlp(layer_norm2(x))."""

    def __init__(self, dim: int, heads: int, ffn: int, eps: float = 1e-6):
        super().__init__()
        self.heads = heads
        self.layer_norm1 = nn.LayerNorm(dim, eps=eps)
        self.self_attn = nn.Module()
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            setattr(self.self_attn, n, nn.Linear(dim, dim))
        self.layer_norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(dim, ffn), nn.Linear(ffn, dim)

    def forward(self, x):
        a, h = self.self_attn, self.layer_norm1(x)
        q, k, v = (m(h).unflatten(-1, (self.heads, -1)).transpose(1, 2) for m in (a.q_proj, a.k_proj, a.v_proj))
        x = x + a.out_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.layer_norm2(x)), approximate="tanh"))


class SiglipVisionTower(nn.Module):
    """SigLIP / SigLIP2 fixed-resolution vision encoder (Tschannen et al., "SigLIP 2", arXiv 2502.14786),
    frozen. Module names are the checkpoint's `vision_model.*` names without that prefix: a patch
    Conv2d plus a learned position table, pre-LN transformer layers (GELU-tanh MLP), post_layernorm.
    SigLIP normalizes pixels with mean = std = 0.5, i.e. it takes [-1, 1] images as they are.
    The attention-pooling head is not built: MV-WAM and AGRA read the patch tokens.

    forward(images (N, 3, H, W) in [-1, 1]) -> patch features (N, g, g, D) on the res / patch grid."""

    def __init__(self, dim: int = 768, layers: int = 12, heads: int = 12, ffn: int = 3072, patch: int = 16,
                 res: int = 224, eps: float = 1e-6):
        super().__init__()
        self.res, self.grid = res, res // patch
        self.sizes = dict(dim=dim, layers=layers, heads=heads, ffn=ffn, patch=patch, res=res)
        self.embeddings = nn.Module()
        self.embeddings.patch_embedding = nn.Conv2d(3, dim, patch, patch)
        self.embeddings.position_embedding = nn.Embedding(self.grid ** 2, dim)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList([SiglipLayer(dim, heads, ffn, eps) for _ in range(layers)])
        self.post_layernorm = nn.LayerNorm(dim, eps=eps)
        self.requires_grad_(False)

    def hidden_states(self, pixels):
        """Normalized pixels (N, 3, res, res) -> last_hidden_state (N, g*g, D), patch tokens only."""
        x = self.embeddings.patch_embedding(pixels).flatten(2).transpose(1, 2)        # (N, g*g, D)
        x = x + self.embeddings.position_embedding.weight
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x)

    @torch.no_grad()
    def forward(self, images):
        x = F.interpolate(images, size=(self.res, self.res), mode="bilinear", align_corners=False, antialias=True)
        return self.hidden_states(x).unflatten(1, (self.grid, self.grid))             # (N, g, g, D)

    @classmethod
    def from_pretrained(cls, source: str = "google/siglip2-base-patch16-224", revision: str | None = None,
                        subfolder: str | None = None, dtype: torch.dtype | None = None) -> "SiglipVisionTower":
        """The vision tower of a SigLIP / SigLIP2 checkpoint (a full SiglipModel, keys `vision_model.*`,
        or a saved SiglipVisionModel, no prefix). Fixed-resolution SigLIP2 checkpoints use model_type
        "siglip"; NaFlex ones ("siglip2", a Linear patch embedding) are refused. SIGLIP_IGNORED lists the
        checkpoint keys not used (text tower, logit scale / bias, the pooling head)."""
        path = resolve_source(source, revision, subfolder, HF_FILES)
        config = read_config(path)
        if config.get("model_type", "").startswith("siglip2"):
            raise ValueError(f"{path}: model_type {config['model_type']!r} is a NaFlex SigLIP2 checkpoint (Linear patch "
                             "embedding, per-image position resizing), not supported; use a fixed-resolution one, "
                             "e.g. google/siglip2-base-patch16-224 (model_type 'siglip')")
        v = config.get("vision_config", config)                 # SiglipVisionConfig defaults where a key is absent
        kw = dict(dim=v.get("hidden_size", 768), layers=v.get("num_hidden_layers", 12), heads=v.get("num_attention_heads", 12),
                  ffn=v.get("intermediate_size", 3072), patch=v.get("patch_size", 16), res=v.get("image_size", 224),
                  eps=v.get("layer_norm_eps", 1e-6))
        sd = {k.removeprefix("vision_model."): t for k, t in read_weights(path).items()}
        return build_pretrained(lambda: cls(**kw), sd, what=f"SigLIP weights {path}", ignore=SIGLIP_IGNORED, dtype=dtype)


# -------------------------------------------------------------------------------------------------
# LoRA
# -------------------------------------------------------------------------------------------------


class LoRALinear(nn.Linear):
    """nn.Linear + a low-rank update W x + (alpha / r) B A x. Keeps the base names (`weight`, `bias`),
    so a checkpoint of the base model still loads; adds `lora_A` (r, in) and `lora_B` (out, r = 0)."""

    def __init__(self, in_features, out_features, bias=True, rank: int = 32, alpha: float | None = None):
        super().__init__(in_features, out_features, bias=bias)
        self.rank, self.scaling = rank, (alpha if alpha is not None else rank) / rank
        self.lora_A = nn.Parameter(torch.randn(rank, in_features) / math.sqrt(in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))   # zero: starts as the base layer

    def forward(self, x):
        return super().forward(x) + (x @ self.lora_A.t().to(x.dtype) @ self.lora_B.t().to(x.dtype)) * self.scaling


def inject_lora(module: nn.Module, pattern: str, rank: int, alpha: float | None = None) -> list[str]:
    """Replace every nn.Linear whose qualified name matches regex `pattern` by a LoRALinear with the
    same weights; freezes the base weights. Returns the replaced names (raises if none matched)."""
    names = [n for n, m in module.named_modules() if type(m) is nn.Linear and re.search(pattern, n)]
    if not names:
        raise ValueError(f"inject_lora: no nn.Linear matches {pattern!r}")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        old = getattr(parent, child)
        new = LoRALinear(old.in_features, old.out_features, old.bias is not None, rank, alpha)
        new = new.to(device=old.weight.device, dtype=old.weight.dtype)
        new.weight, new.bias = old.weight, old.bias          # the base tensors themselves (no copy; may be memory-mapped)
        new.weight.requires_grad_(False)
        if new.bias is not None:
            new.bias.requires_grad_(False)
        setattr(parent, child, new)
    return names


# -------------------------------------------------------------------------------------------------
# Tiny text encoder (toy instructions), standing in for T5 / Cosmos-Reason at the tiny preset
# -------------------------------------------------------------------------------------------------


class TinyTextEncoder(nn.Module):
    """Word-level vocabulary -> embeddings + learned positions -> a few transformer layers -> (B, L, D)."""

    def __init__(self, vocab: list[str], dim: int, max_len: int = 16, layers: int = 1, heads: int = 2):
        super().__init__()
        self.vocab = ["<pad>", "<unk>"] + list(vocab)
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.max_len = max_len
        self.embed = nn.Embedding(len(self.vocab), dim)
        self.pos = nn.Parameter(torch.randn(max_len, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        ids = torch.zeros(len(texts), self.max_len, dtype=torch.long)
        for i, text in enumerate(texts):
            words = text.lower().split()[: self.max_len]
            ids[i, : len(words)] = torch.tensor([self.index.get(w, 1) for w in words], dtype=torch.long)
        return ids

    def forward(self, texts: list[str]) -> torch.Tensor:
        ids = self.tokenize(texts).to(self.pos.device)
        x = self.embed(ids) + self.pos                       # (B, L, D)
        return self.norm(self.layers(x))


# -------------------------------------------------------------------------------------------------
# Invertible pixel codec: the tiny presets' stand-in for the Wan VAE (same causal layout)
# -------------------------------------------------------------------------------------------------


class PixelCodec:
    """Parameter-free, invertible "VAE" with the Wan/Cosmos causal layout.

    Frames 1 + q*k -> latent frames 1 + k: the first frame alone (repeated q times so every latent
    frame has the same channels), then groups of q frames; space-to-depth by p. Channels 3*q*p*p.
    encode (B, 3, 1+q*k, H, W) in [-1, 1] -> (B, 3*q*p*p, 1+k, H/p, W/p); decode inverts it.
    """

    def __init__(self, q: int = 4, p: int = 2, scale: float = 1.0):
        self.q, self.p, self.scale = q, p, scale
        self.channels = 3 * q * p * p

    def latent_frames(self, frames: int) -> int:
        if (frames - 1) % self.q:
            raise ValueError(f"PixelCodec(q={self.q}) needs 1 + {self.q}*k frames, received {frames}")
        return 1 + (frames - 1) // self.q

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        B, C, T, H, W = video.shape
        if C != 3 or H % self.p or W % self.p:
            raise ValueError(f"PixelCodec.encode expects (B, 3, T, H, W) with H, W divisible by {self.p}; "
                             f"received {tuple(video.shape)}")
        self.latent_frames(T)
        first = video[:, :, :1].expand(B, C, self.q, H, W)                  # (B, 3, q, H, W)
        x = torch.cat([first, video[:, :, 1:]], 2)                          # (B, 3, q*(1+k), H, W)
        x = x.unflatten(2, (-1, self.q))                                    # (B, 3, 1+k, q, H, W)
        x = x.unflatten(4, (H // self.p, self.p)).unflatten(6, (W // self.p, self.p))  # (B,3,T',q,h,p,w,p)
        x = x.permute(0, 1, 3, 5, 7, 2, 4, 6).flatten(1, 4)                 # (B, 3*q*p*p, 1+k, h, w)
        return x * self.scale

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        B, Cz, Tl, h, w = z.shape
        if Cz != self.channels:
            raise ValueError(f"PixelCodec.decode expects {self.channels} channels, received {Cz}")
        x = (z / self.scale).unflatten(1, (3, self.q, self.p, self.p))      # (B, 3, q, p, p, T', h, w)
        x = x.permute(0, 1, 5, 2, 6, 3, 7, 4)                               # (B, 3, T', q, h, p, w, p)
        x = x.flatten(6, 7).flatten(4, 5).flatten(2, 3)                     # (B, 3, T'*q, H, W)
        return torch.cat([x[:, :, :1], x[:, :, self.q:]], 2)                # drop the q-1 copies


# -------------------------------------------------------------------------------------------------
# Checkpoints: atomic safetensors with JSON metadata, strict loading
# -------------------------------------------------------------------------------------------------


def atomic_write(path: str, write_fn):
    """Write via a temp file in the same folder + os.replace, so a killed write leaves the old file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    os.close(fd)
    try:
        write_fn(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_weights(path: str, state_dict: dict, metadata: dict):
    """Weights as safetensors (never pickle); metadata values are JSON-encoded strings."""
    from safetensors.torch import save_file
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    meta = {k: json.dumps(v) for k, v in metadata.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_weights(path: str) -> tuple[dict, dict]:
    """-> (state_dict, metadata) with clear errors for a missing or unreadable file."""
    from safetensors import safe_open
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        with safe_open(path, framework="pt") as f:
            meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated / foreign files
        raise ValueError(f"could not read {path} as a safetensors checkpoint (truncated or not a "
                         f"checkpoint?): {e}") from None
    return sd, meta


def load_state_dict_strict(module: nn.Module, state_dict: dict, key_map: dict | None = None, what: str = "checkpoint",
                           ignore=(), assign: bool = False, dtype: torch.dtype | None = None):
    """Copy `state_dict` into `module`, mapping names through `key_map` (old -> new) first.

    Refuses partial loads: raises naming every missing, unexpected and mis-shaped key. `ignore` is a
    documented list of regexes of checkpoint keys this model does not use on purpose; they are dropped.
    assign=True makes the module's tensors the given ones (memory-mapped, for a module built on the
    meta device) instead of copying; `dtype` casts floating-point tensors first.
    """
    if key_map:
        state_dict = {key_map.get(k, k): v for k, v in state_dict.items()}
    if ignore:
        state_dict = {k: v for k, v in state_dict.items() if not any(re.search(p, k) for p in ignore)}
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [f"{k}: expected {tuple(own[k].shape)}, received {tuple(v.shape)}"
              for k, v in state_dict.items() if k in own and own[k].shape != v.shape]
    if missing or unexpected or shapes:
        def show(xs):
            return ", ".join(xs[:12]) + (f" ... (+{len(xs) - 12} more)" if len(xs) > 12 else "")
        msg = [f"{what} does not fit {type(module).__name__}:"]
        if len(missing) > len(own) // 2:
            msg[0] += f" only {len(own) - len(missing)} of its {len(own)} keys are there (a checkpoint of another model?)"
        if missing:
            msg.append(f"  missing {len(missing)} key(s): {show(missing)}")
        if unexpected:
            msg.append(f"  unexpected {len(unexpected)} key(s): {show(unexpected)}")
        if shapes:
            msg.append(f"  {len(shapes)} shape mismatch(es): {show(shapes)}")
        raise ValueError("\n".join(msg))
    if dtype is not None:
        state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    module.load_state_dict(state_dict, strict=True, assign=assign)


# -------------------------------------------------------------------------------------------------
# Pretrained weights: a source (Hub repo id or local path) -> memory-mapped tensors -> key map ->
# strict load into a module built on the meta device (nanoGPT's from_pretrained, at 10 GB scale)
# -------------------------------------------------------------------------------------------------

HF_FILES = ("config.json", "*.safetensors", "*.safetensors.index.json")      # what a Hub fetch downloads
WAN_FILES = ("config.json", "diffusion_pytorch_model*.safetensors", "diffusion_pytorch_model*.safetensors.index.json")
STATE_DICT_WRAPPERS = ("state_dict", "module", "model")    # torch.save / DeepSpeed (mp_rank_00_model_states.pt) / Lightning
KEY_PREFIXES = ("net.", "model.diffusion_model.")          # Cosmos checkpoints / ComfyUI-style files

# Checkpoint keys each model does not use on purpose (dropped before the strict check):
WAN_IGNORED = (r"\.norm_added_q\.",)                       # diffusers lists it as ignorable; Wan has no such norm
SIGLIP_IGNORED = (r"^text_model\.", r"^logit_(scale|bias)$", r"^head\.")  # text tower, contrastive scale/bias, pooling head

# diffusers WanTransformer3DModel name -> Wan's original name (= ours); first matching rule wins.
WAN_DIFFUSERS_KEYS = (
    (r"^blocks\.(\d+)\.scale_shift_table$", r"blocks.\1.modulation"),
    (r"^blocks\.(\d+)\.attn1\.to_out\.0\.", r"blocks.\1.self_attn.o."),
    (r"^blocks\.(\d+)\.attn1\.(?:to_)?", r"blocks.\1.self_attn."),                  # to_q/k/v, norm_q/k
    (r"^blocks\.(\d+)\.attn2\.to_out\.0\.", r"blocks.\1.cross_attn.o."),
    (r"^blocks\.(\d+)\.attn2\.add_([kv])_proj\.", r"blocks.\1.cross_attn.\2_img."),  # I2V image keys / values
    (r"^blocks\.(\d+)\.attn2\.norm_added_k\.", r"blocks.\1.cross_attn.norm_k_img."),
    (r"^blocks\.(\d+)\.attn2\.(?:to_)?", r"blocks.\1.cross_attn."),
    (r"^blocks\.(\d+)\.norm2\.", r"blocks.\1.norm3."),          # the cross-attention LayerNorm: Wan calls it norm3
    (r"^blocks\.(\d+)\.ffn\.net\.0\.proj\.", r"blocks.\1.ffn.0."),
    (r"^blocks\.(\d+)\.ffn\.net\.2\.", r"blocks.\1.ffn.2."),
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"^condition_embedder\.image_embedder\.norm1\.", "img_emb.proj.0."),
    (r"^condition_embedder\.image_embedder\.ff\.net\.0\.proj\.", "img_emb.proj.1."),
    (r"^condition_embedder\.image_embedder\.ff\.net\.2\.", "img_emb.proj.3."),
    (r"^condition_embedder\.image_embedder\.norm2\.", "img_emb.proj.4."),
    (r"^scale_shift_table$", "head.modulation"),
    (r"^proj_out\.", "head.head."),
)


def resolve_source(source: str, revision: str | None = None, subfolder: str | None = None, patterns=HF_FILES) -> str:
    """Local folder or file (with `subfolder` joined), or a Hub repo id "owner/name" fetched with
    huggingface_hub.snapshot_download: only the files matching `patterns` under `subfolder`, into the
    standard cache; with HF_HUB_OFFLINE=1 only the cache is used. Tokens are huggingface_hub's business
    (HF_TOKEN or `hf auth login`). -> a local path."""
    if os.path.exists(source):
        path = os.path.join(source, subfolder) if subfolder else source
        if not os.path.exists(path):
            raise FileNotFoundError(f"{source} has no subfolder {subfolder!r}")
        return path
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", source):
        raise FileNotFoundError(f"{source!r} is neither an existing file or folder nor a Hub repo id 'owner/name'")
    from huggingface_hub import snapshot_download
    prefix = subfolder.strip("/") + "/" if subfolder else ""
    try:
        root = snapshot_download(source, revision=revision, allow_patterns=[prefix + p for p in patterns])
    except Exception as e:  # offline without a cached copy, unknown repo or revision, gated repo, no network
        raise OSError(f"could not fetch {source} (revision {revision or 'main'}, files {[prefix + p for p in patterns]}): "
                      f"{type(e).__name__}: {e}. With HF_HUB_OFFLINE=1 only the local cache is used; fetch once with "
                      f"network access, or pass a local folder.") from None
    return os.path.join(root, subfolder) if subfolder else root


def read_config(path: str) -> dict:
    """config.json of a weights folder (or next to a weights file), {} if there is none."""
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    f = os.path.join(folder, "config.json")
    return json.load(open(f)) if os.path.isfile(f) else {}


def weight_files(path: str) -> list[str]:
    """The weight files of a folder: the shards of a *.safetensors.index.json, else its one
    .safetensors file, else its one .pt / .pth file."""
    if os.path.isfile(path):
        return [path]
    names = sorted(os.listdir(path)) if os.path.isdir(path) else []
    index = [n for n in names if n.endswith(".safetensors.index.json")]
    if len(index) == 1:
        shards = sorted(set(json.load(open(os.path.join(path, index[0])))["weight_map"].values()))
        absent = [s for s in shards if not os.path.isfile(os.path.join(path, s))]
        if absent:
            raise FileNotFoundError(f"{path}/{index[0]} names shards that are not there: {absent}")
        return [os.path.join(path, s) for s in shards]
    for ext in ((".safetensors",), (".pt", ".pth")):
        found = [n for n in names if n.endswith(ext)]
        if len(found) == 1:
            return [os.path.join(path, found[0])]
        if found:
            raise ValueError(f"{path} holds several weight files {found} and no index: pass the file itself")
    raise FileNotFoundError(f"no weights in {path} (looked for *.safetensors.index.json, *.safetensors, *.pt, *.pth); "
                            f"files there: {names[:20]}")


def read_weight_file(f: str) -> dict:
    """One file -> {name: tensor}, memory-mapped. .pt / .pth only through torch.load(weights_only=True):
    never an unrestricted pickle."""
    if f.endswith(".safetensors"):
        from safetensors import safe_open
        try:
            with safe_open(f, framework="pt") as h:
                return {k: h.get_tensor(k) for k in h.keys()}
        except Exception as e:  # safetensors' own error types: truncated header or data, not a safetensors file
            raise ValueError(f"could not read {f} as safetensors (truncated or not a weights file?): {e}") from None
    try:
        obj = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise ValueError(f"could not read {f} with torch.load(weights_only=True, mmap=True): {type(e).__name__}: {e}. "
                         "A truncated download, a pre-1.6 (non-zip) torch file, or a file holding Python objects "
                         "other than tensors and plain containers, which this loader refuses to unpickle.") from None
    while isinstance(obj, dict) and any(isinstance(obj.get(k), dict) for k in STATE_DICT_WRAPPERS):
        obj = obj[next(k for k in STATE_DICT_WRAPPERS if isinstance(obj.get(k), dict))]   # e.g. DeepSpeed's {'module': ...}
    if not isinstance(obj, dict) or not any(torch.is_tensor(v) for v in obj.values()):
        raise ValueError(f"{f}: no state dict inside (found {type(obj).__name__} {list(obj)[:10] if isinstance(obj, dict) else ''}; "
                         f"expected tensors, or one of {STATE_DICT_WRAPPERS} holding them)")
    odd = [k for k, v in obj.items() if not torch.is_tensor(v) and not k.endswith("_extra_state")]
    if odd:                                                 # Transformer Engine's _extra_state may be None / bytes
        raise ValueError(f"{f}: entries that are not tensors: {odd[:10]}")
    return {k: v for k, v in obj.items() if torch.is_tensor(v)}


def read_weights(path: str) -> dict:
    """All tensors of a weights file or folder (see weight_files), memory-mapped, with the `net.` /
    `model.diffusion_model.` prefixes stripped."""
    sd = {}
    for f in weight_files(path):
        sd.update(read_weight_file(f))
    for prefix in KEY_PREFIXES:
        sd = {k.removeprefix(prefix): v for k, v in sd.items()}
    return sd


def rename_keys(state_dict: dict, rules) -> dict:
    """Apply the first matching (regex, replacement) rule to each key; keys matching none stay."""
    out = {}
    for k, v in state_dict.items():
        for pattern, repl in rules:
            new, n = re.subn(pattern, repl, k, count=1)
            if n:
                k = new
                break
        out[k] = v
    return out


def build_pretrained(build, state_dict: dict, what: str, ignore=(), dtype: torch.dtype | None = None) -> nn.Module:
    """build() on the meta device (no memory, no init), then strict-load `state_dict` with assign=True:
    the module's tensors are the checkpoint's memory-mapped ones (copied only for a `dtype` cast), so
    loading a 10 GB bf16 file needs about 10 GB of page cache, not 3 x 10 GB of RAM."""
    with torch.device("meta"):
        module = build()
    load_state_dict_strict(module, state_dict, what=what, ignore=ignore, assign=True, dtype=dtype)
    left = [n for n, b in module.named_buffers() if b.is_meta and n not in state_dict]   # non-persistent buffers
    if left:
        raise RuntimeError(f"{what}: buffers {left[:5]} are not in checkpoints and were left on the meta device")
    return module


def wan_config(sd: dict, config: dict, heads: int | None = None, what: str = "checkpoint") -> dict:
    """WanDiT keyword arguments from the (original-named) weight shapes, the head count and eps from
    config.json (original keys num_heads / eps, diffusers num_attention_heads / eps); the sizes
    config.json states must agree with the weights."""
    if "patch_embedding.weight" not in sd or "blocks.0.ffn.0.weight" not in sd:
        raise ValueError(f"{what} is not a Wan DiT checkpoint: no patch_embedding.weight / blocks.0.ffn.0.weight "
                         f"(its first keys: {sorted(sd)[:8]})")
    w = sd["patch_embedding.weight"]                                   # (D, C_in, p_t, p_h, p_w)
    dim, patch = w.shape[0], tuple(w.shape[2:])
    heads = heads or config.get("num_heads") or config.get("num_attention_heads") or dim // 128
    if not heads or dim % heads:
        raise ValueError(f"{what}: no config.json gives the head count and dim {dim} is not a multiple of Wan's "
                         "head width 128: pass heads=")
    img = sd.get("img_emb.proj.0.weight")                              # LayerNorm of the image input, (image_dim,)
    layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    kw = dict(in_dim=w.shape[1], out_dim=sd["head.head.weight"].shape[0] // math.prod(patch), dim=dim, heads=heads,
              ffn_dim=sd["blocks.0.ffn.0.weight"].shape[0], layers=layers,
              text_dim=sd["text_embedding.0.weight"].shape[1], patch=patch, freq_dim=sd["time_embedding.0.weight"].shape[1],
              eps=config.get("eps", 1e-6), image_dim=img.shape[0] if img is not None else None)
    diffusers_dim = config.get("num_attention_heads", 0) * config.get("attention_head_dim", 0) or None
    claims = {"dim": config.get("dim", diffusers_dim), "ffn_dim": config.get("ffn_dim"), "layers": config.get("num_layers"),
              "in_dim": config.get("in_dim", config.get("in_channels")), "out_dim": config.get("out_dim", config.get("out_channels")),
              "freq_dim": config.get("freq_dim"), "text_dim": config.get("text_dim")}
    wrong = {k: (v, kw[k]) for k, v in claims.items() if v is not None and v != kw[k]}
    if wrong:
        raise ValueError(f"{what}: config.json disagrees with the weights (config, weights): {wrong}")
    return kw


# -------------------------------------------------------------------------------------------------
# Kinematics and camera (numpy): URDF chain, forward kinematics, pinhole projection
# -------------------------------------------------------------------------------------------------


def rpy_matrix(rpy) -> np.ndarray:
    """URDF fixed-axis roll-pitch-yaw -> R = Rz(yaw) Ry(pitch) Rx(roll)."""
    r, p, y = rpy
    cr, sr, cp, sp, cy, sy = np.cos(r), np.sin(r), np.cos(p), np.sin(p), np.cos(y), np.sin(y)
    return np.array([[cy * cp, cy * sp * sr - sy * cr, cy * sp * cr + sy * sr],
                     [sy * cp, sy * sp * sr + cy * cr, sy * sp * cr - cy * sr],
                     [-sp, cp * sr, cp * cr]])


def axis_angle_matrix(axis: np.ndarray, angle: np.ndarray) -> np.ndarray:
    """Rodrigues, vectorized: angle (...,) -> (..., 3, 3)."""
    x, y, z = axis / np.linalg.norm(axis)
    K = np.array([[0, -z, y], [z, 0, -x], [-y, x, 0]])
    a = np.asarray(angle, dtype=np.float64)[..., None, None]
    return np.eye(3) + np.sin(a) * K + (1 - np.cos(a)) * (K @ K)


@dataclass
class URDFJoint:
    name: str
    type: str            # revolute | continuous | prismatic | fixed
    parent: str
    child: str
    origin: np.ndarray   # (4, 4) parent -> joint frame at q = 0
    axis: np.ndarray     # (3,)
    lower: float
    upper: float
    mimic: tuple | None  # (joint name, multiplier, offset)


class URDFChain:
    """A URDF kinematic tree parsed with xml.etree: joints in parent-before-child order.

    `actuated` lists the non-fixed, non-mimic joints: the order of the q vector in `fk`.
    """

    def __init__(self, urdf: str):
        text = open(urdf).read() if not urdf.lstrip().startswith("<") else urdf
        root = ET.fromstring(text)
        joints = []
        for j in root.findall("joint"):
            origin = np.eye(4)
            o = j.find("origin")
            if o is not None:
                origin[:3, 3] = [float(v) for v in o.get("xyz", "0 0 0").split()]
                origin[:3, :3] = rpy_matrix([float(v) for v in o.get("rpy", "0 0 0").split()])
            ax = j.find("axis")
            lim = j.find("limit")
            mim = j.find("mimic")
            joints.append(URDFJoint(
                name=j.get("name"), type=j.get("type"), parent=j.find("parent").get("link"),
                child=j.find("child").get("link"), origin=origin,
                axis=np.array([float(v) for v in (ax.get("xyz") if ax is not None else "1 0 0").split()]),
                lower=float(lim.get("lower", -np.inf)) if lim is not None else -np.inf,
                upper=float(lim.get("upper", np.inf)) if lim is not None else np.inf,
                mimic=(mim.get("joint"), float(mim.get("multiplier", 1)), float(mim.get("offset", 0)))
                if mim is not None else None))
        children = {j.child for j in joints}
        roots = {j.parent for j in joints} - children
        if len(roots) != 1:
            raise ValueError(f"URDF must have exactly one root link, found {sorted(roots)}")
        self.root = roots.pop()
        order, frontier = [], [self.root]                 # breadth-first: parents before children
        while frontier:
            link = frontier.pop(0)
            for j in joints:
                if j.parent == link:
                    order.append(j)
                    frontier.append(j.child)
        self.joints = order
        self.links = [self.root] + [j.child for j in order]
        self.actuated = [j.name for j in order if j.type != "fixed" and j.mimic is None]
        self.lower = np.array([next(j.lower for j in order if j.name == n) for n in self.actuated])
        self.upper = np.array([next(j.upper for j in order if j.name == n) for n in self.actuated])

    def full_q(self, joints: np.ndarray, gripper: np.ndarray) -> np.ndarray:
        """Arm joint values (..., n_arm) (the actuated non-prismatic joints, in `actuated` order) and a
        gripper opening (...,) in [0, 1] (1 = open) -> the actuated vector (..., n), the opening mapped
        linearly onto every actuated prismatic joint's range (EA-WM App. A.2: normalized gripper signal
        -> prismatic displacement)."""
        joints, gripper = np.asarray(joints, np.float64), np.asarray(gripper, np.float64)
        order = [next(j for j in self.joints if j.name == n) for n in self.actuated]
        prismatic = [j.type == "prismatic" for j in order]
        n_arm = len(order) - sum(prismatic)
        if joints.shape[-1] != n_arm or joints.shape[:-1] != gripper.shape:
            raise ValueError(f"expected joints (..., {n_arm}) for {[j.name for j, p in zip(order, prismatic) if not p]} "
                             f"and gripper (...,), received {joints.shape} and {gripper.shape}")
        q = np.zeros(joints.shape[:-1] + (len(order),))
        q[..., [i for i, p in enumerate(prismatic) if not p]] = joints
        for i, (j, p) in enumerate(zip(order, prismatic)):
            if p:
                lo, hi = (j.lower if np.isfinite(j.lower) else 0.0), (j.upper if np.isfinite(j.upper) else 0.04)
                q[..., i] = lo + np.clip(gripper, 0, 1) * (hi - lo)
        return q

    def fk(self, q: np.ndarray) -> dict[str, np.ndarray]:
        """Forward kinematics (EA-WM Eq. 1): q (..., n_actuated) -> {link: (..., 4, 4) world pose}."""
        q = np.asarray(q, dtype=np.float64)
        if q.shape[-1] != len(self.actuated):
            raise ValueError(f"fk expects q (..., {len(self.actuated)}) for joints {self.actuated}, "
                             f"received {q.shape}")
        value = {n: q[..., i] for i, n in enumerate(self.actuated)}
        poses = {self.root: np.broadcast_to(np.eye(4), q.shape[:-1] + (4, 4))}
        for j in self.joints:
            motion = np.broadcast_to(np.eye(4), q.shape[:-1] + (4, 4)).copy()
            if j.type != "fixed":
                qj = value[j.mimic[0]] * j.mimic[1] + j.mimic[2] if j.mimic else value[j.name]
                if j.type in ("revolute", "continuous"):
                    motion[..., :3, :3] = axis_angle_matrix(j.axis, qj)
                elif j.type == "prismatic":
                    motion[..., :3, 3] = np.asarray(qj)[..., None] * j.axis
                else:
                    raise ValueError(f"joint {j.name}: unsupported type {j.type!r}")
            poses[j.child] = poses[j.parent] @ j.origin @ motion
        return poses


def depth_range(chain: URDFChain, q: np.ndarray, T_wc: np.ndarray) -> tuple[float, float]:
    """(z_min, z_max) camera depth of every link origin over all poses q (..., n_actuated), points
    behind the camera (z <= 0) left out: the range EA-WM colours the KVAF skeleton with (App. A.2)."""
    p = np.stack([pose[..., :3, 3] for pose in chain.fk(q).values()], -2)       # (..., links, 3)
    z = (p @ T_wc[2, :3] + T_wc[2, 3]).ravel()
    z = z[z > 0]
    return (float(z.min()), float(z.max())) if len(z) else (0.0, 1.0)


def look_at(eye, target, up=(0.0, 0.0, 1.0)) -> np.ndarray:
    """World-to-camera extrinsic T_wc (4, 4), OpenCV camera axes (x right, y down, z forward).

    T_wc maps world points into the camera frame, p_c = T_wc p_w (EA-WM's extrinsic convention)."""
    eye, target, up = (np.asarray(v, dtype=np.float64) for v in (eye, target, up))
    z = target - eye
    z /= np.linalg.norm(z)
    x = np.cross(z, up)
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    R = np.stack([x, y, z])                                  # rows: camera axes in world coordinates
    T = np.eye(4)
    T[:3, :3], T[:3, 3] = R, -R @ eye
    return T


def intrinsics(width: int, height: int, fov_deg: float) -> np.ndarray:
    """Pinhole K for a horizontal field of view, principal point at the image centre."""
    f = 0.5 * width / math.tan(math.radians(fov_deg) / 2)
    return np.array([[f, 0, width / 2], [0, f, height / 2], [0, 0, 1.0]])


def project(points: np.ndarray, K: np.ndarray, T_wc: np.ndarray):
    """Pinhole projection (EA-WM Eq. 2): world points (..., 3) -> pixel coords (..., 2) and depth (...).

    Pixel (row i, column j) covers u in [j, j+1), v in [i, i+1). Points with depth <= 0 are behind
    the camera: their uv is NaN (callers drop them)."""
    p = points @ T_wc[:3, :3].T + T_wc[:3, 3]                # (..., 3) camera frame
    z = p[..., 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        uv = (p[..., :2] / z[..., None]) * np.array([K[0, 0], K[1, 1]]) + np.array([K[0, 2], K[1, 2]])
    uv = np.where((z > 1e-6)[..., None], uv, np.nan)
    return uv, z


# -------------------------------------------------------------------------------------------------
# Raster helpers (numpy): paint into an (H, W, 3) colour image and an (H, W) id map
# -------------------------------------------------------------------------------------------------


_PIXEL_CENTRES: dict = {}


def _window(shape, lo_u, hi_u, lo_v, hi_v):
    """Clipped pixel window covering u in [lo_u, hi_u], v in [lo_v, hi_v]; None if empty."""
    H, W = shape[:2]
    if (H, W) not in _PIXEL_CENTRES:                          # cached pixel-centre grids (u, v)
        v, u = np.mgrid[0:H, 0:W] + 0.5
        _PIXEL_CENTRES[(H, W)] = (u, v)
    U, V = _PIXEL_CENTRES[(H, W)]
    j0, j1 = max(int(math.floor(lo_u)), 0), min(int(math.ceil(hi_u)) + 1, W)
    i0, i1 = max(int(math.floor(lo_v)), 0), min(int(math.ceil(hi_v)) + 1, H)
    if j0 >= j1 or i0 >= i1:
        return None
    return (slice(i0, i1), slice(j0, j1)), U[i0:i1, j0:j1], V[i0:i1, j0:j1]


def _paint(img, ids, win, mask, color, idx):
    (sl, u, v) = win
    if img is not None:
        img[sl][mask] = color
    if ids is not None:
        ids[sl][mask] = idx


def draw_disc(img, ids, center, radius, color, idx=0):
    cu, cv = center
    if not np.isfinite(cu + cv):
        return
    win = _window((img if img is not None else ids).shape, cu - radius, cu + radius, cv - radius, cv + radius)
    if win is not None:
        _paint(img, ids, win, (win[1] - cu) ** 2 + (win[2] - cv) ** 2 <= radius ** 2, color, idx)


def draw_segment(img, ids, a, b, radius, color, idx=0):
    """Thick segment (capsule) from a to b (pixel coords) with half-width `radius`."""
    (au, av), (bu, bv) = a, b
    if not np.isfinite(au + av + bu + bv):
        return
    win = _window((img if img is not None else ids).shape, min(au, bu) - radius, max(au, bu) + radius,
                  min(av, bv) - radius, max(av, bv) + radius)
    if win is None:
        return
    _, u, v = win
    du, dv = bu - au, bv - av
    s = np.clip(((u - au) * du + (v - av) * dv) / max(du * du + dv * dv, 1e-12), 0, 1)
    d2 = (u - au - s * du) ** 2 + (v - av - s * dv) ** 2
    _paint(img, ids, win, d2 <= radius ** 2, color, idx)


def draw_polygon(img, ids, pts, color, idx=0):
    """Filled convex polygon, vertices (N, 2) in pixel coords (either winding)."""
    pts = np.asarray(pts, dtype=np.float64)
    if not np.isfinite(pts).all():
        return
    win = _window((img if img is not None else ids).shape, pts[:, 0].min(), pts[:, 0].max(),
                  pts[:, 1].min(), pts[:, 1].max())
    if win is None:
        return
    _, u, v = win
    nxt = np.roll(pts, -1, 0)
    cross = [(q[0] - p[0]) * (v - p[1]) - (q[1] - p[1]) * (u - p[0]) for p, q in zip(pts, nxt)]
    cross = np.stack(cross)
    inside = (cross >= 0).all(0) | (cross <= 0).all(0)
    _paint(img, ids, win, inside, color, idx)


def gaussian_2d(shape, center, sigma, truncate: float = 3.0) -> np.ndarray:
    """(H, W) Gaussian bump exp(-d^2 / 2 sigma^2), zero beyond `truncate` sigmas."""
    H, W = shape
    v, u = np.mgrid[0:H, 0:W] + 0.5
    d2 = (u - center[0]) ** 2 + (v - center[1]) ** 2
    g = np.exp(-d2 / (2 * sigma ** 2))
    return np.where(d2 <= (truncate * sigma) ** 2, g, 0.0)


def colormap(x: np.ndarray) -> np.ndarray:
    """Perceptual-ish blue -> green -> yellow -> red map of x in [0, 1] -> (..., 3) uint8."""
    stops = np.array([[48, 18, 59], [40, 120, 230], [40, 210, 140], [240, 220, 40], [220, 40, 20]], float)
    x = np.clip(np.nan_to_num(x), 0, 1) * (len(stops) - 1)
    i = np.minimum(x.astype(int), len(stops) - 2)
    f = (x - i)[..., None]
    return (stops[i] * (1 - f) + stops[i + 1] * f).astype(np.uint8)


# -------------------------------------------------------------------------------------------------
# Image files: PNG and GIF writers (no imaging dependency), MP4 through PyAV (optional)
# -------------------------------------------------------------------------------------------------


def save_png(path: str, img: np.ndarray):
    """Write an (H, W, 3) uint8 image as PNG."""
    img = np.ascontiguousarray(img.astype(np.uint8))
    H, W, _ = img.shape
    raw = b"".join(b"\x00" + img[i].tobytes() for i in range(H))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", W, H, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")
    atomic_write(path, lambda tmp: open(tmp, "wb").write(png))


def _gif_palette():
    """6x6x6 colour cube + 40 greys: 256 entries."""
    levels = np.array([0, 51, 102, 153, 204, 255])
    cube = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), -1).reshape(-1, 3)
    greys = np.linspace(8, 247, 40).astype(int)[:, None].repeat(3, 1)
    return np.concatenate([cube, greys]).astype(np.uint8)


def save_gif(path: str, frames: np.ndarray, fps: float = 8.0, scale: int = 1):
    """Write (T, H, W, 3) uint8 frames as a looping GIF (fixed 256-colour palette, LZW with
    frequent clear codes, so every code stays 9 bits wide)."""
    pal = _gif_palette()
    frames = np.asarray(frames, dtype=np.uint8)
    rgb = frames.astype(np.int32)
    packed = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    colours, inverse = np.unique(packed, return_inverse=True)         # nearest palette entry per distinct colour
    c = np.stack([colours >> 16, (colours >> 8) & 255, colours & 255], -1)
    lut = ((c[:, None, :] - pal.astype(np.int32)) ** 2).sum(-1).argmin(-1).astype(np.uint8)
    index = lut[inverse.reshape(packed.shape)]
    if scale > 1:
        index = index.repeat(scale, 1).repeat(scale, 2)
    T, H, W = index.shape
    out = bytearray(b"GIF89a" + struct.pack("<HHBBB", W, H, 0xF7, 0, 0) + pal.tobytes())
    out += b"\x21\xFF\x0BNETSCAPE2.0\x03\x01\x00\x00\x00"             # loop forever
    delay = int(round(100 / fps))
    shifts = np.arange(9, dtype=np.uint16)
    for t in range(T):
        out += b"\x21\xF9\x04\x04" + struct.pack("<H", delay) + b"\x00\x00"
        out += b"\x2C" + struct.pack("<HHHHB", 0, 0, W, H, 0) + b"\x08"  # min code size 8
        px = index[t].ravel().astype(np.uint16)
        codes = np.insert(px, np.arange(0, len(px), 200), 256)           # clear every 200 pixels: codes stay 9 bits
        codes = np.append(codes, 257)                                   # end of information
        bits = ((codes[:, None] >> shifts) & 1).astype(np.uint8).ravel()  # 9 bits per code, least significant first
        data = np.packbits(bits, bitorder="little").tobytes()
        for i in range(0, len(data), 255):
            block = data[i:i + 255]
            out += bytes([len(block)]) + block
        out += b"\x00"
    out += b"\x3B"
    atomic_write(path, lambda tmp: open(tmp, "wb").write(bytes(out)))


def save_mp4(path: str, frames: np.ndarray, fps: float = 8.0, crf: int = 18, pix_fmt: str = "yuv420p",
             codec: str = "libx264"):
    """Write (T, H, W, 3) uint8 frames as an MP4 (PyAV, imported here: `pip install av`). Frame i gets
    the timestamp i / fps. crf=0 with pix_fmt="yuv444p" is (nearly) lossless."""
    try:
        import av
    except ImportError:
        raise ImportError("writing MP4 needs PyAV: pip install av (or write a GIF with save_gif)") from None
    from fractions import Fraction
    frames = np.ascontiguousarray(np.asarray(frames, dtype=np.uint8))
    T, H, W, _ = frames.shape
    if pix_fmt == "yuv420p" and (H % 2 or W % 2):
        raise ValueError(f"save_mp4: {pix_fmt} needs even frame sizes, received {H}x{W}")
    rate = Fraction(fps).limit_denominator(1001)

    def write(tmp):
        with av.open(tmp, "w", format="mp4") as c:
            st = c.add_stream(codec, rate=rate)
            st.width, st.height, st.pix_fmt = W, H, pix_fmt
            st.options = {"crf": str(crf)}
            for i in range(T):
                f = av.VideoFrame.from_ndarray(frames[i], format="rgb24")
                f.pts, f.time_base = i, 1 / rate
                c.mux(st.encode(f))
            c.mux(st.encode())
    atomic_write(path, write)
