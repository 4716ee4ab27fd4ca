"""MV-WAM (mvwam.py): mask oracles, parameterizations, value target, loss structure, rollback,
full-size shapes, and train -> save -> resume -> sample with rollback on the tiny preset."""
import copy
import json
import os

import numpy as np
import pytest
import torch

import mvwam
import sample
import train
from common import to_velocity
from data.toyworld import VOCAB, mc_returns

FAST = ["--batch-size", "4", "--log-every", "100", "--threads", "2", "--set", "ground_steps=0",   # the loop alone,
        "--set", "image_encoder=tiny", "--set", "image_dim=64", "--set", "freeze_video=false"]  # the paper's joint stage


def tiny(**kw):
    """The paper's model at the tiny preset's sizes: the preset's toy-only settings (frozen Video Expert, the position
    read, the image features from the grounded Video Expert, one joint step) off unless kw sets them."""
    cfg = copy.deepcopy(mvwam.CONFIGS["tiny"])
    cfg.vocab = tuple(VOCAB)
    kw = {"freeze_video": False, "action_reads_position": False, "image_encoder": mvwam.Config.image_encoder,
          "image_dim": mvwam.Config.image_dim, "sample_steps": mvwam.Config.sample_steps, **kw}
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def batch_of(B=3, seed=0, cfg=None):
    g = torch.Generator().manual_seed(seed)
    cfg = cfg or tiny()
    return {"video": torch.rand(B, 3, cfg.frames, cfg.height, cfg.width, generator=g) * 2 - 1,
            "state": torch.randn(B, cfg.state_dim, generator=g), "actions": torch.randn(B, cfg.horizon, cfg.action_dim, generator=g),
            "value": torch.rand(B, generator=g), "text": ["pick up the red cube"] * B}


# ------------------------------------------------------------------ the cross-modality causal mask


def layout(model):
    kind, frame, _ = model.token_layout("cpu")
    return kind, frame, mvwam.mot_mask(kind, frame, model.cfg.ground_actions)


def test_causal_action_attention_mask():
    """action_attention="causal": the state sees no action, action k sees the state and actions 0..k;
    video_attention="frame_causal": a video token sees the video tokens of its frame and earlier ones."""
    model = mvwam.Model(tiny(action_attention="causal"))
    kind, frame, _ = model.token_layout("cpu")
    m = mvwam.mot_mask(kind, frame, True, causal_actions=True, causal_video=True)
    S, A = (kind == mvwam.STATE).nonzero().flatten(), (kind == mvwam.ACTION).nonzero().flatten()
    assert m[S[0], S[0]] and not m[S[0]][A].any()
    for k, row in enumerate(A):
        assert m[row][A].tolist() == [j <= k for j in range(len(A))] and m[row, S[0]]
    V = kind == mvwam.VIDEO
    fv = frame[V]
    assert torch.equal(m[V][:, V], fv[None, :] <= fv[:, None]) and not m[V][:, ~V].any()


@pytest.mark.parametrize("actions,video,leaks", [("full", "full", True), ("causal", "full", True),
                                                 ("full", "frame_causal", True), ("causal", "frame_causal", False)])
def test_frame_grounding_through_depth(actions, video, leaks):
    """Changing latent frame 2 must not move actions 0-3 (grounded in frame 1). With the paper's full
    action-to-action attention and Wan's full video attention it does after two layers (through
    actions 4-7 and through frame 1's tokens); only both causal options make the grounding exact."""
    torch.manual_seed(0)
    model = mvwam.Model(tiny(action_attention=actions, video_attention=video))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    b = batch_of(2)
    z = model.encode(b)
    t = torch.tensor([0.5, 0.5])
    text, image = model.text_context(b), model.image_context(b)
    run = lambda zz: model(zz, model.frame_times(t, 3), zz[:, :, :1], b["state"], b["actions"], b["value"], t,  # noqa: E731
                           text, image)[1]
    z2 = z.clone()
    z2[:, :, 2] += 1.0
    a, a2 = run(z), run(z2)
    assert torch.equal(a[:, :4], a2[:, :4]) != leaks
    assert not torch.equal(a[:, 4:], a2[:, 4:])                   # actions 4-7 do see frame 2


@pytest.mark.parametrize("base,text_blocks", [(1, [0, 2, 4]), (0, [1, 3, 5])])
def test_language_in_odd_layers_counted_from_base(base, text_blocks):
    """Sec. 3.1: language in odd layers, image features in even ones; the paper's count starts at 1."""
    model = mvwam.Model(tiny(layer_count_base=base))
    text, image = torch.randn(1, 5, 64), torch.randn(1, 7, 64)
    ctx = model.action.context(text, image)
    assert [i for i, c in enumerate(ctx) if c.shape[1] == 5] == text_blocks


