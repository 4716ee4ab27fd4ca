"""Memory plan of a training run, per GPU: weights, gradients, optimizer state, activations.

`python train.py --model M --preset full --dry-run [--stage S] [--batch-size B] [--strategy ddp|fsdp]
[--gpus N] [--grad-checkpoint] [--gpu-gb 80]` builds the preset on the `meta` device (no memory, no
weights) and prints this plan. Weights, gradients and optimizer state are counted from the model's
parameters; activations are an ESTIMATE from a per-block formula (below); the batch is counted from
the shapes of the cached features (data/encode.py). CUDA context, allocator fragmentation and the
modules outside the transformer blocks (embeddings, heads, losses) are not counted: a plan "fits" when
its total is at most 90 % of the GPU.

Per GPU, with P parameters (P_t trainable), N GPUs, AdamW (two fp32 moments per trainable weight):
  DDP      weights 4 P; gradients 4 P_t; optimizer 8 P_t; bf16 autocast keeps a 2-byte copy (2 P_g) of
           every trainable weight (its cast is cached until the autocast region ends) and of every frozen
           weight that runs with autograd (saved for the input's gradient); with activation checkpointing
           the frozen weights' copies only outside the checkpointed blocks + one block's
           (autocast_copies; EA-WM's frozen 10 B base: 19.5 GiB without checkpointing, 0.8 with)
  FSDP2    weights 4 P / N + the unsharded working set, in bf16: the root unit + 2 block units
           (current + prefetched); gradients 4 P_t / N + one unit's unsharded gradient; optimizer 8 P_t / N

Activations of one transformer block, per sample (bytes; L tokens of width D, FFN width F, Lc context
tokens of its cross-attention):

    A_block = L (a D + f F) + c Lc D        (+ 27 r per token for each LoRA rank r, bf16)

with (a, f, c) counted from the tensors autograd saves for one block of this repository's code with a
fused attention kernel (no L x L matrix) -- tests/test_fullscale.py recounts them on a small block:

    block (file)                     bf16 compute (a, f, c)   fp32 compute (a, f, c)
    Cosmos block (agra.CosmosBlock)       126, 4, 12              152, 8, 20     (per-token fp32 modulation)
    Wan block (common.WanBlock)            70, 4, 12               96, 8, 20
    MV-WAM MoT layer (mvwam.ExpertBlock)  102, 4, 12              128, 8, 20     (a Wan block with per-token
                                                                                 modulation in a shared attention)
    self-attention block (agra.SABlock)    16, 4, 0                32, 8, 0
    GR00T action block (agra.ActionBlock)  28, 4, 8                56, 8, 16     (context width 2 D)
    event fusion (eawm.EventFusion)        72, 6, 0               112, 12, 0     (F = event_dim)

With activation checkpointing a block keeps only its input (L D elements of s bytes; a fusion layer
both streams') and one block at a time is recomputed in backward: A = sum_blocks L D s + max_block A_block,
plus, for MV-WAM and EA-WM, each stream's per-token modulation e0 (fp32 L x 6 x D, an input of every block).

Checked on an H200 (bench.py --preset full --device cuda, bf16, random weights; README "Measured on a GPU"):
the memory the forward keeps for backward against activations + autocast copies, without checkpointing,
AGRA 1.03 (batch 2), MV-WAM 0.99 / 0.98 (batch 4 / 8; 1.29 before the MoT row above was measured); a train
step's peak against the total, AGRA 0.92 / 0.91 (batch 2 / 8), MV-WAM 0.92 (batch 4), with checkpointing MV-WAM 1.04
(batch 64), EA-WM stage 1 1.02 (batch 1; 0.82 before the checkpointing rules above).
"""
from __future__ import annotations

import math

import torch

from common import fsdp_units

ACT = {"cosmos": {2: (126, 4, 12), 4: (152, 8, 20)},
       "wan": {2: (70, 4, 12), 4: (96, 8, 20)},
       "mot": {2: (102, 4, 12), 4: (128, 8, 20)},
       "sa": {2: (16, 4, 0), 4: (32, 8, 0)},
       "action": {2: (28, 4, 8), 4: (56, 8, 16)},
       "fusion": {2: (72, 6, 0), 4: (112, 12, 0)}}
LORA = {2: 27, 4: 44}                        # bytes per token per LoRA rank (LoRA-injected Wan block)
TINY_TEXT = 16                               # tokens of the tiny text encoder (common.TinyTextEncoder)
GiB = 2 ** 30
PER_TOKEN_E0 = ("mvwam", "eawm")             # their Wan blocks' modulation e0 is per token: fp32 (B, L, 6, D) per stream


def block_bytes(kind: str, L: int, D: int, F: int, Lc: int, s: int, lora: int = 0) -> float:
    """A_block (bytes, one sample) of the formula above; s = bytes per element of the compute dtype."""
    a, f, c = ACT[kind][s]
    return L * (a * D + f * F) + c * Lc * D + L * LORA[s] * lora


