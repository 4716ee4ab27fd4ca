"""Inference on the toy world: closed-loop rollouts, success tables, generation metrics, pictures.

    python sample.py --ckpt runs/agra                    # success per split + GIF + AGRA diagnostics
    python sample.py --ckpt runs/agra --episodes 100 --splits train ood_layout
    python sample.py --ckpt runs/mvwam --rollback        # success with and without value-guided rollback
    python sample.py --ckpt runs/eawm                    # video generation from first frame + actions / text
    python sample.py --ckpt runs/agra_full --data data/encoded/aloha_agra   # real data: decode with the VAE, write MP4
    python sample.py --compare runs/wam_s* runs/agra_s*  # one table of variants, mean +- SE over seeds (+ JSON, SVG)
    python sample.py --curves runs/wam_s* runs/agra_s*   # success against training step (train.py --eval-every)

Every run writes pictures to --out (default: <ckpt>/samples): `rollout_<split>.gif` (observation |
the model's predicted future, re-planned every chunk); AGRA: `agra_diagnostics_<split>.png` per split
(frame | action-head cross-attention | mean-intervention heatmap, all on the last latent frame, the
interaction mask outlined); MV-WAM with --rollback: `rollback_<split>.gif` (an episode where a rollback
fired, the restored frame outlined in red); EA-WM: `generation_<split>.gif` (true | generated from KVAF | generated jointly | generated KVAF; the first three
clips) and `generation_<split>.png`, its 6th future frame in exact colours.
`metrics.json` holds every printed number and the settings that produced them. With --data ENCODED (a
folder of data/encode.py, the way the full presets train) the model predicts clips of that dataset, the
predicted latents are decoded with the same VAE, and `samples.mp4` (or .gif) shows true (VAE
reconstruction) | predicted per clip.

--compare RUN... and --curves RUN... turn run folders into one table of variants (mean +- standard error
over seeds, comparison.md / .json / .svg) and learning curves (curves.json / .svg); compare.py implements
them and defines the grouping, the standard error and the `*` marker. They are flags of this script, not a
script of their own, because they read what this script and train.py write.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import colormap, pick_device, save_gif, save_mp4, save_png  # noqa: E402
from data.toyworld import SPLITS, VIEWS, ClipDataset, ToyWorld, generate  # noqa: E402
from train import dataset_for, load_model, to_device  # noqa: E402


class Policy:
    """Wraps a trained model: normalizes observations, samples a chunk, de-normalizes actions."""

    def __init__(self, model, cfg, stats, device, steps=None):
        self.model, self.cfg, self.device, self.steps = model.eval(), cfg, device, steps
        self.a_mean, self.a_std = np.array(stats["actions"]["mean"]), np.array(stats["actions"]["std"])
        self.s_mean, self.s_std = np.array(stats["state"]["mean"]), np.array(stats["state"]["std"])

    def batch(self, frames, states, texts):
        video = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2)[:, :, None].float() / 127.5 - 1   # (N, 3, 1, H, W)
        state = torch.from_numpy((np.stack(states) - self.s_mean) / self.s_std).float()
        return {"video": video.to(self.device), "state": state.to(self.device), "text": list(texts)}

    @torch.no_grad()
    def act(self, frames, states, texts, generator) -> dict:
        """-> actions (N, K, d_a) in env units, plus value (N,) and the predicted future frames
        (N, T-1, H, W, 3) uint8 when the model produces them (MV-WAM)."""
        out = self.model.sample(self.batch(frames, states, texts), steps=self.steps, generator=generator)
        plan = {"actions": out["actions"].cpu().double().numpy() * self.a_std + self.a_mean}
        if out.get("value") is not None:
            plan["value"] = out["value"].float().cpu().numpy()
        if out.get("video_latents") is not None and hasattr(self.model, "decode"):
            v = self.model.decode(out["video_latents"])[:, :, 1:]                                        # (N, 3, T-1, H, W)
            plan["frames"] = ((v.permute(0, 2, 3, 4, 1).cpu() + 1) * 127.5).round().byte().numpy()
        return plan


def split_noise(seed: int) -> torch.Generator:
    """The sampling noise of one pass over one split: every split, and each pass over it (the rollouts, the rollback
    pass, the GIF's predicted video, the diagnostics), starts from the same seed, so a split's figures are the same
    whichever splits and flags ran with it, train.py --eval-every's match sample.py's, and the rollback pass repeats
    the plain pass's episodes exactly until a rollback first fires in one of them (they run in lock-step on one
    noise stream)."""
    return torch.Generator().manual_seed(seed)


def mark(frame: np.ndarray, color=(255, 0, 0)) -> np.ndarray:
    """A 1-pixel coloured border (rollback frames in GIFs)."""
    f = frame.copy()
    f[0, :], f[-1, :], f[:, 0], f[:, -1] = color, color, color, color
    return f


def rollout(policy: Policy, split: str, episodes: int, seed0: int, exec_steps: int, max_steps: int, res: int,
            generator, record: int = 0, predict_video=None, rollback=None, distractors: bool = True, mark_target: bool = False,
            view: str = "wide", distractor_band: str = "any", shape_texture: bool = False):
    """Run `episodes` envs of `split` in lock-step, re-planning every `exec_steps` actions.

    rollback: None or a factory of MV-WAM's ValueRollback controllers (Sec. 3.2): before a chunk is
    executed its predicted value is checked; on a drop below peak - delta the env is restored to the
    peak's saved state (the episode clock keeps running: a rollback costs the time already spent) and
    the chunk is resampled from there. Returns per-episode success, stage flags (with rollback also
    "rollback_steps": per rollback, the step it fired at and the step it restored), rollback counts and
    (if record) frames [observation | predicted frame] of the first `record` envs (restored frames
    outlined in red). distractors=False: the same scenes with the named object alone; mark_target=True: the
    named object drawn in a colour no object has; view: "wide" or "close", distractor_band: "any" or "near",
    shape_texture: each shape with its own surface pattern (ToyWorld)."""
    envs = [ToyWorld(res=res, max_steps=max_steps, distractors=distractors, mark_target=mark_target, view=view,
                     distractor_band=distractor_band, shape_texture=shape_texture) for _ in range(episodes)]
    obs = [env.reset(seed=seed0 + i, split=split)[0] for i, env in enumerate(envs)]
    twin = [env.same_color_distractor() for env in envs]           # only the shape word names the object
    done = np.zeros(episodes, bool)
    success = np.zeros(episodes, bool)
    stages = [None] * episodes
    ctrl = [rollback() for _ in range(episodes)] if rollback is not None else None
    fired = np.zeros(episodes, int)
    fire_steps = [[] for _ in range(episodes)]                  # per rollback: (the step it fired at, the step restored)
    frames_rec = [[np.concatenate([obs[i], np.zeros_like(obs[i])], 1)] for i in range(record)]
    while not done.all():
        live = np.flatnonzero(~done)
        act = lambda ids: policy.act([obs[i] for i in ids], [envs[i].proprio() for i in ids],  # noqa: E731
                                     [envs[i].instruction() for i in ids], generator)
        plan = act(live)
        if ctrl is not None:                                     # value-guided rollback (Sec. 3.2)
            redo = []
            for j, i in enumerate(live):
                saved = ctrl[i].check(envs[i].get_state(), float(plan["value"][j]), plan["actions"][j])
                if saved is not None:
                    clock = envs[i].t
                    fire_steps[i].append((clock, saved["t"]))
                    envs[i].set_state(saved)
                    envs[i].t = clock
                    obs[i] = envs[i].render()[0]
                    fired[i] += 1
                    redo.append(j)
                    if i < record:
                        frames_rec[i].append(np.concatenate([mark(obs[i]), np.zeros_like(obs[i])], 1))
            if redo:                                             # resample the chunk from the restored states
                again = act(live[redo])
                for key in plan:
                    plan[key][redo] = again[key]
        chunk = plan["actions"]
        pred = plan.get("frames")
        if pred is None and predict_video is not None and record and live[0] < record:
            pred = predict_video([obs[i] for i in live[:record]], [envs[i].instruction() for i in live[:record]])
        for k in range(min(exec_steps, chunk.shape[1])):
            for j, i in enumerate(live):
                if done[i]:
                    continue
                obs[i], _, term, trunc, info = envs[i].step(chunk[j, k])
                stages[i] = dict(info["stages"], close_miss=info["close_miss"], close_toward=info["close_toward"],
                                 same_color=twin[i])
                if i < record:                                   # observation at t+k+1 | predicted frame t+k+1
                    p = pred[j][min(k, len(pred[j]) - 1)] if pred is not None and j < len(pred) else np.zeros_like(obs[i])
                    frames_rec[i].append(np.concatenate([obs[i], p], 1))
                if term or trunc:
                    done[i], success[i] = True, info["success"]
    if ctrl is not None:
        for st, steps in zip(stages, fire_steps):
            if st is not None:
                st["rollback_steps"] = steps
    return success, stages, frames_rec, fired


def standard_error(p: float, n: int) -> float:
    """Standard error of a success rate p measured on n independent episodes: sqrt(p (1 - p) / n)."""
    return math.sqrt(p * (1 - p) / n) if n else float("nan")


STAGES = ("reached", "grasped", "lifted", "distractor_grasped")   # toy-world info["stages"]; the last: a grounding failure


def success_row(success: np.ndarray, stages: list) -> dict:
    """Per-split summary of `rollout`: success rate, its standard error, episodes, stage rates, and
    close_miss_failed: over the failed episodes whose gripper closed, the median xy distance from the gripper to
    the named object at the first close (None if none closed). Against the grasp tolerance (ToyWorld.grasp_xy) it
    tells a reach that went beside the object (just above it: precision) from one that went elsewhere.
    close_toward_failed: the median of that offset's component towards the nearest other object (ToyWorld's
    close_toward): near close_miss, the reach went that object's way (pulled between the two); near 0, another way.
    success_same_color (same_color_episodes of them): the success rate in the scenes where a distractor has the named
    object's colour, so that only the shape word tells the two apart (None if there is none); success_other_color:
    in the rest."""
    p = float(success.mean())
    row = {"success": p, "success_se": standard_error(p, len(success)), "episodes": len(success)}
    for s in STAGES:
        row[s] = float(np.mean([st[s] for st in stages]))
    miss = [st["close_miss"] for st, ok in zip(stages, success) if not ok and st.get("close_miss") is not None]
    row["close_miss_failed"] = float(np.median(miss)) if miss else None
    toward = [st["close_toward"] for st, ok in zip(stages, success) if not ok and st.get("close_toward") is not None]
    row["close_toward_failed"] = float(np.median(toward)) if toward else None
    twin = np.array([bool(st.get("same_color")) for st in stages])
    row["same_color_episodes"] = int(twin.sum())
    row["success_same_color"] = float(success[twin].mean()) if twin.any() else None
    row["success_other_color"] = float(success[~twin].mean()) if (~twin).any() else None
    return row


def quick_eval(name: str, model, cfg, stats, episodes: int, splits=SPLITS, seed: int = 100000, world=None) -> dict:
    """train.py --eval-every: per split, closed-loop success on `episodes` held-out episodes (AGRA,
    MV-WAM; re-planning every horizon // 2 actions) or the PSNR of `episodes` generated held-out clips
    against copying the first frame (EA-WM), in a world with the scene options `world` (toyworld's
    world_options of the training data: distractors, mark_target, view, distractor_band, shape_texture). Leaves the model in eval mode."""
    world = world or {}
    device = next(model.parameters()).device
    out = {}
    for split in splits:
        gen = split_noise(seed)                                                  # as sample.py: the same figures
        if name == "eawm":
            arrays, dmeta = generate(max(2, episodes // 4), split, seed0=seed + 50000, res=cfg.height, **world)
            dmeta["stats"] = stats
            r = eawm_report(model, cfg, dataset_for(cfg, arrays, dmeta), episodes, gen, None, modes=("kvaf",))
            out[split] = {"psnr": r["kvaf"]["psnr"], "psnr_copy_first": r["copy_first"]["psnr"], "clips": episodes}
        else:
            policy = Policy(model, cfg, stats, device)
            success, stages, _, _ = rollout(policy, split, episodes, seed, max(1, cfg.horizon // 2), 60, cfg.height, gen,
                                            **world)
            row = success_row(success, stages)
            out[split] = {k: row[k] for k in ("success", "episodes") + STAGES}
    return out


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(a random `pos` score > a random `neg` score), ties count 1/2 (the Mann-Whitney AUC)."""
    pos, neg = np.asarray(pos, np.float64)[:, None], np.asarray(neg, np.float64)[None, :]
    return float(((pos > neg) + 0.5 * (pos == neg)).mean())


def value_report(model, cfg, clips: ClipDataset, n: int, generator, failing: ClipDataset | None = None) -> dict:
    """MV-WAM: the sampled value against the true Monte-Carlo return (Eq. 4) on held-out expert clips.
    `failing`: clips of failing demos (a distractor goes to the bin; true return 0). Compared on the
    clips where the gripper holds an object (closed at the clip's first frame), so that the state alone
    cannot tell them apart: AUC 1 = the value tells the named object in hand from a distractor, 0.5 = it
    cannot (a grounding test of the value head, which rollback at delta relies on)."""
    rows = torch.randperm(len(clips), generator=torch.Generator().manual_seed(0))[:n].numpy()   # same clips for every model
    batch = clips.get(rows)
    pred = model.sample(batch, generator=generator)["value"].float()
    true = batch["value"].float()
    r = torch.corrcoef(torch.stack([pred, true]))[0, 1].item()
    out = {"pearson": r, "mae": (pred - true).abs().mean().item(), "n": len(rows)}
    if failing is not None:
        held = {}
        for name, ds in (("success", clips), ("failing", failing)):
            closed = ds.a["state"][ds.ep_start[ds.index[:, 0]] + ds.index[:, 1], 3] < 0.5
            rows = np.flatnonzero(closed)
            rows = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(1))[:n].numpy()]
            held[name] = model.sample(ds.get(rows), generator=generator)["value"].float().cpu().numpy()
        out.update({"holding_value": float(held["success"].mean()), "failing_value": float(held["failing"].mean()),
                    "holding_auc": auc(held["success"], held["failing"]), "n_holding": len(held["failing"])})
    return out


