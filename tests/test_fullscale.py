"""The real-data path at tiny size, on CPU, offline: toy-world episodes written as LeRobot datasets
(v2.1 and v3.0, parquet + MP4) -> data/encode.py with tiny random-weight Wan VAEs, umT5, Cosmos-Reason
(Qwen2.5-VL), DINOv2 and SigLIP encoders -> train.py -> resume -> sample.py writes a video; FSDP2 and
activation checkpointing against their plain counterparts; EA-WM's LoRA optimizer state; the memory
plan; bad input."""
import json
import os
import shutil
import subprocess
import sys
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import need  # noqa: E402

for _extra in ("pyarrow", "av", "diffusers", "transformers"):     # requirements-extra.txt; fails under CI=true
    need(_extra)

import memplan  # noqa: E402
import sample  # noqa: E402
import train  # noqa: E402
from data import encode, lerobot  # noqa: E402
from common import depth_range  # noqa: E402
from data.toyworld import VOCAB, ToyWorld, generate  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")                      # no network in tests
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAM = "observation.images.front"
FAST = ["--log-every", "100", "--threads", "2"]
# tiny configs with the full presets' data layout: VAE latents, cached text (and teacher / image) features
SETS = {"agra": ["latent_channels=16", "codec_p=8", "crossattn_proj_in=32", "teacher=dinov2", "teacher_dim=32", "teacher_res=28",
                 "teacher_patch=14", "teacher_layers=1", "teacher_heads=2", "horizon=4", "frames=5", "finetune_steps=0"],
        "mvwam": ["latent_channels=16", "codec_p=8", "text_encoder=precomputed", "text_dim=16", "image_encoder=precomputed",
                  "image_dim=32", "horizon=4", "frames=5", "freeze_video=false"],
        "eawm": ["latent_channels=8", "codec_p=16", "height=64", "width=64", "text_encoder=precomputed", "text_dim=16",
                 "horizon=4", "frames=5", "dim=64", "heads=2", "ffn_dim=128", "event_dim=32"]}


def sets(name):
    return [a for kv in SETS[name] for a in ("--set", kv)]


@pytest.fixture(scope="module")
def toy_lerobot(tmp_path_factory):
    """The same 3 toy-world episodes in both LeRobot layouts."""
    root = tmp_path_factory.mktemp("lerobot")
    return {lay: lerobot.write_toy_lerobot(str(root / lay), episodes=3, layout=lay, res=32) for lay in ("v2.1", "v3.0")}


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    """Tiny random-weight encoders saved the way the Hub repos are laid out (-Diffusers subfolders)."""
    from diffusers import AutoencoderKLWan
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (Dinov2Config, Dinov2Model, PreTrainedTokenizerFast, Qwen2_5_VLConfig,
                              Qwen2_5_VLForConditionalGeneration, SiglipVisionConfig, SiglipVisionModel, UMT5Config,
                              UMT5EncoderModel)
    out = tmp_path_factory.mktemp("encoders")
    torch.manual_seed(0)
    words = ["<pad>", "<unk>", "</s>"] + VOCAB
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", eos_token="</s>")
    tok.chat_template = "{% for m in messages %}{% for c in m['content'] %}{{ c['text'] }} {% endfor %}{% endfor %}"
    AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
                     latents_mean=list(np.linspace(-0.5, 0.5, 16)), latents_std=list(np.linspace(0.5, 2, 16))
                     ).save_pretrained(out / "wan21" / "vae")
    AutoencoderKLWan(base_dim=4, decoder_base_dim=4, z_dim=8, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                     temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12, patch_size=2,
                     scale_factor_spatial=16, scale_factor_temporal=4, latents_mean=[0.0] * 8, latents_std=[1.0] * 8
                     ).save_pretrained(out / "wan22" / "vae")
    UMT5EncoderModel(UMT5Config(vocab_size=len(words), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
                     ).save_pretrained(out / "wan21" / "text_encoder")
    tok.save_pretrained(out / "wan21" / "tokenizer")
    Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(words), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]}, bos_token_id=0,
                         eos_token_id=2),
        vision_config=dict(depth=1, hidden_size=16, num_heads=2, intermediate_size=32, out_hidden_size=16))).save_pretrained(out / "reason")
    tok.save_pretrained(out / "reason")
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2, image_size=28,
                             patch_size=14)).save_pretrained(out / "dinov2")
    SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                         image_size=32, patch_size=16)).save_pretrained(out / "siglip")
    return {k: str(out / k) for k in ("wan21", "wan22", "reason", "dinov2", "siglip")}