def test_mask_rows_by_modality():
    model = mvwam.Model(tiny())
    kind, frame, m = layout(model)
    T, h, w = model.cfg.token_grid
    V, S, A, VAL = (kind == mvwam.VIDEO), (kind == mvwam.STATE), (kind == mvwam.ACTION), (kind == mvwam.VALUE)
    assert V.sum() == T * h * w and S.sum() == 1 and A.sum() == model.cfg.horizon and VAL.sum() == 1
    assert m[V][:, V].all() and not m[V][:, ~V].any()            # video rows: video columns only
    assert m[VAL].all()                                           # value rows: everything
    assert not m[S | A][:, VAL].any()                             # no state/action row sees the value
    assert m[S | A][:, S | A].all()                               # state/action see each other


def test_action_k_sees_exactly_frames_up_to_its_grounded_frame():
    model = mvwam.Model(tiny())
    kind, frame, m = layout(model)
    q, V = model.cfg.latent_q, kind == mvwam.VIDEO
    video_frame = frame[V]
    for k, row in enumerate(torch.nonzero(kind == mvwam.ACTION).flatten()):
        grounded = 1 + k // q                                     # action k makes raw frame k+1 -> latent frame 1 + k//q
        assert torch.equal(m[row][V], video_frame <= grounded), k
    state_row = torch.nonzero(kind == mvwam.STATE).flatten()[0]
    assert torch.equal(m[state_row][V], video_frame == 0)          # the state sees the current frame only
    m_free = mvwam.mot_mask(kind, frame, ground=False)             # grounding off: all video
    assert m_free[kind == mvwam.ACTION][:, V].all()


def test_action_rope_positions_are_scaled_by_a_quarter():
    model = mvwam.Model(tiny())
    kind, _, (t, y, x) = model.token_layout("cpu")
    ta = t[kind == mvwam.ACTION]
    assert torch.allclose(ta, 1 + 0.25 * torch.arange(model.cfg.horizon, dtype=torch.float64))
    T, h, w = model.cfg.token_grid
    assert (y[kind != mvwam.VIDEO] == (h - 1) / 2).all() and t[kind == mvwam.STATE].item() == 0


# ------------------------------------------------------------------ objectives and parameterizations


@pytest.mark.parametrize("steps", [1, 3, 5])
def test_near_perfect_predictor_samples_well_for_every_target(steps):
    """A predictor that knows the true chunk and errs by 1 % (of a unit-variance target) must give an
    action error of the order of that 1 % for x0, v and eps alike. Starting eps at t = 1 (eps_t_max=1,
    the old sampler) divides the error by 1 - t = 1e-3 instead."""
    torch.manual_seed(0)
    a_true = torch.randn(4, 8, 4)

    def oracle(target):
        def forward(z_t, t_video, z_cond, state, a_t, c_t, t_act, text, image, with_action=True, clip=None):
            t = t_act[:, None, None]
            eps = (a_t - (1 - t) * a_true) / t                    # the noise that gives a_t from a_true at t
            pred = {"x0": a_true, "v": eps - a_true, "eps": eps}[target]
            return torch.zeros_like(z_t), pred + 0.01 * torch.randn_like(pred), torch.zeros_like(c_t)
        return forward

    err = {}
    for target, t_max in (("x0", 0.0), ("v", 0.0), ("eps", 0.0), ("eps", 1.0)):
        model = mvwam.Model(tiny(action_target=target, eps_t_max=t_max))
        model.forward = oracle(target)
        out = model.sample(batch_of(4), steps=steps, generator=torch.Generator().manual_seed(1))
        err[(target, t_max)] = (out["actions"] - a_true).pow(2).mean().sqrt().item()
    for key in (("x0", 0.0), ("v", 0.0), ("eps", 0.0)):
        assert err[key] < 0.03, (key, err)
    if steps == 1:
        assert err[("eps", 1.0)] > 1.0                            # the artefact the clipped grid removes


def test_x0_to_velocity_and_last_step_lands_on_x0():
    x0, noise, t = torch.tensor([0.2, -1.0]), torch.tensor([1.0, 0.5]), torch.tensor(0.25)
    x_t = (1 - t) * x0 + t * noise                                # Eq. 6
    v = to_velocity(x0, x_t, t, "x0")                             # Table 6: (x_t - x0_hat) / t
    assert torch.allclose(v, noise - x0)                          # a perfect x0 gives the true velocity
    assert torch.allclose(x_t + (0 - t) * v, x0)                  # an Euler step to t = 0 lands on x0_hat
    eps_v = to_velocity(noise, x_t, t, "eps")                     # (eps_hat - x_t) / (1 - t)
    assert torch.allclose(eps_v, noise - x0)


def test_flow_loss_targets_have_no_time_weight():
    x0, noise = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 0.0]])
    pred = torch.tensor([[0.0, 0.0]])
    assert mvwam.flow_loss(pred, x0, noise, "x0").item() == pytest.approx(2.5)      # mean((0-1)^2, (0-2)^2), no 1/t^2
    assert mvwam.flow_loss(pred, x0, noise, "v").item() == pytest.approx(2.5)       # v = noise - x0 = (-1, -2)
    assert mvwam.flow_loss(pred, x0, noise, "eps").item() == 0.0


