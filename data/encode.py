"""Encode a robot dataset once into what the full presets train on (safetensors shards + index.json).

The full presets do not see pixels or words: they train on the features of frozen encoders, which
are computed once here and cached, as the papers' pipelines do:

  latents        the Wan VAE (diffusers AutoencoderKLWan), normalized (z - latents_mean) / latents_std
                 as the Wan pipelines do, posterior mode: Wan2.1 VAE (16 ch, 4x8x8) for AGRA (its
                 Cosmos-Predict2.5 tokenizer is the Wan2.1 VAE) and MV-WAM (WoW-1.3B / Wan2.1);
                 Wan2.2 VAE (48 ch, 4x16x16) for EA-WM (Wan2.2-TI2V-5B)
  text_emb       per task (instruction): umT5-XXL last hidden states, the prompt cleaned, padded with
                 zeros to 512 tokens (Wan, MV-WAM / EA-WM), or Cosmos-Reason1-7B "full concat" features
                 (AGRA / Cosmos-Predict2.5: the chat-formatted prompt padded to 512 tokens, every hidden
                 layer after the embeddings normalized (h - mean) / (std + 1e-8) over its width, the
                 layers concatenated: 28 x 3584 = 100352)
  teacher        AGRA with teacher=dinov2: DINOv2 patch features (last_hidden_state without CLS /
                 registers) of the first raw frame of each latent frame (Eq. 3), frames resized
                 (bicubic) to teacher_res with ImageNet normalization
  image_emb      MV-WAM: SigLIP2 features (last_hidden_state) of the current frame (Sec. 3.1)
  kvaf_latents   EA-WM: KVAF videos rendered with eawm.render_kvaf (episode-level depth range), then
                 the same VAE (Sec. 3.1-3.2)
  edls_latents   EA-WM with event fusion: the frame-difference video through the same VAE (Eq. 7,
                 eawm.edls_target)

plus per clip the normalized state, actions, the Monte-Carlo value (MV-WAM Eq. 4) and the task
index. Encoders come from diffusers / transformers (optional: pip install diffusers transformers
pyarrow av); every source is a Hub id or a local folder. The output appears only when complete: it
is written to OUT.partial and renamed, each file atomically.

    python data/encode.py --dataset lerobot/aloha_sim_transfer_cube_human --camera observation.images.top \
        --model agra --preset full --out data/encoded/aloha_agra
    python data/encode.py --dataset DIR --camera observation.images.front --model eawm --preset full \
        --urdf robot.urdf --camera-json camera.json --out data/encoded/mine_eawm

`train.py --data OUT` trains on the result; `sample.py --ckpt RUN --data OUT` decodes predictions with
the same VAE.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import atomic_write, config_to_dict, pick_device  # noqa: E402

FORMAT = "wam-encoded-v1"
TEXT_LEN = 512                                # umT5 / Cosmos-Reason prompts are padded to 512 tokens
SIGLIP_TOKENS = 729                           # SigLIP2-so400m-patch14-384: 27 x 27 patches (memory plans)
SOURCES = {                                   # the encoders of the papers' backbones (Hub ids)
    "wan2.1": ("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "vae"),
    "wan2.2": ("Wan-AI/Wan2.2-TI2V-5B-Diffusers", "vae"),
    "umt5": ("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "text_encoder"),
    "cosmos_reason": ("nvidia/Cosmos-Reason1-7B", None),
    "dinov2": ("facebook/dinov2-base", None),
    "siglip2": ("google/siglip2-so400m-patch14-384", None),
}
INSTALL = "pip install diffusers transformers pyarrow av"
STORED = ("latents", "state", "actions", "value", "task", "episode", "start", "teacher", "image_emb",
          "kvaf_latents", "edls_latents")


# -------------------------------------------------------------------------------------------------
# What each model trains on
# -------------------------------------------------------------------------------------------------


def needs(name: str, cfg) -> dict:
    """The cached features a model config reads, and their widths."""
    text = None
    if name == "agra" and cfg.crossattn_proj_in:
        text = ("cosmos_reason", cfg.crossattn_proj_in)
    elif name in ("mvwam", "eawm") and cfg.text_encoder == "precomputed":
        text = ("umt5", cfg.text_dim)
    return {"text": text,
            "teacher": name == "agra" and cfg.teacher == "dinov2",
            "image": name == "mvwam" and cfg.image_encoder == "precomputed",
            "kvaf": name == "eawm" and cfg.kvaf,
            "edls": name == "eawm" and cfg.fusion == "event",
            "numeric_joints": name == "eawm" and not cfg.kvaf}


def clip_shapes(name: str, cfg, image_tokens: int = SIGLIP_TOKENS) -> dict:
    """Shape of every cached tensor of one clip (text_emb: one per task)."""
    T, h, w = cfg.latent_frames, cfg.height // cfg.codec_p, cfg.width // cfg.codec_p
    lat = (cfg.latent_channels, T, h, w)
    need = needs(name, cfg)
    out = {"latents": lat, "state": (cfg.state_dim,), "actions": (cfg.horizon, cfg.action_dim), "value": (), "task": ()}
    if need["text"]:
        out["text_emb"] = (TEXT_LEN, need["text"][1])
    if need["teacher"]:
        g = cfg.teacher_res // cfg.teacher_patch
        out["teacher"] = (T, g, g, cfg.teacher_dim)
    if need["image"]:
        out["image_emb"] = (image_tokens, cfg.image_dim)
    if need["kvaf"]:
        out["kvaf_latents"] = lat
    if need["edls"]:
        out["edls_latents"] = lat
    return out


def disk_estimate(name: str, cfg, every: int, bytes_per: int = 2, tasks: int = 1, image_tokens: int = SIGLIP_TOKENS) -> dict:
    """Estimated bytes of an encoded dataset per 1,000 dataset frames (one clip starts every `every`
    frames; text features counted once per task). An estimate: episode ends add a clip or two."""
    shapes = clip_shapes(name, cfg, image_tokens)
    per_clip = sum(math.prod(s) * (8 if k == "task" else bytes_per) for k, s in shapes.items() if k != "text_emb")
    text = math.prod(shapes["text_emb"]) * bytes_per * tasks if "text_emb" in shapes else 0
    return {"per_clip": per_clip, "per_1k_frames": per_clip * 1000 / every, "text_per_task": text // max(tasks, 1)}


# -------------------------------------------------------------------------------------------------
# Encoders (diffusers / transformers, imported here)
# -------------------------------------------------------------------------------------------------


def _import(what: str):
    try:
        if what == "diffusers":
            import diffusers
            return diffusers
        import transformers
        return transformers
    except ImportError:
        raise ImportError(f"encoding needs {what}: {INSTALL}") from None


def from_pretrained(cls, source: str, subfolder: str | None, **kw):
    """cls.from_pretrained from a local folder or a Hub id, from `subfolder` where the source has one
    (the -Diffusers repos: vae/, text_encoder/, tokenizer/), else from its root."""
    if os.path.isdir(source):
        tries = [subfolder] if subfolder and os.path.isdir(os.path.join(source, subfolder)) else [None]
    else:
        tries = [subfolder, None] if subfolder else [None]
    errors = []
    for sub in tries:
        try:
            return cls.from_pretrained(source, **({"subfolder": sub} if sub else {}), **kw)
        except Exception as e:  # try the next layout; report all if none loads
            errors.append(f"{sub or '(root)'}: {type(e).__name__}: {e}")
    raise OSError(f"cannot load {cls.__name__} from {source!r}: " + "; ".join(errors))


class WanVAE:
    """diffusers AutoencoderKLWan with the Wan pipelines' latent normalization:
    encode: z = (mode of q(z | x) - latents_mean) / latents_std; decode inverts it.
    Same interface as common.PixelCodec (encode (B, 3, T, H, W) in [-1, 1] -> (B, C, 1 + (T-1)/q, H/p, W/p)),
    so it can stand in for a model's `codec` when sampling."""

    def __init__(self, source: str, subfolder: str | None = "vae", device="cpu", dtype=torch.float32):
        diffusers = _import("diffusers")
        self.source, self.subfolder = source, subfolder
        self.vae = from_pretrained(diffusers.AutoencoderKLWan, source, subfolder, torch_dtype=dtype).to(device).eval()
        c = self.vae.config
        self.channels, self.q, self.p = c.z_dim, c.scale_factor_temporal, c.scale_factor_spatial
        self.mean = torch.tensor(c.latents_mean, dtype=torch.float32, device=device).view(1, -1, 1, 1, 1)
        self.std = torch.tensor(c.latents_std, dtype=torch.float32, device=device).view(1, -1, 1, 1, 1)
        self.device, self.dtype = device, dtype

    def describe(self) -> dict:
        return {"source": self.source, "subfolder": self.subfolder, "channels": self.channels, "stride": [self.q, self.p, self.p],
                "latents_mean": self.mean.flatten().tolist(), "latents_std": self.std.flatten().tolist()}

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        z = self.vae.encode(video.to(self.device, self.dtype)).latent_dist.mode().float()
        return (z - self.mean) / self.std

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        z = z.to(self.device).float() * self.std + self.mean
        return self.vae.decode(z.to(self.dtype)).sample.float().clamp(-1, 1)