def encoder_flags(name, enc, data):
    flags = {"agra": ["--vae", enc["wan21"], "--text-encoder", enc["reason"], "--teacher-encoder", enc["dinov2"]],
             "mvwam": ["--vae", enc["wan21"], "--text-encoder", enc["wan21"], "--image-encoder", enc["siglip"]],
             "eawm": ["--vae", enc["wan22"], "--text-encoder", enc["wan21"], "--urdf", os.path.join(data, "toyarm.urdf"),
                      "--camera-json", os.path.join(data, "camera.json")]}[name]
    return flags + sets(name) + ["--every", "12", "--save-dtype", "float32"]


def run_encode(name, data, out, enc, extra=()):
    return encode.main(["--dataset", data, "--camera", CAM, "--model", name, "--preset", "tiny", "--out", out]
                       + encoder_flags(name, enc, data) + list(extra))


# -------------------------------------------------------------------------------------------------
# LeRobot reader
# -------------------------------------------------------------------------------------------------


def test_reader_both_layouts_give_the_recorded_episodes(toy_lerobot):
    arrays, meta = generate(3, "train", seed0=0, res=32)
    for layout, folder in toy_lerobot.items():
        r = lerobot.LeRobotReader(folder)
        assert r.version == layout and [e["length"] for e in r.episodes] == [e["length"] for e in meta["episodes"]]
        assert sorted(r.tasks.values()) == sorted({e["instruction"] for e in meta["episodes"]})
        for i, ep in enumerate(meta["episodes"]):
            sl = slice(ep["start"], ep["start"] + ep["length"])
            c = r.columns(r.episodes[i], ["observation.state", "action", "next.reward", "task_index"])
            assert np.array_equal(c["observation.state"], arrays["state"][sl]) and np.array_equal(c["action"], arrays["actions"][sl])
            assert r.tasks[int(c["task_index"][0])] == ep["instruction"]
            frames = r.frames(r.episodes[i], CAM)                  # v3.0: decoded from the shared MP4 at from_timestamp
            assert frames.shape == arrays["frames"][sl].shape
            assert np.abs(frames.astype(int) - arrays["frames"][sl]).max() <= 2   # near-lossless x264 (crf 0, 4:4:4)
        clips = lerobot.LeRobotClips(r, CAM, frames=5, horizon=4, height=32, width=32, gamma=meta["gamma"])
        assert np.allclose(clips.a["value"], arrays["value"])       # MC return of next.reward (MV-WAM Eq. 4)


def test_clips_stride_normalization_padding_and_sparse_value(tmp_path):
    folder = lerobot.write_toy_lerobot(str(tmp_path / "noreward"), episodes=2, layout="v3.0", res=32, reward=False)
    r = lerobot.LeRobotReader(folder)
    clips = lerobot.LeRobotClips(r, CAM, frames=5, horizon=6, height=16, width=16, frame_stride=3, gamma=0.9,
                                 state_dim=6, action_dim=5)
    L = r.episodes[0]["length"]
    assert np.allclose(clips.a["value"][:L], 0.9 ** np.arange(L - 1, -1, -1))    # sparse reward 1 at the last frame
    assert "sparse" in clips.meta["value_source"]
    b = clips.get([2])                                              # episode 0, start 2
    frames = lerobot.fit_frames(r.frames(r.episodes[0], CAM), 16, 16)
    assert torch.allclose(b["video"][0], torch.from_numpy(frames[[2, 5, 8, 11, 14]]).permute(3, 0, 1, 2).float() / 127.5 - 1)
    st = clips.stats
    raw = clips.a["actions"][2:8]
    want = (raw - np.array(st["actions"]["mean"])) / np.array(st["actions"]["std"])
    assert b["actions"].shape == (1, 6, 5) and np.allclose(b["actions"][0, :, :4].numpy(), want, atol=1e-6)
    assert (b["actions"][..., 4:] == 0).all() and b["state"].shape == (1, 6) and (b["state"][:, 4:] == 0).all()
    with pytest.raises(ValueError, match="action_dim is 3: use --set action_dim=4"):
        lerobot.LeRobotClips(r, CAM, frames=5, horizon=4, height=16, width=16, action_dim=3)


