"""AGRA: "Making Foresight Actionable: Repurposing Representation Alignment in World Action Models"
(Qiu, Li, Chen, Ge, Ge, Liu, 2026; arXiv 2606.12217).

A dual-DiT World Action Model: a Cosmos-Predict2.5-style video DiT predicts the future; a
multi-layer bridge hands its hidden states at several depths to a GR00T-style action DiT that
denoises an action chunk. AGRA adds one auxiliary loss: the video hidden states at ~1/3 depth,
through a small projector, are pulled towards a frozen foundation encoder's patch features
(DINOv2; on the toy world a semantic teacher) by negative cosine similarity, so the features the
action head reads are organized by what things are, not by how they look.

Time convention (all of this file): x_t = (1 - t) x0 + t noise, t = 1 is pure noise, velocity
target v = noise - x0 (Eq. 8-9, 11, 13). GR00T's action head uses t = 1 for clean data; we keep
its architecture and use our convention (its time embedding sees t * 1000 of our t).

Paper -> code
| paper                                   | code                                               |
|-----------------------------------------|----------------------------------------------------|
| Eq. 1  policy a_{1:K} = pi(o_0, s_0, c)  | Model.sample                                       |
| Eq. 2, 12, 15, 17, 20  G_j = Proj_j(H)   | Bridge.forward, ActionBlock (cross-attention)      |
| Eq. 3  teacher features of first frames  | Model.teacher_features, data/toyworld ClipDataset  |
| Eq. 4  interpolate to the token grid     | interpolate_teacher                                |
| Eq. 5  Z_k = P_k(H_k)                    | Model.loss (projectors)                            |
| Eq. 6  L_AGRA = -mean cos                | agra_loss                                          |
| Eq. 7, 18  L = L_vid + l_act L_act + l_agra L_AGRA | Model.loss                               |
| Eq. 8-9  video flow matching             | Model.loss (pass a), VideoDiT                      |
| Eq. 10, 16, 19  hidden states at t = 1   | VideoDiT.forward(layers=...), Model.condition      |
| Eq. 11, 13  action flow matching         | Model.loss, ActionDiT                              |
| Eq. 14  bridge layer indices             | bridge_layers (round, see its docstring)           |
| App. A.1 Cosmos DiT / GR00T head         | VideoDiT, CosmosBlock / ActionDiT, ActionBlock     |
| App. A.2 one t=1 video pass + 4 Euler    | Model.sample                                       |
| App. B.2.2 variants                      | Config.agra_pass / freeze_video / agra_weight=0    |
| App. C.1 sizes, layers [0,4,...,27]      | CONFIGS["full"]                                    |
| App. C.3 stages, LRs, cosine 5 % warm-up | Config.stage, Model.param_groups, Config.lr_*      |
| (ours, toy) stage ground: grounded start | Model.ground_loss                                  |
| Sec. 3.2, 4.2.1, Table 1, Fig. 4c        | cross_attention_maps, attention_metrics,           |
|   attention / interventions / R          |   intervene, intervention_heatmap, sensitivity_ratio|

Shape letters: B batch, C latent channels, T latent frames, h x w token grid per latent frame,
N_v = T*h*w video tokens, D video width, A action-head width, G bridge width, K horizon,
d_a action dim, d_s state dim, d_t teacher dim. "Layer l" means the output of video block l
(0-indexed), the numbering of App. C.1's [0, 4, ..., 27].
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (axis_tables, frame_times, Attention, PixelCodec, RMSNorm, SiglipVisionTower, TinyTextEncoder, add_noise,
                    build_pretrained, check_choice, check_clip_frames, check_layers, check_shape, checkpointed, grid_positions,
                    modulate, read_config, read_weights, referring_loss, rename_keys, resolve_source, rope_3d, sample_mean,
                    sample_t, set_trainable, shift_t, target_mask, timestep_embedding, velocity_target)

# -------------------------------------------------------------------------------------------------
# Config
# -------------------------------------------------------------------------------------------------


@dataclass
class Config:
    # data layout
    height: int = 32                     # frame size (App. C.1: 192 x 336)
    width: int = 32
    frames: int = 9                      # raw frames per clip, 1 + q (T - 1) (App. C.1: 17)
    latent_q: int = 4                    # raw frames per latent frame (VAE temporal stride 4)
    codec_p: int = 2                     # tiny pixel codec space-to-depth (the Wan VAE is 8)
    latent_channels: int = 48            # 3 q p^2 for the pixel codec; 16 for the Wan2.1 VAE
    action_dim: int = 4                  # d_a
    state_dim: int = 4                   # d_s
    horizon: int = 8                     # K (App. C.3: 48 real robot, 16 simulation)
    frame_stride: int = 1                # control steps between video frames (App. C.3: 3, so the 16 future
                                         #   frames span the 48-step chunk; the toy pairs one frame per step)
    vocab: tuple = ()                    # tiny text encoder words (filled from the toy world)
    text_layers: int = 1
    # video DiT, Cosmos-Predict2.5-2B (App. A.1): 28 blocks x 2048, 16 heads x 128, AdaLN-LoRA 256
    video_dim: int = 96                  # 2048 (tiny: 96; still below the 192 codec values per token, see README)
    video_layers: int = 6                # M = 28
    video_heads: int = 3                 # 16 x 128 (tiny: head_dim 32 keeps 5 RoPE frequencies per axis)
    mlp_ratio: float = 4.0
    adaln_lora_dim: int = 32             # 256
    patch: tuple = (1, 2, 2)             # (t, h, w)
    concat_padding_mask: bool = False    # Cosmos adds an all-zero padding-mask channel (18 input ch.)
    text_dim: int = 64                   # cross-attention context width (1024)
    crossattn_proj_in: int = 0           # 100352 = 28 x 3584 Cosmos-Reason features -> Linear + GELU
    rope_theta: float = 10000.0
    rope_scale: tuple = (1.0, 3.0, 3.0)  # NTK factors (t, h, w) of Cosmos-2.5
    cond_t: float = 1e-4                 # timestep of the clean condition frame (Cosmos conditional_frame_timestep)
    video_t_sampler: str = "logit_normal"  # tau_v: Cosmos-Predict2.5's rectified-flow trainer draws
    video_t_shift: float = 5.0           #   sigmoid(N(0, 1)) and maps it through its shift-5 grid (App. B.2.2's
                                         #   "default sampling strategy of Cosmos-Predict2.5-2B"; see Model.loss)
    # action DiT, GR00T-N1.5 style (App. A.1, C.1)
    act_dim: int = 64                    # A: hidden 1024
    act_layers: int = 4                  # N cross-attention blocks: 8
    act_heads: int = 2                   # 32
    bridge_dim: int = 64                 # G: cross-attention dim 2048
    project_layers: int = 1              # shared project module depth: 4 self-attention layers
    project_heads: int = 2               # 32
    bridge_pos_embed: bool = True        # learned (t, h, w) position tables on G_j (ours, not in the paper; README)
    bridge_tokens: str = "all"           # all | current (the tiny preset's): G_j holds only the current frame's tokens (ours:
                                         #   at t = 1 the future tokens barely depend on the scene and dilute it)
    bridge_text: bool = False            # ours, not in the paper (Eq. 15 reads video tokens only): the instruction's
                                         #   context tokens join every G_j before the project module, as GR00T-N1.5's
                                         #   head reads its VLM's language tokens (README: the words reach the head)
    bridge_pos_init: str = "normal"      # their start: normal (N(0, 0.02^2), like the head's) | sincos (sin-cos per
                                         #   axis, a third of the channels each: where a token is, readable at step 0)
    max_grid: tuple = (8, 64, 64)        # (T, h, w) sizes of the bridge position tables
    action_steps: int = 4                # Euler steps at inference (App. A.2)
    action_repeats: int = 1              # action-noise draws per video pass (DiT4DiT's repeated_diffusion_steps; paper: 1)
    action_t_alpha: float = 1.5          # t_a = 0.001 + 0.999 Beta(1.5, 1) (pi0 / GR00T, our convention)
    action_t_beta: float = 1.0
    bridge: str = "multi"                # "multi" (Eq. 14) | "single" (AGRA-BridgeL8: one layer to all blocks)
    bridge_layer_override: tuple = ()    # explicit l_j, replaces bridge_layers(M, N)
    # AGRA (Eq. 3-7)
    agra_weight: float = 0.01            # lambda_agra (App. C.3); 0 = the WAM baseline
    act_weight: float = 1.0              # lambda_act (Eq. 18, App. C.3)
    agra_layers: tuple = (2,)            # S_agra; (8,) of 28 at full size (~1/3 depth; 2 of 6 here)
    agra_pass: str = "action_cond"       # action_cond | video | shared (Table 2)
    agra_distance: str = "cosine"        # cosine (Eq. 6) | mse (a loss variant, not in the paper: see agra_loss)
    teacher: str = "toy"                 # toy (semantic teacher) | dinov2 | siglip (AGRA-SiglipL8, Sec. 4.2.2 b)
    teacher_dim: int = 16                # d_t (DINOv2-B: 768)
    teacher_patch: int = 2               # toy teacher patch (pixels); DINOv2: 14, SigLIP-B/16: 16
    teacher_res: int = 448               # DINOv2 input size (App. C.1); SigLIP: its fixed 224
    teacher_layers: int = 12
    teacher_heads: int = 12
    teacher_ffn: int = 0                 # MLP width; 0 = 4 d_t (DINOv2-g SwiGLU: 4096, SigLIP-so400m: 4304)
    teacher_registers: int = 0           # DINOv2 register tokens (dinov2-with-registers: 4)
    teacher_swiglu: bool = False         # DINOv2-g's SwiGLU MLP
    # pretrained sources of Model.from_pretrained / train.py --pretrained ("" = start fresh)
    video_weights: str = "nvidia/Cosmos-Predict2.5-2B"   # Hub id or local path (App. A.1: Cosmos-Predict2.5-2B)
    video_revision: str = ""             # "" = main (the original .pt); "diffusers/base/post-trained" = diffusers layout
    video_subfolder: str = ""            # "" = base/post-trained (original) or transformer (diffusers)
    teacher_weights: str = "facebook/dinov2-base"        # DINOv2-B (App. C.1); or google/siglip2-base-patch16-224
    proj_dim: int = 128                  # REPA projector width (2048)
    # training (App. C.3)
    stage: str = "joint"                 # video | joint | finetune (App. C.3) | ground (ours, the toy's stand-in for
                                         #   a language-grounded pretrained backbone: Model.ground_loss)
    ground_layer: int = -1               # stage ground: the video layer whose current-frame tokens name the object
    ground_steps: int = 0                # ours, toy only: train.py runs stage ground for this many steps (into
                                         #   <out>/ground, at lr_head) before a fresh joint run on toy-world data
    finetune_steps: int = 0              # train.py follows a fresh joint run with this many steps of stage finetune (App. C.3:
                                         #   2,000 steps with Cosmos frozen, the head alone): joint into <out>/joint, then <out>
    toy_view: str = "wide"               # the toy world train.py generates when no --data is given: wide | close
    toy_distractor_band: str = "any"     #   and where its distractors lie: any | near (data/toyworld.py --view, --distractor-band)
    toy_episodes: int = 400              #   and how many expert demos it holds (train.py --episodes overrides it)
    toy_shape_texture: bool = False      #   and whether each shape has its own surface pattern (data/toyworld.py --shape-texture)
    freeze_video: bool = False           # the "Freeze backbone" variant (finetune implies it)
    lr_video: float = 1e-3               # 1e-5 real robot, 1e-4 simulation
    lr_head: float = 1e-3                # 1e-4
    weight_decay: float = 0.0
    lr_schedule: str = "cosine"
    warmup_frac: float = 0.05            # cosine with 5 % warm-up
    grad_clip: float = 1.0
    batch_size: int = 16
    steps: int = 200                     # joint steps: `--preset scratch` (about 2 CPU minutes); --tiny: 0, --preset long: 1,000

    def __post_init__(self):
        check_choice("stage", self.stage, ("video", "joint", "finetune", "ground"))
        check_choice("agra_pass", self.agra_pass, ("action_cond", "video", "shared"))
        check_choice("agra_distance", self.agra_distance, ("cosine", "mse"))
        check_choice("bridge", self.bridge, ("multi", "single"))
        check_choice("bridge_pos_init", self.bridge_pos_init, ("normal", "sincos"))
        check_choice("bridge_tokens", self.bridge_tokens, ("all", "current"))
        check_choice("toy_view", self.toy_view, ("wide", "close"))
        check_choice("toy_distractor_band", self.toy_distractor_band, ("any", "near"))
        check_choice("teacher", self.teacher, ("toy", "dinov2", "siglip"))
        check_choice("video_t_sampler", self.video_t_sampler, ("uniform", "logit_normal"))
        check_layers("agra_layers", self.agra_layers, self.video_layers)
        check_clip_frames(self.frames, self.latent_q)

    @property
    def latent_frames(self) -> int:
        return 1 + (self.frames - 1) // self.latent_q

    @property
    def token_grid(self) -> tuple[int, int, int]:
        p = self.codec_p                                  # spatial stride of the codec / VAE
        return self.latent_frames // self.patch[0], self.height // p // self.patch[1], self.width // p // self.patch[2]


# -------------------------------------------------------------------------------------------------
# Video DiT, Cosmos-Predict2.5 style (App. A.1). Module names follow Cosmos' MiniTrainDIT keys;
# attention internals use common.Attention's names, mapped by COSMOS_KEY_MAP.
# -------------------------------------------------------------------------------------------------


def adaln_lora(dim: int, rank: int, chunks: int) -> nn.Sequential:
    """SiLU -> Linear(D, r) -> Linear(r, chunks * D), bias-free (Cosmos AdaLN-LoRA)."""
    return nn.Sequential(nn.SiLU(), nn.Linear(dim, rank, bias=False), nn.Linear(rank, chunks * dim, bias=False))


class CosmosMLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.layer1 = nn.Linear(dim, hidden, bias=False)
        self.layer2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.layer2(F.gelu(self.layer1(x)))


class CosmosBlock(nn.Module):
    """x += g * Op(LN(x) (1 + s) + b) for Op in (self-attn, cross-attn, MLP), each with its own
    AdaLN-LoRA modulation; LayerNorms without affine; bias-free linears; per-head q/k RMSNorm."""

    def __init__(self, dim, heads, ctx_dim, mlp_ratio, lora_dim):
        super().__init__()
        self.self_attn = Attention(dim, heads, bias=False, qk_norm="per_head")
        self.cross_attn = Attention(dim, heads, ctx_dim=ctx_dim, bias=False, qk_norm="per_head")
        self.mlp = CosmosMLP(dim, int(dim * mlp_ratio))
        self.adaln_modulation_self_attn = adaln_lora(dim, lora_dim, 3)
        self.adaln_modulation_cross_attn = adaln_lora(dim, lora_dim, 3)
        self.adaln_modulation_mlp = adaln_lora(dim, lora_dim, 3)
        self.dim = dim

    def _mod(self, layer, emb, lora, tokens_per_frame):
        # (B, T, D) -> shift, scale, gate each (B, T*h*w, D): one modulation per latent frame
        m = (layer(emb) + lora).float().repeat_interleave(tokens_per_frame, dim=1)
        return m.chunk(3, dim=-1)

    def forward(self, x, emb, lora, ctx, rope, tokens_per_frame):
        ln = lambda y: F.layer_norm(y.float(), (self.dim,), eps=1e-6)          # noqa: E731
        shift, scale, gate = self._mod(self.adaln_modulation_self_attn, emb, lora, tokens_per_frame)
        x = x + (gate * self.self_attn(modulate(ln(x), shift, scale).type_as(x), rope=rope).float()).type_as(x)
        shift, scale, gate = self._mod(self.adaln_modulation_cross_attn, emb, lora, tokens_per_frame)
        x = x + (gate * self.cross_attn(modulate(ln(x), shift, scale).type_as(x), ctx).float()).type_as(x)
        shift, scale, gate = self._mod(self.adaln_modulation_mlp, emb, lora, tokens_per_frame)
        return x + (gate * self.mlp(modulate(ln(x), shift, scale).type_as(x)).float()).type_as(x)


class TimestepMLP(nn.Module):
    """Cosmos t_embedder.1: linear_1 (D -> D) -> SiLU -> linear_2 (D -> 3D), bias-free; its output is
    the AdaLN-LoRA term shared by all blocks."""

    def __init__(self, dim):
        super().__init__()
        self.linear_1 = nn.Linear(dim, dim, bias=False)
        self.linear_2 = nn.Linear(dim, 3 * dim, bias=False)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class FinalLayer(nn.Module):
    def __init__(self, dim, lora_dim, out):
        super().__init__()
        self.adaln_modulation = adaln_lora(dim, lora_dim, 2)
        self.linear = nn.Linear(dim, out, bias=False)
        self.dim = dim

    def forward(self, x, emb, lora, tokens_per_frame):
        m = (self.adaln_modulation(emb) + lora[..., : 2 * self.dim]).float().repeat_interleave(tokens_per_frame, 1)
        shift, scale = m.chunk(2, dim=-1)
        return self.linear(modulate(F.layer_norm(x.float(), (self.dim,), eps=1e-6), shift, scale).type_as(x))


class VideoDiT(nn.Module):
    """Cosmos-Predict2.5 video DiT. Input channels: latent + condition mask (+ padding mask).

    forward(x (B, C_in, T, H, W), t (B, T) per latent frame, ctx (B, L, ctx)) ->
        (velocity (B, C_out, T, H, W), {layer: hidden (B, N_v, D)} for the requested layers)
    """
    grad_checkpoint = False                                  # recompute each block's activations in backward

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        D, (pt, ph, pw) = cfg.video_dim, cfg.patch
        c_in = cfg.latent_channels + 1 + int(cfg.concat_padding_mask)
        self.x_embedder = nn.Module()
        self.x_embedder.proj = nn.Sequential(nn.Identity(), nn.Linear(c_in * pt * ph * pw, D, bias=False))
        self.t_embedder = nn.Sequential(nn.Identity(), TimestepMLP(D))   # .0 is the parameter-free sinusoid
        self.t_embedding_norm = RMSNorm(D, eps=1e-6)
        ctx_dim = cfg.text_dim
        if cfg.crossattn_proj_in:
            self.crossattn_proj = nn.Sequential(nn.Linear(cfg.crossattn_proj_in, ctx_dim), nn.GELU())
        self.blocks = nn.ModuleList([CosmosBlock(D, cfg.video_heads, ctx_dim, cfg.mlp_ratio, cfg.adaln_lora_dim)
                                     for _ in range(cfg.video_layers)])
        self.final_layer = FinalLayer(D, cfg.adaln_lora_dim, pt * ph * pw * cfg.latent_channels)

    def patchify(self, x):
        # b c (t r)(h m)(w n) -> b (t h w) (c r m n)
        B, C, T, H, W = x.shape
        pt, ph, pw = self.cfg.patch
        x = x.reshape(B, C, T // pt, pt, H // ph, ph, W // pw, pw).permute(0, 2, 4, 6, 1, 3, 5, 7)
        return x.reshape(B, (T // pt) * (H // ph) * (W // pw), C * pt * ph * pw), (T // pt, H // ph, W // pw)

    def unpatchify(self, x, grid):
        # b (t h w) (p1 p2 r C) -> b C (t r) (h p1) (w p2)   (Cosmos' output order)
        T, h, w = grid
        pt, ph, pw = self.cfg.patch
        B, C = x.shape[0], self.cfg.latent_channels
        x = x.reshape(B, T, h, w, ph, pw, pt, C).permute(0, 7, 1, 6, 2, 4, 3, 5)
        return x.reshape(B, C, T * pt, h * ph, w * pw)

    def forward(self, x, t, ctx, layers=()):
        tokens, grid = self.patchify(x)                                  # (B, N_v, C_in p)
        h = self.x_embedder.proj(tokens)                                 # (B, N_v, D)
        sin = timestep_embedding(t, self.cfg.video_dim)                  # (B, T, D) [cos, sin]
        lora = self.t_embedder(sin)                                      # (B, T, 3D)
        emb = self.t_embedding_norm(sin)                                 # (B, T, D)
        if self.cfg.crossattn_proj_in:
            ctx = self.crossattn_proj(ctx)
        tp, hp, wp = grid_positions(*grid, device=x.device)
        rope = (rope_3d(tp, hp, wp, self.cfg.video_dim // self.cfg.video_heads, self.cfg.rope_theta,
                        self.cfg.rope_scale), False)                     # rotate-half layout [t,h,w]*2
        per_frame = grid[1] * grid[2]
        hidden = {"text": ctx} if "text" in layers else {}               # the cross-attention context (bridge_text)
        for i, block in enumerate(self.blocks):
            h = checkpointed(self.grad_checkpoint, block, h, emb, lora, ctx, rope, per_frame)
            if i in layers:
                hidden[i] = h                                            # H_l (Eq. 10)
        out = self.final_layer(h, emb, lora, per_frame)
        return self.unpatchify(out, grid), hidden

    @classmethod
    def from_pretrained(cls, source: str = "nvidia/Cosmos-Predict2.5-2B", revision: str | None = None,
                        subfolder: str | None = None, dtype: torch.dtype | None = None, cfg: Config | None = None) -> "VideoDiT":
        """Cosmos-Predict2.5-2B weights: the original `.pt` (keys under `net.`, revision main, COSMOS_FILE by
        default) or the diffusers layout (revision "diffusers/base/post-trained", subfolder "transformer"),
        from the Hub or a local folder / file. The sizes are those of `cfg` (default CONFIGS["full"]), or of
        the diffusers config.json where there is one. Memory-mapped, in the checkpoint's dtype (bf16)
        unless `dtype` is given. The returned module's .cfg is the config it was built with."""
        diffusers = (revision or "").startswith("diffusers") or subfolder == "transformer"
        patterns = ("config.json", "*.safetensors", "*.safetensors.index.json")
        if not diffusers and not subfolder and not os.path.exists(source):
            subfolder, patterns = COSMOS_FILE.rsplit("/", 1)[0], (COSMOS_FILE.rsplit("/", 1)[1],)
        elif not diffusers:
            patterns = ("*.pt",)
        path = resolve_source(source, revision, subfolder, patterns)
        sd = read_weights(path)
        cfg = copy.deepcopy(cfg or CONFIGS["full"])
        if "patch_embed.proj.weight" in sd:                                  # diffusers names
            sd = rename_keys(sd, COSMOS_DIFFUSERS_KEYS)
            cfg = cosmos_config(cfg, read_config(path), path)
        sd = {cosmos_key_map(k): v for k, v in sd.items()}
        return build_pretrained(lambda: cls(cfg), sd, what=f"Cosmos weights {path}", ignore=COSMOS_IGNORED, dtype=dtype)


