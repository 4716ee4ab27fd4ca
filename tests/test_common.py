"""Oracle tests for common.py: hand-computed values for the flow-matching math, RoPE, attention,
the Wan block, LoRA, the pixel codec, checkpoints, kinematics, projection and rasterization."""
import math
import os

import numpy as np
import pytest
import torch

import common as C
from conftest import decode_gif


# ------------------------------------------------------------------ flow matching
def test_time_convention_t1_is_noise():
    x0, noise = torch.tensor([1.0]), torch.tensor([3.0])
    assert C.add_noise(x0, noise, torch.tensor(0.0)).item() == 1.0
    assert C.add_noise(x0, noise, torch.tensor(1.0)).item() == 3.0
    assert C.add_noise(x0, noise, torch.tensor(0.25)).item() == 1.5
    assert C.velocity_target(x0, noise).item() == 2.0          # d x_t / dt = noise - x0


def test_parameterization_conversions_hand_values():
    # x0 = 1, noise = 3, t = 0.25 -> x_t = 1.5, true v = 2
    x_t, t = torch.tensor([1.5]), torch.tensor([0.25])
    assert C.to_velocity(torch.tensor([2.0]), x_t, t, "v").item() == 2.0
    assert C.to_velocity(torch.tensor([1.0]), x_t, t, "x0").item() == pytest.approx(2.0)   # (1.5 - 1) / 0.25
    assert C.to_velocity(torch.tensor([3.0]), x_t, t, "eps").item() == pytest.approx(2.0)  # (3 - 1.5) / 0.75
    # denominators clamped near the endpoints: finite at t = 0 and t = 1
    assert torch.isfinite(C.to_velocity(torch.tensor([1.0]), x_t, torch.tensor([0.0]), "x0")).all()
    assert torch.isfinite(C.to_velocity(torch.tensor([1.0]), x_t, torch.tensor([1.0]), "eps")).all()
    with pytest.raises(ValueError, match="parameterization"):
        C.to_velocity(x_t, x_t, t, "score")


def test_shift_and_samplers():
    assert C.shift_t(torch.tensor(0.5), 5.0).item() == pytest.approx(2.5 / 3.0)
    assert C.shift_t(torch.tensor(0.0), 5.0).item() == 0.0 and C.shift_t(torch.tensor(1.0), 5.0).item() == 1.0
    g = torch.Generator().manual_seed(0)
    n = 200_000
    u = C.sample_t("uniform", n, g)
    assert 0 <= u.min() and u.max() <= 1 and abs(u.mean().item() - 0.5) < 0.01
    ln = C.sample_t("logit_normal", n, g)
    assert abs(ln.median().item() - 0.5) < 0.01
    b = C.sample_t("beta", n, g, alpha=1.5, beta=1.0)
    # E[0.001 + 0.999 Beta(1.5, 1)] = 0.001 + 0.999 * 0.6; mass leans to high noise
    assert b.min() >= 0.001 and b.max() <= 1.0
    assert abs(b.mean().item() - (0.001 + 0.999 * 0.6)) < 0.005
    assert (b > 0.5).float().mean() > 0.6
    assert C.sample_t("fixed", 3, value=1.0).tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="sampler"):
        C.sample_t("cosine", 3)


def test_euler_is_exact_on_straight_paths_and_keeps_clean_tokens():
    x0 = torch.tensor([[0.5, -2.0, 1.0]])
    noise = torch.tensor([[1.0, 1.0, -1.0]])
    field = lambda x, t: (x - x0) / t[:, None]                 # the exact velocity of the straight path
    for steps in (1, 3, 10):
        out = C.euler_sample(field, noise.clone(), steps)
        assert torch.allclose(out, x0, atol=1e-6)
    clean = torch.tensor([[True, False, False]])
    x_clean = torch.tensor([[7.0, 0.0, 0.0]])
    out = C.euler_sample(field, noise.clone(), 4, clean_mask=clean, x_clean=x_clean)
    assert out[0, 0].item() == 7.0


