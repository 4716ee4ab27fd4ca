"""Read LeRobot robot-demonstration datasets (layouts v2.1 and v3.0) into this project's clip batches.

LeRobot (huggingface/lerobot) stores a dataset as `meta/info.json` (fps, features, path templates),
a tasks table (the instructions), an episodes table, per-frame columns in parquet files and one MP4
stream per camera:

  v2.1  one parquet and one MP4 per episode and camera:
          data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet
          videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4
          meta/episodes.jsonl (episode_index, tasks, length), meta/tasks.jsonl (task_index, task)
  v3.0  many episodes per file, episode bounds in meta/episodes/chunk-*/file-*.parquet:
          data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet (rows dataset_from_index..to_index)
          videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4 (episodes concatenated:
          an episode's frames start at videos/{key}/from_timestamp), meta/tasks.parquet (task_index, task)

Frames are decoded by timestamp (the parquet `timestamp` column, shifted by the episode's
from_timestamp in v3.0), never by index. Only pyarrow and PyAV are needed (imported here, on this
path only); the `lerobot` package itself pulls torchvision and a CUDA torch and is not used.

`LeRobotClips` turns a dataset into the batches data/toyworld.ClipDataset yields: video
(B, 3, T, H, W) in [-1, 1], state, actions (normalized with statistics computed from the data), the
instruction text (tasks table), value = the per-episode Monte-Carlo return (MV-WAM Eq. 4) and, when a
URDF and camera calibration are supplied, joints / gripper / K / T_wc for EA-WM's KVAF renderer.

    python data/lerobot.py --info lerobot/pusht                 # what a dataset holds
    python data/lerobot.py --toy-out /tmp/toy_lerobot --layout v3.0   # a small toy-world dataset to try the path
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import URDFChain, atomic_write, depth_range, save_mp4  # noqa: E402
from data.toyworld import mc_returns, norm_stats  # noqa: E402

VERSIONS = ("v2.0", "v2.1", "v3.0")
INSTALL = "reading LeRobot datasets needs pyarrow and PyAV: pip install pyarrow av"


def _parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(INSTALL) from None
    return pq


def _av():
    try:
        import av
    except ImportError:
        raise ImportError(INSTALL) from None
    return av


# -------------------------------------------------------------------------------------------------
# Files: local folder or Hub dataset, parquet columns, video frames by timestamp
# -------------------------------------------------------------------------------------------------


def dataset_root(source: str) -> str:
    """A local dataset folder as is, or a Hub dataset id downloaded with snapshot_download."""
    if os.path.isdir(source):
        return source
    if source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise FileNotFoundError(f"{source}: no such dataset folder (a Hub dataset id looks like 'owner/name')")
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(source, repo_type="dataset")
    except Exception as e:  # offline, unknown id, no access: say which and why
        raise FileNotFoundError(f"{source}: not a local folder, and downloading it from the Hugging Face Hub "
                                f"failed ({type(e).__name__}: {e})") from None


def column_array(table, name: str) -> np.ndarray:
    """A parquet column as numpy: scalars (N,), fixed or variable-length lists of equal length (N, d)."""
    import pyarrow as pa
    col = table.column(name).combine_chunks()
    if pa.types.is_list(col.type) or pa.types.is_fixed_size_list(col.type) or pa.types.is_large_list(col.type):
        flat = col.flatten().to_numpy(zero_copy_only=False)
        return flat.reshape(len(col), -1) if len(col) else flat.reshape(0, 0)
    return col.to_numpy(zero_copy_only=False)


def fit_transform(h0: int, w0: int, H: int, W: int, resize: str = "crop"):
    """How a (h0, w0) frame becomes (H, W): (scale_y, scale_x, crop_top, crop_left) of the resized image.
    crop: keep the aspect ratio, scale to cover (H, W), cut the centre; stretch: scale each axis."""
    if resize == "stretch":
        return H / h0, W / w0, 0, 0
    if resize != "crop":
        raise ValueError(f"resize={resize!r}; expected 'crop' or 'stretch'")
    s = max(H / h0, W / w0)
    rh, rw = max(H, round(h0 * s)), max(W, round(w0 * s))
    return rh / h0, rw / w0, (rh - H) // 2, (rw - W) // 2


def fit_frames(frames: np.ndarray, H: int, W: int, resize: str = "crop") -> np.ndarray:
    """(N, h0, w0, 3) uint8 -> (N, H, W, 3) uint8 (bilinear, antialiased when shrinking)."""
    N, h0, w0, _ = frames.shape
    if (h0, w0) == (H, W):
        return frames
    sy, sx, top, left = fit_transform(h0, w0, H, W, resize)
    rh, rw = round(h0 * sy), round(w0 * sx)
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(rh, rw), mode="bilinear", align_corners=False, antialias=rh < h0 or rw < w0)
    x = x[:, :, top:top + H, left:left + W]
    return x.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()


def decode_video(path: str, times, fps: float, size=None, resize: str = "crop") -> np.ndarray:
    """Frames of an MP4 at the given timestamps (seconds) -> (N, H, W, 3) uint8, each the decoded frame
    within half a frame period of its timestamp. Raises naming the file if it cannot be decoded or
    frames are missing."""
    av = _av()
    times = np.asarray(times, dtype=np.float64)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"video file {path} is missing")
    tol = 0.5 / fps
    out = [None] * len(times)
    try:
        with av.open(path) as c:
            st = c.streams.video[0]
            if times[0] > tol:
                c.seek(int((times[0] - tol) / st.time_base), stream=st, backward=True)
            for frame in c.decode(st):
                if frame.pts is None:
                    continue
                t = float(frame.pts * st.time_base)
                if t > times[-1] + tol:
                    break
                i = int(np.clip(np.searchsorted(times, t), 1, len(times) - 1)) if len(times) > 1 else 0
                i = i - 1 if len(times) > 1 and abs(times[i - 1] - t) <= abs(times[i] - t) else i
                if abs(times[i] - t) <= tol and out[i] is None:
                    img = frame.to_ndarray(format="rgb24")[None]
                    out[i] = fit_frames(img, *size, resize)[0] if size else img[0]
    except av.FFmpegError as e:
        raise ValueError(f"video {path}: cannot be decoded ({e}); the file is corrupt or truncated") from None
    missing = [i for i, f in enumerate(out) if f is None]
    if missing:
        raise ValueError(f"video {path}: no frame at {len(missing)} of {len(times)} timestamps (first missing at "
                         f"{times[missing[0]]:.3f} s); the file is truncated or corrupt, or does not match the "
                         f"dataset's timestamps")
    return np.stack(out)


# -------------------------------------------------------------------------------------------------
# The dataset reader
# -------------------------------------------------------------------------------------------------


class LeRobotReader:
    """Metadata, per-episode columns and per-episode frames of a LeRobot dataset (v2.1 or v3.0).

    episodes: one dict per episode, in index order: index, length, tasks, data file (+ its row range
    for v3.0) and per camera the MP4 and the time its first frame starts at."""

    def __init__(self, source: str):
        self.source = source
        self.root = dataset_root(source)
        path = os.path.join(self.root, "meta", "info.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{source}: no meta/info.json, so not a LeRobot dataset folder")
        self.info = json.load(open(path))
        self.version = str(self.info.get("codebase_version", "unknown"))
        if self.version not in VERSIONS:
            raise ValueError(f"{source}: LeRobot codebase_version {self.version}; this reader reads {VERSIONS} "
                             f"(convert older datasets with lerobot's conversion scripts)")
        self.v3 = self.version.startswith("v3")
        self.fps = float(self.info["fps"])
        self.features = self.info["features"]
        self.tasks = self._read_tasks()
        self.episodes = self._read_episodes()
        self._table = (None, None)                      # (path, table) of the last parquet file read

    # ---------------------------------------------------------------- metadata
    @property
    def cameras(self) -> list[str]:
        return [k for k, f in self.features.items() if f.get("dtype") in ("video", "image")]

    def check_camera(self, key: str):
        if key not in self.cameras:
            raise ValueError(f"{self.source} has no camera '{key}'; its cameras are {self.cameras} (pick one with --camera)")
        if self.features[key]["dtype"] != "video":
            raise ValueError(f"{self.source}: camera '{key}' is stored as images inside the parquet files; this reader "
                             f"decodes video streams (dtype 'video') only")

    def check_feature(self, key: str, what: str):
        if key not in self.features:
            raise ValueError(f"{self.source} has no feature '{key}' for the {what}; its features are "
                             f"{sorted(self.features)}")

    def _read_tasks(self) -> dict[int, str]:
        rel = "meta/tasks.parquet" if self.v3 else "meta/tasks.jsonl"
        path = os.path.join(self.root, rel)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{self.source}: the tasks table {rel} is missing; the instruction of every "
                                    f"episode comes from it (restore the file from the original dataset)")
        if not self.v3:
            rows = [json.loads(line) for line in open(path) if line.strip()]
            return {int(r["task_index"]): str(r["task"]) for r in rows}
        t = _parquet().read_table(path)
        text = next((c for c in ("task", "__index_level_0__") if c in t.column_names), None)
        if text is None or "task_index" not in t.column_names:
            raise ValueError(f"{path}: expected columns task_index and task, found {t.column_names}")
        return dict(zip((int(i) for i in column_array(t, "task_index")), (str(s) for s in column_array(t, text))))

    def _read_episodes(self) -> list[dict]:
        cams = [k for k in self.cameras if self.features[k]["dtype"] == "video"]
        if not self.v3:
            path = os.path.join(self.root, "meta", "episodes.jsonl")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{self.source}: meta/episodes.jsonl is missing")
            size = int(self.info.get("chunks_size", 1000))
            eps = []
            for line in open(path):
                if not line.strip():
                    continue
                r = json.loads(line)
                e, chunk = int(r["episode_index"]), int(r["episode_index"]) // size
                eps.append({"index": e, "length": int(r["length"]), "tasks": list(r.get("tasks", [])),
                            "data": self.info["data_path"].format(episode_chunk=chunk, episode_index=e), "rows": None,
                            "videos": {k: (self.info["video_path"].format(episode_chunk=chunk, video_key=k, episode_index=e), 0.0)
                                       for k in cams}})
            return sorted(eps, key=lambda r: r["index"])
        files = sorted(glob.glob(os.path.join(self.root, "meta", "episodes", "chunk-*", "file-*.parquet")))
        if not files:
            raise FileNotFoundError(f"{self.source}: no episodes table under meta/episodes/ (v3.0 layout)")
        eps = []
        for f in files:
            t = _parquet().read_table(f)
            cols = {c: t.column(c).to_pylist() for c in t.column_names if not c.startswith("stats/")}
            for i in range(t.num_rows):
                r = {c: v[i] for c, v in cols.items()}
                eps.append({"index": int(r["episode_index"]), "length": int(r["length"]), "tasks": list(r.get("tasks") or []),
                            "data": self.info["data_path"].format(chunk_index=r["data/chunk_index"], file_index=r["data/file_index"]),
                            "rows": (int(r["dataset_from_index"]), int(r["dataset_to_index"])),
                            "videos": {k: (self.info["video_path"].format(video_key=k, chunk_index=r[f"videos/{k}/chunk_index"],
                                                                          file_index=r[f"videos/{k}/file_index"]),
                                           float(r[f"videos/{k}/from_timestamp"])) for k in cams if f"videos/{k}/chunk_index" in r}})
        return sorted(eps, key=lambda r: r["index"])

    # ---------------------------------------------------------------- per-episode data
    def columns(self, ep: dict, keys) -> dict[str, np.ndarray]:
        """The episode's rows of the given parquet columns, in frame order."""
        path = os.path.join(self.root, ep["data"])
        if self._table[0] != path:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{self.source}: data file {ep['data']} of episode {ep['index']} is missing")
            try:
                self._table = (path, _parquet().read_table(path))
            except Exception as e:
                raise ValueError(f"{path}: cannot read the parquet file ({e})") from None
        table = self._table[1]
        missing = [k for k in list(keys) + ["episode_index"] if k not in table.column_names]
        if missing:
            raise ValueError(f"{path} has no column(s) {missing}; its columns are {table.column_names}")
        rows = np.flatnonzero(column_array(table, "episode_index") == ep["index"])
        if len(rows) != ep["length"]:
            raise ValueError(f"{path}: episode {ep['index']} has {len(rows)} rows, its episodes table says {ep['length']}")
        order = rows[np.argsort(column_array(table, "frame_index")[rows])] if "frame_index" in table.column_names else rows
        return {k: column_array(table, k)[order] for k in keys}

    def frames(self, ep: dict, camera: str, size=None, resize: str = "crop") -> np.ndarray:
        """All frames of an episode from one camera: (length, H, W, 3) uint8, decoded by timestamp."""
        self.check_camera(camera)
        if camera not in ep["videos"]:
            raise ValueError(f"{self.source}: the episodes table gives no video file of camera '{camera}' for episode {ep['index']}")
        rel, start = ep["videos"][camera]
        ts = self.columns(ep, ["timestamp"])["timestamp"].astype(np.float64).reshape(-1)
        return decode_video(os.path.join(self.root, rel), start + ts, self.fps, size, resize)