def test_mc_returns_eq4_hand_example():
    """c_t = sum_i gamma^i r_{t+i}: sparse reward 1 at the last step, gamma = 0.99."""
    r = np.array([0, 0, 0, 1.0])
    assert np.allclose(mc_returns(r, 0.99), [0.99 ** 3, 0.99 ** 2, 0.99, 1.0])


def test_video_loss_ignores_actions_but_action_loss_sees_video():
    torch.manual_seed(0)
    model = mvwam.Model(tiny())
    with torch.no_grad():                                         # heads start at zero: perturb so outputs depend on inputs
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    b = batch_of()

    def parts(batch):
        torch.manual_seed(7)
        return model.loss(batch)[1]
    base = parts(b)
    other_actions = dict(b, actions=torch.randn_like(b["actions"]), value=torch.rand_like(b["value"]))
    changed = parts(other_actions)
    assert torch.equal(base["video"], changed["video"])
    assert not torch.equal(base["action"], changed["action"])
    video2 = b["video"].clone()
    video2[:, :, 1:] = -video2[:, :, 1:]                          # change the future frames only
    changed = parts(dict(b, video=video2))
    assert not torch.equal(base["action"], changed["action"]) and not torch.equal(base["value"], changed["value"])


def test_video_only_pass_equals_the_joint_pass():
    """The mask makes the video expert's output independent of the action-value expert."""
    torch.manual_seed(0)
    model = mvwam.Model(tiny())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    b = batch_of(2)
    z = model.encode(b)
    T = z.shape[2]
    t = torch.tensor([0.3, 0.8])
    text, image = model.text_context(b), model.image_context(b)
    args = (z, model.frame_times(t, T), z[:, :, :1], b["state"], b["actions"], b["value"], t, text, image)
    joint = model(*args, with_action=True)[0]
    alone = model(*args, with_action=False)[0]
    assert torch.allclose(joint, alone, atol=1e-5)


@pytest.mark.parametrize("target", ["x0", "v", "eps"])
def test_loss_finite_with_gradients_per_stage(target):
    torch.manual_seed(0)
    model = mvwam.Model(tiny(action_target=target))
    groups = {g["name"]: g["params"] for g in model.param_groups()}
    assert set(groups) == {"video", "action_value"}
    loss, parts = model.loss(batch_of())
    assert set(parts) == {"video", "action", "value"} and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for g in groups.values() for p in g)


def test_video_stage_trains_the_video_expert_alone():
    model = mvwam.Model(tiny(stage="video"))
    groups = model.param_groups()
    assert [g["name"] for g in groups] == ["video"]
    b = batch_of()
    loss, parts = model.loss({"video": b["video"], "text": b["text"]})   # action-free clip: video + text only
    assert set(parts) == {"video"}
    loss.backward()
    assert all(p.grad is None for p in model.action.parameters())


def test_freeze_video_trains_the_action_value_expert_alone_with_the_same_gradients():
    """freeze_video: no video loss, only action-value expert + image encoder trainable, and their gradients
    equal those of the full joint loss (the video rows run outside autograd; the mask makes that exact up to float
    rounding)."""
    grads, parts = {}, {}
    for frozen in (False, True):
        torch.manual_seed(0)
        model = mvwam.Model(tiny(freeze_video=frozen))
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        names = [g["name"] for g in model.param_groups()]
        torch.manual_seed(1)
        loss, parts[frozen] = model.loss(batch_of())
        loss.backward()
        grads[frozen] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        assert names == (["action_value"] if frozen else ["video", "action_value"])
    assert set(parts[True]) == {"action", "value"}
    for k in ("action", "value"):        # equal up to float summation order (the frozen video rows run as their own matmuls)
        torch.testing.assert_close(parts[True][k], parts[False][k], rtol=1e-6, atol=1e-7)
    assert grads[True] and all(n.startswith(("action.", "image_encoder.")) for n in grads[True])
    for n, g in grads[True].items():      # float rounding scales with the tensor (a key bias's gradient is ~0: rounding only)
        ref = grads[False][n]
        torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-7 + 1e-6 * ref.abs().max().item(), msg=lambda m, n=n: f"{n}: {m}")
    assert not tiny(freeze_video=True, stage="ground").video_frozen      # stage ground trains the video expert


def test_action_reads_position_changes_only_what_the_action_rows_read():
    """action_reads_position (ours, toy): a learned map of each video token's sin-cos (t, h, w) code is added to the
    video values the action rows read. The video output is the plain model's; the actions equal the plain
    model's while the per-layer maps are zero and differ once they are not."""
    torch.manual_seed(0)
    plain = mvwam.Model(tiny())
    with torch.no_grad():                                                 # off the zero-initialized output heads
        for p in plain.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model = mvwam.Model(tiny(action_reads_position=True))
    missing, unexpected = model.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("action.video_position.") for k in missing)
    b = batch_of()
    z = model.encode(b)
    args = (z, model.frame_times(torch.full((3,), 0.6), z.shape[2]), z[:, :, :1], b["state"], b["actions"], b["value"],
            torch.full((3,), 0.6), model.text_context(b), model.image_context(b))
    with torch.no_grad():
        for m in model.action.video_position:
            m.weight.zero_()
        ref, ours = plain(*args), model(*args)
        assert torch.allclose(ours[0], ref[0], atol=1e-6) and torch.allclose(ours[1], ref[1], atol=1e-6)
        for m in model.action.video_position:
            m.weight.normal_(0, 0.5)
        ours = model(*args)
    assert torch.allclose(ours[0], ref[0], atol=1e-6)                                # the video rows read theirs
    assert (ours[1] - ref[1]).abs().max() > 1e-3                                       # the action rows read the maps


