"""One plain training loop for the three world action models (AGRA, MV-WAM, EA-WM).

    python train.py --model agra --tiny                      # toy world: stage ground, then finetune; ~4 CPU minutes
    python train.py --model agra --preset frozen             # the longer default run (ground 300, finetune 4,000)
    python train.py --model agra --preset frozen_wide        # the 90 % recipe: 1,000 demos, ground 600, a wider head (~17 CPU minutes)
    python train.py --model mvwam --preset frozen_wide       # MV-WAM's 90 % recipe: the same, 5,000 joint steps (~21 CPU minutes)
    python train.py --model agra --preset long               # ground, joint with AGRA, finetune (~20 CPU minutes)
    python train.py --model agra --preset long_wide          # the same at the 90 % recipe's scale: joint 500 (~21 CPU minutes)
    python train.py --model agra --preset long_wide_tex      # the same in the world where shapes show (~29 CPU minutes)
    python train.py --model agra --preset scratch            # the earlier from-scratch run (~2.5 CPU minutes)
    python train.py --model agra --preset long --set agra_weight=0   # the WAM baseline
    python train.py --model agra --tiny --resume runs/agra   # continue a run bit-exactly
    python train.py --model eawm --tiny                      # 3,000 steps, ~40-70 CPU minutes (--preset quick: 1,000, ~20 minutes)
    python train.py --model mvwam --preset full --pretrained --data ...   # WoW / Wan2.1 + SigLIP2 from the Hub
    torchrun --nproc_per_node=2 train.py --model agra --tiny # DDP (gloo on CPU, nccl on GPU)

Real data and full presets (see README, "Training on real data"):

    python train.py --model mvwam --preset scratch --data lerobot/pusht --camera observation.image  # a LeRobot dataset, decoded
    python train.py --model agra --preset full --data data/encoded/aloha_agra             # data/encode.py output
    torchrun --nproc_per_node=8 train.py --model eawm --preset full --data ENC --strategy fsdp --grad-checkpoint
    python train.py --model eawm --preset full --dry-run --strategy fsdp --gpus 32 --batch-size 1   # memory plan

Order of things (nanoGPT): settings -> device / distributed -> data -> model (fresh or resumed)
-> optimizer with per-module LR groups -> schedule -> loop -> checkpoint.

A checkpoint folder holds `model.safetensors` (weights; config, normalization stats and step in
its metadata) and `train_state.pt` (optimizer, step, RNG states; loaded with weights_only=True),
each written atomically; `metrics.jsonl` gets one line per step.
"""
from __future__ import annotations

import argparse
import copy
import importlib
import json
import os
import sys
import time
from contextlib import nullcontext

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (atomic_write, config_from_dict, config_to_dict, dist_info, fsdp_units, load_state_dict_strict,  # noqa: E402
                    load_weights, lr_schedule, parse_override, pick_device, pick_dtype, save_weights, set_grad_checkpointing)

MODELS = {"agra": "agra", "mvwam": "mvwam", "eawm": "eawm"}        # --model -> module file
DEFAULT_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "cache", "default")


def toy_episodes(args, cfg) -> int:
    """Expert demos of the generated default dataset: --episodes, else the config's toy_episodes (AGRA's
    frozen_wide and long_wide, MV-WAM's frozen_wide presets: 1,000), else 400."""
    return args.episodes or getattr(cfg, "toy_episodes", 400)


def default_data_folder(cfg, episodes: int = 400) -> tuple[str, dict]:
    """-> (folder, world options) of the toy-world dataset train.py generates and caches when no --data is
    given: the config's toy_view / toy_distractor_band (AGRA's tiny preset: close, near), else the wide view;
    the config's toy_shape_texture adds shape textures (folder name + _tex, world["shape_texture"]); another
    --episodes than the default 400 is cached apart (folder name + _<episodes>)."""
    world = {"view": getattr(cfg, "toy_view", "wide"), "distractor_band": getattr(cfg, "toy_distractor_band", "any")}
    texture = getattr(cfg, "toy_shape_texture", False)
    folder = DEFAULT_DATA if world == {"view": "wide", "distractor_band": "any"} and not texture else \
        os.path.join(os.path.dirname(DEFAULT_DATA), f"{world['view']}_{world['distractor_band']}" + ("_tex" if texture else ""))
    if texture:                                          # only when set: the other presets' worlds read as before
        world["shape_texture"] = True
    return (folder if episodes == 400 else f"{folder}_{episodes}"), world