# ---------------------------------------------------------------------------------------------------------------
# AGRA: diagnostics on held-out expert clips (Sec. 3.2, 4.2.1, Table 1)
# ---------------------------------------------------------------------------------------------------------------


def overlay(frame: np.ndarray, heat: np.ndarray, mask: np.ndarray | None = None, scale: int = 4) -> np.ndarray:
    """Frame (H, W, 3) uint8 + heat (h, w) in [0, 1] -> blended (H*scale, W*scale, 3), mask outlined in white."""
    H, W = frame.shape[:2]
    big = frame.repeat(scale, 0).repeat(scale, 1).astype(np.float32)
    hm = F.interpolate(torch.tensor(heat)[None, None].float(), size=(H * scale, W * scale), mode="bilinear",
                       align_corners=False)[0, 0].numpy()
    out = 0.45 * big + 0.55 * colormap(hm).astype(np.float32)
    if mask is not None:
        m = mask.repeat(scale, 0).repeat(scale, 1)
        edge = m & ~(np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1))
        out[edge] = 255
    return out.clip(0, 255).astype(np.uint8)


def agra_report(model, cfg, clips: ClipDataset, png: str, n: int, generator) -> dict:
    import agra
    rows = torch.randperm(len(clips), generator=torch.Generator().manual_seed(0))[:n].numpy()   # same clips for every model
    batch = clips.get(rows)
    focus = {}
    attn = agra.cross_attention_maps(model, batch, generator, focus=focus)          # (B, N, T, h, w)
    mask = agra.token_mask(batch["interaction_mask"], cfg)                           # (B, T, h, w)
    metrics = agra.attention_metrics(attn.mean(1), mask)
    metrics["mask_fraction"] = mask.float().mean().item()                           # chance level of the in-mask ratio
    metrics["attention_entropy"] = focus["entropy"]                                 # 1 = spread uniformly
    metrics["attention_entropy_per_block"] = focus["entropy_per_block"]
    a = attn.mean(1).flatten(2)                                                     # (B, T, h w)
    metrics["current_frame_share"] = (a[:, 0].sum(-1) / a.sum((1, 2)).clamp_min(1e-12)).mean().item()
    metrics["current_frame_uniform"] = 1.0 / cfg.token_grid[0]                      # its level under uniform attention
    per_block = [agra.attention_metrics(attn[:, j], mask)["in_mask_ratio"] for j in range(attn.shape[1])]
    metrics["in_mask_ratio_per_block"] = per_block
    metrics["msr"] = {k: agra.sensitivity_ratio(model, batch, k, generator=generator) for k in ("mean", "zero", "shuffle", "swap")}
    k = min(4, n)
    # pictures on the last latent frame the head reads (Sec. 3.2 shows the intervention map on the last one; with
    # bridge_tokens=current the head reads the current frame only), drawn over its first raw frame
    f = 0 if cfg.bridge_tokens == "current" else cfg.latent_frames - 1
    heat = agra.intervention_heatmap(model, {kk: (v[:k] if torch.is_tensor(v) else v[:k]) for kk, v in batch.items()}, "mean",
                                     frame=f, generator=generator)
    raw = 0 if f == 0 else 1 + (f - 1) * cfg.latent_q                                   # raw index of that frame
    frames = ((batch["video"][:k, :, raw].permute(0, 2, 3, 1) + 1) * 127.5).round().byte().numpy()
    pix_mask = batch["interaction_mask"][:k, f].numpy()
    a0 = attn[:k].mean(1)[:, f]                                                        # that latent frame
    a0 = (a0 - a0.amin((1, 2), keepdim=True)) / (a0.amax((1, 2), keepdim=True) - a0.amin((1, 2), keepdim=True)).clamp_min(1e-12)
    rows_img = [np.concatenate([frames[i].repeat(4, 0).repeat(4, 1), overlay(frames[i], a0[i].numpy(), pix_mask[i]),
                                overlay(frames[i], heat[i].numpy(), pix_mask[i])], 1) for i in range(k)]
    save_png(png, np.concatenate(rows_img, 0))
    return metrics