def test_grounded_image_encoder_reads_the_frozen_video_expert_in_one_pass():
    """image_encoder="grounded" (ours, toy; the tiny preset's): the action rows' image features are video block
    ground_layer's current-frame tokens plus a position map through one self-attention layer. Computed inside the
    joint pass from its own video rows, they give what the same features from a separate video-only pass of that
    start give; they depend on the instruction (the grounded Video Expert reads it, a SigLIP2 stand-in would not);
    the loss trains the reader and leaves the Video Expert without gradients; the config refuses a size mismatch
    and a trained Video Expert."""
    torch.manual_seed(0)
    cfg = tiny(freeze_video=True, action_reads_position=True, image_encoder="grounded", image_dim=96)
    model = mvwam.Model(cfg)
    with torch.no_grad():                                                 # off the zero-initialized output heads
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    b = batch_of(cfg=cfg)
    z = model.encode(b)
    B, T, layer = z.shape[0], z.shape[2], cfg.ground_layer % cfg.layers
    start = torch.cat([z[:, :, :1], torch.randn_like(z[:, :, 1:])], 2)    # Model.sample's start
    t1 = model.frame_times(torch.ones(B), T)
    assert model.image_context(b) is None

    def image_of(batch):
        tokens, _, _ = model(start, t1, z[:, :, :1], None, None, None, None, model.text_context(batch), None,
                             with_action=False, upto=layer)
        return model.grounded_image(tokens)

    with torch.no_grad():
        image = image_of(b)
        args = (start, t1, z[:, :, :1], b["state"], b["actions"], b["value"], torch.full((B,), 0.6), model.text_context(b))
        one_pass, two_passes = model(*args, None), model(*args, image)
        other_words = image_of(dict(b, text=["put the blue ball in the bin"] * B))
    for x, y in zip(one_pass, two_passes):
        assert torch.allclose(x, y, atol=1e-5)
    assert image.shape == (B, 64, cfg.video_dim) and (other_words - image).abs().max() > 1e-3
    model.param_groups()
    model.loss(b)[0].backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n.startswith(("video.", "text_encoder.")))
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.image_encoder.parameters())
    with pytest.raises(ValueError, match="image_dim = video_dim"):
        mvwam.Config(image_encoder="grounded", freeze_video=True)
    with pytest.raises(ValueError, match="freeze_video=true"):
        mvwam.Config(image_encoder="grounded", image_dim=96)


def test_full_presets_carry_both_stage_recipes():
    """Sec. 4.1: Video Expert pre-training with batch 1024 for 20k steps, then joint fine-tuning with
    batch 512 for 15k steps, LR 1e-4, weight decay 1e-2 in both."""
    video, joint = mvwam.CONFIGS["full_video"], mvwam.CONFIGS["full"]
    assert (video.stage, video.batch_size, video.steps) == ("video", 1024, 20000)
    assert (joint.stage, joint.batch_size, joint.steps) == ("joint", 512, 15000)
    for c in (video, joint):
        assert (c.lr_video, c.weight_decay, c.layers, c.video_dim) == (1e-4, 1e-2, 30, 1536)
        assert (c.freeze_video, c.action_reads_position, c.sample_steps) == (False, False, 5)   # the toy's settings off


def test_frozen_wide_preset_is_the_tiny_run_longer_on_more_demos():
    """README's longer MV-WAM recipe: --tiny with --episodes 1000, ground_steps=600 and --steps 5000, nothing else; the
    tiny preset's expert is the wider one (act_width=128, act_ffn=512, act_cross_heads=4, 900 steps), and --preset
    narrow is the previous default run (the base width, 1,000 steps)."""
    import dataclasses

    def changed(a, b):
        return {f.name: getattr(b, f.name) for f in dataclasses.fields(b) if getattr(a, f.name) != getattr(b, f.name)}
    tiny, wide, narrow = mvwam.CONFIGS["tiny"], mvwam.CONFIGS["frozen_wide"], mvwam.CONFIGS["narrow"]
    assert changed(tiny, wide) == {"ground_steps": 600, "toy_episodes": 1000, "steps": 5000}
    assert changed(tiny, narrow) == {"act_width": 64, "act_ffn": 256, "act_cross_heads": 2, "steps": 1000}
    base = mvwam.Config()
    assert (tiny.act_width, tiny.act_ffn, tiny.act_cross_heads, tiny.steps) == (128, 512, 4, 900)
    assert (narrow.act_width, narrow.act_ffn, narrow.act_cross_heads) == (base.act_width, base.act_ffn, base.act_cross_heads)
    args = train.get_args(["--model", "mvwam", "--preset", "frozen_wide"])
    assert train.toy_episodes(args, wide) == 1000 and train.toy_episodes(args, tiny) == 400
    folder, world = train.default_data_folder(wide, train.toy_episodes(args, wide))
    assert folder.endswith("close_near_1000") and world == {"view": "close", "distractor_band": "near"}
    cfg = copy.deepcopy(wide)
    cfg.vocab = tuple(VOCAB)
    torch.manual_seed(0)
    model = mvwam.Model(cfg)                                 # the wider expert builds and trains on the frozen Video Expert
    loss, parts = model.loss(batch_of(cfg=cfg))
    loss.backward()
    assert torch.isfinite(loss) and model.action.blocks[0].ffn[0].out_features == 512
    assert all(p.grad is None for p in model.video.parameters())


