"""EA-WM (eawm.py): KVAF renderer oracles, EDLS target, fusion identity at init, LoRA / stages,
ablations, full-size shapes, and train -> save -> resume -> sample in both generation modes."""
import copy
import json
import os

import numpy as np
import pytest
import torch

import common as C
import eawm
import sample
import train
from common import URDFChain, intrinsics, look_at, project
from conftest import decode_gif, read_png
from data.toyworld import URDF_PATH, VOCAB

# the tests check behaviour, not quality: a 64-wide stream keeps them fast (the preset is 192 wide)
NARROW = {"dim": 64, "heads": 2, "ffn_dim": 256}
FAST = ["--batch-size", "4", "--log-every", "100", "--threads", "2"] + [f"--set={k}={v}" for k, v in NARROW.items()]


def tiny(**kw):
    cfg = copy.deepcopy(eawm.CONFIGS["tiny"])
    cfg.vocab = tuple(VOCAB)
    for k, v in {**NARROW, **kw}.items():
        setattr(cfg, k, v)
    return cfg


@pytest.fixture(scope="module")
def clips(toy_data):
    return train.dataset_for(tiny(), toy_data[1], toy_data[2])


# ------------------------------------------------------------------ KVAF renderer (Eq. 1-3)


def camera(res=64):
    return intrinsics(res, res, 60.0), look_at(eye=(0.9, -0.6, 0.7), target=(0.25, 0.0, 0.1))


def test_kvaf_lights_the_pixel_where_a_joint_projects():
    chain = URDFChain(URDF_PATH)
    K, T_wc = camera()
    q = np.array([[0.3, -0.4, 1.2]])
    img = eawm.render_kvaf(chain, q, np.array([1.0]), K, T_wc, 64, 64, axis_length=0.0)
    elbow = chain.fk(np.append(q[0], 0.0))["forearm"][:3, 3]                 # the elbow joint's child link
    (u, v), z = project(elbow, K, T_wc)
    assert z > 0 and (img[0, int(v), int(u)] == 255).all()                   # white joint landmark
    assert img.dtype == np.uint8 and img.shape == (1, 64, 64, 3)
    assert (img[0].max(-1) == 0).mean() > 0.7                                # mostly black canvas


def test_kvaf_draws_nothing_behind_the_camera():
    chain = URDFChain(URDF_PATH)
    K, T_wc = camera()
    flip = np.diag([1.0, -1.0, -1.0, 1.0]) @ T_wc                            # turn the camera around (z -> -z)
    q = np.zeros((2, 3))
    img = eawm.render_kvaf(chain, q, np.ones(2), K, flip, 64, 64)
    assert img.max() == 0


def test_kvaf_heatmap_peaks_at_the_projected_end_effector():
    chain = URDFChain(URDF_PATH)
    K, T_wc = camera()
    q = np.array([[0.0, -0.3, 1.0], [0.4, -0.6, 1.4], [-0.3, -0.2, 0.8]])
    img = eawm.render_kvaf(chain, q, np.array([1.0, 0.5, 0.0]), K, T_wc, 64, 64)
    tcp = chain.fk(np.concatenate([q, np.zeros((3, 1))], 1))["tcp"][:, :3, 3]
    uv, _ = project(tcp, K, T_wc)
    heat = eawm.render_kvaf(chain, q, np.array([1.0, 0.5, 0.0]), K, T_wc, 64, 64, elements=("heatmap",))
    for f in range(3):
        i, j = np.unravel_index(heat[f, :, :, 0].argmax(), (64, 64))
        assert abs(j + 0.5 - uv[f, 0]) <= 0.5 and abs(i + 0.5 - uv[f, 1]) <= 0.5   # the peak pixel holds the EE
        assert (heat[f] == heat[f, :, :, :1]).all()                               # grey: equal in R, G, B
        sigma = 64 / 24
        vv, uu = np.mgrid[0:64, 0:64] + 0.5
        outside = (uu - uv[f, 0]) ** 2 + (vv - uv[f, 1]) ** 2 > (3 * sigma) ** 2
        assert heat[f][outside].max() == 0                                       # truncated at 3 sigma
    track = eawm.recover_ee_track(img)                                           # on the full render (axes on top)
    assert np.abs(track - uv).max() < 0.25
    K32, _ = camera(32)                                                          # and at the toy's 32 x 32
    img32 = eawm.render_kvaf(chain, q, np.array([1.0, 0.5, 0.0]), K32, T_wc, 32, 32)
    assert np.abs(eawm.recover_ee_track(img32) - project(tcp, K32, T_wc)[0]).max() < 0.25
    assert np.isnan(eawm.recover_ee_track(np.zeros((2, 32, 32, 3), np.uint8))).all()   # nothing there: NaN