# -------------------------------------------------------------------------------------------------
# Robot kinematics and camera for EA-WM's KVAF (not part of the LeRobot format: supplied by the user)
# -------------------------------------------------------------------------------------------------


def kinematics(reader: LeRobotReader, state_key: str, camera: str, urdf: str | None, camera_json: str | None,
               height: int, width: int, resize: str = "crop", joint_columns=None, gripper_column=None,
               gripper_range=(0.0, 1.0), ee_link: str = "tcp") -> dict:
    """What EA-WM's KVAF renderer needs (Sec. 3.1, App. A.2): the URDF chain, which state columns hold
    its arm joints and the gripper, and the camera's K (scaled to the model's frames) and T_wc.
    LeRobot datasets carry none of the URDF / calibration: raises naming what is missing and the flag
    that supplies it."""
    if not urdf or not camera_json:
        missing = [m for m, v in (("a URDF (--urdf ROBOT.urdf)", urdf), ("the camera calibration (--camera-json "
                   "CAMERA.json with K (3x3), T_wc (4x4, world -> camera), width, height)", camera_json)) if not v]
        raise ValueError(f"EA-WM renders KVAF videos from joint angles, a URDF and the camera's K / T_wc; "
                         f"{reader.source} (LeRobot) carries no URDF or calibration. Supply {' and '.join(missing)}.")
    chain = URDFChain(urdf)
    arm = [j.name for j in chain.joints if j.name in chain.actuated and j.type != "prismatic"]
    names = list(reader.features.get(state_key, {}).get("names") or [])
    if isinstance(names, dict):                                              # LeRobot sometimes nests {"motors": [...]}
        names = next(iter(names.values()), [])
    if joint_columns is None:
        if not all(n in names for n in arm):
            raise ValueError(f"{reader.source}: the names of '{state_key}' ({names}) do not include the URDF's arm joints "
                             f"{arm}; say which state columns hold them with --joint-columns (one index per joint, in "
                             f"that order) and --gripper-column")
        joint_columns = [names.index(n) for n in arm]
    if gripper_column is None:
        grip = [i for i, n in enumerate(names) if "gripper" in str(n).lower()]
        if not grip:
            raise ValueError(f"{reader.source}: no column of '{state_key}' is named like a gripper ({names}); pass "
                             f"--gripper-column INDEX (and --gripper-range CLOSED,OPEN)")
        gripper_column = grip[0]
    if len(joint_columns) != len(arm):
        raise ValueError(f"--joint-columns gives {len(joint_columns)} columns, the URDF has {len(arm)} arm joints {arm}")
    cal = json.load(open(camera_json))
    cal = cal.get(camera, cal)
    for k in ("K", "T_wc", "width", "height"):
        if k not in cal:
            raise ValueError(f"{camera_json}: missing '{k}' (expected K (3x3), T_wc (4x4 world -> camera), width, height"
                             f"{', possibly under the camera key ' + repr(camera)})")
    sy, sx, top, left = fit_transform(int(cal["height"]), int(cal["width"]), height, width, resize)
    K = np.array(cal["K"], dtype=np.float64)
    K = np.array([[K[0, 0] * sx, 0, K[0, 2] * sx - left], [0, K[1, 1] * sy, K[1, 2] * sy - top], [0, 0, 1]])
    return {"chain": chain, "urdf": os.path.abspath(urdf), "joint_columns": list(joint_columns),
            "gripper_column": int(gripper_column), "gripper_range": tuple(gripper_range), "K": K,
            "T_wc": np.array(cal["T_wc"], dtype=np.float64), "ee_link": ee_link}