def block_rows(name: str, cfg) -> list[tuple]:
    """The transformer blocks one loss() call runs with autograd, per sample:
    [(what, count, kind, L, D, F, Lc, lora_rank)]."""
    from data.encode import SIGLIP_TOKENS, TEXT_LEN
    T, h, w = cfg.token_grid
    Nv = T * h * w
    rows = []
    if name == "agra":
        video_grad = cfg.stage != "finetune" and not cfg.freeze_video
        passes = 0 if not video_grad else 1 if cfg.stage == "video" or cfg.agra_pass == "shared" else 2
        Lc = TEXT_LEN if cfg.crossattn_proj_in else TINY_TEXT
        if passes:                                                   # App. A.3: denoising pass + t = 1 pass
            rows.append((f"video DiT blocks ({passes} pass{'es' if passes > 1 else ''})", cfg.video_layers * passes,
                         "cosmos", Nv, cfg.video_dim, int(cfg.video_dim * cfg.mlp_ratio), Lc, 0))
        if cfg.stage != "video":
            rows.append(("bridge project module", cfg.project_layers, "sa", cfg.act_layers * Nv, cfg.bridge_dim,
                         4 * cfg.bridge_dim, 0, 0))
            rows.append(("action DiT blocks", cfg.act_layers * cfg.action_repeats, "action", cfg.horizon + 1, cfg.act_dim,
                         4 * cfg.act_dim, Nv, 0))
    elif name == "mvwam":
        Lc = TEXT_LEN if cfg.text_encoder == "precomputed" else TINY_TEXT
        rows.append(("video expert blocks", cfg.layers, "mot", Nv, cfg.video_dim, cfg.video_ffn, Lc, 0))
        if cfg.stage == "joint":
            n_img = SIGLIP_TOKENS if cfg.image_encoder == "precomputed" else (cfg.height // cfg.image_patch) * (cfg.width // cfg.image_patch)
            rows.append(("action-value expert blocks", cfg.layers, "mot", cfg.horizon + 1 + int(cfg.use_value), cfg.act_width,
                         cfg.act_ffn, max(Lc, n_img), 0))
    elif name == "eawm":
        Lc = TEXT_LEN if cfg.text_encoder == "precomputed" else TINY_TEXT
        rows.append(("video stream blocks", cfg.layers, "wan", Nv, cfg.dim, cfg.ffn_dim, Lc, cfg.lora_rank))
        rows.append(("KVAF stream blocks", cfg.layers, "wan", Nv if cfg.kvaf else cfg.frames, cfg.dim, cfg.ffn_dim, Lc, cfg.lora_rank))
        rows.append(("event-aware fusion", len(cfg.fusion_layers), "fusion", Nv, cfg.dim, cfg.event_dim, 0, 0))
    else:
        raise ValueError(f"unknown model {name!r}")
    return rows


def no_grad_prefixes(name: str, cfg) -> tuple:
    """Parameter-name prefixes of the modules that run without autograd in this stage (frozen teacher,
    AGRA's frozen video DiT, MV-WAM's unused action expert in the video stage)."""
    skip = ["teacher."]
    if name == "agra" and (cfg.stage == "finetune" or cfg.freeze_video):
        skip += ["video.", "text_encoder."]
    if name == "mvwam" and cfg.stage == "video":
        skip += ["action.", "image_encoder."]
    return tuple(skip)


def autocast_copies(name: str, cfg, model, grad_checkpoint: bool) -> int:
    """Weights of which bf16 autocast holds a 2-byte copy through the forward (elements): every trainable
    weight (autocast caches its cast until the autocast region ends) and every frozen weight that runs
    with autograd (its copy is saved for the input's gradient). Under activation checkpointing a frozen
    weight's copy is saved only outside the checkpointed blocks, plus one block's at a time in backward."""
    skip = no_grad_prefixes(name, cfg)
    frozen = {id(p): p.numel() for n, p in model.named_parameters() if not p.requires_grad and not n.startswith(skip)}
    n = sum(p.numel() for p in model.parameters() if p.requires_grad) + sum(frozen.values())
    if not grad_checkpoint:
        return n
    seen, units = set(), []
    for unit in fsdp_units(model):                                  # the transformer blocks (checkpointed)
        ids = {id(p) for m in unit for p in m.parameters() if id(p) in frozen} - seen
        seen |= ids
        units.append(sum(frozen[i] for i in ids))
    return n - sum(units) + max(units, default=0)


def plan(name: str, cfg, model, batch: int, gpus: int = 1, strategy: str = "ddp", dtype=torch.bfloat16,
         grad_checkpoint: bool = False, gpu_gb: float = 80.0) -> dict:
    """The per-GPU memory plan (bytes) of training `model` (built on any device, e.g. meta, with its
    stage's param_groups() applied) with micro-batch `batch` per GPU."""
    from data.encode import clip_shapes
    if strategy not in ("ddp", "fsdp"):
        raise ValueError(f"strategy={strategy!r}; expected 'ddp' or 'fsdp'")
    s = 2 if dtype in (torch.bfloat16, torch.float16) else 4
    P = sum(p.numel() for p in model.parameters())
    Pt = sum(p.numel() for p in model.parameters() if p.requires_grad)
    Pg = autocast_copies(name, cfg, model, grad_checkpoint)
    N = gpus if strategy == "fsdp" else 1
    out = {"model": name, "stage": cfg.stage, "batch": batch, "gpus": gpus, "strategy": strategy, "dtype": str(dtype).split(".")[-1],
           "grad_checkpoint": grad_checkpoint, "gpu_gb": gpu_gb, "params": P, "trainable": Pt}
    if strategy == "ddp":
        fixed = {"weights": 4 * P, "gradients": 4 * Pt, "optimizer": 8 * Pt, "autocast weight copies": 2 * Pg if s == 2 else 0}
    else:
        seen, sizes = set(), []
        for unit in fsdp_units(model):                              # each unit's own parameters, as FSDP2 groups them
            ps = [p for m in unit for p in m.parameters() if id(p) not in seen]
            seen |= {id(p) for p in ps}
            sizes.append((sum(p.numel() for p in ps), sum(p.numel() for p in ps if p.requires_grad)))
        root = P - sum(n for n, _ in sizes)
        big, big_t = max(sizes, default=(0, 0))
        fixed = {"weights": 4 * P / N + s * (root + 2 * big), "gradients": 4 * Pt / N + 4 * big_t, "optimizer": 8 * Pt / N}
    rows = block_rows(name, cfg)
    per_sample, detail = 0.0, []
    full = [(what, n, block_bytes(kind, L, D, F, Lc, s, r), L * D * s * (2 if kind == "fusion" else 1))   # fusion: both streams
            for what, n, kind, L, D, F, Lc, r in rows]
    if grad_checkpoint:
        per_sample = sum(n * inp for _, n, _, inp in full) + max(b for _, _, b, _ in full)
        detail = [(what + " (inputs kept)", n * inp) for what, n, _, inp in full]
        e0 = sum(L * 6 * D * 4 for _, _, kind, L, D, *_ in rows if kind in ("wan", "mot") and name in PER_TOKEN_E0)
        if e0:
            per_sample += e0
            detail.append(("per-token modulation e0 (one per stream)", e0))
        detail.append(("one block recomputed in backward", max(b for _, _, b, _ in full)))
    else:
        per_sample = sum(n * b for _, n, b, _ in full)
        detail = [(what, n * b) for what, n, b, _ in full]
    shapes = clip_shapes(name, cfg)
    batch_bytes = sum(math.prod(sh) * (4 if k in ("latents", "state", "actions", "value", "kvaf_latents", "edls_latents") else s)
                      for k, sh in shapes.items())
    out.update(fixed=fixed, rows=rows, activation_rows=detail, activations_per_sample=per_sample,
               batch_per_sample=batch_bytes, activations=per_sample * batch, batch_bytes=batch_bytes * batch)
    total = sum(fixed.values()) + (per_sample + batch_bytes) * batch
    budget = 0.9 * gpu_gb * GiB
    out.update(total=total, fits=total <= budget,
               max_batch=max(0, int((budget - sum(fixed.values())) // (per_sample + batch_bytes))))
    return out


def format_plan(p: dict) -> str:
    g = lambda b: f"{b / GiB:9.2f} GiB"                                           # noqa: E731
    strat = f"FSDP2 over {p['gpus']} GPUs" if p["strategy"] == "fsdp" else f"DDP ({p['gpus']} GPU{'s' if p['gpus'] > 1 else ''}, full replicas)"
    lines = [f"memory plan per GPU (activations are an estimate): {p['model']}, stage {p['stage']}, micro-batch {p['batch']}, "
             f"{strat}, {p['dtype']}, activation checkpointing {'on' if p['grad_checkpoint'] else 'off'}",
             f"  parameters {p['params'] / 1e9:.3f} B ({p['trainable'] / 1e9:.3f} B trainable)"]
    for k, v in p["fixed"].items():
        lines.append(f"  {k:26s}{g(v)}")
    lines.append(f"  {'activations':26s}{g(p['activations'])}   ({p['activations_per_sample'] / GiB:.3f} GiB per sample)")
    for what, b in p["activation_rows"]:
        lines.append(f"    {what:46s}{b * p['batch'] / GiB:9.2f} GiB")
    lines.append(f"  {'batch (cached features)':26s}{g(p['batch_bytes'])}")
    lines.append(f"  {'total':26s}{g(p['total'])}   of {p['gpu_gb']:g} GiB: {'fits' if p['fits'] else 'does NOT fit'} "
                 f"(90 % budget; largest micro-batch that fits: {p['max_batch']})")
    return "\n".join(lines)
