"""Speed measurements, reported as ratios measured in one run (machines are shared and noisy).

    python bench.py                  # toy world + tiny AGRA / MV-WAM on this machine, a table
    python bench.py --json           # the same as JSON
    python bench.py --device cuda --preset full --models eawm --batch-size 1 --grad-checkpoint   # full size, one GPU
    python bench.py --skip-toyworld --models --load                # only the pretrained-weights load row
    python bench.py --skip-toyworld --models agra --compile --threads-sweep   # torch.compile and thread counts

Rows: the machine's measured matmul peak; toy-world rendering frames/s on one core and default
dataset generation time; per model: training step time, samples/s, achieved FLOP/s as a fraction
of the measured peak, inference latency (AGRA: one t = 1 video pass + 4 action Euler steps; MV-WAM:
5 joint Euler steps, as actions/s like the paper's 17.9 actions/s headline; EA-WM: time per
generated frame and per Euler step), and peak memory; on a GPU also a train step's peak memory and the
memory its forward keeps for backward, each against memplan's plan of the same run. A full preset runs on
a synthetic batch of cached features (the shapes data/encode.py stores) with random weights, initialized
on the device; `--set` overrides Config fields (e.g. a full preset's data layout at tiny sizes on a CPU),
`--grad-checkpoint` checkpoints every block as train.py does. With --load: the peak RSS of loading a full-size
Wan2.1-T2V-1.3B-shaped bf16 checkpoint through WanDiT.from_pretrained, as a ratio to the file size,
and the load time. With --compile: the first step under torch.compile (compilation included), the
compiled step as a ratio to the eager one and the steps a run needs to earn the compilation back;
with --threads-sweep: the step with fewer CPU threads as a ratio to the default. No number here is
asserted by a test: machines are shared and noisy.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import pick_device, pick_dtype  # noqa: E402


def timeit(fn, repeat=5, warmup=2, sync=None):
    """Median wall time of fn() over `repeat` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if sync:
            sync()
        t = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def matmul_peak(device, dtype) -> float:
    """Best measured FLOP/s of a square matmul (the denominator of every utilization figure)."""
    n = 2048 if device.type == "cpu" else 8192
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    return 2 * n ** 3 / timeit(lambda: a @ b, repeat=5, sync=sync)


def bench_toyworld(rows):
    from data.toyworld import ToyWorld, generate
    torch_threads = torch.get_num_threads()
    env = ToyWorld(res=32)
    env.reset(seed=0)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 2.0:                   # numpy rendering is single-threaded
        env.render()
        n += 1
    rows.append(("toyworld", "render 32x32 frames/s (1 core)", n / (time.perf_counter() - t0), "frames/s"))
    env.reset(seed=1)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 2.0:
        _, _, term, trunc, _ = env.step(np.array([0.05, 0.02, -0.02, -1.0]))
        n += 1
        if term or trunc:
            env.reset(seed=n)
    rows.append(("toyworld", "env.step (+render) steps/s", n / (time.perf_counter() - t0), "steps/s"))
    t0 = time.perf_counter()
    arrays, _ = generate(400, "train", seed0=0)
    dt = time.perf_counter() - t0
    rows.append(("toyworld", "default dataset (400 expert episodes) s", dt, "s"))
    rows.append(("toyworld", "expert frames generated /s", len(arrays["frames"]) / dt, "frames/s"))
    from common import save_gif
    frames = np.concatenate([arrays["frames"][:60], arrays["frames"][60:120]], 2)     # sample.py's rollout GIF: obs | prediction
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        save_gif(os.path.join(d, "a.gif"), frames, fps=6, scale=4)
        rows.append(("toyworld", "rollout GIF, 60 frames of 128x256 (s)", time.perf_counter() - t0, "s"))
    torch.set_num_threads(torch_threads)