COSMOS_FILE = "base/post-trained/81edfebe-bd6a-4039-8c1d-737df1a790bf_ema_bf16.pt"   # nvidia/Cosmos-Predict2.5-2B, main
# Original checkpoint keys VideoDiT does not use: RoPE tables (recomputed each call), training counters,
# Transformer Engine state.
COSMOS_IGNORED = (r"^pos_embedder\.", r"^accum_", r"_extra_state$")
# diffusers CosmosTransformer3DModel name -> the original name (then cosmos_key_map); first matching rule wins.
COSMOS_DIFFUSERS_KEYS = (
    (r"^patch_embed\.proj\.", "x_embedder.proj.1."),
    (r"^time_embed\.t_embedder\.", "t_embedder.1."),
    (r"^time_embed\.norm\.", "t_embedding_norm."),
    (r"^transformer_blocks\.(\d+)\.norm1\.linear_", r"blocks.\1.adaln_modulation_self_attn."),
    (r"^transformer_blocks\.(\d+)\.norm2\.linear_", r"blocks.\1.adaln_modulation_cross_attn."),
    (r"^transformer_blocks\.(\d+)\.norm3\.linear_", r"blocks.\1.adaln_modulation_mlp."),
    (r"^transformer_blocks\.(\d+)\.attn1\.to_out\.0\.", r"blocks.\1.self_attn.output_proj."),
    (r"^transformer_blocks\.(\d+)\.attn2\.to_out\.0\.", r"blocks.\1.cross_attn.output_proj."),
    (r"^transformer_blocks\.(\d+)\.attn1\.to_([qkv])\.", r"blocks.\1.self_attn.\2_proj."),
    (r"^transformer_blocks\.(\d+)\.attn2\.to_([qkv])\.", r"blocks.\1.cross_attn.\2_proj."),
    (r"^transformer_blocks\.(\d+)\.attn1\.norm_([qk])\.", r"blocks.\1.self_attn.\2_norm."),
    (r"^transformer_blocks\.(\d+)\.attn2\.norm_([qk])\.", r"blocks.\1.cross_attn.\2_norm."),
    (r"^transformer_blocks\.(\d+)\.ff\.net\.0\.proj\.", r"blocks.\1.mlp.layer1."),
    (r"^transformer_blocks\.(\d+)\.ff\.net\.2\.", r"blocks.\1.mlp.layer2."),
    (r"^norm_out\.linear_", "final_layer.adaln_modulation."),
    (r"^proj_out\.", "final_layer.linear."),
)