def test_no_value_variant_and_independent_t():
    model = mvwam.Model(tiny(use_value=False, independent_t=True))
    loss, parts = model.loss(batch_of())
    assert set(parts) == {"video", "action"}
    out = model.sample(batch_of(2), steps=2)
    assert out["value"] is None and out["actions"].shape == (2, 8, 4)


def test_sample_shapes_and_condition_frame():
    torch.manual_seed(0)
    model = mvwam.Model(tiny())
    b = batch_of(2)
    out = model.sample(b, steps=3, generator=torch.Generator().manual_seed(0))
    assert out["actions"].shape == (2, 8, 4) and out["value"].shape == (2,)
    z0 = model.encode({"video": b["video"][:, :, :1]})
    assert out["video_latents"].shape == (2, 48, 3, 16, 16) and torch.equal(out["video_latents"][:, :, :1], z0)
    frames = model.decode(out["video_latents"])
    assert frames.shape == (2, 3, 9, 32, 32)


def test_bad_shapes_are_named():
    model = mvwam.Model(tiny())
    b = batch_of()
    with pytest.raises(ValueError, match=r"batch\['actions'\].*expected"):
        model.loss(dict(b, actions=b["actions"][:, :5]))
    with pytest.raises(ValueError, match="action_target"):
        mvwam.Config(action_target="score")


# ------------------------------------------------------------------ rollback (Sec. 3.2)


def test_rollback_controller_peak_delta_and_cap():
    rb = mvwam.ValueRollback(delta=0.2, max_rollbacks=2)
    assert rb.check("s0", 0.5) is None
    assert rb.check("s1", 0.9, "a1") is None                      # new peak at s1
    assert rb.check("s2", 0.75) is None                           # within delta of the peak
    assert rb.check("s3", 0.69) == "s1"                           # 0.69 < 0.9 - 0.2: back to the peak's state
    assert [e[0] for e in rb.buffer] == ["s0", "s1"]              # the abandoned branch (s2) left the buffer
    assert rb.buffer[1] == ("s1", "a1", 0.9)                      # (state, action, value) triplets
    assert rb.check("s4", 0.1) == "s1"
    assert rb.check("s5", 0.1) is None                            # cap reached: recorded instead
    assert rb.buffer[-1][0] == "s5"
    rb.reset()
    assert rb.count == 0 and len(rb.buffer) == 0 and rb.check("x", 0.0) is None


def test_rollback_buffer_is_rolling_and_the_peak_is_read_from_it():
    """The buffer keeps the last `size` triplets; c_peak is the best value still in it, so an old peak
    that rolled out can no longer be restored (or trigger a rollback)."""
    rb = mvwam.ValueRollback(delta=0.2, max_rollbacks=5, size=3)
    for i, v in enumerate([0.7, 0.6, 0.6, 0.6]):                  # 0.7 at s0 rolls out after three more entries
        assert rb.check(f"s{i}", v) is None
    assert len(rb.buffer) == 3 and rb.peak == 0.6
    assert rb.check("s4", 0.45) is None                           # 0.45 >= 0.6 - 0.2 (but < 0.7 - 0.2): no rollback
    assert rb.check("s5", 0.3) == "s2"                            # buffer s2, s3, s4: the first best entry


def test_rollback_restores_the_saved_env_state():
    """A fake policy whose value collapses after the first chunk: the env goes back to the state of the
    peak (objects, robot, stages), with the clock still running."""
    class FakePolicy:
        def __init__(self):
            self.calls = 0

        def act(self, frames, states, texts, generator):
            self.calls += 1
            n = len(frames)
            value = np.full(n, 1.0 if self.calls == 1 else 0.0)
            return {"actions": np.tile(np.array([0.1, 0.1, 0.0, 0.0]), (n, 4, 1)), "value": value}

    success, stages, rec, fired = sample.rollout(FakePolicy(), "train", 1, 3, 4, 12, 32, torch.Generator(), record=1,
                                                 rollback=lambda: mvwam.ValueRollback(0.2, 1))
    assert fired[0] == 1 and stages[0]["rollback_steps"] == [(4, 0)]     # fired at step 4, back to the start
    # recorded frames: start, 4 steps, the restored frame (red border), 4 + 4 more steps until the clock runs out
    first, moved, restored = rec[0][0][:, :32], rec[0][4][:, :32], rec[0][5][:, :32]
    assert (restored[0, :] == [255, 0, 0]).all()                  # outlined in red
    assert not np.array_equal(moved, first)                       # the arm had moved
    assert np.array_equal(restored[1:-1, 1:-1], first[1:-1, 1:-1])  # back to the peak = the initial state
    assert len(rec[0]) == 1 + 4 + 1 + 8                           # the clock kept running: 12 steps in all