def encoded_layout(name, cfg) -> bool:
    """Whether the config trains on cached encoder outputs (VAE latents, text / teacher / image features:
    the full presets, data/encode.py) rather than on toy-world pixels through the tiny codec."""
    from data.encode import needs
    need = needs(name, cfg)
    return cfg.codec_p >= 8 or bool(need["text"] or need["teacher"] or need["image"])


def full_batch(name, cfg, B, device):
    """A synthetic batch of cached features with the shapes data/encode.py stores for this config (VAE
    latents, text / teacher / image / KVAF features), as a full-size run reads them."""
    from data.encode import clip_shapes
    g = torch.Generator().manual_seed(0)
    batch = {k: torch.randn(B, *s, generator=g) for k, s in clip_shapes(name, cfg).items() if k not in ("task", "value")}
    batch["value"] = torch.rand(B, generator=g)
    batch["text"] = ["put the red cube in the bin"] * B
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


FROZEN = {      # the step of a run whose video model is frozen (the tiny default runs), against the joint step
    "agra": ("stage finetune", {"stage": "finetune"}),
    "mvwam": ("freeze_video", {"freeze_video": True}),
}

INFERENCE = {   # what one `sample` call is, per model
    "agra": lambda cfg: f"t=1 video pass + {cfg.action_steps} action steps",
    "mvwam": lambda cfg: f"{cfg.sample_steps} joint video+action Euler steps",
    "eawm": lambda cfg: f"{cfg.sample_steps} Euler steps, " + ("KVAF-conditioned" if cfg.kvaf_cond_prob > 0 else "joint video + KVAF"),
}


def train_step(model, batch, autocast):
    """One AdamW training step of `model` on `batch`, as a function to time (its trainable parameters only)."""
    device = next(model.parameters()).device
    opt = torch.optim.AdamW(model.param_groups(), lr=1e-5, fused=device.type in ("cpu", "cuda"))   # as train.py's

    def step(probe=None):                                   # probe: a dict for the GPU memory the forward keeps
        with autocast:
            loss, _ = model.loss(batch)
        if probe is not None:
            probe["after_forward"] = torch.cuda.memory_allocated(device)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def count_flops(mod, model, cfg, batch, autocast, on_meta: bool) -> int:
    """FLOPs of one training step (loss forward + backward), without activation checkpointing's
    recomputation. on_meta: counted on a copy of the model on the `meta` device (no memory at any size;
    for batches of cached features, which need no data-dependent preprocessing); else on `model` itself.
    Under torch.utils.checkpoint, FlopCounterMode made the recomputation keep every block's activations
    (more memory than no checkpointing, measured on the CPU), so checkpointing is off while counting."""
    from torch.utils.flop_counter import FlopCounterMode

    from common import set_grad_checkpointing
    if on_meta:
        with torch.device("meta"):
            model = mod.Model(cfg)
        model.param_groups()
        batch = {k: (v.to("meta") if torch.is_tensor(v) else v) for k, v in batch.items()}
    ckpt = [m.grad_checkpoint for m in model.modules() if hasattr(m, "grad_checkpoint")]
    set_grad_checkpointing(model, False)
    with FlopCounterMode(display=False) as fc:
        with autocast:
            loss, _ = model.loss(batch)
        loss.backward()
    model.zero_grad(set_to_none=True)
    for m, on in zip([m for m in model.modules() if hasattr(m, "grad_checkpoint")], ckpt):
        m.grad_checkpoint = on
    return fc.get_total_flops()


