"""Toy world: expert success, determinism, state save/restore, splits, masks, teacher, dataset I/O."""
import json
import os

import numpy as np
import pytest
import torch

from data import toyworld as tw


@pytest.mark.parametrize("view", tw.VIEWS)
def test_expert_succeeds_on_train_seeds(view):
    env = tw.ToyWorld(res=32, view=view)
    ok = [tw.run_expert_episode(env, s, "train")[1] for s in range(100)]
    assert np.mean(ok) >= 0.98


@pytest.mark.parametrize("view", tw.VIEWS)
@pytest.mark.parametrize("split", tw.SPLITS[1:])
def test_expert_succeeds_on_ood_splits(split, view):
    env = tw.ToyWorld(res=32, view=view)
    assert np.mean([tw.run_expert_episode(env, s, split)[1] for s in range(30)]) >= 0.95


@pytest.mark.parametrize("view", tw.VIEWS)
def test_expert_succeeds_with_the_distractors_in_the_named_objects_band(view):
    env = tw.ToyWorld(res=32, view=view, distractor_band="near")
    assert np.mean([tw.run_expert_episode(env, s, split)[1] for split in tw.SPLITS for s in range(25)]) >= 0.98


def test_reset_is_deterministic_and_state_restore_reproduces_frames():
    env = tw.ToyWorld(res=32)
    a, _ = env.reset(seed=5)
    b, _ = env.reset(seed=5)
    assert np.array_equal(a, b)
    rng = np.random.default_rng(0)
    for _ in range(4):
        env.step(rng.uniform(-0.1, 0.1, 4))
    state = env.get_state()
    actions = [np.append(rng.uniform(-0.12, 0.12, 3), rng.choice([-1, 1])) for _ in range(12)]
    first = [env.step(a)[0] for a in actions]
    env.reset(seed=99)                                        # scramble, then restore
    env.set_state(state)
    again = [env.step(a)[0] for a in actions]
    assert all(np.array_equal(x, y) for x, y in zip(first, again))


def test_close_miss_is_the_distance_at_the_first_close_and_is_saved_with_the_state():
    env = tw.ToyWorld(res=32, view="close")
    env.reset(seed=3)
    assert env.close_miss is None
    tgt = env.obj_pos[env.scene["target"]]
    env.q = env.ik(tgt + np.array([0.03, -0.04, 0.02]))                  # above the object, 0.05 beside it in xy
    _, _, _, _, info = env.step(np.array([0.0, 0.0, 0.0, 1.0]))          # g 1.0 -> 0.6: still open
    assert env.g == pytest.approx(0.6) and info["close_miss"] is None
    _, _, _, _, info = env.step(np.array([0.0, 0.0, 0.0, 1.0]))          # 0.6 -> 0.2: the first close (it grasps)
    assert info["close_miss"] == pytest.approx(0.05, abs=1e-6)            # sqrt(0.03^2 + 0.04^2)
    state = env.get_state()
    for _ in range(3):                                                    # open, move away, close again: kept
        env.step(np.array([0.0, 0.0, 0.0, -1.0]))
    env.step(np.array([0.2, 0.0, 0.0, 1.0]))
    env.step(np.array([0.0, 0.0, 0.0, 1.0]))
    assert env.close_miss == pytest.approx(0.05, abs=1e-6)
    env.reset(seed=4)
    assert env.close_miss is None and env.close_toward is None
    env.set_state(state)
    assert env.close_miss == pytest.approx(0.05, abs=1e-6)
    assert env.close_toward == state["close_toward"] is not None


def test_close_toward_is_the_miss_component_towards_the_nearest_other_object():
    """Objects put by hand: the nearest other one 0.10 from the target along +x, another 0.30 along +y; the
    gripper closes at (+0.03, -0.04) beside the target -> 0.03 towards the nearest (0.05 away); a close on the far
    side -> -0.03. With no other object on the table: None."""
    for dx, expected in ((0.03, 0.03), (-0.03, -0.03)):
        env = tw.ToyWorld(res=32, view="close")
        env.reset(seed=3)
        tgt = env.scene["target"]
        others = [k for k in range(len(env.obj_pos)) if k != tgt]
        for k, off in zip(others, ((0.10, 0.0), (0.0, 0.30), (0.0, -0.40))):
            env.obj_pos[k, :2] = env.obj_pos[tgt, :2] + np.array(off)
        env.q = env.ik(env.obj_pos[tgt] + np.array([dx, -0.04, 0.02]))
        env.step(np.array([0.0, 0.0, 0.0, 1.0]))
        assert env.close_toward is None
        _, _, _, _, info = env.step(np.array([0.0, 0.0, 0.0, 1.0]))                # the first close
        assert info["close_miss"] == pytest.approx(0.05, abs=1e-6)
        assert info["close_toward"] == pytest.approx(expected, abs=1e-6)
    alone = tw.ToyWorld(res=32, view="close", distractors=False)
    alone.reset(seed=3)
    alone.q = alone.ik(alone.obj_pos[alone.scene["target"]] + np.array([0.03, -0.04, 0.02]))
    for _ in range(2):
        _, _, _, _, info = alone.step(np.array([0.0, 0.0, 0.0, 1.0]))
    assert info["close_miss"] == pytest.approx(0.05, abs=1e-6) and info["close_toward"] is None