# ------------------------------------------------------------------ full preset


def test_full_preset_shapes_on_meta():
    cfg = mvwam.CONFIGS["full"]
    with torch.device("meta"):
        model = mvwam.Model(cfg)
    n = lambda m: sum(p.numel() for p in m.parameters())          # noqa: E731
    wan_1_3b = 1_418_996_800                                      # Wan2.1-T2V-1.3B, the published count
    assert n(model.video) == wan_1_3b + (36 - 16) * 1536 * 2 * 2  # + the 36-channel I2V patch embedding
    assert model.video.patch_embedding.weight.shape == (1536, 36, 1, 2, 2)
    assert model.action.blocks[0].self_attn.q.weight.shape == (1536, 768)      # 768 -> the 1536 shared attention
    assert model.action.blocks[0].self_attn.o.weight.shape == (768, 1536)
    assert n(model.action) == 430_437_249                         # our action-value expert (FFN 4480, see Config)
    assert n(model) == 1_849_556_929                              # the paper: "1.9B" without umT5 and SigLIP2


def test_wan_key_names():
    keys = set(mvwam.Model(tiny()).video.state_dict())
    for k in ("patch_embedding.weight", "text_embedding.0.weight", "text_embedding.2.weight", "time_embedding.0.weight",
              "time_projection.1.weight", "blocks.0.modulation", "blocks.0.self_attn.q.weight", "blocks.0.self_attn.norm_q.weight",
              "blocks.0.cross_attn.o.bias", "blocks.0.norm3.weight", "blocks.0.ffn.0.weight", "blocks.0.ffn.2.bias",
              "head.modulation", "head.head.weight"):
        assert k in keys, k


# ------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def mv_run(toy_data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("mv6"))
    train.main(["--model", "mvwam", "--tiny", "--steps", "6", "--data", toy_data[0], "--out", out] + FAST)
    return out


def test_train_resume_bit_exact_and_sample_with_rollback(mv_run, toy_data, tmp_path):
    out = str(tmp_path / "split")
    train.main(["--model", "mvwam", "--tiny", "--steps", "6", "--stop-after", "3", "--data", toy_data[0], "--out", out] + FAST)
    train.main(["--model", "mvwam", "--resume", out, "--data", toy_data[0], "--out", out] + FAST)
    a = [json.loads(x) for x in open(os.path.join(mv_run, "metrics.jsonl"))]
    b = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    for key in ("loss", "video", "action", "value", "lr", "grad_norm"):
        assert [r[key] for r in a] == [r[key] for r in b], key
    _, m1, _, _ = train.load_model(mv_run, expect="mvwam")
    _, m2, _, _ = train.load_model(out)
    assert all(torch.equal(x, y) for x, y in zip(m1.state_dict().values(), m2.state_dict().values()))
    with pytest.raises(ValueError, match="model 'mvwam'"):
        train.load_model(mv_run, expect="agra")
    # delta = -1 makes every check after the first fire (value < peak + 1): chunks start at steps 0, 4, 8,
    # 12 of the 16, so each episode rolls back at 4, 8 and 12 = max_rollbacks times, and the GIF is written
    res = sample.main(["--ckpt", mv_run, "--episodes", "2", "--splits", "train", "--rollback", "--rollback-delta", "-1",
                       "--diag-clips", "8", "--out", str(tmp_path / "s"), "--threads", "2", "--max-steps", "16"])
    row = res["splits"]["train"]
    assert 0 <= row["success"] <= 1 and 0 <= row["success_rollback"] <= 1
    assert res["rollback_delta"] == -1 and row["rollbacks_per_episode"] == 3 and row["rollback_episodes"] == 2
    assert os.path.getsize(tmp_path / "s" / "rollback_train.gif") > 100
    v = res["value"]["train"]
    assert -1 <= v["pearson"] <= 1 and 0 <= v["holding_auc"] <= 1 and v["n_holding"] == 8
    assert "distractor_grasped" in row
    assert os.path.getsize(tmp_path / "s" / "rollout_train.gif") > 100