# ---------------------------------------------------------------------------------------------------------------
# EA-WM: action-conditioned video generation against the toy world's true rendering
# ---------------------------------------------------------------------------------------------------------------


def to_uint8(v: torch.Tensor) -> np.ndarray:
    """(B, 3, F, H, W) in [-1, 1] -> (B, F, H, W, 3) uint8."""
    return ((v.permute(0, 2, 3, 4, 1).cpu().clamp(-1, 1) + 1) * 127.5).round().byte().numpy()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0 ** 2 / max(mse, 1e-10)))


# the recovery's tracking gate (eawm.recover_ee_track's max_step), as a fraction of the frame width per frame: the toy
# expert's end effector moves at most 0.081 of it in one frame (2.6 pixels at 32 x 32; 982 held-out clips)
EE_MAX_STEP = 0.1


def episode_thirds(clips: ClipDataset, rows: np.ndarray) -> np.ndarray:
    """Which third of its episode each clip (a row of clips.index) starts in: 0, 1 or 2, roughly the toy expert's
    approach to the named object, its grasp, lift and carry, and its place and release."""
    ep, start = clips.index[rows, 0], clips.index[rows, 1]
    return np.minimum(3 * start // clips.ep_len[ep], 2)


def other_target_tracks(clips: ClipDataset, rows: np.ndarray, K: np.ndarray, T_wc: np.ndarray) -> list:
    """For each clip (a row of clips.index): the end effector's pixel tracks over the clip's frames in the toy expert's
    episodes of the same scene with each *other* object named (ToyWorld.reset(target=k): the same seed, layout and
    start; the expert's noise seeded as in data.toyworld.generate), each moved to start where the clip's own track
    starts -> a list of (objects - 1, F, 2) arrays. They are what a generated track that heads for another object than
    the named one would follow; with the named object itself the expert's episode is the clip's own (a test checks it)."""
    from common import project
    from data.toyworld import run_expert_episode
    m = clips.meta
    env = ToyWorld(res=m["res"], task=m["task"], distractors=m["distractors"], mark_target=m["mark_target"],
                   view=m["view"], distractor_band=m["distractor_band"], shape_texture=m.get("shape_texture", False))
    cache, out = {}, []
    for row in rows:
        ep, start = int(clips.index[row, 0]), int(clips.index[row, 1])
        e = m["episodes"][ep]
        frames = start + clips.stride * np.arange(clips.frames)                  # the clip's frames in its episode
        own = project(clips.a["ee_pose"][clips.ep_start[ep] + np.minimum(frames, clips.ep_len[ep] - 1), :3]
                      .astype(np.float64), K, T_wc)[0]
        tracks = []
        for k in range(len(e["shapes"])):
            if k == e["target"]:
                continue
            if (ep, k) not in cache:
                rec, _ = run_expert_episode(env, e["seed"], e["split"], target=k)
                cache[ep, k] = project(np.array(rec["ee"])[:, :3].astype(np.float64), K, T_wc)[0]
            t = cache[ep, k][np.minimum(frames, len(cache[ep, k]) - 1)]
            tracks.append(t - t[0] + own[0])
        out.append(np.stack(tracks) if tracks else np.zeros((0, clips.frames, 2)))
    return out


GATE_T = 0.5                                                                     # the noise level of the gate diagnostic
STILL_FRAME = 5                                                                  # generation_<split>.png: the 6th future frame


def gate_stats(gate: torch.Tensor, event: torch.Tensor) -> dict:
    """An event gate g (B, L) against the event magnitude of the same tokens (B, L): the gate's mean, its standard
    deviation over the tokens, and its Pearson correlation with the event (NaN where either is constant). A gate
    that opens where things change, as Eq. 4-6 intend, correlates with the event; a constant gate scales the
    fusion and nothing more."""
    g, e = gate.double().flatten(), event.double().flatten()
    gc, ec = g - g.mean(), e - e.mean()
    denom = (gc.pow(2).sum() * ec.pow(2).sum()).sqrt()
    return {"mean": float(g.mean()), "sd": float(g.std()),
            "corr_event": float((gc * ec).sum() / denom) if denom > 0 else float("nan")}


def eawm_report(model, cfg, clips: ClipDataset, n: int, generator, gif: str | None, steps=None,
                modes=("kvaf", "joint")) -> dict:
    """Generate the future of `n` held-out clips in both modes; PSNR (future frames, 8-bit) and latent
    MSE against the true rendering of the same commanded actions, and the end-effector track recovered
    from the generated KVAF (joint mode; tracked from the given first frame with the EE_MAX_STEP gate, frames
    without a detection filled from the nearest one; `ee_detected`: the share of future frames with a detection
    of their own; the numeric ablation: FK of its generated joints) against the true one, in pixels; with two
    references: the track recovered from the given, true KVAF (kvaf mode:
    what the recovery itself misses) and the first frame's end effector held still (copy_first). The same track
    error by where the clip starts in its episode (`ee_track_px_thirds`: the mean over the clips that start in its
    first, middle and last third, `clips_thirds` of them; roughly the approach to the named object, the grasp and
    carry, the place), so that a model which generates one phase of the task and not another shows it.
    And in both modes where the generated *video* puts the arm (`arm_px`, `arm_px_se`, `arm_px_thirds`): the end
    effector of the arm pose fitted to each generated RGB frame (toyworld.fit_arm) against the true one, in pixels,
    so the KVAF-conditioned mode says whether the video's arm follows the commanded actions, and every variant
    (the numeric ablation too) is read the same way; `true_video` is the same fit on the true frames (its floor).
    Where the joint track goes when it misses: its error against the nearest of the tracks the expert would have drawn
    in the same scene to each other object (other_target_tracks; per clip the least mean error over those objects),
    by episode third (`ee_other_px_thirds`), the share of clips closer to such a track than to the true one
    (`closer_to_other_thirds`), and, as the reference, the true track's own distance to the nearest of them
    (`true_track.ee_other_px_thirds`): on a split whose named objects lie where no demo goes, a generated approach
    that follows another object's track heads where the demos' targets lie.
    And the event gate of each fusion layer (`gate`, event fusion only; Model.event_gates at t = GATE_T,
    the clip's true streams noised with a fixed seed, after the generations, so it changes none of their numbers):
    its mean and spread over the future tokens and its correlation with the token's event, |the EDLS target|."""
    import eawm
    from common import project
    from data.toyworld import fit_arm
    rows = torch.randperm(len(clips), generator=torch.Generator().manual_seed(0))[:n].numpy()   # same clips for every model
    batch = clips.get(rows)
    true = to_uint8(batch["video"])[:, 1:]
    z_true = model.encode(batch["video"])
    K, T_wc = batch["K"][0].numpy(), batch["T_wc"][0].numpy()
    ee_true = project(batch["ee_pose"][..., :3].numpy().astype(np.float64), K, T_wc)[0]                # (B, F, 2)
    # reference: a "world model" that predicts no change (the first frame repeated)
    still = to_uint8(batch["video"][:, :, :1].expand_as(batch["video"]))[:, 1:]
    out = {"copy_first": {"psnr": float(np.mean([psnr(g, t) for g, t in zip(still, true)])),
                          "latent_mse": F.mse_loss(z_true[:, :, :1].expand_as(z_true)[:, :, 1:], z_true[:, :, 1:]).item(),
                          # its end effector: held where the first frame has it
                          "ee_track_px": float(np.linalg.norm(ee_true[:, 1:] - ee_true[:, :1], axis=-1).mean())}}
    third = episode_thirds(clips, rows)

    def by_third(row, per_clip):                                                 # clips never detected (NaN) left out
        v = [per_clip[(third == k) & np.isfinite(per_clip)] for k in range(3)]
        row["ee_track_px_thirds"] = [float(x.mean()) if len(x) else float("nan") for x in v]
        row["clips_thirds"] = [len(x) for x in v]
    by_third(out["copy_first"], np.linalg.norm(ee_true[:, 1:] - ee_true[:, :1], axis=-1).mean(1))
    ee_true = ee_true[:, 1:]

    def arm_track(row, frames):                                                  # the arm the video shows (fit_arm)
        uv = fit_arm(frames.reshape(-1, *frames.shape[2:]), K, T_wc)[1].reshape(ee_true.shape)
        per_clip = np.linalg.norm(uv - ee_true, axis=-1).mean(1)
        row["arm_px"] = float(per_clip.mean())
        row["arm_px_se"] = float(per_clip.std(ddof=1) / np.sqrt(len(per_clip))) if len(per_clip) > 1 else float("nan")
        row["arm_px_thirds"] = [float(per_clip[third == k].mean()) if (third == k).any() else float("nan") for k in range(3)]
    out["true_video"] = {}
    arm_track(out["true_video"], true)
    others = other_target_tracks(clips, rows, K, T_wc) if "episodes" in clips.meta else None

    def to_other(tr):                           # (B, F - 1, 2) future track -> per clip, px to the nearest other track
        return np.array([np.nanmin([np.nanmean(np.linalg.norm(tr[i] - o[1:], axis=-1)) for o in others[i]])
                         if len(others[i]) and np.isfinite(tr[i]).any() else np.nan for i in range(len(tr))])
    if others is not None:
        out["true_track"] = {"ee_other_px_thirds": [float(np.nanmean(x)) if np.isfinite(x).any() else float("nan")
                                                    for x in (to_other(ee_true)[third == k] for k in range(3))]}
    pictures = {}
    for mode in modes:
        res = model.sample(batch, steps=steps, generator=generator, mode=mode)
        gen = to_uint8(model.decode(res["video_latents"]))[:, 1:]
        row = {"psnr": float(np.mean([psnr(g, t) for g, t in zip(gen, true)])),
               "latent_mse": F.mse_loss(res["video_latents"][:, :, 1:], z_true[:, :, 1:]).item()}
        arm_track(row, gen)
        detected = None
        if cfg.kvaf:
            kv = to_uint8(model.decode(res["kvaf"]))
            found = [eawm.recover_ee_track(k, max_step=EE_MAX_STEP * cfg.width, with_detected=True) for k in kv]
            track, detected = np.stack([f[0] for f in found])[:, 1:], np.stack([f[1] for f in found])[:, 1:]
        else:                                                                    # numeric stream: FK of the joints
            q = res["kvaf"].cpu().double().numpy()
            fk = model.chain.fk(np.concatenate([q[..., :3], np.zeros(q.shape[:-1] + (1,))], -1))[cfg.ee_link]
            track = project(fk[..., :3, 3], K, T_wc)[0][:, 1:]
            kv = np.zeros_like(gen)
        if mode == "joint" or cfg.kvaf:                                          # kvaf mode: the given, true KVAF
            err = np.linalg.norm(track - ee_true, axis=-1)                       #   (the recovery's own floor)
            row["ee_track_px"] = float(np.nanmean(err)) if np.isfinite(err).any() else float("nan")
            per_clip = np.array([np.nanmean(e) if np.isfinite(e).any() else np.nan for e in err])
            found = per_clip[np.isfinite(per_clip)]                                       # SE over the clips
            row["ee_track_px_se"] = float(found.std(ddof=1) / np.sqrt(len(found))) if len(found) > 1 else float("nan")
            row["ee_detected"] = float(np.isfinite(err).mean() if detected is None else detected.mean())
            by_third(row, per_clip)
            if mode == "joint" and others is not None:
                other = to_other(track)
                ok = np.isfinite(other) & np.isfinite(per_clip)
                row["ee_other_px_thirds"] = [float(other[ok & (third == k)].mean()) if (ok & (third == k)).any()
                                             else float("nan") for k in range(3)]
                row["closer_to_other_thirds"] = [float((other < per_clip)[ok & (third == k)].mean())
                                                 if (ok & (third == k)).any() else float("nan") for k in range(3)]
        out[mode] = row
        pictures[mode] = (gen, kv[:, 1:] if cfg.kvaf else kv)
    if cfg.fusion == "event":                                 # after generation: its noise is not drawn from `generator`
        event = eawm.patchify(eawm.edls_target(batch["video"], model.encode), cfg.patch).abs().mean(-1)   # |Eq. 7| per token
        first = int(np.prod(cfg.token_grid[1:]))                                 # the given first frame's tokens left out
        gates = model.event_gates(batch, t=GATE_T, generator=torch.Generator().manual_seed(0))
        out["gate"] = {str(layer): gate_stats(g[:, first:], event[:, first:]) for layer, g in gates.items()}
    if gif and len(modes) == 2:                                                  # true | generated (KVAF mode) | generated (joint) | KVAF (joint)
        k = min(3, n)
        frames = [np.concatenate([np.concatenate([true[i, f], pictures["kvaf"][0][i, f], pictures["joint"][0][i, f],
                                                  pictures["joint"][1][i, f]], 1) for i in range(k)], 0)
                  for f in range(true.shape[1])]
        save_gif(gif, np.stack(frames), fps=4, scale=4)
        still = frames[min(STILL_FRAME, len(frames) - 1)]                          # exact colours (the GIF's are paletted)
        save_png(os.path.splitext(gif)[0] + ".png", still.repeat(4, 0).repeat(4, 1))
    return out


def eawm_main(args, model, cfg, meta, out_dir):
    """sample.py --model eawm: generation quality per split (EA-WM Table 1 / Table 4 style)."""
    results = {"model": "eawm", "checkpoint": args.ckpt, "step": meta.get("step"), "clips": args.clips, "splits": {}}
    world = eval_world(args, meta)
    results["settings"] = eval_settings(args, "eawm", cfg, world)
    print(f"eawm checkpoint {args.ckpt} (step {meta.get('step')}): {args.clips} held-out clips per split, "
          f"{args.steps or cfg.sample_steps} Euler steps")
    print(f"{'split':16s} {'PSNR kvaf-cond':>14s} {'MSE kvaf-cond':>13s} {'PSNR joint':>10s} {'MSE joint':>9s} "
          f"{'EE track px':>13s} {'detected':>8s} {'PSNR copy-first':>15s} {'EE px still':>11s} {'EE px true KVAF':>15s}")
    for split in args.splits:
        arrays, dmeta = generate(max(4, args.clips // 4), split, seed0=args.seed + 50000, res=cfg.height, **world)
        dmeta["stats"] = meta["stats"]
        clips = dataset_for(cfg, arrays, dmeta)
        r = eawm_report(model, cfg, clips, args.clips, split_noise(args.seed),             # the same noise for every model
                        os.path.join(out_dir, f"generation_{split}.gif"), args.steps)
        results["splits"][split] = r
        j, c = r["joint"], r["kvaf"]
        print(f"{split:16s} {c['psnr']:14.2f} {c['latent_mse']:13.4f} {j['psnr']:10.2f} {j['latent_mse']:9.4f} "
              f"{j['ee_track_px']:6.2f} ± {j['ee_track_px_se']:4.2f} {j['ee_detected']:8.2f} {r['copy_first']['psnr']:15.2f} "
              f"{r['copy_first']['ee_track_px']:11.2f} {c.get('ee_track_px', float('nan')):15.2f}")
    print("\nEE track px by where the clip starts in its episode (its first / middle / last third: about the approach, "
          "the grasp and carry, the place), joint | the arm held still | clips")
    for split, r in results["splits"].items():
        j, c = r["joint"]["ee_track_px_thirds"], r["copy_first"]
        print(f"{split:16s} {' / '.join(f'{x:5.2f}' for x in j)}  |  {' / '.join(f'{x:5.2f}' for x in c['ee_track_px_thirds'])}"
              f"  |  {' / '.join(str(x) for x in c['clips_thirds'])}")
    if all("ee_other_px_thirds" in r["joint"] for r in results["splits"].values()):
        print("\nThe same joint track against the nearest of the expert's tracks to another object in the same scene "
              "(first / middle / last third) | the share of clips closer to that track than to the true one | the true "
              "track's own distance to it")
        for split, r in results["splits"].items():
            j, t = r["joint"], r["true_track"]
            print(f"{split:16s} {' / '.join(f'{x:5.2f}' for x in j['ee_other_px_thirds'])}  |  "
                  f"{' / '.join(f'{x:4.2f}' for x in j['closer_to_other_thirds'])}  |  "
                  f"{' / '.join(f'{x:5.2f}' for x in t['ee_other_px_thirds'])}")
    print("\nThe arm in the generated video (toyworld.fit_arm on each RGB frame): its end effector's error in px, mean ± SE "
          "over the clips, KVAF-conditioned | joint | the same fit on the true frames (its floor) | the arm held still; "
          "then KVAF-conditioned by episode third")
    for split, r in results["splits"].items():
        c, j, t = r["kvaf"], r["joint"], r["true_video"]
        print(f"{split:16s} {c['arm_px']:5.2f} ± {c['arm_px_se']:4.2f} | {j['arm_px']:5.2f} ± {j['arm_px_se']:4.2f} | "
              f"{t['arm_px']:5.2f} | {r['copy_first']['ee_track_px']:5.2f}  |  {' / '.join(f'{x:5.2f}' for x in c['arm_px_thirds'])}")
    if all(r.get("gate") for r in results["splits"].values()):
        print(f"\nThe event gate g of each fusion layer (Eq. 4) at t = {GATE_T} on the same clips' future tokens: mean, "
              f"standard deviation over the tokens, correlation with the token's event (|the EDLS target|, Eq. 7)")
        for split, r in results["splits"].items():
            print(f"{split:16s} " + "  |  ".join(f"layer {layer}: {g['mean']:.3f} sd {g['sd']:.3f} r {g['corr_event']:+.2f}"
                                                 for layer, g in r["gate"].items()))
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(results, f, indent=1)
    print("\nPSNR copy-first: the first frame repeated (a model that predicts no motion), on the same clips; EE track px: the "
          "end effector recovered from the jointly generated KVAF, mean ± SE over the clips; detected: the share of its "
          "frames found in the KVAF itself (the rest take the nearest detection); EE px still: the first frame's end "
          "effector held; EE px true KVAF: the recovery on the given, true KVAF")
    print(f"\nwrote {out_dir}/ (generation_<split>.gif: true | generated, KVAF-conditioned | generated, joint | "
          f"generated KVAF, the first three clips; generation_<split>.png: its future frame {STILL_FRAME + 1}; metrics.json)")
    return results


# ---------------------------------------------------------------------------------------------------------------
# Real data: predictions on an encoded dataset, decoded with the same VAE
# ---------------------------------------------------------------------------------------------------------------


def encoded_main(args, name, model, cfg, meta, out_dir, gen, device):
    """sample.py --data ENCODED: predict `--clips` clips of an encoded dataset (data/encode.py), decode true
    and predicted latents with the dataset's VAE and write them side by side as MP4 (PyAV) or GIF.
    AGRA: the action chunk (one t = 1 video pass + 4 Euler steps) and a `--video-steps` video generation;
    MV-WAM: joint video + action denoising; EA-WM: KVAF-conditioned generation."""
    from data.encode import EncodedClips, WanVAE
    clips = EncodedClips(args.data)
    clips.check(name, cfg)
    v = clips.index["encoders"]["vae"]
    model.codec = WanVAE(args.vae or v["source"], v.get("subfolder", "vae"), device)    # decode() / sample_video() use it
    rows = torch.randperm(len(clips), generator=torch.Generator().manual_seed(0))[:args.clips].numpy()
    batch = to_device(clips.get(rows), device)
    t0 = time.time()
    with torch.no_grad():
        if name == "agra":
            out = model.sample(batch, steps=args.steps, generator=gen)
            pred = model.sample_video(batch, steps=args.video_steps, generator=gen)
        elif name == "mvwam":
            out = model.sample(batch, steps=args.steps, generator=gen)
            pred = model.decode(out["video_latents"])
        else:
            out = model.sample(batch, steps=args.steps, generator=gen, mode="kvaf")
            pred = model.decode(out["video_latents"])
        true = model.codec.decode(batch["latents"])
    true_u8, pred_u8 = to_uint8(true), to_uint8(pred)
    res = {"model": name, "checkpoint": args.ckpt, "data": args.data, "clips": len(rows), "step": meta.get("step"),
           "psnr_future": float(np.mean([psnr(p[1:], t[1:]) for p, t in zip(pred_u8, true_u8)])), "seconds": time.time() - t0}
    if out.get("actions") is not None:
        res["action_mse"] = F.mse_loss(out["actions"].float(), batch["actions"].float()).item()
    if out.get("video_latents") is not None:
        res["latent_mse_future"] = F.mse_loss(out["video_latents"][:, :, 1:].float(), batch["latents"][:, :, 1:].float()).item()
    frames = np.concatenate([np.concatenate([true_u8[i], pred_u8[i]], 2) for i in range(len(rows))], 1)   # (F, n H, 2 W, 3)
    path = os.path.join(out_dir, f"samples.{args.format}")
    if args.format == "mp4":
        save_mp4(path, frames.repeat(2, 1).repeat(2, 2), fps=clips.meta["fps"] / clips.index["clip"]["frame_stride"])
    else:
        save_gif(path, frames, fps=4, scale=2)
    res["video"] = path
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(f"{name} on {len(rows)} clips of {args.data}: PSNR of the predicted future frames {res['psnr_future']:.2f} dB"
          + (f", action MSE (normalized) {res['action_mse']:.4f}" if "action_mse" in res else "")
          + (f", latent MSE {res['latent_mse_future']:.4f}" if "latent_mse_future" in res else ""))
    print(f"wrote {path} (true | predicted per clip) and metrics.json")
    return res


def eval_settings(args, name: str, cfg, world: dict | None = None) -> dict:
    """The sample.py settings that change the numbers in metrics.json (stored there as "settings";
    --compare puts evaluations that differ in one of them into different rows). The world's scene
    options (eval_world) only when not the default, so older metrics.json files compare as before."""
    steps = args.steps or (cfg.action_steps if name == "agra" else cfg.sample_steps)   # denoising steps used
    scene = {k: v for k, v in (world or {}).items() if v != WORLD_DEFAULTS[k]}
    if name == "eawm":
        return {"steps": steps, "clips": args.clips, "seed": args.seed, **scene}
    out = {"steps": steps, "episodes": args.episodes, "exec_steps": args.exec_steps or max(1, cfg.horizon // 2),
           "max_steps": args.max_steps, "seed": args.seed, "diag_clips": args.diag_clips}
    if args.no_distractors:                             # only when set: older metrics.json files compare as before
        out["distractors"] = False
    if args.mark_target:
        out["mark_target"] = True
    return {**out, **scene}


WORLD_DEFAULTS = {"view": "wide", "distractor_band": "any", "shape_texture": False}


def eval_world(args, meta: dict) -> dict:
    """The toy-world scene options to evaluate in (view, distractor_band, shape_texture): the flag when given, else the
    checkpoint's training data's (checkpoints from before an option: its default)."""
    data = meta.get("data", {})
    return {k: getattr(args, k) or data.get(k, d) for k, d in WORLD_DEFAULTS.items()}


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Roll out a trained world action model in the toy world and report success.")
    p.add_argument("--ckpt", default=None, help="checkpoint folder written by train.py (or its model.safetensors)")
    p.add_argument("--model", default=None, help="expected model name (agra, mvwam, eawm); checked against the checkpoint")
    p.add_argument("--episodes", type=int, default=20, help="episodes per split (a quick look: the standard error of a "
                   "success rate is up to 11 points at 20; use 100 for tables)")
    p.add_argument("--splits", nargs="+", default=list(SPLITS), choices=SPLITS, help="which splits to evaluate")
    p.add_argument("--seed", type=int, default=100000, help="first env seed of every split (train demos use 0..)")
    p.add_argument("--exec-steps", type=int, default=None, help="actions executed per chunk before re-planning "
                   "(default: half the horizon)")
    p.add_argument("--max-steps", type=int, default=60, help="episode time limit")
    p.add_argument("--no-distractors", action="store_true", help="the same scenes (target, place, colours) with the "
                   "named object alone: tells a policy that cannot find the object from one that cannot tell which "
                   "object is named")
    p.add_argument("--mark-target", action="store_true", help="the named object drawn in a colour no object has "
                   "(data/toyworld.py --mark-target): grounding taken out of the task")
    p.add_argument("--view", default=None, choices=("wide", "close"), help="toy-world view (data/toyworld.py --view; "
                   "default: the one the checkpoint was trained in)")
    p.add_argument("--distractor-band", default=None, choices=("any", "near"), help="where the distractors of "
                   "train-like scenes are (data/toyworld.py --distractor-band; default: as the checkpoint was trained)")
    p.add_argument("--shape-texture", action="store_true", help="each shape drawn with its own surface pattern "
                   "(data/toyworld.py --shape-texture; default: as the checkpoint was trained)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the config's; MV-WAM: joint steps, EA-WM: generation steps)")
    p.add_argument("--gif-episodes", type=int, default=1, help="episodes per split recorded into the GIF")
    p.add_argument("--video-steps", type=int, default=10, help="Euler steps of the predicted-video panel in GIFs")
    p.add_argument("--diag-clips", type=int, default=32, help="AGRA: held-out clips per split for the attention "
                   "diagnostics; MV-WAM: for the value-vs-return correlation (0: skip)")
    p.add_argument("--clips", type=int, default=16, help="EA-WM: held-out clips per split to generate; --data: clips to predict")
    p.add_argument("--rollback", action="store_true", help="MV-WAM: also run every split with value-guided rollback "
                   "(Sec. 3.2) and write rollback_<split>.gif of an episode where one fired")
    p.add_argument("--rollback-delta", type=float, default=None, help="MV-WAM: the rollback threshold delta "
                   "(default: the checkpoint's Config.rollback_delta, the paper's 0.2; Fig. 3(c) varies it)")
    p.add_argument("--out", default=None, help="folder for GIFs, PNGs and metrics.json (default <ckpt>/samples); "
                   "with --compare / --curves: for their tables and figures (default <the runs' parent>/compare)")
    p.add_argument("--compare", nargs="+", default=None, metavar="RUN", help="compare run folders of one model "
                   "(each evaluated by sample.py --ckpt RUN): one table, mean +- SE over seeds, + comparison.json/.svg")
    p.add_argument("--curves", nargs="+", default=None, metavar="RUN", help="learning curves of run folders "
                   "trained with --eval-every: success (EA-WM: PSNR) against training step, curves.json/.svg")
    p.add_argument("--metrics", nargs="+", default=["samples/metrics.json"], metavar="GLOB", help="--compare: which "
                   "evaluations of each run, globs relative to the run folder, e.g. 'samples*/metrics.json'")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu) or a torch device")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--data", default=None, help="an encoded dataset (data/encode.py): predict its clips, decode with its "
                   "VAE, write samples.mp4 (the path for full-size checkpoints)")
    p.add_argument("--vae", default=None, help="--data: the VAE to decode with (default: the one the data was encoded with)")
    p.add_argument("--format", default="mp4", choices=("mp4", "gif"), help="--data: video file format")
    return p.parse_args(argv)


def main(argv=None):
    args = get_args(argv)
    if args.compare or args.curves:                      # tables and figures from run folders (compare.py)
        import compare
        return compare.main(args)
    if not args.ckpt:
        raise SystemExit("sample.py needs --ckpt RUN (or --compare RUN... / --curves RUN...)")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    name, model, cfg, meta = load_model(args.ckpt, expect=args.model, device=device)
    out_dir = args.out or os.path.join(args.ckpt if os.path.isdir(args.ckpt) else os.path.dirname(args.ckpt), "samples")
    os.makedirs(out_dir, exist_ok=True)
    if args.data:
        return encoded_main(args, name, model, cfg, meta, out_dir, torch.Generator().manual_seed(args.seed), device)
    if getattr(model, "codec", None) is None:
        raise SystemExit(f"this {name} checkpoint takes VAE latents (latent_channels={cfg.latent_channels}), not toy-world "
                         f"pixels: pass --data <a folder written by data/encode.py> to sample from it")
    if name == "eawm":
        return eawm_main(args, model, cfg, meta, out_dir)
    policy = Policy(model, cfg, meta["stats"], device, args.steps)
    exec_steps = args.exec_steps or max(1, cfg.horizon // 2)
    res = cfg.height

    def predict_video(frames, texts, generator):          # decoded future frames of the model's own prediction
        if not hasattr(model, "sample_video"):
            return None
        b = policy.batch(frames, [np.zeros(cfg.state_dim)] * len(frames), texts)
        v = model.sample_video(b, steps=args.video_steps, generator=generator)           # (N, 3, T, H, W)
        return ((v[:, :, 1:].permute(0, 2, 3, 4, 1).cpu() + 1) * 127.5).round().byte().numpy()

    results = {"model": name, "checkpoint": args.ckpt, "step": meta.get("step"), "episodes": args.episodes,
               "exec_steps": exec_steps, "splits": {}}
    world = eval_world(args, meta)
    results["settings"] = eval_settings(args, name, cfg, world)
    print(f"{name} checkpoint {args.ckpt} (step {meta.get('step')}): {args.episodes} episodes per split, "
          f"re-plan every {exec_steps} steps")
    rb = None
    if args.rollback:
        if name != "mvwam":
            raise SystemExit(f"--rollback needs a value head (MV-WAM); {name} has none")
        if not cfg.use_value:
            raise SystemExit("--rollback: this MV-WAM checkpoint was trained without value tokens (use_value=False)")
        import mvwam
        delta = cfg.rollback_delta if args.rollback_delta is None else args.rollback_delta
        rb = lambda: mvwam.ValueRollback(delta, cfg.max_rollbacks, cfg.rollback_buffer)     # noqa: E731
        print(f"value-guided rollback: delta {delta}, at most {cfg.max_rollbacks} per episode, "
              f"buffer of the last {cfg.rollback_buffer} chunks")
        results["rollback_delta"] = delta
    print(f"{'split':16s} {'success':>13s} {'n':>4s} {'reached':>8s} {'grasped':>8s} {'lifted':>8s} {'other':>6s} {'miss':>6s} {'toward':>6s} {'twin':>9s}"
          + (f" {'+rollback':>14s} {'rb/ep':>6s} {'won':>4s} {'lost':>4s}" if rb else "") + "   time")
    for split in args.splits:
        t0 = time.time()
        # each pass over a split draws its own noise from --seed (split_noise), so a split's figures do not depend on
        # which splits ran before it, on the GIF's predicted video or on --rollback, whose pass starts from the same noise
        video_gen = split_noise(args.seed)
        success, stages, rec, _ = rollout(policy, split, args.episodes, args.seed, exec_steps, args.max_steps, res,
                                          split_noise(args.seed), record=args.gif_episodes,
                                          predict_video=lambda f, t: predict_video(f, t, video_gen),
                                          distractors=not args.no_distractors, mark_target=args.mark_target, **world)
        row = success_row(success, stages)
        extra = ""
        if rb:                                            # the same episodes again, with rollback
            s_rb, st_rb, rec_rb, fired = rollout(policy, split, args.episodes, args.seed, exec_steps, args.max_steps, res,
                                                 split_noise(args.seed), record=args.episodes, rollback=rb,
                                                 distractors=not args.no_distractors, mark_target=args.mark_target, **world)
            row["success_rollback"] = float(s_rb.mean())
            row["success_rollback_se"] = standard_error(row["success_rollback"], len(s_rb))
            row["rollbacks_per_episode"] = float(fired.mean())
            row["rollback_episodes"] = int((fired > 0).sum())
            # paired by episode (the two passes share their noise until a rollback fires): won = success only with
            # rollback, lost = only without; success_rollback - success = won - lost
            row["rollback_won"] = float((s_rb & ~success).mean())
            row["rollback_lost"] = float((success & ~s_rb).mean())
            # of the episodes where a rollback fired, the share that fail without rollback: does the value's drop
            # flag the failing episodes?
            row["rollback_fired_failing"] = float((~success[fired > 0]).mean()) if fired.any() else None
            steps = [f for st in st_rb for f in st.get("rollback_steps", [])]      # when it fires, how far back it goes
            row["rollback_fire_step"] = float(np.median([a for a, _ in steps])) if steps else None
            row["rollback_restore_step"] = float(np.median([b for _, b in steps])) if steps else None
            extra = (f" {row['success_rollback']:7.2f} ± {row['success_rollback_se']:4.2f} {row['rollbacks_per_episode']:6.2f}"
                     f" {int((s_rb & ~success).sum()):4d} {int((success & ~s_rb).sum()):4d}")
            if fired.any():                               # an episode where a rollback fired, restored frames outlined red
                save_gif(os.path.join(out_dir, f"rollback_{split}.gif"), np.stack(rec_rb[int(np.argmax(fired > 0))]), fps=6, scale=4)
        results["splits"][split] = row
        miss = " ".join("     -" if row[k] is None else f"{row[k]:6.3f}" for k in ("close_miss_failed", "close_toward_failed"))
        miss += "         -" if row["success_same_color"] is None else f" {row['success_same_color']:4.2f} ({row['same_color_episodes']:2d})"
        print(f"{split:16s} {row['success']:6.2f} ± {row['success_se']:4.2f} {row['episodes']:4d} {row['reached']:8.2f} "
              f"{row['grasped']:8.2f} {row['lifted']:8.2f} {row['distractor_grasped']:6.2f} {miss}{extra}   {time.time() - t0:.0f}s")
        if rec and rec[0]:
            save_gif(os.path.join(out_dir, f"rollout_{split}.gif"), np.stack([f for r in rec for f in r]), fps=6, scale=4)
    print("± : standard error of the success rate, sqrt(p (1 - p) / n) over n episodes; other: grasped a distractor; "
          f"miss: the failures' median gripper-object distance at the first close (grasp tolerance {VIEWS[world.get('view', 'wide')]['grasp_xy']}); "
          f"toward: its median component towards the nearest other object; twin: success in the scenes where a distractor "
          f"has the named object's colour (how many), where only the shape word names it"
          + ("; rb/ep: rollbacks per episode; won / lost: episodes that succeed only with / only without rollback (the "
             "two passes share their noise until a rollback fires)" if rb else ""))
    if name == "mvwam" and cfg.use_value and args.diag_clips:
        results["value"] = {}
        print(f"\nMV-WAM value vs true Monte-Carlo return (Eq. 4) on {args.diag_clips} held-out expert clips per split; "
              f"holding: the value on clips with an object in hand, of expert demos and of failing demos (a distractor "
              f"in hand, true return 0), and the AUC telling them apart (0.5 = the value ignores which object)")
        print(f"{'split':16s} {'pearson r':>9s} {'MAE':>7s} {'holding':>8s} {'failing':>8s} {'AUC':>6s}")
        for split in args.splits:
            clips = []
            for wrong in (0.0, 1.0):
                arrays, dmeta = generate(max(8, args.diag_clips // 4), split, seed0=args.seed + 50000, res=res,
                                         gamma=meta.get("data", {}).get("gamma", 0.99), wrong_frac=wrong, **world)
                dmeta["stats"] = meta["stats"]
                clips.append(dataset_for(cfg, arrays, dmeta))
            d = value_report(model, cfg, clips[0], args.diag_clips, split_noise(args.seed), failing=clips[1])
            results["value"][split] = d
            print(f"{split:16s} {d['pearson']:9.3f} {d['mae']:7.3f} {d['holding_value']:8.3f} {d['failing_value']:8.3f} "
                  f"{d['holding_auc']:6.3f}")
    if name == "agra" and args.diag_clips:
        results["diagnostics"] = {}
        print(f"\nAGRA diagnostics on {args.diag_clips} held-out expert clips per split "
              f"(attention averaged over blocks; MSR = Matched Sensitivity Ratio, Table 1)")
        print(f"{'split':16s} {'in-mask':>8s} {'(chance)':>8s} {'centroid':>8s} {'MSR mean':>9s} {'zero':>6s} {'shuffle':>8s} {'swap':>6s} "
              f"{'entropy':>7s} {'current':>7s} {'(unif.)':>7s}")
        for split in args.splits:
            arrays, dmeta = generate(max(8, args.diag_clips // 4), split, seed0=args.seed + 50000, res=res, **world)
            dmeta["stats"] = meta["stats"]
            clips = dataset_for(cfg, arrays, dmeta)
            d = agra_report(model, cfg, clips, os.path.join(out_dir, f"agra_diagnostics_{split}.png"), args.diag_clips,
                             split_noise(args.seed))
            results["diagnostics"][split] = d
            m = d["msr"]
            print(f"{split:16s} {d['in_mask_ratio']:8.3f} {d['mask_fraction']:8.3f} {d['centroid_error']:8.2f} {m['mean']:9.2f} {m['zero']:6.2f} "
                  f"{m['shuffle']:8.2f} {m['swap']:6.2f} {d['attention_entropy']:7.3f} {d['current_frame_share']:7.3f} "
                  f"{d['current_frame_uniform']:7.3f}")
        print("entropy: of each action query's attention over the video tokens, / that of uniform attention (1 = no token "
              "preferred); current: the attention's share on the current frame's tokens (unif.: under uniform attention)")
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(results, f, indent=1)
    extras = {"agra": ", agra_diagnostics_*.png", "mvwam": ", rollback_*.gif" if rb else ""}.get(name, "")
    print(f"\nwrote {out_dir}/ (rollout_*.gif, metrics.json{extras})")
    return results


if __name__ == "__main__":
    main()