def model_module(name: str):
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(MODELS)}")
    try:
        return importlib.import_module(MODELS[name])
    except ModuleNotFoundError as e:
        if e.name == MODELS[name]:
            raise SystemExit(f"{name}.py is not implemented yet in this repository (see README, status)") from None
        raise


def make_config(name: str, preset: str, overrides=(), **flags):
    """CONFIGS[preset] of the model, with `--set key=value` overrides and the named flags applied."""
    mod = model_module(name)
    if preset not in mod.CONFIGS:
        raise ValueError(f"unknown preset {preset!r} for {name}; expected one of {sorted(mod.CONFIGS)}")
    cfg = copy.deepcopy(mod.CONFIGS[preset])
    for a in overrides:
        parse_override(cfg, a)
    for k, v in flags.items():
        if v is not None:
            parse_override(cfg, f"{k}={v}")
    if hasattr(cfg, "vocab") and not cfg.vocab:
        from data.toyworld import VOCAB
        cfg.vocab = tuple(VOCAB)
    return cfg


def dataset_for(cfg, arrays, meta):
    """The toy-world clip reader with the clip layout this model's config asks for."""
    from data.toyworld import ClipDataset
    if meta["res"] != cfg.height or meta["res"] != cfg.width:
        raise ValueError(f"dataset frames are {meta['res']}x{meta['res']}, the model expects {cfg.height}x{cfg.width}")
    clips = ClipDataset(arrays, meta, cfg.frames, cfg.horizon, cfg.latent_q,
                        getattr(cfg, "teacher_patch", 0) if getattr(cfg, "teacher", "") == "toy" else 0,
                        getattr(cfg, "teacher_dim", 16), getattr(cfg, "frame_stride", 1))
    if getattr(cfg, "kvaf", False) is True:                   # EA-WM: every frame's KVAF rendered once, not per step
        import eawm
        chain = eawm.load_chain(cfg)
        clips.cache_kvaf(lambda joints, gripper, K, T_wc, rng: eawm.render_kvaf(
            chain, joints, gripper, K, T_wc, cfg.height, cfg.width, cfg.ee_link, rng))
    return clips


def demo_counts(data_meta: dict) -> dict:
    """A toy-world dataset's composition, stored with the checkpoint (so --compare tells runs on different
    data apart): its episodes, and the failing / recovering demos when it has any."""
    if not str(data_meta.get("format", "")).startswith("toyworld"):
        return {}
    eps = data_meta["episodes"]
    out = {"episodes": len(eps)}
    for flag, key in (("wrong_object", "failing_demos"), ("recovering", "recovering_demos")):
        n = sum(bool(e.get(flag)) for e in eps)
        if n:
            out[key] = n
    return out


def save_checkpoint(out, name, model, cfg, stats, step, optimizer=None, gen=None, data_meta=None, fsdp_root=None, write=True,
                    run=None):
    """model.safetensors (+ train_state.pt when an optimizer is given), each atomic. Under FSDP2
    (`fsdp_root` = the sharded root) every rank calls this: the full state is gathered to rank 0
    (`write`), the optimizer state keyed by parameter name. `run`: how the run was started ({"seed",
    "init", "pretrained"}), kept in the metadata so that `sample.py --compare` can pair runs by seed."""
    meta = {"model": name, "config": config_to_dict(cfg), "stats": stats, "step": step, "format": "wam-v1"}
    if run is not None:
        meta["run"] = run
    if data_meta is not None:
        keys = ("res", "fps", "camera", "task", "gamma", "source", "encoded", "view", "distractor_band", "shape_texture")
        meta["data"] = {k: data_meta[k] for k in keys if k in data_meta}
        meta["data"].update(demo_counts(data_meta))
    weights, optim = model.state_dict(), optimizer.state_dict() if optimizer is not None else None
    if fsdp_root is not None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = get_model_state_dict(model, options=opts)
        optim = get_optimizer_state_dict(fsdp_root, optimizer, options=opts) if optimizer is not None else None
    if not write:
        return
    save_weights(os.path.join(out, "model.safetensors"), weights, meta)
    if optimizer is not None:
        state = {"step": step, "optimizer": optim, "torch_rng": torch.get_rng_state(),
                 "data_rng": gen.get_state() if gen is not None else None, "strategy": "fsdp" if fsdp_root is not None else "ddp"}
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        atomic_write(os.path.join(out, "train_state.pt"), lambda tmp: torch.save(state, tmp))