def test_the_rollback_pass_repeats_the_plain_pass_noise(mv_run, tmp_path, monkeypatch):
    """--rollback runs each split twice from the same noise (--seed), so where no rollback fires the two passes are
    the same episodes, the plain pass's figures are those of a run without --rollback, and the value diagnostics
    do not depend on the passes before them (the chunks here are the noise: the draws are the oracle)."""
    from conftest import noise_policy
    draws = []
    monkeypatch.setattr(sample, "Policy", noise_policy(draws))
    flags = ["--ckpt", mv_run, "--episodes", "2", "--max-steps", "16", "--diag-clips", "8", "--threads", "2"]
    plain = sample.main(flags + ["--splits", "ood_object", "--out", str(tmp_path / "a")])
    first = [d.copy() for d in draws]
    assert len(first) == 4                                      # 16 steps, re-planned every 4
    draws.clear()
    rb = sample.main(flags + ["--splits", "train", "ood_object", "--rollback", "--out", str(tmp_path / "b")])
    assert len(draws) == 16 and all(np.array_equal(a, b) for a, b in zip(draws, first * 4))   # 2 splits x 2 passes
    row = rb["splits"]["ood_object"]
    assert row["rollbacks_per_episode"] == 0 and row["success_rollback"] == row["success"]
    assert {k: row[k] for k in plain["splits"]["ood_object"]} == plain["splits"]["ood_object"]
    assert rb["value"]["ood_object"] == plain["value"]["ood_object"]
    assert row["rollback_won"] == row["rollback_lost"] == 0


def test_rollback_won_and_lost_are_paired_by_episode(mv_run, tmp_path, monkeypatch):
    def fake_rollout(policy, split, episodes, *args, rollback=None, **kw):
        s = np.array([1, 1, 0, 0] if rollback is None else [1, 0, 1, 1], bool)    # episode 1 lost, 2 and 3 won
        stages = [dict(reached=x, grasped=x, lifted=x, distractor_grasped=False, close_miss=None, close_toward=None,
                       same_color=False) for x in s]
        if rollback is not None:                                  # (step fired at, step restored) per rollback
            for st, steps in zip(stages, ([], [(12, 4), (20, 8)], [(30, 10)], [(40, 20)])):
                st["rollback_steps"] = steps
        frames = [[np.zeros((32, 64, 3), np.uint8)] for _ in s]
        return s, stages, frames, np.array([0, 0, 0, 0] if rollback is None else [0, 2, 1, 1])   # fired in 1, 2, 3
    monkeypatch.setattr(sample, "rollout", fake_rollout)
    row = sample.main(["--ckpt", mv_run, "--episodes", "4", "--splits", "train", "--rollback", "--diag-clips", "0",
                       "--gif-episodes", "0", "--out", str(tmp_path)])["splits"]["train"]
    assert (row["success"], row["success_rollback"], row["rollback_won"], row["rollback_lost"]) == (0.5, 0.75, 0.5, 0.25)
    assert row["rollbacks_per_episode"] == 1.0 and row["rollback_episodes"] == 3
    assert row["rollback_fired_failing"] == pytest.approx(2 / 3)
    assert (row["rollback_fire_step"], row["rollback_restore_step"]) == (25, 9)   # medians over the four rollbacks                  # 1 succeeds without rollback, 2 and 3 fail


def test_auc_oracle():
    assert sample.auc([0.9, 0.8], [0.1, 0.2]) == 1.0                     # every pair ordered
    assert sample.auc([0.1], [0.9]) == 0.0
    assert sample.auc([0.5, 0.5], [0.5]) == 0.5                          # ties count 1/2
    assert sample.auc([0.3, 0.7], [0.5]) == 0.5                          # one of two pairs ordered


def test_ground_stage_readout_oracle_gradients_and_init_into_joint(toy_data):
    """Stage "ground" for the Video Expert (ours, toy only; AGRA's grounded start): with a zero readout
    every current-frame token scores the same, so the cross-entropy against the named object's token share
    is log(64) (8 x 8 tokens) for every sample that shows the object; it trains the Video Expert, the text
    encoder and the readout at lr_head only; it needs the named object's mask; its readout is dropped when
    the joint stage starts from it."""
    from common import load_state_dict_strict
    cfg = tiny(stage="ground", lr_video=1e-4, lr_head=1e-3)
    batch = train.dataset_for(cfg, toy_data[1], toy_data[2]).sample(4, torch.Generator().manual_seed(0))
    assert batch["target_mask"].flatten(1).any(1).all()
    torch.manual_seed(0)
    model = mvwam.Model(cfg)
    groups = model.param_groups()
    assert [(g["name"], g["lr"]) for g in groups] == [("video", 1e-3)]              # the stand-in for pretraining
    assert {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad} == {"video", "text_encoder", "ground_head"}
    with torch.no_grad():
        model.ground_head.weight.zero_()
        model.ground_head.bias.zero_()
    loss, parts = model.loss(batch)
    assert set(parts) == {"ground", "ground_hit"} and loss.item() == pytest.approx(np.log(64), rel=1e-5)
    with torch.no_grad():
        model.ground_head.weight.normal_()
    model.loss(batch)[0].backward()
    assert model.text_encoder.embed.weight.grad.abs().sum() > 0                     # the words are trained
    assert model.video.blocks[0].self_attn.q.weight.grad.abs().sum() > 0             # the Video Expert too
    assert all(p.grad is None for p in model.video.head.parameters())               # the readout replaces its head
    assert all(p.grad is None for p in model.action.parameters())
    with pytest.raises(ValueError, match="target_mask"):
        model.loss({k: v for k, v in batch.items() if k != "target_mask"})
    joint = mvwam.Model(tiny())
    assert not hasattr(joint, "ground_head") and model.init_ignore == ()
    with pytest.raises(ValueError, match="unexpected 2 key"):
        load_state_dict_strict(joint, model.state_dict())
    load_state_dict_strict(joint, model.state_dict(), ignore=joint.init_ignore)
    assert torch.equal(joint.video.blocks[0].self_attn.q.weight, model.video.blocks[0].self_attn.q.weight)


