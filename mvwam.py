"""MV-WAM: "Manifold-Aware World Action Model with Value Augmentation" (2026, arXiv 2606.21088):
a video world action model with manifold-aware objectives and progress-valued regulation.

One diffusion transformer made of two experts of equal depth, coupled as a mixture of
transformers (MoT): a Video Expert (Wan2.1-1.3B shapes, image-to-video input) and a narrower
Action-Value Expert. In every layer each expert projects its own tokens to q/k/v, one attention
runs over all tokens under a cross-modality causal mask (video sees only video; state/action see
video and state/action; value sees everything), and each expert continues with its own output
projection, cross-attention and FFN. The two modalities get different objectives: velocity for
video (Eq. 2), the clean endpoint x0 for actions and the value (Eq. 3, without the 1/t^2 weight of
App. F). A value token regresses the Monte-Carlo return (Eq. 4) and drives a rollback controller at
execution time (Sec. 3.2).

Time convention (all of this file): x_t = (1 - t) x0 + t noise, t = 1 is pure noise (Eq. 1, 6);
velocity v = noise - x0; sampling integrates t = 1 -> 0. One t per sample is shared by video and
actions (inference denoises them jointly); the current observation's latent frame is clean, t = 0.

Paper -> code
| paper                                      | code                                                 |
|--------------------------------------------|------------------------------------------------------|
| Eq. 1, 6   flow matching, x_t               | common.add_noise / velocity_target                   |
| Eq. 2      video v-prediction loss          | Model.loss ("video")                                 |
| Eq. 3      action x0-prediction loss        | Model.loss ("action", "value"), Config.action_target |
| Eq. 4      Monte-Carlo value target         | data/toyworld.mc_returns (batch["value"])            |
| Eq. 7, App. F  no 1/t^2 weight              | flow_loss                                            |
| Table 6    v / x0 / eps -> velocity         | common.to_velocity, Model.sample                     |
| Sec. 3.1   Video Expert (WoW-1.3B, I2V)     | common.WanDiT as Model.video, Model.video_input      |
| Sec. 3.1   Action-Value Expert              | ActionValueExpert                                    |
| Sec. 3.1   odd: language, even: image       | ActionValueExpert.context, Config.layer_count_base   |
| Sec. 3.1   shared / separate enc-dec        | ActionValueExpert.{state_action,value}_{encoder,head}|
| Sec. 3.1   MoT + structured causal mask     | mot_mask, Model.forward, Config.action_attention     |
| Sec. 3.1   RoPE scaled 1/4 for actions      | Model.token_layout                                   |
| Sec. 3.2   value-guided rollback, delta     | ValueRollback (rolling buffer), sample.py --rollback |
| Sec. 4.1   768 in a 1536 attention, stages  | CONFIGS["full_video"] / ["full"], Model.param_groups |
| Sec. 4.1   constant 20 % then linear to 0   | Config.lr_schedule / const_frac                      |
| Fig. 3(a) targets, 3(b) steps, 3(c) value   | Config.action_target, sample(steps=), use_value      |
| (ours, toy) stage ground: grounded start    | Model.ground_loss, common.referring_loss             |
| (ours, toy) frozen Video Expert             | Config.freeze_video, ExpertBlock.mot (split)         |
| (ours, toy) action rows read positions      | Config.action_reads_position, Model.position_code    |
| (ours, toy) image features from the Video   | Config.image_encoder="grounded", GroundedImageEncoder,|
|             Expert's grounded tokens        | Model.grounded_image, video_rows / action_rows       |

Two readings this file makes explicit (README, "Choices and deviations"):
- Frame grounding. The mask row of action k allows only latent frames <= 1 + k // 4, but after two
  layers information from later frames reaches action k by two paths: through the other action tokens
  (the paper's "actions see actions", action_attention="full") and through the earlier frames' own
  tokens, which attend to every frame (Wan's bidirectional video attention, video_attention="full").
  action_attention="causal" (action k sees actions <= k, the state sees none) together with
  video_attention="frame_causal" (a video token sees frames <= its own) makes the grounding hold
  through any depth; either alone does not (tested).
- Table 6's x0 row writes v = x_1 - x0_hat with x_1 the starting noise; Model.sample uses
  v = (x_t - x0_hat) / t, the velocity of the straight path through the CURRENT x_t. The two agree at
  t = 1 and along an exact trajectory; after a few inexact Euler steps only the second one corrects
  the drift of x_t instead of steering back towards a noise sample the state has left.

Shape letters: B batch, C latent channels, T latent frames, h x w token grid, N_v = T h w video
tokens, K horizon, D video width, A action-expert width, d_u unified state/action width.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from collections import deque
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (axis_tables, frame_times, PixelCodec, SiglipVisionTower, TinyTextEncoder, WanBlock, WanDiT, WanHead, add_noise,
                    check_choice, check_clip_frames, check_shape, checkpointed, grid_positions, referring_loss, rope_3d,
                    sample_t, sample_mean, set_trainable, shift_t, target_mask, timestep_embedding, to_velocity,
                    velocity_target)

# -------------------------------------------------------------------------------------------------
# Config
# -------------------------------------------------------------------------------------------------


@dataclass
class Config:
    # data layout
    height: int = 32                     # frame size (Sec. 4.1: 240 x 320)
    width: int = 32
    frames: int = 9                      # raw frames per clip = 1 + latent_q * (T - 1)
    latent_q: int = 4                    # raw frames per latent frame (Wan VAE temporal stride 4)
    codec_p: int = 2                     # tiny pixel codec space-to-depth (the Wan VAE is 8)
    latent_channels: int = 48            # 3 q p^2 for the pixel codec; 16 for the Wan2.1 VAE
    mask_channels: int = 4               # I2V mask channels (WoW: 4 = the VAE's temporal stride)
    action_dim: int = 4                  # d_a (paper: the 128-dim RDT unified action space)
    state_dim: int = 4                   # d_s
    unified_dim: int = 0                 # d_u: states and actions are zero-padded to this width (0: max of both)
    horizon: int = 8                     # K (Sec. 4.1: chunk 32)
    vocab: tuple = ()                    # tiny text encoder words (filled from the toy world)
    text_encoder: str = "tiny"           # tiny (trainable) | precomputed (umT5-XXL features in batch["text_emb"])
    text_layers: int = 1
    text_dim: int = 64                   # umT5-XXL: 4096
    # video expert, Wan2.1-T2V-1.3B shapes (30 layers x 1536, 12 heads x 128, FFN 8960)
    video_dim: int = 96                  # D: 1536
    video_ffn: int = 384                 # 8960
    video_heads: int = 3                 # 12 x 128 (tiny: head_dim 32)
    layers: int = 6                      # 30, both experts (Sec. 3.1: identical depth)
    patch: tuple = (1, 2, 2)
    freq_dim: int = 256
    rope_theta: float = 10000.0
    # action-value expert (Sec. 3.1, 4.1)
    act_width: int = 64                  # A: 768 (--tiny: 128)
    act_ffn: int = 256                   # 4480 (Wan's ffn/dim ratio at 768; the paper gives no FFN width)
    act_cross_heads: int = 2             # heads of the expert's own cross-attention (12 x 64)
    image_encoder: str = "tiny"          # tiny (trainable SigLIP2 stand-in) | precomputed (batch["image_emb"]) | siglip (frozen)
                                         #   | grounded (ours, toy: GroundedImageEncoder on the frozen Video Expert's
                                         #   current-frame tokens; image_dim = video_dim, freeze_video)
    image_dim: int = 64                  # SigLIP2-so400m: 1152, SigLIP2-B/16: 768
    image_patch: int = 4                 # tiny image encoder patch (pixels); SigLIP2-B/16: 16
    image_layers: int = 12               # SigLIP2 tower size (image_encoder="siglip"; from its checkpoint)
    image_heads: int = 12
    image_ffn: int = 3072
    image_res: int = 224
    video_image_dim: int = 0             # WoW's image cross-attention input (CLIP ViT-H/14 tokens: 1280); 0 = none
    # pretrained sources of Model.from_pretrained / train.py --pretrained ("" = start fresh)
    video_weights: str = "Wan-AI/Wan2.1-T2V-1.3B"        # Sec. 4.1: WoW-1.3B (a Wan2.1-T2V-1.3B fine-tune); a local path for WoW
    video_revision: str = ""
    video_subfolder: str = ""            # "transformer" for the -Diffusers repos
    image_weights: str = "google/siglip2-base-patch16-224"   # SigLIP2 (Sec. 3.1; the paper does not name the size)
    ground_actions: bool = True          # action k sees latent frames <= the one covering its step (Sec. 3.1)
    action_attention: str = "full"       # full: every action sees every action (Sec. 3.1) | causal: action k sees
                                         #   actions <= k and the state no action
    video_attention: str = "full"        # full: Wan's bidirectional video attention | frame_causal: a video token sees
                                         #   frames <= its own (with causal actions: grounding holds through depth)
    layer_count_base: int = 1            # "language in odd layers" counted from 1 (Sec. 3.1): language in blocks
                                         #   1, 3, 5, ... = 0-indexed 0, 2, 4; 0 counts from 0 (language in 1, 3, ...)
    rope_action_scale: float = 0.25      # temporal RoPE scale of action tokens, 1/4 (Sec. 3.1)
    use_value: bool = True               # value token + value loss (False: Fig. 3(c)'s no-value baseline)
    action_reads_position: bool = False  # ours (toy): the action rows read each video token's value plus a learned
                                         #   map of its sin-cos (t, h, w) position (ActionValueExpert.video_position):
                                         #   the Wan video expert has RoPE only, which puts position in q.k and none in
                                         #   the values, so attention alone can find the named object but not say where
    # objectives (Eq. 2-3, Table 6, App. F)
    action_target: str = "x0"            # x0 | v | eps for action and value tokens (Fig. 3(a))
    video_weight: float = 1.0            # lambda_v
    action_weight: float = 1.0           # lambda_a
    value_weight: float = 1.0            # value tokens share Eq. 3 (App. F); 1 like lambda_a
    x0_weight: str = "none"              # none (App. F: plain x0 MSE) | inv_t2 (Eq. 7: x0 loss in velocity space, 1/t^2)
    independent_t: bool = False          # draw the action/value t independently of the video t
    t_sampler: str = "logit_normal"      # the paper does not name one (Wan's trainer draws shifted t)
    t_shift: float = 1.0                 # for t_sampler="shifted" (Wan: 5)
    sample_steps: int = 5                # joint Euler steps (Fig. 3(b): 5)
    sample_shift: float = 1.0            # shift of the sampling grid
    eps_t_max: float = 0.0               # eps target only: actions / value start at t_max < 1 (0: 1 - 1/(steps + 1));
                                         #   at t = 1 an eps output carries no information (Model.sample)
    # value-guided rollback (Sec. 3.2)
    rollback_delta: float = 0.2          # delta
    max_rollbacks: int = 3               # cap per episode (the paper names none; ours)
    rollback_buffer: int = 8             # length of the rolling (state, action, value) buffer (the paper names none)
    # training (Sec. 4.1)
    stage: str = "joint"                 # video (Video Expert pre-training) | joint | ground (ours, toy only: the
                                         #   stand-in for a language-grounded pretrained Video Expert, Model.ground_loss)
    ground_layer: int = -1               # stage ground: the video block whose current-frame tokens name the object
    ground_steps: int = 0                # ours, toy only: train.py runs stage ground for this many steps (into
                                         #   <out>/ground, at lr_head) before a fresh joint run on toy-world data
    toy_view: str = "wide"               # the toy world train.py generates when no --data is given: wide | close
    toy_distractor_band: str = "any"     #   and where its distractors lie: any | near (data/toyworld.py)
    toy_episodes: int = 400              #   and how many expert demos it holds (train.py --episodes overrides it)
    toy_shape_texture: bool = False      #   and whether each shape has its own surface pattern (data/toyworld.py --shape-texture)
    freeze_video: bool = False           # ours (toy): stage joint trains the action-value expert (+ image encoder) alone
                                         #   on a frozen Video Expert and text encoder, without L_v (Eq. 2); AGRA's
                                         #   "Freeze backbone" (App. B.2.2) for MV-WAM. Stages video / ground ignore it
    lr_video: float = 1e-3               # 1e-4
    lr_head: float = 1e-3                # action-value expert + encoders: 1e-4
    weight_decay: float = 1e-2           # AdamW 1e-2
    lr_schedule: str = "constant_then_linear"
    const_frac: float = 0.2              # constant for 20 % of the steps, then linear decay to 0
    warmup_frac: float = 0.0
    grad_clip: float = 1.0
    batch_size: int = 16                 # 1024 (video stage) / 512 (joint stage)
    steps: int = 200                     # the `--preset scratch` run (--tiny: 900); paper: 20k (video) / 15k (joint stage)

    def __post_init__(self):
        check_choice("stage", self.stage, ("video", "joint", "ground"))
        check_choice("toy_view", self.toy_view, ("wide", "close"))
        check_choice("toy_distractor_band", self.toy_distractor_band, ("any", "near"))
        check_choice("action_target", self.action_target, ("x0", "v", "eps"))
        check_choice("x0_weight", self.x0_weight, ("none", "inv_t2"))
        if self.x0_weight == "inv_t2" and self.action_target != "x0":
            raise ValueError(f"x0_weight='inv_t2' re-weights the x0 loss (Eq. 7); action_target is {self.action_target!r}, "
                             f"set action_target=x0 or x0_weight=none")
        check_choice("image_encoder", self.image_encoder, ("tiny", "precomputed", "siglip", "grounded"))
        if self.image_encoder == "grounded" and (self.image_dim != self.video_dim or not self.freeze_video):
            raise ValueError(f"image_encoder='grounded' reads the frozen Video Expert's tokens: it needs image_dim = video_dim "
                             f"and freeze_video=true; got image_dim={self.image_dim}, video_dim={self.video_dim}, "
                             f"freeze_video={self.freeze_video}")
        check_choice("text_encoder", self.text_encoder, ("tiny", "precomputed"))
        check_choice("t_sampler", self.t_sampler, ("uniform", "logit_normal", "shifted"))
        check_choice("action_attention", self.action_attention, ("full", "causal"))
        check_choice("video_attention", self.video_attention, ("full", "frame_causal"))
        check_choice("layer_count_base", self.layer_count_base, (0, 1))
        check_clip_frames(self.frames, self.latent_q)
        if self.horizon > (self.frames - 1):
            raise ValueError(f"horizon={self.horizon} actions need {self.horizon} predicted frames; frames={self.frames}")
        if self.video_dim % self.video_heads or (self.video_dim // self.video_heads) % 2:
            raise ValueError(f"video_dim={self.video_dim} must split into {self.video_heads} heads of even width")

    @property
    def latent_frames(self) -> int:
        return 1 + (self.frames - 1) // self.latent_q

    @property
    def video_frozen(self) -> bool:
        return self.freeze_video and self.stage == "joint"

    @property
    def d_u(self) -> int:
        return self.unified_dim or max(self.action_dim, self.state_dim)

    @property
    def token_grid(self) -> tuple[int, int, int]:
        p = self.codec_p
        return self.latent_frames // self.patch[0], self.height // p // self.patch[1], self.width // p // self.patch[2]


CONFIGS = {
    # the toy world's default run (README "The MV-WAM default run"; 3.7-4.8 minutes measured on a 2-core CPU): AGRA's
    # tiny recipe, i.e. the close view with distractors in the named object's band, 200 steps of stage ground
    # (the stand-in for WoW's text-to-video pretraining), then 900 joint steps of an action-value expert twice the
    # earlier toy width (act_width 128; the earlier 64 is `--preset narrow`) alone on the frozen grounded Video
    # Expert, reading where each video token is, its image features taken from the grounded Video Expert
    # (GroundedImageEncoder); one joint denoising step at inference (Fig. 3(b)'s 1-step variant: the frozen Video
    # Expert was never trained to generate the future)
    "tiny": Config(toy_view="close", toy_distractor_band="near", ground_steps=200, freeze_video=True,
                   action_reads_position=True, image_encoder="grounded", image_dim=96, sample_steps=1, steps=900,
                   act_width=128, act_ffn=512, act_cross_heads=4),
    # the previous default run: ground 300 steps, then 1,000 joint steps with the Video Expert trained at a tenth
    # of the head's learning rate (Sec. 4.1 trains both at 1e-4 from a pretrained Video Expert), 5 steps
    "joint": Config(toy_view="close", toy_distractor_band="near", ground_steps=300, lr_video=1e-4, steps=1000),
    # the earlier tiny preset: from scratch in the wide view, both experts at 1e-3, 200 steps
    "scratch": Config(),
    # Sec. 4.1, joint vision-action fine-tuning: Wan2.1-T2V-1.3B video expert with the WoW I2V input
    # (16 noisy + 4 mask + 16 condition-latent channels = 36), 768-wide action-value expert, 240 x 320
    # frames, chunk 32, batch 512, 15k steps, LR 1e-4, AdamW weight decay 1e-2
    "full": Config(height=240, width=320, frames=33, codec_p=8, latent_channels=16, action_dim=128, state_dim=128,
                   horizon=32, text_encoder="precomputed", text_dim=4096, video_dim=1536, video_ffn=8960, video_heads=12, layers=30,
                   act_width=768, act_ffn=4480, act_cross_heads=12, image_encoder="precomputed", image_dim=1152,
                   lr_video=1e-4, lr_head=1e-4, batch_size=512, steps=15000),
}
# the previous default run (HISTORY.md "The 58 % default run (`--preset narrow`)"): the same with the action-value expert at the toy's
# base width (64) for 1,000 steps
CONFIGS["narrow"] = replace(CONFIGS["tiny"], act_width=64, act_ffn=256, act_cross_heads=2, steps=1000)
# the 90 % recipe (about 21 minutes on a 2-core CPU; README "The longer MV-WAM recipe"): the default run on 1,000 demos,
# with 600 ground steps and 5,000 joint steps (the same wide action-value expert and Video Expert)
CONFIGS["frozen_wide"] = replace(CONFIGS["tiny"], ground_steps=600, toy_episodes=1000, steps=5000)
# Sec. 4.1, Video Expert pre-training (stage 1, action-free video + text): batch 1024, 20k steps, LR 1e-4
CONFIGS["full_video"] = replace(CONFIGS["full"], stage="video", batch_size=1024, steps=20000)


# -------------------------------------------------------------------------------------------------
# The cross-modality causal mask (Sec. 3.1)
# -------------------------------------------------------------------------------------------------

VIDEO, STATE, ACTION, VALUE = 0, 1, 2, 3
POSITION_CODE = 48                                       # width of the sin-cos (t, h, w) code of action_reads_position


def mot_mask(kind: torch.Tensor, frame: torch.Tensor, ground: bool = True, causal_actions: bool = False,
             causal_video: bool = False) -> torch.Tensor:
    """(L, L) bool, True = row token may attend to column token, from per-token modality labels
    `kind` (L,) and latent-frame indices `frame` (L,) (openpi's make_att_2d_masks idea):

      video        -> video only (video generation stays uncontaminated by actions)
                      (causal_video: only frames <= its own)
      state/action -> video (frames <= its own frame if `ground`) + state + action
                      (causal_actions: only the state / action tokens at or before its own position,
                      so the state sees no action and action k sees actions 0..k)
      value        -> everything

    A row's grounding holds for one layer; after two, later frames reach action k through action
    j > k and through earlier frames' tokens. causal_actions and causal_video close both paths.
    """
    row, col = kind[:, None], kind[None, :]
    earlier = frame[None, :] <= frame[:, None]                                 # column frame <= row frame
    video_col = col == VIDEO
    if ground:
        video_col = video_col & earlier
    video_video = (row == VIDEO) & (col == VIDEO)
    if causal_video:
        video_video = video_video & earlier
    sa_row = (row == STATE) | (row == ACTION)
    sa_col = (col == STATE) | (col == ACTION)
    if causal_actions:                                  # token order is [video | state, a_0 .. a_K-1 | value]
        pos = torch.arange(len(kind), device=kind.device)
        sa_col = sa_col & (pos[None, :] <= pos[:, None])
    return video_video | (sa_row & (video_col | sa_col)) | (row == VALUE)


# -------------------------------------------------------------------------------------------------
# Action-Value Expert (Sec. 3.1)
# -------------------------------------------------------------------------------------------------


def mlp(i: int, o: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(i, o), nn.SiLU(), nn.Linear(o, o))


class TinyImageEncoder(nn.Module):
    """Patch embedding + one transformer layer over the current frame: (B, 3, H, W) -> (B, N, dim).
    The tiny preset's trainable stand-in for SigLIP2."""

    def __init__(self, res: tuple[int, int], patch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, patch)
        self.pos = nn.Parameter(torch.randn((res[0] // patch) * (res[1] // patch), dim) * 0.02)
        self.layer = nn.TransformerEncoderLayer(dim, 2, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.norm = nn.LayerNorm(dim)

    def forward(self, img):
        x = self.proj(img).flatten(2).transpose(1, 2) + self.pos
        return self.norm(self.layer(x))


class ExpertBlock(WanBlock):
    """A block of the Action-Value Expert: a WanBlock (same parameters) whose `mot` runs one
    mixture-of-transformers layer together with the Video Expert's block of the same depth."""

    def mot(self, video_block: WanBlock, xv, xa, e0_v, e0_a, ctx_v, ctx_a, rope_v, rope_a, mask, img_v=None,
            video_frozen: bool = False, video_position=None):
        """Per-expert QKV -> one shared attention under the cross-modality mask -> per-expert output,
        cross-attention and FFN (Sec. 3.1). xv (B, N_v, D), xa (B, N_o, A) -> both updated. img_v: the
        video expert's image context when it has WoW's image cross-attention, else None.

        The video rows attend to video columns only (mot_mask), so the shared attention is also two: the video
        rows over the video tokens, the other rows over all. That split runs when
          video_frozen (training with freeze_video): the video rows outside autograd, the backward pass
                        covers the action rows alone (the same values as the shared attention);
          video_position (1, heads, N_v, d), action_reads_position: added to the video values the other rows
                        read (the video rows read theirs unchanged)."""
        bv, ba, Nv = video_block, self, xv.shape[1]
        if video_frozen or video_position is not None:
            with torch.set_grad_enabled(torch.is_grad_enabled() and not video_frozen):
                xv, kv, vv = video_rows(bv, xv, e0_v, ctx_v, rope_v, mask[:Nv, :Nv], img_v)
            return xv, ba.action_rows(kv, vv, xa, e0_a, ctx_a, rope_a, mask[Nv:], video_position)
        mv = bv.modulation_terms(e0_v)
        qv, kv, vv = bv.self_attn.qkv(bv.attn_input(xv, mv), rope=rope_v)        # per-expert QKV, (B, heads, N_v, d)
        ma = ba.modulation_terms(e0_a)
        qa, ka, va = ba.self_attn.qkv(ba.attn_input(xa, ma), rope=rope_a)        # A -> video attention width, (B, heads, N_o, d)
        out = F.scaled_dot_product_attention(torch.cat([qv, qa], 2), torch.cat([kv, ka], 2),
                                             torch.cat([vv, va], 2), attn_mask=mask)   # one shared attention, (B, heads, L, d)
        out = out.transpose(1, 2).flatten(2)                                     # (B, L, heads d)
        xv = bv.finish(xv, bv.self_attn.o(out[:, :Nv]), mv, ctx_v, img_v)         # per-expert output, cross-attn, FFN
        xa = ba.finish(xa, ba.self_attn.o(out[:, Nv:]), ma, ctx_a)                # heads d -> A
        return xv, xa

    def video_rows(self, video_block: WanBlock, xv, e0_v, ctx_v, rope_v, mask_v, img_v=None, keep=None):
        """`video_rows` of the Video Expert's block of this depth, called through this block (FSDP2 gathers the
        layer's parameters on its registered methods: train.shard)."""
        return video_rows(video_block, xv, e0_v, ctx_v, rope_v, mask_v, img_v, keep)

    def action_rows(self, kv, vv, xa, e0_a, ctx_a, rope_a, mask_o, video_position=None):
        """The state / action / value rows of one MoT layer given the video tokens' keys and values kv, vv
        (B, heads, N_v, d) of this layer: their attention over [video, own tokens] under mask_o (N_o, L)."""
        ma = self.modulation_terms(e0_a)
        qa, ka, va = self.self_attn.qkv(self.attn_input(xa, ma), rope=rope_a)    # A -> video attention width
        vv = vv if video_position is None else vv + video_position
        out = F.scaled_dot_product_attention(qa, torch.cat([kv, ka], 2), torch.cat([vv, va], 2), attn_mask=mask_o)
        return self.finish(xa, self.self_attn.o(out.transpose(1, 2).flatten(2)), ma, ctx_a)


def video_rows(block: WanBlock, xv, e0_v, ctx_v, rope_v, mask_v, img_v=None, keep: int | None = None):
    """The video rows of one MoT layer (the video expert's block over the video tokens alone: the mask lets them
    see nothing else) -> (updated xv, this layer's video keys kv and values vv, each (B, heads, N_v, d)).
    keep: the updated rows of the first `keep` tokens only, (B, keep, D) (the keys and values still cover every
    token), for a last block of which the caller reads no more (the same values as those rows of the full block)."""
    mv = block.modulation_terms(e0_v)
    qv, kv, vv = block.self_attn.qkv(block.attn_input(xv, mv), rope=rope_v)
    if keep is not None:                                 # attention, output, cross-attention and FFN of these rows alone
        qv, xv, mv = qv[:, :, :keep], xv[:, :keep], tuple(m[:, :keep] for m in mv)
        mask_v = None if mask_v is None else mask_v[:keep]
        if keep == 0:
            return xv, kv, vv
    out = F.scaled_dot_product_attention(qv, kv, vv, attn_mask=mask_v).transpose(1, 2).flatten(2)
    return block.finish(xv, block.self_attn.o(out), mv, ctx_v, img_v), kv, vv


class GroundedImageEncoder(nn.Module):
    """image_encoder="grounded" (ours, toy only): the action-value expert's image features of the current
    observation, read from the frozen grounded Video Expert instead of a SigLIP2 stand-in trained from scratch:
    the current frame's tokens after video block `ground_layer` (where stage ground taught them which object
    the words name) plus a learned map of their sin-cos (h, w) position, through one self-attention layer
    (trainable) in which a token can take where the named object is from the object's own tokens. That mixing
    is what AGRA's bridge project module does (a self-attention over positioned video features); without it the
    action rows had to attend sharply to the object's tokens to read its place, and did not learn to (README,
    MV-WAM deviations). (B, N, video_dim) tokens, (N, POSITION_CODE) code -> (B, N, video_dim)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.position = nn.Linear(POSITION_CODE, dim, bias=False)
        self.layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)

    def forward(self, tokens, code):
        return self.layer(tokens + self.position(code))


class ActionValueExpert(nn.Module):
    """Same depth as the video expert, own parameters, width A. Its self-attention projects q/k/v
    into the video expert's attention width and heads (768 -> 1536 -> 768, Sec. 4.1). Its blocks
    cross-attend to language in odd layers and to image features of the current observation in even
    layers, counting layers from `layer_count_base` (the paper's reading, 1: language in the first
    block). State and action tokens share one encoder and decoder; the value token has its own
    (Sec. 3.1). Per-token timesteps: the state token is clean (t = 0)."""

    def __init__(self, cfg: Config):
        super().__init__()
        A = cfg.act_width
        self.freq_dim, self.width, self.base = cfg.freq_dim, A, cfg.layer_count_base
        self.state_action_encoder = mlp(cfg.d_u, A)
        self.state_action_head = WanHead(A, cfg.d_u)
        if cfg.use_value:
            self.value_encoder = mlp(1, A)
            self.value_head = WanHead(A, 1)
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, A), nn.SiLU(), nn.Linear(A, A))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(A, 6 * A))
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, A), nn.GELU(approximate="tanh"), nn.Linear(A, A))
        self.image_embedding = nn.Sequential(nn.Linear(cfg.image_dim, A), nn.GELU(approximate="tanh"), nn.Linear(A, A))
        self.blocks = nn.ModuleList([ExpertBlock(A, cfg.act_ffn, cfg.video_heads, attn_dim=cfg.video_dim,
                                                 cross_heads=cfg.act_cross_heads) for _ in range(cfg.layers)])
        if cfg.action_reads_position:                    # ours: per layer, sin-cos (t, h, w) code -> a value offset
            self.video_position = nn.ModuleList([nn.Linear(POSITION_CODE, cfg.video_dim, bias=False)
                                                 for _ in range(cfg.layers)])

    def time(self, t):
        """t (B, L) -> e (B, L, A), e0 (B, L, 6, A)."""
        e = self.time_embedding(timestep_embedding(1000 * t.flatten().float(), self.freq_dim)).unflatten(0, t.shape)
        return e.float(), self.time_projection(e).unflatten(-1, (6, self.width)).float()

    def context(self, text, image):
        """Per-layer cross-attention context: language in odd layers, image features in even layers,
        layer numbers starting at `layer_count_base` (block i is layer i + base)."""
        text, image = self.text_embedding(text), self.image_embedding(image)
        return [text if (i + self.base) % 2 == 1 else image for i in range(len(self.blocks))]


def widen_patch_embedding(video: WanDiT, in_dim: int, generator: torch.Generator | None = None):
    """WoW's T2V -> I2V conversion of the patch embedding: in_dim input channels (16 noisy + 4 mask + 16
    condition = 36), the pretrained kernel on the first channels, N(0, 0.02) on the new ones, the bias
    kept. A no-op when the embedding already has in_dim channels (a WoW checkpoint)."""
    old = video.patch_embedding
    if old.in_channels == in_dim:
        return
    if old.in_channels > in_dim:
        raise ValueError(f"the video checkpoint's patch embedding has {old.in_channels} input channels, more than the "
                         f"{in_dim} of the MV-WAM video input")
    new = nn.Conv3d(in_dim, old.out_channels, old.kernel_size, old.stride, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.normal_(0.0, 0.02, generator=generator)
        new.weight[:, :old.in_channels] = old.weight
        new.bias.copy_(old.bias)
    video.patch_embedding = new
    video.sizes["in_dim"] = in_dim


# -------------------------------------------------------------------------------------------------
# Losses
# -------------------------------------------------------------------------------------------------


def flow_loss(pred, x0, noise, target: str, weight: torch.Tensor | None = None,
              keep: torch.Tensor | None = None) -> torch.Tensor:
    """MSE in the output's own parameterization (Table 6): v -> noise - x0 (Eq. 2), x0 -> x0 (Eq. 3,
    with no 1/t^2 weight, App. F / Eq. 7), eps -> noise. `weight` (B,): an optional per-sample factor
    (Config.x0_weight="inv_t2" passes 1/t^2, which turns the x0 loss into Eq. 7's velocity-space loss).
    `keep` (B,): which samples count (batch["action_weight"]: 0 for a failing toy demo), see sample_mean."""
    goal = {"v": velocity_target(x0, noise), "x0": x0, "eps": noise}[target]
    err = (pred.float() - goal.float()) ** 2
    if weight is not None:
        err = err * weight.float().reshape(-1, *[1] * (err.dim() - 1))
    return sample_mean(err, keep)


# -------------------------------------------------------------------------------------------------
# Model
# -------------------------------------------------------------------------------------------------


class Model(nn.Module):
    """MV-WAM: Video Expert + Action-Value Expert as a mixture of transformers."""
    grad_checkpoint = False                                  # recompute each MoT layer's activations in backward

    def __init__(self, cfg: Config, video: WanDiT | None = None, image_encoder: nn.Module | None = None):
        """`video` / `image_encoder`: pretrained modules to use as they are (from_pretrained); the rest starts fresh."""
        super().__init__()
        self.cfg = cfg
        codec = PixelCodec(cfg.latent_q, cfg.codec_p)
        self.codec = codec if codec.channels == cfg.latent_channels else None      # tiny: pixel codec; full: Wan VAE latents
        C = cfg.latent_channels
        if cfg.text_encoder == "tiny":                                             # full size: umT5 features in the batch
            self.text_encoder = TinyTextEncoder(list(cfg.vocab), cfg.text_dim, layers=cfg.text_layers)
        self.pretrained = [n for n, m in (("video", video), ("image_encoder", image_encoder)) if m is not None]
        if cfg.image_encoder == "tiny":
            self.image_encoder = TinyImageEncoder((cfg.height, cfg.width), cfg.image_patch, cfg.image_dim)
        elif cfg.image_encoder == "siglip":                                        # frozen SigLIP2 (Sec. 3.1)
            self.image_encoder = image_encoder if image_encoder is not None else SiglipVisionTower(
                cfg.image_dim, cfg.image_layers, cfg.image_heads, cfg.image_ffn, cfg.image_patch, cfg.image_res)
        elif cfg.image_encoder == "grounded":                                      # ours, toy: from the Video Expert
            self.image_encoder = GroundedImageEncoder(cfg.video_dim, cfg.video_heads)
        # Video Expert: WoW-1.3B = Wan2.1-T2V-1.3B with a 36-channel I2V patch embedding (noisy + mask + condition)
        self.video = video if video is not None else WanDiT(
            2 * C + cfg.mask_channels, C, cfg.video_dim, cfg.video_ffn, cfg.video_heads, cfg.layers, cfg.text_dim, cfg.patch,
            cfg.freq_dim, rope_theta=cfg.rope_theta, image_dim=cfg.video_image_dim or None)
        self.action = ActionValueExpert(cfg)
        if cfg.stage == "ground":                                                  # only in that stage (init_ignore)
            self.ground_head = nn.Linear(cfg.video_dim, 1)
        self.initialize_weights()

    @property
    def init_ignore(self) -> tuple:
        """Checkpoint keys train.py --init drops on purpose: a ground-stage run's readout, in a later stage."""
        return () if self.cfg.stage == "ground" else (r"^ground_head\.",)

    def initialize_weights(self):
        """Wan-style: xavier linears with zero biases, N(0, 0.02) time embeddings; zero output heads so
        every stream starts by predicting 0. A pretrained video expert (WoW-1.3B / Wan2.1-1.3B,
        from_pretrained) and the frozen SigLIP2 keep their weights."""
        keep = set(self.pretrained) | ({"image_encoder"} if self.cfg.image_encoder == "siglip" else set())
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear) and name.split(".")[0] not in keep:
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        experts = ([self.video] if "video" not in keep else []) + [self.action]
        for emb in (e.time_embedding for e in experts):
            for m in emb:
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=0.02)
        heads = [self.action.state_action_head] + ([self.action.value_head] if self.cfg.use_value else [])
        heads += [self.video.head] if "video" not in keep else []
        for h in heads:
            nn.init.zeros_(h.head.weight)
            nn.init.zeros_(h.head.bias)

    @classmethod
    def from_pretrained(cls, cfg: Config | None = None, dtype: torch.dtype | None = None, **sources) -> "Model":
        """MV-WAM of `cfg` (default CONFIGS["full"]) with the Video Expert from WoW-1.3B or Wan2.1-T2V-1.3B
        and a frozen SigLIP2 image encoder; the Action-Value Expert starts fresh (Sec. 3.1, 4.1). Sources
        are the Config fields video_weights / video_revision / video_subfolder / image_weights, overridable
        as keyword arguments ("" keeps that part fresh). The expert sizes follow the checkpoints. A
        16-channel T2V patch embedding is widened to 2 C + 4 = 36 input channels as WoW does it
        (widen_patch_embedding); WoW's own 36-channel one is used as it is, with its image
        cross-attention if it has one (then batch["clip_emb"] feeds it). Pretrained tensors stay
        memory-mapped; the model is cast to `dtype`, or to the video checkpoint's dtype."""
        cfg = dataclasses.replace(copy.deepcopy(cfg or CONFIGS["full"]), **sources)
        video = image = None
        if cfg.video_weights:
            video = WanDiT.from_pretrained(cfg.video_weights, cfg.video_revision or None, cfg.video_subfolder or None, dtype)
            k = video.sizes
            cfg = dataclasses.replace(cfg, video_dim=k["dim"], video_ffn=k["ffn_dim"], video_heads=k["heads"], layers=k["layers"],
                                      text_dim=k["text_dim"], patch=k["patch"], freq_dim=k["freq_dim"],
                                      latent_channels=k["out_dim"], video_image_dim=k["image_dim"] or 0)
            widen_patch_embedding(video, 2 * cfg.latent_channels + cfg.mask_channels)
        if cfg.image_weights:
            image = SiglipVisionTower.from_pretrained(cfg.image_weights, dtype=dtype)
            k = image.sizes
            cfg = dataclasses.replace(cfg, image_encoder="siglip", image_dim=k["dim"], image_layers=k["layers"],
                                      image_heads=k["heads"], image_ffn=k["ffn"], image_patch=k["patch"], image_res=k["res"])
        model = cls(cfg, video, image)
        return model.to(dtype or (next(video.parameters()).dtype if video is not None else torch.float32))

    # ---------------------------------------------------------------- inputs
    def encode(self, batch) -> torch.Tensor:
        """Video latents (B, C, T, h, w): batch['latents'] (Wan-VAE latents at full size) or the pixel codec."""
        if "latents" in batch:
            return batch["latents"]
        if self.codec is None:
            raise ValueError(f"latent_channels={self.cfg.latent_channels} is not the pixel codec's "
                             f"{3 * self.cfg.latent_q * self.cfg.codec_p ** 2}: pass Wan-VAE latents as batch['latents']")
        check_shape("batch['video']", batch["video"], (None, 3, None, self.cfg.height, self.cfg.width))
        return self.codec.encode(batch["video"])

    def text_context(self, batch) -> torch.Tensor:
        """Language features (B, L, text_dim), shared by both experts: the tiny encoder or umT5 features."""
        return self.text_encoder(batch["text"]) if self.cfg.text_encoder == "tiny" else batch["text_emb"]

    def image_context(self, batch) -> torch.Tensor | None:
        """Image features of the current observation (B, N, image_dim), for the action-value expert only
        (None for image_encoder="grounded": Model.forward computes them from its own video rows)."""
        if self.cfg.image_encoder == "grounded":
            return None
        if self.cfg.image_encoder == "tiny":
            return self.image_encoder(batch["video"][:, :, 0])
        if self.cfg.image_encoder == "siglip":
            return self.image_encoder(batch["video"][:, :, 0]).flatten(1, 2)      # (B, g g, D) SigLIP2 patch tokens
        return batch["image_emb"]                                               # SigLIP2 features of the current frame

    def video_input(self, z_t, z_cond):
        """WoW / Wan2.1 I2V input: [noisy latents, mask (1 on the condition frame), condition latents
        (the current frame's latent in frame 0, zeros after)] along channels: C + q + C channels."""
        B, C, T, h, w = z_t.shape
        mask = torch.zeros(B, self.cfg.mask_channels, T, h, w, device=z_t.device, dtype=z_t.dtype)
        mask[:, :, 0] = 1
        y = torch.zeros_like(z_t)
        y[:, :, :1] = z_cond
        return torch.cat([z_t, mask, y], 1)

    def token_layout(self, device):
        """Modality label, latent frame and RoPE (t, h, w) position of every token of the joint sequence

            [ video: T x h x w tokens | state | a_0 ... a_K-1 | value ]        L = T h w + 1 + K (+ 1)

        with K = 8, q = 4 (the tiny preset; the paper: K = 32, one latent frame per 4 steps):

            latent frame (mask)   0 | 1 1 1 1 | 2 2 2 2        a_k is grounded in frame 1 + k // q
            RoPE time             0 | 1  1.25  1.5  1.75 | 2  2.25  2.5  2.75   a_k at 1 + k / q
                                  ^ state (and value) at 0

        Video tokens sit on their integer grid. The other tokens share the temporal grid scaled by
        1/4 (Sec. 3.1): the state at t = 0 (the current frame), action k (0-indexed) at
        t = 1 + k * rope_action_scale (one latent frame spans 4 steps; action k produces raw frame k+1,
        which lies in latent frame 1 + k // q), the value at t = 0 (it scores the current state and
        chunk). Spatially all of them sit at the centre of the h x w grid (our choice; the paper does
        not say), so no side of the image is favoured. The value's `frame` is T (after every frame);
        its row sees everything anyway.
        """
        cfg = self.cfg
        T, h, w = cfg.token_grid
        t_v, y_v, x_v = grid_positions(T, h, w, device)
        K = cfg.horizon
        k = torch.arange(K, device=device)
        t_o = torch.cat([torch.zeros(1, device=device), 1 + k * cfg.rope_action_scale]
                        + ([torch.zeros(1, device=device)] if cfg.use_value else []))
        kind = torch.cat([torch.full((T * h * w,), VIDEO), torch.tensor([STATE]), torch.full((K,), ACTION)]
                         + ([torch.tensor([VALUE])] if cfg.use_value else [])).to(device)
        frame = torch.cat([t_v, torch.zeros(1, dtype=torch.long, device=device), 1 + k // cfg.latent_q]
                          + ([torch.full((1,), T, device=device)] if cfg.use_value else []))
        n_o = t_o.shape[0]
        t = torch.cat([t_v.double(), t_o.double()])
        y = torch.cat([y_v.double(), torch.full((n_o,), (h - 1) / 2, dtype=torch.float64, device=device)])
        x = torch.cat([x_v.double(), torch.full((n_o,), (w - 1) / 2, dtype=torch.float64, device=device)])
        return kind, frame, (t, y, x)

    def position_code(self, device) -> torch.Tensor:
        """(N_v, POSITION_CODE): the sum of sin-cos codes of each video token's (t, h, w) grid position, in the
        video tokens' order (action_reads_position)."""
        T, h, w = self.cfg.token_grid
        ct, ch, cw = axis_tables((T, h, w), POSITION_CODE, max_period=100.0)
        return (ct[:, None, None] + ch[None, :, None] + cw[None, None, :]).flatten(0, 2).to(device)

    # ---------------------------------------------------------------- forward (one MoT pass)
    def forward(self, z_t, t_video, z_cond, state, a_t, c_t, t_act, text, image, with_action: bool = True, clip=None,
                upto: int | None = None):
        """One pass of both experts.

        z_t (B, C, T, h, w) noisy latents (frame 0 = the clean condition), t_video (B, T) per-frame t,
        state (B, d_s), a_t (B, K, d_a) noisy actions, c_t (B,) noisy value, t_act (B,) their t,
        text (B, L, text_dim), image (B, N, image_dim), clip (B, 257, video_image_dim): the image tokens
        of a video expert with WoW's image cross-attention (batch["clip_emb"]), else None.
        -> video output (B, C, T, h, w) (a velocity; None when training on a frozen Video Expert, whose loss
        has no L_v), actions (B, K, d_a) and value (B,) in `action_target` parameterization (None when
        with_action=False: the video expert alone, which the mask makes identical to its rows of the joint pass). upto (with with_action=False): stop
        after video block `upto` and return its current-frame tokens (B, h w, D) (the only ones stage ground and
        the grounded image reader read) in place of the video output.
        """
        cfg, V = self.cfg, self.video
        xv, grid = V.embed(self.video_input(z_t, z_cond))                    # (B, N_v, D)
        e_v, e0_v = V.time(t_video, grid)                                    # (B, N_v, D), (B, N_v, 6, D)
        ctx_v, img_v = V.text_embedding(text), V.image_context(clip)         # (B, L_text, D), WoW's image tokens or None
        kind, frame, (pt, py, px) = self.token_layout(z_t.device)            # each (L,), L = N_v + N_o
        hd = cfg.video_dim // cfg.video_heads
        angles = rope_3d(pt, py, px, hd, cfg.rope_theta)                     # (L, hd/2)
        Nv = xv.shape[1]
        mask = mot_mask(kind, frame, cfg.ground_actions, cfg.action_attention == "causal",
                        cfg.video_attention == "frame_causal")              # (L, L)
        _, gh, gw = cfg.token_grid
        if not with_action:
            video_mask = mask[:Nv, :Nv] if cfg.video_attention == "frame_causal" else None
            if upto is not None:                        # ground_loss, the grounded reader: frame 0 after block `upto`
                for block in V.blocks[:upto]:
                    xv = checkpointed(self.grad_checkpoint, block, xv, e0_v, ctx_v, rope=(angles[:Nv], True),
                                      mask=video_mask, ctx_img=img_v)
                tokens, _, _ = checkpointed(self.grad_checkpoint, self.action.blocks[upto].video_rows, V.blocks[upto], xv,
                                            e0_v, ctx_v, (angles[:Nv], True), video_mask, img_v, gh * gw)   # via the layer (FSDP2)
                return tokens, None, None
            for block in V.blocks:
                xv = checkpointed(self.grad_checkpoint, block, xv, e0_v, ctx_v, rope=(angles[:Nv], True), mask=video_mask,
                                  ctx_img=img_v)
            return V.unpatchify(V.head(xv, e_v), grid), None, None

        AV, B, K = self.action, z_t.shape[0], cfg.horizon
        pad = lambda x: F.pad(x, (0, cfg.d_u - x.shape[-1]))                # noqa: E731  (unified width)
        xa = [AV.state_action_encoder(pad(state)[:, None]), AV.state_action_encoder(pad(a_t))]
        ta = [torch.zeros(B, 1, device=z_t.device), t_act[:, None].expand(B, K)]
        if cfg.use_value:
            xa.append(AV.value_encoder(c_t[:, None, None]))
            ta.append(t_act[:, None])
        xa = torch.cat(xa, 1)                                                # (B, N_o, A), N_o = 1 + K (+1)
        e_a, e0_a = AV.time(torch.cat(ta, 1))                                # (B, N_o, A), (B, N_o, 6, A)
        rope_v, rope_a = (angles[:Nv], True), (angles[Nv:], True)
        frozen = cfg.video_frozen and torch.is_grad_enabled()               # the video rows outside autograd
        code = self.position_code(z_t.device) if cfg.action_reads_position else None      # (N_v, POSITION_CODE)
        pos = [None if code is None else AV.video_position[i](code).unflatten(-1, (cfg.video_heads, -1)).transpose(0, 1)[None]
               for i in range(len(AV.blocks))]                               # (1, heads, N_v, d) per layer
        if image is None and cfg.image_encoder == "grounded":
            # the video rows of every layer first (frozen: the mask lets them see video only), then the image
            # features from block ground_layer's current-frame tokens, then the action rows: one video pass.
            # Training (frozen, no L_v) reads of the last block's video rows only the keys and values, and the
            # current frame's tokens if it is block ground_layer: its other rows are not computed
            kvs, ground, last = [], cfg.ground_layer % cfg.layers, len(V.blocks) - 1
            with torch.no_grad():
                for i, (bv, ba) in enumerate(zip(V.blocks, AV.blocks)):
                    keep = (gh * gw if ground == last else 0) if frozen and i == last else None
                    xv, kv, vv = ba.video_rows(bv, xv, e0_v, ctx_v, rope_v, mask[:Nv, :Nv], img_v, keep)
                    kvs.append((kv, vv))
                    if i == ground:
                        tokens = xv
            image = self.grounded_image(tokens)                              # the reader trains (outside no_grad)
            ctx_a = AV.context(text, image)                                  # per block: (B, L_text or N_img, A)
            for i, ba in enumerate(AV.blocks):
                xa = checkpointed(self.grad_checkpoint, ba.action_rows, *kvs[i], xa, e0_a, ctx_a[i], rope_a, mask[Nv:], pos[i])
        else:
            ctx_a = AV.context(text, image)                                  # per block: (B, L_text or N_img, A)
            for i, (bv, ba) in enumerate(zip(V.blocks, AV.blocks)):          # one MoT layer each (ExpertBlock.mot)
                xv, xa = checkpointed(self.grad_checkpoint, ba.mot, bv, xv, xa, e0_v, e0_a, ctx_v, ctx_a[i], rope_v, rope_a,
                                      mask, img_v, frozen, pos[i])
        video_out = None if frozen else V.unpatchify(V.head(xv, e_v), grid)     # frozen: no L_v reads it
        act = AV.state_action_head(xa[:, 1:1 + K], e_a[:, 1:1 + K])[..., :cfg.action_dim]
        value = AV.value_head(xa[:, -1:], e_a[:, -1:])[:, 0, 0] if cfg.use_value else None
        return video_out, act, value

    def grounded_image(self, tokens: torch.Tensor) -> torch.Tensor:
        """image_encoder="grounded": video block ground_layer's tokens (B, N_v or h w, D) -> the action-value
        expert's image features (B, h w, D) from the current frame's tokens (GroundedImageEncoder)."""
        _, gh, gw = self.cfg.token_grid
        return self.image_encoder(tokens[:, : gh * gw], self.position_code(tokens.device)[: gh * gw])

    def frame_times(self, t: torch.Tensor, T: int) -> torch.Tensor:
        """(B,) -> (B, T): the given frame 0 clean (t = 0), future frames at t."""
        return frame_times(t, T)

    # ---------------------------------------------------------------- training loss
    def loss(self, batch):
        """Eq. 2-3 (+ the value token). Stage "video" (Sec. 4.1's Video Expert pre-training) reads only
        the video (or `latents`) and the text: action-free clips such as egocentric video train it."""
        cfg = self.cfg
        if cfg.stage == "ground":
            return self.ground_loss(batch)
        z = self.encode(batch)                                               # (B, C, T, h, w)
        B, T, dev = z.shape[0], z.shape[2], z.device
        text = self.text_context(batch)
        t = sample_t(cfg.t_sampler, B, device=dev, shift=cfg.t_shift)
        with_action = cfg.stage == "joint"
        # image_encoder="grounded" (frozen Video Expert): the video rows see the sampler's start (the future frames
        # pure noise, t = 1), the video the grounding was trained on and that one-step inference feeds them
        t_v = torch.ones_like(t) if with_action and cfg.image_encoder == "grounded" else t
        noise = torch.randn_like(z)
        z_t = add_noise(z, noise, t_v[:, None, None, None, None])            # Eq. 1 / 6
        z_t[:, :, 0] = z[:, :, 0]                                            # the current observation is given
        a0 = c0 = a_t = c_t = t_a = state = image = None
        if with_action:
            a0, state, image = batch["actions"], batch["state"], self.image_context(batch)
            check_shape("batch['actions']", a0, (B, cfg.horizon, cfg.action_dim))
            check_shape("batch['state']", state, (B, cfg.state_dim))
            t_a = sample_t(cfg.t_sampler, B, device=dev, shift=cfg.t_shift) if cfg.independent_t else t
            eps_a = torch.randn_like(a0)
            a_t = add_noise(a0, eps_a, t_a[:, None, None])
            if cfg.use_value:
                c0 = batch["value"].float()
                eps_c = torch.randn_like(c0)
                c_t = add_noise(c0, eps_c, t_a)
        v_hat, a_hat, c_hat = self(z_t, self.frame_times(t_v, T), z[:, :, :1], state, a_t, c_t, t_a, text, image, with_action,
                                   batch.get("clip_emb"))
        parts, total = {}, torch.zeros((), device=dev)
        if not cfg.video_frozen:
            parts["video"] = F.mse_loss(v_hat[:, :, 1:].float(), velocity_target(z, noise)[:, :, 1:].float())   # Eq. 2
            total = cfg.video_weight * parts["video"]
        if with_action:
            w = t_a.clamp(min=1e-3) ** -2 if cfg.x0_weight == "inv_t2" else None      # Eq. 7 variant (clamped like to_velocity)
            keep = batch.get("action_weight")                                          # failing demos: value only
            parts["action"] = flow_loss(a_hat, a0, eps_a, cfg.action_target, w, keep)       # Eq. 3
            total = total + cfg.action_weight * parts["action"]
            if cfg.use_value:
                parts["value"] = flow_loss(c_hat, c0, eps_c, cfg.action_target, w)          # Eq. 3-4 (value token)
                total = total + cfg.value_weight * parts["value"]
        return total, {k: v.detach() for k, v in parts.items()}

    def ground_loss(self, batch):
        """Stage "ground" (ours, not in the paper, toy only): AGRA's grounded start (agra.Model.ground_loss)
        for the Video Expert, the toy's stand-in for WoW / Wan2.1 pretrained on text-to-video, which binds
        words to the objects they name. On the inference-time start (the current frame given, the future
        frames pure noise at t = 1), a linear score per current-frame token of video block `ground_layer`,
        softmax over the tokens, cross-entropy against the named object's share of each token
        (common.referring_loss). Trains the Video Expert, the text encoder and the readout; the readout is
        dropped after this stage."""
        cfg = self.cfg
        mask = target_mask(batch, cfg.height, cfg.width)
        z = self.encode(batch)
        B, T = z.shape[0], z.shape[2]
        z1 = torch.cat([z[:, :, :1], torch.randn_like(z[:, :, 1:])], 2)    # the start of Model.sample
        layer = cfg.ground_layer % cfg.layers
        tokens, _, _ = self(z1, self.frame_times(torch.ones(B, device=z.device), T), z[:, :, :1], None, None, None, None,
                            self.text_context(batch), None, with_action=False, clip=batch.get("clip_emb"), upto=layer)
        _, gh, gw = cfg.token_grid
        logits = self.ground_head(tokens).squeeze(-1).float()                # (B, tokens of frame 0)
        return referring_loss(logits, mask, (gh, gw))

    def param_groups(self):
        """Stage video: the Video Expert (+ tiny text encoder) alone. Stage joint: the full model,
        video expert at lr_video, action-value expert + image encoder at lr_head (Sec. 4.1); with freeze_video
        the action-value expert + image encoder alone. Stage ground
        (the stand-in for pretraining, from scratch): the Video Expert, text encoder and readout at lr_head."""
        video = [p for n, p in self.named_parameters() if n.startswith(("video.", "text_encoder.", "ground_head."))]
        head = [p for n, p in self.named_parameters() if n.startswith("action.")
                or (n.startswith("image_encoder.") and self.cfg.image_encoder in ("tiny", "grounded"))]   # SigLIP2 stays frozen
        lr = self.cfg.lr_head if self.cfg.stage == "ground" else self.cfg.lr_video
        groups = [] if self.cfg.video_frozen else [{"name": "video", "params": video, "lr": lr}]
        if self.cfg.stage == "joint":
            groups.append({"name": "action_value", "params": head, "lr": self.cfg.lr_head})
        return set_trainable(self, groups)

    def layer_groups(self):
        """The modules that run as one layer (train.py's FSDP2 shards each group as one unit): MoT layer
        i is video block i + action block i, run together by ExpertBlock.mot."""
        return [[bv, ba] for bv, ba in zip(self.video.blocks, self.action.blocks)]

    # ---------------------------------------------------------------- inference (Fig. 3(b), Table 6)
    @torch.no_grad()
    def sample(self, batch, steps=None, generator=None):
        """Jointly denoise future video latents, the action chunk and the value with `steps` Euler
        steps (default 5) of the shared t grid. Video uses its velocity; actions and value convert
        their x0 (or eps) output to a velocity (Table 6): x0 -> (x_t - x0_hat) / t, eps ->
        (eps_hat - x_t) / (1 - t).

        eps target: at t = 1, x_t IS the noise, so an eps output carries no information about x0 and
        the velocity divides its error by 1 - t -> 0 (a 1 % error becomes a jump of ~10 in one step).
        Actions and value therefore run on the same grid clipped at t_max = eps_t_max (default
        1 - 1 / (steps + 1), below the first step of the grid: 0.5 for 1 step, 0.83 for 5), starting
        from t_max * noise, the point of the path at t_max with x0 replaced by its mean 0 (actions are
        normalized). Video starts at t = 1 as always; the two streams keep one model call per step.

        -> actions (B, K, d_a) normalized, video_latents (B, C, T, h, w) (frame 0 = the condition),
           value (B,) (None without a value token)."""
        cfg = self.cfg
        steps = steps or cfg.sample_steps
        state = batch["state"]
        B, dev = state.shape[0], state.device
        z0 = self.encode({"video": batch["video"][:, :, :1]} if "latents" not in batch else batch)[:, :, :1]
        _, C, _, hh, ww = z0.shape
        rand = lambda *s: torch.randn(*s, generator=generator).to(dev)      # noqa: E731
        z = torch.cat([z0, rand(B, C, cfg.latent_frames - 1, hh, ww)], 2)
        t_max = 1.0                                                          # start of the action / value grid
        if cfg.action_target == "eps":
            t_max = cfg.eps_t_max or 1 - 1 / (steps + 1)
        a = t_max * rand(B, cfg.horizon, cfg.action_dim)
        c = t_max * rand(B) if cfg.use_value else None
        text, image = self.text_context(batch), self.image_context(batch)
        if cfg.image_encoder == "grounded" and steps > 1:                     # from the start, fixed over the steps
            tokens, _, _ = self(z, self.frame_times(torch.ones(B, device=dev), cfg.latent_frames), z0, None, None, None,
                                None, text, None, with_action=False, clip=batch.get("clip_emb"), upto=cfg.ground_layer % cfg.layers)
            image = self.grounded_image(tokens)
        ts = torch.linspace(1.0, 0.0, steps + 1)
        if cfg.sample_shift != 1.0:
            ts = shift_t(ts, cfg.sample_shift)
        value = None
        for i in range(steps):
            t, dt = float(ts[i]), float(ts[i + 1] - ts[i])                   # dt < 0
            ta, dta = min(t, t_max), min(float(ts[i + 1]), t_max) - min(t, t_max)   # the action / value grid
            tb, tab = torch.full((B,), t, device=dev), torch.full((B,), ta, device=dev)
            v_hat, a_hat, c_hat = self(z, self.frame_times(tb, cfg.latent_frames), z0, state, a, c, tab, text, image,
                                       clip=batch.get("clip_emb"))
            z = torch.cat([z0, z[:, :, 1:] + dt * v_hat[:, :, 1:]], 2)
            a = a + dta * to_velocity(a_hat, a, tab[:, None, None], cfg.action_target)     # Table 6
            if cfg.use_value:
                c = c + dta * to_velocity(c_hat, c, tab, cfg.action_target)
                value = c
        return {"actions": a, "video_latents": z, "value": value}

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents -> frames (B, 3, frames, H, W) in [-1, 1] (pixel codec; tiny preset)."""
        return self.codec.decode(z).clamp(-1, 1)


# -------------------------------------------------------------------------------------------------
# Value-guided rollback (Sec. 3.2)
# -------------------------------------------------------------------------------------------------


class ValueRollback:
    """Sec. 3.2: a rolling buffer of the last `size` (env state, action chunk, predicted value)
    triplets, one per planned chunk. c_peak is the highest value in the buffer. When a new prediction
    falls below c_peak - delta, `check` returns the state cached with the peak: the caller restores it
    and resamples the chunk from there (diffusion's stochasticity gives a different chunk), and the
    entries after the peak, the abandoned branch, leave the buffer. At most `max_rollbacks` per
    episode. With `size` at least the number of chunks per episode, c_peak = max_{i<t} c_i exactly."""

    def __init__(self, delta: float = 0.2, max_rollbacks: int = 3, size: int = 8):
        self.delta, self.max_rollbacks, self.size = delta, max_rollbacks, size
        self.reset()

    def reset(self):
        self.buffer: deque = deque(maxlen=self.size)       # (state, actions, value), oldest first
        self.count = 0

    @property
    def peak(self) -> float:
        """c_peak over the buffer (-inf when empty)."""
        return max((v for _, _, v in self.buffer), default=-math.inf)

    def check(self, state, value: float, actions=None):
        """Before executing `actions`, planned at `state` with predicted `value`: -> the peak's cached
        state if a rollback is due (c_t < c_peak - delta), else None after recording the triplet."""
        if self.buffer and value < self.peak - self.delta and self.count < self.max_rollbacks:
            i = max(range(len(self.buffer)), key=lambda j: self.buffer[j][2])
            for _ in range(len(self.buffer) - 1 - i):                         # drop the branch after the peak
                self.buffer.pop()
            self.count += 1
            return self.buffer[i][0]
        self.buffer.append((state, actions, value))
        return None
