"""ToyWorld: a procedural pick-and-place robot world that renders in microseconds.

A 3-DoF arm + parallel gripper described in `toyarm.urdf` (parsed with xml.etree, forward
kinematics over the parsed chain), 2-3 coloured objects on a table, a bin, one fixed pinhole camera.
Instruction: "put the {color} {shape} in the bin". Kinematic grasp: an object attaches when the
gripper closes near it and drops when it opens; success = the named object released inside the
bin (sparse reward 1, episode ends). A scripted expert (analytic IK + waypoints) succeeds on
>= 98 % of train seeds.

Splits (what changes is held out of `train`):
  train            table/wall colours from TRAIN_TABLE/TRAIN_WALL; object (colour, shape) pairs
                   outside HELD_OUT_COMBOS; the target in the near band of the workspace, the
                   distractors in either band (distractor_band="near": in the near band too)
  ood_background   table/wall colours from the held-out OOD_TABLE/OOD_WALL palettes
  ood_object       the target is a held-out (colour, shape) pair (each colour and each shape
                   alone is seen in training, the pair is not)
  ood_layout       target and distractor regions swapped: the target sits in the far band, where
                   in training only distractors are placed

API (gymnasium conventions, no gymnasium dependency):
  env.reset(seed=, split=) -> obs, info      env.step(action) -> obs, reward, terminated, truncated, info
  env.get_state() / env.set_state(s)         restoring a state reproduces the same future frames
  action = [d_yaw, d_shoulder, d_elbow, gripper_cmd]  (joint deltas in rad, clipped to +-MAX_DQ;
           gripper_cmd > 0 closes); obs = (H, W, 3) uint8; info has seg, interaction_mask, stages and
           close_miss (the xy distance from the gripper to the named object when the fingers first closed, else None)
           and close_toward (that offset's component towards the nearest other object on the table: > 0, the
           grasp went that object's way; None before the first close or with no other object).

Dataset: `python data/toyworld.py --episodes N --out DIR` writes DIR/episodes.safetensors (all
per-frame arrays, concatenated over episodes) and DIR/meta.json (camera, URDF, fps, dims,
normalization stats, instructions, gamma, per-episode offsets). `ClipDataset` reads it and yields
the batches of all three models (keys documented in ClipDataset).

Semantic teacher: a deterministic stand-in for DINOv2 on the toy world (AGRA's frozen encoder): a fixed
random orthonormal embedding per semantic class (wall, table, bin, arm, gripper, cube, ball,
cone; colours are nuisance and ignored), average-pooled per patch.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import (URDFChain, atomic_write, depth_range, draw_disc, draw_polygon, draw_segment,  # noqa: E402
                    intrinsics, look_at, project)

HERE = os.path.dirname(os.path.abspath(__file__))
FORMAT = "toyworld-v2"   # bump when the world or what a dataset holds changes (v2: the value column uses the
                         # horizon rule's gamma = 0.91); train.py's cached default dataset is regenerated when it differs
URDF_PATH = os.path.join(HERE, "toyarm.urdf")

# ---------------------------------------------------------------- scene constants
COLORS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (40, 80, 230),
          "yellow": (235, 215, 40), "purple": (150, 60, 200), "orange": (245, 140, 30)}
SHAPES = ("cube", "ball", "cone")
COLOR_NAMES = tuple(COLORS)
HELD_OUT_COMBOS = {(c, s) for ci, c in enumerate(COLOR_NAMES) for si, s in enumerate(SHAPES) if (ci + si) % 3 == 0}
TRAIN_TABLE = [(150, 130, 110), (170, 160, 150), (120, 110, 100), (185, 170, 140), (140, 140, 135), (160, 140, 120)]
TRAIN_WALL = [(90, 90, 100), (110, 100, 95), (75, 80, 85), (100, 110, 115)]
OOD_TABLE = [(90, 140, 170), (170, 110, 150), (110, 160, 110)]
OOD_WALL = [(160, 200, 230), (60, 40, 70), (200, 200, 120)]
BIN_COLOR, ARM_COLOR, GRIPPER_COLOR = (70, 50, 40), (225, 225, 225), (40, 40, 40)
MARK_COLOR = (0, 255, 255)           # mark_target: the named object's pixels in this colour (no object has it)
# shape_texture: each shape's surface pattern on the pixel grid (1 = the colour, TEXTURE_DARK = the colour darkened), so
# that every 4 x 4-px token an object covers shows its shape, not only the 5-6-px outline a token sees a corner of
TEXTURE_DARK = 0.55
SHAPE_TEXTURES = {"cube": "checker", "cone": "stripes", "ball": "plain"}
SPLITS = ("train", "ood_background", "ood_object", "ood_layout")
VOCAB = ["put", "the", "in", "bin", "touch"] + list(COLOR_NAMES) + list(SHAPES)

# seg ids and semantic-teacher classes
SEG_WALL, SEG_TABLE, SEG_BIN, SEG_ARM, SEG_GRIPPER, SEG_OBJ0 = 0, 1, 2, 3, 4, 5
TEACHER_CLASSES = ("wall", "table", "bin", "arm", "gripper") + SHAPES

# geometry (metres)
BIN_CENTER = np.array([0.30, -0.26])
BIN_HALF = 0.075
NEAR_BAND, FAR_BAND = (0.24, 0.33), (0.38, 0.46)      # x ranges of target / distractor placement
Y_RANGE = (-0.08, 0.26)
DISTRACTOR_BANDS = ("any", "near")    # ToyWorld(distractor_band=): where training scenes' distractors go
N_OBJECTS = (2, 3)                   # objects per scene (min, max): the target and 1-2 distractors
MAX_DQ = 0.12                        # rad per step
GRASP_Z = 0.06
MISS_MARGIN = 0.025                  # a recovering demo's first grasp goes grasp_xy + this beside the target
TABLE_EXTENT = (-0.2, 0.75, -0.5, 0.5)                # x0, x1, y0, y1 of the table top
LINK_RADIUS, FINGER_RADIUS = 0.022, 0.012
# Two views of the task (ToyWorld(view=...), data/toyworld.py --view, recorded in meta.json). They share the
# arm, the table, the bin, the placement bands, the splits and the expert; they differ in how large the
# objects are, how the camera sees them and where the arm starts:
#   "wide":  the oblique camera sees the whole table and the wall; 8-cm objects are 3-4 px wide at 32x32
#            and the arm starts over the near band, in front of the objects it must find (toyworld-v2).
#   "close": a steep camera zoomed on the workspace; 11-cm objects are about 5 px wide (shapes tell
#            apart) and the arm starts retracted above the table, out of the objects' way.
VIEWS = {
    "wide": {"obj_half": 0.04, "grasp_xy": 0.045, "min_sep": 0.11, "eye": (0.80, 0.0, 0.85),
             "look_at": (0.22, -0.03, 0.10), "fov": 48.0, "home_q": (0.0, -0.35, 1.7)},
    "close": {"obj_half": 0.055, "grasp_xy": 0.065, "min_sep": 0.15, "eye": (0.62, -0.02, 0.95),
              "look_at": (0.33, -0.03, 0.0), "fov": 40.0, "home_ee": (0.14, 0.0, 0.25)},
}


class ToyWorld:
    """Pick-and-place ("pick_place", default) or "reach" (touch the named object) in a toy world."""

    def __init__(self, res: int = 32, task: str = "pick_place", max_steps: int = 60, distractors: bool = True,
                 mark_target: bool = False, view: str = "wide", distractor_band: str = "any",
                 same_color_frac: float = 0.0, shape_texture: bool = False):
        """distractors=False: each seed's scene with the named object alone (same place, colour, table;
        sample.py --no-distractors): does a policy find the object at all, before it must find the named one?
        mark_target=True: the named object is drawn in MARK_COLOR in the frames (seg, teacher and
        everything else unchanged): grounding the instruction is taken out of the task, so what a
        policy still fails at is reading where a visible object is and controlling the arm.
        view: "wide" or "close" (VIEWS: how large the objects are, the camera, where the arm starts).
        distractor_band: where the distractors of train / ood_background / ood_object scenes are placed:
        "any" (near or far band; the named object, always in the near band, is then the one nearest the
        robot's base in about 3 of 4 scenes, a shortcut a policy can take instead of reading the words) or
        "near" (the named object's band: only the words tell the objects apart). ood_layout is the same in both.
        same_color_frac: the share of scenes (with distractors) whose first distractor has the named object's colour
        and another shape, so that only the shape word tells the two apart (about 1 in 7 scenes by chance; training
        data design, generate(same_color_frac=); the evaluation worlds keep 0, and with 0 every seed's scene is the
        one it always was).
        shape_texture=True: each shape drawn with its own surface pattern (SHAPE_TEXTURES: cube checkerboard, cone
        horizontal stripes, ball plain; the dark pixels TEXTURE_DARK x the colour, so the hue still names the colour),
        so that the shape word has something to bind to in every token an object covers (seg, teacher, geometry and
        the expert unchanged; off by default: the README's tables were measured without it)."""
        if task not in ("pick_place", "reach"):
            raise ValueError(f"task={task!r}; expected 'pick_place' or 'reach'")
        if view not in VIEWS:
            raise ValueError(f"view={view!r}; expected one of {sorted(VIEWS)}")
        if distractor_band not in DISTRACTOR_BANDS:
            raise ValueError(f"distractor_band={distractor_band!r}; expected one of {DISTRACTOR_BANDS}")
        if not 0.0 <= same_color_frac <= 1.0:
            raise ValueError(f"same_color_frac={same_color_frac}: expected a share in [0, 1]")
        sc = VIEWS[view]
        self.view, self.obj_half, self.grasp_xy, self.min_sep = view, sc["obj_half"], sc["grasp_xy"], sc["min_sep"]
        self.eye = np.asarray(sc["eye"], float)
        self.res, self.task, self.max_steps, self.distractors = res, task, max_steps, distractors
        self.mark_target, self.distractor_band, self.same_color_frac = mark_target, distractor_band, same_color_frac
        self.shape_texture = shape_texture
        self.chain = URDFChain(URDF_PATH)
        self.K = intrinsics(res, res, sc["fov"])
        self.T_wc = look_at(sc["eye"], sc["look_at"])
        self._table_mask = self._table_pixels()
        self.finger_max = 0.035
        self.q_lo, self.q_hi = self.chain.lower[:3], self.chain.upper[:3]   # arm joints (the 4th is the finger)
        self.home = np.array(sc["home_q"]) if "home_q" in sc else self.ik(np.array(sc["home_ee"]))

    # ------------------------------------------------------------ scene sampling
    def _table_pixels(self) -> np.ndarray:
        """Which pixels see the table top (ray / plane z = 0 intersection inside the extent)."""
        H = W = self.res
        v, u = np.mgrid[0:H, 0:W] + 0.5
        d_cam = np.stack([(u - self.K[0, 2]) / self.K[0, 0], (v - self.K[1, 2]) / self.K[1, 1], np.ones_like(u)], -1)
        R = self.T_wc[:3, :3]
        d_w = d_cam @ R                                      # R^T d for row vectors
        eye = self.eye
        with np.errstate(divide="ignore", invalid="ignore"):
            s = -eye[2] / d_w[..., 2]
        p = eye + s[..., None] * d_w
        x0, x1, y0, y1 = TABLE_EXTENT
        return (s > 0) & (p[..., 0] > x0) & (p[..., 0] < x1) & (p[..., 1] > y0) & (p[..., 1] < y1)

    def _sample_scene(self, rng: np.random.Generator, split: str) -> dict:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        ood_bg = split == "ood_background"
        table = (OOD_TABLE if ood_bg else TRAIN_TABLE)[rng.integers(len(OOD_TABLE if ood_bg else TRAIN_TABLE))]
        wall = (OOD_WALL if ood_bg else TRAIN_WALL)[rng.integers(len(OOD_WALL if ood_bg else TRAIN_WALL))]
        n = int(rng.integers(N_OBJECTS[0], N_OBJECTS[1] + 1))
        train_combos = [(c, s) for c in COLOR_NAMES for s in SHAPES if (c, s) not in HELD_OUT_COMBOS]
        held = sorted(HELD_OUT_COMBOS)
        target = held[rng.integers(len(held))] if split == "ood_object" else train_combos[rng.integers(len(train_combos))]
        objects = [target]
        if self.same_color_frac > 0 and n > 1 and rng.random() < self.same_color_frac:   # no draw at 0: scenes unchanged
            twins = [c for c in train_combos if c[0] == target[0] and c[1] != target[1]]    # 1 (train) or 2 (held-out target)
            objects.append(twins[rng.integers(len(twins))])
        while len(objects) < n:                              # distractors: train pairs, no duplicate pair
            c = train_combos[rng.integers(len(train_combos))]
            if c not in objects:
                objects.append(c)
        # train: target in the near band, distractors anywhere (distractor_band="near": in the near band too);
        # ood_layout swaps the regions
        t_band = FAR_BAND if split == "ood_layout" else NEAR_BAND
        d_band = NEAR_BAND if split == "ood_layout" or self.distractor_band == "near" else (NEAR_BAND[0], FAR_BAND[1])
        positions = self._place(rng, n, t_band, d_band)
        order = rng.permutation(n)                           # the target is not always slot 0
        if not self.distractors:
            order = np.array([0])
        objs = [objects[i] for i in order]
        pos = np.array([positions[i] for i in order])
        bin_c = BIN_CENTER + rng.uniform(-0.02, 0.02, 2)
        return {"table": np.array(table), "wall": np.array(wall), "colors": [o[0] for o in objs],
                "shapes": [o[1] for o in objs], "target": int(np.argmax(order == 0)),
                "obj_xy": pos, "bin": bin_c}

    def _place(self, rng: np.random.Generator, n: int, t_band, d_band, attempts: int = 100) -> list:
        """Object positions, the target's first, at least min_sep apart: each drawn in its band until it
        fits; when one cannot fit (the first ones took the room, e.g. 3 objects in one band) the whole
        layout is drawn again."""
        for _ in range(attempts):
            positions = []
            for i in range(n):
                for _ in range(1000):
                    p = np.array([rng.uniform(*(t_band if i == 0 else d_band)), rng.uniform(*Y_RANGE)])
                    if all(np.linalg.norm(p - q) > self.min_sep for q in positions):
                        positions.append(p)
                        break
                else:
                    break
            if len(positions) == n:
                return positions
        raise RuntimeError(f"could not place {n} objects {self.min_sep} m apart in {attempts} attempts")

    # ------------------------------------------------------------ gym-style API
    def reset(self, seed: int | None = None, split: str = "train", target: int | None = None):
        """target: name this object of the seed's scene instead of the drawn one (an index into its objects;
        same layout, colours and everything else; generate(targets_per_scene=) makes paired demos with it)."""
        self.rng = np.random.default_rng(seed)
        self.split = split
        self.scene = self._sample_scene(self.rng, split)
        if target is not None:
            n = len(self.scene["shapes"])
            if not 0 <= target < n:
                raise ValueError(f"target={target}: the scene of seed {seed} has {n} objects (0..{n - 1})")
            self.scene["target"] = int(target)
        n = len(self.scene["shapes"])
        self.obj_pos = np.concatenate([self.scene["obj_xy"], np.full((n, 1), self.obj_half)], 1)   # (n, 3)
        self.in_bin = np.zeros(n, bool)
        self.q = self.home + self.rng.uniform(-0.1, 0.1, 3)
        self.g = 1.0                                          # gripper opening in [0, 1], 1 = open
        self.held = -1
        self.t = 0
        self.stages = {"reached": False, "grasped": False, "lifted": False, "placed": False, "distractor_grasped": False}
        self.close_miss = None                                # xy distance TCP -> named object at the first close
        self.close_toward = None                              # its component towards the nearest other object
        self.done = False
        self._make_background()
        return self._observe()

    def instruction(self) -> str:
        c, s = self.scene["colors"][self.scene["target"]], self.scene["shapes"][self.scene["target"]]
        return f"put the {c} {s} in the bin" if self.task == "pick_place" else f"touch the {c} {s}"

    def same_color_distractor(self) -> bool:
        """Whether a distractor of this scene has the named object's colour: then only the shape word tells them
        apart (about 1 scene in 7 by chance; same_color_frac makes more; sample.py's `twin` column)."""
        sc = self.scene
        c = sc["colors"][sc["target"]]
        return any(k != sc["target"] and sc["colors"][k] == c for k in range(len(sc["colors"])))

    def step(self, action):
        a = np.asarray(action, dtype=np.float64)
        if a.shape != (4,):
            raise ValueError(f"action must have shape (4,) = [d_yaw, d_shoulder, d_elbow, gripper]; received {a.shape}")
        self.q = np.clip(self.q + np.clip(a[:3], -MAX_DQ, MAX_DQ), self.q_lo, self.q_hi)
        g_prev, self.g = self.g, float(np.clip(self.g + (-0.4 if a[3] > 0 else 0.4), 0.0, 1.0))
        ee = self.ee_pos()
        reward, tgt = 0.0, self.scene["target"]
        if self.held >= 0:
            self.obj_pos[self.held] = ee - np.array([0, 0, 0.02])
            if self.g >= 0.5:                                 # fingers opened: drop onto the table / into the bin
                i, self.held = self.held, -1
                self.obj_pos[i, 2] = self.obj_half
                self.in_bin[i] = bool(np.all(np.abs(self.obj_pos[i, :2] - self.scene["bin"]) < BIN_HALF))
                if i == tgt and self.in_bin[i] and self.task == "pick_place":
                    self.stages["placed"] = True
                    reward, self.done = 1.0, True
        elif g_prev >= 0.5 > self.g:                          # fingers just closed: attach an object between them
            if self.close_miss is None:                       # how far beside the named object the first grasp went
                off = ee[:2] - self.obj_pos[tgt, :2]
                self.close_miss = float(np.linalg.norm(off))
                d = np.linalg.norm(self.obj_pos[:, :2] - self.obj_pos[tgt, :2], axis=1)
                d[tgt] = np.inf
                d[self.in_bin] = np.inf
                if np.isfinite(d).any():                      # and whether it went the nearest other object's way
                    k = int(np.argmin(d))
                    self.close_toward = float(off @ (self.obj_pos[k, :2] - self.obj_pos[tgt, :2]) / d[k])
            d = np.linalg.norm(self.obj_pos[:, :2] - ee[:2], axis=1)
            dz = ee[2] - self.obj_pos[:, 2]
            cand = np.where((d < self.grasp_xy) & (dz < GRASP_Z) & (dz > -0.02) & ~self.in_bin)[0]
            if len(cand):
                self.held = int(cand[np.argmin(d[cand])])
                self.obj_pos[self.held] = ee - np.array([0, 0, 0.02])
        if np.linalg.norm(ee - self.obj_pos[tgt]) < 0.06:
            self.stages["reached"] = True
            if self.task == "reach":
                reward, self.done = 1.0, True
        if self.held >= 0 and self.held != tgt:
            self.stages["distractor_grasped"] = True          # a grounding failure: the arm took another object
        if self.held == tgt:
            self.stages["grasped"] = True
            if self.obj_pos[tgt, 2] > 0.08:
                self.stages["lifted"] = True
        self.t += 1
        obs, info = self._observe()
        return obs, reward, self.done, (self.t >= self.max_steps) and not self.done, info

    def get_state(self) -> dict:
        """Everything that determines the future (scene, robot, objects, step, RNG)."""
        return {"rng": self.rng.bit_generator.state, "split": self.split, "scene": {k: (v.copy() if isinstance(v, np.ndarray) else list(v) if isinstance(v, list) else v) for k, v in self.scene.items()},
                "obj_pos": self.obj_pos.copy(), "in_bin": self.in_bin.copy(), "q": self.q.copy(), "g": self.g,
                "held": self.held, "t": self.t, "stages": dict(self.stages), "close_miss": self.close_miss,
                "close_toward": self.close_toward, "done": self.done}

    def set_state(self, s: dict):
        self.rng = np.random.default_rng()
        self.rng.bit_generator.state = s["rng"]
        self.split = s["split"]
        self.scene = {k: (v.copy() if isinstance(v, np.ndarray) else list(v) if isinstance(v, list) else v) for k, v in s["scene"].items()}
        self.obj_pos, self.in_bin, self.q = s["obj_pos"].copy(), s["in_bin"].copy(), s["q"].copy()
        self.g, self.held, self.t, self.stages, self.done = s["g"], s["held"], s["t"], dict(s["stages"]), s["done"]
        self.close_miss, self.close_toward = s["close_miss"], s.get("close_toward")
        self._make_background()

    # ------------------------------------------------------------ kinematics
    def ee_pos(self, q=None) -> np.ndarray:
        return self.chain.fk(np.append(self.q if q is None else q, 0.0))["tcp"][..., :3, 3]

    def ik(self, target: np.ndarray) -> np.ndarray:
        """Analytic IK of the tool centre point (elbow up): world (3,) -> joints (3,)."""
        yaw = math.atan2(target[1], target[0])
        r = math.hypot(target[0], target[1])
        zr = target[2] - 0.15                                 # shoulder height (URDF: 0.10 + 0.05)
        L1, L2 = 0.30, 0.26 + 0.05                            # upper arm, forearm + tcp offset
        d2 = r * r + zr * zr
        c2 = np.clip((d2 - L1 * L1 - L2 * L2) / (2 * L1 * L2), -1, 1)
        th2 = math.acos(c2)                                   # elbow bends down (positive)
        th1 = math.atan2(-zr, r) - math.atan2(L2 * math.sin(th2), L1 + L2 * math.cos(th2))
        return np.clip(np.array([yaw, th1, th2]), self.q_lo, self.q_hi)

    def _gripper_joints(self):
        return np.append(self.q, self.finger_max * self.g)

    # ------------------------------------------------------------ rendering
    def _make_background(self):
        H = W = self.res
        self._bg = np.empty((H, W, 3), np.uint8)
        self._bg[:] = self.scene["wall"]
        self._bg[self._table_mask] = self.scene["table"]
        self._bg_ids = np.where(self._table_mask, SEG_TABLE, SEG_WALL).astype(np.uint8)
        bx, by = self.scene["bin"]
        corners = np.array([[bx - BIN_HALF, by - BIN_HALF, 0], [bx + BIN_HALF, by - BIN_HALF, 0],
                            [bx + BIN_HALF, by + BIN_HALF, 0], [bx - BIN_HALF, by + BIN_HALF, 0]])
        uv, _ = project(corners, self.K, self.T_wc)
        draw_polygon(self._bg, self._bg_ids, uv, BIN_COLOR, SEG_BIN)
        self._px_per_m = self.K[0, 0]

    def render(self):
        """-> (frame (H, W, 3) uint8, seg (H, W) uint8), painter's order by camera depth."""
        img, ids = self._bg.copy(), self._bg_ids.copy()
        poses = self.chain.fk(self._gripper_joints())
        pts = np.stack([poses[n][:3, 3] for n in ("turret", "upper_arm", "forearm", "gripper_base", "left_finger", "right_finger")])
        x_axis = poses["gripper_base"][:3, 0]
        finger_tips = pts[4:6] + 0.06 * x_axis
        all_pts = np.concatenate([pts, finger_tips, self.obj_pos, [[0, 0, 0]]])
        uv, z = project(all_pts, self.K, self.T_wc)
        f = self._px_per_m
        prims = []                                            # (depth, kind, args)
        base_uv, base_z = uv[-1], z[-1]
        prims.append((base_z, "seg", (base_uv, uv[0], LINK_RADIUS * 1.6 * f / base_z, ARM_COLOR, SEG_ARM)))
        for a, b in ((0, 1), (1, 2), (2, 3)):
            zm = 0.5 * (z[a] + z[b])
            prims.append((zm, "seg", (uv[a], uv[b], LINK_RADIUS * f / zm, ARM_COLOR, SEG_ARM)))
        for a, b in ((4, 6), (5, 7)):
            zm = 0.5 * (z[a] + z[b])
            prims.append((zm - 0.01, "seg", (uv[a], uv[b], FINGER_RADIUS * f / zm, GRIPPER_COLOR, SEG_GRIPPER)))
        for i, shape in enumerate(self.scene["shapes"]):
            zi = z[8 + i]
            prims.append((zi, shape, (uv[8 + i], self.obj_half * f / zi, COLORS[self.scene["colors"][i]], SEG_OBJ0 + i)))
        for _, kind, args in sorted(prims, key=lambda p: -p[0]):
            if kind == "seg":
                draw_segment(img, ids, *args)
            elif kind == "ball":
                c, r, col, idx = args
                draw_disc(img, ids, c, r * 1.15, col, idx)
            elif kind == "cube":
                (cu, cv), r, col, idx = args
                draw_polygon(img, ids, [(cu - r, cv - r), (cu + r, cv - r), (cu + r, cv + r), (cu - r, cv + r)], col, idx)
            else:  # cone: a triangle pointing up
                (cu, cv), r, col, idx = args
                draw_polygon(img, ids, [(cu, cv - 1.4 * r), (cu + 1.3 * r, cv + r), (cu - 1.3 * r, cv + r)], col, idx)
        if self.shape_texture:
            self._texture(img, ids)
        return img, ids

    def _texture(self, img, ids):
        """shape_texture: darken the pattern's pixels of each visible object (SHAPE_TEXTURES), on the pixel grid."""
        v, u = np.indices(ids.shape)
        dark = {"checker": (u + v) % 2 == 1, "stripes": v % 2 == 1}
        for i, shape in enumerate(self.scene["shapes"]):
            pattern = SHAPE_TEXTURES[shape]
            if pattern == "plain":
                continue
            m = (ids == SEG_OBJ0 + i) & dark[pattern]
            img[m] = (img[m] * TEXTURE_DARK).round().astype(np.uint8)

    def _observe(self):
        frame, seg = self.render()
        if self.mark_target:
            frame[seg == SEG_OBJ0 + self.scene["target"]] = MARK_COLOR
        info = {"seg": seg, "interaction_mask": (seg == SEG_GRIPPER) | (seg == SEG_OBJ0 + self.scene["target"]),
                "stages": dict(self.stages), "close_miss": self.close_miss, "close_toward": self.close_toward,
                "success": self.stages["placed"] if self.task == "pick_place" else self.stages["reached"],
                "instruction": self.instruction()}
        return frame, info

    def proprio(self) -> np.ndarray:
        """State vector [q_yaw, q_shoulder, q_elbow, gripper_opening]."""
        return np.append(self.q, self.g).astype(np.float32)

    def ee_pose(self) -> np.ndarray:
        """[x, y, z, qw, qx, qy, qz] of the tool centre point."""
        T = self.chain.fk(np.append(self.q, 0.0))["tcp"]
        return np.concatenate([T[:3, 3], rotation_to_quat(T[:3, :3])]).astype(np.float32)


def rotation_to_quat(R: np.ndarray) -> np.ndarray:
    w = math.sqrt(max(0.0, 1 + R[0, 0] + R[1, 1] + R[2, 2])) / 2
    x = math.copysign(math.sqrt(max(0.0, 1 + R[0, 0] - R[1, 1] - R[2, 2])) / 2, R[2, 1] - R[1, 2])
    y = math.copysign(math.sqrt(max(0.0, 1 - R[0, 0] + R[1, 1] - R[2, 2])) / 2, R[0, 2] - R[2, 0])
    z = math.copysign(math.sqrt(max(0.0, 1 - R[0, 0] - R[1, 1] + R[2, 2])) / 2, R[1, 0] - R[0, 1])
    return np.array([w, x, y, z])


class Expert:
    """Scripted expert: above -> descend -> close -> lift -> above bin -> open, via analytic IK.

    Closed-loop (re-plans from the current state each step) with small Gaussian action noise.

    miss_prob: chance that the episode is a *recovering* demo: the first grasp is aimed grasp_xy + MISS_MARGIN
    beside the target (in a direction clear of the other objects), closes on nothing, and the expert
    opens and retries. Its true Monte-Carlo returns are lower than a clean demo's at the same phase
    (the retry costs steps), which shows MV-WAM's value head what a setback is worth.

    wrong_prob: chance that the episode is a *failing* demo: the expert puts a distractor (the
    object nearest the target) in the bin instead of the named object. No reward ever comes, so its
    true returns are 0 at every frame: what a grounding failure is worth. `finished` turns True once
    the wrong object is released over the bin (the episode has nothing left to show)."""

    def __init__(self, env: ToyWorld, noise: float = 0.01, seed: int = 0, miss_prob: float = 0.0,
                 wrong_prob: float = 0.0):
        self.env, self.noise, self.rng, self.phase = env, noise, np.random.default_rng(seed), 0
        self.goal_obj = env.scene["target"]
        if wrong_prob > 0 and self.rng.random() < wrong_prob:
            d = np.linalg.norm(env.obj_pos[:, :2] - env.obj_pos[self.goal_obj, :2], axis=1)
            d[self.goal_obj] = np.inf
            self.goal_obj = int(np.argmin(d))
        self.wrong = self.goal_obj != env.scene["target"]
        self.offset = np.zeros(3)
        if miss_prob > 0 and not self.wrong and self.rng.random() < miss_prob:
            self.offset = self._miss_offset()
        self.missed = bool(self.offset.any())

    @property
    def finished(self) -> bool:
        """A failing (wrong-object) demo has released its object over the bin."""
        return self.wrong and self.phase == 5 and self.env.held < 0

    def _miss_offset(self) -> np.ndarray:
        """A horizontal offset of grasp_xy + MISS_MARGIN from the target (outside the grasp tolerance) that
        keeps the gripper more than grasp_xy + 1 cm from every other object (so the empty close cannot take a
        distractor)."""
        env, tgt = self.env, self.goal_obj
        others = np.delete(env.obj_pos[:, :2], tgt, 0)
        for a in self.rng.permutation(16) * (2 * math.pi / 16):
            off = (env.grasp_xy + MISS_MARGIN) * np.array([math.cos(a), math.sin(a)])
            spot = env.obj_pos[tgt, :2] + off
            if np.all(np.linalg.norm(others - spot, axis=1) > env.grasp_xy + 0.01):
                return np.append(off, 0.0)
        return np.zeros(3)

    def act(self) -> np.ndarray:
        env = self.env
        tgt = self.goal_obj                                   # the named object (a failing demo: a distractor)
        obj = env.obj_pos[tgt]
        ee = env.ee_pos()
        close = False
        if env.task == "reach":
            goal = obj + np.array([0, 0, 0.03])
        else:
            if self.phase == 2 and env.g < 0.5 and env.held < 0:
                self.phase = 0                                # closed on nothing: open and retry
                self.offset = np.zeros(3)                     # a recovering demo's retry aims right
            obj = obj + self.offset
            if self.phase == 0:
                goal = obj + np.array([0, 0, 0.10])
                if np.linalg.norm(ee - goal) < 0.03 and env.g > 0.9:
                    self.phase = 1
            if self.phase == 1:
                goal = obj + np.array([0, 0, 0.015])
                if np.linalg.norm(ee - goal) < 0.015:
                    self.phase = 2
            if self.phase == 2:
                goal, close = obj + np.array([0, 0, 0.015]), True
                if env.held == tgt:
                    self.phase = 3
            if self.phase == 3:
                goal, close = np.append(obj[:2], 0.16), True
                if np.linalg.norm(ee - goal) < 0.04:
                    self.phase = 4
            if self.phase == 4:
                goal, close = np.append(env.scene["bin"], 0.16), True
                if np.linalg.norm(ee[:2] - goal[:2]) < 0.02:
                    self.phase = 5
            if self.phase == 5:
                goal = np.append(env.scene["bin"], 0.16)
        dq = np.clip(env.ik(goal) - env.q, -MAX_DQ, MAX_DQ) + self.rng.normal(0, self.noise, 3)
        return np.append(np.clip(dq, -MAX_DQ, MAX_DQ), 1.0 if close else -1.0)


# -------------------------------------------------------------------------------------------------
# Reading the arm back from a frame (rendered or generated): where does the video put the end effector?
# -------------------------------------------------------------------------------------------------

# arm_likeness: the arm's light grey (ARM_COLOR) is the only colour in the toy whose darkest channel is above
# ARM_MIN_CHANNEL[0] (the palettes' brightest darkest-channel is 160, an object's at most 60)
ARM_MIN_CHANNEL = (165.0, 225.0)
# fit_arm's search: a global grid over these joint ranges (rad; the 400 default demos span yaw -0.79..0.82,
# shoulder -1.17..-0.25, elbow 1.59..2.41: half a radian of margin and more) at ARM_FIT_GRID, then a pattern search:
# the best of the 27 neighbours at +-step around the best so far, the step halved from ARM_FIT_GRID / 2 down to
# ARM_FIT_STEP_MIN (it can move up to ARM_FIT_GRID in all, twice the grid's half cell)
ARM_FIT_RANGE = ((-1.4, 1.4), (-1.5, 0.3), (0.9, 2.9))
ARM_FIT_GRID, ARM_FIT_STEP_MIN = 0.1, 0.003
_ARM_GRIDS = {}                                       # fit_arm's global grid silhouettes, per camera and frame size


def arm_likeness(frames: np.ndarray) -> np.ndarray:
    """(..., H, W, 3) uint8 -> (..., H, W) in [0, 1]: how much each pixel looks like the arm's light grey, from
    its darkest channel (0 at ARM_MIN_CHANNEL[0] and below, 1 at the arm's 225); a generated frame's blurred arm
    reads as a fraction."""
    lo, hi = ARM_MIN_CHANNEL
    return np.clip((frames.min(-1).astype(np.float32) - lo) / (hi - lo), 0.0, 1.0)


def arm_silhouettes(chain: URDFChain, q: np.ndarray, K: np.ndarray, T_wc: np.ndarray, hw: tuple) -> torch.Tensor:
    """The arm's links (the light-grey capsules ToyWorld.render draws: the base post and the three links up to the
    gripper base) at joints q (N, 3), as soft coverage (N, H*W) in [0, 1]: 1 where a pixel centre lies inside a capsule
    by half a pixel, 0 where it lies half a pixel outside (a render is the same test at 0). The fingers are left out:
    the links fix q, and the 2-pixel fingers are where the held object covers them."""
    H, W = hw
    poses = chain.fk(np.concatenate([q, np.zeros((len(q), 1))], 1))
    pts = np.stack([np.zeros((len(q), 3))] + [poses[n][:, :3, 3] for n in ("turret", "upper_arm", "forearm", "gripper_base")], 1)
    uv, z = project(pts, K, T_wc)                                                  # (N, 5, 2), (N, 5)
    zm = 0.5 * (z[:, :-1] + z[:, 1:])
    zm[:, 0] = z[:, 0]                                                             # the base post: at the base's depth
    radius = torch.from_numpy(LINK_RADIUS * K[0, 0] / zm * np.array([1.6, 1.0, 1.0, 1.0])).float()[..., None]
    uv = torch.from_numpy(uv).float()
    au, av = uv[:, :-1, 0, None], uv[:, :-1, 1, None]                              # (N, 4, 1) segment starts
    du, dv = uv[:, 1:, 0, None] - au, uv[:, 1:, 1, None] - av
    pu = (torch.arange(W).float() + 0.5).repeat(H)                                 # (H*W,) pixel centres, row-major
    pv = (torch.arange(H).float() + 0.5).repeat_interleave(W)
    ru, rv = pu - au, pv - av                                                      # (N, 4, H*W)
    s = ((ru * du + rv * dv) / (du * du + dv * dv).clamp_min(1e-12)).clamp(0, 1)
    dist = torch.hypot(ru - s * du, rv - s * dv)
    cover = (radius + 0.5 - dist).clamp(0, 1).amax(1)
    return torch.nan_to_num(cover)                                                 # a point behind the camera: no cover


def fit_arm(frames: np.ndarray, K: np.ndarray, T_wc: np.ndarray, chain: URDFChain | None = None,
            chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """The end effector a frame shows, read from its arm: (F, H, W, 3) uint8 -> (joints (F, 3), tcp pixel (F, 2) u, v).

    Analysis by synthesis: the joints whose arm silhouette (arm_silhouettes) best explains the frame's
    arm_likeness map in the squared error, searched on a global grid (ARM_FIT_RANGE at ARM_FIT_GRID; its
    silhouettes computed once per camera), then refined by a pattern search (ARM_FIT_STEP_MIN), and the tool centre
    point of those joints projected. It needs no tracking and no first frame: every frame is read on its own, so a
    generated video's arm is found wherever the video puts it (on rendered frames of held-out demos it misses the
    true tool centre point by about a third of a pixel on average; tests/test_toyworld.py). Where a video shows two faint
    arms, the fit takes the one (or the pose between them) that explains more of its pixels."""
    chain = chain or URDFChain(URDF_PATH)
    H, W = frames.shape[1:3]
    target = torch.from_numpy(arm_likeness(frames).reshape(len(frames), -1))      # (F, H*W)
    key = (K.tobytes(), T_wc.tobytes(), H, W)
    if key not in _ARM_GRIDS:
        axes = [np.arange(lo, hi + 1e-9, ARM_FIT_GRID) for lo, hi in ARM_FIT_RANGE]
        grid = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
        sil = torch.cat([arm_silhouettes(chain, grid[i:i + chunk], K, T_wc, (H, W)) for i in range(0, len(grid), chunk)])
        _ARM_GRIDS[key] = (grid, sil, (sil * sil).sum(1))
    grid, sil, sq = _ARM_GRIDS[key]
    # |target - silhouette(q)|^2 = sum(silhouette^2) - 2 silhouette . target + const: the best q per frame
    q = grid[(sq[None] - 2 * target @ sil.T).argmin(1).numpy()]                   # (F, 3)
    offs = np.stack(np.meshgrid(*[np.arange(-1, 2)] * 3, indexing="ij"), -1).reshape(-1, 3)      # the 27 neighbours
    step = ARM_FIT_GRID / 2
    while step >= ARM_FIT_STEP_MIN:
        cand = (q[:, None] + step * offs[None]).reshape(-1, 3)                   # (F * 27, 3)
        s = torch.cat([arm_silhouettes(chain, cand[i:i + chunk], K, T_wc, (H, W)) for i in range(0, len(cand), chunk)])
        s = s.view(len(q), len(offs), -1)
        score = (s * s).sum(-1) - 2 * (s * target[:, None]).sum(-1)               # (F, 27)
        q = cand.reshape(len(q), len(offs), 3)[np.arange(len(q)), score.argmin(1).numpy()]
        step /= 2
    tcp = chain.fk(np.concatenate([q, np.zeros((len(q), 1))], 1))["tcp"][:, :3, 3]
    return q, project(tcp, K, T_wc)[0]


# -------------------------------------------------------------------------------------------------
# Episodes, Monte-Carlo values, semantic teacher
# -------------------------------------------------------------------------------------------------


def horizon_gamma(length: float, start_value: float = 0.1) -> float:
    """The discount rule of the toy world: gamma^length = start_value, so the Monte-Carlo return of a
    successful episode of `length` steps rises from `start_value` at its first frame to 1 at the
    reward, and a state that is still `length` steps away is worth `start_value`.

    MV-WAM (Sec. 3.2, Eq. 4) uses gamma = 0.99 on real-robot episodes of hundreds of steps, where
    0.99^H covers most of [0, 1]; on the toy's ~25-step episodes 0.99 squeezes every return into
    [0.78, 1], so the paper's rollback threshold delta = 0.2 is as large as the whole value range.
    The rule keeps the paper's delta meaningful: a 0.2 drop is then a setback of a few steps."""
    return float(start_value ** (1.0 / length))


EXPERT_STEPS = 25                    # median expert episode length on `train` (steps from reset to reward)
TOY_GAMMA = round(horizon_gamma(EXPERT_STEPS), 2)    # 0.91: returns of a demo span [0.1, 1]


def mc_returns(rewards: np.ndarray, gamma: float) -> np.ndarray:
    """V_t = sum_i gamma^i r_{t+i} (MV-WAM Eq. 4), computed backwards."""
    v, out = 0.0, np.zeros(len(rewards), np.float32)
    for t in range(len(rewards) - 1, -1, -1):
        v = rewards[t] + gamma * v
        out[t] = v
    return out


def run_expert_episode(env: ToyWorld, seed: int, split: str, noise: float = 0.01, miss_prob: float = 0.0,
                       wrong_prob: float = 0.0, target: int | None = None):
    """Roll out the expert. Returns per-frame lists (frames, seg, state, ee, actions, rewards, imitate: 0 for an
    action aimed at a distractor (a failing demo) or beside the target (a recovering demo before its retry), and
    `missed` / `wrong`: whether it was a recovering / failing demo) + success. target: ToyWorld.reset's."""
    frame, info = env.reset(seed=seed, split=split, target=target)
    expert = Expert(env, noise=noise, seed=seed + 7919, miss_prob=miss_prob, wrong_prob=wrong_prob)
    rec = {"frames": [frame], "seg": [info["seg"]], "state": [env.proprio()], "ee": [env.ee_pose()], "actions": [], "rewards": [],
           "imitate": []}
    while True:
        a = expert.act()
        frame, r, term, trunc, info = env.step(a)
        rec["actions"].append(a.astype(np.float32))
        rec["imitate"].append(float(not (expert.wrong or expert.offset.any())))   # 0: aimed at a distractor or beside the target
        rec["rewards"].append(r)
        rec["frames"].append(frame)
        rec["seg"].append(info["seg"])
        rec["state"].append(env.proprio())
        rec["ee"].append(env.ee_pose())
        if term or trunc or expert.finished:
            break
    rec["actions"].append(np.array([0, 0, 0, rec["actions"][-1][3]], np.float32))   # no-op after the end
    rec["rewards"].append(0.0)
    rec["imitate"].append(rec["imitate"][-1])
    rec["missed"], rec["wrong"] = expert.missed, expert.wrong
    return rec, info["success"]


def scene_targets(env: ToyWorld, seed: int, split: str, k: int) -> list:
    """The objects a paired demo of this seed's scene names (generate(targets_per_scene=k)): the drawn
    target (None: as drawn) then, up to k in all, the other objects in the same placement band, so that
    every named object stays where the split puts named objects (distractors in the far band are not named)."""
    if k == 1:
        return [None]
    env.reset(seed=seed, split=split)
    sc = env.scene
    band = FAR_BAND if split == "ood_layout" else NEAR_BAND
    others = [i for i in range(len(sc["shapes"])) if i != sc["target"] and band[0] <= sc["obj_xy"][i, 0] <= band[1]]
    return [None] + others[:k - 1]


def generate(n: int, split: str = "train", seed0: int = 0, res: int = 32, gamma: float = TOY_GAMMA,
             task: str = "pick_place", only_success: bool = True, recover_frac: float = 0.0, wrong_frac: float = 0.0,
             distractors: bool = True, mark_target: bool = False, view: str = "wide", distractor_band: str = "any",
             targets_per_scene: int = 1, same_color_frac: float = 0.0, shape_texture: bool = False):
    """n expert episodes of `split` -> (arrays dict, meta dict). The expert's own failures are skipped
    (only_success=False keeps them, flagged "success": False like the failing demos below).
    distractors=False: each seed's scene with the named object alone (ToyWorld(distractors=False)).
    mark_target=True: the named object drawn in MARK_COLOR (ToyWorld(mark_target=True)).
    view: "wide" or "close" (VIEWS). distractor_band: "any" or "near" (ToyWorld).
    targets_per_scene: paired demos (train split): each scene is demonstrated up to this many times, naming a
    different object each time (the drawn one first, then the others in its band; scene_targets), so the same
    first frame comes with different words and different actions and no layout prior predicts the target.
    same_color_frac: the share of scenes with a distractor of the named object's colour and another shape
    (ToyWorld), so that the shape word matters in more than the 1 in 7 scenes of chance.
    shape_texture: each shape drawn with its own surface pattern (ToyWorld; recorded in meta, and train.py's and
    sample.py's evaluations draw their worlds so).
    recover_frac: the share of recovering demos (the first grasp misses, the expert retries; Expert). The
    actions aimed beside the target are flagged imitate = 0 (a per-frame array), so a policy learns the retry,
    not the miss (ClipDataset gives every clip that holds one of them action_weight 0).
    wrong_frac: the share of failing demos (a distractor goes to the bin; returns 0; meta "wrong_object").
    They are kept, flagged "success": False, and ClipDataset gives their clips action_weight 0: the
    value and the video learn from them, the policy does not imitate them."""
    if wrong_frac > 0 and not distractors:
        raise ValueError("wrong_frac > 0 needs distractors: a failing demo puts a distractor in the bin")
    env = ToyWorld(res=res, task=task, distractors=distractors, mark_target=mark_target, view=view,
                   distractor_band=distractor_band, same_color_frac=same_color_frac, shape_texture=shape_texture)
    cols = {k: [] for k in ("frames", "seg", "state", "ee", "actions", "rewards", "value", "imitate")}
    if targets_per_scene < 1 or (targets_per_scene > 1 and split != "train"):
        raise ValueError(f"targets_per_scene={targets_per_scene}: expected 1, or more on the train split only "
                         f"(the OOD splits define which object is named); split={split!r}")
    eps, seed, failures = [], seed0, 0
    todo = []                                                # (seed, target) pairs still to roll out
    while len(eps) < n:
        if not todo:
            todo = [(seed, t) for t in scene_targets(env, seed, split, targets_per_scene)]
            seed += 1
        s, target = todo.pop(0)
        rec, ok = run_expert_episode(env, s, split, miss_prob=recover_frac, wrong_prob=wrong_frac, target=target)
        if not ok and not rec["wrong"]:
            failures += 1
            if only_success:
                continue
        start = sum(e["length"] for e in eps)
        L = len(rec["frames"])
        rec["value"] = mc_returns(np.array(rec["rewards"], np.float32), gamma)
        for k in cols:
            cols[k].extend(rec[k])
        sc = env.scene
        eps.append({"start": start, "length": L, "seed": s, "split": split, "instruction": env.instruction(),
                    "target": sc["target"], "shapes": sc["shapes"], "colors": sc["colors"], "success": bool(ok),
                    "recovering": rec["missed"], "wrong_object": rec["wrong"]})
    arrays = {"frames": np.stack(cols["frames"]), "seg": np.stack(cols["seg"]),
              "state": np.stack(cols["state"]).astype(np.float32), "ee_pose": np.stack(cols["ee"]).astype(np.float32),
              "actions": np.stack(cols["actions"]).astype(np.float32),
              "reward": np.array(cols["rewards"], np.float32), "value": np.array(cols["value"], np.float32),
              "imitate": np.array(cols["imitate"], np.float32)}
    meta = {"format": FORMAT, "res": res, "fps": 10, "task": task, "gamma": gamma, "distractors": distractors,
            "mark_target": mark_target, "view": view, "distractor_band": distractor_band, "targets_per_scene": targets_per_scene,
            "same_color_frac": same_color_frac, "shape_texture": shape_texture,
            "camera": {"K": env.K.tolist(), "T_wc": env.T_wc.tolist(), "convention": "T_wc maps world to camera (OpenCV axes)"},
            "urdf": open(URDF_PATH).read(), "joint_names": env.chain.actuated,
            "dims": {"state": 4, "action": 4, "ee_pose": 7},
            "state_fields": ["q_yaw", "q_shoulder", "q_elbow", "gripper_opening"],
            "action_fields": ["d_yaw", "d_shoulder", "d_elbow", "gripper_cmd"],
            "seg_ids": {"wall": SEG_WALL, "table": SEG_TABLE, "bin": SEG_BIN, "arm": SEG_ARM, "gripper": SEG_GRIPPER, "object_k": f"{SEG_OBJ0}+k"},
            "teacher_classes": list(TEACHER_CLASSES), "episodes": eps, "expert_failures": failures,
            "stats": norm_stats(arrays)}
    return arrays, meta


def norm_stats(arrays) -> dict:
    def ms(x):
        return {"mean": x.mean(0).tolist(), "std": np.maximum(x.std(0), 1e-2).tolist()}
    return {"actions": ms(arrays["actions"]), "state": ms(arrays["state"])}


REQUIRED = {"frames": (None, None, None, 3), "seg": (None, None, None), "state": (None, 4), "ee_pose": (None, 7),
            "actions": (None, 4), "reward": (None,), "value": (None,)}


def write_dataset(out: str, arrays: dict, meta: dict):
    from safetensors.numpy import save_file
    os.makedirs(out, exist_ok=True)
    atomic_write(os.path.join(out, "episodes.safetensors"), lambda tmp: save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, tmp))
    atomic_write(os.path.join(out, "meta.json"), lambda tmp: open(tmp, "w").write(json.dumps(meta)))


def load_dataset(folder: str):
    """-> (arrays, meta); checks files, keys and shapes and says what is wrong."""
    from safetensors.numpy import load_file
    for f in ("episodes.safetensors", "meta.json"):
        if not os.path.isfile(os.path.join(folder, f)):
            raise FileNotFoundError(f"dataset {folder}: missing {f} (expected episodes.safetensors + meta.json, "
                                    f"written by `python data/toyworld.py --out {folder}`)")
    meta = json.load(open(os.path.join(folder, "meta.json")))
    if meta.get("format") != FORMAT:
        warnings.warn(f"dataset {folder} was generated by {meta.get('format')}, this code writes {FORMAT} (see FORMAT in "
                      f"data/toyworld.py): its scenes or targets may differ from what sample.py and --eval-every use; "
                      f"regenerate it with `python data/toyworld.py --out {folder}`")
    try:
        arrays = load_file(os.path.join(folder, "episodes.safetensors"))
    except Exception as e:
        raise ValueError(f"dataset {folder}: cannot read episodes.safetensors ({e})") from None
    n = None
    for k, shape in REQUIRED.items():
        if k not in arrays:
            raise ValueError(f"dataset {folder}: episodes.safetensors lacks '{k}'; has {sorted(arrays)}")
        a = arrays[k]
        ok = a.ndim == len(shape) and all(s is None or s == d for s, d in zip(shape, a.shape))
        if not ok:
            exp = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
            raise ValueError(f"dataset {folder}: '{k}' expected shape {exp}, "
                             f"received {a.shape}")
        if n is not None and a.shape[0] != n:
            raise ValueError(f"dataset {folder}: '{k}' has {a.shape[0]} frames, 'frames' has {n}")
        n = a.shape[0]
    if "imitate" in arrays and arrays["imitate"].shape != (n,):                    # optional (older datasets lack it)
        raise ValueError(f"dataset {folder}: 'imitate' expected shape ({n},), received {arrays['imitate'].shape}")
    last = meta["episodes"][-1]
    if last["start"] + last["length"] != n:
        raise ValueError(f"dataset {folder}: episodes cover {last['start'] + last['length']} frames, arrays hold {n}")
    return arrays, meta


def teacher_embedding(dim: int = 16, seed: int = 0) -> np.ndarray:
    """Fixed random orthonormal rows, one per TEACHER_CLASSES entry: (n_classes, dim)."""
    g = np.random.default_rng(seed).normal(size=(dim, len(TEACHER_CLASSES)))
    q, _ = np.linalg.qr(g)                                   # (dim, n) orthonormal columns
    return q.T.astype(np.float32)


def semantic_classes(seg: np.ndarray, shapes_per_sample: list) -> np.ndarray:
    """Seg ids (N, ..., H, W) -> teacher class ids using each sample's object shapes."""
    lut = np.zeros((len(shapes_per_sample), 256), np.int64)
    lut[:, :SEG_OBJ0] = np.arange(SEG_OBJ0)
    for i, shapes in enumerate(shapes_per_sample):
        for k, s in enumerate(shapes):
            lut[i, SEG_OBJ0 + k] = SEG_OBJ0 + SHAPES.index(s)
    idx = np.arange(len(shapes_per_sample)).reshape((-1,) + (1,) * (seg.ndim - 1))
    return lut[idx, seg]


def semantic_teacher(classes: np.ndarray, patch: int, emb: np.ndarray) -> np.ndarray:
    """Class map (..., H, W) -> patch features (..., H/patch, W/patch, d): class embeddings
    average-pooled over each patch (the toy world's frozen "foundation encoder")."""
    n = emb.shape[0]
    onehot = np.eye(n, dtype=np.float32)[classes]             # (..., H, W, n)
    *lead, H, W, _ = onehot.shape
    pooled = onehot.reshape(*lead, H // patch, patch, W // patch, patch, n).mean((-4, -2))
    return pooled @ emb                                        # (..., h, w, d)


# -------------------------------------------------------------------------------------------------
# Random backgrounds (a training augmentation that keeps ood_background's colours unseen)
# -------------------------------------------------------------------------------------------------

def held_out_margins() -> np.ndarray:
    """(len(OOD_TABLE) + len(OOD_WALL),) levels: each held-out table / wall colour's L-inf distance to the nearest
    colour of the training palettes (TRAIN_TABLE + TRAIN_WALL), i.e. how unseen the split's colours are."""
    held, seen = np.array(OOD_TABLE + OOD_WALL), np.array(TRAIN_TABLE + TRAIN_WALL)
    return np.abs(held[:, None] - seen[None]).max(-1).min(1)


def random_background_colors(n: int, generator: torch.Generator | None = None, tries: int = 64) -> torch.Tensor:
    """(n, 2, 3) random (table, wall) colours in 8-bit levels, uniform over the colours that leave the split's
    meaning as it is: each is at least as far (L-inf) from every held-out table / wall colour as the training
    palettes' nearest colour is (held_out_margins), at least as far from the objects', bin's, arm's, gripper's and
    target mark's colours as any training palette colour is (45 levels), and darker than the arm's light grey on
    its darkest channel (ARM_MIN_CHANNEL, so that arm_likeness still sees only the arm). Rejection sampling: `tries` candidates
    per colour (about half are kept)."""
    held = torch.tensor(OOD_TABLE + OOD_WALL, dtype=torch.float32)
    margin = torch.from_numpy(held_out_margins()).float()
    others = torch.tensor(list(COLORS.values()) + [BIN_COLOR, ARM_COLOR, GRIPPER_COLOR, MARK_COLOR], dtype=torch.float32)
    seen = torch.tensor(TRAIN_TABLE + TRAIN_WALL, dtype=torch.float32)
    other_margin = (seen[:, None] - others[None]).abs().amax(-1).amin()                  # 45 levels
    cand = torch.randint(256, (n * 2, tries, 3), generator=generator).float()
    ok = ((cand[:, :, None] - held).abs().amax(-1) >= margin).all(-1)
    ok &= ((cand[:, :, None] - others).abs().amax(-1) >= other_margin).all(-1)
    ok &= cand.amin(-1) < ARM_MIN_CHANNEL[0]
    if not ok.any(1).all():
        raise RuntimeError(f"random_background_colors: no admissible colour in {tries} candidates; raise `tries`")
    first = ok.float().argmax(1)                                                          # the first admissible one
    return cand[torch.arange(n * 2), first].reshape(n, 2, 3)


def randomize_background(video: torch.Tensor, seg: torch.Tensor, generator: torch.Generator | None = None,
                         share: float = 1.0) -> torch.Tensor:
    """video (B, 3, F, H, W) in [-1, 1] with its seg ids (B, F, H, W) -> the same clips with the table's and the
    wall's pixels repainted in one random colour each per clip (random_background_colors), the same in every frame;
    with share < 1 each clip is repainted with that probability and otherwise returned as it is.
    Exact on this renderer, which paints flat colours without anti-aliasing (seg says which colour each pixel has)."""
    if seg.shape != video.shape[:1] + video.shape[2:]:
        raise ValueError(f"seg {tuple(seg.shape)} does not match video {tuple(video.shape)}: expected (B, F, H, W)")
    colors = (random_background_colors(video.shape[0], generator) / 127.5 - 1).to(video)   # (B, 2, 3) in [-1, 1]
    table, wall = (colors[:, i, :, None, None, None] for i in (0, 1))
    seg = seg[:, None].to(video.device)
    pick = torch.ones(video.shape[0], dtype=torch.bool)
    if share < 1.0:                                                                       # the clips to repaint
        pick = torch.rand(video.shape[0], generator=generator) < share
    pick = pick.to(video.device)[:, None, None, None, None]
    return torch.where(pick & (seg == SEG_TABLE), table, torch.where(pick & (seg == SEG_WALL), wall, video))


class ClipDataset:
    """Yields model batches from a toy-world dataset: video (B, 3, T, H, W) in [-1, 1] (frame 0 = the
    current observation), state (B, 4) and actions (B, K, 4) normalized, text, value, action_weight
    (B,: 0 for a clip of a failing demo, or one whose chunk holds an action a recovering demo aims beside the
    target (the per-frame `imitate`), which the policy must not imitate; else 1), joints, gripper,
    ee_pose, K, T_wc, seg, interaction_mask (per latent frame), target_mask (the named object's pixels in
    the current frame: AGRA's stage "ground"), teacher (AGRA's toy teacher),
    kvaf_depth_range (the episode's camera-depth range of the robot links, EA-WM App. A.2), and
    after cache_kvaf the clip's KVAF video (kvaf).

    A clip starts at frame s of an episode: video = frames s, s + stride, ..., s + (frames-1) stride
    (past the episode end the last frame repeats; AGRA App. C.3 pairs frames every 3 control steps
    with the action chunk), actions = the K actions from s (no-ops past the end), state and value at s.
    """

    def __init__(self, arrays: dict, meta: dict, frames: int, horizon: int, q: int = 4,
                 teacher_patch: int = 0, teacher_dim: int = 16, stride: int = 1):
        self.a, self.meta = arrays, meta
        self.frames, self.horizon, self.q, self.stride = frames, horizon, q, stride
        self.teacher_patch = teacher_patch
        self.kvaf = None                                           # (frames, H, W, 3) uint8 after cache_kvaf
        self.emb = teacher_embedding(teacher_dim) if teacher_patch else None
        eps = meta["episodes"]
        self.ep_start = np.array([e["start"] for e in eps])
        self.ep_len = np.array([e["length"] for e in eps])
        self.shapes = [e["shapes"] for e in eps]
        self.targets = np.array([e["target"] for e in eps])
        self.texts = [e["instruction"] for e in eps]
        self.imitate = np.array([e.get("success", True) for e in eps], np.float32)   # 0: a failing demo, not imitated
        st = meta["stats"]
        self.a_mean, self.a_std = np.array(st["actions"]["mean"], np.float32), np.array(st["actions"]["std"], np.float32)
        self.s_mean, self.s_std = np.array(st["state"]["mean"], np.float32), np.array(st["state"]["std"], np.float32)
        # every (episode, start) with at least one real action
        self.index = np.concatenate([np.stack([np.full(L - 1, e), np.arange(L - 1)], 1) for e, L in enumerate(self.ep_len)])
        self.camera = meta["camera"]
        chain, T_wc = URDFChain(meta["urdf"]), np.array(self.camera["T_wc"])
        st = arrays["state"]
        self.depth_range = np.array([depth_range(chain, chain.full_q(st[a:a + L, :3], st[a:a + L, 3]), T_wc)
                                     for a, L in zip(self.ep_start, self.ep_len)], np.float32)     # (episodes, 2)

    def __len__(self):
        return len(self.index)

    def cache_kvaf(self, render) -> None:
        """Render every frame's KVAF once (EA-WM): render(joints (L, 3), gripper (L,), K, T_wc, depth_range)
        -> (L, H, W, 3) uint8 per episode, with the episode's depth range (App. A.2) and the camera as the
        batch carries it (float32); then each batch carries "kvaf", the frames of its clip, (B, 3, T, H, W)
        in [-1, 1], so the model need not render the same frames in every step."""
        K = np.array(self.camera["K"], np.float32)
        T_wc = np.array(self.camera["T_wc"], np.float32)
        st = self.a["state"]
        self.kvaf = np.concatenate([render(st[a:a + L, :3], st[a:a + L, 3], K, T_wc, tuple(r.tolist()))
                                    for a, L, r in zip(self.ep_start, self.ep_len, self.depth_range)])

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> dict:
        rows = torch.randint(len(self.index), (batch_size,), generator=generator).numpy()
        return self.get(rows)

    def get(self, rows: np.ndarray) -> dict:
        ep, s = self.index[rows, 0], self.index[rows, 1]
        base, L = self.ep_start[ep], self.ep_len[ep]
        f_idx = base[:, None] + np.minimum(s[:, None] + self.stride * np.arange(self.frames), L[:, None] - 1)   # (B, T)
        a_off = s[:, None] + np.arange(self.horizon)                                                 # (B, K)
        a_idx = base[:, None] + np.minimum(a_off, L[:, None] - 1)
        actions = self.a["actions"][a_idx].copy()
        imitate = self.imitate[ep]
        if "imitate" in self.a:                                    # per action (datasets before it: per episode)
            imitate = imitate * self.a["imitate"][a_idx].min(1)
        past = a_off >= L[:, None] - 1
        actions[past, :3] = 0.0                                                                       # no-op past the end
        frames = self.a["frames"][f_idx]                                                              # (B, T, H, W, 3)
        video = torch.from_numpy(frames).permute(0, 4, 1, 2, 3).float() / 127.5 - 1                  # (B, 3, T, H, W)
        st = self.a["state"][base + s]
        seg = self.a["seg"][f_idx]                                                                    # (B, T, H, W)
        lat_first = np.array([0] + [1 + (t - 1) * self.q for t in range(1, 1 + (self.frames - 1) // self.q)])
        seg_lat = seg[:, lat_first]                                                                   # first raw frame of each latent frame (AGRA Eq. 3)
        tgt = self.targets[ep]
        inter = (seg_lat == SEG_GRIPPER) | (seg_lat == (SEG_OBJ0 + tgt)[:, None, None, None])
        T_wc = torch.tensor(self.camera["T_wc"], dtype=torch.float32)
        K = torch.tensor(self.camera["K"], dtype=torch.float32)
        batch = {
            "video": video,
            "state": torch.from_numpy((st - self.s_mean) / self.s_std),
            "actions": torch.from_numpy((actions - self.a_mean) / self.a_std),
            "text": [self.texts[e] for e in ep],
            "value": torch.from_numpy(self.a["value"][base + s].copy()),
            "action_weight": torch.from_numpy(imitate.astype(np.float32)),
            "joints": torch.from_numpy(self.a["state"][f_idx][..., :3].copy()),
            "gripper": torch.from_numpy(self.a["state"][f_idx][..., 3:].copy()),
            "ee_pose": torch.from_numpy(self.a["ee_pose"][f_idx].copy()),
            "K": K.expand(len(rows), 3, 3), "T_wc": T_wc.expand(len(rows), 4, 4),
            "seg": torch.from_numpy(seg.astype(np.int64)),
            "interaction_mask": torch.from_numpy(inter),
            "target_mask": torch.from_numpy(seg[:, 0] == (SEG_OBJ0 + tgt)[:, None, None]),          # (B, H, W), frame 0
            "kvaf_depth_range": torch.from_numpy(self.depth_range[ep]),
        }
        if self.kvaf is not None:
            batch["kvaf"] = torch.from_numpy(self.kvaf[f_idx]).permute(0, 4, 1, 2, 3).float() / 127.5 - 1
        if self.teacher_patch:
            cls = semantic_classes(seg_lat, [self.shapes[e] for e in ep])
            batch["teacher"] = torch.from_numpy(semantic_teacher(cls, self.teacher_patch, self.emb))   # (B, T_lat, h, w, d)
        return batch


def world_options(meta: dict) -> dict:
    """The ToyWorld scene options a dataset was generated with (older datasets: the defaults), so that an
    evaluation during training (train.py --eval-every) runs in the world the demos came from."""
    return {"distractors": meta.get("distractors", True), "mark_target": meta.get("mark_target", False),
            "view": meta.get("view", "wide"), "distractor_band": meta.get("distractor_band", "any"),
            "shape_texture": meta.get("shape_texture", False)}


def dataset_format(folder: str) -> str | None:
    """The world version a dataset folder was generated with (None if it has no meta.json)."""
    path = os.path.join(folder, "meta.json")
    return json.load(open(path)).get("format") if os.path.isfile(path) else None


def default_dataset(folder: str, episodes: int = 400, res: int = 32, gamma: float = TOY_GAMMA, seed: int = 0, quiet: bool = False,
                    view: str = "wide", distractor_band: str = "any", shape_texture: bool = False):
    """Load `folder`, generating it first if absent, made by another world version (train.py's
    cached default dataset: a checkout that changed the world must not train on the old one) or holding
    another number of episodes. The same episodes as `data/toyworld.py --episodes N --view V
    --distractor-band B [--shape-texture]` (seeds 0, 1, ...)."""
    found = dataset_format(folder)
    if found is not None and found != FORMAT and not quiet:
        print(f"{folder} holds a {found} dataset; this world is {FORMAT}: regenerating it")
    if found == FORMAT:
        held = len(json.load(open(os.path.join(folder, "meta.json")))["episodes"])
        if held != episodes:
            if not quiet:
                print(f"{folder} holds {held} episodes, {episodes} were asked for: regenerating it")
            found = None
    if found != FORMAT:
        t0 = time.time()
        arrays, meta = generate(episodes, "train", seed0=seed, res=res, gamma=gamma, view=view, distractor_band=distractor_band,
                                shape_texture=shape_texture)
        write_dataset(folder, arrays, meta)
        if not quiet:
            print(f"wrote default toy-world dataset ({episodes} episodes, {view} view, distractors {distractor_band}"
                  f"{', shape textures' if shape_texture else ''}, "
                  f"{len(arrays['frames'])} frames) to {folder} in {time.time() - t0:.1f}s")
    return load_dataset(folder)


def overview(path: str, res: int = 96, frames: int = 6, seed: int = 3, view: str = "wide", shape_texture: bool = False):
    """The README figure: one expert episode per split (rows train, ood_background, ood_object,
    ood_layout at `res`, then train at 32 x 32 as the models see it), `frames` evenly spaced frames."""
    from common import save_png
    rows = []
    for split, r in [(s, res) for s in SPLITS] + [("train", 32)]:
        rec, _ = run_expert_episode(ToyWorld(res=r, view=view, shape_texture=shape_texture), seed, split)
        pick = np.linspace(0, len(rec["frames"]) - 1, frames).round().astype(int)
        row = np.concatenate([rec["frames"][i] for i in pick], 1)
        rows.append(row.repeat(res // r, 0).repeat(res // r, 1))
    save_png(path, np.concatenate(rows, 0))


def main():
    p = argparse.ArgumentParser(description="Generate a toy-world dataset of expert demonstrations.")
    p.add_argument("--episodes", type=int, default=400, help="number of successful expert episodes")
    p.add_argument("--out", required=True, help="output folder (episodes.safetensors + meta.json), or with --figure "
                   "the PNG to write")
    p.add_argument("--figure", action="store_true", help="write the README's overview figure (one expert episode "
                   "per split) to --out instead of a dataset")
    p.add_argument("--split", default="train", choices=SPLITS, help="scene distribution")
    p.add_argument("--seed", type=int, default=0, help="first episode seed (episodes use seed, seed+1, ...)")
    p.add_argument("--res", type=int, default=32, help="image resolution (32, 64, 128)")
    p.add_argument("--gamma", type=float, default=TOY_GAMMA, help="discount of the Monte-Carlo values (default: "
                   "horizon_gamma(EXPERT_STEPS), so a demo's returns span [0.1, 1]; MV-WAM's real-robot value is 0.99)")
    p.add_argument("--task", default="pick_place", choices=("pick_place", "reach"))
    p.add_argument("--recover-frac", type=float, default=0.0, help="share of recovering demos: the first grasp "
                   "misses by grasp_xy + MISS_MARGIN and the expert retries (lower true returns for MV-WAM's value head)")
    p.add_argument("--wrong-frac", type=float, default=0.0, help="share of failing demos: the expert puts a "
                   "distractor in the bin (returns 0; trains MV-WAM's value and the video, not the policy)")
    p.add_argument("--no-distractors", action="store_true", help="every scene with the named object alone (the same "
                   "seeds, places and colours; sample.py --no-distractors evaluates the same way)")
    p.add_argument("--mark-target", action="store_true", help="draw the named object in a colour no object has "
                   "(grounding taken out of the task; train.py's --eval-every and sample.py --mark-target evaluate so)")
    p.add_argument("--view", default="wide", choices=sorted(VIEWS), help="wide: the oblique camera, 3-4-px objects, the "
                   "arm starting over them; close: a steep zoomed camera, 5-px objects, the arm starting retracted (VIEWS)")
    p.add_argument("--distractor-band", default="any", choices=DISTRACTOR_BANDS, help="any: training scenes' "
                   "distractors in the near or the far band (the named object is then mostly the nearest one); "
                   "near: in the named object's band, so only the words tell them apart")
    p.add_argument("--targets-per-scene", type=int, default=1, help="paired demos: each training scene demonstrated "
                   "up to this many times, naming a different object of its band each time (same first frame, other "
                   "words, other actions)")
    p.add_argument("--same-color-frac", type=float, default=0.0, help="share of training scenes whose first distractor "
                   "has the named object's colour and another shape (about 1 in 7 by chance), so the shape word must be "
                   "read (evaluation scenes are unchanged)")
    p.add_argument("--shape-texture", action="store_true", help="each shape drawn with its own surface pattern (cube "
                   "checkerboard, cone stripes, ball plain) so that a 4 x 4-px token shows the shape; train.py and sample.py "
                   "evaluate in the world the data was made in")
    args = p.parse_args()
    if args.figure:
        return overview(args.out, view=args.view, shape_texture=args.shape_texture)
    t0 = time.time()
    arrays, meta = generate(args.episodes, args.split, args.seed, args.res, args.gamma, args.task,
                            recover_frac=args.recover_frac, wrong_frac=args.wrong_frac, distractors=not args.no_distractors,
                            mark_target=args.mark_target, view=args.view, distractor_band=args.distractor_band,
                            targets_per_scene=args.targets_per_scene, same_color_frac=args.same_color_frac,
                            shape_texture=args.shape_texture)
    write_dataset(args.out, arrays, meta)
    n = len(arrays["frames"])
    wrong = sum(e["wrong_object"] for e in meta["episodes"])
    print(f"{args.episodes} episodes ({wrong} failing by design), {n} frames, {meta['expert_failures']} expert failures skipped, "
          f"{time.time() - t0:.1f}s -> {args.out}")


if __name__ == "__main__":
    main()