def test_train_on_a_lerobot_folder_directly(toy_lerobot, tmp_path):
    """The pixel-codec tiny preset decodes a LeRobot dataset itself (no encoder)."""
    out = str(tmp_path / "raw")
    train.main(["--model", "mvwam", "--tiny", "--steps", "2", "--batch-size", "2", "--data", toy_lerobot["v2.1"],
                "--camera", CAM, "--out", out, "--set", "image_encoder=tiny", "--set", "image_dim=64",
                "--set", "freeze_video=false"] + FAST)
    _, _, _, meta = train.load_model(out)
    assert meta["data"]["camera"] == CAM and meta["data"]["source"] == toy_lerobot["v2.1"]


# -------------------------------------------------------------------------------------------------
# LeRobot -> encoder -> train -> resume -> sample
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,layout", [("agra", "v2.1"), ("agra", "v3.0"), ("mvwam", "v2.1"), ("eawm", "v3.0")])
def test_encode_train_resume_sample(name, layout, toy_lerobot, encoders, tmp_path):
    enc = run_encode(name, toy_lerobot[layout], str(tmp_path / "enc"), encoders)
    index = json.load(open(os.path.join(enc, "index.json")))
    cfg = train.make_config(name, "tiny", SETS[name])
    shapes = encode.clip_shapes(name, cfg, image_tokens=4)
    data = encode.EncodedClips(enc)
    b = data.get([0, len(data) - 1])
    for k, s in shapes.items():
        assert tuple(b[k].shape) == (2,) + tuple(s), k
    assert index["encoders"]["vae"]["channels"] == cfg.latent_channels and len(data) == index["clips"]
    run = str(tmp_path / "run")
    common = ["--model", name, "--tiny", "--data", enc, "--batch-size", "2", "--out", run] + sets(name) + FAST
    train.main(common + ["--steps", "2", "--stop-after", "1", "--grad-checkpoint"])
    train.main(["--model", name, "--resume", run, "--data", enc, "--out", run] + FAST)
    steps = [json.loads(x)["step"] for x in open(os.path.join(run, "metrics.jsonl"))]
    assert steps == [1, 2]
    if name == "agra" and layout == "v3.0":                        # resumed == uninterrupted, on encoded data too
        ref = str(tmp_path / "ref")
        train.main(common + ["--steps", "2", "--grad-checkpoint", "--out", ref])
        a = [json.loads(x)["loss"] for x in open(os.path.join(ref, "metrics.jsonl"))]
        assert a == [json.loads(x)["loss"] for x in open(os.path.join(run, "metrics.jsonl"))]
    res = sample.main(["--ckpt", run, "--data", enc, "--clips", "2", "--steps", "2", "--video-steps", "2", "--threads", "2"])
    assert os.path.getsize(res["video"]) > 1000 and np.isfinite(res["psnr_future"])
    import av
    with av.open(res["video"]) as c:
        st = c.streams.video[0]
        assert (st.height, st.width) == (2 * 2 * cfg.height, 2 * 2 * cfg.width) and st.frames == cfg.frames