def read_checkpoint(path: str, expect: str | None = None):
    """-> (name, cfg, state_dict, metadata) of a checkpoint folder or model.safetensors file, checking
    that it was written by train.py for the expected model."""
    f = os.path.join(path, "model.safetensors") if os.path.isdir(path) else path
    sd, meta = load_weights(f)
    if "model" not in meta or "config" not in meta:
        raise ValueError(f"{f} has no model/config metadata: not a checkpoint written by train.py")
    name = meta["model"]
    if expect is not None and name != expect:
        raise ValueError(f"{f} is a checkpoint of model '{name}', but --model {expect} was asked for")
    return name, config_from_dict(model_module(name).Config, meta["config"]), sd, meta


def config_changes(old, new, staged=("stage", "steps", "finetune_steps")) -> list[tuple[str, object, object]]:
    """(field, old value, new value) for every Config field that differs between two configs, but those that
    a run's stages change by design (`staged`): what `--init` does not carry over from its checkpoint."""
    a, b = config_to_dict(old), config_to_dict(new)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if k not in staged and a.get(k) != b.get(k)]


def load_model(path: str, expect: str | None = None, device="cpu"):
    """-> (name, model, cfg, metadata) from a checkpoint folder or model.safetensors file (strict)."""
    name, cfg, sd, meta = read_checkpoint(path, expect)
    model = model_module(name).Model(cfg)
    load_state_dict_strict(model, sd, what=path)
    return name, model.to(device), cfg, meta