def test_ee_tracking_keeps_a_fading_heatmap_against_a_brighter_blob_across_the_frame():
    """App. A.3's association: from frame 3 on the heatmap fades to 35 % (as jointly generated KVAFs do) and a
    second heatmap-like blob at 60 % appears 9-10 pixels away. Frame by frame the recovery takes the blob; tracked
    (max_step) it stays on the end effector, and a frame with nothing in it takes its nearest detection."""
    chain = URDFChain(URDF_PATH)
    K, T_wc = camera(32)
    F_, g = 9, np.ones(9)
    q = np.stack([np.linspace(0.0, 0.5, F_), np.linspace(-0.3, -0.5, F_), np.linspace(1.0, 1.3, F_)], 1)
    uv = project(chain.fk(np.concatenate([q, np.zeros((F_, 1))], 1))["tcp"][:, :3, 3], K, T_wc)[0]
    draw = lambda q_, el: eawm.render_kvaf(chain, q_, g, K, T_wc, 32, 32, elements=el).astype(np.float32)  # noqa: E731
    base, heat, axes = draw(q, ("skeleton", "landmarks", "fingers")), draw(q, ("heatmap",)), draw(q, ("axes",))
    ghost = draw(q + np.array([1.6, 0.0, 0.0]), ("heatmap",))                   # the same blob, the arm yawed away
    late = (np.arange(F_) >= 3)[:, None, None, None]
    img = np.maximum.reduce([base, heat * np.where(late, 0.35, 1.0), ghost * np.where(late, 0.6, 0.0)])
    img = np.where(axes.max(-1, keepdims=True) > 0, axes, img).astype(np.uint8)            # axes on top, as rendered
    alone = np.linalg.norm(eawm.recover_ee_track(img) - uv, axis=1)
    assert alone[:3].max() < 0.25 and alone[3:].max() > 5                      # frame by frame: the blob wins somewhere
    track, found = eawm.recover_ee_track(img, max_step=3.2, with_detected=True)
    assert np.linalg.norm(track - uv, axis=1).max() < 0.25 and found.all()
    img[5] = 0                                                                  # nothing in frame 5
    track, found = eawm.recover_ee_track(img, max_step=3.2, with_detected=True)
    assert found.tolist() == [True] * 5 + [False] + [True] * 3
    assert np.allclose(track[5], track[4]) and np.linalg.norm(np.delete(track - uv, 5, 0), axis=1).max() < 0.25


def test_kvaf_gripper_opening_moves_the_fingers_and_depth_changes_colour():
    chain = URDFChain(URDF_PATH)
    K, T_wc = camera()
    q = np.array([[0.0, -0.3, 1.0]] * 2)
    img = eawm.render_kvaf(chain, q, np.array([1.0, 0.0]), K, T_wc, 64, 64, depth_range=(0.5, 1.5))
    assert not np.array_equal(img[0], img[1])
    near = eawm.render_kvaf(chain, q[:1], np.ones(1), K, T_wc, 64, 64, depth_range=(1.5, 2.5))   # everything "near"
    assert not np.array_equal(near[0], img[0])
    with pytest.raises(ValueError, match="expected joints"):
        eawm.render_kvaf(chain, np.zeros((2, 4)), np.ones(2), K, T_wc, 64, 64)


# ------------------------------------------------------------------ EDLS (Eq. 7)


def test_edls_target_on_a_hand_made_clip():
    from common import PixelCodec
    codec = PixelCodec(4, 2)
    video = torch.zeros(1, 3, 9, 4, 4)
    video[0, 0, 2, 0, 0] = 1.0                                               # one red pixel blinks at frame 2
    z = eawm.edls_target(video, codec.encode)                                 # d_2 = +1, d_3 = -1 at (0, 0), halved
    expected = torch.zeros(1, 48, 3, 2, 2)
    # codec channel = c * q p p + (frame within group) * p p + dy * p + dx; frames 1..4 = latent frame 1
    expected[0, 0 * 16 + 1 * 4, 1, 0, 0] = 0.5
    expected[0, 0 * 16 + 2 * 4, 1, 0, 0] = -0.5
    assert torch.equal(z, expected)
    tokens = eawm.patchify(z, (1, 2, 2))
    assert tokens.shape == (1, 3, 192)
    m = eawm.Model(tiny())
    assert torch.equal(m.video.unpatchify(tokens, (3, 1, 1)), z)              # patchify inverts unpatchify


# ------------------------------------------------------------------ fusion, LoRA, stages


def test_fusion_is_the_identity_at_initialization():
    torch.manual_seed(0)
    f = eawm.EventFusion(32, 2, 16, 8, plain=False)
    hv, hk = torch.randn(2, 12, 32), torch.randn(2, 12, 32)
    from common import rope_3d, grid_positions
    rope = (rope_3d(*grid_positions(3, 2, 2), 16), True)
    ov, ok, e_hat = f(hv, hk, rope, rope)
    assert torch.equal(ov, hv) and torch.equal(ok, hk) and e_hat.shape == (2, 12, 8)
    # and the whole model equals the same model with no fusion layers
    torch.manual_seed(0)
    a = eawm.Model(tiny())
    torch.manual_seed(0)
    b = eawm.Model(tiny(fusion_layers=()))
    b.load_state_dict({k: v for k, v in a.state_dict().items() if not k.startswith("fusion.")})
    out_a, out_b = video_outputs(a, b)
    assert torch.allclose(out_a, out_b, atol=1e-6)