# -------------------------------------------------------------------------------------------------
# Clips
# -------------------------------------------------------------------------------------------------


class LeRobotClips:
    """Clip batches from a LeRobot dataset, with the keys of data/toyworld.ClipDataset.

    A clip starts at frame s of an episode: video = frames s, s + k, ..., s + (frames - 1) k with
    k = frame_stride (AGRA App. C.3 takes a frame every 3 control steps, so 16 frames span a 48-step
    chunk); actions = the `horizon` control steps from s; state and value at s. Past the episode end
    the last frame and the last action repeat (LeRobot actions are mostly absolute targets: holding).
    State and actions are normalized with mean / std computed from the selected episodes, then
    zero-padded to the model's state_dim / action_dim (GR00T / RDT-style padding). value = the
    Monte-Carlo return sum_i gamma^i r_{s+i} (MV-WAM Eq. 4) of the reward column, or, in a dataset
    without one, of a sparse reward 1 at each episode's last frame (demonstrations taken as successful).
    """

    def __init__(self, reader: LeRobotReader, camera: str, frames: int, horizon: int, height: int, width: int,
                 frame_stride: int = 1, gamma: float = 0.99, state_key: str = "observation.state",
                 action_key: str = "action", reward_key: str = "auto", episodes=None, state_dim: int | None = None,
                 action_dim: int | None = None, resize: str = "crop", stats: dict | None = None, kin: dict | None = None):
        reader.check_camera(camera)
        reader.check_feature(state_key, "state (--state-key)")
        reader.check_feature(action_key, "actions (--action-key)")
        if reward_key == "auto":
            reward_key = next((k for k in ("next.reward", "reward") if k in reader.features), None)
        elif reward_key:
            reader.check_feature(reward_key, "reward (--reward-key)")
        self.reader, self.camera, self.frames, self.horizon, self.stride = reader, camera, frames, horizon, frame_stride
        self.size, self.resize, self.kin = (height, width), resize, kin
        eps = reader.episodes if episodes is None else [reader.episodes[i] for i in episodes]
        cols = {"state": [], "actions": [], "task": [], "value": []}
        for ep in eps:
            c = reader.columns(ep, [state_key, action_key, "task_index"] + ([reward_key] if reward_key else []))
            r = c[reward_key].reshape(len(c[state_key]), -1)[:, 0].astype(np.float32) if reward_key else \
                np.eye(1, ep["length"], ep["length"] - 1, dtype=np.float32)[0]          # sparse: 1 at the last frame
            cols["state"].append(c[state_key].reshape(ep["length"], -1).astype(np.float32))
            cols["actions"].append(c[action_key].reshape(ep["length"], -1).astype(np.float32))
            cols["task"].append(c["task_index"].astype(np.int64).reshape(-1))
            cols["value"].append(mc_returns(r, gamma))
        self.a = {k: np.concatenate(v) for k, v in cols.items()}
        unknown = sorted(set(self.a["task"].tolist()) - set(reader.tasks))
        if unknown:
            raise ValueError(f"{reader.source}: task_index {unknown[:5]} of the data files is not in the tasks table")
        self.episodes = eps
        self.ep_len = np.array([e["length"] for e in eps])
        self.ep_start = np.concatenate([[0], np.cumsum(self.ep_len)[:-1]])
        self.stats = stats or norm_stats(self.a)
        self.dims = {"state": self.a["state"].shape[1], "action": self.a["actions"].shape[1]}
        for what, have, want in (("state", self.dims["state"], state_dim), ("action", self.dims["action"], action_dim)):
            if want is not None and have > want:
                raise ValueError(f"{reader.source}: '{state_key if what == 'state' else action_key}' has {have} dims, the "
                                 f"model's {what}_dim is {want}: use --set {what}_dim={have}")
        self.state_dim, self.action_dim = state_dim or self.dims["state"], action_dim or self.dims["action"]
        self.index = np.concatenate([np.stack([np.full(L - 1, e), np.arange(L - 1)], 1) for e, L in enumerate(self.ep_len) if L > 1])
        self._video: dict[int, np.ndarray] = {}
        self._depth: dict[int, tuple] = {}
        self.meta = {"source": reader.source, "codebase_version": reader.version, "fps": reader.fps, "camera": camera,
                     "state_key": state_key, "action_key": action_key, "gamma": gamma, "stats": self.stats,
                     "action_names": reader.features[action_key].get("names"), "dims": self.dims,
                     "value_source": f"Monte-Carlo return of '{reward_key}'" if reward_key else
                     "Monte-Carlo return of a sparse reward 1 at each episode's last frame (the dataset has no reward column)"}

    def __len__(self):
        return len(self.index)

    def episode_video(self, e: int) -> np.ndarray:
        """All frames of (selected) episode e at the model's size, decoded once and kept."""
        if e not in self._video:
            self._video[e] = self.reader.frames(self.episodes[e], self.camera, self.size, self.resize)
        return self._video[e]

    def episode_joints(self, e: int):
        """EA-WM: arm joint values (L, n_arm) and gripper opening (L,) in [0, 1] (1 = open) of episode e."""
        raw = self.a["state"][self.ep_start[e]:self.ep_start[e] + self.ep_len[e]]
        lo, hi = self.kin["gripper_range"]
        return raw[:, self.kin["joint_columns"]], np.clip((raw[:, self.kin["gripper_column"]] - lo) / (hi - lo), 0, 1)

    def kvaf_depth_range(self, e: int) -> tuple[float, float]:
        """EA-WM: the camera-depth range of the robot over episode e (the KVAF skeleton colours, App. A.2)."""
        if e not in self._depth:
            self._depth[e] = depth_range(self.kin["chain"], self.kin["chain"].full_q(*self.episode_joints(e)), self.kin["T_wc"])
        return self._depth[e]

    def clip_rows(self, e: int, s: int):
        """Frame indices (frames,) and action indices (horizon,) of the clip starting at s of episode e."""
        L = self.ep_len[e]
        return np.minimum(s + self.stride * np.arange(self.frames), L - 1), np.minimum(s + np.arange(self.horizon), L - 1)

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> dict:
        rows = torch.randint(len(self.index), (batch_size,), generator=generator).numpy()
        return self.get(rows)

    def get(self, rows) -> dict:
        st = self.stats
        norm = lambda x, k: (x - np.array(st[k]["mean"], np.float32)) / np.array(st[k]["std"], np.float32)  # noqa: E731
        pad = lambda x, d: np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, d - x.shape[-1])])                     # noqa: E731
        video, state, actions, value, text, joints, grip, zr = [], [], [], [], [], [], [], []
        for e, s in self.index[np.asarray(rows)]:
            f_idx, a_idx = self.clip_rows(e, s)
            base = self.ep_start[e]
            video.append(self.episode_video(e)[f_idx])
            state.append(pad(norm(self.a["state"][base + s], "state"), self.state_dim))
            actions.append(pad(norm(self.a["actions"][base + a_idx], "actions"), self.action_dim))
            value.append(self.a["value"][base + s])
            text.append(self.reader.tasks[int(self.a["task"][base + s])])
            if self.kin is not None:
                q, g = self.episode_joints(e)
                joints.append(q[f_idx])
                grip.append(g[f_idx, None])
                zr.append(self.kvaf_depth_range(e))
        B = len(video)
        batch = {"video": torch.from_numpy(np.stack(video)).permute(0, 4, 1, 2, 3).float() / 127.5 - 1,   # (B, 3, T, H, W)
                 "state": torch.from_numpy(np.stack(state)).float(), "actions": torch.from_numpy(np.stack(actions)).float(),
                 "value": torch.tensor(np.array(value), dtype=torch.float32), "text": text}
        if self.kin is not None:
            batch.update(joints=torch.from_numpy(np.stack(joints)).float(), gripper=torch.from_numpy(np.stack(grip)).float(),
                         K=torch.tensor(self.kin["K"], dtype=torch.float32).expand(B, 3, 3),
                         T_wc=torch.tensor(self.kin["T_wc"], dtype=torch.float32).expand(B, 4, 4),
                         kvaf_depth_range=torch.tensor(zr, dtype=torch.float32))
        return batch