def test_lr_schedules():
    assert C.lr_schedule("cosine", 0, 100, 0.05) == pytest.approx(0.2)      # (0 + 1) / 5 warm-up steps
    assert C.lr_schedule("cosine", 4, 100, 0.05) == pytest.approx(1.0)
    assert C.lr_schedule("cosine", 5, 100, 0.05) == pytest.approx(1.0)
    assert C.lr_schedule("cosine", 52, 100, 0.05) == pytest.approx(0.5 * (1 + math.cos(math.pi * 47 / 95)))
    assert C.lr_schedule("constant_then_linear", 19, 100, const_frac=0.2) == 1.0
    assert C.lr_schedule("constant_then_linear", 60, 100, const_frac=0.2) == pytest.approx(0.5)
    assert C.lr_schedule("constant_then_linear", 100, 100, const_frac=0.2) == 0.0


def test_timestep_embedding_hand_values():
    e = C.timestep_embedding(torch.tensor([0.0, 1.0]), 4)     # freqs 1, 1e-2
    assert torch.allclose(e[0], torch.tensor([1.0, 1.0, 0.0, 0.0]))
    assert torch.allclose(e[1], torch.tensor([math.cos(1), math.cos(0.01), math.sin(1), math.sin(0.01)]))
    s = C.timestep_embedding(torch.tensor([1.0]), 4, cos_first=False)
    assert torch.allclose(s[0], torch.tensor([math.sin(1), math.sin(0.01), math.cos(1), math.cos(0.01)]))


# ------------------------------------------------------------------ RoPE and attention
def test_rope_split_and_relative_property():
    assert C.rope_3d_split(128) == (44, 42, 42)
    assert C.rope_3d_split(32) == (12, 10, 10)
    d = 12
    q, k = torch.randn(1, 1, 1, d), torch.randn(1, 1, 1, d)
    for interleaved in (True, False):
        def score(pq, pk):
            aq = C.rope_1d(torch.tensor([float(pq)]), d)
            ak = C.rope_1d(torch.tensor([float(pk)]), d)
            return (C.apply_rope(q, aq, interleaved) * C.apply_rope(k, ak, interleaved)).sum().item()
        assert score(3, 1) == pytest.approx(score(7, 5), abs=1e-4)           # depends on p - p' only
        x = torch.randn(1, 2, 5, d)
        ang = C.rope_1d(torch.arange(5.0), d)
        assert torch.allclose(C.apply_rope(x, ang, interleaved).norm(dim=-1), x.norm(dim=-1), atol=1e-5)
    # a 90-degree rotation of the first pair, by hand: position 1 with frequency 1 rad -> pos pi/2
    x = torch.tensor([[[[1.0, 0.0]]]])
    out = C.apply_rope(x, torch.tensor([[math.pi / 2]]), interleaved=True)
    assert torch.allclose(out, torch.tensor([[[[0.0, 1.0]]]]), atol=1e-6)


def test_rope_interleaved_is_the_pairwise_rotation():
    # the complex-number path (CPU / CUDA) against the rotation written out, values and gradients, for one
    # angle table per token (L, d/2) and one per sample (B, L, d/2), to float rounding (the complex kernel may fuse
    # a multiply-add the written-out version rounds twice)
    for shape in [(7, 4), (2, 7, 4)]:
        x = torch.randn(2, 3, 7, 8, requires_grad=True)
        ang = torch.rand(*shape, dtype=torch.float64) * 10
        a = ang.unsqueeze(1) if ang.dim() == 3 else ang
        c, s = torch.cos(a).float(), torch.sin(a).float()
        x1, x2 = x[..., 0::2], x[..., 1::2]
        ref = torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], -1).flatten(-2)
        out = C.apply_rope(x, ang, interleaved=True)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
        g = torch.randn_like(out)
        torch.testing.assert_close(torch.autograd.grad(out, x, g)[0], torch.autograd.grad(ref, x, g)[0], rtol=0, atol=1e-6)
    xb = torch.randn(1, 1, 3, 4, dtype=torch.bfloat16)
    assert C.apply_rope(xb, torch.rand(3, 2), interleaved=True).dtype == torch.bfloat16