@pytest.mark.parametrize("init", ["zero", "aligned"])
def test_aligned_fusion_init_looks_up_the_partner_token(init):
    """fusion_init="aligned": at initialization each video token's cross-attention puts most of its
    weight on the KVAF token at its own (t, h, w) (the streams are pixel-aligned), in both directions,
    and the fusion is still the identity (output projections at zero); "zero" attends about uniformly."""
    from common import rope_3d, grid_positions
    torch.manual_seed(0)
    f = eawm.EventFusion(192, 3, 16, 8, plain=False, init=init)
    grid = (3, 8, 8)
    L = int(np.prod(grid))
    rope = (rope_3d(*grid_positions(*grid), 64), True)
    hv, hk = torch.randn(2, L, 192), torch.randn(2, L, 192)
    for a, x, c in ((f.video_from_kvaf, hv, hk), (f.kvaf_from_video, hk, hv)):
        q, k, _ = a.qkv(f.norm_v(x), f.norm_k(c), rope=rope, rope_k=rope)
        p = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1)
        on_partner = p.diagonal(dim1=-2, dim2=-1).mean().item()
        if init == "aligned":
            assert on_partner > 0.5                                            # 0.61 at the defaults
            assert (p.argmax(-1) == torch.arange(L)).float().mean() == 1.0     # every query's top key is its partner
        else:
            assert on_partner < 3.0 / L
    ov, ok, _ = f(hv, hk, rope, rope)
    assert torch.equal(ov, hv) and torch.equal(ok, hk)
    with pytest.raises(ValueError, match="fusion_init"):
        eawm.Config(fusion_init="local")


def video_outputs(*models):
    """Each model's video output on one fixed input, its video head made non-zero (it starts at zero)."""
    with torch.no_grad():
        for m in models:
            m.video.head.head.weight.fill_(0.01)
    g = torch.Generator().manual_seed(0)
    z, k = torch.randn(2, 48, 3, 16, 16, generator=g), torch.randn(2, 48, 3, 16, 16, generator=g)
    t = torch.tensor([[0, 0.5, 0.5], [0, 0.9, 0.9]])
    ctx = torch.randn(2, 5, 64, generator=g)
    return [m(z, t, k, t, ctx)[0] for m in models]


def test_lora_stages_train_what_the_paper_says_and_leave_base_weights(clips):
    torch.manual_seed(0)
    model = eawm.Model(tiny(lora_rank=4, stage="stage1", first_frame_concat=False))   # the paper's input
    with torch.no_grad():                                                    # a "pretrained" (non-zero) output head
        for h in (model.video.head.head, model.kvaf_head.head):
            h.weight.normal_(0, 0.02)
    groups = model.param_groups()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or n.startswith(("kvaf_head.", "kvaf_patch_embedding.", "text_encoder."))
                             for n in trainable)
    assert any(n.startswith("kvaf_blocks.") and ".lora_" in n for n in trainable)
    assert any(n.startswith("video.blocks.") and ".lora_" in n for n in trainable)
    assert not any(n.startswith("fusion.") for n in trainable)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for g in groups for p in g["params"]], lr=1e-2)
    for _ in range(2):
        loss, _ = model.loss(clips.sample(2, torch.Generator().manual_seed(0)))
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if n in base)
    lora_b = [p for n, p in model.named_parameters() if n.endswith("lora_B")]
    assert any(p.abs().sum() > 0 for p in lora_b)                            # the adapters moved
    model.cfg.stage = "stage2"
    model.param_groups()
    trainable2 = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable2 - trainable == {n for n, _ in model.named_parameters() if n.startswith("fusion.")}


def test_kvaf_copy_starts_equal_to_the_video_blocks():
    model = eawm.Model(tiny())
    v, k = model.video.blocks.state_dict(), model.kvaf_blocks.state_dict()
    assert v.keys() == k.keys() and all(torch.equal(v[n], k[n]) for n in v)
    assert model.kvaf_blocks[0].self_attn.q.weight.data_ptr() != model.video.blocks[0].self_attn.q.weight.data_ptr()


def test_first_frame_concat_starts_as_the_in_sequence_model():
    """first_frame_concat widens only the video input, with zero weights on the concatenated first frame:
    at initialization the model computes what the in-sequence (Wan2.2 TI2V) model computes."""
    torch.manual_seed(0)
    a = eawm.Model(tiny(first_frame_concat=False))
    b = eawm.Model(tiny(first_frame_concat=True))
    wide = b.video.patch_embedding.weight
    assert wide.shape[1] == 2 * 48 and b.kvaf_patch_embedding.weight.shape[1] == 48
    assert torch.equal(wide[:, 48:], torch.zeros_like(wide[:, 48:]))
    assert torch.equal(wide[:, :48], b.kvaf_patch_embedding.weight)              # the copy was made before widening
    sd = a.state_dict()
    sd["video.patch_embedding.weight"] = torch.cat([sd["video.patch_embedding.weight"], torch.zeros_like(wide[:, 48:])], 1)
    b.load_state_dict(sd)
    out_a, out_b = video_outputs(a, b)
    assert torch.allclose(out_a, out_b, atol=1e-6)
    with torch.no_grad():                                                    # once trained, the concatenated frame counts
        b.video.patch_embedding.weight[:, 48:].normal_(0, 0.1)
    out_a, out_b = video_outputs(a, b)
    assert not torch.allclose(out_a, out_b, atol=1e-3)
    lora = eawm.Model(tiny(first_frame_concat=True, lora_rank=4, stage="stage1"))  # LoRA leaves the base frozen,
    lora.param_groups()                                                      # not the widened embedding
    assert lora.video.patch_embedding.weight.requires_grad and not lora.video.blocks[0].ffn[0].weight.requires_grad