# -------------------------------------------------------------------------------------------------
# A toy-world dataset in LeRobot's layouts (to try the real-data path on a laptop, and for tests)
# -------------------------------------------------------------------------------------------------


def _write_parquet(path: str, columns: dict, fixed: bool):
    import pyarrow as pa
    arrays = {}
    for k, v in columns.items():
        v = np.asarray(v)
        if v.ndim == 2:
            flat = pa.array(v.reshape(-1))
            arrays[k] = pa.FixedSizeListArray.from_arrays(flat, v.shape[1]) if fixed else \
                pa.ListArray.from_arrays(pa.array(np.arange(0, v.size + 1, v.shape[1], dtype=np.int32)), flat)
        else:
            arrays[k] = pa.array(v.tolist() if v.dtype == object else v)
    atomic_write(path, lambda tmp: _parquet().write_table(pa.table(arrays), tmp))


def write_toy_lerobot(out: str, episodes: int = 4, layout: str = "v3.0", res: int = 32, seed: int = 0,
                      reward: bool = True, camera: str = "observation.images.front", fps: int = 10) -> str:
    """Toy-world expert episodes written as a LeRobot dataset (parquet + one near-lossless MP4 stream per
    camera) in layout v2.1 or v3.0, plus `toyarm.urdf` and `camera.json` (K, T_wc) for EA-WM. -> out."""
    from data.toyworld import URDF_PATH, generate
    if layout not in ("v2.1", "v3.0"):
        raise ValueError(f"layout={layout!r}; expected 'v2.1' or 'v3.0'")
    arrays, meta = generate(episodes, "train", seed0=seed, res=res)
    tasks = sorted({e["instruction"] for e in meta["episodes"]})
    joint_names = [n for n in meta["joint_names"] if "finger" not in n]
    feats = {camera: {"dtype": "video", "shape": [res, res, 3], "names": ["height", "width", "channels"],
                      "info": {"video.fps": fps, "video.codec": "h264", "video.pix_fmt": "yuv444p"}},
             "observation.state": {"dtype": "float32", "shape": [4], "names": joint_names + ["gripper"]},
             "action": {"dtype": "float32", "shape": [4], "names": [f"delta_{n}" for n in joint_names] + ["gripper_cmd"]},
             "timestamp": {"dtype": "float32", "shape": [1], "names": None},
             "frame_index": {"dtype": "int64", "shape": [1], "names": None},
             "episode_index": {"dtype": "int64", "shape": [1], "names": None},
             "index": {"dtype": "int64", "shape": [1], "names": None},
             "task_index": {"dtype": "int64", "shape": [1], "names": None}}
    if reward:
        feats["next.reward"] = {"dtype": "float32", "shape": [1], "names": None}
    v3 = layout == "v3.0"
    info = {"codebase_version": layout, "robot_type": "toyarm", "total_episodes": episodes,
            "total_frames": int(len(arrays["frames"])), "total_tasks": len(tasks), "chunks_size": 1000, "fps": fps,
            "splits": {"train": f"0:{episodes}"}, "features": feats,
            "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet" if v3 else
            "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
            "video_path": "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4" if v3 else
            "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"}
    if os.path.exists(out):
        shutil.rmtree(out)
    rows, video, ep_rows = [], [], []
    for e, ep in enumerate(meta["episodes"]):
        sl = slice(ep["start"], ep["start"] + ep["length"])
        L = ep["length"]
        cols = {"observation.state": arrays["state"][sl], "action": arrays["actions"][sl],
                "timestamp": (np.arange(L) / fps).astype(np.float32), "frame_index": np.arange(L),
                "episode_index": np.full(L, e), "index": np.arange(ep["start"], ep["start"] + L),
                "task_index": np.full(L, tasks.index(ep["instruction"]))}
        if reward:
            cols["next.reward"] = arrays["reward"][sl]
        if v3:
            rows.append(cols)
            video.append(arrays["frames"][sl])
            t0 = ep["start"] / fps
            ep_rows.append({"episode_index": e, "tasks": [ep["instruction"]], "length": L, "data/chunk_index": 0,
                            "data/file_index": 0, "dataset_from_index": ep["start"], "dataset_to_index": ep["start"] + L,
                            f"videos/{camera}/chunk_index": 0, f"videos/{camera}/file_index": 0,
                            f"videos/{camera}/from_timestamp": t0, f"videos/{camera}/to_timestamp": t0 + L / fps,
                            "meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0})
        else:
            _write_parquet(os.path.join(out, info["data_path"].format(episode_chunk=0, episode_index=e)), cols, fixed=False)
            save_mp4(os.path.join(out, info["video_path"].format(episode_chunk=0, video_key=camera, episode_index=e)),
                     arrays["frames"][sl], fps, crf=0, pix_fmt="yuv444p")
            ep_rows.append({"episode_index": e, "tasks": [ep["instruction"]], "length": L})
    os.makedirs(os.path.join(out, "meta"), exist_ok=True)
    if v3:
        _write_parquet(os.path.join(out, info["data_path"].format(chunk_index=0, file_index=0)),
                       {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}, fixed=True)
        save_mp4(os.path.join(out, info["video_path"].format(video_key=camera, chunk_index=0, file_index=0)),
                 np.concatenate(video), fps, crf=0, pix_fmt="yuv444p")
        ep_cols = {k: [r[k] for r in ep_rows] for k in ep_rows[0]}
        ep_cols["tasks"] = np.array(ep_cols["tasks"] + [None], dtype=object)[:-1]
        _write_parquet(os.path.join(out, "meta", "episodes", "chunk-000", "file-000.parquet"), ep_cols, fixed=False)
        _write_parquet(os.path.join(out, "meta", "tasks.parquet"),
                       {"task_index": np.arange(len(tasks)), "task": np.array(tasks + [None], dtype=object)[:-1]}, fixed=False)
    else:
        lines = lambda rs: "".join(json.dumps(r) + "\n" for r in rs)  # noqa: E731
        atomic_write(os.path.join(out, "meta", "episodes.jsonl"), lambda tmp: open(tmp, "w").write(lines(ep_rows)))
        atomic_write(os.path.join(out, "meta", "tasks.jsonl"), lambda tmp: open(tmp, "w").write(
            lines([{"task_index": i, "task": t} for i, t in enumerate(tasks)])))
    atomic_write(os.path.join(out, "meta", "info.json"), lambda tmp: open(tmp, "w").write(json.dumps(info, indent=1)))
    shutil.copy(URDF_PATH, os.path.join(out, "toyarm.urdf"))
    cam = {"K": meta["camera"]["K"], "T_wc": meta["camera"]["T_wc"], "width": res, "height": res}
    atomic_write(os.path.join(out, "camera.json"), lambda tmp: open(tmp, "w").write(json.dumps({camera: cam})))
    return out


def main():
    p = argparse.ArgumentParser(description="Inspect a LeRobot dataset, or write a toy-world one in a LeRobot layout.")
    p.add_argument("--info", default=None, help="a LeRobot dataset (Hub id or folder): print cameras, features, tasks")
    p.add_argument("--toy-out", default=None, help="write toy-world expert episodes as a LeRobot dataset to this folder")
    p.add_argument("--layout", default="v3.0", choices=("v2.1", "v3.0"), help="LeRobot layout of --toy-out")
    p.add_argument("--episodes", type=int, default=8, help="episodes of --toy-out")
    p.add_argument("--res", type=int, default=64, help="frame size of --toy-out")
    args = p.parse_args()
    if args.toy_out:
        print("wrote", write_toy_lerobot(args.toy_out, args.episodes, args.layout, args.res))
    if args.info:
        r = LeRobotReader(args.info)
        print(f"{r.source}: LeRobot {r.version}, {len(r.episodes)} episodes, {sum(e['length'] for e in r.episodes)} frames "
              f"at {r.fps:g} fps, {len(r.tasks)} tasks")
        print("cameras:", r.cameras)
        for k, f in r.features.items():
            print(f"  {k:32s} {f.get('dtype')} {f.get('shape')} {f.get('names') if f.get('dtype') not in ('video', 'image') else ''}")
        for i, t in list(r.tasks.items())[:5]:
            print(f"  task {i}: {t}")


if __name__ == "__main__":
    main()