def test_rope_ntk_scale():
    f1, f3 = C.rope_inv_freq(10, 10000.0), C.rope_inv_freq(10, 10000.0, 3.0)
    theta = 10000.0 * 3.0 ** (10 / 8)
    assert torch.allclose(f3, 1.0 / theta ** (torch.arange(0, 10, 2, dtype=torch.float64) / 10))
    assert f1[0] == f3[0] == 1.0


def test_attention_mask_and_explicit_weights_match_sdpa():
    torch.manual_seed(0)
    attn = C.Attention(8, 2, qk_norm="per_head")
    x = torch.randn(2, 5, 8)
    mask = torch.ones(5, 5, dtype=torch.bool).tril()          # causal
    out = attn(x, mask=mask)
    weights = []
    out2 = attn(x, mask=mask, attn_out=weights)
    assert torch.allclose(out, out2, atol=1e-5)
    assert weights[0].shape == (2, 2, 5, 5)
    assert torch.allclose(weights[0].sum(-1), torch.ones(2, 2, 5))
    assert (weights[0][..., 0, 1:] == 0).all()                # token 0 sees only itself
    # changing a later token does not change an earlier token's output under the causal mask
    x2 = x.clone()
    x2[:, 4] += 1.0
    assert torch.allclose(attn(x2, mask=mask)[:, :4], out[:, :4], atol=1e-6)


def test_wan_block_names_and_per_token_timesteps():
    blk = C.WanBlock(dim=24, ffn_dim=32, heads=2, ctx_dim=16)
    names = set(blk.state_dict())
    for k in ("self_attn.q.weight", "self_attn.norm_q.weight", "cross_attn.o.bias", "norm3.weight",
              "ffn.0.weight", "ffn.2.weight", "modulation"):
        assert k in names
    assert blk.modulation.shape == (1, 6, 24) and blk.self_attn.norm_q.weight.shape == (24,)   # across heads
    x, ctx = torch.randn(2, 6, 24), torch.randn(2, 3, 16)
    e0 = torch.randn(2, 6, 24)
    out = blk(x, e0, ctx)
    out_tok = blk(x, e0[:, None].expand(2, 6, 6, 24), ctx)   # (B, L, 6, D) with equal rows = Wan2.1 semantics
    assert torch.allclose(out, out_tok, atol=1e-5)


def test_lora_injection_freezes_and_preserves_base():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    x = torch.randn(3, 4)
    before = net(x).detach()
    base = {k: v.clone() for k, v in net.state_dict().items()}
    names = C.inject_lora(net, r"^[02]$", rank=2)
    assert names == ["0", "2"]
    assert torch.allclose(net(x), before)                      # lora_B = 0: same function
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable == {"0.lora_A", "0.lora_B", "2.lora_A", "2.lora_B"}
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    net(x).pow(2).sum().backward()
    opt.step()
    for k, v in base.items():
        assert torch.equal(net.state_dict()[k], v)             # base weights untouched
    with pytest.raises(ValueError, match="no nn.Linear"):
        C.inject_lora(net, "nothing", 2)


def test_pixel_codec_roundtrip_and_layout():
    codec = C.PixelCodec(q=4, p=2)
    v = torch.rand(2, 3, 9, 8, 8) * 2 - 1
    z = codec.encode(v)
    assert z.shape == (2, 48, 3, 4, 4)
    assert torch.equal(codec.decode(z), v)
    # latent frame 1 depends only on raw frames 1..4
    v2 = v.clone()
    v2[:, :, 5:] = 0
    assert torch.equal(codec.encode(v2)[:, :, :2], z[:, :, :2])
    with pytest.raises(ValueError, match="1 \\+ 4"):
        codec.encode(torch.zeros(1, 3, 8, 8, 8))