def test_x0_prediction_gives_the_true_velocity_for_the_true_clip():
    """prediction="x0": v = (x_t - x0_hat) / t; a perfect x0_hat gives exactly v = noise - x0 (Eq. 8's
    target), for the video layout and for numeric tokens, and t below x0_t_min is clipped."""
    from common import add_noise, velocity_target
    model = eawm.Model(tiny(prediction="x0"))
    g = torch.Generator().manual_seed(0)
    z, n = torch.randn(2, 48, 3, 4, 4, generator=g), torch.randn(2, 48, 3, 4, 4, generator=g)
    t = torch.tensor([[0.2, 0.5, 1.0], [0.3, 0.05, 0.7]])
    x_t = add_noise(z, n, t[:, None, :, None, None])
    assert torch.allclose(model.to_velocity(z, x_t, t), velocity_target(z, n), atol=1e-5)
    q, m = torch.randn(2, 9, 4, generator=g), torch.randn(2, 9, 4, generator=g)
    tq = torch.full((2, 9), 0.4)
    assert torch.allclose(model.to_velocity(q, add_noise(q, m, tq[..., None]), tq), velocity_target(q, m), atol=1e-5)
    small = torch.full((2, 9), 0.01)                                         # clipped: (x_t - x0) / 0.05
    assert torch.allclose(model.to_velocity(q, q + 1.0, small), torch.full_like(q, 20.0), atol=1e-4)


def test_delta_prediction_starts_by_predicting_no_motion():
    """prediction="delta" (the tiny preset): x0_hat = the given first frame + the network's output, which
    is zero at initialization (zero output heads), so a fresh model's velocity is the one that leads to
    the first frame repeated, v = (x_t - x_first) / t, for both streams; one Euler step from t = 1 to 0
    then generates exactly "copy the first frame"."""
    torch.manual_seed(0)
    model = eawm.Model(tiny(prediction="delta"))
    z, k = torch.randn(2, 48, 3, 16, 16), torch.randn(2, 48, 3, 16, 16)
    t = torch.tensor([[0, 0.5, 0.5], [0, 0.9, 0.9]])
    v, vk, _ = model(z, t, k, t, torch.randn(2, 5, 64))
    tt = t[:, None, 1:, None, None]
    assert torch.allclose(v[:, :, 1:], (z[:, :, 1:] - z[:, :, :1]) / tt, atol=1e-5)
    assert torch.allclose(vk[:, :, 1:], (k[:, :, 1:] - k[:, :, :1]) / tt, atol=1e-5)
    ones = torch.ones(2, 3)
    ones[:, 0] = 0
    v1, _, _ = model(z, ones, k, ones, torch.randn(2, 5, 64))
    assert torch.allclose(z[:, :, 1:] - v1[:, :, 1:], z[:, :, :1].expand_as(z[:, :, 1:]), atol=1e-5)


@pytest.mark.parametrize("kw", [{}, {"kvaf": False}, {"fusion": "plain"}, {"stage": "stage1"}])
def test_loss_and_both_generation_modes(clips, kw):
    torch.manual_seed(0)
    model = eawm.Model(tiny(**kw))
    model.param_groups()
    batch = clips.sample(2, torch.Generator().manual_seed(1))
    loss, parts = model.loss(batch)
    assert torch.isfinite(loss) and {"video", "kvaf"} <= set(parts)
    assert ("edls" in parts) == (kw.get("fusion", "event") == "event")
    loss.backward()
    for mode in ("kvaf", "joint"):
        out = model.sample(batch, steps=2, mode=mode, generator=torch.Generator().manual_seed(0))
        z = out["video_latents"]
        assert z.shape == (2, 48, 3, 16, 16)
        assert torch.equal(z[:, :, :1], model.encode(batch["video"])[:, :, :1])   # the given first frame


def test_edls_is_normalized_so_predicting_no_change_scores_one(clips):
    """The toy's EDLS target is tiny (mean square ~3e-3: few pixels change per frame), so the loss is
    divided by the target's mean square: an event head that outputs zeros scores exactly 1."""
    model = eawm.Model(tiny())
    with torch.no_grad():
        for f in model.fusion.values():
            f.event_head.weight.zero_()
            f.event_head.bias.zero_()
    batch = clips.sample(3, torch.Generator().manual_seed(2))
    assert model.loss(batch)[1]["edls"].item() == pytest.approx(1.0, rel=1e-5)
    model.cfg.edls_normalize = False
    target = eawm.patchify(eawm.edls_target(batch["video"], model.encode), model.cfg.patch)[:, 64:]
    assert model.loss(batch)[1]["edls"].item() == pytest.approx(target.pow(2).mean().item(), rel=1e-5)