def test_splits_hold_out_what_they_say():
    env = tw.ToyWorld(res=32)
    for s in range(40):
        env.reset(seed=s, split="train")
        sc = env.scene
        assert all((c, k) not in tw.HELD_OUT_COMBOS for c, k in zip(sc["colors"], sc["shapes"]))
        assert tuple(sc["table"]) in tw.TRAIN_TABLE and tuple(sc["wall"]) in tw.TRAIN_WALL
        assert tw.NEAR_BAND[0] <= env.obj_pos[sc["target"], 0] <= tw.NEAR_BAND[1]
        env.reset(seed=s, split="ood_object")
        t = env.scene["target"]
        assert (env.scene["colors"][t], env.scene["shapes"][t]) in tw.HELD_OUT_COMBOS
        env.reset(seed=s, split="ood_background")
        assert tuple(env.scene["table"]) in tw.OOD_TABLE and tuple(env.scene["wall"]) in tw.OOD_WALL
        env.reset(seed=s, split="ood_layout")
        t = env.scene["target"]
        assert tw.FAR_BAND[0] <= env.obj_pos[t, 0] <= tw.FAR_BAND[1]
        others = [i for i in range(len(env.scene["shapes"])) if i != t]
        assert all(tw.NEAR_BAND[0] <= env.obj_pos[i, 0] <= tw.NEAR_BAND[1] for i in others)
    # every colour and every shape alone appears in training
    assert {c for c, _ in tw.HELD_OUT_COMBOS} == set(tw.COLOR_NAMES) and {s for _, s in tw.HELD_OUT_COMBOS} == set(tw.SHAPES)
    with pytest.raises(ValueError, match="unknown split"):
        env.reset(seed=0, split="ood_weather")


@pytest.mark.parametrize("view", tw.VIEWS)
def test_grasp_takes_the_object_within_tolerance_only(view):
    """Oracle for the kinematic grasp: closing with the tool centre point grasp_xy - 1 cm beside an
    object, low enough, attaches it; grasp_xy + 1 cm beside it attaches nothing."""
    env = tw.ToyWorld(res=32, view=view)
    assert env.grasp_xy == tw.VIEWS[view]["grasp_xy"]
    for offset, expect in ((env.grasp_xy - 0.01, True), (env.grasp_xy + 0.01, False)):
        env.reset(seed=5)
        t = env.scene["target"]
        goal = env.obj_pos[t] + np.array([offset, 0.0, 0.015])
        env.q = env.ik(goal)
        assert np.linalg.norm(env.ee_pos() - goal) < 1e-6
        for _ in range(2):                                            # two closing steps: 1 -> 0.6 -> 0.2
            env.step(np.array([0.0, 0.0, 0.0, 1.0]))
        assert (env.held == t) == expect


def test_cached_default_dataset_is_regenerated_for_another_world_version(tmp_path, capsys):
    folder = str(tmp_path / "default")
    tw.default_dataset(folder, episodes=2, quiet=True)
    assert tw.dataset_format(folder) == tw.FORMAT
    meta = json.load(open(os.path.join(folder, "meta.json")))
    meta["format"] = "toyworld-v1"
    json.dump(meta, open(os.path.join(folder, "meta.json"), "w"))
    with pytest.warns(UserWarning, match="toyworld-v1"):
        tw.load_dataset(folder)
    tw.default_dataset(folder, episodes=2)
    assert "regenerating" in capsys.readouterr().out and tw.dataset_format(folder) == tw.FORMAT


def test_cached_default_dataset_is_regenerated_for_another_episode_count(tmp_path, capsys):
    folder = str(tmp_path / "default")
    _, meta = tw.default_dataset(folder, episodes=2, quiet=True)
    assert len(meta["episodes"]) == 2
    _, meta = tw.default_dataset(folder, episodes=3)
    assert len(meta["episodes"]) == 3 and "holds 2 episodes, 3 were asked for" in capsys.readouterr().out


def test_segmentation_interaction_mask_and_stage_flags():
    env = tw.ToyWorld(res=64)
    obs, info = env.reset(seed=3)
    t = env.scene["target"]
    seg = info["seg"]
    assert obs.shape == (64, 64, 3) and obs.dtype == np.uint8
    assert (seg == tw.SEG_OBJ0 + t).any() and (seg == tw.SEG_ARM).any() and (seg == tw.SEG_BIN).any()
    assert np.array_equal(info["interaction_mask"], (seg == tw.SEG_GRIPPER) | (seg == tw.SEG_OBJ0 + t))
    rec, ok = tw.run_expert_episode(env, 3, "train")
    assert ok and rec["rewards"][-2] == 1.0 and sum(rec["rewards"]) == 1.0
    _, info = env.reset(seed=3)
    with pytest.raises(ValueError, match="shape \\(4,\\)"):
        env.step(np.zeros(3))


def test_mc_returns_hand_example():
    assert np.allclose(tw.mc_returns(np.array([0, 0, 1, 0.0]), 0.5), [0.25, 0.5, 1.0, 0.0])