class TextFeatures:
    """Instruction -> (TEXT_LEN, D) features. kind "umt5": Wan's umT5 encoder (last hidden state of the
    cleaned prompt, zeros past its tokens); kind "cosmos_reason": Cosmos-Reason1's full-concat features
    (Cosmos-Predict2.5), every hidden layer after the embeddings normalized over its width, concatenated."""

    def __init__(self, kind: str, source: str, device="cpu", dtype=torch.float32):
        tf = _import("transformers")
        self.kind, self.source, self.device = kind, source, device
        if kind == "umt5":
            self.tokenizer = from_pretrained(tf.AutoTokenizer, source, "tokenizer")
            self.model = from_pretrained(tf.UMT5EncoderModel, source, "text_encoder", dtype=dtype)
        elif kind == "cosmos_reason":
            self.tokenizer = from_pretrained(tf.AutoTokenizer, source, "tokenizer")
            self.model = from_pretrained(tf.Qwen2_5_VLForConditionalGeneration, source, "text_encoder", dtype=dtype)
        else:
            raise ValueError(f"text features {kind!r}; expected 'umt5' or 'cosmos_reason'")
        self.model = self.model.to(device).eval()

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> torch.Tensor:
        if self.kind == "umt5":
            from diffusers.pipelines.wan.pipeline_wan import prompt_clean        # Wan's prompt cleaning
            tok = self.tokenizer([prompt_clean(t) for t in texts], padding="max_length", max_length=TEXT_LEN,
                                 truncation=True, add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
            h = self.model(tok.input_ids.to(self.device), tok.attention_mask.to(self.device)).last_hidden_state
            return (h.float() * tok.attention_mask.to(self.device)[..., None]).cpu()   # zeros after the prompt (Wan)
        out = []
        for t in texts:                                                           # the Cosmos-Predict2.5 prompt format
            conv = [{"role": "system", "content": [{"type": "text", "text":
                     "You are a helpful assistant who will provide prompts to an image generator."}]},
                    {"role": "user", "content": [{"type": "text", "text": t}]}]
            ids = self.tokenizer.apply_chat_template(conv, tokenize=True, add_generation_prompt=False, add_vision_id=False,
                                                     max_length=TEXT_LEN, truncation=True, padding="max_length")
            ids = ids["input_ids"] if not isinstance(ids, list) else ids
            hs = self.model(torch.tensor([ids], device=self.device), output_hidden_states=True).hidden_states
            out.append(torch.cat([(h - h.mean(-1, keepdim=True)) / (h.std(-1, keepdim=True) + 1e-8) for h in hs[1:]], -1))
        return torch.cat(out).float().cpu()


class ImageFeatures:
    """Frozen vision encoders of transformers: kind "dinov2" -> patch features (N, g, g, D) of images
    resized (bicubic) to `res` with ImageNet normalization (CLS and register tokens dropped);
    kind "siglip2" -> last_hidden_state (N, tokens, D) of images resized to the model's image_size
    (SigLIP's normalization maps [0, 1] to [-1, 1], our frames' range)."""

    def __init__(self, kind: str, source: str, res: int | None = None, device="cpu", dtype=torch.float32):
        tf = _import("transformers")
        self.kind, self.source, self.device, self.dtype = kind, source, device, dtype
        if kind == "dinov2":
            self.model = from_pretrained(tf.AutoModel, source, None)
            self.res, self.skip = res, 1 + getattr(self.model.config, "num_register_tokens", 0)
        elif kind == "siglip2":
            self.model = from_pretrained(tf.SiglipVisionModel, source, None)
            self.res = self.model.config.image_size
        else:
            raise ValueError(f"image features {kind!r}; expected 'dinov2' or 'siglip2'")
        self.model = self.model.to(device, dtype).eval()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images.float(), size=(self.res, self.res), mode="bicubic", align_corners=False, antialias=True)
        if self.kind == "dinov2":
            x = ((x + 1) / 2 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        h = self.model(pixel_values=x.to(self.device, self.dtype)).last_hidden_state.float().cpu()
        if self.kind == "dinov2":
            g = self.res // self.model.config.patch_size
            return h[:, self.skip:].unflatten(1, (g, g))
        return h


# -------------------------------------------------------------------------------------------------
# Encoding
# -------------------------------------------------------------------------------------------------


def _write_shard(folder: str, i: int, tensors: dict, dtype) -> dict:
    from safetensors.torch import save_file
    name = f"shard-{i:05d}.safetensors"
    out = {k: (torch.cat(v) if k in ("task", "episode", "start") else torch.cat(v).to(dtype)).contiguous() for k, v in tensors.items()}
    atomic_write(os.path.join(folder, name), lambda tmp: save_file(out, tmp))
    return {"file": name, "clips": len(out["latents"])}


def encode(args, cfg) -> str:
    """Encode args.dataset for model args.model with config cfg into args.out; -> args.out."""
    import eawm
    from data.lerobot import LeRobotClips, LeRobotReader, kinematics
    name, need = args.model, needs(args.model, cfg)
    stride = args.frame_stride or getattr(cfg, "frame_stride", 1)
    device = pick_device(args.device)
    fdt = torch.bfloat16 if device.type == "cuda" else torch.float32          # text / image encoders
    store = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[args.save_dtype]
    out, part = args.out.rstrip("/"), args.out.rstrip("/") + ".partial"
    if os.path.exists(out) and not args.overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")

    reader = LeRobotReader(args.dataset)
    kin = None
    if need["kvaf"] or need["numeric_joints"]:
        kin = kinematics(reader, args.state_key, args.camera, args.urdf, args.camera_json, cfg.height, cfg.width,
                         args.resize, args.joint_columns, args.gripper_column, args.gripper_range, args.ee_link)
    episodes = None
    if args.episodes:
        lo, _, hi = args.episodes.partition(":")
        episodes = list(range(int(lo or 0), int(hi) if hi else len(reader.episodes)))
    clips = LeRobotClips(reader, args.camera, cfg.frames, cfg.horizon, cfg.height, cfg.width, stride, args.gamma,
                         args.state_key, args.action_key, args.reward_key, episodes, cfg.state_dim, cfg.action_dim,
                         args.resize, kin=kin)
    span = (cfg.frames - 1) * stride
    every = args.every or max(1, span // 2)

    vsrc = args.vae or SOURCES["wan2.1" if cfg.latent_channels == 16 else "wan2.2"][0]
    vae = WanVAE(vsrc, "vae", device, torch.float32 if args.vae_dtype == "float32" else torch.bfloat16)
    if (vae.channels, vae.q, vae.p) != (cfg.latent_channels, cfg.latent_q, cfg.codec_p):
        raise ValueError(f"the VAE {vsrc} makes {vae.channels}-channel latents at stride {vae.q}x{vae.p}x{vae.p}; {name} "
                         f"expects {cfg.latent_channels} channels at {cfg.latent_q}x{cfg.codec_p}x{cfg.codec_p} "
                         f"(latent_channels, latent_q, codec_p): pass the matching --vae (Wan2.1 VAE for AGRA / MV-WAM, "
                         f"Wan2.2 VAE for EA-WM)")
    text = TextFeatures(need["text"][0], args.text_encoder or SOURCES[need["text"][0]][0], device, fdt) if need["text"] else None
    teacher = ImageFeatures("dinov2", args.teacher_encoder or SOURCES["dinov2"][0], cfg.teacher_res, device, fdt) \
        if need["teacher"] else None
    image = ImageFeatures("siglip2", args.image_encoder or SOURCES["siglip2"][0], None, device, fdt) if need["image"] else None

    if os.path.exists(part):
        shutil.rmtree(part)
    os.makedirs(part)
    try:
        index = {"format": FORMAT, "model": name, "created": time.strftime("%Y-%m-%d %H:%M:%S"),
                 "clip": {"frames": cfg.frames, "frame_stride": stride, "horizon": cfg.horizon, "height": cfg.height,
                          "width": cfg.width, "every": every, "resize": args.resize,
                          "state_dim": cfg.state_dim, "action_dim": cfg.action_dim},
                 "config": config_to_dict(cfg), "dataset": clips.meta, "stats": clips.stats,
                 "tasks": [reader.tasks[i] for i in sorted(reader.tasks)], "task_ids": sorted(reader.tasks),
                 "encoders": {"vae": vae.describe()}, "dtype": args.save_dtype, "shards": []}
        if text is not None:                                                   # one row per task
            from safetensors.torch import save_file
            emb = torch.cat([text(index["tasks"][i:i + 8]) for i in range(0, len(index["tasks"]), 8)])
            if emb.shape[-1] != need["text"][1]:
                raise ValueError(f"the text encoder {text.source} gives {emb.shape[-1]}-wide features; {name} expects "
                                 f"{need['text'][1]} ({'crossattn_proj_in' if name == 'agra' else 'text_dim'})")
            atomic_write(os.path.join(part, "text.safetensors"), lambda tmp: save_file({"text_emb": emb.to(store).contiguous()}, tmp))
            index["encoders"]["text"] = {"kind": text.kind, "source": text.source, "length": TEXT_LEN, "dim": emb.shape[-1]}
        if teacher is not None:
            index["encoders"]["teacher"] = {"kind": "dinov2", "source": teacher.source, "res": teacher.res}
        if image is not None:
            index["encoders"]["image"] = {"kind": "siglip2", "source": image.source, "res": image.res}
        if kin is not None:
            index["kinematics"] = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in kin.items() if k != "chain"}

        first = [0] + [1 + (t - 1) * cfg.latent_q for t in range(1, cfg.latent_frames)]   # first raw frame per latent frame
        offset = np.concatenate([[0], np.cumsum(np.maximum(clips.ep_len - 1, 0))])
        buf, n_clips, t0 = {}, 0, time.time()
        for e in range(len(clips.episodes)):
            starts = list(range(0, clips.ep_len[e] - 1, every))
            for i in range(0, len(starts), args.batch):
                rows = offset[e] + np.array(starts[i:i + args.batch])
                b = clips.get(rows)
                part_t = {"latents": vae.encode(b["video"]), "state": b["state"], "actions": b["actions"], "value": b["value"],
                          "task": torch.tensor([int(clips.a["task"][clips.ep_start[e] + s]) for s in starts[i:i + args.batch]]),
                          "episode": torch.full((len(rows),), clips.episodes[e]["index"]),
                          "start": torch.tensor(starts[i:i + args.batch])}
                if teacher is not None:                                        # Eq. 3: first raw frame of each latent frame
                    fr = b["video"][:, :, first]                               # (B, 3, T, H, W)
                    part_t["teacher"] = teacher(fr.transpose(1, 2).flatten(0, 1)).unflatten(0, (len(rows), len(first)))
                if image is not None:
                    part_t["image_emb"] = image(b["video"][:, :, 0])
                if need["kvaf"]:
                    kv = [eawm.render_kvaf(kin["chain"], b["joints"][j].numpy(), b["gripper"][j].reshape(-1).numpy(),
                                           kin["K"], kin["T_wc"], cfg.height, cfg.width, kin["ee_link"],
                                           clips.kvaf_depth_range(e))                 # episode-level colours (App. A.2)
                          for j in range(len(rows))]
                    kv = torch.from_numpy(np.stack(kv)).permute(0, 4, 1, 2, 3).float() / 127.5 - 1
                    part_t["kvaf_latents"] = vae.encode(kv)
                if need["edls"]:
                    part_t["edls_latents"] = eawm.edls_target(b["video"], vae.encode)   # Eq. 7
                for k, v in part_t.items():
                    buf.setdefault(k, []).append(v.cpu())
                n_clips += len(rows)
                if len(torch.cat(buf["task"])) >= args.shard_clips:
                    index["shards"].append(_write_shard(part, len(index["shards"]), buf, store))
                    buf = {}
            clips._video.pop(e, None)                                           # decoded frames of a finished episode
            print(f"episode {e + 1}/{len(clips.episodes)}: {n_clips} clips, {time.time() - t0:.0f}s", flush=True)
        if buf:
            index["shards"].append(_write_shard(part, len(index["shards"]), buf, store))
        if not index["shards"]:
            raise ValueError(f"{args.dataset}: no clip was encoded (episodes shorter than 2 frames?)")
        index["clips"] = n_clips
        atomic_write(os.path.join(part, "index.json"), lambda tmp: open(tmp, "w").write(json.dumps(index, indent=1)))
        if os.path.exists(out):
            shutil.rmtree(out)
        os.replace(part, out)
    except BaseException:
        shutil.rmtree(part, ignore_errors=True)                                 # nothing half-written stays behind
        raise
    return out


# -------------------------------------------------------------------------------------------------
# Reading an encoded dataset (train.py, sample.py)
# -------------------------------------------------------------------------------------------------


def is_encoded(folder: str) -> bool:
    path = os.path.join(folder, "index.json")
    return os.path.isfile(path) and json.load(open(path)).get("format") == FORMAT


class EncodedClips:
    """Batches of an encoded dataset: latents (B, C, T, h, w), state, actions, value, text (the
    instruction), and whichever of text_emb, teacher, image_emb, kvaf_latents, edls_latents were cached.
    Floating tensors come back as float32 (`feature_dtype` for the wide features)."""

    def __init__(self, folder: str, feature_dtype=torch.float32):
        from safetensors import safe_open
        path = os.path.join(folder, "index.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{folder}: no index.json (an encoded dataset is written by data/encode.py)")
        self.index = json.load(open(path))
        if self.index.get("format") != FORMAT:
            raise ValueError(f"{path}: format {self.index.get('format')!r}, expected {FORMAT!r}")
        self.folder, self.feature_dtype = folder, feature_dtype
        self.files = []
        for s in self.index["shards"]:
            try:
                self.files.append(safe_open(os.path.join(folder, s["file"]), framework="pt"))
            except Exception as e:
                raise ValueError(f"{folder}/{s['file']}: cannot read the shard ({e})") from None
        self.bounds = np.cumsum([0] + [s["clips"] for s in self.index["shards"]])
        self.keys = set(self.files[0].keys())
        self.text_emb = None
        if os.path.isfile(os.path.join(folder, "text.safetensors")):
            self.text_emb = safe_open(os.path.join(folder, "text.safetensors"), framework="pt")
            self.keys.add("text_emb")
        self.meta = {"stats": self.index["stats"], "fps": self.index["dataset"]["fps"], "camera": self.index["dataset"]["camera"],
                     "gamma": self.index["dataset"]["gamma"], "source": self.index["dataset"]["source"], "encoded": folder}
        self.tasks = dict(zip(self.index["task_ids"], self.index["tasks"]))

    def __len__(self):
        return int(self.bounds[-1])

    def check(self, name: str, cfg):
        """Raise with expected vs received where these clips do not fit model `name` with config `cfg`."""
        idx, clip, vae = self.index, self.index["clip"], self.index["encoders"]["vae"]
        where = f"encoded dataset {self.folder}"
        C = self.files[0].get_slice("latents").get_shape()[1]
        if C != cfg.latent_channels:
            raise ValueError(f"{where} holds {C}-channel latents of {vae['source']}; {name} expects {cfg.latent_channels} "
                             f"(16: Wan2.1 VAE for AGRA / MV-WAM, 48: Wan2.2 VAE for EA-WM). Encode the dataset for "
                             f"this model: data/encode.py --model {name} ...")
        want = (cfg.latent_q, cfg.codec_p, cfg.codec_p)
        checks = [("VAE stride (latent_q, codec_p)", tuple(vae["stride"]), want),
                  ("frames", clip["frames"], cfg.frames), ("height x width", (clip["height"], clip["width"]), (cfg.height, cfg.width)),
                  ("horizon", clip["horizon"], cfg.horizon), ("state_dim", clip["state_dim"], cfg.state_dim),
                  ("action_dim", clip["action_dim"], cfg.action_dim)]
        if hasattr(cfg, "frame_stride"):
            checks.append(("frame_stride", clip["frame_stride"], cfg.frame_stride))
        for what, have, exp in checks:
            if have != exp:
                raise ValueError(f"{where}: {what} is {have}, {name} expects {exp}; re-encode with this config or --set it")
        need = needs(name, cfg)
        problems = []
        if need["text"]:
            if "text_emb" not in self.keys:
                problems.append(f"lacks text_emb ({need['text'][0]} features)")
            elif idx["encoders"]["text"]["dim"] != need["text"][1]:
                problems.append(f"has {idx['encoders']['text']['dim']}-wide text features ({idx['encoders']['text']['kind']}), "
                                f"{name} expects {need['text'][1]}")
        for key, flag, what, width in (("teacher", "teacher", "DINOv2 teacher features (teacher=dinov2)", "teacher_dim"),
                                       ("image_emb", "image", "SigLIP2 image features (image_encoder=precomputed)", "image_dim"),
                                       ("kvaf_latents", "kvaf", "KVAF latents (--urdf / --camera-json when encoding)", None),
                                       ("edls_latents", "edls", "EDLS latents (fusion=event)", None)):
            if need[flag] and key not in self.keys:
                problems.append(f"lacks {key}: {what}")
            elif need[flag] and width and self.files[0].get_slice(key).get_shape()[-1] != getattr(cfg, width):
                problems.append(f"has {self.files[0].get_slice(key).get_shape()[-1]}-wide {key}, {width} is {getattr(cfg, width)}")
        if name == "agra" and cfg.teacher == "toy" and cfg.agra_weight > 0:
            problems.append("AGRA's toy teacher reads the toy world's segmentation: on a real dataset use --set teacher=dinov2")
        if name == "mvwam" and cfg.image_encoder == "tiny":
            problems.append("holds no pixels for MV-WAM's tiny image encoder: --set image_encoder=precomputed")
        if problems:
            raise ValueError(f"{where} does not fit {name} with this config: " + "; ".join(problems)
                             + f". Encode for this config: data/encode.py --model {name} with the same --set options")

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> dict:
        rows = torch.randint(len(self), (batch_size,), generator=generator).numpy()
        return self.get(rows)

    def get(self, rows) -> dict:
        rows = np.asarray(rows)
        shard = np.searchsorted(self.bounds, rows, side="right") - 1
        cols = {k: [] for k in STORED if k in self.keys}
        for r, s in zip(rows, shard):
            i = int(r - self.bounds[s])
            for k in cols:
                cols[k].append(self.files[s].get_slice(k)[i:i + 1])
        batch = {}
        for k, v in cols.items():
            x = torch.cat(v)
            if x.is_floating_point():
                x = x.to(self.feature_dtype if k in ("teacher", "image_emb") else torch.float32)
            batch[k] = x
        batch["text"] = [self.tasks[int(t)] for t in batch["task"]]
        if self.text_emb is not None:
            ids = [self.index["task_ids"].index(int(t)) for t in batch["task"]]
            sl = self.text_emb.get_slice("text_emb")
            batch["text_emb"] = torch.cat([sl[i:i + 1] for i in ids]).to(self.feature_dtype)
        return batch


# -------------------------------------------------------------------------------------------------
# Command line
# -------------------------------------------------------------------------------------------------


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Encode a LeRobot dataset into the features a model's full preset trains on.")
    p.add_argument("--dataset", required=True, help="LeRobot dataset: Hub id (owner/name) or local folder (v2.1 or v3.0)")
    p.add_argument("--camera", required=True, help="camera (video feature) key, e.g. observation.images.top")
    p.add_argument("--model", required=True, choices=("agra", "mvwam", "eawm"), help="the model the features are for")
    p.add_argument("--preset", default="full", help="config preset (full, or tiny for a CPU try)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a Config field (as train.py)")
    p.add_argument("--out", required=True, help="output folder (index.json + shards)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--vae", default=None, help="Wan VAE (diffusers AutoencoderKLWan; Hub id or folder, subfolder vae if "
                   "present); default Wan2.1 for 16 latent channels, Wan2.2 for 48")
    p.add_argument("--vae-dtype", default="float32", choices=("float32", "bfloat16"), help="VAE compute dtype")
    p.add_argument("--text-encoder", default=None, help="umT5 (Wan) or Cosmos-Reason1 (AGRA) source; default the papers'")
    p.add_argument("--teacher-encoder", default=None, help="DINOv2 source for AGRA (default facebook/dinov2-base)")
    p.add_argument("--image-encoder", default=None, help="SigLIP2 source for MV-WAM (default google/siglip2-so400m-patch14-384)")
    p.add_argument("--frame-stride", type=int, default=None, help="control steps between clip frames (default: the "
                   "config's frame_stride, else 1; AGRA App. C.3: 3)")
    p.add_argument("--every", type=int, default=None, help="a clip starts every N frames (default half a clip's span)")
    p.add_argument("--episodes", default=None, help="episode range START:END (default all)")
    p.add_argument("--state-key", default="observation.state", help="state feature")
    p.add_argument("--action-key", default="action", help="action feature")
    p.add_argument("--reward-key", default="auto", help="reward feature for the Monte-Carlo value (auto: next.reward or "
                   "reward if present, else a sparse reward 1 at each episode's last frame)")
    p.add_argument("--gamma", type=float, default=0.99, help="discount of the Monte-Carlo value (MV-WAM Eq. 4)")
    p.add_argument("--resize", default="crop", choices=("crop", "stretch"), help="fit frames to the model's size")
    p.add_argument("--urdf", default=None, help="EA-WM: the robot's URDF")
    p.add_argument("--camera-json", default=None, help="EA-WM: {K, T_wc (world->camera), width, height} (optionally under the camera key)")
    p.add_argument("--joint-columns", default=None, type=lambda s: [int(x) for x in s.split(",")],
                   help="EA-WM: state columns of the URDF's arm joints, in chain order (default: by state names)")
    p.add_argument("--gripper-column", type=int, default=None, help="EA-WM: state column of the gripper")
    p.add_argument("--gripper-range", default=(0.0, 1.0), type=lambda s: tuple(float(x) for x in s.split(",")),
                   help="EA-WM: gripper values CLOSED,OPEN mapped to 0..1")
    p.add_argument("--ee-link", default="tcp", help="EA-WM: end-effector link of the URDF")
    p.add_argument("--batch", type=int, default=4, help="clips per encoder call")
    p.add_argument("--shard-clips", type=int, default=512, help="clips per shard file")
    p.add_argument("--save-dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"), help="stored float dtype")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu) or a torch device")
    return p.parse_args(argv)


def main(argv=None):
    args = get_args(argv)
    from train import make_config
    cfg = make_config(args.model, args.preset, args.set)
    stride = args.frame_stride or getattr(cfg, "frame_stride", 1)
    est = disk_estimate(args.model, cfg, args.every or max(1, (cfg.frames - 1) * stride // 2),
                        {"bfloat16": 2, "float16": 2, "float32": 4}[args.save_dtype])
    print(f"encoding {args.dataset} ({args.camera}) for {args.model} ({args.preset}): about "
          f"{est['per_1k_frames'] / 2**30:.2f} GiB per 1,000 frames (+{est['text_per_task'] / 2**20:.1f} MiB per task), an estimate")
    out = encode(args, cfg)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