def test_cached_features_are_the_encoders_outputs(toy_lerobot, encoders, tmp_path):
    """Latents = (mode - latents_mean) / latents_std of diffusers' AutoencoderKLWan on the clip; the text
    features equal diffusers' own Wan / Cosmos-Predict2.5 prompt encoders; DINOv2 features are of the first
    raw frame of each latent frame; the KVAF camera is the toy world's camera at the model's size."""
    from diffusers import AutoencoderKLWan, Cosmos2_5_PredictBasePipeline, WanPipeline
    from transformers import AutoTokenizer, Dinov2Model, Qwen2_5_VLForConditionalGeneration, UMT5EncoderModel
    enc = run_encode("agra", toy_lerobot["v3.0"], str(tmp_path / "enc"), encoders)
    data = encode.EncodedClips(enc)
    b = data.get([1])
    r = lerobot.LeRobotReader(toy_lerobot["v3.0"])
    clips = lerobot.LeRobotClips(r, CAM, frames=5, horizon=4, height=32, width=32, state_dim=4, action_dim=4)
    e, s = int(b["episode"][0]), int(b["start"][0])
    raw = clips.get([int(np.flatnonzero((clips.index[:, 0] == e) & (clips.index[:, 1] == s))[0])])
    vae = AutoencoderKLWan.from_pretrained(encoders["wan21"], subfolder="vae")
    with torch.no_grad():
        z = vae.encode(raw["video"]).latent_dist.mode()
    mean, std = (torch.tensor(vae.config[k]).view(1, -1, 1, 1, 1) for k in ("latents_mean", "latents_std"))
    torch.testing.assert_close(b["latents"], (z - mean) / std, rtol=1e-5, atol=1e-5)
    dino = Dinov2Model.from_pretrained(encoders["dinov2"])
    x = torch.nn.functional.interpolate(raw["video"][0, :, [0, 1]].transpose(0, 1), size=(28, 28), mode="bicubic",
                                        align_corners=False, antialias=True)
    x = ((x + 1) / 2 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        want = dino(pixel_values=x).last_hidden_state[:, 1:].unflatten(1, (2, 2))
    torch.testing.assert_close(b["teacher"][0], want, rtol=1e-5, atol=1e-5)
    texts = ["put the red cube in the bin", "put the blue ball in the bin"]
    tok = AutoTokenizer.from_pretrained(encoders["reason"])
    qwen = Qwen2_5_VLForConditionalGeneration.from_pretrained(encoders["reason"])
    ours = encode.TextFeatures("cosmos_reason", encoders["reason"])(texts)
    ns = SimpleNamespace(tokenizer=tok, text_encoder=qwen, _execution_device=torch.device("cpu"))
    with torch.no_grad():
        ref = Cosmos2_5_PredictBasePipeline._get_prompt_embeds(ns, prompt=texts, max_sequence_length=512)
    assert ours.shape == (2, 512, 32)
    torch.testing.assert_close(ours, ref.float())
    tok = AutoTokenizer.from_pretrained(encoders["wan21"], subfolder="tokenizer")
    t5 = UMT5EncoderModel.from_pretrained(encoders["wan21"], subfolder="text_encoder")
    ours = encode.TextFeatures("umt5", encoders["wan21"])(texts)
    with torch.no_grad():
        ref = WanPipeline._get_t5_prompt_embeds(SimpleNamespace(tokenizer=tok, text_encoder=t5, _execution_device=torch.device("cpu")),
                                                prompt=texts, max_sequence_length=512)
    torch.testing.assert_close(ours, ref.float())
    assert (ours[:, 8:] == 0).all() and (ours[:, :6].abs().sum(-1) > 0).all()
    kin = lerobot.kinematics(r, "observation.state", CAM, os.path.join(toy_lerobot["v3.0"], "toyarm.urdf"),
                             os.path.join(toy_lerobot["v3.0"], "camera.json"), 64, 64)
    env = ToyWorld(res=64)
    assert np.allclose(kin["K"], env.K) and np.allclose(kin["T_wc"], env.T_wc)
    assert kin["joint_columns"] == [0, 1, 2] and kin["gripper_column"] == 3
    clips = lerobot.LeRobotClips(r, CAM, frames=5, horizon=4, height=64, width=64, kin=kin)
    arrays, meta = generate(3, "train", seed0=0, res=32)
    e, s = clips.index[30]
    ep = meta["episodes"][e]
    q = arrays["state"][ep["start"] + np.minimum(s + np.arange(5), ep["length"] - 1)]
    kb = clips.get([30])
    assert np.allclose(kb["joints"][0].numpy(), q[:, :3]) and np.allclose(kb["gripper"][0, :, 0].numpy(), q[:, 3])
    whole = arrays["state"][ep["start"]:ep["start"] + ep["length"]]
    assert np.allclose(kb["kvaf_depth_range"][0].numpy(), depth_range(env.chain, env.chain.full_q(whole[:, :3], whole[:, 3]), env.T_wc))


# -------------------------------------------------------------------------------------------------
# Training that fits: FSDP2, activation checkpointing, LoRA optimizer state, memory plan
# -------------------------------------------------------------------------------------------------


def torchrun(cmd: list, timeout: int) -> subprocess.CompletedProcess:
    """Run a torch.distributed.run command in its own process group; on a timeout kill the whole group (the
    launcher's workers too: left running, a hung worker would hold a CPU for the rest of the suite) and fail with
    what it printed."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, 9)
        out, err = p.communicate()
        pytest.fail(f"{' '.join(cmd[2:6])} did not finish in {timeout} s; its stderr ends:\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


@pytest.mark.skipif(sys.platform != "linux", reason="gloo multi-process tests run on Linux CI")
def test_fsdp2_two_processes_match_one_process(toy_data, tmp_path):
    out = str(tmp_path / "parity.json")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "tests", "fsdp_parity.py"), toy_data[0], out]
    r = torchrun(cmd, timeout=400)
    if r.returncode != 0 and "SIGABRT" in r.stderr:                  # a gloo teardown abort (rare): one more try
        warnings.warn(f"fsdp_parity.py: a worker aborted, ran it again; its stderr ended:\n{r.stderr[-1500:]}")
        r = torchrun(cmd, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.load(open(out))
    assert set(res) == {"agra", "mvwam", "eawm"}
    for name, d in res.items():
        assert d["keys_equal"], name
        np.testing.assert_allclose(d["losses"], d["losses_ref"], rtol=1e-5, err_msg=name)
        assert d["max_weight_diff"] < 1e-4, (name, d["max_weight_diff"])


@pytest.mark.skipif(sys.platform != "linux", reason="gloo multi-process tests run on Linux CI")
def test_train_py_fsdp_checkpoint_resumes_in_one_process(toy_data, tmp_path):
    out = str(tmp_path / "fsdp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", os.path.join(ROOT, "train.py"),
           "--model", "mvwam", "--tiny", "--steps", "3", "--stop-after", "2", "--batch-size", "2", "--data", toy_data[0],
           "--out", out, "--threads", "1", "--strategy", "fsdp", "--grad-checkpoint", "--set", "ground_steps=0",
           "--set", "image_encoder=tiny", "--set", "image_dim=64", "--set", "freeze_video=false"]
    r = torchrun(cmd, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "batch 2x1x2" in r.stdout and "fsdp" in r.stdout
    state = torch.load(os.path.join(out, "train_state.pt"), weights_only=True)
    assert state["strategy"] == "fsdp" and state["step"] == 2
    assert all(k.startswith("model.") for k in state["optimizer"]["state"])      # keyed by parameter name
    train.main(["--model", "mvwam", "--resume", out, "--data", toy_data[0], "--out", out, "--batch-size", "2"] + FAST)
    assert [json.loads(x)["step"] for x in open(os.path.join(out, "metrics.jsonl"))] == [1, 2, 3]


@pytest.mark.parametrize("name", ["agra", "mvwam", "eawm"])
def test_activation_checkpointing_gives_the_same_gradients(name, toy_data):
    cfg = train.make_config(name, "tiny", ["lora_rank=4", "stage=stage2"] if name == "eawm" else [])
    torch.manual_seed(0)
    model = train.model_module(name).Model(cfg)
    model.param_groups()
    batch = train.dataset_for(cfg, toy_data[1], toy_data[2]).sample(2, torch.Generator().manual_seed(0))
    grads = []
    for on in (False, True):
        assert train.set_grad_checkpointing(model, on) > 0
        model.zero_grad()
        torch.manual_seed(1)
        loss, _ = model.loss(batch)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert set(grads[0]) == set(grads[1]) and len(grads[0]) > 10
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-6, msg=n)


def test_eawm_lora_stages_keep_no_optimizer_state_for_frozen_weights(toy_data):
    import eawm
    for stage in ("stage1", "stage2"):
        cfg = train.make_config("eawm", "tiny", ["dim=64", "heads=2", "ffn_dim=128", "lora_rank=4", f"stage={stage}"])
        model = eawm.Model(cfg)
        groups = model.param_groups()
        opt = torch.optim.AdamW(groups, lr=1e-3)
        batch = train.dataset_for(cfg, toy_data[1], toy_data[2]).sample(2, torch.Generator().manual_seed(0))
        model.loss(batch)[0].backward()
        opt.step()
        names = {id(p): n for n, p in model.named_parameters()}
        with_state = [names[id(p)] for p in opt.state]
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert sorted(with_state) == sorted(trainable)
        assert all(".lora_" in n or n.startswith(("kvaf_head.", "kvaf_patch_embedding.", "text_encoder.", "fusion.",
                                                    "video.patch_embedding.")) for n in with_state)   # widened: first_frame_concat
        assert any(n.startswith("fusion.") for n in with_state) == (stage == "stage2")
        frozen = [p for n, p in model.named_parameters() if n.endswith("self_attn.q.weight")]
        assert frozen and all(p.grad is None and not p.requires_grad for p in frozen)
        n_state = sum(v.numel() for s in opt.state.values() for k, v in s.items() if k != "step")
        assert n_state == 2 * sum(p.numel() for p in model.parameters() if p.requires_grad)   # AdamW: 2 moments


def test_dry_run_plans_every_full_preset():
    plans = {}
    for name, stage in (("agra", "joint"), ("mvwam", "joint"), ("eawm", "stage1")):
        plans[name] = train.main(["--model", name, "--preset", "full", "--stage", stage, "--dry-run", "--batch-size", "1",
                                  "--strategy", "ddp", "--gpus", "8"])
    p = plans["agra"]
    assert p["fixed"]["weights"] == 4 * p["params"] and p["fixed"]["optimizer"] == 8 * p["trainable"]
    # AGRA full, joint: 28 Cosmos blocks x 2 passes, 1260 tokens of 2048 (FFN 8192), 512 text tokens, bf16
    video = dict(p["activation_rows"])["video DiT blocks (2 passes)"]
    assert video == 56 * (1260 * (126 * 2048 + 4 * 8192) + 12 * 512 * 2048)
    e = train.main(["--model", "eawm", "--preset", "full", "--dry-run", "--batch-size", "1", "--strategy", "fsdp",
                    "--gpus", "32", "--gpu-gb", "80", "--grad-checkpoint"])
    assert e["fits"] and not plans["eawm"]["fits"]                  # EA-WM 10 B LoRA: checkpointing on 80 GB
    assert e["fixed"]["optimizer"] == 8 * e["trainable"] / 32 and e["trainable"] < e["params"] / 50
    d = train.main(["--model", "eawm", "--preset", "full", "--dry-run", "--batch-size", "1", "--strategy", "ddp",
                    "--gpus", "1", "--gpu-gb", "80", "--grad-checkpoint"])
    assert d["fits"] and d["max_batch"] == 1                        # one 80 GB GPU, no FSDP (measured: 64.5 GiB, README)


def test_checkpointing_rows_of_the_plan():
    """Under activation checkpointing: EA-WM's frozen base keeps no bf16 copies in its blocks (only the trainable
    weights, the frozen weights outside the blocks and one block's), and each stream's per-token modulation
    e0 (fp32 L x 6 x D) is counted once; without checkpointing every frozen weight that runs with grad."""
    cfg = train.make_config("eawm", "full", stage="stage1")
    with torch.device("meta"):
        model = train.model_module("eawm").Model(cfg)
    model.param_groups()
    off = memplan.plan("eawm", cfg, model, 1, grad_checkpoint=False)
    on = memplan.plan("eawm", cfg, model, 1, grad_checkpoint=True)
    P, Pt = off["params"], off["trainable"]
    assert off["fixed"]["autocast weight copies"] == 2 * P                      # nothing of EA-WM runs without grad
    blocks = [c for m in model.modules() if isinstance(m, (torch.nn.ModuleList, torch.nn.ModuleDict)) for c in m.children()]
    frozen = [sum(p.numel() for p in c.parameters() if not p.requires_grad) for c in blocks]   # Wan blocks, fusion layers
    assert len(blocks) == 2 * 30 + 5 and max(frozen) == frozen[0]
    assert on["fixed"]["autocast weight copies"] == 2 * (Pt + (P - Pt - sum(frozen)) + max(frozen))
    assert on["fixed"]["autocast weight copies"] < 0.05 * off["fixed"]["autocast weight copies"]
    assert dict(on["activation_rows"])["per-token modulation e0 (one per stream)"] == 2 * 27280 * 6 * 3072 * 4
    assert not any("e0" in what for what, _ in off["activation_rows"])


def test_copies_of_a_frozen_stack_under_checkpointing():
    """autocast_copies on a hand-sized model: a trainable head (10 x 10 + 10), a frozen embedding (7 x 10) and
    three frozen blocks of 2 x (10 x 10) each in a ModuleList."""
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(7, 10)
            self.blocks = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(10, 10, bias=False),
                                                                  torch.nn.Linear(10, 10, bias=False)) for _ in range(3))
            self.head = torch.nn.Linear(10, 10)
    net = Net()
    for m in (net.embed, net.blocks):
        m.requires_grad_(False)
    cfg = SimpleNamespace(stage="joint", freeze_video=False)
    assert memplan.autocast_copies("eawm", cfg, net, False) == 110 + 70 + 600
    assert memplan.autocast_copies("eawm", cfg, net, True) == 110 + 70 + 200


def test_bench_times_a_full_layout_config_with_checkpointing():
    """bench.py on a full preset's data layout (cached features, VAE latents) at tiny sizes, with activation
    checkpointing: every row is a finite number, and the FLOP count leaves the model's checkpointing as it was."""
    import bench
    from common import set_grad_checkpointing
    args = [a for kv in SETS["eawm"] for a in ("--set", kv)]
    rows = bench.main(["--device", "cpu", "--skip-toyworld", "--models", "eawm", "--grad-checkpoint", "--json"] + args)
    got = {k: v for _, k, v, _ in rows}
    assert all(np.isfinite(v) and v > 0 for v in got.values()), got
    assert "tiny train step (batch 2) s" in got and "tiny generation time per Euler step (ms)" in got
    cfg = train.make_config("eawm", "tiny", SETS["eawm"])
    model = train.model_module("eawm").Model(cfg)
    set_grad_checkpointing(model)
    batch = bench.full_batch("eawm", cfg, 2, "cpu")
    meta = bench.count_flops(train.model_module("eawm"), model, cfg, batch, torch.autocast("cpu", enabled=False), on_meta=True)
    real = bench.count_flops(train.model_module("eawm"), model, cfg, batch, torch.autocast("cpu", enabled=False), on_meta=False)
    assert all(m.grad_checkpoint for m in model.modules() if hasattr(m, "grad_checkpoint"))
    assert meta > 0 and real > 0 and abs(meta / real - 1) < 0.5


def test_activation_formula_counts_what_autograd_saves():
    """memplan's per-block formula against the bytes autograd saves for one block (fp32, a size the
    coefficients were not counted at)."""
    import agra
    from common import WanBlock, grid_positions, rope_3d

    def saved(mod, *args):
        params = {p.untyped_storage()._cdata for p in mod.parameters()}
        seen = {}

        def pack(t):
            st = t.untyped_storage()
            if st._cdata not in params:
                seen[st._cdata] = st.nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            mod(*args)
        return sum(seen.values())
    L, D, F, Lc = 200, 96, 320, 24
    rope = rope_3d(*grid_positions(1, 1, L), D // 2)
    x, ctx = torch.randn(1, L, D, requires_grad=True), torch.randn(1, Lc, D)
    wan = saved(WanBlock(D, F, 2), x, torch.randn(1, 6, D), ctx, (rope, True))
    cosmos = saved(agra.CosmosBlock(D, 2, D, F / D, 8), x, torch.randn(1, 1, D), torch.randn(1, 1, 3 * D), ctx, (rope, False), L)
    for measured, kind in ((wan, "wan"), (cosmos, "cosmos")):
        est = memplan.block_bytes(kind, L, D, F, Lc, 4)
        assert abs(est - measured) / measured < 0.03, (kind, est, measured)


WHOLE = {"agra": ["latent_channels=16", "codec_p=8", "crossattn_proj_in=64", "teacher=dinov2", "teacher_dim=32", "teacher_res=28",
                  "teacher_patch=14", "teacher_layers=1", "teacher_heads=2", "height=128", "width=128", "video_dim=256",
                  "video_heads=4", "act_dim=128", "bridge_dim=256", "act_heads=4", "project_heads=4", "proj_dim=128"],
         "mvwam": ["latent_channels=16", "codec_p=8", "text_encoder=precomputed", "text_dim=64", "image_encoder=precomputed",
                   "image_dim=64", "height=128", "width=128", "video_heads=4", "video_dim=256", "video_ffn=1024",
                   "act_width=128", "act_ffn=512", "freeze_video=false"],
         "eawm": ["latent_channels=8", "codec_p=16", "height=256", "width=256", "text_encoder=precomputed", "text_dim=64",
                  "dim=256", "heads=4", "ffn_dim=1024", "event_dim=64", "lora_rank=8", "stage=stage2"]}


@pytest.mark.parametrize("name", ["agra", "mvwam", "eawm"])
def test_activation_estimate_of_a_whole_loss(name):
    """The plan's activation estimate against every byte autograd saves in one loss() call (fp32; 192
    video tokens of width 256, full-layout batches): within 15 %."""
    cfg = train.make_config(name, "tiny", WHOLE[name])
    torch.manual_seed(0)
    model = train.model_module(name).Model(cfg)
    model.param_groups()
    batch = {k: torch.randn(2, *s) for k, s in encode.clip_shapes(name, cfg, image_tokens=16).items() if k != "task"}
    batch["text"] = ["put the red cube in the bin"] * 2
    keep = {p.untyped_storage()._cdata for p in model.parameters()} | {v.untyped_storage()._cdata for v in batch.values()
                                                                       if torch.is_tensor(v)}
    seen = {}

    def pack(t):
        if t.untyped_storage()._cdata not in keep:
            seen[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.loss(batch)
    est = memplan.plan(name, cfg, model, 2, dtype=torch.float32)["activations"]
    assert abs(est / sum(seen.values()) - 1) < 0.15, (est, sum(seen.values()))


# -------------------------------------------------------------------------------------------------
# Bad input
# -------------------------------------------------------------------------------------------------


def test_bad_input_is_named(toy_lerobot, encoders, tmp_path, monkeypatch):
    v3 = toy_lerobot["v3.0"]
    with pytest.raises(ValueError, match=r"no camera 'observation.images.wrist'.*observation.images.front"):
        run_encode("agra", v3, str(tmp_path / "x"), encoders, ["--camera", "observation.images.wrist"])
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match="not a local folder, and downloading it from the Hugging Face Hub failed"):
        lerobot.LeRobotReader("someone/no-such-dataset")
    no_tasks = shutil.copytree(v3, str(tmp_path / "no_tasks"))
    os.remove(os.path.join(no_tasks, "meta", "tasks.parquet"))
    with pytest.raises(FileNotFoundError, match="tasks table meta/tasks.parquet is missing"):
        lerobot.LeRobotReader(no_tasks)
    with pytest.raises(ValueError, match=r"URDF \(--urdf ROBOT.urdf\) and the camera calibration \(--camera-json"):
        encode.main(["--dataset", v3, "--camera", CAM, "--model", "eawm", "--preset", "tiny", "--out", str(tmp_path / "e"),
                     "--vae", encoders["wan22"]] + sets("eawm"))
    corrupt = shutil.copytree(v3, str(tmp_path / "corrupt"))
    mp4 = os.path.join(corrupt, "videos", CAM, "chunk-000", "file-000.mp4")
    data = open(mp4, "rb").read()
    open(mp4, "wb").write(data[: len(data) // 2])
    out = str(tmp_path / "enc_corrupt")
    with pytest.raises(ValueError, match="file-000.mp4: cannot be decoded"):
        run_encode("mvwam", corrupt, out, encoders)
    assert not os.path.exists(out) and not os.path.exists(out + ".partial")        # nothing written half-way
    enc = run_encode("mvwam", v3, str(tmp_path / "enc_mv"), encoders, ["--episodes", "0:1"])
    with pytest.raises(ValueError, match="16-channel latents.*eawm expects 8"):
        train.main(["--model", "eawm", "--tiny", "--data", enc, "--out", str(tmp_path / "r")] + sets("eawm"))
    with pytest.raises(ValueError, match="32-wide text features.*lacks image_emb"):
        train.main(["--model", "mvwam", "--tiny", "--data", run_encode("agra", v3, str(tmp_path / "enc_ag"), encoders,
                                                                        ["--episodes", "0:1"]),
                    "--out", str(tmp_path / "r")] + sets("mvwam"))