# ------------------------------------------------------------------ checkpoints and configs
def test_weights_roundtrip_truncation_and_strict_loading(tmp_path):
    m = torch.nn.Linear(3, 2)
    path = str(tmp_path / "m.safetensors")
    C.save_weights(path, m.state_dict(), {"config": {"a": 1}, "model": "x"})
    sd, meta = C.load_weights(path)
    assert meta == {"config": {"a": 1}, "model": "x"} and torch.equal(sd["weight"], m.weight)
    data = open(path, "rb").read()
    bad = str(tmp_path / "bad.safetensors")
    open(bad, "wb").write(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        C.load_weights(bad)
    with pytest.raises(ValueError) as e:
        C.load_state_dict_strict(torch.nn.Linear(3, 4), {"weight": torch.zeros(2, 3), "extra": torch.zeros(1)})
    msg = str(e.value)
    assert "missing 1 key(s): bias" in msg and "unexpected 1 key(s): extra" in msg and "expected (4, 3), received (2, 3)" in msg
    C.load_state_dict_strict(torch.nn.Linear(3, 2), {"w": m.weight, "bias": m.bias}, key_map={"w": "weight"})


def test_atomic_write_keeps_old_file_when_killed(tmp_path):
    path = str(tmp_path / "f.txt")
    C.atomic_write(path, lambda tmp: open(tmp, "w").write("old"))

    def dies(tmp):
        open(tmp, "w").write("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        C.atomic_write(path, dies)
    assert open(path).read() == "old"
    assert os.listdir(tmp_path) == ["f.txt"]                  # no temp file left behind


def test_parse_override_types_and_unknown_keys():
    from dataclasses import dataclass

    @dataclass
    class Cfg:
        lr: float = 1.0
        n: int = 2
        on: bool = False
        layers: tuple = (1, 2)
        name: str = "a"

    c = Cfg()
    for a in ("lr=0.5", "n=3", "on=true", "layers=4,8,12", "name=b"):
        C.parse_override(c, a)
    assert (c.lr, c.n, c.on, c.layers, c.name) == (0.5, 3, True, (4, 8, 12), "b")
    with pytest.raises(ValueError, match="unknown config key 'lrr'.*valid keys"):
        C.parse_override(c, "lrr=1")
    with pytest.raises(ValueError, match="cannot parse"):
        C.parse_override(c, "n=abc")
    with pytest.raises(ValueError, match="unknown"):
        C.config_from_dict(Cfg, {"lr": 1.0, "bogus": 2})


# ------------------------------------------------------------------ kinematics, camera, raster
URDF = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "toyarm.urdf")


def test_urdf_parse_and_forward_kinematics_known_poses():
    chain = C.URDFChain(URDF)
    assert chain.actuated == ["base_yaw", "shoulder", "elbow", "left_finger_joint"]
    tcp = chain.fk(np.zeros(4))["tcp"][:3, 3]
    assert np.allclose(tcp, [0.30 + 0.26 + 0.05, 0, 0.15])     # straight arm along +x at shoulder height
    # yaw 90 deg, elbow 90 deg down: upper arm along +y, forearm pointing straight down
    tcp = chain.fk(np.array([np.pi / 2, 0, np.pi / 2, 0]))["tcp"][:3, 3]
    assert np.allclose(tcp, [0, 0.30, 0.15 - 0.31], atol=1e-9)
    # mimic finger: the right finger moves opposite to the left one
    poses = chain.fk(np.array([0, 0, 0, 0.02]))
    assert np.allclose(poses["left_finger"][:3, 3] - poses["right_finger"][:3, 3], [0, 0.01 + 0.04, 0])
    batch = chain.fk(np.zeros((5, 7, 4)))["tcp"]               # vectorized over leading dims
    assert batch.shape == (5, 7, 4, 4)
    with pytest.raises(ValueError, match="expects q"):
        chain.fk(np.zeros(3))


def test_projection_known_points_and_behind_camera():
    K = C.intrinsics(32, 32, 90.0)                             # f = 16
    assert K[0, 0] == pytest.approx(16.0)
    T = C.look_at((0, 0, 1), (0, 0, 0), up=(0, 1, 0))          # looking straight down
    uv, z = C.project(np.array([[0.0, 0.0, 0.0]]), K, T)
    assert np.allclose(uv, [[16, 16]]) and z[0] == pytest.approx(1.0)
    uv, _ = C.project(np.array([[0.5, 0.0, 0.0]]), K, T)       # 0.5 m to the side at depth 1 -> 8 px
    assert abs(uv[0, 0] - 16) == pytest.approx(8.0) and uv[0, 1] == pytest.approx(16.0)
    uv, z = C.project(np.array([[0.0, 0.0, 2.0]]), K, T)       # behind the camera
    assert z[0] < 0 and np.isnan(uv).all()


def test_raster_primitives():
    img = np.zeros((10, 10, 3), np.uint8)
    ids = np.zeros((10, 10), np.uint8)
    C.draw_disc(img, ids, (5.0, 5.0), 1.6, (255, 0, 0), 3)
    assert ids[4, 4] == 3 and ids[5, 5] == 3 and ids[0, 0] == 0 and img[5, 5, 0] == 255
    C.draw_segment(img, ids, (0.5, 8.5), (9.5, 8.5), 0.6, (0, 255, 0), 4)
    assert (ids[8] == 4).all() and (ids[7] != 4).all()
    C.draw_polygon(None, ids, [(0, 0), (3, 0), (3, 3), (0, 3)], None, 5)
    assert (ids[:3, :3] == 5).all() and ids[3, 3] != 5
    C.draw_disc(None, ids, (np.nan, 1.0), 2.0, None, 6)        # non-finite: nothing drawn
    assert not (ids == 6).any()
    g = C.gaussian_2d((9, 9), (4.5, 4.5), 1.0, truncate=2.0)
    assert g[4, 4] == pytest.approx(1.0) and g[0, 0] == 0.0


def test_image_writers(tmp_path):
    img = (np.random.rand(6, 5, 3) * 255).astype(np.uint8)
    C.save_png(str(tmp_path / "a.png"), img)
    data = open(tmp_path / "a.png", "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    import zlib
    idat = data[data.index(b"IDAT") + 4: data.index(b"IEND") - 8]
    raw = zlib.decompress(idat)
    assert raw == b"".join(b"\x00" + img[i].tobytes() for i in range(6))     # exact pixels
    frames = np.stack([img, 255 - img])
    C.save_gif(str(tmp_path / "a.gif"), frames, fps=5)
    decoded = decode_gif(open(tmp_path / "a.gif", "rb").read())
    pal = C._gif_palette().astype(int)
    expected = pal[((frames[..., None, :].astype(int) - pal) ** 2).sum(-1).argmin(-1)]   # nearest palette colour
    assert decoded.shape == frames.shape and np.array_equal(decoded, expected)
    C.save_gif(str(tmp_path / "b.gif"), frames, fps=5, scale=3)                          # 270 px per frame: a clear code mid-frame
    decoded = decode_gif(open(tmp_path / "b.gif", "rb").read())
    assert np.array_equal(decoded, expected.repeat(3, 1).repeat(3, 2))


def test_config_checks_and_set_trainable():
    C.check_layers("agra_layers", (0, 5), 6)
    with pytest.raises(ValueError, match=r"layer 6 outside 0..5"):
        C.check_layers("agra_layers", (0, 6), 6)
    C.check_clip_frames(9, 4)
    with pytest.raises(ValueError, match=r"frames=8 must be 1 \+ latent_q \* k"):
        C.check_clip_frames(8, 4)
    m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    m[0].weight.requires_grad_(True)
    groups = C.set_trainable(m, [{"params": [m[1].weight]}])
    assert groups[0]["params"][0] is m[1].weight
    assert [p.requires_grad for p in m.parameters()] == [False, False, True, False]