def test_semantic_teacher_is_orthonormal_pooled_and_colour_blind():
    emb = tw.teacher_embedding(16)
    assert np.allclose(emb @ emb.T, np.eye(len(tw.TEACHER_CLASSES)), atol=1e-6)
    cls = np.zeros((4, 4), np.int64)
    cls[:2, :2] = 3                                          # one 2x2 patch entirely "arm"
    cls[2, 2] = 5                                            # a patch 1/4 cube, 3/4 wall
    f = tw.semantic_teacher(cls, 2, emb)
    assert f.shape == (2, 2, 16)
    assert np.allclose(f[0, 0], emb[3]) and np.allclose(f[1, 1], 0.25 * emb[5] + 0.75 * emb[0])
    # same layout, other colours -> identical teacher features
    env = tw.ToyWorld(res=32)
    env.reset(seed=7, split="train")
    seg_a = env.render()[1]
    env.scene["table"], env.scene["wall"] = np.array(tw.OOD_TABLE[0]), np.array(tw.OOD_WALL[0])
    env.scene["colors"] = ["blue"] * len(env.scene["colors"])
    env._make_background()
    frame_b, seg_b = env.render()
    assert np.array_equal(seg_a, seg_b)


def test_dataset_roundtrip_and_batches(toy_data, tmp_path):
    folder, arrays, meta = toy_data
    assert set(arrays) >= set(tw.REQUIRED)
    assert meta["episodes"][0]["instruction"].startswith("put the ")
    assert len(meta["stats"]["actions"]["mean"]) == 4 and "<robot" in meta["urdf"]
    ds = tw.ClipDataset(arrays, meta, frames=9, horizon=8, q=4, teacher_patch=2, teacher_dim=16)
    b = ds.sample(5, torch.Generator().manual_seed(0))
    assert b["video"].shape == (5, 3, 9, 32, 32) and -1 <= b["video"].min() and b["video"].max() <= 1
    assert b["actions"].shape == (5, 8, 4) and b["state"].shape == (5, 4) and len(b["text"]) == 5
    assert b["teacher"].shape == (5, 3, 16, 16, 16) and b["interaction_mask"].shape == (5, 3, 32, 32)
    # the clip starting at an episode's last-but-one frame: one real action, then no-ops, frames repeat
    e = meta["episodes"][0]
    row = np.flatnonzero((ds.index[:, 0] == 0) & (ds.index[:, 1] == e["length"] - 2))
    c = ds.get(row)
    raw = c["actions"][0] * torch.tensor(ds.a_std) + torch.tensor(ds.a_mean)
    assert torch.allclose(raw[1:, :3], torch.zeros(7, 3), atol=1e-5)
    assert torch.equal(c["video"][0, :, 2], c["video"][0, :, -1])
    # bad folders are named precisely
    with pytest.raises(FileNotFoundError, match="missing episodes.safetensors"):
        tw.load_dataset(str(tmp_path))
    bad = tmp_path / "bad"
    arrays2 = dict(arrays)
    arrays2["actions"] = arrays["actions"][:, :3]
    tw.write_dataset(str(bad), arrays2, meta)
    with pytest.raises(ValueError, match="'actions' expected shape \\(\\*, 4\\), received"):
        tw.load_dataset(str(bad))
    del arrays2["value"]
    arrays2["actions"] = arrays["actions"]
    tw.write_dataset(str(bad), arrays2, meta)
    with pytest.raises(ValueError, match="lacks 'value'"):
        tw.load_dataset(str(bad))


def test_clip_frame_stride_and_episode_depth_range(toy_data):
    """stride 3 (AGRA App. C.3) takes frames s, s+3, ...; every clip of an episode carries the same
    KVAF depth range, the min / max camera depth of the robot links over the whole episode."""
    from common import URDFChain, depth_range
    _, arrays, meta = toy_data
    ds = tw.ClipDataset(arrays, meta, frames=5, horizon=12, q=4, stride=3)
    e = meta["episodes"][1]
    row = np.flatnonzero((ds.index[:, 0] == 1) & (ds.index[:, 1] == 2))
    c = ds.get(row)
    frames = torch.from_numpy(arrays["frames"][e["start"] + 2 + 3 * np.arange(5)]).permute(3, 0, 1, 2).float() / 127.5 - 1
    assert torch.equal(c["video"][0], frames) and c["actions"].shape == (1, 12, 4)
    chain, st = URDFChain(meta["urdf"]), arrays["state"][e["start"]:e["start"] + e["length"]]
    z = depth_range(chain, chain.full_q(st[:, :3], st[:, 3]), np.array(meta["camera"]["T_wc"]))
    other = ds.get(np.flatnonzero(ds.index[:, 0] == 1)[-1:])
    assert np.allclose(c["kvaf_depth_range"][0].numpy(), z) and torch.equal(other["kvaf_depth_range"], c["kvaf_depth_range"])
    assert 0 < z[0] < z[1]