@pytest.mark.parametrize("stage", ["stage2", "stage1"])
def test_total_loss_adds_edls_times_its_weight_in_stage2_only(clips, stage):
    """Eq. 7-8: L = L_video + L_kvaf + lambda_e * L_EDLS with the fusion trained (stage 2); the tiny preset's
    lambda_e is 0.1. In stage 1 the fusion is frozen, so EDLS is logged and not added."""
    assert eawm.CONFIGS["tiny"].edls_weight == 0.1 and eawm.Config().edls_weight == 1.0
    model = eawm.Model(tiny(stage=stage))
    torch.manual_seed(4)
    loss, parts = model.loss(clips.sample(2, torch.Generator().manual_seed(5)))
    expected = parts["video"] + parts["kvaf"] + (0.1 * parts["edls"] if stage == "stage2" else 0.0)
    assert parts["edls"].item() > 0.5 and loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_color_jitter_is_one_gain_per_clip_and_channel(clips, monkeypatch):
    """The jittered clip over the original, in [0, 1] pixel space, is one constant per clip and channel within
    [1 - j, 1 + j] wherever nothing was clipped; j = 0 is the identity; the loss jitters the frames, not the KVAF."""
    batch = clips.sample(3, torch.Generator().manual_seed(3))
    video = batch["video"]
    out = eawm.color_jitter(video, 0.3, torch.Generator().manual_seed(0))
    x, y = (video + 1) / 2, (out + 1) / 2
    g = 1 + 0.3 * (2 * torch.rand(3, 3, 1, 1, 1, generator=torch.Generator().manual_seed(0)) - 1)
    assert torch.allclose(y, (x * g).clamp(0, 1), atol=1e-6)
    ok = (x > 0.05) & (y < 0.999)
    ratio = torch.where(ok, y / x.clamp_min(1e-6), torch.nan)
    spread = ratio.flatten(2).nan_to_num(1.0).amax(2) - ratio.flatten(2).nan_to_num(1e9).amin(2)
    assert spread.abs().max() < 1e-4                                          # one gain per clip and channel
    assert (g.flatten(1) - 1).abs().max() <= 0.3 and (g.flatten(1) - 1).abs().max() > 0.05
    assert torch.equal(eawm.color_jitter(video, 0.0), video.clamp(-1, 1))
    seen = []
    monkeypatch.setattr(eawm, "color_jitter", lambda v, j: seen.append((v, j)) or v)
    eawm.Model(tiny(color_jitter=0.2)).loss(batch)
    assert len(seen) == 1 and seen[0][1] == 0.2 and seen[0][0] is video
    eawm.Model(tiny()).loss(batch)
    assert len(seen) == 1                                                     # off by default
    with pytest.raises(ValueError, match="color_jitter"):
        eawm.Config(color_jitter=1.0)


def test_random_background_repaints_table_and_wall_away_from_held_out_colours(clips, monkeypatch):
    """Each clip's table and wall pixels (by seg) get one colour each, the same in every frame; nothing else changes;
    no colour comes nearer a held-out one than the training palettes do (hand-computed margins), nor near the
    objects' / arm's colours, nor reaches the arm's darkest channel; and the loss repaints only when asked."""
    from data import toyworld as tw
    # (90,140,170): 50 from (140,140,135); (170,110,150): 30 from (160,140,120); (110,160,110): 30 from (140,140,135);
    # wall (160,200,230): 80 from (170,160,150); (60,40,70): 40 from (75,80,85); (200,200,120): 30 from (185,170,140)
    assert tw.held_out_margins().tolist() == [50, 30, 30, 80, 40, 30]
    batch = clips.sample(3, torch.Generator().manual_seed(4))
    video, seg = batch["video"], batch["seg"]
    out = tw.randomize_background(video, seg, torch.Generator().manual_seed(0))
    colors = tw.random_background_colors(3, torch.Generator().manual_seed(0)) / 127.5 - 1
    px = out.permute(0, 2, 3, 4, 1)                                            # (B, F, H, W, 3)
    for b in range(3):
        for i, sid in enumerate((tw.SEG_TABLE, tw.SEG_WALL)):
            m = seg[b] == sid
            assert m.sum() > 50 and torch.allclose(px[b][m], colors[b, i].expand(int(m.sum()), 3))
    keep = (seg != tw.SEG_TABLE) & (seg != tw.SEG_WALL)
    assert torch.equal(px[keep], video.permute(0, 2, 3, 4, 1)[keep])
    c = tw.random_background_colors(4000, torch.Generator().manual_seed(1)).reshape(-1, 3)
    held = torch.tensor(tw.OOD_TABLE + tw.OOD_WALL).float()
    d_held = (c[:, None] - held).abs().amax(-1).amin(0)                       # nearest sample to each held-out colour
    assert (d_held >= torch.tensor([50, 30, 30, 80, 40, 30])).all() and (d_held <= torch.tensor([55, 35, 35, 85, 45, 35])).all()
    objects = torch.tensor(list(tw.COLORS.values()) + [tw.ARM_COLOR, tw.GRIPPER_COLOR, tw.BIN_COLOR]).float()
    assert (c[:, None] - objects).abs().amax(-1).min() >= 45 and c.amin(-1).max() < 165
    # share < 1: the clips drawn below it repainted exactly as above, the others bit-identical to the input
    g = torch.Generator().manual_seed(0)
    tw.random_background_colors(3, g)
    pick = torch.rand(3, generator=g) < 0.5
    assert 0 < int(pick.sum()) < 3                                            # this seed draws both kinds
    half = tw.randomize_background(video, seg, torch.Generator().manual_seed(0), share=0.5)
    for b in range(3):
        assert torch.equal(half[b], out[b] if pick[b] else video[b])
    seen = []
    monkeypatch.setattr(tw, "randomize_background", lambda v, s, share: seen.append((v, s, share)) or v)
    eawm.Model(tiny(random_background=True)).loss(batch)
    eawm.Model(tiny(random_background=True, random_background_share=0.25)).loss(batch)
    assert [x[2] for x in seen] == [1.0, 0.25] and seen[0][0] is video and seen[0][1] is seg
    eawm.Model(tiny()).loss(batch)
    assert len(seen) == 2                                                     # off by default
    with pytest.raises(ValueError, match="random_background_share"):
        eawm.Config(random_background=True, random_background_share=0.0)
    with pytest.raises(ValueError, match="random_background"):
        eawm.Model(tiny(random_background=True)).loss({k: v for k, v in batch.items() if k != "seg"})