class LossModule(nn.Module):
    """DDP reduces gradients of what runs inside forward(); the models keep forward pure and expose
    loss(), so this wrapper's forward calls it."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch):
        return self.model.loss(batch)


def to_device(batch, device):
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def open_data(args, cfg, master, ddp, feature_dtype=torch.float32):
    """-> (clips, meta) with .sample(batch_size, generator): an encoded folder of data/encode.py (what
    the full presets train on), a LeRobot dataset (folder or Hub id, decoded to the model's frame size;
    for the pixel-codec presets), or the toy world (default: generated and cached once)."""
    from data.encode import EncodedClips, is_encoded
    if args.data and os.path.isdir(args.data) and is_encoded(args.data):
        clips = EncodedClips(args.data, feature_dtype)
        clips.check(args.model, cfg)
        return clips, clips.meta
    if args.data and (os.path.isfile(os.path.join(args.data, "meta", "info.json")) or (args.camera and not os.path.exists(args.data))):
        from data.lerobot import LeRobotClips, LeRobotReader
        if not args.camera:
            raise ValueError(f"{args.data} is a LeRobot dataset: name the camera to train on with --camera")
        if args.model == "eawm":
            raise ValueError("EA-WM renders KVAFs from a URDF and camera calibration that LeRobot datasets lack: encode the "
                             "dataset with data/encode.py --model eawm --urdf ... --camera-json ... and train on that folder")
        if args.model == "agra" and cfg.teacher == "toy" and cfg.agra_weight > 0:
            raise ValueError("AGRA's toy teacher reads the toy world's segmentation, which a LeRobot dataset lacks: use "
                             "--set agra_weight=0 (the WAM baseline), or encode the dataset with DINOv2 features (data/encode.py)")
        clips = LeRobotClips(LeRobotReader(args.data), args.camera, cfg.frames, cfg.horizon, cfg.height, cfg.width,
                             getattr(cfg, "frame_stride", 1), state_dim=cfg.state_dim, action_dim=cfg.action_dim)
        return clips, clips.meta
    from data.toyworld import default_dataset, load_dataset
    if args.data:
        arrays, dmeta = load_dataset(args.data)
    else:
        episodes = toy_episodes(args, cfg)
        folder, world = default_data_folder(cfg, episodes)
        if master:
            default_dataset(folder, episodes=episodes, res=cfg.height, **world)
        if ddp:
            import torch.distributed as dist
            dist.barrier()
        arrays, dmeta = load_dataset(folder)
    return dataset_for(cfg, arrays, dmeta), dmeta


def shard(model, root, device, dtype, world):
    """FSDP2: each transformer block (common.fsdp_units) its own unit, then the root; bf16 parameters
    for compute and fp32 gradient reduction on GPU (inputs are not cast: RoPE angles stay float64)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    import warnings
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")   # no block output is modified in place
    mesh = init_device_mesh(device.type, (world,))
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32, cast_forward_inputs=False) \
        if dtype != torch.float32 else MixedPrecisionPolicy()
    for unit in fsdp_units(model):
        fully_shard(unit if len(unit) > 1 else unit[0], mesh=mesh, mp_policy=mp)
        for m in unit:
            for method in ("mot", "video_rows", "action_rows"):      # MV-WAM: the MoT layer runs as ExpertBlock.mot
                if hasattr(m, method):                               #   (or its video rows, then its action rows)
                    register_fsdp_forward_method(m, method)
    fully_shard(root, mesh=mesh, mp_policy=mp)
    return root


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Train a world action model (AGRA / MV-WAM / EA-WM) on the toy world.")
    p.add_argument("--model", required=True, choices=sorted(MODELS), help="which model file to train")
    p.add_argument("--tiny", action="store_true", help="use the tiny preset (same as --preset tiny)")
    p.add_argument("--preset", default=None, help="config preset (a key of the model file's CONFIGS): tiny "
                   "(default), full; AGRA also frozen, frozen_wide, long, long_wide, long_wide_tex, scratch; MV-WAM also frozen_wide, joint, scratch, full_video")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the preset's)")
    p.add_argument("--batch-size", type=int, default=None, help="per-process batch size (default: the preset's)")
    p.add_argument("--lr", type=float, default=None, help="learning rate of the main/head group; other groups keep "
                   "their ratio to it from the config")
    p.add_argument("--stage", default=None, help="training stage (AGRA: video | joint | finetune | ground; MV-WAM: video | joint | ground)")
    p.add_argument("--data", default=None, help="toy-world dataset folder (default: generate and cache one in data/cache/, in the "
                   "world of the config's toy_view / toy_distractor_band)")
    p.add_argument("--episodes", type=int, default=None, help="episodes of the generated default dataset (default: the "
                   "config's toy_episodes, 400 but for the frozen_wide and long_wide presets)")
    p.add_argument("--out", default=None, help="output folder (default runs/<model>)")
    p.add_argument("--resume", default=None, help="checkpoint folder to continue from (optimizer, step, RNG restored)")
    p.add_argument("--init", default=None, help="checkpoint folder to initialize weights from (new optimizer), e.g. "
                   "the video stage before the joint stage")
    p.add_argument("--pretrained", action="store_true", help="build a new model with Model.from_pretrained: the "
                   "pretrained parts from the config's *_weights sources (Hub ids or local paths; change them with "
                   "--set video_weights=... etc., '' keeps a part fresh), the rest fresh; not with --resume / --init")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu) or a torch device")
    p.add_argument("--dtype", default="auto", help="auto (bf16 autocast on GPU, fp32 on CPU), float32, bfloat16")
    p.add_argument("--compile", action="store_true", help="torch.compile the loss")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any Config field")
    p.add_argument("--log-every", type=int, default=25, help="print one line of named losses every N steps")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    p.add_argument("--stop-after", type=int, default=None, help="stop (with a checkpoint) after N steps of this "
                   "invocation, keeping the schedule of --steps; resume later")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--camera", default=None, help="LeRobot --data: the camera (video feature) to train on")
    p.add_argument("--strategy", default="ddp", choices=("ddp", "fsdp"), help="under torchrun: DDP (full replicas) or "
                   "FSDP2 (fully_shard per block + root; bf16 parameters, fp32 reduction on GPU)")
    p.add_argument("--grad-checkpoint", action="store_true", help="activation checkpointing per transformer block")
    p.add_argument("--dry-run", action="store_true", help="build the preset on the meta device and print the memory "
                   "plan per GPU (weights, gradients, optimizer, activation estimate), then exit")
    p.add_argument("--gpus", type=int, default=None, help="--dry-run: GPUs of the plan (default: WORLD_SIZE or 1)")
    p.add_argument("--gpu-gb", type=float, default=80.0, help="--dry-run: GPU memory (GiB) the plan must fit")
    p.add_argument("--eval-every", type=int, default=0, help="every N steps, evaluate on held-out toy-world episodes "
                   "of every split (AGRA / MV-WAM: closed-loop success; EA-WM: generation PSNR) and append the result "
                   "to metrics.jsonl as {\"step\", \"time\", \"eval\": {split: ...}} (0: off)")
    p.add_argument("--eval-episodes", type=int, default=10, help="episodes (EA-WM: clips) per split of --eval-every")
    return p.parse_args(argv)