def test_dataset_cli(tmp_path):
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "d"
    r = subprocess.run([sys.executable, os.path.join(root, "data", "toyworld.py"), "--episodes", "3", "--out", str(out),
                        "--gamma", "0.9"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    arrays, meta = tw.load_dataset(str(out))
    assert meta["gamma"] == 0.9 and len(meta["episodes"]) == 3
    e = meta["episodes"][0]
    v = arrays["value"][e["start"]: e["start"] + e["length"]]
    L = e["length"]
    assert v[L - 2] == pytest.approx(1.0) and v[0] == pytest.approx(0.9 ** (L - 2))   # MC values with the CLI's gamma
    assert not any(f.endswith((".pkl", ".pt", ".pickle")) for f in os.listdir(out))
    json.load(open(out / "meta.json"))


def test_horizon_gamma_rule_and_demo_returns():
    """gamma^L = 0.1 (hand value: 0.1 ** (1/25) = 0.9120); EXPERT_STEPS is the median demo length, so a
    demo's first-frame return is about 0.1 and a 0.2 drop (MV-WAM's delta) is a setback of a few steps."""
    assert tw.horizon_gamma(25) == pytest.approx(0.912011, abs=1e-6)
    assert tw.horizon_gamma(10, 0.5) ** 10 == pytest.approx(0.5)
    assert tw.TOY_GAMMA == 0.91
    arrays, meta = tw.generate(12, "train", seed0=0)
    lengths = [e["length"] - 1 for e in meta["episodes"]]           # steps (frames minus the start frame)
    assert abs(np.median(lengths) - tw.EXPERT_STEPS) <= 2
    starts = arrays["value"][[e["start"] for e in meta["episodes"]]]
    assert meta["gamma"] == tw.TOY_GAMMA and 0.05 < np.median(starts) < 0.2
    assert np.allclose(starts, tw.TOY_GAMMA ** (np.array(lengths) - 1))   # reward on the last step


def test_recovering_demo_misses_retries_and_is_worth_less_at_the_grasp():
    """Expert(miss_prob=1): the first close is grasp_xy + MISS_MARGIN beside the target and takes nothing (not a
    distractor either), the expert reopens, retries and succeeds. Its true return when the fingers
    first close is gamma^(steps left), lower than the clean demo's at its (successful) close."""
    env = tw.ToyWorld(res=32)
    g = tw.TOY_GAMMA
    for seed in range(5):
        clean, ok_c = tw.run_expert_episode(env, seed, "train")
        rec, ok_r = tw.run_expert_episode(env, seed, "train", miss_prob=1.0)
        assert ok_c and ok_r and rec["missed"] and not clean["missed"]
        grip = np.array(rec["state"])[:, 3]                               # gripper opening per frame
        closes = np.flatnonzero((grip[:-1] >= 0.5) & (grip[1:] < 0.5)) + 1  # frames right after a close
        assert len(closes) == 2                                          # the empty close, then the grasp
        c_clean = np.flatnonzero((np.array(clean["state"])[:-1, 3] >= 0.5) & (np.array(clean["state"])[1:, 3] < 0.5))[0] + 1
        v_rec = tw.mc_returns(np.array(rec["rewards"], np.float32), g)
        v_clean = tw.mc_returns(np.array(clean["rewards"], np.float32), g)
        r_rec, r_clean = int(np.argmax(rec["rewards"])), int(np.argmax(clean["rewards"]))
        assert v_rec[closes[0]] == pytest.approx(g ** (r_rec - closes[0]), rel=1e-5)
        assert v_rec[closes[0]] < v_clean[c_clean] and r_rec > r_clean   # the retry costs steps
    arrays, meta = tw.generate(6, "train", seed0=0, recover_frac=0.5)
    flags = [e["recovering"] for e in meta["episodes"]]
    assert any(flags) and not all(flags) and all(e["success"] for e in meta["episodes"])


def test_recovering_demo_flags_its_miss_and_the_policy_imitates_only_the_retry(tmp_path):
    """A recovering demo's actions up to its empty close are aimed beside the target: `imitate` is 0 for exactly
    those (the retry starts at the first frame whose gripper opening is below 0.5: Expert.act reopens there), 1
    after; a clip's action_weight is 0 when its chunk holds any of them. Clean demos: 1 throughout. The array
    survives write / load, and a dataset without it (older ones) falls back to one weight per episode."""
    arrays, meta = tw.generate(4, "train", seed0=0, recover_frac=0.5)
    eps = meta["episodes"]
    assert any(e["recovering"] for e in eps) and not all(e["recovering"] for e in eps)
    for e in eps:
        sl = slice(e["start"], e["start"] + e["length"])
        imit, grip = arrays["imitate"][sl], arrays["state"][sl, 3]
        if e["recovering"]:
            retry = int(np.flatnonzero(grip < 0.5)[0])
            assert 5 < retry < e["length"] - 5
            assert (imit[:retry] == 0).all() and (imit[retry:] == 1).all()
        else:
            assert (imit == 1).all()
    ds = tw.ClipDataset(arrays, meta, frames=5, horizon=4)
    w = ds.get(np.arange(len(ds)))["action_weight"].numpy()
    for i, (e, s) in enumerate(ds.index):
        ep = eps[e]
        retry = int(np.flatnonzero(arrays["state"][ep["start"]:ep["start"] + ep["length"], 3] < 0.5)[0])
        assert w[i] == (0.0 if ep["recovering"] and s < retry else 1.0)     # chunk s..s+3 starts before the retry
    tw.write_dataset(str(tmp_path / "rec"), arrays, meta)
    back, _ = tw.load_dataset(str(tmp_path / "rec"))
    assert np.array_equal(back["imitate"], arrays["imitate"])
    old = {k: v for k, v in arrays.items() if k != "imitate"}
    assert (tw.ClipDataset(old, meta, frames=5, horizon=4).get(np.arange(len(ds)))["action_weight"] == 1).all()


def test_overview_figure_has_one_row_per_split_and_the_32px_row(tmp_path):
    path = str(tmp_path / "world.png")
    tw.overview(path, res=64, frames=3)
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    w, h = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    assert (w, h) == (3 * 64, (len(tw.SPLITS) + 1) * 64)


def test_failing_demo_puts_a_distractor_in_the_bin_and_is_worth_zero():
    """Expert(wrong_prob=1): the object nearest the target goes to the bin, the named one stays on
    the table, no reward comes, so every true return is 0; the env flags the distractor grasp (and
    not `grasped`, which is the named object's stage). A clean demo never grasps a distractor."""
    env = tw.ToyWorld(res=32)
    for seed in range(5):
        clean, ok_c = tw.run_expert_episode(env, seed, "train")
        assert ok_c and not clean["wrong"]
        rec, ok = tw.run_expert_episode(env, seed, "train", wrong_prob=1.0)
        tgt = env.scene["target"]
        d = np.linalg.norm(env.scene["obj_xy"] - env.scene["obj_xy"][tgt], axis=1)
        d[tgt] = np.inf
        assert rec["wrong"] and not ok
        assert env.in_bin[int(np.argmin(d))] and not env.in_bin[tgt]     # the nearest distractor went in
        assert env.stages["distractor_grasped"] and not env.stages["grasped"]
        assert sum(rec["rewards"]) == 0 and not tw.mc_returns(np.array(rec["rewards"], np.float32), 0.91).any()
        assert len(rec["frames"]) < env.max_steps                        # ends once the object is released


def test_failing_demos_are_kept_flagged_and_not_imitated():
    arrays, meta = tw.generate(8, "train", seed0=0, wrong_frac=0.5)
    eps = meta["episodes"]
    wrong = np.array([e["wrong_object"] for e in eps])
    assert wrong.any() and not wrong.all() and meta["expert_failures"] == 0
    assert all(e["success"] != e["wrong_object"] for e in eps)
    for e in eps:
        v = arrays["value"][e["start"]:e["start"] + e["length"]]
        assert (v.max() == 0) == e["wrong_object"]                         # failing demos: returns 0 throughout
    ds = tw.ClipDataset(arrays, meta, frames=5, horizon=4)
    batch = ds.get(np.arange(len(ds)))
    ep = ds.index[:, 0]
    assert torch.equal(batch["action_weight"], torch.from_numpy((~wrong[ep]).astype(np.float32)))
    _, clean_meta = tw.generate(3, "train", seed0=0)                      # the default draws no extra numbers:
    assert [e["seed"] for e in clean_meta["episodes"]] == [0, 1, 2]       # same seeds, same demos as before
    assert not any(e["wrong_object"] for e in clean_meta["episodes"])


def test_a_dataset_without_distractors_holds_one_object_per_frame():
    """generate(distractors=False) (data/toyworld.py --no-distractors): the same seeds and instructions as
    the default dataset, one object in every frame's segmentation, recorded in meta; failing demos need
    distractors and say so."""
    arrays, meta = tw.generate(3, "train", seed0=0, distractors=False)
    _, full = tw.generate(3, "train", seed0=0)
    assert meta["distractors"] is False and full["distractors"] is True
    assert [e["instruction"] for e in meta["episodes"]] == [e["instruction"] for e in full["episodes"]]
    assert all(e["target"] == 0 and len(e["shapes"]) == 1 for e in meta["episodes"])
    assert arrays["seg"].max() == tw.SEG_OBJ0 and (arrays["seg"] == tw.SEG_OBJ0).any((1, 2)).mean() > 0.9
    with pytest.raises(ValueError, match="needs distractors"):
        tw.generate(2, "train", wrong_frac=0.5, distractors=False)


def test_a_marked_target_changes_only_the_named_objects_pixels():
    """ToyWorld(mark_target=True) / generate(mark_target=True) (data/toyworld.py --mark-target): every frame
    is the default frame except that the named object's visible pixels are MARK_COLOR; segmentation,
    states and actions are the same demos; meta and world_options record it."""
    arrays, meta = tw.generate(3, "train", seed0=0, mark_target=True)
    plain, pmeta = tw.generate(3, "train", seed0=0)
    assert meta["mark_target"] is True and pmeta["mark_target"] is False
    assert tw.world_options(meta) == {"distractors": True, "mark_target": True, "view": "wide", "distractor_band": "any",
                                       "shape_texture": False}
    assert tw.world_options({}) == {"distractors": True, "mark_target": False, "view": "wide",     # datasets from before
                                    "distractor_band": "any", "shape_texture": False}
    for k in ("seg", "state", "actions"):
        assert np.array_equal(arrays[k], plain[k]), k
    tgt = np.concatenate([np.full(e["length"], tw.SEG_OBJ0 + e["target"]) for e in meta["episodes"]])
    mask = arrays["seg"] == tgt[:, None, None]                             # the named object's pixels, per frame
    assert mask.any((1, 2)).mean() > 0.9
    assert (arrays["frames"][mask] == tw.MARK_COLOR).all()
    assert np.array_equal(arrays["frames"][~mask], plain["frames"][~mask])
    assert not (plain["frames"] == tw.MARK_COLOR).all(-1).any()           # no other pixel has the marker colour
    env = tw.ToyWorld(mark_target=True)
    obs, info = env.reset(seed=100003, split="ood_object")
    assert (obs[info["seg"] == tw.SEG_OBJ0 + env.scene["target"]] == tw.MARK_COLOR).all()


def test_shape_texture_draws_each_shapes_pattern_on_its_pixels_alone():
    """ToyWorld(shape_texture=True) / generate(shape_texture=True) (data/toyworld.py --shape-texture): a frame is
    the plain frame except on object pixels, where a cube's pixels with (u + v) odd, a cone's with v odd are the
    colour x TEXTURE_DARK (rounded) and a ball's are unchanged; segmentation, states and actions are the same demos;
    meta and world_options record it, and sample.py evaluates a checkpoint in its data's world."""
    import sample
    arrays, meta = tw.generate(3, "train", seed0=0, view="close", distractor_band="near", shape_texture=True)
    plain, pmeta = tw.generate(3, "train", seed0=0, view="close", distractor_band="near")
    assert meta["shape_texture"] is True and pmeta["shape_texture"] is False
    assert tw.world_options(meta)["shape_texture"] is True and tw.world_options(pmeta)["shape_texture"] is False
    for k in ("seg", "state", "actions"):
        assert np.array_equal(arrays[k], plain[k]), k
    v, u = np.indices(arrays["seg"].shape[1:])
    dark_pixels = {"cube": (u + v) % 2 == 1, "cone": v % 2 == 1, "ball": np.zeros_like(u, bool)}
    changed = np.zeros(arrays["seg"].shape, bool)
    seen = set()
    for e in meta["episodes"]:
        sl = slice(e["start"], e["start"] + e["length"])
        for k, shape in enumerate(e["shapes"]):
            obj = arrays["seg"][sl] == tw.SEG_OBJ0 + k
            if obj.any():
                seen.add(shape)
            dark = obj & dark_pixels[shape]
            col = np.array(tw.COLORS[e["colors"][k]], float)
            assert (arrays["frames"][sl][dark] == np.round(col * tw.TEXTURE_DARK)).all(), shape
            assert (arrays["frames"][sl][obj & ~dark] == col).all(), shape
            changed[sl] |= dark
    assert seen == {"cube", "ball", "cone"}                          # the three scenes show every shape
    assert changed.any()
    assert np.array_equal(arrays["frames"][~changed], plain["frames"][~changed])
    assert (arrays["frames"][changed] != plain["frames"][changed]).any(-1).all()
    args = sample.get_args(["--ckpt", "runs/x"])
    assert sample.eval_world(args, {"data": {"view": "close", "shape_texture": True}})["shape_texture"] is True
    assert sample.eval_world(args, {"data": {"view": "close"}})["shape_texture"] is False      # checkpoints from before
    textured = {"view": "wide", "distractor_band": "any", "shape_texture": True}              # a row of its own
    assert sample.eval_settings(sample.get_args(["--ckpt", "x", "--steps", "1"]), "eawm", None, textured)["shape_texture"]


def test_one_object_scenes_are_the_same_scenes_without_distractors():
    """ToyWorld(distractors=False) (sample.py --no-distractors): for each seed and split the one object is
    the default scene's target, same place, colour, shape and instruction, on the same table."""
    full, one = tw.ToyWorld(res=32), tw.ToyWorld(res=32, distractors=False)
    for split in tw.SPLITS:
        for seed in range(100000, 100006):
            full.reset(seed=seed, split=split)
            one.reset(seed=seed, split=split)
            t = full.scene["target"]
            assert len(one.scene["shapes"]) == 1 and one.scene["target"] == 0
            assert np.allclose(one.scene["obj_xy"][0], full.scene["obj_xy"][t])
            assert (one.scene["colors"][0], one.scene["shapes"][0]) == (full.scene["colors"][t], full.scene["shapes"][t])
            assert one.instruction() == full.instruction() and np.array_equal(one.scene["table"], full.scene["table"])
            assert np.allclose(one.scene["bin"], full.scene["bin"])


def test_the_close_view_shows_larger_unoccluded_objects_and_keeps_the_task():
    """ToyWorld(view="close") (data/toyworld.py --view close): the same objects, tables and instructions as
    the wide view per seed (placed with the larger objects' spacing), seen closer: every object covers at
    least 15 pixels at 32x32 (the wide view: 3-4 px wide, fewer than 15 on most seeds), and the arm starts
    retracted, so no object pixel is hidden behind it at reset (the wide view: an object partly hidden in
    about half the scenes); meta and world_options record it."""
    close, wide = tw.ToyWorld(view="close"), tw.ToyWorld()
    areas, hidden = {"close": [], "wide": []}, {"close": 0, "wide": 0}
    for s in range(30):
        for name, env in (("close", close), ("wide", wide)):
            _, info = env.reset(seed=s)
            seen = [int((info["seg"] == tw.SEG_OBJ0 + k).sum()) for k in range(len(env.scene["shapes"]))]
            env.q = np.array([np.pi, -1.5, 0.0])                          # the arm turned away from the table
            _, seg = env.render()
            whole = [int((seg == tw.SEG_OBJ0 + k).sum()) for k in range(len(env.scene["shapes"]))]
            areas[name] += whole
            hidden[name] += seen != whole                                 # some object pixel behind the arm at reset
        assert close.instruction() == wide.instruction()
        assert sorted(zip(close.scene["colors"], close.scene["shapes"])) == sorted(zip(wide.scene["colors"], wide.scene["shapes"]))
    assert hidden["close"] == 0 and hidden["wide"] >= 10
    assert min(areas["close"]) >= 15 and np.median(areas["wide"]) < 15
    assert np.mean(areas["close"]) > 2 * np.mean(areas["wide"])
    arrays, meta = tw.generate(2, "train", seed0=0, view="close")
    assert meta["view"] == "close" and tw.world_options(meta)["view"] == "close"
    assert not np.allclose(meta["camera"]["K"], tw.generate(1, "train", seed0=0)[1]["camera"]["K"])
    with pytest.raises(ValueError, match="expected one of"):
        tw.ToyWorld(view="fisheye")


def test_distractors_in_the_named_objects_band_take_away_the_nearest_object_shortcut():
    """ToyWorld(distractor_band="near") (data/toyworld.py --distractor-band near): in train-like scenes every
    object lies in the near band, so the named object is the one nearest the robot's base in about half the
    scenes (by chance with 2-3 objects) instead of about 3 in 4 ("any", the default); the same targets,
    colours and instructions per seed, ood_layout unchanged; meta and world_options record it."""
    near_env, any_env = tw.ToyWorld(view="close", distractor_band="near"), tw.ToyWorld(view="close")
    nearest = {"near": [], "any": []}
    for s in range(100000, 100200):
        for name, env in (("near", near_env), ("any", any_env)):
            env.reset(seed=s)
            nearest[name].append(np.argmin(np.linalg.norm(env.scene["obj_xy"], axis=1)) == env.scene["target"])
        x = near_env.scene["obj_xy"][:, 0]
        assert ((x >= tw.NEAR_BAND[0]) & (x <= tw.NEAR_BAND[1])).all()
        assert near_env.instruction() == any_env.instruction()
        assert sorted(zip(near_env.scene["colors"], near_env.scene["shapes"])) == \
            sorted(zip(any_env.scene["colors"], any_env.scene["shapes"]))
    assert np.mean(nearest["any"]) > 0.7 and 0.35 < np.mean(nearest["near"]) < 0.6
    for s in range(100000, 100010):                                          # ood_layout: the same scenes
        near_env.reset(seed=s, split="ood_layout")
        any_env.reset(seed=s, split="ood_layout")
        assert np.array_equal(near_env.scene["obj_xy"], any_env.scene["obj_xy"])
    _, meta = tw.generate(2, "train", seed0=0, distractor_band="near")
    assert meta["distractor_band"] == "near" and tw.world_options(meta)["distractor_band"] == "near"
    with pytest.raises(ValueError, match="expected one of"):
        tw.ToyWorld(distractor_band="far")


def test_same_colour_distractors_make_the_shape_word_matter():
    """ToyWorld(same_color_frac=p) (data/toyworld.py --same-color-frac p): in a share p of the scenes with
    distractors the first distractor has the named object's colour and another shape (a training pair, never a
    held-out one), so the shape word tells them apart; by chance it is about 1 in 7 scenes; p = 0 draws nothing
    extra, so every seed's scene is the one it always was; the expert still succeeds; meta records it and the
    evaluation world (world_options) does not take it over."""
    def twin(env):
        sc = env.scene
        t = sc["target"]
        return any(c == sc["colors"][t] and s != sc["shapes"][t] for i, (c, s) in enumerate(zip(sc["colors"], sc["shapes"]))
                   if i != t)
    plain, zero = tw.ToyWorld(view="close", distractor_band="near"), tw.ToyWorld(view="close", distractor_band="near", same_color_frac=0.0)
    always = tw.ToyWorld(view="close", distractor_band="near", same_color_frac=1.0)
    half = tw.ToyWorld(view="close", distractor_band="near", same_color_frac=0.5)
    seen = {"plain": [], "half": []}
    for s in range(200):
        a, _ = plain.reset(seed=s)
        b, _ = zero.reset(seed=s)
        assert np.array_equal(a, b) and plain.instruction() == zero.instruction()
        seen["plain"].append(twin(plain))
        always.reset(seed=s)
        assert twin(always)                                                  # every scene here has 2-3 objects
        pairs = list(zip(always.scene["colors"], always.scene["shapes"]))
        assert len(set(pairs)) == len(pairs)
        t = always.scene["target"]
        assert not any(p in tw.HELD_OUT_COMBOS for i, p in enumerate(pairs) if i != t)
        half.reset(seed=s)
        seen["half"].append(twin(half))
    assert 0.08 < np.mean(seen["plain"]) < 0.22 and 0.45 < np.mean(seen["half"]) < 0.7
    always.reset(seed=3, split="ood_object")                                 # a held-out target: its colour's train shapes
    assert twin(always) and (always.scene["colors"][always.scene["target"]],
                             always.scene["shapes"][always.scene["target"]]) in tw.HELD_OUT_COMBOS
    assert np.mean([tw.run_expert_episode(always, s, "train")[1] for s in range(25)]) >= 0.96
    _, meta = tw.generate(2, "train", seed0=0, view="close", same_color_frac=1.0)
    assert meta["same_color_frac"] == 1.0 and "same_color_frac" not in tw.world_options(meta)
    with pytest.raises(ValueError, match="same_color_frac"):
        tw.ToyWorld(same_color_frac=1.5)


def test_paired_demos_name_each_object_of_a_scene_in_turn():
    """generate(targets_per_scene=k) (data/toyworld.py --targets-per-scene k): each training scene is
    demonstrated up to k times, same first frame, a different object named each time (the drawn one first,
    then the others of its band), so only the words tell the demos apart; the expert still succeeds, the
    scene is otherwise unchanged, and k = 1 is the plain dataset."""
    arrays, meta = tw.generate(9, "train", seed0=0, view="close", distractor_band="near", targets_per_scene=3)
    eps = meta["episodes"]
    assert meta["targets_per_scene"] == 3 and all(e["success"] for e in eps)
    by_seed = {}
    for e in eps:
        by_seed.setdefault(e["seed"], []).append(e)
    env = tw.ToyWorld(view="close", distractor_band="near")
    for seed, group in by_seed.items():
        env.reset(seed=seed)
        assert group[0]["target"] == env.scene["target"]                       # the drawn one first
        assert len({e["target"] for e in group}) == len(group)                 # each object named once
        assert len({e["instruction"] for e in group}) == len(group)
        firsts = [arrays["frames"][e["start"]] for e in group]
        assert all(np.array_equal(firsts[0], f) for f in firsts[1:])          # the same first frame
        if group is not by_seed[max(by_seed)]:                                 # the last scene may be cut short
            assert len(group) == len(env.scene["shapes"])                     # near band: every object named
    assert len(by_seed) < len(eps)
    env.reset(seed=3, target=1)
    plain = tw.ToyWorld(view="close", distractor_band="near")
    plain.reset(seed=3)
    assert env.scene["target"] == 1 and np.array_equal(env.scene["obj_xy"], plain.scene["obj_xy"])
    assert env.instruction() == f"put the {plain.scene['colors'][1]} {plain.scene['shapes'][1]} in the bin"
    any_env = tw.ToyWorld(view="close")                                        # default band: far objects are not named
    for s in range(20):
        any_env.reset(seed=s)
        for t in tw.scene_targets(any_env, s, "train", 3)[1:]:
            assert tw.NEAR_BAND[0] <= any_env.scene["obj_xy"][t, 0] <= tw.NEAR_BAND[1]
    a1, m1 = tw.generate(3, "train", seed0=0, targets_per_scene=1)
    a0, _ = tw.generate(3, "train", seed0=0)
    assert np.array_equal(a1["frames"], a0["frames"]) and [e["seed"] for e in m1["episodes"]] == [0, 1, 2]
    with pytest.raises(ValueError, match="has 2 objects|has 3 objects"):
        env.reset(seed=3, target=5)
    with pytest.raises(ValueError, match="train split only"):
        tw.generate(2, "ood_object", targets_per_scene=2)


def test_clip_target_mask_is_the_named_objects_pixels_in_the_current_frame(toy_data):
    _, arrays, meta = toy_data
    ds = tw.ClipDataset(arrays, meta, 9, 8)
    rows = np.arange(0, len(ds), 37)
    b = ds.get(rows)
    ep = ds.index[rows, 0]
    expected = b["seg"][:, 0] == torch.from_numpy(tw.SEG_OBJ0 + ds.targets[ep])[:, None, None]
    assert b["target_mask"].dtype == torch.bool and torch.equal(b["target_mask"], expected)
    assert b["target_mask"].flatten(1).any(1).float().mean() > 0.5            # mostly visible
    assert torch.equal(b["target_mask"] & ~b["interaction_mask"][:, 0], torch.zeros_like(b["target_mask"]))


def test_arm_likeness_is_one_on_the_arm_and_zero_on_every_other_colour_of_the_toy():
    others = list(tw.COLORS.values()) + tw.TRAIN_TABLE + tw.TRAIN_WALL + tw.OOD_TABLE + tw.OOD_WALL \
        + [tw.BIN_COLOR, tw.GRIPPER_COLOR, tw.MARK_COLOR]
    px = np.array([tw.ARM_COLOR, (195, 200, 210)] + others, np.uint8)[None]     # (1, N, 3)
    a = tw.arm_likeness(px)[0]
    assert a[0] == 1.0 and a[1] == pytest.approx((195 - 165) / 60)            # a blurred arm pixel: a fraction
    assert (a[2:] == 0).all()


def test_fit_arm_reads_the_end_effector_back_from_rendered_frames_and_follows_a_moved_arm():
    """Analysis by synthesis on frames the world renders: the fitted joints' tool centre point is where the true one
    projects, within half a pixel on average, on a demo of every split (the objects, the held one too, drawn
    over the arm); and a frame whose arm is moved is read at the moved arm, not at the demo's."""
    errs = []
    for split in tw.SPLITS:
        env = tw.ToyWorld(res=32)
        rec, _ = tw.run_expert_episode(env, 100000 + tw.SPLITS.index(split), split)
        frames = np.stack(rec["frames"])[::3]
        ee = np.stack(rec["ee"])[::3, :3].astype(np.float64)
        q, uv = tw.fit_arm(frames, env.K, env.T_wc)
        errs.append(np.linalg.norm(uv - tw.project(ee, env.K, env.T_wc)[0], axis=-1))
        assert np.abs(q - np.stack(rec["state"])[::3, :3]).mean() < 0.1
    errs = np.concatenate(errs)
    assert errs.mean() < 0.6 and np.median(errs) < 0.6 and errs.max() < 1.5                 # measured 0.38, 0.39, 1.18
    env = tw.ToyWorld(res=32)
    env.reset(seed=100000)
    before = env.ee_pos().copy()
    env.q = env.q + np.array([0.3, 0.2, -0.2])                                   # move the arm, render again
    frame, _ = env.render()
    uv = tw.fit_arm(frame[None], env.K, env.T_wc)[1][0]
    moved, still = (tw.project(p[None], env.K, env.T_wc)[0][0] for p in (env.ee_pos(), before))
    assert np.linalg.norm(moved - still) > 3
    assert np.linalg.norm(uv - moved) < 0.75