def cosmos_key_map(key: str) -> str:
    """Original Cosmos-Predict2.5 checkpoint key (without `net.`) -> our VideoDiT key."""
    for old, new in ((".q_proj.", ".q."), (".k_proj.", ".k."), (".v_proj.", ".v."), (".output_proj.", ".o."),
                     (".q_norm.", ".norm_q."), (".k_norm.", ".norm_k.")):
        key = key.replace(old, new)
    return key


def cosmos_config(cfg: Config, config: dict, what: str) -> Config:
    """cfg with the video-DiT sizes of a diffusers CosmosTransformer3DModel config.json. diffusers counts
    the condition-mask channel in in_channels and adds the padding mask when concat_padding_mask."""
    if config.get("extra_pos_embed_type") or config.get("img_context_dim_in"):
        raise ValueError(f"{what}: learnable absolute positions / image context (Cosmos-Predict2, Transfer) are "
                         "not part of the Cosmos-Predict2.5 network VideoDiT implements")
    pad = config["in_channels"] + int(config.get("concat_padding_mask", True)) - config["out_channels"] - 1
    if pad not in (0, 1):
        raise ValueError(f"{what}: in_channels {config['in_channels']} is not latent + condition mask (+ padding mask)")
    proj = config.get("use_crossattn_projection", False)
    return dataclasses.replace(
        cfg, video_dim=config["num_attention_heads"] * config["attention_head_dim"], video_heads=config["num_attention_heads"],
        video_layers=config["num_layers"], mlp_ratio=config["mlp_ratio"], adaln_lora_dim=config["adaln_lora_dim"],
        patch=tuple(config["patch_size"]), rope_scale=tuple(config["rope_scale"]), latent_channels=config["out_channels"],
        concat_padding_mask=bool(pad), crossattn_proj_in=config["crossattn_proj_in_channels"] if proj else 0,
        text_dim=config["encoder_hidden_states_channels"] if proj else config["text_embed_dim"])


# -------------------------------------------------------------------------------------------------
# Multi-layer bridge (Eq. 2, 14-15, 20)
# -------------------------------------------------------------------------------------------------


def bridge_layers(M: int, N: int) -> list[int]:
    """Video layer l_j read by action block j (Eq. 14), uniform over depth.

    Eq. 14 writes floor(j (M-1) / (N-1)), which gives [0,3,7,11,15,19,23,27] for M=28, N=8, but
    the layers the authors list in App. C.1 are [0,4,8,12,15,19,23,27]: round(). We use round()
    (it is what was run, and it contains layer 8, where AGRA aligns); half rounds up.
    """
    if N == 1:
        return [M - 1]
    return [int(math.floor(j * (M - 1) / (N - 1) + 0.5)) for j in range(N)]


class SABlock(nn.Module):
    """Pre-norm self-attention transformer block (the project module's layers)."""

    def __init__(self, dim, heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, qk_norm="none")
        self.norm2 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.ff(self.norm2(x))