def test_fusion_alignment_follows_the_config_not_token_counts():
    """kvaf=False: the fusion pairs each token with the other stream's mean token even when both streams
    happen to have the same length."""
    assert all(f.aligned for f in eawm.Model(tiny()).fusion.values())
    assert not any(f.aligned for f in eawm.Model(tiny(kvaf=False)).fusion.values())
    torch.manual_seed(0)
    pair, mean = eawm.EventFusion(32, 2, 16, 8, False, aligned=True), eawm.EventFusion(32, 2, 16, 8, False, aligned=False)
    mean.load_state_dict(pair.state_dict())
    hv, hk = torch.randn(1, 6, 32), torch.randn(1, 6, 32)
    from common import grid_positions, rope_3d
    rope = (rope_3d(*grid_positions(1, 2, 3), 16), True)
    assert not torch.allclose(pair(hv, hk, rope, rope)[2], mean(hv, hk, rope, rope)[2])


def test_sample_mode_defaults_to_the_training_setting(clips):
    batch = clips.sample(1, torch.Generator().manual_seed(1))
    model = eawm.Model(tiny(kvaf_cond_prob=0.0))                             # the paper's setting: joint generation
    out = model.sample(batch, steps=1, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(out["kvaf"], model.encode(model.render(batch)))   # generated, not the given KVAF
    with pytest.warns(UserWarning, match="never saw a clean KVAF"):
        model.sample(batch, steps=1, mode="kvaf")
    mixed = eawm.Model(tiny(kvaf_cond_prob=0.5))
    assert torch.equal(mixed.sample(batch, steps=1)["kvaf"], mixed.encode(mixed.render(batch)))


def test_render_colours_depth_over_the_episode_range(clips):
    """Model.render passes the batch's per-episode depth range (App. A.2) to the renderer."""
    model = eawm.Model(tiny())
    batch = clips.sample(2, torch.Generator().manual_seed(3))
    b = 1
    expect = eawm.render_kvaf(model.chain, batch["joints"][b].numpy(), batch["gripper"][b].reshape(-1).numpy(),
                              batch["K"][b].numpy(), batch["T_wc"][b].numpy(), 32, 32,
                              depth_range=tuple(batch["kvaf_depth_range"][b].tolist()))
    got = ((model.render(batch)[b].permute(1, 2, 3, 0) + 1) * 127.5).round().byte().numpy()
    assert np.array_equal(got, expect)


def test_clip_reader_carries_the_kvaf_the_model_renders(clips, toy_data):
    """train.dataset_for renders every frame's KVAF once: a batch's "kvaf" is the model's per-batch rendering,
    pixel for pixel, also for a clip that runs past its episode's end (the last frame repeats)."""
    model = eawm.Model(tiny())
    rows = np.array([0, len(clips) - 1, *torch.randint(len(clips), (6,), generator=torch.Generator().manual_seed(2)).tolist()])
    batch = clips.get(rows)
    assert batch["kvaf"].shape == batch["video"].shape
    assert torch.equal(batch["kvaf"], model.render(batch))
    assert "kvaf" not in train.dataset_for(tiny(kvaf=False), toy_data[1], toy_data[2]).get(rows)   # numeric actions


def test_other_target_tracks_follow_the_expert_to_each_other_object():
    """sample.other_target_tracks: per clip, one track per object that is not named, starting where the clip's own
    track starts; with the named object itself the expert's episode is the clip's own, so renaming the target makes
    the clip's own track one of the 'other' tracks, to the last bit; in the approach the other objects' tracks part from it."""
    from data.toyworld import ClipDataset, generate
    arrays, meta = generate(3, "ood_layout", seed0=100000, res=32)
    clips = ClipDataset(arrays, meta, frames=9, horizon=8)
    rows = np.arange(0, len(clips), 4)
    K, T_wc = np.array(meta["camera"]["K"]), np.array(meta["camera"]["T_wc"])
    own = project(clips.get(rows)["ee_pose"][..., :3].numpy().astype(np.float64), K, T_wc)[0]     # (B, 9, 2)
    tracks = sample.other_target_tracks(clips, rows, K, T_wc)
    for i, r in enumerate(rows):
        e = meta["episodes"][clips.index[r, 0]]
        assert tracks[i].shape == (len(e["shapes"]) - 1, 9, 2)
        assert np.allclose(tracks[i][:, 0], own[i, 0])
    first = [i for i, r in enumerate(rows) if clips.index[r, 1] == 0]
    assert first and all(np.abs(tracks[i] - own[i]).max() > 1.0 for i in first)      # they head elsewhere
    renamed = copy.deepcopy(meta)
    for e in renamed["episodes"]:
        e["target"] = (e["target"] + 1) % len(e["shapes"])
    tracks2 = sample.other_target_tracks(ClipDataset(arrays, renamed, frames=9, horizon=8), rows, K, T_wc)
    assert all(min(np.abs(t - own[i]).max() for t in tracks2[i]) == 0 for i in range(len(rows)))


def test_kvaf_conditioned_generation_uses_the_given_kvaf(clips):
    torch.manual_seed(0)
    model = eawm.Model(tiny())
    batch = clips.sample(2, torch.Generator().manual_seed(1))
    out = model.sample(batch, steps=2, mode="kvaf")
    assert torch.equal(out["kvaf"], model.encode(model.render(batch)))


def test_timestep_weight_is_the_wan_bell():
    from common import bell_weight
    t = torch.tensor([0.5, 0.0, 1.0])
    w = bell_weight(t, shift=5.0)
    assert w[0] == w.max() and w[1] == pytest.approx(w[2].item(), abs=1e-5) and w[1] < 0.05
    grid = torch.linspace(1.0, 0.0, 1001)[:-1]
    from common import shift_t
    assert bell_weight(shift_t(grid, 5.0), 5.0).mean().item() == pytest.approx(1.0, abs=1e-4)


# ------------------------------------------------------------------ full preset


def wan_params(D, F, C_in, C_out, layers, text=4096, freq=256, patch=4):
    """Wan DiT parameter count from its architecture (Wan2.1 `wan/modules/model.py`)."""
    attn = 4 * (D * D + D) + 2 * D
    block = 2 * attn + 2 * D + (D * F + F + F * D + D) + 6 * D
    top = (D * C_in * patch + D) + (text * D + D + D * D + D) + (freq * D + D + D * D + D) + (6 * D * D + 6 * D)
    head = 2 * D + D * patch * C_out + patch * C_out
    return layers * block + top + head


def test_full_preset_matches_wan22_ti2v_5b_on_meta():
    assert wan_params(1536, 8960, 16, 16, 30) == 1_418_996_800          # the formula reproduces Wan2.1-1.3B
    cfg = eawm.CONFIGS["full"]
    with torch.device("meta"):
        model = eawm.Model(cfg)
    n = lambda ps: sum(p.numel() for p in ps)                                # noqa: E731
    video = n(p for name, p in model.video.named_parameters() if ".lora_" not in name)
    assert video == wan_params(3072, 14336, 48, 48, 30)
    lora = n(p for name, p in model.named_parameters() if ".lora_" in name)
    groups = model.param_groups()
    assert video == 4_999_787_712 and model.video.blocks[0].self_attn.q.rank == 32
    kvaf_blocks = n(p for name, p in model.kvaf_blocks.named_parameters() if ".lora_" not in name)
    assert kvaf_blocks == n(p for name, p in model.video.blocks.named_parameters() if ".lora_" not in name)
    assert lora == 161_218_560                                               # r = 32 on both streams' blocks
    assert n(model.fusion.parameters()) == 395_211_205                       # 5 fusion layers (ours)
    assert n(groups[0]["params"]) == 162_407_616                             # stage 1: LoRA + KVAF embedding and head


# ------------------------------------------------------------------ end to end


def test_quick_preset_is_the_tiny_preset_a_third_as_long():
    import dataclasses
    tiny_, quick = eawm.CONFIGS["tiny"], eawm.CONFIGS["quick"]
    differ = {f.name: getattr(quick, f.name) for f in dataclasses.fields(quick) if getattr(tiny_, f.name) != getattr(quick, f.name)}
    assert differ == {"steps": 1000} and tiny_.steps == 3000 and tiny_.lr_schedule == "constant"


def test_train_resume_and_sample_both_modes(toy_data, tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    train.main(["--model", "eawm", "--tiny", "--steps", "4", "--data", toy_data[0], "--out", a] + FAST)
    train.main(["--model", "eawm", "--tiny", "--steps", "4", "--stop-after", "2", "--data", toy_data[0], "--out", b] + FAST)
    train.main(["--model", "eawm", "--resume", b, "--data", toy_data[0], "--out", b] + FAST)
    la = [json.loads(x) for x in open(os.path.join(a, "metrics.jsonl"))]
    lb = [json.loads(x) for x in open(os.path.join(b, "metrics.jsonl"))]
    for key in ("loss", "video", "kvaf", "edls", "grad_norm"):
        assert [r[key] for r in la] == [r[key] for r in lb], key
    # the constant LR: a finished 2-step run continued to 4 steps is the 4-step run (how --resume extends --preset quick into --tiny)
    c = str(tmp_path / "c")
    train.main(["--model", "eawm", "--tiny", "--steps", "2", "--data", toy_data[0], "--out", c] + FAST)
    train.main(["--model", "eawm", "--resume", c, "--steps", "4", "--data", toy_data[0], "--out", c] + FAST)
    lc = [json.loads(x) for x in open(os.path.join(c, "metrics.jsonl"))]
    assert [r["loss"] for r in lc] == [r["loss"] for r in la]
    res = sample.main(["--ckpt", a, "--clips", "4", "--splits", "train", "--steps", "2", "--out", str(tmp_path / "s"),
                       "--threads", "2"])
    row = res["splits"]["train"]
    assert set(row) == {"copy_first", "kvaf", "joint", "true_video", "true_track", "gate"} and np.isfinite(row["kvaf"]["psnr"]) \
        and "ee_track_px" in row["joint"]
    # the event gate of each fusion layer, a sigmoid: its mean in (0, 1), a spread, a correlation in [-1, 1]
    assert set(row["gate"]) == {"1", "3"}
    for g in row["gate"].values():
        assert 0 < g["mean"] < 1 and g["sd"] >= 0 and -1 <= g["corr_event"] <= 1
    assert np.isfinite(row["copy_first"]["psnr"])
    # the references of the joint track: the arm held still (the clips move), and the recovery on the given, true
    # KVAF (the codec is exact, so this is render -> recover_ee_track: a fraction of a pixel at 32 x 32)
    assert row["copy_first"]["ee_track_px"] > 0 and 0 <= row["kvaf"]["ee_track_px"] < 0.5
    assert os.path.getsize(tmp_path / "s" / "generation_train.gif") > 100
    # the still: the GIF's 6th frame in exact colours (the GIF shows it in its palette's nearest colours)
    still = read_png(tmp_path / "s" / "generation_train.png")
    gif = decode_gif(open(tmp_path / "s" / "generation_train.gif", "rb").read())
    pal = C._gif_palette().astype(int)
    assert still.shape == gif.shape[1:] == (3 * 32 * 4, 4 * 32 * 4, 3)              # 3 clips x 4 panels, 32 x 32 at 4x
    assert np.array_equal(pal[((still[..., None, :].astype(int) - pal) ** 2).sum(-1).argmin(-1)], gif[5])
    assert row["joint"]["ee_track_px_se"] >= 0 and 0 <= row["joint"]["ee_detected"] <= 1
    # where a miss goes: against the expert's tracks to the other objects (shares in [0, 1]; thirds without clips NaN)
    assert len(row["joint"]["ee_other_px_thirds"]) == 3 and len(row["true_track"]["ee_other_px_thirds"]) == 3
    assert all(0 <= x <= 1 for x in row["joint"]["closer_to_other_thirds"] if x == x)
    # the track by where the clip starts in its episode: every clip in one third, and the thirds' clip-weighted mean is
    # the overall mean (each clip has as many frames), for the arm held still and for the joint track
    assert sum(row["copy_first"]["clips_thirds"]) == 4
    for mode in ("copy_first", "joint"):                  # joint: clips whose heatmap was never found are left out
        n3, v = row[mode]["clips_thirds"], row[mode]["ee_track_px_thirds"]
        if sum(n3):
            assert sum(n * x for n, x in zip(n3, v) if n) / sum(n3) == pytest.approx(row[mode]["ee_track_px"], rel=1e-9)
    # the arm the video shows (toyworld.fit_arm): on the true frames a fraction of a pixel off (the fit's floor); in
    # both modes a finite error with its standard error, and its thirds weighted by their clips give the mean
    assert 0 <= row["true_video"]["arm_px"] < 0.75
    for mode in ("kvaf", "joint"):
        assert np.isfinite(row[mode]["arm_px"]) and row[mode]["arm_px_se"] >= 0
        n3, v = row["copy_first"]["clips_thirds"], row[mode]["arm_px_thirds"]
        assert sum(n * x for n, x in zip(n3, v) if n) / sum(n3) == pytest.approx(row[mode]["arm_px"], rel=1e-9)


def test_gate_stats_on_hand_values():
    e = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    r = sample.gate_stats(torch.tensor([[0.5, 0.6], [0.7, 0.8]]), e)
    assert r["mean"] == pytest.approx(0.65) and r["sd"] == pytest.approx(0.12909944) and r["corr_event"] == pytest.approx(1.0)
    r = sample.gate_stats(torch.tensor([[0.9, 0.5], [0.5, 0.1]]), e)           # centred: (.4, 0, 0, -.4) . (-1.5, -.5, .5, 1.5)
    assert r["corr_event"] == pytest.approx(-1.2 / np.sqrt(0.32 * 5.0))        #   = -1.2 over sqrt(0.32 * 5)
    assert np.isnan(sample.gate_stats(torch.full((2, 2), 0.3), e)["corr_event"])   # a constant gate: no correlation


@pytest.mark.parametrize("kw", [{}, {"kvaf": False}])
def test_event_gates_reads_the_gate_of_each_fusion_layer(clips, kw):
    """Model.event_gates: the video side's gate sigmoid(W_g e) (Eq. 4) of every fusion layer, one per video token;
    with the gate's weights at 0 and its bias at b, every gate is sigmoid(b); the hooks are removed afterwards."""
    torch.manual_seed(0)
    model = eawm.Model(tiny(**kw))
    batch = clips.sample(2, torch.Generator().manual_seed(1))
    with torch.no_grad():
        for layer, f in model.fusion.items():
            f.gate.weight.zero_()
            f.gate.bias.fill_(float(layer) - 2.0)                                 # layer 1: -1, layer 3: +1
    n_video = int(np.prod(model.cfg.token_grid))
    for mode in ("kvaf", "joint"):
        gates = model.event_gates(batch, generator=torch.Generator().manual_seed(0), mode=mode)
        assert set(gates) == set(model.cfg.fusion_layers)
        for layer, g in gates.items():
            assert g.shape == (2, n_video)                                       # the video side, not the actions'
            assert torch.allclose(g, torch.full_like(g, torch.sigmoid(torch.tensor(layer - 2.0)).item()))
    assert all(not f.gate._forward_hooks for f in model.fusion.values())
    torch.nn.init.normal_(model.fusion["1"].gate.weight)                       # gates that vary by token: in (0, 1)
    g = model.event_gates(batch, mode="kvaf")[1]
    assert g.std() > 0 and ((g > 0) & (g < 1)).all()
    assert eawm.Model(tiny(fusion="plain")).event_gates(batch) == {}          # no gate without the event fusion


def test_episode_thirds_by_where_the_clip_starts():
    class Clips:                                          # two episodes of 24 and 10 frames
        index = np.array([[0, 0], [0, 7], [0, 8], [0, 15], [0, 16], [0, 22], [1, 3], [1, 4], [1, 9]])
        ep_len = np.array([24, 10])
    # 3 s // L: 0, 21 // 24, 24 // 24, 45 // 24, 48 // 24, 66 // 24 -> 2; 9 // 10, 12 // 10, 27 // 10 -> 2
    assert sample.episode_thirds(Clips, np.arange(9)).tolist() == [0, 0, 1, 1, 2, 2, 0, 1, 2]
    assert sample.episode_thirds(Clips, np.array([6, 0])).tolist() == [0, 0]