def ground_first(args, cfg, data) -> bool:
    """A config with ground_steps > 0 (AGRA's tiny preset): a fresh joint run on toy-world data first trains stage ground
    (the toy's stand-in for a language-grounded pretrained backbone, HISTORY.md "A grounded start") for
    ground_steps steps into <out>/ground, then starts from it as `--init <out>/ground` would."""
    from data.toyworld import ClipDataset
    return (getattr(cfg, "ground_steps", 0) > 0 and cfg.stage == "joint" and isinstance(data, ClipDataset)
            and not (args.resume or args.init or args.pretrained))


def finetune_after(args, cfg) -> bool:
    """A config with finetune_steps > 0 (AGRA's tiny and long presets): a fresh joint run (not --resume) trains into
    <out>/joint, then stage finetune (App. C.3: the video model frozen, the head alone) continues from it into <out>, as
    `--stage finetune --init <out>/joint --steps finetune_steps` would. With steps = 0 there is no joint stage: the
    head is fine-tuned on the model it starts from (the tiny preset: the ground stage's; the "Freeze backbone" variant)."""
    return getattr(cfg, "finetune_steps", 0) > 0 and cfg.stage == "joint" and not args.resume


def main(argv=None):
    # ------------------------------------------------------------------ settings
    args = argv if isinstance(argv, argparse.Namespace) else get_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = "tiny" if args.tiny else (args.preset or "tiny")
    out = args.out or os.path.join("runs", args.model)
    resumed = None
    if args.pretrained and (args.resume or args.init):
        raise SystemExit("--pretrained builds a new model from pretrained parts; --resume / --init load a whole "
                         "checkpoint of this repository instead: use one or the other")
    if args.resume:
        _, cfg, resume_sd, meta = read_checkpoint(args.resume, expect=args.model)
        for a in args.set:
            parse_override(cfg, a)
        if args.steps is not None:
            cfg.steps = args.steps
        resumed = args.resume
    else:
        cfg = make_config(args.model, preset, args.set, stage=args.stage, batch_size=args.batch_size, steps=args.steps)
        if args.lr is not None:
            ratio = {k: getattr(cfg, k) / cfg.lr_head for k in vars(cfg) if k.startswith("lr_") and k != "lr_head"
                     and isinstance(getattr(cfg, k), float)}
            cfg.lr_head = args.lr
            for k, r in ratio.items():
                setattr(cfg, k, r * args.lr)
    if args.dry_run:                                                    # memory plan on the meta device, no data
        import memplan
        with torch.device("meta"):
            model = model_module(args.model).Model(cfg)
        model.param_groups()
        gpus = args.gpus or dist_info()[3]
        dtype = pick_dtype(args.dtype, torch.device("cuda"))
        plan = memplan.plan(args.model, cfg, model, cfg.batch_size, gpus, args.strategy, dtype, args.grad_checkpoint, args.gpu_gb)
        print(memplan.format_plan(plan))
        return plan

    # ------------------------------------------------------------------ device, distributed
    ddp, rank, local_rank, world = dist_info()
    device = pick_device(args.device)
    own_group = False                                                   # this call started the process group
    if ddp:
        import torch.distributed as dist
        if not dist.is_initialized():                                   # (a ground_first call runs inside an open one)
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
            own_group = True
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
    master = rank == 0
    dtype = pick_dtype(args.dtype, device)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    torch.manual_seed(args.seed + rank)

    # ------------------------------------------------------------------ data
    data, dmeta = open_data(args, cfg, master, ddp, dtype)
    if ground_first(args, cfg, data):                                   # stage ground, then this run from it
        sub = argparse.Namespace(**{**vars(args), "stage": "ground", "steps": cfg.ground_steps, "eval_every": 0,
                                    "out": os.path.join(out, "ground"), "stop_after": None, "save_every": 0})
        if master:
            print(f"stage ground first ({cfg.ground_steps} steps into {sub.out}; --set ground_steps=0 skips it"
                  + (", --preset scratch is the earlier from-scratch run)" if "scratch" in model_module(args.model).CONFIGS else ")"))
        main(sub)
        if ddp:
            dist.barrier()                                              # its checkpoint is on disk for every rank
        args.init = sub.out
        torch.manual_seed(args.seed + rank)                             # as if this run had started now
    elif getattr(cfg, "ground_steps", 0) > 0 and cfg.stage == "joint" and not (args.resume or args.init or args.pretrained) and master:
        print(f"ground_steps={cfg.ground_steps} ignored: stage ground reads the toy world's object masks, which this "
              f"data lacks (the run starts from scratch)")
    if finetune_after(args, cfg):                                       # stage joint, then stage finetune from it
        if cfg.steps > 0:
            sub = argparse.Namespace(**{**vars(args), "stage": "joint", "steps": cfg.steps, "out": os.path.join(out, "joint"),
                                        "stop_after": None, "save_every": 0, "set": args.set + ["finetune_steps=0"]})
            if master:
                print(f"stage joint ({cfg.steps} steps into {sub.out}), then stage finetune ({cfg.finetune_steps} steps, "
                      f"the video model frozen, into {out}; --set finetune_steps=0 skips it)")
            main(sub)
            if ddp:
                dist.barrier()
            args.init, args.pretrained = sub.out, False
        elif not (args.init or args.pretrained):
            raise SystemExit("--steps 0 with finetune_steps > 0 fine-tunes a head on a frozen video model: start it from "
                             "one (--init, --pretrained, or ground_steps > 0 on toy-world data)")
        elif master:
            print(f"no joint stage (steps 0: the joint losses and their settings, agra_* among them, do not train; "
                  f"--steps N or --preset long trains one): stage finetune ({cfg.finetune_steps} steps, the video model "
                  f"frozen, the head alone) into {out}")
        cfg.stage, cfg.steps = "finetune", cfg.finetune_steps
        torch.manual_seed(args.seed + rank)
    if getattr(cfg, "video_frozen", False) and not (args.init or args.pretrained or args.resume):
        raise SystemExit("freeze_video=true (MV-WAM's tiny preset) trains the action-value expert on a frozen Video Expert: "
                         "start from one (--init, --pretrained, or ground_steps > 0 on toy-world data), or pass "
                         "--set freeze_video=false to train both experts from scratch")
    gen = torch.Generator().manual_seed(1000 + args.seed + rank)

    # ------------------------------------------------------------------ model
    mod = model_module(args.model)
    model = mod.Model.from_pretrained(cfg, dtype=torch.float32) if args.pretrained else mod.Model(cfg)
    cfg = model.cfg                                                  # from_pretrained takes sizes from the checkpoints
    start = 0
    if resumed:
        load_state_dict_strict(model, resume_sd, what=resumed)
        state = torch.load(os.path.join(resumed, "train_state.pt"), weights_only=True)
        if state["step"] != meta["step"]:
            raise ValueError(f"{resumed}: model.safetensors is at step {meta['step']} but train_state.pt at "
                             f"{state['step']} (a write was interrupted); restore a consistent pair")
        start = state["step"]
    elif args.init:
        _, init_cfg, init_sd, _ = read_checkpoint(args.init, expect=args.model)
        load_state_dict_strict(model, init_sd, what=args.init, ignore=getattr(model, "init_ignore", ()))
        moved = config_changes(init_cfg, cfg)
        if moved and master:                                           # --init takes weights, not settings: say so
            print(f"--init {args.init}: this run's settings differ from those it was trained with: "
                  + ", ".join(f"{k} {a!r} -> {b!r}" for k, a, b in moved)
                  + " (from the preset and flags; --set key=value to keep the checkpoint's)")
    # how the run started, in every checkpoint's metadata (a resumed run keeps its first run's)
    run_meta = (meta.get("run") if resumed else None) or {"seed": args.seed, "init": args.init, "pretrained": bool(args.pretrained)}
    model.to(device)
    if args.grad_checkpoint and not set_grad_checkpointing(model):
        raise ValueError(f"--grad-checkpoint: {args.model} has no block loop to checkpoint")
    groups = model.param_groups()
    n_train = sum(p.numel() for g in groups for p in g["params"])
    n_all = sum(p.numel() for p in model.parameters())
    loss_module = LossModule(model)
    fsdp = ddp and args.strategy == "fsdp"
    if args.strategy == "fsdp" and not ddp:
        raise ValueError("--strategy fsdp shards over the processes of torchrun: run torchrun --nproc_per_node=N train.py ...")
    if fsdp:
        shard(model, loss_module, device, dtype, world)
        groups = model.param_groups()                                    # the sharded (DTensor) parameters
    elif ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        loss_module = DDP(loss_module, device_ids=[local_rank] if device.type == "cuda" else None,
                          find_unused_parameters=True, gradient_as_bucket_view=True)
    if args.compile:
        loss_module = torch.compile(loss_module)

    # ------------------------------------------------------------------ optimizer, schedule
    # fused: the whole update as one kernel (CPU and CUDA; bench.py's steps use it too): MV-WAM's default step on a
    # 2-core CPU spent 13.6 ms in the per-tensor update of its 1.8M trainable weights, 2.5 ms fused (README, Speed)
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999), weight_decay=cfg.weight_decay,
                                  fused=device.type in ("cpu", "cuda"))
    for g in optimizer.param_groups:
        g["base_lr"] = g["lr"]
    if resumed:
        by_name = state.get("strategy") == "fsdp"                        # FSDP2 saves the optimizer keyed by parameter name
        if fsdp and not by_name:
            raise ValueError(f"{resumed}: train_state.pt was written without FSDP (optimizer keyed by position); "
                             f"resume it with --strategy ddp or in one process")
        if by_name:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
            set_optimizer_state_dict(loss_module, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
        else:
            optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        if state.get("data_rng") is not None:
            gen.set_state(state["data_rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
    total = cfg.steps
    end = total if args.stop_after is None else min(total, start + args.stop_after)
    if master:
        os.makedirs(out, exist_ok=True)
        print(f"{args.model} ({preset}, stage {cfg.stage}): {n_all / 1e6:.2f}M "
              f"params, {n_train / 1e6:.2f}M trainable; {len(data)} clips; steps {start}->{end} of {total}; "
              f"batch {cfg.batch_size}x{args.grad_accum}x{world}; {device} {dtype}"
              + (f"; {args.strategy}" if ddp else "") + ("; activation checkpointing" if args.grad_checkpoint else ""))

    from data.toyworld import ClipDataset
    if args.eval_every and (fsdp or not isinstance(data, ClipDataset)):
        raise SystemExit("--eval-every runs closed-loop episodes in the toy world with the unsharded model: it needs "
                         "toy-world training data and no --strategy fsdp (evaluate a full-size run with sample.py --data)")

    # ------------------------------------------------------------------ loop
    from tqdm import tqdm
    if args.eval_every:
        from data.toyworld import world_options
        from sample import quick_eval
    log = open(os.path.join(out, "metrics.jsonl"), "a") if master else None
    bar = tqdm(range(start, end), disable=not master, dynamic_ncols=True, mininterval=1.0)
    t0 = time.time()                                       # "time" in metrics.jsonl: training seconds, evaluations excluded
    for step in bar:
        mult = lr_schedule(cfg.lr_schedule, step, total, cfg.warmup_frac, getattr(cfg, "const_frac", 0.0))
        for g in optimizer.param_groups:
            g["lr"] = g["base_lr"] * mult
        parts_sum, loss_sum = {}, 0.0
        for micro in range(args.grad_accum):
            batch = to_device(data.sample(cfg.batch_size, gen), device)
            last = micro == args.grad_accum - 1
            if fsdp:
                loss_module.set_requires_gradient_sync(last)                # FSDP2: reduce-scatter on the last micro-batch
            sync = nullcontext() if not ddp or fsdp or last else loss_module.no_sync()
            with sync, autocast:
                loss, parts = loss_module(batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"step {step}: loss is {loss.item()} (parts {({k: v.item() for k, v in parts.items()})})")
            (loss / args.grad_accum).backward()
            loss_sum += loss.item() / args.grad_accum
            for k, v in parts.items():
                parts_sum[k] = parts_sum.get(k, 0.0) + v.item() / args.grad_accum
        params = [p for g in optimizer.param_groups for p in g["params"]]
        gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        gnorm = (gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm).item()   # FSDP2: a DTensor
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if master:
            rec = {"step": step + 1, "loss": loss_sum, **parts_sum, "lr": optimizer.param_groups[0]["lr"],
                   "grad_norm": gnorm, "time": round(time.time() - t0, 3)}
            log.write(json.dumps(rec) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{loss_sum:.4f}")
            if (step + 1) % args.log_every == 0 or step + 1 == end:
                named = " ".join(f"{k} {v:.4f}" for k, v in parts_sum.items())
                tqdm.write(f"step {step + 1:5d} | loss {loss_sum:.4f} | {named} | lr {rec['lr']:.2e} | "
                           f"grad {gnorm:.2f} | {time.time() - t0:.0f}s")
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 != end and (master or fsdp):
            save_checkpoint(out, args.model, model, cfg, dmeta["stats"], step + 1, optimizer, gen, dmeta,
                            loss_module if fsdp else None, master, run_meta)
        if args.eval_every and master and ((step + 1) % args.eval_every == 0 or step + 1 == end):
            t_eval = time.time()
            rng = torch.get_rng_state(), (torch.cuda.get_rng_state_all() if device.type == "cuda" else None)
            ev = quick_eval(args.model, model, cfg, dmeta["stats"], args.eval_episodes, world=world_options(dmeta))
            torch.set_rng_state(rng[0])                                      # evaluating does not change the run
            if rng[1] is not None:
                torch.cuda.set_rng_state_all(rng[1])
            model.train()
            log.write(json.dumps({"step": step + 1, "time": rec["time"], "eval": ev}) + "\n")
            log.flush()
            key = "psnr" if args.model == "eawm" else "success"
            tqdm.write(f"eval  {step + 1:5d} | {key} " + " ".join(f"{k} {v[key]:.2f}" for k, v in ev.items())
                       + f" | {time.time() - t_eval:.0f}s")
            t0 += time.time() - t_eval                                       # "time" counts training only

    # ------------------------------------------------------------------ checkpoint
    if master or fsdp:
        save_checkpoint(out, args.model, model, cfg, dmeta["stats"], end, optimizer, gen, dmeta, loss_module if fsdp else None,
                        master, run_meta)
    if master:
        log.close()
        print(f"saved {out}/model.safetensors at step {end} ({time.time() - t0:.0f}s)")
    if own_group:
        dist.destroy_process_group()
    return out


if __name__ == "__main__":
    main()