class Bridge(nn.Module):
    """G_j = Project(Proj_j(H_{l_j})) (Eq. 15), one context per action block j:

      layer_proj[j]   Proj_j: LayerNorm + Linear, video width D -> bridge width G, one per bridged layer
      pos_t/h/w       learned (t, h, w) position tables added to every G_j (bridge_pos_embed; our
                      addition: the video DiT uses RoPE only, so its hidden states carry no absolute
                      position for the action head's cross-attention to read; README, deviations)
      project_norm,   the shared "project module" of App. C.1: LayerNorm + a small self-attention
      project         transformer (GR00T-N1.5's vl-self-attention), with the same weights for every j;
                      it runs on each G_j separately (tokens attend within one layer, never across layers)
      text_proj       bridge_text (ours, not in the paper): LayerNorm + Linear of the instruction's context
                      tokens (hidden["text"], the video DiT's cross-attention context), appended after the
                      video tokens of every G_j before the project module
    """
    grad_checkpoint = False                                  # recompute each project block's activations in backward

    def __init__(self, cfg: Config):
        super().__init__()
        self.layers = list(cfg.bridge_layer_override) or bridge_layers(cfg.video_layers, cfg.act_layers)
        self.current_only = cfg.bridge_tokens == "current"
        if cfg.bridge == "single":                                   # AGRA-BridgeL8: the aligned layer to every block
            self.layers = [cfg.agra_layers[0]] * cfg.act_layers
        self.reads = set(self.layers) | ({"text"} if cfg.bridge_text else set())   # what the video DiT returns for it
        if len(self.layers) != cfg.act_layers:
            raise ValueError(f"bridge needs {cfg.act_layers} layers (one per action block), got {self.layers}")
        G = cfg.bridge_dim
        self.layer_proj = nn.ModuleList([nn.Sequential(nn.LayerNorm(cfg.video_dim), nn.Linear(cfg.video_dim, G))
                                         for _ in self.layers])
        self.pos_embed = cfg.bridge_pos_embed
        if self.pos_embed:
            Tm, hm, wm = cfg.max_grid
            self.pos_t, self.pos_h, self.pos_w = (nn.Parameter(torch.zeros(n, G)) for n in (Tm, hm, wm))   # Model.initialize_weights
        if cfg.bridge_text:
            self.text_proj = nn.Sequential(nn.LayerNorm(cfg.text_dim), nn.Linear(cfg.text_dim, G))
        self.project_norm = nn.LayerNorm(G)
        self.project = nn.ModuleList([SABlock(G, cfg.project_heads) for _ in range(cfg.project_layers)])

    def forward(self, hidden: dict, grid) -> list[torch.Tensor]:
        if self.current_only:                                            # bridge_tokens=current: frame 0's tokens
            grid = (1, *grid[1:])
            hidden = {l: h[:, :grid[1] * grid[2]] if l != "text" else h for l, h in hidden.items()}
        g = torch.stack([proj(hidden[l]) for proj, l in zip(self.layer_proj, self.layers)])   # (N, B, N_v, G) Eq. 15
        N, B = g.shape[:2]
        g = g.flatten(0, 1)                                              # (N B, N_v, G): each G_j on its own
        if self.pos_embed:
            T, h, w = grid
            g = g + (self.pos_t[:T, None, None] + self.pos_h[None, :h, None] + self.pos_w[None, None, :w]).reshape(T * h * w, -1)
        if hasattr(self, "text_proj"):                                  # bridge_text: [video tokens, text tokens]
            g = torch.cat([g, self.text_proj(hidden["text"]).repeat(N, 1, 1)], 1)
        g = self.project_norm(g)                                         # the project module, shared by all j
        for block in self.project:
            g = checkpointed(self.grad_checkpoint, block, g)
        return list(g.unflatten(0, (N, B)).unbind(0))                    # N x (B, N_v, G)


# -------------------------------------------------------------------------------------------------
# Action DiT, GR00T-N1 style (App. A.1, C.1): [state token, action tokens], per block adaLN(t)
# self-attention, cross-attention to G_j, FFN; output = action velocity (Eq. 13)
# -------------------------------------------------------------------------------------------------


class AdaLayerNorm(nn.Module):
    """LN(x) (1 + scale) + shift with (scale, shift) = Linear(SiLU(temb)) (GR00T order)."""

    def __init__(self, dim):
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)
        self.norm = nn.LayerNorm(dim, eps=1e-5, elementwise_affine=False)

    def forward(self, x, temb):
        scale, shift = self.linear(F.silu(temb)).unsqueeze(1).chunk(2, dim=-1)
        return modulate(self.norm(x), shift, scale)


class ActionBlock(nn.Module):
    def __init__(self, dim, heads, ctx_dim):
        super().__init__()
        self.norm1 = AdaLayerNorm(dim)
        self.attn1 = Attention(dim, heads, qk_norm="none")               # self-attention over state/action tokens
        self.norm2 = AdaLayerNorm(dim)
        self.attn2 = Attention(dim, heads, ctx_dim=ctx_dim, qk_norm="none")  # cross-attention to G_j
        self.norm3 = nn.LayerNorm(dim, elementwise_affine=False)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))

    def forward(self, x, temb, g, attn_out=None):
        x = x + self.attn1(self.norm1(x, temb))
        x = x + self.attn2(self.norm2(x, temb), g, attn_out=attn_out)   # X_j = CrossAttn(Q=X_{j-1}, K=V=G_j) (Eq. 2, 12)
        return x + self.ff(self.norm3(x))


class ActionDiT(nn.Module):
    """f_phi^act(a^tau, s_0, tau, G) -> velocity (B, K, d_a) (Eq. 13)."""
    grad_checkpoint = False                                  # recompute each block's activations in backward

    def __init__(self, cfg: Config):
        super().__init__()
        A = cfg.act_dim
        self.state_encoder = nn.Sequential(nn.Linear(cfg.state_dim, A), nn.ReLU(), nn.Linear(A, A))
        self.action_w1 = nn.Linear(cfg.action_dim, A)                    # GR00T action encoder W1, W2, W3
        self.action_w2 = nn.Linear(2 * A, A)
        self.action_w3 = nn.Linear(A, A)
        self.pos_embed = nn.Embedding(max(cfg.horizon, 16), A)          # N1.5 add_pos_embed on action tokens
        self.timestep_encoder = nn.Sequential(nn.Linear(256, A), nn.SiLU(), nn.Linear(A, A))
        self.transformer_blocks = nn.ModuleList([ActionBlock(A, cfg.act_heads, cfg.bridge_dim) for _ in range(cfg.act_layers)])
        self.norm_out = nn.LayerNorm(A, eps=1e-6, elementwise_affine=False)
        self.proj_out_1 = nn.Linear(A, 2 * A)
        self.proj_out_2 = nn.Linear(A, A)
        self.action_decoder = nn.Sequential(nn.Linear(A, A), nn.ReLU(), nn.Linear(A, cfg.action_dim))

    def forward(self, a_t, t, state, G, attn_out=None):
        B, K, _ = a_t.shape
        t1000 = t * 1000                                                 # our t (1 = noise) on GR00T's 0..1000 scale
        temb = self.timestep_encoder(timestep_embedding(t1000, 256))                    # (B, A)
        tau = timestep_embedding(t1000, self.action_w1.out_features, cos_first=False)  # (B, A) [sin, cos]
        a = self.action_w1(a_t)                                                          # (B, K, A)
        a = self.action_w3(F.silu(self.action_w2(torch.cat([a, tau[:, None].expand_as(a)], -1))))
        a = a + self.pos_embed.weight[:K]
        x = torch.cat([self.state_encoder(state)[:, None], a], 1)                         # (B, 1 + K, A)
        for block, g in zip(self.transformer_blocks, G):
            x = checkpointed(self.grad_checkpoint, block, x, temb, g, attn_out)
        shift, scale = self.proj_out_1(F.silu(temb)).unsqueeze(1).chunk(2, dim=-1)
        x = self.proj_out_2(modulate(self.norm_out(x), shift, scale))
        return self.action_decoder(x[:, 1:])                                              # (B, K, d_a)


# -------------------------------------------------------------------------------------------------
# AGRA loss and teachers (Eq. 3-6)
# -------------------------------------------------------------------------------------------------


def agra_loss(z: torch.Tensor, y: torch.Tensor, eps: float = 1e-8, distance: str = "cosine") -> torch.Tensor:
    """Eq. 6: negative cosine similarity, averaged over all leading dims (k, b, t, u, v).

    cos(x, y) = x.y / (|x| |y| + eps): -1 for identical directions, 0 for orthogonal ones.
    distance="mse" (Config.agra_distance, a variant not in the paper): the squared error of the raw
    features, averaged over k, b, t, u, v and the d_t channels, so P_k must match the teacher's norm
    too. (An MSE between L2-normalized features would be 2 - 2 cos: Eq. 6 again, up to scale.)"""
    if distance == "mse":
        return ((z - y) ** 2).mean()
    cos = (z * y).sum(-1) / (z.norm(dim=-1) * y.norm(dim=-1) + eps)
    return -cos.mean()


def interpolate_teacher(y: torch.Tensor, grid_hw) -> torch.Tensor:
    """Eq. 4: Y (B, T, H_d, W_d, d_t) -> Y~ (B, T, h, w, d_t), bilinear (antialiased when shrinking)."""
    B, T, Hd, Wd, d = y.shape
    x = y.permute(0, 1, 4, 2, 3).reshape(B * T, d, Hd, Wd).float()
    if (Hd, Wd) != tuple(grid_hw):
        shrink = Hd > grid_hw[0] or Wd > grid_hw[1]
        x = F.interpolate(x, size=tuple(grid_hw), mode="bilinear", align_corners=False, antialias=shrink)
    return x.reshape(B, T, d, *grid_hw).permute(0, 1, 3, 4, 2)


def repa_projector(dim: int, hidden: int, out: int) -> nn.Sequential:
    """P_k (Eq. 5) = REPA's MLP: Linear -> SiLU -> Linear -> SiLU -> Linear."""
    return nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, out))