def test_ground_readout_stops_at_its_block():
    """ground_layer picks the block: the tokens after block 2 do not depend on blocks 3-5 (Model.forward upto)."""
    torch.manual_seed(0)
    model = mvwam.Model(tiny(stage="ground", ground_layer=2))
    b = batch_of(2)
    z = model.encode(b)
    args = (z, model.frame_times(torch.ones(2), z.shape[2]), z[:, :, :1], None, None, None, None, model.text_context(b), None)
    a = model(*args, with_action=False, upto=2)[0]
    with torch.no_grad():
        for blk in model.video.blocks[3:]:
            for p in blk.parameters():
                p.add_(1.0)
    assert torch.equal(a, model(*args, with_action=False, upto=2)[0]) and a.shape == (2, 64, 96)   # frame 0's tokens


@pytest.mark.parametrize("stage", ["ground", "joint"])
def test_last_block_computes_only_the_rows_read(monkeypatch, stage):
    """Stage ground and training on the frozen Video Expert read, of the last video block they run, the current
    frame's tokens (and, joint, every token's keys and values) alone, and compute only those rows (video_rows
    keep): the loss and gradients equal those of the whole block's rows, then sliced (bit for bit in the joint stage,
    where the block runs without gradients; to float rounding in stage ground, whose backward sums fewer rows)."""
    cfg = copy.deepcopy(mvwam.CONFIGS["tiny"])
    cfg.vocab, cfg.stage = tuple(VOCAB), stage
    torch.manual_seed(0)
    model = mvwam.Model(cfg)
    b = batch_of(cfg=cfg)
    b["target_mask"] = (torch.rand(3, cfg.height, cfg.width, generator=torch.Generator().manual_seed(2)) > 0.8).float()
    pruned, calls = mvwam.video_rows, []

    def whole_rows(*args):                       # the block over every row, then the rows kept
        calls.append(args[7] if len(args) > 7 else None)
        xv, kv, vv = pruned(*args[:7])
        return (xv if calls[-1] is None else xv[:, :calls[-1]]), kv, vv

    out = {}
    for name in ("pruned", "whole"):
        if name == "whole":
            monkeypatch.setattr(mvwam, "video_rows", whole_rows)
        torch.manual_seed(1)
        loss, _ = model.loss(b)
        loss.backward()
        out[name] = loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
    assert calls == ([64] if stage == "ground" else [None] * 5 + [64])  # the last block keeps frame 0's 8 x 8 tokens
    if stage == "joint":
        assert torch.equal(out["pruned"][0], out["whole"][0])
        assert all(torch.equal(g, out["whole"][1][n]) for n, g in out["pruned"][1].items())
    else:
        torch.testing.assert_close(out["pruned"][0], out["whole"][0], rtol=1e-6, atol=0)
        for n, g in out["pruned"][1].items():
            torch.testing.assert_close(g, out["whole"][1][n], rtol=1e-4, atol=1e-6)
    assert out["pruned"][1].keys() == out["whole"][1].keys()



def test_tiny_preset_grounds_then_trains_the_action_value_expert_on_the_frozen_video_expert(toy_data, tmp_path):
    """--tiny: stage ground into <out>/ground, then the joint stage with freeze_video: the Video Expert and text
    encoder keep the ground stage's weights, the action-value expert trains, no video loss is logged; sample.py's
    default is one joint step. Without a start, freeze_video refuses to run."""
    out = str(tmp_path / "mv")
    quick = ["--batch-size", "2", "--log-every", "100", "--threads", "2", "--data", toy_data[0]]
    train.main(["--model", "mvwam", "--tiny", "--steps", "2", "--set", "ground_steps=2", "--out", out] + quick)
    _, ground, _, _ = train.load_model(os.path.join(out, "ground"))
    _, model, cfg, meta = train.load_model(out)
    assert cfg.video_frozen and cfg.sample_steps == 1 and meta["step"] == 2
    g = ground.state_dict()
    for n, p in model.state_dict().items():
        if n.startswith(("video.", "text_encoder.")):
            assert torch.equal(p, g[n]), n
    assert any(not torch.equal(p, g[n]) for n, p in model.state_dict().items() if n.startswith("action."))
    logged = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    assert all("video" not in r and "action" in r for r in logged)
    with pytest.raises(SystemExit, match="freeze_video"):
        train.main(["--model", "mvwam", "--tiny", "--steps", "1", "--set", "ground_steps=0", "--out", str(tmp_path / "x")]
                   + quick)
