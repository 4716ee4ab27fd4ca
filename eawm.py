"""EA-WM: an Event-Aware generative World Model conditioned on Structured Kinematic-to-Visual
Action Fields ("EA-WM: Event-Aware Generative World Model with Structured Kinematic-to-Visual Action
Fields", 2026, arXiv 2605.06192).

An action-conditioned robot video generator on a Wan2.2-TI2V backbone. Actions are not fed as
numbers: the commanded joint trajectory is rendered, in the camera's own view, into a KVAF video
(depth-coloured skeleton, joint landmarks, gripper fingers, end-effector heatmap, RGB pose axes;
Sec. 3.1, App. A.2), encoded by the same VAE and processed by a full-depth copy of the DiT blocks.
At a sparse set of layers the two token streams exchange information through gated, bidirectional
cross-attention; the gate comes from an event representation that is also trained to predict the
VAE latent of the frame-difference video (EDLS), so the exchange concentrates where things change.

Time convention (all of this file): x_t = (1 - t) x0 + t noise, t = 1 is pure noise, v = noise - x0.
Timesteps are per latent frame; the first frame (the given observation) is clean, t = 0 (Wan2.2 TI2V).

Our copy of the paper lost its equations; the ones implemented, written from Sec. 3.1-3.2 and App. A.1-A.2:

  (1)  T_l(t) = T_parent(l)(t) . T_static(l) . T_motion(q_l(t))          forward kinematics (URDF)
       gripper g in [0, 1] -> prismatic offset d = d_min + g (d_max - d_min)
  (2)  p_c = R_wc p_w + t_wc;  (u, v) = (f_x x_c / z_c + c_x, f_y y_c / z_c + c_y);  z_c <= 0 dropped
  (3)  K_t = Render(skeleton coloured by colormap((z - z_min) / (z_max - z_min)), landmarks, fingers,
                    H_t(u) = exp(-|u - u_ee|^2 / 2 s^2) for |u - u_ee| <= 3 s (else 0), axes p_ee + a R e_i)
  (4)  e = MLP([h_v, h_k]);  g = sigmoid(W_g e + b_g)  (one gate per token);  e_hat = W_e e + b_e
  (5)  h_v <- h_v + g * CrossAttn(h_v <- h_k)
  (6)  h_k <- h_k + g * CrossAttn(h_k <- h_v)          (both from the pre-fusion tokens)
  (7)  d_t = o_t - o_{t-1} (d_0 = 0);  z_d = VAE(d / 2), patchified to the token grid
  (8)  L = w(t) (||v_hat_x - v_x||^2 + ||v_hat_k - v_k||^2) + lambda_e mean_{l in S} ||e_hat_l - z_d||^2 / s
       first latent frame excluded; w(t) = common.bell_weight (Wan / DiffSynth trainer weight), or
       (tiny preset, ours) w(t) = t^2 / Z (common.x0_space_weight: the error of the implied clean clip);
       s = mean z_d^2 of the batch (edls_normalize, ours) or 1

Paper -> code
| paper                                 | code                                              |
|---------------------------------------|---------------------------------------------------|
| Eq. 1-3, App. A.2 KVAF rendering      | render_kvaf                                       |
| App. A.3 action recovery (analysis)   | recover_ee_track                                  |
| Sec. 3.2 video stream (Wan2.2 TI2V)   | Model.video (common.WanDiT, Wan names)            |
| Sec. 3.2 KVAF branch, full-depth copy | Model.kvaf_patch_embedding / kvaf_blocks / kvaf_head |
| Eq. 4-6 event-aware fusion            | EventFusion                                       |
| Eq. 7 EDLS target                     | edls_target                                       |
| Eq. 8 loss                            | Model.loss                                        |
| Sec. 4.1 LoRA r = 32, two stages      | Config.lora_rank, Config.stage, Model.param_groups|
| Table 1 / 4 joint / KVAF-conditioned  | Model.sample(mode=...), Config.kvaf_cond_prob     |
| Sec. 4.3 w/o KVAF, w/o EAF            | Config.kvaf=False, Config.fusion="plain"          |
| (ours) x0 / change prediction, I2V concat | Config.prediction, Model.to_velocity, first_frame_concat |
| (ours) x0-space loss weight, aligned fusion start | Config.time_weight="x0", Config.fusion_init="aligned" |

Shape letters: B batch, C latent channels, T latent frames, h x w token grid, L = T h w tokens,
D width, F raw frames.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import depth_range as common_depth_range
from common import (frame_times, Attention, FP32LayerNorm, PixelCodec, TinyTextEncoder, URDFChain, WanDiT, WanHead, add_noise,
                    bell_weight, check_choice, check_clip_frames, checkpointed, check_layers, colormap, inject_lora, project,
                    rope_3d, sample_t, set_trainable, shift_t, velocity_target, x0_space_weight)

# -------------------------------------------------------------------------------------------------
# KVAF renderer (Sec. 3.1, App. A.2)
# -------------------------------------------------------------------------------------------------


def _capsules(H: int, W: int, a: np.ndarray, b: np.ndarray, radius: float) -> np.ndarray:
    """Pixel masks (F, H, W) of thick segments a -> b, a and b (F, 2) pixel coords (NaN: nothing)."""
    v, u = np.mgrid[0:H, 0:W] + 0.5
    u, v = u[None], v[None]
    au, av, bu, bv = (x[:, None, None] for x in (a[:, 0], a[:, 1], b[:, 0], b[:, 1]))
    du, dv = bu - au, bv - av
    s = np.clip(((u - au) * du + (v - av) * dv) / np.maximum(du * du + dv * dv, 1e-12), 0, 1)
    d2 = (u - au - s * du) ** 2 + (v - av - s * dv) ** 2
    with np.errstate(invalid="ignore"):
        return np.nan_to_num(d2, nan=np.inf) <= radius ** 2


def render_kvaf(chain: URDFChain, joints: np.ndarray, gripper: np.ndarray, K: np.ndarray, T_wc: np.ndarray,
                height: int, width: int, ee_link: str = "tcp", depth_range=None, finger_length: float = 0.05,
                axis_length: float = 0.06, sigma: float | None = None, line: float | None = None,
                elements=("skeleton", "landmarks", "fingers", "heatmap", "axes")) -> np.ndarray:
    """Render a KVAF video: (F, height, width, 3) uint8 on a black canvas, vectorized over frames.

    chain: the parsed URDF; joints (F, n_arm): values of the actuated non-prismatic joints in chain
    order; gripper (F,) in [0, 1] (1 = open), mapped onto every actuated prismatic joint's range
    (App. A.2: normalized signal -> prismatic displacement); K (3, 3), T_wc (4, 4) world -> camera.
    depth_range (z_min, z_max): the episode-level camera-depth range of the skeleton colours
    (common.depth_range over the episode's poses; default: over the frames given, i.e. the clip).
    Elements, in drawing order:
    depth-coloured skeleton (every link-to-link segment of the tree), white joint landmarks (child
    links of moving joints), grey gripper fingers (finger link + `finger_length` along the end
    effector's x axis), a truncated Gaussian heatmap at the end effector (max-blended), and the end
    effector's x / y / z axes in red / green / blue. Points behind the camera (z <= 0) are dropped.
    `elements` picks a subset (for pictures and tests).
    """
    joints, gripper = np.asarray(joints, np.float64), np.asarray(gripper, np.float64).reshape(-1)
    if joints.ndim != 2:
        raise ValueError(f"render_kvaf: expected joints (F, n_arm), received {joints.shape}")
    q = chain.full_q(joints, gripper)                                            # gripper -> prismatic offsets
    F_, H, W = len(joints), height, width
    poses = chain.fk(q)                                                          # Eq. 1: {link: (F, 4, 4)}
    pos = {k: v[:, :3, 3] for k, v in poses.items()}
    ee = poses[ee_link]
    sigma = sigma or max(H, W) / 24
    line = line or max(0.6, max(H, W) / 64)
    img = np.zeros((F_, H, W, 3), np.uint8)

    def paint(mask, color):                                                      # mask (F, H, W), color (F, 3) or (3,)
        color = np.broadcast_to(np.asarray(color, np.uint8), (F_, 3))
        img[:] = np.where(mask[..., None], color[:, None, None, :], img)

    # skeleton: each joint draws its parent -> child segment, coloured by mean camera depth (Eq. 2-3)
    fingers = {j.child for j in chain.joints if j.type == "prismatic"}
    segs = [(j.parent, j.child) for j in chain.joints if j.child not in fingers and j.child != ee_link
            and np.linalg.norm(j.origin[:3, 3]) > 1e-9]
    uv = {k: project(p, K, T_wc) for k, p in pos.items()}                        # Eq. 2: {link: ((F, 2), (F,))}
    z0, z1 = depth_range if depth_range is not None else common_depth_range(chain, q, T_wc)
    for a, b in segs if "skeleton" in elements else []:
        depth = (uv[a][1] + uv[b][1]) / 2
        paint(_capsules(H, W, uv[a][0], uv[b][0], line), colormap((depth - z0) / max(z1 - z0, 1e-6)))
    for j in chain.joints if "landmarks" in elements else []:                     # joint landmarks
        if j.type in ("revolute", "continuous") and j.child not in fingers:
            paint(_capsules(H, W, uv[j.child][0], uv[j.child][0], line * 1.6), (255, 255, 255))
    x_axis = ee[:, :3, 0]                                                        # gripper fingers
    for f in fingers if "fingers" in elements else []:
        tip = project(pos[f] + finger_length * x_axis, K, T_wc)[0]
        paint(_capsules(H, W, uv[f][0], tip, line * 0.8), (200, 200, 200))
    c = uv[ee_link][0]                                                           # truncated Gaussian heatmap
    vv, uu = np.mgrid[0:H, 0:W] + 0.5
    d2 = (uu[None] - c[:, 0, None, None]) ** 2 + (vv[None] - c[:, 1, None, None]) ** 2
    with np.errstate(invalid="ignore"):
        heat = np.where(np.nan_to_num(d2, nan=np.inf) <= (3 * sigma) ** 2, np.exp(-d2 / (2 * sigma ** 2)), 0.0)
    if "heatmap" in elements:
        img[:] = np.maximum(img, (255 * np.nan_to_num(heat))[..., None].astype(np.uint8))
    for i, color in enumerate(((255, 0, 0), (0, 255, 0), (0, 0, 255)) if "axes" in elements else ()):  # p + a R e_i
        end = project(ee[:, :3, 3] + axis_length * ee[:, :3, i], K, T_wc)[0]
        paint(_capsules(H, W, c, end, line * 0.7), color)
    return img


def load_chain(cfg) -> URDFChain:
    """The robot of cfg.urdf (a path relative to this file unless absolute), which the KVAFs are drawn from."""
    here = os.path.dirname(os.path.abspath(__file__))
    return URDFChain(cfg.urdf if os.path.isabs(cfg.urdf) else os.path.join(here, cfg.urdf))


def _fit_heatmap(val: torch.Tensor, ok: torch.Tensor, pu: torch.Tensor, pv: torch.Tensor, u0: float, v0: float,
                 sigma: float) -> tuple[float, float, float]:
    """Least-squares fit of the renderer's truncated Gaussian (centre, height) to the pixels `val` (P,) at
    (pu, pv) where `ok`, the centre searched near (u0, v0): a 0.25-pixel grid within 1.5 pixels, then a
    0.05-pixel grid around the best. Pixels left far brighter than the fit (fingers, landmarks) are dropped
    and the fit repeated. -> (u, v, share of the grey pixels' energy the fit explains, none dropped)."""
    best, grey = (u0, v0), ok
    for step, reach in ((0.25, 1.5), (0.05, 0.25)):
        offs = torch.arange(-reach, reach + 1e-6, step)
        cu, cv = torch.meshgrid(offs, offs, indexing="xy")
        cx, cy = (best[0] + cu.flatten())[:, None], (best[1] + cv.flatten())[:, None]          # (C, 1)
        d2 = (pu[None] - cx) ** 2 + (pv[None] - cy) ** 2                                       # (C, P)
        g = torch.where(d2 <= (3 * sigma) ** 2, torch.exp(-d2 / (2 * sigma ** 2)), torch.zeros_like(d2))
        for _ in range(3):
            w = ok.float()[None]
            a = (g * val[None] * w).sum(1) / (g * g * w).sum(1).clamp_min(1e-12)              # the height per centre
            res = ((val[None] - a[:, None] * g) ** 2 * w).sum(1)
            i = int(res.argmin())
            bright = ok & ((val - a[i] * g[i]) > 0.15)
            if not bright.any():
                break
            ok = ok & ~bright
        best = (float(cx[i, 0]), float(cy[i, 0]))
    w = grey.float()                                                            # every grey pixel, none dropped
    energy, miss = float((val ** 2 * w).sum()), float(((val - a[i] * g[i]) ** 2 * w).sum())
    return best[0], best[1], 1.0 - miss / max(energy, 1e-12)


def recover_ee_track(kvaf: np.ndarray, sigma: float | None = None, grey_tol: float = 0.1, candidates: int = 3,
                     max_step: float | None = None, min_peak: float = 0.1, with_detected: bool = False):
    """App. A.3 in spirit: the end-effector pixel per KVAF frame (F, H, W, 3) uint8 -> (F, 2) (u, v).

    Detection, per frame: the heatmap is the only broad grey blob: blur min(R, G, B) with the renderer's
    sigma and take its `candidates` highest local peaks (at least `min_peak`); at each, fit the renderer's
    truncated Gaussian (Eq. 3, centre and height) to the grey pixels within 3 sigma (`_fit_heatmap`), and
    keep the peak the Gaussian explains best. Coloured pixels (the pose axes drawn over the heatmap's
    centre, the skeleton under it) are left out of the fit instead of read as dark; a white landmark, a
    small saturated block, can out-blur a heatmap whose centre the axes cover, but a Gaussian fits it poorly.
    (A centroid of min(R, G, B) around the highest peak missed by 2.0 pixels on average on true 32 x 32 KVAFs
    of the toy, 1.1 in the median; this fit by a few hundredths in the median.)

    Tracking (max_step, pixels per frame; None: every frame on its own, NaN where nothing is detected), as
    App. A.3 associates detections into tracks: a frame's candidates farther than max_step times the frames
    since the last detection from that detection are not its end effector (a faded heatmap no longer
    loses to a white landmark across the image), and frames without a detection take the nearest detected
    frame's point (App. A.3's nearest-neighbour fill). App. A.3 also median-filters the track; we do not:
    on true toy KVAFs a 3-frame median moved the turning points of the track by up to 1 pixel and the
    mean by 0.08, against 0.00 without. with_detected: also return the (F,) bool mask of the frames
    with a detection of their own."""
    x = torch.from_numpy(kvaf.astype(np.float32) / 255)                          # (F, H, W, 3)
    F_, H, W = x.shape[:3]
    lo, hi = x.min(-1).values, x.max(-1).values
    grey = (hi - lo) <= grey_tol
    sigma = sigma or max(H, W) / 24
    r = int(np.ceil(2 * sigma))
    k = torch.exp(-torch.arange(-r, r + 1).float() ** 2 / (2 * sigma ** 2))
    blur = F.conv2d(lo[:, None], (k[:, None] * k[None, :])[None, None] / k.sum() ** 2, padding=r)[:, 0]
    vv, uu = torch.meshgrid(torch.arange(H).float() + 0.5, torch.arange(W).float() + 0.5, indexing="ij")
    win = int(np.ceil(3 * sigma + 1.5))
    track = np.full((F_, 2), np.nan)
    last = None                                                                  # (frame, u, v) of the last detection
    for f in range(F_):
        b = blur[f]
        reach = np.inf if max_step is None or last is None else max_step * (f - last[0])
        if np.isfinite(reach):                                                   # the gate (a peak a pixel beyond it may fit inside)
            b = torch.where((uu - last[1]) ** 2 + (vv - last[2]) ** 2 <= (reach + 1.0) ** 2, b, torch.zeros_like(b))
        local = b == F.max_pool2d(b[None, None], 3, 1, 1)[0, 0]                 # local maxima (within the gate)
        score = torch.where(local, b, torch.zeros_like(b)).flatten()
        fits = []
        for p in score.argsort(descending=True)[:candidates].tolist():
            if score[p] < min_peak:
                break
            pv, pu = p // W, p % W
            v0, v1, u0, u1 = max(pv - win, 0), min(pv + win + 1, H), max(pu - win, 0), min(pu + win + 1, W)
            fit = _fit_heatmap(lo[f, v0:v1, u0:u1].flatten(), grey[f, v0:v1, u0:u1].flatten(),
                               uu[v0:v1, u0:u1].flatten(), vv[v0:v1, u0:u1].flatten(), pu + 0.5, pv + 0.5, sigma)
            if last is None or np.hypot(fit[0] - last[1], fit[1] - last[2]) <= reach:
                fits.append(fit)
        if fits:
            u, v, _ = max(fits, key=lambda t: t[2])
            track[f], last = (u, v), (f, u, v)
    detected = np.isfinite(track[:, 0])
    if max_step is not None and detected.any():
        seen = np.flatnonzero(detected)
        track = track[seen[np.abs(np.arange(F_)[:, None] - seen[None]).argmin(1)]]       # nearest detected frame
    return (track, detected) if with_detected else track


# -------------------------------------------------------------------------------------------------
# Config
# -------------------------------------------------------------------------------------------------


@dataclass
class Config:
    # data layout
    height: int = 32                     # frame size (Wan2.2 TI2V: 704 x 1280)
    width: int = 32
    frames: int = 9                      # raw frames per clip, 1 + latent_q (T - 1)
    latent_q: int = 4                    # raw frames per latent frame (Wan2.2 VAE: 4 x 16 x 16)
    codec_p: int = 2                     # tiny pixel codec space-to-depth (the Wan2.2 VAE is 16)
    latent_channels: int = 48            # 48 for the Wan2.2 VAE and for the tiny codec (3 * 4 * 2 * 2)
    action_dim: int = 4                  # d_a (commanded actions; the KVAF renders the joint trajectory)
    state_dim: int = 4
    horizon: int = 8                     # actions per clip (frames - 1)
    vocab: tuple = ()
    text_encoder: str = "tiny"           # tiny | precomputed (umT5 features in batch["text_emb"])
    text_layers: int = 1
    text_dim: int = 64                   # umT5-XXL: 4096
    urdf: str = "data/toyarm.urdf"       # robot description for render_kvaf (relative to this file)
    ee_link: str = "tcp"
    # backbone, Wan2.2-TI2V-5B shapes: 30 blocks x 3072, 24 heads x 128, FFN 14336, 48 latent channels
    dim: int = 64                        # 3072
    ffn_dim: int = 256                   # 14336
    heads: int = 2                       # 24 x 128 (tiny preset: 3 x 64)
    layers: int = 4                      # 30
    patch: tuple = (1, 2, 2)
    freq_dim: int = 256
    rope_theta: float = 10000.0
    # KVAF branch and fusion (Sec. 3.2)
    kvaf: bool = True                    # False: numeric joint/gripper tokens replace the KVAF video (Sec. 4.3)
    fusion: str = "event"                # event (Eq. 4-6 + EDLS) | plain (bidirectional cross-attention, Sec. 4.3)
    fusion_layers: tuple = (1, 3)        # S: sparse fusion layers (the paper does not list them)
    event_dim: int = 64                  # width of the event representation e
    fusion_init: str = "zero"            # zero: output projections at 0, so fusion starts as the identity | aligned
                                         #   (ours): also q, k start as a lookup of the pixel-aligned partner token
    time_weight: str = "bell"            # w(t) of Eq. 8: bell (Wan / DiffSynth trainer) | uniform (w = 1, a variant) |
                                         #   x0 (ours: w = t^2, so Eq. 8 becomes the error of the implied clean clip)
    edls_weight: float = 1.0             # lambda_e (the paper gives no value)
    edls_normalize: bool = True          # divide the EDLS MSE by the target's mean square, so predicting "no change"
                                         #   scores 1 like a flow loss at init (ours; the raw target is tiny: README)
    kvaf_cond_prob: float = 0.0          # fraction of samples with a clean KVAF stream (0 = the paper's setting)
    prediction: str = "v"                # what the network outputs: v (Wan, Eq. 8) | x0 (the clean clip, turned into
                                         #   v = (x_t - x0) / max(t, t_min) for Eq. 8; Li & He 2025) | delta (ours, tiny
                                         #   preset: x0 minus the given first frame, so a fresh model predicts "no motion")
    x0_t_min: float = 0.05               # the clip of t in that division
    first_frame_concat: bool = False     # ours (tiny preset): the clean first frame's latents are also concatenated
                                         #   along channels to every video frame's input, as Wan2.1-I2V conditions;
                                         #   Wan2.2 TI2V (the paper's backbone) conditions in-sequence only (False)
    color_jitter: float = 0.0            # ours (toy, off): each training clip's frames times one random gain per
                                         #   colour channel in [1 - j, 1 + j] (color_jitter), so that erasing the arm
                                         #   where it was must read the table's colour (HISTORY.md, "New colours in training")
    random_background: bool = False      # ours (toy, off): each training clip's table and wall repainted in one random
                                         #   colour each, none nearer a held-out colour than the training palettes are
                                         #   (data.toyworld.randomize_background; HISTORY.md, "Random backgrounds in training")
    random_background_share: float = 1.0 # ours (toy): with random_background, the fraction of clips repainted
    # training (Sec. 4.1)
    lora_rank: int = 32                  # LoRA on both streams' blocks, base frozen; 0 = train the base in full
    lora_pattern: str = r"^(video\.blocks|kvaf_blocks)\.\d+\.(self_attn\.[qkvo]|cross_attn\.[qkvo]|ffn\.[02])$"
    stage: str = "stage1"                # stage1: LoRA + KVAF head, fusion frozen at the identity, so the two streams
                                         #   run independently and actions reach the video only in stage2 (+ fusion)
    t_sampler: str = "shifted"           # Wan's trainer: uniform over the shifted grid
    t_shift: float = 5.0                 # Wan2.2 TI2V shift
    sample_steps: int = 20               # Euler steps of generation (Wan default 50)
    lr_video: float = 1e-4               # one LR for all trainable components (value lost in our copy)
    lr_head: float = 1e-4
    weight_decay: float = 0.0
    lr_schedule: str = "constant"
    warmup_frac: float = 0.0
    grad_clip: float = 1.0
    batch_size: int = 16                 # 32
    steps: int = 200
    # pretrained source of Model.from_pretrained / train.py --pretrained ("" = start fresh)
    video_weights: str = "Wan-AI/Wan2.2-TI2V-5B"         # Sec. 3.2: the Wan2.2-TI2V-5B backbone
    video_revision: str = ""
    video_subfolder: str = ""            # "transformer" for Wan-AI/Wan2.2-TI2V-5B-Diffusers

    def __post_init__(self):
        check_choice("fusion", self.fusion, ("event", "plain"))
        check_choice("fusion_init", self.fusion_init, ("zero", "aligned"))
        check_choice("prediction", self.prediction, ("v", "x0", "delta"))
        check_choice("time_weight", self.time_weight, ("bell", "uniform", "x0"))
        check_choice("stage", self.stage, ("stage1", "stage2"))
        check_choice("t_sampler", self.t_sampler, ("uniform", "logit_normal", "shifted"))
        check_choice("text_encoder", self.text_encoder, ("tiny", "precomputed"))
        check_layers("fusion_layers", self.fusion_layers, self.layers)
        check_clip_frames(self.frames, self.latent_q)
        if not 0.0 <= self.color_jitter < 1.0:
            raise ValueError(f"color_jitter={self.color_jitter}; expected a value in [0, 1)")
        if not 0.0 < self.random_background_share <= 1.0:
            raise ValueError(f"random_background_share={self.random_background_share}; expected a value in (0, 1]")

    @property
    def latent_frames(self) -> int:
        return 1 + (self.frames - 1) // self.latent_q

    @property
    def token_grid(self) -> tuple[int, int, int]:
        p = self.codec_p
        return self.latent_frames // self.patch[0], self.height // p // self.patch[1], self.width // p // self.patch[2]


CONFIGS = {
    # Tiny: there is no pretrained Wan2.2 to adapt, so the base is trained in full (lora_rank 0),
    # in one run with fusion on (stage2), half the samples KVAF-conditioned so one checkpoint demos
    # both generation modes; Wan's shifted t (shift 5) and LR 1e-3. Width 192: a token carries 48
    # codec channels x (1, 2, 2) = 192 values, and the velocity target contains the input noise, so a
    # narrower stream cannot pass it through (at width 64 the generations were noise). The network
    # predicts the change from the given first frame (prediction="delta"), which it also sees
    # concatenated along channels (first_frame_concat): from scratch, the in-sequence v-prediction of
    # Wan2.2 generated futures 5 dB worse than copying the first frame (HISTORY.md, EA-WM). Eq. 8 is weighted by
    # t^2 (time_weight="x0"): the bell w(t) is zero at t = 1, where generation starts and where only
    # the KVAF tells where the arm goes, so the model never learned to read it; the fusion starts as
    # a lookup of the aligned KVAF token (fusion_init="aligned"). 3,000 steps (38-70 minutes on a 2-core
    # CPU): the KVAF-conditioned futures pass copying the first frame by 2 dB within the first 1,000, but the
    # jointly generated KVAF (the model's own actions) brings the arm within 2 px of where the demo goes only
    # by 3,000 (README, "EA-WM on the toy world"); --preset quick stops at 1,000. lambda_e = 0.1: at 1 the
    # futures were 0.55-0.77 dB worse on every split (three seeds) and the jointly generated arm slower to move
    # (HISTORY.md, "With a tenth of the EDLS weight"; the paper gives no value).
    "tiny": Config(dim=192, heads=3, ffn_dim=768, lora_rank=0, stage="stage2", kvaf_cond_prob=0.5,
                   time_weight="x0", fusion_init="aligned", lr_video=1e-3, lr_head=1e-3, sample_steps=10,
                   first_frame_concat=True, prediction="delta", edls_weight=0.1, steps=3000),
    "full": Config(height=704, width=1280, frames=121, codec_p=16, text_encoder="precomputed", text_dim=4096,
                   dim=3072, ffn_dim=14336, heads=24, layers=30, fusion_layers=(2, 8, 14, 20, 26), event_dim=512,
                   batch_size=32, steps=10000, sample_steps=50, horizon=120),
}
# the tiny preset stopped at a third (about 13 minutes on a 2-core CPU; README "EA-WM on the toy world"): its
# KVAF-conditioned futures pass copying the first frame by 3.2-4.5 dB, its jointly generated arm is 2-3 px from the
# demo's (a still one about 4); with the constant LR, `--resume` with `--steps 3000` continues it into the default run
CONFIGS["quick"] = dataclasses.replace(CONFIGS["tiny"], steps=1000)


# -------------------------------------------------------------------------------------------------
# Event-aware bidirectional fusion (Eq. 4-6)
# -------------------------------------------------------------------------------------------------


class EventFusion(nn.Module):
    """At a fusion layer: an event MLP over each video token and its aligned KVAF token gives e; a
    per-token gate g = sigmoid(W_g e) and an event latent e_hat = W_e e (Eq. 4); gated cross-attention
    both ways (Eq. 5-6). fusion="plain": no event MLP, gate or e_hat (g = 1).

    Identity at initialization: the output projections `o` of both cross-attentions are zero, so each
    stream adds g * 0 until training moves them (in stage 1 the fusion is frozen there, so the two
    streams run independently). `aligned` (= Config.kvaf): the KVAF grid has one token per video token,
    the event MLP reads the pair; with numeric action tokens (kvaf=False) the streams have different
    lengths and each token's partner is the other stream's mean token."""

    def __init__(self, dim: int, heads: int, event_dim: int, event_out: int, plain: bool, aligned: bool = True,
                 init: str = "zero"):
        super().__init__()
        self.plain, self.aligned = plain, aligned
        self.norm_v = FP32LayerNorm(dim, 1e-6, elementwise_affine=False)
        self.norm_k = FP32LayerNorm(dim, 1e-6, elementwise_affine=False)
        self.video_from_kvaf = Attention(dim, heads)
        self.kvaf_from_video = Attention(dim, heads)
        for a in (self.video_from_kvaf, self.kvaf_from_video):
            nn.init.zeros_(a.o.weight)
            nn.init.zeros_(a.o.bias)
            if init == "aligned" and aligned:
                aligned_lookup_init(a)
        if not plain:
            self.event_mlp = nn.Sequential(nn.Linear(2 * dim, event_dim), nn.GELU(approximate="tanh"),
                                           nn.Linear(event_dim, event_dim))
            self.gate = nn.Linear(event_dim, 1)
            self.event_head = nn.Linear(event_dim, event_out)

    def gates(self, nv, nk):
        """Eq. 4 -> (g_v (B, L_v, 1), g_k (B, L_k, 1), e_hat (B, L_v, event_out)) from normalized tokens."""
        if self.aligned:                                                         # KVAF: token i pairs with token i
            e = self.event_mlp(torch.cat([nv, nk], -1))                          # e = MLP([h_v, h_k])
            g = torch.sigmoid(self.gate(e))                                      # one gate per token, both directions
            return g, g, self.event_head(e)
        # numeric action tokens: the partner of each token is the other stream's mean token
        e_v = self.event_mlp(torch.cat([nv, nk.mean(1, keepdim=True).expand_as(nv)], -1))
        e_k = self.event_mlp(torch.cat([nv.mean(1, keepdim=True).expand(-1, nk.shape[1], -1), nk], -1))
        return torch.sigmoid(self.gate(e_v)), torch.sigmoid(self.gate(e_k)), self.event_head(e_v)

    def forward(self, h_v, h_k, rope_v, rope_k):
        """-> (h_v, h_k, e_hat (B, L_v, event_out) or None). Both directions read the pre-fusion tokens."""
        nv, nk = self.norm_v(h_v), self.norm_k(h_k)
        g_v, g_k, e_hat = (1.0, 1.0, None) if self.plain else self.gates(nv, nk)
        out_v = h_v + g_v * self.video_from_kvaf(nv, nk, rope=rope_v, rope_k=rope_k)     # Eq. 5
        out_k = h_k + g_k * self.kvaf_from_video(nk, nv, rope=rope_k, rope_k=rope_v)     # Eq. 6
        return out_v, out_k, e_hat


def aligned_lookup_init(attn: Attention, bias: float = 10.0, sharpness: float = 4.0) -> None:
    """Config.fusion_init="aligned" (ours): start a fusion cross-attention as a lookup of the partner
    token at the same (t, h, w). The q and k biases dominate the projections (constant vectors), so after
    RMSNorm (weight `sharpness`) and the shared 3D RoPE the logit is sharpness^2 / sqrt(d) * sum of cos(angle
    difference) over the rotary pairs: largest at zero offset, lower by about 2 for a one-token offset at
    sharpness 4 (about 60 % of the attention on the aligned token, tested). Training then moves q, k freely."""
    for lin, norm in ((attn.q, attn.norm_q), (attn.k, attn.norm_k)):
        nn.init.constant_(lin.bias, bias)
        nn.init.normal_(lin.weight, std=0.02)
        nn.init.constant_(norm.weight, sharpness)


def widen_input(conv: nn.Conv3d, extra: int) -> nn.Conv3d:
    """The patch embedding with `extra` more input channels whose weights start at zero (Config.
    first_frame_concat): the same function as before until training moves them, the way an
    image-to-video model is made from a text-to-video one."""
    wide = nn.Conv3d(conv.in_channels + extra, conv.out_channels, conv.kernel_size, conv.stride,
                     bias=conv.bias is not None, device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        wide.weight.zero_()
        wide.weight[:, :conv.in_channels] = conv.weight
        if conv.bias is not None:
            wide.bias.copy_(conv.bias)
    return wide


def patchify(z: torch.Tensor, patch) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, L, p_t p_h p_w C), the inverse of WanDiT.unpatchify (token order t, h, w)."""
    B, C, T, H, W = z.shape
    pt, ph, pw = patch
    z = z.reshape(B, C, T // pt, pt, H // ph, ph, W // pw, pw)
    return z.permute(0, 2, 4, 6, 3, 5, 7, 1).reshape(B, (T // pt) * (H // ph) * (W // pw), pt * ph * pw * C)


def color_jitter(video: torch.Tensor, j: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, 3, F, H, W) in [-1, 1] -> the same clips, each multiplied by one gain per colour channel drawn
    from U[1 - j, 1 + j], in [0, 1] pixel space and clipped there (ours, toy: Config.color_jitter)."""
    g = 1 + j * (2 * torch.rand(video.shape[0], 3, 1, 1, 1, generator=generator) - 1)
    return ((video + 1) / 2 * g.to(video.device)).clamp(0, 1) * 2 - 1


def edls_target(video: torch.Tensor, encode) -> torch.Tensor:
    """Eq. 7: d_t = o_t - o_{t-1} (d_0 = 0) of a (B, 3, F, H, W) video in [-1, 1], halved into the
    codec's [-1, 1] range, encoded with the same codec / VAE -> (B, C, T, h, w)."""
    d = torch.zeros_like(video)
    d[:, :, 1:] = video[:, :, 1:] - video[:, :, :-1]
    return encode(d / 2)


# -------------------------------------------------------------------------------------------------
# Model
# -------------------------------------------------------------------------------------------------


class Model(nn.Module):
    """EA-WM: Wan2.2-TI2V video stream + KVAF stream (full-depth block copy) + event-aware fusion."""
    grad_checkpoint = False                                  # recompute each block's activations in backward

    def __init__(self, cfg: Config, video: WanDiT | None = None):
        """`video`: a pretrained Wan2.2-TI2V stream (from_pretrained); the KVAF stream copies its blocks."""
        super().__init__()
        self.cfg = cfg
        codec = PixelCodec(cfg.latent_q, cfg.codec_p)
        self.codec = codec if codec.channels == cfg.latent_channels and cfg.codec_p < 8 else None
        C = cfg.latent_channels
        if cfg.text_encoder == "tiny":
            self.text_encoder = TinyTextEncoder(list(cfg.vocab), cfg.text_dim, layers=cfg.text_layers)
        if video is None:
            self.video = WanDiT(C, C, cfg.dim, cfg.ffn_dim, cfg.heads, cfg.layers, cfg.text_dim, cfg.patch, cfg.freq_dim,
                                rope_theta=cfg.rope_theta)
            self.initialize_weights()
        else:
            self.video = video
        # KVAF branch: own input embedding, a full-depth copy of the (pretrained) blocks, own head
        if cfg.kvaf:
            self.kvaf_patch_embedding = copy.deepcopy(self.video.patch_embedding)
            self.kvaf_head = copy.deepcopy(self.video.head)
        else:                                                                    # numeric [joints, gripper] tokens
            self.kvaf_patch_embedding = nn.Linear(cfg.state_dim, cfg.dim)
            self.kvaf_head = WanHead(cfg.dim, cfg.state_dim)
            nn.init.zeros_(self.kvaf_head.head.weight)
        self.kvaf_blocks = copy.deepcopy(self.video.blocks)
        if cfg.first_frame_concat:
            self.video.patch_embedding = widen_input(self.video.patch_embedding, C)
        out = C * int(np.prod(cfg.patch))
        self.fusion = nn.ModuleDict({str(l): EventFusion(cfg.dim, cfg.heads, cfg.event_dim, out, cfg.fusion == "plain",
                                                         aligned=cfg.kvaf, init=cfg.fusion_init)
                                     for l in cfg.fusion_layers})
        if cfg.lora_rank:
            inject_lora(self, cfg.lora_pattern, cfg.lora_rank)                   # base frozen, LoRA B = 0
        self._chain = None

    @classmethod
    def from_pretrained(cls, cfg: Config | None = None, dtype: torch.dtype | None = None, **sources) -> "Model":
        """EA-WM of `cfg` (default CONFIGS["full"]) on Wan2.2-TI2V-5B: the video stream is the loaded DiT,
        the KVAF stream's blocks, patch embedding and head are copies of the loaded ones (Sec. 3.2), the
        fusion modules and LoRA start fresh (Sec. 4.1). Sources: the Config fields video_weights /
        video_revision / video_subfolder, overridable as keyword arguments. The stream sizes follow the
        checkpoint. The video stream stays memory-mapped in its dtype; the model is cast to `dtype`, or
        to the checkpoint's dtype (the copies live in RAM: about 2 x 10 GB in bf16 at 5B)."""
        cfg = dataclasses.replace(copy.deepcopy(cfg or CONFIGS["full"]), **sources)
        if not cfg.video_weights:
            raise ValueError("EA-WM's pretrained part is its video stream: set video_weights")
        video = WanDiT.from_pretrained(cfg.video_weights, cfg.video_revision or None, cfg.video_subfolder or None, dtype)
        k = video.sizes
        if k["in_dim"] != k["out_dim"] or k["image_dim"]:
            raise ValueError(f"EA-WM needs a TI2V-style Wan DiT (in = out channels, no image input); "
                             f"{cfg.video_weights} has in {k['in_dim']}, out {k['out_dim']}, image input {k['image_dim']}")
        cfg = dataclasses.replace(cfg, dim=k["dim"], ffn_dim=k["ffn_dim"], heads=k["heads"], layers=k["layers"], text_dim=k["text_dim"],
                                  patch=k["patch"], freq_dim=k["freq_dim"], latent_channels=k["out_dim"])
        return cls(cfg, video).to(dtype or next(video.parameters()).dtype)

    def initialize_weights(self):
        """Xavier linears and zero biases, N(0, 0.02) time embedding, zero output head (at full size
        these come from Wan2.2-TI2V-5B)."""
        for m in self.video.modules():
            if isinstance(m, (nn.Linear, nn.Conv3d)):
                nn.init.xavier_uniform_(m.weight.flatten(1) if m.weight.dim() > 2 else m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for m in self.video.time_embedding:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(self.video.head.head.weight)

    # ---------------------------------------------------------------- inputs
    @property
    def chain(self) -> URDFChain:
        if self._chain is None:
            self._chain = load_chain(self.cfg)
        return self._chain

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        if self.codec is None:
            raise ValueError("the full preset expects pre-encoded Wan2.2-VAE latents (batch['latents'], "
                             "batch['kvaf_latents'], batch['edls_latents'])")
        return self.codec.encode(video)

    def render(self, batch) -> torch.Tensor:
        """KVAF videos (B, 3, F, H, W) in [-1, 1] from batch joints (B, F, n), gripper (B, F, 1), K, T_wc,
        skeleton depth colours over batch["kvaf_depth_range"] (B, 2) (the episode's range, App. A.2), or
        over the clip's own range when the batch has none. (The toy world's clip reader renders every
        frame once instead, train.dataset_for: the same pixels, each frame depends on its own pose.)"""
        cfg = self.cfg
        out = []
        for b in range(batch["joints"].shape[0]):
            rng = tuple(batch["kvaf_depth_range"][b].tolist()) if "kvaf_depth_range" in batch else None
            img = render_kvaf(self.chain, batch["joints"][b].cpu().numpy(), batch["gripper"][b].reshape(-1).cpu().numpy(),
                              batch["K"][b].cpu().numpy(), batch["T_wc"][b].cpu().numpy(), cfg.height, cfg.width,
                              cfg.ee_link, rng)
            out.append(torch.from_numpy(img))
        return torch.stack(out).permute(0, 4, 1, 2, 3).float().to(batch["joints"].device) / 127.5 - 1

    def streams(self, batch):
        """-> (video latents z (B, C, T, h, w), action-stream target a (KVAF latents, or numeric
        [joints, gripper] per raw frame (B, F, state_dim)))."""
        z = batch["latents"] if "latents" in batch else self.encode(batch["video"])
        if not self.cfg.kvaf:
            return z, torch.cat([batch["joints"], batch["gripper"]], -1).float()
        if "kvaf_latents" in batch:
            return z, batch["kvaf_latents"]
        kv = batch["kvaf"] if "kvaf" in batch else self.render(batch)
        return z, self.encode(kv)

    def context(self, batch):
        return self.text_encoder(batch["text"]) if self.cfg.text_encoder == "tiny" else batch["text_emb"]

    def numeric_rope(self, n: int, device):
        """RoPE of numeric action tokens (kvaf=False): raw frame f at latent time f / latent_q, the grid centre."""
        _, h, w = self.cfg.token_grid
        t = torch.arange(n, device=device, dtype=torch.float64) / self.cfg.latent_q
        return rope_3d(t, torch.full_like(t, (h - 1) / 2), torch.full_like(t, (w - 1) / 2),
                       self.cfg.dim // self.cfg.heads, self.cfg.rope_theta), True

    # ---------------------------------------------------------------- forward
    def forward(self, z_t, t_v, k_t, t_k, ctx):
        """z_t (B, C, T, h, w) noisy video latents, t_v (B, T); k_t noisy KVAF latents (B, C, T, h, w) with
        t_k (B, T), or numeric tokens (B, F, d) with t_k (B, F); ctx (B, L_text, text_dim).
        -> (video velocity, KVAF velocity (same layout as k_t), [e_hat per fusion layer])."""
        V, cfg = self.video, self.cfg
        x_in = z_t
        if cfg.first_frame_concat:                                               # frame 0 of z_t is the clean given frame
            x_in = torch.cat([z_t, z_t[:, :, :1].expand_as(z_t)], 1)
        hv, grid = V.embed(x_in)
        e_v, e0_v = V.time(t_v, grid)
        rope_v = V.rope(grid, z_t.device)
        if cfg.kvaf:
            hk = self.kvaf_patch_embedding(k_t).flatten(2).transpose(1, 2)
            e_k, e0_k = V.time(t_k, grid)
            rope_k = rope_v
        else:
            hk = self.kvaf_patch_embedding(k_t)
            e_k, e0_k = V.time(t_k, (t_k.shape[1], 1, 1))
            rope_k = self.numeric_rope(k_t.shape[1], z_t.device)
        ctx = V.text_embedding(ctx)
        e_hats = []
        for i, (bv, bk) in enumerate(zip(V.blocks, self.kvaf_blocks)):
            if str(i) in self.fusion:                                            # fuse, then each stream runs its block
                hv, hk, e_hat = checkpointed(self.grad_checkpoint, self.fusion[str(i)], hv, hk, rope_v, rope_k)
                if e_hat is not None:
                    e_hats.append(e_hat)
            hv = checkpointed(self.grad_checkpoint, bv, hv, e0_v, ctx, rope=rope_v)
            hk = checkpointed(self.grad_checkpoint, bk, hk, e0_k, ctx, rope=rope_k)
        v_video = V.unpatchify(V.head(hv, e_v), grid)
        v_kvaf = V.unpatchify(self.kvaf_head(hk, e_k), grid) if cfg.kvaf else self.kvaf_head(hk, e_k)
        if cfg.prediction == "delta":                                            # x0 = the given first frame + change
            v_video = v_video + z_t[:, :, :1]
            v_kvaf = v_kvaf + (k_t[:, :, :1] if cfg.kvaf else k_t[:, :1])
        if cfg.prediction in ("x0", "delta"):
            v_video = self.to_velocity(v_video, z_t, t_v)
            v_kvaf = self.to_velocity(v_kvaf, k_t, t_k)
        return v_video, v_kvaf, e_hats

    def to_velocity(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """prediction="x0" / "delta": the network's estimate x0 of the clean sample (for "delta", its output
        plus the clip's given first frame, which is clean, t = 0) -> the velocity that Eq. 8 and the sampler
        use. From x_t = (1 - t) x0 + t noise: v = (x_t - x0) / t, with t clipped at x0_t_min (x-prediction
        with a v-loss, "Back to Basics: Let Denoising Generative Models Denoise", Li & He 2025, arXiv
        2511.13720: a token of 192 values does not fit through a 192-wide stream when the target carries
        the input noise, as v does). t: (B, T) per latent frame, or (B, F) for numeric tokens."""
        t = t.clamp_min(self.cfg.x0_t_min).to(x0.dtype)
        t = t[:, None, :, None, None] if x0.dim() == 5 else t[..., None]
        return (x_t - x0) / t

    def frame_times(self, t: torch.Tensor, T: int) -> torch.Tensor:
        """(B,) -> (B, T): the given frame 0 clean (t = 0), future frames at t."""
        return frame_times(t, T)

    # ---------------------------------------------------------------- training loss (Eq. 8)
    def loss(self, batch):
        cfg = self.cfg
        if cfg.random_background:                                                # ours (toy): the frames, not the KVAF
            if "seg" not in batch or "latents" in batch:
                raise ValueError("random_background repaints the toy world's table and wall from batch['seg'] and "
                                 "batch['video']; this batch has " + ", ".join(sorted(batch)))
            from data.toyworld import randomize_background
            batch = {**batch, "video": randomize_background(batch["video"], batch["seg"],
                                                            share=cfg.random_background_share)}
        if cfg.color_jitter and "latents" not in batch:                         # ours (toy): the frames, not the KVAF
            batch = {**batch, "video": color_jitter(batch["video"], cfg.color_jitter)}
        z, k = self.streams(batch)
        B, T, dev = z.shape[0], z.shape[2], z.device
        ctx = self.context(batch)
        t = sample_t(cfg.t_sampler, B, device=dev, shift=cfg.t_shift)
        n_z, n_k = torch.randn_like(z), torch.randn_like(k)
        t_v = self.frame_times(t, T)
        z_t = add_noise(z, n_z, t_v[:, None, :, None, None])
        # KVAF stream: noised with the video's t (joint), or clean for a kvaf_cond_prob share of samples
        clean = torch.rand(B, device=dev) < cfg.kvaf_cond_prob
        tk = torch.where(clean, torch.zeros_like(t), t)
        if cfg.kvaf:
            t_k = self.frame_times(tk, T)
            k_t = add_noise(k, n_k, t_k[:, None, :, None, None])
        else:
            t_k = tk[:, None].repeat(1, k.shape[1])
            t_k[:, 0] = 0.0                                                      # the current state is known
            k_t = add_noise(k, n_k, t_k[..., None])
        v_hat, vk_hat, e_hats = self(z_t, t_v, k_t, t_k, ctx)
        w = bell_weight(t, cfg.t_shift if cfg.t_sampler == "shifted" else 1.0).to(dev)       # w(t), Eq. 8
        if cfg.time_weight == "uniform":                                         # variant: every t weighs 1
            w = torch.ones_like(w)
        elif cfg.time_weight == "x0":                                            # ours: t^2 |v_hat - v|^2 = |x0_hat - x0|^2
            w = x0_space_weight(t, cfg.t_shift if cfg.t_sampler == "shifted" else 1.0, cfg.x0_t_min).to(dev)
        per_sample = lambda x: x.float().flatten(1).mean(1)                      # noqa: E731
        l_video = per_sample((v_hat - velocity_target(z, n_z))[:, :, 1:] ** 2)   # first frame excluded
        err_k = (vk_hat - velocity_target(k, n_k)) ** 2
        l_kvaf = per_sample(err_k[:, :, 1:] if cfg.kvaf else err_k[:, 1:])
        noisy = (~clean).float()                                                 # a clean KVAF has nothing to predict
        parts = {"video": (w * l_video).mean(),
                 "kvaf": (w * l_kvaf * noisy).sum() / noisy.sum().clamp(min=1)}
        total = parts["video"] + parts["kvaf"]
        if e_hats:                                                               # EDLS, Eq. 7-8
            zd = batch["edls_latents"] if "edls_latents" in batch else edls_target(batch["video"], self.encode)
            target = patchify(zd, cfg.patch)
            first = int(np.prod(cfg.token_grid[1:]))                             # tokens of the first latent frame
            err = torch.stack([F.mse_loss(e[:, first:].float(), target[:, first:].float()) for e in e_hats]).mean()
            scale = target[:, first:].float().pow(2).mean().clamp_min(1e-8) if cfg.edls_normalize else 1.0
            parts["edls"] = err / scale                                          # normalized: 1 = predicting zeros
            if cfg.stage == "stage2":                                            # frozen fusion in stage 1
                total = total + cfg.edls_weight * parts["edls"]
        return total, {k_: v.detach() for k_, v in parts.items()}

    def param_groups(self):
        """Stage 1: LoRA of both streams (or, with lora_rank=0, the base weights) + the KVAF branch's
        embedding and head; fusion frozen at the identity, so in stage 1 the video stream never sees the
        actions (it learns the KVAF branch and the robot domain; EDLS is logged, not optimized). Stage 2:
        + fusion, where the action conditioning of the video happens. LoRA base weights stay frozen, except
        the video patch embedding under first_frame_concat (its concatenated channels start at zero)."""
        cfg = self.cfg
        names = []
        for n, p in self.named_parameters():
            if n.startswith("fusion."):
                ok = cfg.stage == "stage2"
            elif cfg.lora_rank:
                ok = ".lora_" in n or n.startswith(("kvaf_head.", "kvaf_patch_embedding.", "text_encoder.")) or (
                    cfg.first_frame_concat and n.startswith("video.patch_embedding."))   # its new channels start at 0
            else:
                ok = True
            if ok:
                names.append(n)
        params = dict(self.named_parameters())
        main = [params[n] for n in names if not n.startswith("fusion.")]
        groups = [{"name": "lora" if cfg.lora_rank else "dit", "params": main, "lr": cfg.lr_video}]
        if cfg.stage == "stage2":
            groups.append({"name": "fusion", "params": [params[n] for n in names if n.startswith("fusion.")], "lr": cfg.lr_head})
        return set_trainable(self, groups)

    # ---------------------------------------------------------------- generation (Table 1 / Table 4)
    @torch.no_grad()
    def sample(self, batch, steps=None, generator=None, mode: str | None = None):
        """Generate the clip's future from its first frame + text.

        mode "kvaf": KVAF-conditioned (Table 4), the action stream is given clean (t = 0) from the
        commanded trajectory in the batch (joints / gripper / camera); mode "joint" (Table 1, App. A.3):
        video and action stream are generated together from noise with the same t. None: the mode the
        checkpoint was trained for, "kvaf" if kvaf_cond_prob > 0, else "joint" (kvaf_cond_prob = 0, the
        paper's setting, never shows the model a clean KVAF stream, so "kvaf" then warns).
        -> video_latents (B, C, T, h, w), kvaf (the action stream: KVAF latents or numeric tokens, the
        generated one in joint mode, the given one otherwise)."""
        cfg = self.cfg
        mode = mode or ("kvaf" if cfg.kvaf_cond_prob > 0 else "joint")
        check_choice("mode", mode, ("kvaf", "joint"))
        if mode == "kvaf" and cfg.kvaf_cond_prob == 0:
            warnings.warn("KVAF-conditioned generation from a model trained with kvaf_cond_prob=0: it never saw a "
                          "clean KVAF stream in training (train with --set kvaf_cond_prob=0.5, or use mode='joint')")
        steps = steps or cfg.sample_steps
        z_true, k_true = self.streams(batch)
        B, T, dev = z_true.shape[0], z_true.shape[2], z_true.device
        ax = 2 if cfg.kvaf else 1                # time axis of the action stream: (B, C, T, h, w) | (B, F, d)
        nk = k_true.shape[ax]
        rand = lambda x: torch.randn(x.shape, generator=generator).to(dev)       # noqa: E731
        z = torch.cat([z_true[:, :, :1], rand(z_true[:, :, 1:])], 2)             # the first frame given, the future noise
        k = k_true if mode == "kvaf" else torch.cat([k_true.narrow(ax, 0, 1), rand(k_true.narrow(ax, 1, nk - 1))], ax)
        ctx = self.context(batch)
        ts = shift_t(torch.linspace(1.0, 0.0, steps + 1), cfg.t_shift if cfg.t_sampler == "shifted" else 1.0)
        for i in range(steps):
            t, dt = float(ts[i]), float(ts[i + 1] - ts[i])                       # dt < 0
            tb = torch.full((B,), t, device=dev)
            t_k = torch.zeros(B, nk, device=dev) if mode == "kvaf" else self.frame_times(tb, nk)
            v, vk, _ = self(z, self.frame_times(tb, T), k, t_k, ctx)
            z = torch.cat([z[:, :, :1], z[:, :, 1:] + dt * v[:, :, 1:]], 2)      # Euler step, the first frame kept
            if mode == "joint":
                k = torch.cat([k.narrow(ax, 0, 1), k.narrow(ax, 1, nk - 1) + dt * vk.narrow(ax, 1, nk - 1)], ax)
        return {"video_latents": z, "kvaf": k}

    @torch.no_grad()
    def event_gates(self, batch, t: float = 0.5, generator=None, mode: str | None = None) -> dict:
        """The per-token event gate g of Eq. 4-6 at each fusion layer, for the batch's true clip noised to t
        (the given first frame clean; the action stream given clean in mode "kvaf", noised to t in "joint";
        default: the mode the checkpoint was trained for, as in sample()). A diagnostic: does the gate open
        where things change (sample.py compares it with the event, the EDLS target of Eq. 7)?
        -> {fusion layer: g (B, L_v) on the video tokens}; {} for fusion="plain" (no gate, g = 1)."""
        if self.cfg.fusion == "plain":
            return {}
        mode = mode or ("kvaf" if self.cfg.kvaf_cond_prob > 0 else "joint")
        check_choice("mode", mode, ("kvaf", "joint"))
        z, k = self.streams(batch)
        B, T, dev = z.shape[0], z.shape[2], z.device
        rand = lambda x: torch.randn(x.shape, generator=generator).to(dev)       # noqa: E731
        t_v = self.frame_times(torch.full((B,), float(t), device=dev), T)
        nk = k.shape[2] if self.cfg.kvaf else k.shape[1]
        t_k = torch.zeros(B, nk, device=dev) if mode == "kvaf" else (
            self.frame_times(torch.full((B,), float(t), device=dev), nk))
        z_t = add_noise(z, rand(z), t_v[:, None, :, None, None])
        k_t = add_noise(k, rand(k), t_k[:, None, :, None, None] if self.cfg.kvaf else t_k[..., None])
        gates, hooks = {}, []

        def keep(layer):                                                         # first call: the video side's gate
            def hook(module, inputs, output):
                gates.setdefault(layer, torch.sigmoid(output[..., 0]).float())   # returns None: the output stays
            return hook
        for layer, f in self.fusion.items():
            hooks.append(f.gate.register_forward_hook(keep(int(layer))))
        try:
            self(z_t, t_v, k_t, t_k, self.context(batch))
        finally:
            for h in hooks:
                h.remove()
        return gates

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.codec.decode(z).clamp(-1, 1)