class Dinov2Layer(nn.Module):
    """x += ls1 * attn(norm1(x)); x += ls2 * mlp(norm2(x)); MLP fc1-GELU-fc2, or SwiGLU (DINOv2-g:
    weights_in -> (a, b), silu(a) * b -> weights_out)."""

    def __init__(self, dim, heads, ffn=0, swiglu=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attention = nn.Module()
        self.attention.attention = nn.Module()
        for n in ("query", "key", "value"):
            setattr(self.attention.attention, n, nn.Linear(dim, dim))
        self.attention.output = nn.Module()
        self.attention.output.dense = nn.Linear(dim, dim)
        self.layer_scale1 = nn.Module()
        self.layer_scale1.lambda1 = nn.Parameter(torch.ones(dim))
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Module()
        self.swiglu = swiglu
        if swiglu:
            self.mlp.weights_in, self.mlp.weights_out = nn.Linear(dim, 2 * ffn), nn.Linear(ffn, dim)
        else:
            self.mlp.fc1, self.mlp.fc2 = nn.Linear(dim, ffn or 4 * dim), nn.Linear(ffn or 4 * dim, dim)
        self.layer_scale2 = nn.Module()
        self.layer_scale2.lambda1 = nn.Parameter(torch.ones(dim))
        self.heads = heads

    def forward(self, x):
        a = self.attention.attention
        h = self.norm1(x)
        q, k, v = (m(h).unflatten(-1, (self.heads, -1)).transpose(1, 2) for m in (a.query, a.key, a.value))
        h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        x = x + self.layer_scale1.lambda1 * self.attention.output.dense(h)
        h = self.norm2(x)
        if self.swiglu:
            g, u = self.mlp.weights_in(h).chunk(2, dim=-1)
            h = self.mlp.weights_out(F.silu(g) * u)
        else:
            h = self.mlp.fc2(F.gelu(self.mlp.fc1(h)))
        return x + self.layer_scale2.lambda1 * h


class Dinov2Teacher(nn.Module):
    """Frozen DINOv2 ViT (patch 14), module names = the Hub checkpoint's names (transformers' legacy
    names), so `facebook/dinov2-*` and `facebook/dinov2-with-registers-*` weights load by name
    (from_pretrained). Token order [CLS, registers, patches]; returns the patch features
    `last_hidden_state[:, 1 + registers:]` on an (res/14)^2 grid, the position table (37 x 37 for
    image_size 518) bicubically interpolated as transformers does (antialiased for the register models)."""

    def __init__(self, dim=768, layers=12, heads=12, res=448, ffn=0, registers=0, swiglu=False, image_size=518, patch=14):
        super().__init__()
        self.res, self.patch, self.registers = res, patch, registers
        self.sizes = dict(dim=dim, layers=layers, heads=heads, ffn=ffn, registers=registers, swiglu=swiglu, patch=patch)
        n = image_size // patch                                        # side of the position table
        self.embeddings = nn.Module()
        self.embeddings.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.embeddings.mask_token = nn.Parameter(torch.zeros(1, dim))
        if registers:
            self.embeddings.register_tokens = nn.Parameter(torch.zeros(1, registers, dim))
        self.embeddings.position_embeddings = nn.Parameter(torch.randn(1, 1 + n * n, dim) * 0.02)
        self.embeddings.patch_embeddings = nn.Module()
        self.embeddings.patch_embeddings.projection = nn.Conv2d(3, dim, patch, patch)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList([Dinov2Layer(dim, heads, ffn, swiglu) for _ in range(layers)])
        self.layernorm = nn.LayerNorm(dim, eps=1e-6)
        self.requires_grad_(False)

    def hidden_states(self, pixels):
        """ImageNet-normalized pixels (N, 3, H, W) -> last_hidden_state (N, 1 + registers + h w, D)."""
        x = self.embeddings.patch_embeddings.projection(pixels)                         # (N, D, h, w)
        h, w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        pe = self.embeddings.position_embeddings
        n = math.isqrt(pe.shape[1] - 1)
        grid = pe[:, 1:]
        if (h, w) != (n, n):
            grid = grid.reshape(1, n, n, -1).permute(0, 3, 1, 2).float()
            grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False, antialias=self.registers > 0)
            grid = grid.permute(0, 2, 3, 1).flatten(1, 2).to(pe.dtype)
        x = torch.cat([self.embeddings.cls_token.expand(len(x), -1, -1) + pe[:, :1], x + grid], 1)
        if self.registers:                                               # registers carry no position
            x = torch.cat([x[:, :1], self.embeddings.register_tokens.expand(len(x), -1, -1), x[:, 1:]], 1)
        for layer in self.encoder.layer:
            x = layer(x)
        return self.layernorm(x)

    @torch.no_grad()
    def forward(self, images):                                           # (N, 3, H, W) in [-1, 1]
        x = F.interpolate((images + 1) / 2, size=(self.res, self.res), mode="bicubic", align_corners=False)
        mean = torch.tensor([0.485, 0.456, 0.406], device=x.device).view(1, 3, 1, 1)   # ImageNet statistics
        std = torch.tensor([0.229, 0.224, 0.225], device=x.device).view(1, 3, 1, 1)
        g = self.res // self.patch
        return self.hidden_states((x - mean) / std)[:, 1 + self.registers:].unflatten(1, (g, g))   # (N, g, g, D)

    @classmethod
    def from_pretrained(cls, source: str = "facebook/dinov2-base", revision: str | None = None, subfolder: str | None = None,
                        dtype: torch.dtype | None = None, res: int = 448) -> "Dinov2Teacher":
        """Any DINOv2 size, with or without registers: sizes from config.json (Dinov2Config defaults where a
        key is absent). Takes the Hub's legacy names and transformers-5 module names (DINOV2_KEYS, the
        SwiGLU gate / up halves concatenated back into weights_in)."""
        path = resolve_source(source, revision, subfolder)
        c = read_config(path)
        dim, swiglu = c.get("hidden_size", 768), c.get("use_swiglu_ffn", False)
        ffn = int(dim * c.get("mlp_ratio", 4))
        kw = dict(dim=dim, layers=c.get("num_hidden_layers", 12), heads=c.get("num_attention_heads", 12), res=res,
                  ffn=(int(ffn * 2 / 3) + 7) // 8 * 8 if swiglu else ffn,        # SwiGLU keeps ~2/3 of the width
                  registers=c.get("num_register_tokens", 0), swiglu=swiglu, image_size=c.get("image_size", 224),
                  patch=c.get("patch_size", 14))
        sd = rename_keys(read_weights(path), DINOV2_KEYS)
        for part in ("weight", "bias"):                                     # transformers 5: gate_proj / up_proj
            for k in [k for k in sd if k.endswith(f".mlp.gate_proj.{part}")]:
                sd[k.replace("gate_proj", "weights_in")] = torch.cat([sd.pop(k), sd.pop(k.replace("gate_proj", "up_proj"))])
        return build_pretrained(lambda: cls(**kw), sd, what=f"DINOv2 weights {path}", dtype=dtype)


# transformers >= 5 module names -> the Hub checkpoints' (legacy) names, which Dinov2Teacher uses
DINOV2_KEYS = (
    (r"\.attention\.([qkv])_proj\.", lambda m: f".attention.attention.{dict(q='query', k='key', v='value')[m[1]]}."),
    (r"\.attention\.o_proj\.", ".attention.output.dense."),
    (r"\.mlp\.down_proj\.", ".mlp.weights_out."),
)


def make_teacher(cfg: Config) -> nn.Module | None:
    """A fresh (random) frozen teacher of the configured kind and size, None for the toy teacher."""
    if cfg.teacher == "dinov2":
        return Dinov2Teacher(cfg.teacher_dim, cfg.teacher_layers, cfg.teacher_heads, cfg.teacher_res, cfg.teacher_ffn,
                             cfg.teacher_registers, cfg.teacher_swiglu, patch=cfg.teacher_patch)
    if cfg.teacher == "siglip":
        return SiglipVisionTower(cfg.teacher_dim, cfg.teacher_layers, cfg.teacher_heads, cfg.teacher_ffn or 4 * cfg.teacher_dim,
                                 cfg.teacher_patch, cfg.teacher_res)
    return None


# -------------------------------------------------------------------------------------------------
# The model
# -------------------------------------------------------------------------------------------------