def bench_model(name, rows, device, dtype, preset, peak, batch_size=None, compile_=False, threads_sweep=False,
                overrides=(), grad_checkpoint=False):
    """Training step time, samples/s, FLOP/s as a fraction of the matmul peak, inference latency and
    actions/s at batch 1, memory (on a GPU: the train step's peak and the memory the forward keeps for
    backward, each against memplan's plan of the same run); optionally the step with fewer CPU threads and
    under torch.compile."""
    import importlib

    import memplan
    from common import set_grad_checkpointing
    from data.toyworld import ClipDataset, generate
    from train import make_config
    mod = importlib.import_module(name)
    base = make_config(name, preset, overrides)
    cfg = copy.deepcopy(base)
    if getattr(cfg, "freeze_video", False):
        cfg.freeze_video = False                           # the joint step; FROZEN's row times the frozen one
        if getattr(cfg, "image_encoder", "") == "grounded":                 # MV-WAM: it reads the frozen Video Expert
            cfg.image_encoder, cfg.image_dim = type(cfg).image_encoder, type(cfg).image_dim
    small = not encoded_layout(name, cfg)                  # toy-world pixels (tiny presets) | cached features (full)
    B = batch_size or (cfg.batch_size if small else 2)
    torch.manual_seed(0)
    with torch.device(device):                             # initialized where it runs: a 10 B model in seconds on a GPU
        model = mod.Model(cfg)
    if grad_checkpoint and not set_grad_checkpointing(model):
        raise ValueError(f"--grad-checkpoint: {name} has no block loop to checkpoint")
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    if small:
        arrays, meta = generate(16, "train", seed0=0)
        ds = ClipDataset(arrays, meta, cfg.frames, cfg.horizon, cfg.latent_q, getattr(cfg, "teacher_patch", 0),
                         getattr(cfg, "teacher_dim", 16))
        batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in ds.sample(B, torch.Generator().manual_seed(0)).items()}
    else:
        batch = full_batch(name, cfg, B, device)
    step = train_step(model, batch, autocast)
    flops = count_flops(mod, model, cfg, batch, autocast, on_meta=not small)
    if device.type == "cuda":                              # a train step after the first (optimizer state allocated)
        plan = memplan.plan(name, cfg, model, B, 1, "ddp", dtype, grad_checkpoint,
                            torch.cuda.get_device_properties(device).total_memory / memplan.GiB)
        GiB = memplan.GiB
        rows.append((name, f"{preset} memory plan of this run (memplan, DDP on 1 GPU): total (GiB)", plan["total"] / GiB, "GiB"))
        step()
        sync()
        torch.cuda.reset_peak_memory_stats()
        probe = {"before": torch.cuda.memory_allocated(device)}
        step(probe)
        sync()
        kept, kept_plan = probe["after_forward"] - probe["before"], plan["activations"] + plan["fixed"]["autocast weight copies"]
        rows.append((name, f"{preset} kept by the forward for backward (GiB)", kept / GiB, "GiB"))
        rows.append((name, f"{preset} plan: activations + autocast weight copies (GiB)", kept_plan / GiB, "GiB"))
        rows.append((name, f"{preset} kept by the forward / plan's activations + copies", kept / kept_plan, "ratio"))
        rows.append((name, f"{preset} train step: peak GPU memory (GiB)", torch.cuda.max_memory_allocated() / GiB, "GiB"))
        rows.append((name, f"{preset} train step peak / plan total", torch.cuda.max_memory_allocated() / plan["total"], "ratio"))
        torch.cuda.reset_peak_memory_stats()
    t = timeit(step, repeat=5 if small else 3, warmup=2 if small else 1, sync=sync)
    rows.append((name, f"{preset} train step (batch {B}) s", t, "s"))
    rows.append((name, f"{preset} train samples/s", B / t, "samples/s"))
    rows.append((name, f"{preset} train FLOP per step (G)", flops / 1e9, "GFLOP"))
    rows.append((name, f"{preset} achieved FLOP/s / matmul peak", flops / t / peak, "ratio"))
    if name in FROZEN:                                     # the video model frozen: its forward only, no L_vid
        label, changes = FROZEN[name]
        frozen_cfg = base if getattr(base, "freeze_video", False) else dataclasses.replace(cfg, **changes)   # the preset's own
        with torch.device(device):
            frozen_model = mod.Model(frozen_cfg)
        if grad_checkpoint:
            set_grad_checkpointing(frozen_model)
        frozen_step = train_step(frozen_model, batch, autocast)
        tf = timeit(frozen_step, repeat=5 if small else 3, warmup=2 if small else 1, sync=sync)
        rows.append((name, f"{preset} train step, video model frozen ({label}) / joint step", tf / t, "ratio"))
        del frozen_step, frozen_model
    if threads_sweep and device.type == "cpu":                 # each thread count against the default (all cores)
        n = torch.get_num_threads()
        for k in range(1, n):
            torch.set_num_threads(k)
            rows.append((name, f"{preset} train step, {k} of {n} threads / {n} threads", timeit(step, repeat=3, warmup=1) / t, "ratio"))
        torch.set_num_threads(n)
    if compile_:                                           # torch.compile of the loss (inductor): compile cost, step time
        eager_loss = model.loss
        model.loss = torch.compile(eager_loss)
        t0 = time.perf_counter()
        step()
        if sync:
            sync()
        first = time.perf_counter() - t0
        tc = timeit(step, repeat=5 if small else 3, warmup=2 if small else 1, sync=sync)
        model.loss = eager_loss
        rows.append((name, f"{preset} torch.compile: first step incl. compilation (s)", first, "s"))
        rows.append((name, f"{preset} torch.compile: train step / eager train step", tc / t, "ratio"))
        rows.append((name, f"{preset} torch.compile: steps to earn back the compilation", first / max(t - tc, 1e-9)
                     if tc < t else float("inf"), "steps"))
    model.eval()
    one = {k: v[:1] for k, v in batch.items()}
    with autocast:
        if small:
            lat = timeit(lambda: model.sample(one), repeat=10, sync=sync)
        else:                                               # a full-size generation can take minutes: warm up on one step
            model.sample(one, steps=1)
            lat = timeit(lambda: model.sample(one), repeat=1 if name == "eawm" else 3, warmup=0, sync=sync)
    rows.append((name, f"{preset} inference: {INFERENCE[name](cfg)}, batch 1 (ms)", lat * 1e3, "ms"))
    if name == "eawm":                                      # a video generator: time per generated frame
        rows.append((name, f"{preset} generation time per generated frame (ms)", lat * 1e3 / (cfg.frames - 1), "ms"))
        rows.append((name, f"{preset} generation time per Euler step (ms)", lat * 1e3 / cfg.sample_steps, "ms"))
    else:
        rows.append((name, f"{preset} inference actions/s (K={cfg.horizon} per chunk)", cfg.horizon / lat, "actions/s"))
    if device.type == "cuda":
        rows.append((name, f"{preset} peak GPU memory (GiB)", torch.cuda.max_memory_allocated() / 2 ** 30, "GiB"))
    else:
        rows.append((name, f"{preset} process max RSS (GiB)", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, "GiB"))


