"""AGRA: oracles for the bridge indices, the AGRA loss, teacher interpolation, the t = 1 pass,
gradient flow per stage, the diagnostics; full-preset sizes and the Cosmos key map."""

import math

import pytest
import torch

import agra
from data.toyworld import ClipDataset
from conftest import tiny_config


def tiny_cfg(**kw):
    return tiny_config(agra, **kw)


@pytest.fixture(scope="module")
def batch(toy_data):
    _, arrays, meta = toy_data
    cfg = tiny_cfg()
    ds = ClipDataset(arrays, meta, cfg.frames, cfg.horizon, cfg.latent_q, cfg.teacher_patch, cfg.teacher_dim)
    return ds.sample(4, torch.Generator().manual_seed(0))


def test_bridge_layers_app_c1_and_eq14():
    assert agra.bridge_layers(28, 8) == [0, 4, 8, 12, 15, 19, 23, 27]        # App. C.1 (round)
    floor = [j * 27 // 7 for j in range(8)]                                   # Eq. 14 as printed
    assert floor == [0, 3, 7, 11, 15, 19, 23, 27] and floor != agra.bridge_layers(28, 8)
    assert agra.bridge_layers(6, 4) == [0, 2, 3, 5]                          # the tiny preset
    assert agra.bridge_layers(28, 1) == [27]


def test_agra_loss_oracle():
    y = torch.randn(2, 3, 4, 4, 8)
    assert agra.agra_loss(y, y).item() == pytest.approx(-1.0, abs=1e-6)       # identical
    assert agra.agra_loss(3.0 * y, y).item() == pytest.approx(-1.0, abs=1e-6) # scale invariant
    assert agra.agra_loss(-y, y).item() == pytest.approx(1.0, abs=1e-6)       # opposite
    e = torch.eye(4)
    assert agra.agra_loss(e[[0, 1]], e[[2, 3]]).item() == pytest.approx(0.0, abs=1e-7)   # orthogonal
    z = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    t = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert agra.agra_loss(z, t).item() == pytest.approx(-(1 + 2 ** -0.5) / 2, abs=1e-6)  # mean of cosines


def test_teacher_interpolation_shape_and_constant_field():
    y = torch.randn(2, 3, 1, 1, 5).expand(2, 3, 16, 16, 5)
    out = agra.interpolate_teacher(y, (8, 8))
    assert out.shape == (2, 3, 8, 8, 5)
    assert torch.allclose(out, y[:, :, :8, :8], atol=1e-5)                 # a constant field stays constant
    assert agra.interpolate_teacher(torch.randn(1, 2, 8, 8, 3), (8, 8)).shape == (1, 2, 8, 8, 3)


def test_t1_pass_future_is_pure_noise_condition_frame_untouched(batch):
    torch.manual_seed(0)
    model = agra.Model(tiny_cfg()).eval()
    cfg = model.cfg
    noise = torch.randn(4, cfg.latent_channels, cfg.latent_frames - 1, 16, 16)
    hidden, v, z1 = model.condition(batch, noise)
    assert torch.equal(z1[:, :, 1:], noise)
    assert torch.equal(z1[:, :, 0], model.codec.encode(batch["video"][:, :, :1])[:, :, 0])
    t = model.frame_times(torch.ones(4), cfg.latent_frames)
    assert t[0].tolist() == pytest.approx([cfg.cond_t, 1.0, 1.0])
    # inference reads only the current frame: changing the future frames changes nothing
    other = dict(batch, video=torch.cat([batch["video"][:, :, :1], torch.rand_like(batch["video"][:, :, 1:])], 2))
    hidden2, _, _ = model.condition(other, noise)
    assert all(torch.equal(hidden[l], hidden2[l]) for l in hidden)
    out = model.sample(batch, generator=torch.Generator().manual_seed(1))
    assert out["actions"].shape == (4, cfg.horizon, cfg.action_dim) and out["video_x0"].shape == z1.shape


def perturbed(model):
    """Leave the zero-init (adaLN-Zero gates, zero output layers): at step 0 those block every gradient
    upstream of them, as in DiT, which would make gradient-flow tests vacuous."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def video_grads(cfg, batch, seed=0):
    torch.manual_seed(seed)
    model = perturbed(agra.Model(cfg))
    model.param_groups()
    torch.manual_seed(seed + 1)
    total, parts = model.loss(batch)
    total.backward()
    return model, parts, {n: (p.grad.clone() if p.grad is not None else None) for n, p in model.video.named_parameters()}


def test_action_gradients_reach_video_in_joint_and_not_in_finetune(batch):
    _, _, g_with = video_grads(tiny_cfg(agra_weight=0.0, act_weight=1.0), batch)
    _, _, g_without = video_grads(tiny_cfg(agra_weight=0.0, act_weight=0.0), batch)
    diff = sum((g_with[n] - g_without[n]).abs().sum().item() for n in g_with if g_with[n] is not None)
    assert diff > 0                                                      # L_act moves the video DiT (App. B.2.2)
    model, parts, g = video_grads(tiny_cfg(stage="finetune"), batch)
    assert set(parts) == {"action"}
    assert all(v is None for v in g.values())
    assert all(not p.requires_grad for p in model.video.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.head.parameters())
    model, parts, g = video_grads(tiny_cfg(freeze_video=True), batch)       # the "Freeze backbone" variant
    assert set(parts) == {"action"} and all(v is None for v in g.values())
    model, parts, _ = video_grads(tiny_cfg(stage="video"), batch)
    assert set(parts) == {"video"} and all(p.grad is None for p in model.head.parameters())


def test_video_loss_does_not_depend_on_actions(batch):
    torch.manual_seed(0)
    model = agra.Model(tiny_cfg())
    torch.manual_seed(5)
    _, p1 = model.loss(batch)
    other = dict(batch, actions=torch.randn_like(batch["actions"]))
    torch.manual_seed(5)
    _, p2 = model.loss(other)
    assert p1["video"] == p2["video"] and p1["agra"] == p2["agra"] and p1["action"] != p2["action"]


@pytest.mark.parametrize("agra_pass", ["action_cond", "video", "shared"])
def test_agra_passes_and_bridge_variants_train(batch, agra_pass):
    for bridge in ("multi", "single"):
        torch.manual_seed(0)
        model = perturbed(agra.Model(tiny_cfg(agra_pass=agra_pass, bridge=bridge, agra_layers=(1, 2))))
        model.param_groups()
        total, parts = model.loss(batch)
        assert set(parts) == {"video", "action", "agra"} and torch.isfinite(total)
        total.backward()
        for name in ("projectors.1.0.weight", "projectors.2.0.weight", "bridge.layer_proj.0.1.weight", "head.action_w1.weight",
                     "video.blocks.0.self_attn.q.weight", "text_encoder.embed.weight"):
            p = dict(model.named_parameters())[name]
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert model.bridge.layers == [1, 1, 1, 1]                              # AGRA-BridgeL: the first aligned layer


def test_video_timesteps_follow_cosmos_shifted_logit_normal():
    """tau_v = shift_t(sigmoid(N(0, 1)), 5): its median is shift_t(0.5, 5) = 5/6 (the tiny preset: shift 1)."""
    torch.manual_seed(0)
    full = agra.Model.__new__(agra.Model)
    full.cfg = agra.CONFIGS["full"]
    t = agra.Model.video_timesteps(full, 20000)
    assert abs(t.median().item() - 5 / 6) < 0.01 and 0 < t.min() and t.max() < 1
    tiny = agra.Model(tiny_cfg())
    assert abs(tiny.video_timesteps(20000).median().item() - 0.5) < 0.01


def test_bridge_without_position_tables(batch):
    """bridge_pos_embed=False (the paper's bridge: no position tables) builds, trains and samples."""
    model = agra.Model(tiny_cfg(bridge_pos_embed=False))
    assert not any("pos_" in n for n, _ in model.bridge.named_parameters())
    loss, _ = model.loss(batch)
    loss.backward()
    assert model.sample(batch)["actions"].shape == (4, 8, 4)


def test_weight_zero_is_the_wam_baseline(batch):
    model = agra.Model(tiny_cfg(agra_weight=0.0))
    groups = {g["name"] for g in model.param_groups()}
    _, parts = model.loss(batch)
    assert "agra" not in parts and groups == {"video", "head"}


def test_bad_shapes_and_config_values_are_named(batch):
    model = agra.Model(tiny_cfg())
    with pytest.raises(ValueError, match="batch\\['actions'\\]: expected shape \\(4, 8, 4\\), received \\(4, 5, 4\\)"):
        model.loss(dict(batch, actions=batch["actions"][:, :5]))
    with pytest.raises(ValueError, match="batch\\['video'\\]: expected shape"):
        model.loss(dict(batch, video=batch["video"][..., :16]))
    with pytest.raises(ValueError, match="agra_pass='both' is not valid"):
        tiny_cfg(agra_pass="both")
    with pytest.raises(ValueError, match="layer 9 outside"):
        tiny_cfg(agra_layers=(9,))


def test_attention_metrics_oracle_and_interventions():
    attn = torch.zeros(1, 1, 4, 4)
    attn[0, 0, 1, 2] = 3.0
    attn[0, 0, 3, 0] = 1.0
    mask = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    mask[0, 0, 1, 2] = True
    m = agra.attention_metrics(attn, mask)
    assert m["in_mask_ratio"] == pytest.approx(0.75)
    # attention centroid = (0.75*1 + 0.25*3, 0.75*2 + 0.25*0) = (1.5, 1.5); mask centre (1, 2)
    assert m["centroid_error"] == pytest.approx((0.5 ** 2 + 0.5 ** 2) ** 0.5)
    h = {0: torch.arange(12.0).view(1, 6, 2)}
    sel = torch.tensor([[True, True, False, False, False, False]])
    assert torch.equal(agra.intervene(h, sel, "zero")[0][0, :2], torch.zeros(2, 2))
    assert torch.allclose(agra.intervene(h, sel, "mean")[0][0, 0], h[0][0].mean(0))
    shuf = agra.intervene(h, sel, "shuffle", torch.Generator().manual_seed(0))[0][0]
    assert sorted(shuf[:2, 0].tolist()) == [0.0, 2.0] and torch.equal(shuf[2:], h[0][0, 2:])
    swap = agra.intervene(h, sel, "swap", torch.Generator().manual_seed(0))[0][0]
    assert all(v in (4.0, 6.0, 8.0, 10.0) for v in swap[:2, 0].tolist())


@pytest.mark.parametrize("kind", ["shuffle", "swap"])
def test_one_intervention_for_every_bridged_layer(kind):
    """Shuffle / swap draw their permutation once per sample: two layers with equal hidden states stay
    equal after the intervention (different draws per layer would inflate the deviation)."""
    h = torch.randn(2, 16, 3)
    sel = torch.rand(2, 16, generator=torch.Generator().manual_seed(1)) < 0.4
    out = agra.intervene({0: h, 5: h.clone()}, sel, kind, torch.Generator().manual_seed(0))
    assert torch.equal(out[0], out[5]) and not torch.equal(out[0], h)


def test_diagnostics_run_on_the_tiny_model(batch):
    torch.manual_seed(0)
    model = perturbed(agra.Model(tiny_cfg())).eval()
    g = torch.Generator().manual_seed(0)
    attn = agra.cross_attention_maps(model, batch, g)
    assert attn.shape == (4, 4, 3, 8, 8) and torch.allclose(attn.sum((2, 3, 4)), torch.ones(4, 4), atol=1e-4)
    two = {k: v[:2] for k, v in batch.items()}
    heat = agra.intervention_heatmap(model, two, "zero", frame=0, generator=g)
    assert heat.shape == (2, 8, 8) and heat.min() == 0 and heat.max() == 1
    # the tiny preset's head reads the current frame only (bridge_tokens=current): the last frame moves nothing
    assert agra.intervention_heatmap(model, two, "zero", frame=-1, generator=g).abs().max() == 0
    r = agra.sensitivity_ratio(model, batch, "mean", draws=2, generator=g)
    assert r > 0


def test_attention_focus_is_one_for_uniform_attention(batch):
    """cross_attention_maps(focus=...): the normalized entropy of the head's attention is 1 when no token is
    preferred (query projections zeroed: equal logits), and below 1 once the queries pick tokens."""
    torch.manual_seed(0)
    model = perturbed(agra.Model(tiny_cfg(bridge_tokens="all"))).eval()     # the head reads all 192 tokens
    focus = {}
    agra.cross_attention_maps(model, batch, torch.Generator().manual_seed(0), focus=focus)
    assert 0 < focus["entropy"] < 1 and len(focus["entropy_per_block"]) == 4
    with torch.no_grad():
        for block in model.head.transformer_blocks:
            block.attn2.q.weight.zero_()
            block.attn2.q.bias.zero_()
    attn = agra.cross_attention_maps(model, batch, torch.Generator().manual_seed(0), focus=focus)
    assert abs(focus["entropy"] - 1) < 1e-5
    assert torch.allclose(attn, torch.full_like(attn, 1 / 192), atol=1e-6)   # uniform: 1/3 on the current frame


def test_full_preset_sizes_on_meta_device():
    cfg = agra.CONFIGS["full"]
    with torch.device("meta"):
        video = agra.VideoDiT(cfg)
        model = agra.Model(cfg)
    n = lambda m: sum(p.numel() for p in m.parameters())          # noqa: E731
    assert n(video) == 2_059_174_912                              # diffusers' Cosmos-Predict2.5-2B transformer
    assert n(model.bridge) == 235_319_296 and n(model.head) == 194_579_488   # ours (the paper: "500 M" head)
    assert model.bridge.layers == [0, 4, 8, 12, 15, 19, 23, 27] and cfg.agra_layers == (8,)
    assert (cfg.frames, cfg.horizon, cfg.frame_stride) == (17, 48, 3)        # App. C.3: 16 frames span 48 steps


def test_cosmos_checkpoint_keys_map_onto_video_dit():
    """The original Cosmos-Predict2.5 key set (Cosmos-Predict2.5 MiniTrainDIT, `net.` stripped)
    maps by cosmos_key_map exactly onto our VideoDiT, with the documented shapes."""
    cfg = agra.CONFIGS["full"]
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in agra.VideoDiT(cfg).state_dict().items()}
    orig = {"x_embedder.proj.1.weight": (2048, 72), "t_embedder.1.linear_1.weight": (2048, 2048),
            "t_embedder.1.linear_2.weight": (6144, 2048), "t_embedding_norm.weight": (2048,),
            "final_layer.adaln_modulation.1.weight": (256, 2048), "final_layer.adaln_modulation.2.weight": (4096, 256),
            "final_layer.linear.weight": (64, 2048), "crossattn_proj.0.weight": (1024, 100352), "crossattn_proj.0.bias": (1024,)}
    for i in range(28):
        b = f"blocks.{i}."
        for m in ("self_attn", "cross_attn", "mlp"):
            orig[b + f"adaln_modulation_{m}.1.weight"] = (256, 2048)
            orig[b + f"adaln_modulation_{m}.2.weight"] = (6144, 256)
        for a, kv in (("self_attn", 2048), ("cross_attn", 1024)):
            orig[b + f"{a}.q_proj.weight"] = (2048, 2048)
            orig[b + f"{a}.k_proj.weight"] = (2048, kv)
            orig[b + f"{a}.v_proj.weight"] = (2048, kv)
            orig[b + f"{a}.output_proj.weight"] = (2048, 2048)
            orig[b + f"{a}.q_norm.weight"] = (128,)
            orig[b + f"{a}.k_norm.weight"] = (128,)
        orig[b + "mlp.layer1.weight"] = (8192, 2048)
        orig[b + "mlp.layer2.weight"] = (2048, 8192)
    mapped = {agra.cosmos_key_map(k): s for k, s in orig.items()}
    assert mapped == ours


def test_action_repeats_share_one_video_pass(batch):
    """R action-noise draws per video pass: the video and AGRA losses are those of R = 1 (same pass),
    the action loss averages over B * R draws."""
    torch.manual_seed(0)
    model = agra.Model(tiny_cfg())
    torch.manual_seed(3)
    _, p1 = model.loss(batch)
    model.cfg.action_repeats = 3
    torch.manual_seed(3)
    total, p3 = model.loss(batch)
    assert p1["video"] == p3["video"] and p1["agra"] == p3["agra"] and torch.isfinite(total)


def test_bridge_position_tables_sincos_start():
    """bridge_pos_init=sincos: each axis owns a third of the channels (20 / 20 / 24 of 64) with a 1D
    sin-cos code, cos(0) = 1 and sin(0) = 0 at position 0; the default draws N(0, 0.02^2)."""
    t, h, w = agra.axis_tables((3, 8, 8), 64)
    for table, (lo, hi) in zip((t, h, w), ((0, 20), (20, 40), (40, 64))):
        used = (table != 0).any(0).nonzero().flatten()
        assert used.min() == lo and used.max() == hi - 1
    wd = 20
    assert torch.allclose(h[0, 20:30], torch.ones(10)) and torch.allclose(h[0, 30:40], torch.zeros(10))
    assert h[2, 20].item() == pytest.approx(math.cos(2.0)) and h[2, 30].item() == pytest.approx(math.sin(2.0))   # frequency 1
    assert h[2, 21].item() == pytest.approx(math.cos(2.0 * 100 ** (-1 / (wd // 2))), abs=1e-6)
    torch.manual_seed(0)
    m_sin = agra.Model(tiny_cfg(bridge_pos_init="sincos"))
    torch.manual_seed(0)
    m_def = agra.Model(tiny_cfg(bridge_pos_init="normal"))                       # the Config default
    assert torch.equal(m_sin.bridge.pos_h.data, agra.axis_tables(tiny_cfg().max_grid, tiny_cfg().bridge_dim)[1])
    assert m_def.bridge.pos_h.std().item() == pytest.approx(0.02, rel=0.1)        # the default: N(0, 0.02^2)
    sd_sin, sd_def = m_sin.state_dict(), m_def.state_dict()                      # everything else starts the same
    assert all(torch.equal(sd_sin[k], sd_def[k]) for k in sd_def if not k.startswith("bridge.pos_"))
    with pytest.raises(ValueError, match="bridge_pos_init"):
        tiny_cfg(bridge_pos_init="random")


def test_bridge_tokens_current_reads_only_the_current_frame(batch):
    """bridge_tokens=current: G_j holds the 8 x 8 tokens of latent frame 0; changing the future tokens'
    hidden states leaves G unchanged; the attention maps put no mass on future frames; the loss runs."""
    torch.manual_seed(0)
    model = perturbed(agra.Model(tiny_cfg(bridge_tokens="current"))).eval()
    hidden = {l: torch.randn(2, 3 * 64, 96) for l in model.bridge.layers}
    G = model.bridge(hidden, (3, 8, 8))
    assert len(G) == 4 and G[0].shape == (2, 64, 64)
    later = {l: torch.cat([h[:, :64], torch.randn(2, 128, 96)], 1) for l, h in hidden.items()}
    assert all(torch.equal(a, b) for a, b in zip(G, model.bridge(later, (3, 8, 8))))
    attn = agra.cross_attention_maps(model, batch, torch.Generator().manual_seed(0))
    assert attn.shape == (4, 4, 3, 8, 8) and not attn[:, :, 1:].any()
    assert torch.allclose(attn.sum((2, 3, 4)), torch.ones(4, 4), atol=1e-4)
    total, parts = model.loss(batch)
    assert torch.isfinite(total) and parts["action"] > 0


def test_bridge_text_gives_the_head_the_instruction(batch):
    """bridge_text (ours, not in the paper): the instruction's context tokens (the video DiT's cross-attention
    context) join every G_j after its video tokens, so with the video hidden states held fixed the actions
    still change with the words (without it they cannot); the text tokens get gradient from the action loss;
    interventions leave them alone and the attention maps keep only the video tokens' mass."""
    torch.manual_seed(0)
    model = perturbed(agra.Model(tiny_cfg(bridge_text=True, bridge_tokens="current"))).eval()
    assert model.bridge.reads == set(model.bridge.layers) | {"text"}
    hidden = {l: torch.randn(2, 3 * 64, 96) for l in model.bridge.layers}
    words = [model.text_encoder(["put the red cube in the bin"] * 2), model.text_encoder(["put the blue ball in the bin"] * 2)]
    G = [model.bridge({**hidden, "text": w}, (3, 8, 8)) for w in words]
    assert G[0][0].shape == (2, 64 + 16, 64)                             # 64 current-frame tokens + 16 text tokens
    state, noise = torch.zeros(2, 4), torch.randn(2, 8, 4)
    a = [model.denoise_actions({**hidden, "text": w}, state, noise) for w in words]
    assert (a[0] - a[1]).abs().max() > 1e-4
    plain = perturbed(agra.Model(tiny_cfg(bridge_tokens="current"))).eval()
    assert plain.bridge.reads == set(plain.bridge.layers)
    with torch.no_grad():
        _, full = model.video(model.video_input(model.encode(batch)), torch.ones(4, 3), model.context(batch), model.bridge.reads)
        assert torch.allclose(full["text"], model.context(batch), atol=1e-6)
    tokens = torch.zeros(2, 3 * 64, dtype=torch.bool)
    tokens[:, :5] = True
    out = agra.intervene({**hidden, "text": words[0]}, tokens, "zero")
    assert out["text"] is words[0] and not out[model.bridge.layers[0]][:, :5].any()
    attn = agra.cross_attention_maps(model, batch, torch.Generator().manual_seed(0))
    mass = attn.sum((2, 3, 4))
    assert attn.shape == (4, 4, 3, 8, 8) and not attn[:, :, 1:].any() and (mass < 1).all() and (mass > 0).all()
    model.train()
    total, _ = model.loss(batch)
    total.backward()
    assert model.bridge.text_proj[1].weight.grad.abs().sum() > 0


def test_ground_stage_readout_oracle_gradients_and_init_into_joint(batch):
    """Stage "ground" (the toy's stand-in for a language-grounded pretrained backbone): with a zero readout
    every current-frame token scores the same, so the cross-entropy against the named object's token share
    is log(64) for every sample that shows the object; it trains the video DiT, the text encoder and the
    readout only; it needs the named object's mask; its readout is dropped when a later stage starts from it."""
    from common import load_state_dict_strict
    torch.manual_seed(0)
    model = agra.Model(tiny_cfg(stage="ground", lr_video=1e-4, lr_head=1e-3))
    groups = model.param_groups()
    assert [g["name"] for g in groups] == ["video"] and groups[0]["lr"] == 1e-3     # the stand-in for pretraining: lr_head
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"video", "text_encoder", "ground_head"}
    with torch.no_grad():
        model.ground_head.weight.zero_()
        model.ground_head.bias.zero_()
    visible = batch["target_mask"].flatten(1).any(1)
    assert visible.any()
    loss, parts = model.loss(batch)
    assert set(parts) == {"ground", "ground_hit"}
    assert loss.item() == pytest.approx(math.log(64), rel=1e-5)
    perturbed(model)
    loss, _ = model.loss(batch)
    loss.backward()
    assert model.text_encoder.embed.weight.grad.abs().sum() > 0                # the words are trained
    assert all(p.grad is None for p in model.head.parameters())
    with pytest.raises(ValueError, match="target_mask"):
        model.loss({k: v for k, v in batch.items() if k != "target_mask"})
    joint = agra.Model(tiny_cfg())
    assert not hasattr(joint, "ground_head")
    with pytest.raises(ValueError, match="unexpected 2 key"):
        load_state_dict_strict(joint, model.state_dict())
    load_state_dict_strict(joint, model.state_dict(), ignore=joint.init_ignore)
    assert torch.equal(joint.video.blocks[0].cross_attn.q.weight, model.video.blocks[0].cross_attn.q.weight)
    assert model.init_ignore == ()


def test_frozen_preset_is_the_tiny_run_with_longer_ground_and_finetune_stages():
    """README's longer default run: only the two stage lengths differ from --tiny, and no joint stage runs
    (so, like --tiny, it trains neither L_vid nor L_AGRA)."""
    import dataclasses
    tiny, frozen = agra.CONFIGS["tiny"], agra.CONFIGS["frozen"]
    differ = {f.name for f in dataclasses.fields(tiny) if getattr(tiny, f.name) != getattr(frozen, f.name)}
    assert differ == {"ground_steps", "finetune_steps"}
    assert (frozen.ground_steps, frozen.steps, frozen.finetune_steps) == (300, 0, 4000)


def test_frozen_wide_preset_is_the_frozen_run_on_more_demos_with_a_wider_head():
    """README's 90 % recipe: --preset frozen with --episodes 1000, ground_steps=600, act_dim=128, act_heads=4 (the
    command its three seeds were measured with), nothing else; train.py generates its 1,000-demo dataset."""
    import dataclasses
    import train
    frozen, wide = agra.CONFIGS["frozen"], agra.CONFIGS["frozen_wide"]
    differ = {f.name: getattr(wide, f.name) for f in dataclasses.fields(wide) if getattr(frozen, f.name) != getattr(wide, f.name)}
    assert differ == {"ground_steps": 600, "toy_episodes": 1000, "act_dim": 128, "act_heads": 4}
    assert (wide.steps, wide.finetune_steps) == (0, 4000)
    args = train.get_args(["--model", "agra", "--preset", "frozen_wide"])
    assert train.toy_episodes(args, wide) == 1000 and train.toy_episodes(args, frozen) == 400
    args = train.get_args(["--model", "agra", "--preset", "frozen_wide", "--episodes", "500"])
    assert train.toy_episodes(args, wide) == 500                                 # the flag wins
    folder, world = train.default_data_folder(wide, train.toy_episodes(args, wide))
    assert folder.endswith("close_near_500") and world == {"view": "close", "distractor_band": "near"}


def test_long_wide_preset_is_the_90_percent_recipe_with_a_joint_stage():
    """README's AGRA-vs-WAM recipe: frozen_wide with 500 joint steps between its ground and finetune stages, nothing
    else (so frozen_wide is its "Freeze backbone" row); AGRA's loss is on, and agra_weight=0 is the WAM baseline."""
    import dataclasses
    import train
    wide, lw = agra.CONFIGS["frozen_wide"], agra.CONFIGS["long_wide"]
    differ = {f.name: getattr(lw, f.name) for f in dataclasses.fields(lw) if getattr(wide, f.name) != getattr(lw, f.name)}
    assert differ == {"steps": 500}
    assert (lw.ground_steps, lw.finetune_steps, lw.lr_video / lw.lr_head, lw.agra_weight) == (600, 4000, 0.1, 0.01)
    assert train.toy_episodes(train.get_args(["--model", "agra", "--preset", "long_wide"]), lw) == 1000
    assert train.make_config("agra", "long_wide", ["agra_weight=0"]).agra_weight == 0


def test_long_wide_tex_preset_is_long_wide_in_the_textured_world(tmp_path):
    """README's AGRA-vs-WAM recipe in the world where shapes show: long_wide with toy_shape_texture, nothing else;
    train.py generates and caches its dataset apart (close_near_tex_1000), the same demos as
    data/toyworld.py --episodes N --view close --distractor-band near --shape-texture, and evaluates in that world."""
    import dataclasses
    import os
    import numpy as np
    import train
    from data.toyworld import default_dataset, generate, world_options
    lw, tex = agra.CONFIGS["long_wide"], agra.CONFIGS["long_wide_tex"]
    differ = {f.name: getattr(tex, f.name) for f in dataclasses.fields(tex) if getattr(lw, f.name) != getattr(tex, f.name)}
    assert differ == {"toy_shape_texture": True}
    args = train.get_args(["--model", "agra", "--preset", "long_wide_tex"])
    folder, world = train.default_data_folder(tex, train.toy_episodes(args, tex))
    assert os.path.basename(folder) == "close_near_tex_1000"
    assert world == {"view": "close", "distractor_band": "near", "shape_texture": True}
    assert train.default_data_folder(lw, 1000)[0] == folder.replace("_tex", "")             # the plain world's cache
    arrays, meta = default_dataset(str(tmp_path / "t"), episodes=2, quiet=True, **world)
    ref, _ = generate(2, "train", view="close", distractor_band="near", shape_texture=True)
    assert all(np.array_equal(arrays[k], ref[k]) for k in ref)
    assert world_options(meta)["shape_texture"] is True