class Model(nn.Module):
    """AGRA world action model: VideoDiT -> Bridge -> ActionDiT, with the AGRA alignment loss."""

    def __init__(self, cfg: Config, video: VideoDiT | None = None, teacher: nn.Module | None = None):
        """`video` / `teacher`: pretrained modules to use as they are (from_pretrained); the rest starts fresh."""
        super().__init__()
        self.cfg = cfg
        codec = PixelCodec(cfg.latent_q, cfg.codec_p)
        # the pixel codec serves the tiny preset; at full size latents come pre-encoded (Wan2.1 VAE, 16 ch)
        self.codec = codec if codec.channels == cfg.latent_channels else None
        if not cfg.crossattn_proj_in:
            self.text_encoder = TinyTextEncoder(list(cfg.vocab), cfg.text_dim, layers=cfg.text_layers)
        self.pretrained = [n for n, m in (("video", video), ("teacher", teacher)) if m is not None]
        self.video = video if video is not None else VideoDiT(cfg)
        self.bridge = Bridge(cfg)
        self.head = ActionDiT(cfg)
        self.projectors = nn.ModuleDict({str(l): repa_projector(cfg.video_dim, cfg.proj_dim, cfg.teacher_dim)
                                         for l in cfg.agra_layers})
        if cfg.teacher != "toy":
            self.teacher = teacher if teacher is not None else make_teacher(cfg)
        if cfg.stage == "ground":                                        # only in that stage (init_ignore)
            self.ground_head = nn.Linear(cfg.video_dim, 1)
        self.initialize_weights()

    @property
    def init_ignore(self) -> tuple:
        """Checkpoint keys train.py --init drops on purpose: a ground-stage run's readout, in a later stage."""
        return () if self.cfg.stage == "ground" else (r"^ground_head\.",)

    def initialize_weights(self):
        """DiT-style: xavier linears, zero biases; adaLN-Zero (blocks start as the identity);
        zero output layers so both flows start by predicting velocity 0. The frozen teacher and the
        pretrained parts keep their weights."""
        keep = {"teacher", *self.pretrained}
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear) and name.split(".")[0] not in keep:
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if "video" not in keep:
            for block in self.video.blocks:                              # gates (and shift/scale) start at 0
                for mod in (block.adaln_modulation_self_attn, block.adaln_modulation_cross_attn, block.adaln_modulation_mlp):
                    nn.init.zeros_(mod[2].weight)
            nn.init.zeros_(self.video.t_embedder[1].linear_2.weight)
            nn.init.zeros_(self.video.final_layer.adaln_modulation[2].weight)
            nn.init.zeros_(self.video.final_layer.linear.weight)
        nn.init.normal_(self.head.pos_embed.weight, std=0.02)
        if self.bridge.pos_embed:
            tables = (self.bridge.pos_t, self.bridge.pos_h, self.bridge.pos_w)
            for p in tables:
                nn.init.normal_(p, std=0.02)
            if self.cfg.bridge_pos_init == "sincos":                    # (drawn first all the same: the rest of the
                with torch.no_grad():                                    #  init sees the same random numbers)
                    for p, x in zip(tables, axis_tables(self.cfg.max_grid, self.cfg.bridge_dim)):
                        p.copy_(x)
        nn.init.zeros_(self.head.action_decoder[2].weight)
        nn.init.zeros_(self.head.action_decoder[2].bias)

    @classmethod
    def from_pretrained(cls, cfg: Config | None = None, dtype: torch.dtype | None = None, **sources) -> "Model":
        """The AGRA model of `cfg` (default CONFIGS["full"]) with Cosmos-Predict2.5-2B as the video DiT and
        a pretrained frozen teacher (DINOv2, or SigLIP for teacher="siglip"); bridge, action head and
        projectors start fresh (App. A.1, C.1). Sources are the Config fields video_weights /
        video_revision / video_subfolder / teacher_weights, overridable as keyword arguments ("" keeps
        that part fresh). Teacher sizes follow its checkpoint. Pretrained tensors stay memory-mapped in
        their dtype (Cosmos: bf16); the model is cast to `dtype`, or to the video checkpoint's dtype."""
        cfg = dataclasses.replace(copy.deepcopy(cfg or CONFIGS["full"]), **sources)
        video = teacher = None
        if cfg.video_weights:
            video = VideoDiT.from_pretrained(cfg.video_weights, cfg.video_revision or None, cfg.video_subfolder or None,
                                             dtype, cfg)
            cfg = video.cfg
        if cfg.teacher_weights and cfg.teacher != "toy":
            if cfg.teacher == "dinov2":
                teacher = Dinov2Teacher.from_pretrained(cfg.teacher_weights, dtype=dtype, res=cfg.teacher_res)
            else:
                teacher = SiglipVisionTower.from_pretrained(cfg.teacher_weights, dtype=dtype)
            k = teacher.sizes                                            # the checkpoint's sizes -> cfg
            cfg = dataclasses.replace(cfg, teacher_dim=k["dim"], teacher_layers=k["layers"], teacher_heads=k["heads"],
                                      teacher_ffn=k["ffn"], teacher_patch=k["patch"], teacher_res=k.get("res", cfg.teacher_res),
                                      teacher_registers=k.get("registers", 0), teacher_swiglu=k.get("swiglu", False))
        model = cls(cfg, video, teacher)
        return model.to(dtype or (next(video.parameters()).dtype if video is not None else torch.float32))

    # ---------------------------------------------------------------- inputs
    def encode(self, batch) -> torch.Tensor:
        """Video latents (B, C, T, h, w): batch['latents'] if given (pre-encoded with the Wan VAE at
        full scale), else the pixel codec on batch['video']."""
        if "latents" in batch:
            return batch["latents"]
        if self.codec is None:
            raise ValueError(f"latent_channels={self.cfg.latent_channels} is not the pixel codec's "
                             f"{3 * self.cfg.latent_q * self.cfg.codec_p ** 2}: pass Wan-VAE latents as batch['latents']")
        check_shape("batch['video']", batch["video"], (None, 3, None, self.cfg.height, self.cfg.width))
        return self.codec.encode(batch["video"])

    def context(self, batch) -> torch.Tensor:
        """Text context (B, L, ctx): precomputed batch['text_emb'] at full scale, else the tiny encoder."""
        if self.cfg.crossattn_proj_in:
            return batch["text_emb"]
        return self.text_encoder(batch["text"])

    def video_input(self, z_t: torch.Tensor) -> torch.Tensor:
        """[z_t, condition mask (1 on latent frame 0), (zero padding mask)] along channels."""
        B, _, T, h, w = z_t.shape
        mask = torch.zeros(B, 1, T, h, w, device=z_t.device, dtype=z_t.dtype)
        mask[:, :, 0] = 1
        parts = [z_t, mask] + ([torch.zeros_like(mask)] if self.cfg.concat_padding_mask else [])
        return torch.cat(parts, 1)

    def video_timesteps(self, n: int, device=None) -> torch.Tensor:
        """tau_v of the denoising pass (B,): Cosmos-Predict2.5's rectified-flow trainer draws u from
        `video_t_sampler` (logit-normal) and reads sigma off its shift-5 grid, sigma ~ shift_t(u, 5)
        (its grid has 1000 discrete steps; we keep t continuous)."""
        return shift_t(sample_t(self.cfg.video_t_sampler, n, device=device), self.cfg.video_t_shift)

    def frame_times(self, t: torch.Tensor, T: int) -> torch.Tensor:
        """(B,) -> (B, T): the given frame 0 clean at cond_t, future frames at t."""
        return frame_times(t, T, self.cfg.cond_t)

    def teacher_features(self, batch) -> torch.Tensor:
        """Eq. 3: features of the first raw frame of each latent frame, (B, T, H_d, W_d, d_t)."""
        if self.cfg.teacher == "toy" or "teacher" in batch:
            return batch["teacher"]                                      # the toy world's, or DINOv2's cached by data/encode.py
        idx = [0] + [1 + (t - 1) * self.cfg.latent_q for t in range(1, self.cfg.latent_frames)]
        frames = batch["video"][:, :, idx]                               # (B, 3, T, H, W)
        B, _, T = frames.shape[:3]
        feats = self.teacher(frames.transpose(1, 2).flatten(0, 1))       # (B T, g, g, d_t)
        return feats.unflatten(0, (B, T))

    # ---------------------------------------------------------------- training loss
    def loss(self, batch):
        """L = L_vid + lambda_act L_act + lambda_agra L_AGRA (Eq. 7, 18). Which video passes run, and
        which hidden states feed the bridge (-> L_act) and the alignment (-> L_AGRA):

          stage / variant                   pass (a) tau_v    pass (b) t = 1   bridge reads  AGRA reads
          video                             L_vid             -                -             -
          joint, agra_pass=action_cond      L_vid             yes              (b)           (b)   (default)
          joint, agra_pass=video            L_vid             yes              (b)           (a)
          joint, agra_pass=shared           L_vid             -                (a)           (a)
          finetune / freeze_video           -                 yes (no grad)    (b)           -     (no L_vid)

        agra_weight = 0 is the WAM baseline (no L_AGRA). Pass (a) noises the future latents at
        tau_v (Eq. 8); pass (b) is the inference-time pass: the current frame clean and the future pure
        noise (Eq. 16, 19). When both run they are one batched forward (the same values as two calls).
        """
        cfg = self.cfg
        if cfg.stage == "ground":
            return self.ground_loss(batch)
        z = self.encode(batch)                                           # (B, C, T, h, w)
        B, T = z.shape[0], z.shape[2]
        ctx = self.context(batch)
        dev = z.device
        video_trainable = cfg.stage != "finetune" and not cfg.freeze_video
        use_action = cfg.stage in ("joint", "finetune")
        use_video_loss = cfg.stage in ("video", "joint") and video_trainable
        use_agra = use_action and video_trainable and cfg.agra_weight > 0
        cond_pass = use_action and cfg.agra_pass != "shared"             # separate t = 1 pass (Eq. 19)
        parts, total = {}, torch.zeros((), device=dev)

        # the video passes, batched along the batch dimension: (a) denoising at tau_v, (b) t = 1
        layers = set()
        if use_action:
            layers |= self.bridge.reads
        if use_agra:
            layers |= set(cfg.agra_layers)
        xs, ts = [], []
        if use_video_loss or not cond_pass:
            tau_v = self.video_timesteps(B, dev)
            noise_a = torch.randn_like(z)
            z_a = add_noise(z, noise_a, self.frame_times(tau_v, T)[:, None, :, None, None])  # Eq. 8; frame 0 ~ clean
            z_a[:, :, 0] = z[:, :, 0]                                    # the condition frame is given exactly
            xs.append(z_a)
            ts.append(self.frame_times(tau_v, T))
        if cond_pass:
            z_b = torch.cat([z[:, :, :1], torch.randn_like(z[:, :, 1:])], 2)   # future latents pure noise
            xs.append(z_b)
            ts.append(self.frame_times(torch.ones(B, device=dev), T))
        with torch.set_grad_enabled(torch.is_grad_enabled() and video_trainable):
            n = len(xs)
            v_hat, hidden = self.video(self.video_input(torch.cat(xs)), torch.cat(ts), ctx.repeat(n, 1, 1), layers)
        hidden_a = {l: h[:B] for l, h in hidden.items()}
        hidden_b = {l: h[-B:] for l, h in hidden.items()}                # == hidden_a when only one pass ran

        if use_video_loss:                                               # Eq. 9, future latent frames only
            target = velocity_target(z, noise_a)
            parts["video"] = F.mse_loss(v_hat[:B, :, 1:].float(), target[:, :, 1:].float())
            total = total + parts["video"]

        grid = tuple(s // p for s, p in zip(z.shape[2:], cfg.patch))    # (T, h, w) token grid
        if use_action:                                                   # Eq. 11, 13, 20
            G = self.bridge(hidden_b if cond_pass else hidden_a, grid)
            a0, state = batch["actions"], batch["state"]
            check_shape("batch['actions']", a0, (B, cfg.horizon, cfg.action_dim))
            R = cfg.action_repeats                                       # R noise draws share one video pass
            keep = batch.get("action_weight")                            # 0: a failing toy demo, not imitated
            if R > 1:
                G = [g.repeat(R, 1, 1) for g in G]
                a0, state = a0.repeat(R, 1, 1), state.repeat(R, 1)
                keep = None if keep is None else keep.repeat(R)
            tau_a = sample_t("beta", B * R, device=dev, alpha=cfg.action_t_alpha, beta=cfg.action_t_beta)
            eps_a = torch.randn_like(a0)
            a_t = add_noise(a0, eps_a, tau_a[:, None, None])             # Eq. 11
            v_act = self.head(a_t, tau_a, state, G)
            parts["action"] = sample_mean((v_act.float() - velocity_target(a0, eps_a).float()) ** 2, keep)   # Eq. 13
            total = total + cfg.act_weight * parts["action"]             # Eq. 18

        if use_agra:                                                     # Eq. 3-6
            source = hidden_b if cfg.agra_pass == "action_cond" else hidden_a
            y = interpolate_teacher(self.teacher_features(batch), grid[1:])          # (B, T, h, w, d_t) Eq. 4
            zs = torch.stack([self.projectors[str(l)](source[l]) for l in cfg.agra_layers])  # (k, B, N_v, d_t) Eq. 5
            parts["agra"] = agra_loss(zs.float(), y.reshape(B, -1, y.shape[-1])[None], distance=cfg.agra_distance)  # Eq. 6
            total = total + cfg.agra_weight * parts["agra"]              # Eq. 7
        return total, {k: v.detach() for k, v in parts.items()}

    def ground_loss(self, batch):
        """Stage "ground" (ours, not in the paper): the toy's stand-in for starting from a video model
        pretrained on text-to-video, which has learned to bind words to the objects they name (Cosmos-
        Predict2.5, Wan2.1); the tiny video DiT starts from scratch, and the WAM losses alone do not teach
        it that binding at a CPU budget (HISTORY.md: "Telling which object the words name"). A referring
        readout: on the inference-time t = 1 pass (Eq. 16), a linear score per current-frame token of layer
        `ground_layer`, softmax over the tokens, cross-entropy against the named object's share of each
        token (batch["target_mask"], the toy world's segmentation of the named object in the current frame).
        Trains the video DiT, the text encoder and the readout; the readout is dropped after this stage."""
        cfg = self.cfg
        mask = target_mask(batch, cfg.height, cfg.width)
        z = self.encode(batch)
        B, _, T, h, w = z.shape
        z1 = torch.cat([z[:, :, :1], torch.randn_like(z[:, :, 1:])], 2)    # the t = 1 pass of inference
        layer = cfg.ground_layer % cfg.video_layers
        _, hidden = self.video(self.video_input(z1), self.frame_times(torch.ones(B, device=z.device), T),
                               self.context(batch), {layer})
        gh, gw = h // cfg.patch[1], w // cfg.patch[2]
        logits = self.ground_head(hidden[layer][:, : gh * gw]).squeeze(-1).float()          # (B, tokens of frame 0)
        return referring_loss(logits, mask, (gh, gw))

    def param_groups(self):
        """Per-module learning rates (App. C.3): the video DiT (+ tiny text encoder) at lr_video,
        bridge + action head + projectors at lr_head. Frozen parts are left out. Stage ground (the stand-in
        for pretraining, from scratch): the video DiT, text encoder and the readout at lr_head."""
        video_trainable = self.cfg.stage != "finetune" and not self.cfg.freeze_video
        head_trainable = self.cfg.stage not in ("video", "ground")
        video = [p for n, p in self.named_parameters() if n.startswith(("video.", "text_encoder.", "ground_head."))]
        head = [p for n, p in self.named_parameters() if n.startswith(("bridge.", "head."))]
        proj = [p for n, p in self.named_parameters() if n.startswith("projectors.")]
        groups = []
        if video_trainable:
            lr = self.cfg.lr_head if self.cfg.stage == "ground" else self.cfg.lr_video
            groups.append({"name": "video", "params": video, "lr": lr})
        if head_trainable:
            groups.append({"name": "head", "params": head, "lr": self.cfg.lr_head})
        if video_trainable and self.cfg.stage == "joint" and self.cfg.agra_weight > 0:
            groups.append({"name": "projectors", "params": proj, "lr": self.cfg.lr_head})
        return set_trainable(self, groups)

    # ---------------------------------------------------------------- inference (App. A.2)
    @torch.no_grad()
    def condition(self, batch, noise: torch.Tensor | None = None, layers=()):
        """The single t = 1 video pass (Eq. 16): latent of the current frame + pure-noise future.

        -> (hidden states {layer: (B, N_v, D)}, velocity (B, C, T, h, w), z_1)."""
        cfg = self.cfg
        z0 = self.encode({"video": batch["video"][:, :, :1]} if "latents" not in batch else batch)[:, :, :1]
        B, C, _, h, w = z0.shape
        if noise is None:
            noise = torch.randn(B, C, cfg.latent_frames - 1, h, w, device=z0.device)
        z1 = torch.cat([z0, noise], 2)
        t = self.frame_times(torch.ones(B, device=z0.device), cfg.latent_frames)
        v, hidden = self.video(self.video_input(z1), t, self.context(batch), self.bridge.reads | set(layers))
        return hidden, v, z1

    @torch.no_grad()
    def denoise_actions(self, hidden, state, noise, steps=None, attn_out=None):
        """Euler from t = 1 (noise) to 0 over `steps` (App. A.2: 4) with the bridge computed once."""
        G = self.bridge(hidden, self.cfg.token_grid)
        steps = steps or self.cfg.action_steps
        a, dt = noise, 1.0 / steps
        for i in range(steps):
            t = torch.full((a.shape[0],), 1.0 - i * dt, device=a.device)
            a = a - dt * self.head(a, t, state, G, attn_out)             # x_{t-dt} = x_t - dt v
        return a

    @torch.no_grad()
    def sample(self, batch, steps=None, generator=None):
        """a_{1:K} = pi(o_0, s_0, c) (Eq. 1): one t = 1 video pass, then `steps` action Euler steps.

        Returns normalized actions (B, K, d_a) and the one-step video estimate x0 = z_1 - v (B, C, T, h, w)."""
        B = batch["state"].shape[0]
        dev = batch["state"].device
        gen_noise = lambda *s: torch.randn(*s, generator=generator).to(dev)  # noqa: E731
        C, (_, h, w) = self.cfg.latent_channels, self.cfg.token_grid
        ph, pw = self.cfg.patch[1:]
        hidden, v, z1 = self.condition(batch, gen_noise(B, C, self.cfg.latent_frames - 1, h * ph, w * pw))
        actions = self.denoise_actions(hidden, batch["state"], gen_noise(B, self.cfg.horizon, self.cfg.action_dim), steps)
        return {"actions": actions, "video_x0": z1 - v}

    @torch.no_grad()
    def sample_video(self, batch, steps: int = 10, generator=None):
        """Full video generation from the current frame (for pictures; the policy does not need it)."""
        cfg = self.cfg
        z0 = self.encode({"video": batch["video"][:, :, :1]} if "latents" not in batch else batch)[:, :, :1]
        B, C, _, h, w = z0.shape
        z = torch.cat([z0, torch.randn(B, C, cfg.latent_frames - 1, h, w, generator=generator).to(z0.device)], 2)
        ctx = self.context(batch)
        for i in range(steps):
            t = torch.full((B,), 1.0 - i / steps, device=z.device)
            v, _ = self.video(self.video_input(z), self.frame_times(t, cfg.latent_frames), ctx)
            z = torch.cat([z0, z[:, :, 1:] - v[:, :, 1:] / steps], 2)
        return self.codec.decode(z).clamp(-1, 1)


# -------------------------------------------------------------------------------------------------
# Diagnostics (Sec. 3.2, 4.2.1, Table 1, Fig. 4c)
# -------------------------------------------------------------------------------------------------


def token_mask(pixel_mask: torch.Tensor, cfg: Config) -> torch.Tensor:
    """Pixel mask (B, T, H, W) -> token mask (B, T, h, w): a token is in if any of its pixels is."""
    _, h, w = cfg.token_grid
    return F.adaptive_max_pool2d(pixel_mask.float().flatten(0, 1)[:, None], (h, w))[:, 0].unflatten(0, pixel_mask.shape[:2]) > 0


@torch.no_grad()
def cross_attention_maps(model: Model, batch, generator=None, focus: dict | None = None) -> torch.Tensor:
    """Action-head cross-attention over the video tokens, averaged over heads and action tokens (the
    state token is left out), per block: (B, N, T, h, w) (Sec. 3.2). The paper does not say at which
    of the 4 Euler steps it reads the maps; we average them over all steps (the contexts G_j are the
    same at every step, only the noisy action queries change). `focus` (a dict, ours, not in the
    paper): filled with "entropy", the entropy of each query's attention over the tokens divided by that
    of the uniform distribution (1 = no token preferred), averaged over steps, blocks, heads, action
    queries and clips, and "entropy_per_block"."""
    cfg = model.cfg
    B = batch["state"].shape[0]
    hidden, _, _ = model.condition(batch, torch.randn(B, cfg.latent_channels, cfg.latent_frames - 1,
                                                      cfg.token_grid[1] * cfg.patch[1], cfg.token_grid[2] * cfg.patch[2],
                                                      generator=generator).to(batch["state"].device))
    attn = []
    model.denoise_actions(hidden, batch["state"], torch.randn(B, cfg.horizon, cfg.action_dim, generator=generator)
                          .to(batch["state"].device), attn_out=attn)
    N = cfg.act_layers
    a = torch.stack(attn).unflatten(0, (-1, N))                          # (steps, N, B, heads, 1 + K, N_v)
    if focus is not None:
        p = a[..., 1:, :].float()
        ent = -(p * p.clamp_min(1e-30).log()).sum(-1) / math.log(p.shape[-1])   # (steps, N, B, heads, K)
        focus["entropy"] = ent.mean().item()
        focus["entropy_per_block"] = ent.mean((0, 2, 3, 4)).tolist()
    T, h, w = cfg.token_grid
    a = a[..., 1:, :(h * w if model.bridge.current_only else T * h * w)].mean((0, 3, 4))   # (N, B, N_v): video tokens
    if a.shape[-1] < T * h * w:                                          # bridge_tokens=current: no mass on the future
        a = F.pad(a, (0, T * h * w - a.shape[-1]))
    return a.transpose(0, 1).unflatten(-1, cfg.token_grid)               # (B, N, T, h, w)


def attention_metrics(attn: torch.Tensor, mask: torch.Tensor) -> dict:
    """Attention-in-Mask Ratio (mass inside the per-frame interaction mask / total mass, higher is
    better) and Centroid Error (distance in grid units between the attention's 2D centroid and the
    mask's centre, per latent frame, averaged; lower is better) (Sec. 4.2.1, Fig. 4c).
    attn (B, T, h, w) >= 0, mask (B, T, h, w) bool."""
    attn = attn.float()
    ratio = (attn * mask).sum((1, 2, 3)) / attn.sum((1, 2, 3)).clamp_min(1e-12)
    h, w = attn.shape[-2:]
    ys = torch.arange(h, dtype=torch.float32).view(h, 1).expand(h, w)
    xs = torch.arange(w, dtype=torch.float32).view(1, w).expand(h, w)

    def centre(m):
        s = m.sum((-1, -2)).clamp_min(1e-12)
        return torch.stack([(m * ys).sum((-1, -2)) / s, (m * xs).sum((-1, -2)) / s], -1)
    valid = mask.flatten(2).any(-1)                                      # frames whose mask is non-empty
    err = (centre(attn) - centre(mask.float())).norm(dim=-1)             # (B, T)
    err = (err * valid).sum(1) / valid.sum(1).clamp_min(1)
    return {"in_mask_ratio": ratio.mean().item(), "centroid_error": err.mean().item()}


def intervene(hidden: dict, tokens: torch.Tensor, kind: str, generator=None) -> dict:
    """Replace the selected tokens (B, N_v bool) of every bridged hidden state (Sec. 3.2, Table 1).

    zero: 0;  mean: the sample's mean token;  shuffle: permute the selected tokens among themselves;
    swap: tokens drawn from the complement (the unselected tokens). One intervention for all layers:
    the permutation / the drawn complement tokens are chosen once per sample and applied to every
    bridged layer, so every action block sees the same edit of the scene."""
    check_choice("intervention", kind, ("zero", "mean", "shuffle", "swap"))
    picks = []                                                           # per sample: (selected, source) indices
    for b in range(tokens.shape[0]):
        idx = tokens[b].nonzero().flatten()
        src = idx
        if kind == "shuffle":
            src = idx[torch.randperm(len(idx), generator=generator)]
        elif kind == "swap":
            comp = (~tokens[b]).nonzero().flatten()
            src = comp[torch.randint(len(comp), (len(idx),), generator=generator)]
        picks.append((idx, src.to(idx.device)))
    out = {}
    for l, h in hidden.items():
        if l == "text":                                                  # bridge_text's instruction tokens: no scene
            out[l] = h
            continue
        new = h.clone()
        for b, (idx, src) in enumerate(picks):
            if len(idx) == 0:
                continue
            if kind == "zero":
                new[b, idx] = 0
            elif kind == "mean":
                new[b, idx] = h[b].mean(0)
            else:
                new[b, idx] = h[b, src]
        out[l] = new
    return out


@torch.no_grad()
def _deviation(model, hidden, batch, tokens, kind, a_noise, a_ref, generator=None):
    a = model.denoise_actions(intervene(hidden, tokens, kind, generator), batch["state"], a_noise)
    return (a - a_ref).flatten(1).norm(dim=-1)                          # Euclidean action deviation (B,)


def _reference(model: Model, batch, generator):
    """The t = 1 hidden states, fixed action noise and the unperturbed actions of an intervention study."""
    cfg = model.cfg
    B, dev = batch["state"].shape[0], batch["state"].device
    T, h, w = cfg.token_grid
    hidden, _, _ = model.condition(batch, torch.randn(B, cfg.latent_channels, T - 1, h * cfg.patch[1], w * cfg.patch[2],
                                                      generator=generator).to(dev))
    a_noise = torch.randn(B, cfg.horizon, cfg.action_dim, generator=generator).to(dev)
    return hidden, a_noise, model.denoise_actions(hidden, batch["state"], a_noise)


@torch.no_grad()
def intervention_heatmap(model: Model, batch, kind: str = "mean", frame: int = -1, generator=None) -> torch.Tensor:
    """Sec. 3.2, Fig. 2 (right): the action deviation when one token of latent frame `frame` (the paper
    shows the last one, "where motion and interaction cues are most pronounced") is intervened on, for
    every token of that frame, min-max normalized per sample: (B, h, w)."""
    cfg = model.cfg
    B, dev = batch["state"].shape[0], batch["state"].device
    T, h, w = cfg.token_grid
    hidden, a_noise, a_ref = _reference(model, batch, generator)
    f = frame % T
    heat = torch.zeros(B, h * w)
    for loc in range(h * w):
        tokens = torch.zeros(B, T, h * w, dtype=torch.bool, device=dev)
        tokens[:, f, loc] = True
        heat[:, loc] = _deviation(model, hidden, batch, tokens.flatten(1), kind, a_noise, a_ref, generator).cpu()
    lo, hi = heat.min(1, keepdim=True).values, heat.max(1, keepdim=True).values
    return ((heat - lo) / (hi - lo).clamp_min(1e-12)).view(B, h, w)


@torch.no_grad()
def sensitivity_ratio(model: Model, batch, kind: str = "mean", draws: int = 4, generator=None) -> float:
    """Matched Sensitivity Ratio R = Delta(I) / Delta(B) (Sec. 4.2.1, Table 1): I = interaction
    tokens (gripper + target object, all latent frames), B = an equally large random set outside I;
    deviations are averaged over samples (and `draws` background sets) before the ratio."""
    cfg = model.cfg
    B = batch["state"].shape[0]
    inter = token_mask(batch["interaction_mask"], cfg).flatten(1).to(batch["state"].device)   # (B, N_v)
    hidden, a_noise, a_ref = _reference(model, batch, generator)
    d_i = _deviation(model, hidden, batch, inter, kind, a_noise, a_ref, generator).mean()
    d_b = 0.0
    for _ in range(draws):
        bg = torch.zeros_like(inter)
        for b in range(B):
            out = (~inter[b]).nonzero().flatten()
            pick = out[torch.randperm(len(out), generator=generator)[: int(inter[b].sum())]]
            bg[b, pick] = True
        d_b += _deviation(model, hidden, batch, bg, kind, a_noise, a_ref, generator).mean() / draws
    return (d_i / max(float(d_b), 1e-12)).item()


# -------------------------------------------------------------------------------------------------
# Presets
# -------------------------------------------------------------------------------------------------

CONFIGS = {
    # the toy world's default run (README "Quickstart"; about 5 minutes on a 2-core CPU): the close view with
    # distractors in the named object's band, 200 steps of stage ground (the stand-in for a language-grounded
    # pretrained backbone), no joint stage (steps=0), then 1,000 steps of stage finetune (App. C.3: the video
    # model frozen, the head alone), the bridge reading the current frame's tokens at sin-cos positions
    # (shift 1: Cosmos' shift 5 compensates for the 720p token count, the toy clips have 192 tokens)
    "tiny": Config(action_repeats=4, video_t_shift=1.0, toy_view="close", toy_distractor_band="near", ground_steps=200,
                   lr_video=1e-4, bridge_tokens="current", bridge_pos_init="sincos", steps=0, finetune_steps=1000),
    # the earlier tiny preset: from scratch in the wide view, both parts at 1e-3, 200 steps (about 2.5 minutes;
    # 2-3 % success on train, HISTORY.md "The earlier default run")
    "scratch": Config(action_repeats=4, video_t_shift=1.0),
}
CONFIGS.update({
    # the comparison recipe (about 20 minutes): App. C.3's three stages after a 300-step ground stage, 1,000 joint
    # steps with the real-robot ratio of learning rates (lr_video = lr_head / 10: where AGRA and the WAM
    # baseline differ), then 2,000 steps of stage finetune (the paper's 2,000 fine-tuning steps)
    "long": dataclasses.replace(CONFIGS["tiny"], ground_steps=300, steps=1000, finetune_steps=2000),
    # the longer default run (9-14 minutes on a 2-core CPU): the tiny preset with 300 ground steps and 4,000 finetune steps
    # (the video DiT frozen after the ground stage throughout: Table 2's "Freeze backbone"; no AGRA loss trains)
    "frozen": dataclasses.replace(CONFIGS["tiny"], ground_steps=300, finetune_steps=4000),
    # the 90 % recipe (16-17 minutes on a 2-core CPU; README "The AGRA default run"): the longer default run on 1,000
    # demos, with 600 ground steps and an action head twice as wide (hidden 128, 4 heads; the video DiT unchanged)
    "frozen_wide": dataclasses.replace(CONFIGS["tiny"], ground_steps=600, finetune_steps=4000, toy_episodes=1000,
                                       act_dim=128, act_heads=4),
    # the comparison recipe at the 90 % recipe's scale (about 21 minutes on a 2-core CPU): frozen_wide with a 500-step
    # joint stage (L_vid + L_AGRA, lr_video = lr_head / 10) between its ground and finetune stages, so that AGRA and
    # the WAM baseline (--set agra_weight=0) differ; frozen_wide is the same run with steps=0 (Table 2's "Freeze backbone")
    "long_wide": dataclasses.replace(CONFIGS["tiny"], ground_steps=600, steps=500, finetune_steps=4000, toy_episodes=1000,
                                     act_dim=128, act_heads=4),
})
CONFIGS.update({
    # the comparison recipe in the world where shapes can be seen (about 29 minutes on a 2-core CPU; README "The AGRA
    # default run"): long_wide on demos whose shapes have their own surface patterns (data/toyworld.py --shape-texture),
    # so that the shape word has something to bind to at 4 x 4 pixels a token; --set agra_weight=0 is its WAM baseline
    "long_wide_tex": dataclasses.replace(CONFIGS["long_wide"], toy_shape_texture=True),
    # App. C.1: Cosmos-Predict2.5-2B (28 x 2048, 16 heads, AdaLN-LoRA 256, Cosmos-Reason text 100352 -> 1024)
    # + 8-block action DiT (32 heads, hidden 1024, cross-attention 2048), project module of 4 layers,
    # AGRA on layer 8 against DINOv2-B, 17 frames at 192 x 336 -> 5 latent frames, K = 48 (real robot),
    # frames every 3 control steps (App. C.3)
    "full": Config(height=192, width=336, frames=17, latent_q=4, codec_p=8, latent_channels=16, action_dim=32,
                   state_dim=64, horizon=48, video_dim=2048, video_layers=28, video_heads=16, adaln_lora_dim=256,
                   concat_padding_mask=True, text_dim=1024, crossattn_proj_in=100352, act_dim=1024, act_layers=8,
                   act_heads=32, bridge_dim=2048, project_layers=4, project_heads=32, agra_layers=(8,),
                   teacher="dinov2", teacher_dim=768, teacher_patch=14, proj_dim=2048, lr_video=1e-5, lr_head=1e-4,
                   frame_stride=3, batch_size=256, steps=60000),
})