LOAD_WRITER = """
import sys, torch
sys.path.insert(0, {root!r})
from safetensors.torch import save_file
from common import WanDiT
with torch.device("meta"):                               # Wan2.1-T2V-1.3B shapes, original names
    shapes = {{k: v.shape for k, v in WanDiT(16, 16, 1536, 8960, 12, 30, 4096).state_dict().items()}}
g = torch.Generator().manual_seed(0)
save_file({{k: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for k, s in shapes.items()}}, {path!r})
"""

LOAD_READER = """
import json, sys, time
t0 = time.perf_counter()
import torch
sys.path.insert(0, {root!r})
from common import WanDiT
def peak():                                              # the process's peak resident set (VmHWM), bytes
    return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
base = peak()
t1 = time.perf_counter()
model = WanDiT.from_pretrained({folder!r}, heads=12)
t2 = time.perf_counter()
loaded = peak()
total = sum(float(p.sum()) for p in model.parameters())  # read every weight once (pages the file in)
t3 = time.perf_counter()
print(json.dumps(dict(base=base, loaded=loaded, touched=peak(), load_s=t2 - t1, touch_s=t3 - t2,
                      dtype=str(next(model.parameters()).dtype), params=sum(p.numel() for p in model.parameters()))))
"""


def bench_load(rows):
    """Peak RSS of WanDiT.from_pretrained on a full-size Wan2.1-T2V-1.3B-shaped bf16 checkpoint with random
    weights (written once to a temp dir by a subprocess, deleted afterwards), measured in a fresh
    subprocess so the figure is the loader's own: after loading, and after reading every weight once."""
    root = os.path.dirname(os.path.abspath(__file__))
    folder = tempfile.mkdtemp(prefix="wan13b_bf16_")
    try:
        path = os.path.join(folder, "diffusion_pytorch_model.safetensors")
        subprocess.run([sys.executable, "-c", LOAD_WRITER.format(root=root, path=path)], check=True)
        size = os.path.getsize(path)
        out = subprocess.run([sys.executable, "-c", LOAD_READER.format(root=root, folder=folder)], check=True,
                             capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    rows.append(("load", f"Wan2.1-1.3B bf16 checkpoint file (GB; {r['params']:,} params, loaded as {r['dtype']})", size / 1e9, "GB"))
    rows.append(("load", "from_pretrained time (s, warm page cache)", r["load_s"], "s"))
    rows.append(("load", "peak RSS after from_pretrained / file size", r["loaded"] / size, "ratio"))
    rows.append(("load", "peak RSS after reading every weight once / file size (goal <= 1.3)", r["touched"] / size, "ratio"))
    rows.append(("load", "  of which python + torch before loading (GB)", r["base"] / 1e9, "GB"))
    rows.append(("load", "reading every weight once (s)", r["touch_s"], "s"))


class Rows(list):
    """The measured rows; with `echo`, each printed as it is measured (a long full-size run stopped midway
    keeps what it measured)."""

    def __init__(self, echo: bool):
        super().__init__()
        self.echo = echo

    def append(self, row):
        super().append(row)
        if self.echo:
            g, k, v, _ = row
            print(f"{g:9s} {k:66s} {v:12.4g}", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description="Measure toy-world and model speed as ratios measured in one run.")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu) or a torch device")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16")
    p.add_argument("--preset", default="tiny", help="model preset to time (full needs a large GPU)")
    p.add_argument("--batch-size", type=int, default=None, help="training batch size (default: the preset's)")
    p.add_argument("--models", nargs="*", default=["agra", "mvwam", "eawm"], choices=sorted(INFERENCE), help="models to time")
    p.add_argument("--skip-toyworld", action="store_true", help="do not time the toy world")
    p.add_argument("--load", action="store_true", help="also measure loading a full-size Wan2.1-1.3B-shaped bf16 "
                   "checkpoint (writes ~2.8 GB to a temp dir, deleted afterwards)")
    p.add_argument("--compile", action="store_true", help="also time the train step under torch.compile (minutes of "
                   "compilation per model on a CPU)")
    p.add_argument("--threads-sweep", action="store_true", help="CPU: also time the train step with 1 .. n-1 threads")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a Config field of every "
                   "timed model (e.g. a full preset at another batch layout or size)")
    p.add_argument("--grad-checkpoint", action="store_true", help="activation checkpointing per transformer block, "
                   "as train.py's (the full presets' plans need it)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    rows = Rows(echo=not args.json)
    if not args.json:
        print(f"{'group':9s} {'metric':66s} {'value':>12s}", flush=True)
    peak = matmul_peak(device, dtype)
    rows.append(("machine", f"matmul peak {dtype} on {device.type} ({torch.get_num_threads()} threads)", peak / 1e9, "GFLOP/s"))
    if not args.skip_toyworld:
        bench_toyworld(rows)
    for m in args.models:
        bench_model(m, rows, device, dtype, args.preset, peak, args.batch_size, args.compile, args.threads_sweep,
                    args.set, args.grad_checkpoint)
    if args.load:
        bench_load(rows)
    if args.json:
        print(json.dumps([{"group": g, "metric": k, "value": v, "unit": u} for g, k, v, u in rows], indent=1))
    return list(rows)


if __name__ == "__main__":
    main()
