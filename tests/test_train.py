"""The training loop and sampler end to end on the tiny AGRA preset: train -> save -> resume (bit-exact)
-> sample; bad input; DDP with gloo on 2 CPU processes."""
import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import sample
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--batch-size", "4", "--log-every", "100", "--threads", "2", "--set", "ground_steps=0",   # the loop alone
        "--set", "finetune_steps=0"]


def losses(folder):
    return [json.loads(line) for line in open(os.path.join(folder, "metrics.jsonl"))]


@pytest.fixture(scope="module")
def run6(toy_data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run6"))
    train.main(["--model", "agra", "--tiny", "--steps", "6", "--data", toy_data[0], "--out", out] + FAST)
    return out


def test_resume_is_bit_exact(run6, toy_data, tmp_path):
    out = str(tmp_path / "split")
    train.main(["--model", "agra", "--tiny", "--steps", "6", "--stop-after", "3", "--data", toy_data[0], "--out", out] + FAST)
    assert len(losses(out)) == 3
    # a different --seed on resume changes nothing: both RNG states come from train_state.pt
    train.main(["--model", "agra", "--resume", out, "--data", toy_data[0], "--out", out, "--seed", "7"] + FAST)
    a, b = losses(run6), losses(out)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "video", "action", "agra", "lr", "grad_norm"):
        assert [r[key] for r in a] == [r[key] for r in b], key
    sd_a = train.load_model(run6)[1].state_dict()
    sd_b = train.load_model(out)[1].state_dict()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    assert train.read_checkpoint(out)[3]["run"] == {"seed": 0, "init": None, "pretrained": False}   # the first run's, kept


def test_checkpoint_contents_and_sampling(run6, tmp_path):
    from safetensors import safe_open
    with safe_open(os.path.join(run6, "model.safetensors"), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["model"]) == "agra" and json.loads(meta["step"]) == 6
    assert json.loads(meta["config"])["agra_weight"] == 0.01 and "actions" in json.loads(meta["stats"])
    assert json.loads(meta["run"]) == {"seed": 0, "init": None, "pretrained": False}    # sample.py --compare pairs by seed
    state = torch.load(os.path.join(run6, "train_state.pt"), weights_only=True)
    assert state["step"] == 6 and "optimizer" in state
    out = str(tmp_path / "samples")
    res = sample.main(["--ckpt", run6, "--episodes", "2", "--splits", "train", "ood_layout", "--diag-clips", "4",
                       "--video-steps", "2", "--out", out, "--threads", "2"])
    assert set(res["splits"]) == {"train", "ood_layout"} and 0 <= res["splits"]["train"]["success"] <= 1
    for row in res["splits"].values():                  # the standard error next to each success rate
        p = row["success"]
        assert row["episodes"] == 2 and row["success_se"] == pytest.approx((p * (1 - p) / 2) ** 0.5)
    d = res["diagnostics"]["train"]
    assert 0 <= d["in_mask_ratio"] <= 1 and set(d["msr"]) == {"mean", "zero", "shuffle", "swap"}
    assert 0 < d["attention_entropy"] <= 1 and 0 <= d["current_frame_share"] <= 1
    assert d["current_frame_uniform"] == pytest.approx(1 / 3)           # 3 latent frames
    for f in ("rollout_train.gif", "agra_diagnostics_train.png", "metrics.json"):
        assert os.path.getsize(os.path.join(out, f)) > 100, f
    res = sample.main(["--ckpt", run6, "--episodes", "2", "--splits", "train", "--diag-clips", "0", "--no-distractors",
                       "--out", str(tmp_path / "alone"), "--threads", "2"])
    assert res["settings"]["distractors"] is False and res["splits"]["train"]["distractor_grasped"] == 0
    assert "mark_target" not in res["settings"]                          # only when set: older tables compare as before
    res = sample.main(["--ckpt", run6, "--episodes", "1", "--splits", "train", "--diag-clips", "0", "--mark-target",
                       "--gif-episodes", "0", "--out", str(tmp_path / "marked"), "--threads", "2"])
    assert res["settings"]["mark_target"] is True


def test_standard_error_of_a_success_rate():
    assert sample.standard_error(0.25, 12) == pytest.approx(0.125)        # sqrt(0.25 * 0.75 / 12) = sqrt(1/64)
    assert sample.standard_error(1.0, 50) == 0.0
    assert sample.standard_error(0.5, 0) != sample.standard_error(0.5, 0)  # no episodes: NaN, not 0


def test_success_row_close_miss_is_the_median_over_failures_that_closed():
    success = np.array([True, False, False, False, False])
    stages = [{"reached": r, "grasped": r, "lifted": r, "distractor_grasped": False, "close_miss": m, "close_toward": t}
              for r, m, t in ((True, 0.01, 0.01), (False, 0.09, 0.08), (False, None, None), (False, 0.07, None),
                              (False, 0.20, -0.10))]
    row = sample.success_row(success, stages)
    assert row["close_miss_failed"] == pytest.approx(0.09)                   # median of 0.09, 0.07, 0.20: success and
    assert row["success"] == 0.2 and row["reached"] == 0.2                   # the episode that never closed left out
    assert row["close_toward_failed"] == pytest.approx(-0.01)               # median of 0.08, -0.10 (None: no other object)
    none = sample.success_row(success[:1], stages[:1])                       # no failure: None
    assert none["close_miss_failed"] is None and none["close_toward_failed"] is None
    assert row["same_color_episodes"] == 0 and row["success_same_color"] is None and row["success_other_color"] == 0.2
    for st, twin in zip(stages, (True, True, False, True, False)):           # scenes where only the shape word names it
        st["same_color"] = twin
    row = sample.success_row(success, stages)
    assert row["same_color_episodes"] == 3 and row["success_same_color"] == pytest.approx(1 / 3)
    assert row["success_other_color"] == 0.0


def test_each_split_draws_its_own_noise(run6, tmp_path, monkeypatch):
    """sample.py starts every split's rollouts, the GIF's predicted video and the diagnostics from --seed: a split
    alone reads the same noise and gives the same figures as after another split with its GIF, and train.py
    --eval-every's quick_eval reads that noise too (the chunks here are the noise, so the draws are the oracle)."""
    from conftest import noise_policy
    draws = []
    monkeypatch.setattr(sample, "Policy", noise_policy(draws))
    flags = ["--ckpt", run6, "--episodes", "2", "--max-steps", "60", "--diag-clips", "4", "--video-steps", "2",
             "--threads", "2"]
    alone = sample.main(flags + ["--splits", "ood_object", "--gif-episodes", "0", "--out", str(tmp_path / "a")])
    first = [d.copy() for d in draws]
    assert len(first) == 15                                     # 60 steps, re-planned every 4
    draws.clear()
    both = sample.main(flags + ["--splits", "train", "ood_object", "--gif-episodes", "2", "--out", str(tmp_path / "b")])
    assert len(draws) == 30 and all(np.array_equal(a, b) for a, b in zip(draws, first + first))
    assert both["splits"]["ood_object"] == alone["splits"]["ood_object"]
    assert both["diagnostics"]["ood_object"] == alone["diagnostics"]["ood_object"]
    draws.clear()
    _, model, cfg, meta = train.load_model(run6)
    ev = sample.quick_eval("agra", model, cfg, meta["stats"], 2, splits=("ood_object",))
    assert all(np.array_equal(a, b) for a, b in zip(draws, first)) and len(draws) == 15
    assert ev["ood_object"] == {k: alone["splits"]["ood_object"][k] for k in ev["ood_object"]}


def test_eval_every_logs_success_and_leaves_the_run_unchanged(run6, toy_data, tmp_path):
    out = str(tmp_path / "ev")
    train.main(["--model", "agra", "--tiny", "--steps", "6", "--data", toy_data[0], "--out", out,
                "--eval-every", "4", "--eval-episodes", "1"] + FAST)
    recs = losses(out)
    evals = [r for r in recs if "eval" in r]
    assert [r["step"] for r in evals] == [4, 6]                            # every 4 steps and at the end
    for r in evals:
        assert set(r["eval"]) == {"train", "ood_background", "ood_object", "ood_layout"} and r["time"] >= 0
        for d in r["eval"].values():
            assert d["episodes"] == 1 and d["success"] in (0.0, 1.0) and 0 <= d["reached"] <= 1
    steps = [r for r in recs if "eval" not in r]
    assert [r["loss"] for r in steps] == [r["loss"] for r in losses(run6)]  # evaluating changes no training number
    sd_a, sd_b = train.load_model(run6)[1].state_dict(), train.load_model(out)[1].state_dict()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    curves = sample.main(["--curves", out, "--out", str(tmp_path / "cmp")])["curves"]   # the learning curve reads them
    assert [p["step"] for p in curves["rows"][0]["splits"]["train"]] == [4, 6]


def test_eval_every_evaluates_in_the_world_of_the_training_data(run6, tmp_path, monkeypatch):
    """A run on a --mark-target / --no-distractors / --view close / --distractor-band near dataset is evaluated
    in such scenes (the options are read from the dataset's meta.json), not in the default world; sample.py
    evaluates its checkpoint in the view and distractor band it was trained with unless its flags say otherwise."""
    from data.toyworld import generate, write_dataset
    folder = str(tmp_path / "marked")
    arrays, meta = generate(4, "train", seed0=0, mark_target=True, distractors=False, view="close", distractor_band="near")
    write_dataset(folder, arrays, meta)
    made = []
    real = sample.ToyWorld
    monkeypatch.setattr(sample, "ToyWorld", lambda **kw: made.append(kw) or real(**kw))
    run = str(tmp_path / "run")
    train.main(["--model", "agra", "--tiny", "--steps", "1", "--data", folder, "--out", run,
                "--eval-every", "1", "--eval-episodes", "1"] + FAST)
    assert len(made) == 4 and all(kw["mark_target"] and not kw["distractors"] and kw["view"] == "close"
                                  and kw["distractor_band"] == "near" for kw in made)
    for flags, view, band in (([], "close", "near"), (["--view", "wide", "--distractor-band", "any"], "wide", "any")):
        made.clear()
        res = sample.main(["--ckpt", run, "--episodes", "1", "--splits", "train", "--diag-clips", "0", "--gif-episodes", "0",
                           "--out", str(tmp_path / f"s_{view}"), "--threads", "2"] + flags)
        assert [(kw["view"], kw["distractor_band"]) for kw in made] == [(view, band)]
        assert res["settings"].get("view", "wide") == view and res["settings"].get("distractor_band", "any") == band


def test_a_short_run_lowers_the_loss(toy_data):
    """40 Adam steps on one batch lower the loss measured with the same fixed noise before and after."""
    import copy

    import agra
    from data.toyworld import VOCAB
    cfg = copy.deepcopy(agra.CONFIGS["tiny"])
    cfg.vocab = tuple(VOCAB)
    cfg.lr_video = cfg.lr_head                  # from scratch here: the preset's 1/10 is for after its ground stage
    torch.manual_seed(0)
    model = agra.Model(cfg)
    data = train.dataset_for(cfg, toy_data[1], toy_data[2])
    batch = data.sample(8, torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.param_groups(), lr=2e-3)

    def evaluate():
        torch.manual_seed(123)
        with torch.no_grad():
            return model.loss(batch)[1]
    before = evaluate()
    torch.manual_seed(1)
    for _ in range(40):
        loss, _ = model.loss(batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
    after = evaluate()
    assert after["video"] < 0.9 * before["video"] and after["action"] < 0.97 * before["action"]


def test_bad_input_is_named(run6, toy_data, tmp_path):
    with pytest.raises(ValueError, match="unknown config key 'agra_wieght'.*did you mean"):
        train.main(["--model", "agra", "--tiny", "--set", "agra_wieght=0", "--data", toy_data[0], "--out", str(tmp_path)])
    with pytest.raises(SystemExit):                                   # argparse: invalid choice
        train.main(["--model", "gpt", "--tiny"])
    with pytest.raises(ValueError, match="checkpoint of model 'agra', but --model eawm"):
        train.load_model(run6, expect="eawm")
    bad = tmp_path / "trunc"
    bad.mkdir()
    data = open(os.path.join(run6, "model.safetensors"), "rb").read()
    open(bad / "model.safetensors", "wb").write(data[: len(data) // 3])
    with pytest.raises(ValueError, match="truncated"):
        train.load_model(str(bad))
    with pytest.raises(FileNotFoundError, match="missing"):
        train.main(["--model", "agra", "--tiny", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path)])


def test_tiny_preset_grounds_first_like_the_two_commands(toy_data, tmp_path):
    """AGRA's tiny preset (ground_steps > 0) trains stage ground into <out>/ground, then the joint run from
    it: the same losses and weights as the two commands `--stage ground --steps 2` and `--init` that run."""
    one, two_g, two = (str(tmp_path / n) for n in ("one", "two_g", "two"))
    train.main(["--model", "agra", "--tiny", "--steps", "3", "--data", toy_data[0], "--out", one] + FAST
               + ["--set", "ground_steps=2"])
    train.main(["--model", "agra", "--tiny", "--stage", "ground", "--steps", "2", "--data", toy_data[0], "--out", two_g] + FAST)
    train.main(["--model", "agra", "--tiny", "--steps", "3", "--init", two_g, "--data", toy_data[0], "--out", two] + FAST)
    g1, g2, j1, j2 = (losses(f) for f in (os.path.join(one, "ground"), two_g, one, two))
    assert [r["step"] for r in g1] == [1, 2] and "ground" in g1[0] and [r["step"] for r in j1] == [1, 2, 3]
    assert [r["loss"] for r in g1] == [r["loss"] for r in g2] and [r["loss"] for r in j1] == [r["loss"] for r in j2]
    sd_a, sd_b = train.load_model(one)[1].state_dict(), train.load_model(two)[1].state_dict()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    meta = train.read_checkpoint(one)[3]
    assert meta["run"]["init"] == os.path.join(one, "ground") and meta["step"] == 3
    cfg = train.read_checkpoint(one)[1]
    assert (cfg.stage, cfg.lr_video, cfg.lr_head) == ("joint", 1e-4, 1e-3)        # App. C.3's ratio after grounding
    assert train.read_checkpoint(os.path.join(one, "ground"))[1].stage == "ground"


def test_tiny_preset_fine_tunes_after_joint_like_the_three_commands(toy_data, tmp_path):
    """AGRA's tiny preset (finetune_steps > 0): stage ground into <out>/ground, stage joint from it into <out>/joint,
    then stage finetune (App. C.3: the video model frozen, the head alone) into <out>: the same losses and weights as
    the three commands. With --steps 0 the joint stage is skipped (the head fine-tuned on the grounded video model)."""
    one, g, j, f = (str(tmp_path / n) for n in ("one", "g", "j", "f"))
    sets = ["--set", "ground_steps=2", "--set", "finetune_steps=2"]
    train.main(["--model", "agra", "--tiny", "--steps", "3", "--data", toy_data[0], "--out", one] + FAST + sets)
    train.main(["--model", "agra", "--tiny", "--stage", "ground", "--steps", "2", "--data", toy_data[0], "--out", g] + FAST)
    train.main(["--model", "agra", "--tiny", "--steps", "3", "--init", g, "--data", toy_data[0], "--out", j] + FAST)
    train.main(["--model", "agra", "--tiny", "--stage", "finetune", "--steps", "2", "--init", j, "--data", toy_data[0],
                "--out", f] + FAST)
    for a, b in ((os.path.join(one, "ground"), g), (os.path.join(one, "joint"), j), (one, f)):
        assert [r["loss"] for r in losses(a)] == [r["loss"] for r in losses(b)]
    assert [r["step"] for r in losses(one)] == [1, 2] and set(losses(one)[0]) >= {"action"}
    assert "video" not in losses(one)[0] and "video" in losses(j)[0]                      # finetune: no L_vid
    sd_a, sd_b = train.load_model(one)[1].state_dict(), train.load_model(f)[1].state_dict()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    sd_j = train.load_model(j)[1].state_dict()                                           # the video model is frozen
    assert all(torch.equal(sd_a[k], sd_j[k]) for k in sd_a if k.startswith(("video.", "text_encoder.")))
    assert not all(torch.equal(sd_a[k], sd_j[k]) for k in sd_a if k.startswith("head."))
    cfg, meta = train.read_checkpoint(one)[1], train.read_checkpoint(one)[3]
    assert (cfg.stage, cfg.steps, meta["step"], meta["run"]["init"]) == ("finetune", 2, 2, os.path.join(one, "joint"))
    assert train.read_checkpoint(os.path.join(one, "joint"))[1].stage == "joint"
    skip = str(tmp_path / "skip")                                                         # --steps 0: ground, then finetune
    train.main(["--model", "agra", "--tiny", "--steps", "0", "--data", toy_data[0], "--out", skip] + FAST + sets)
    assert not os.path.exists(os.path.join(skip, "joint")) and len(losses(skip)) == 2
    assert train.read_checkpoint(skip)[3]["run"]["init"] == os.path.join(skip, "ground")
    with pytest.raises(SystemExit, match="frozen video model"):
        train.main(["--model", "agra", "--tiny", "--steps", "0", "--data", toy_data[0], "--out", str(tmp_path / "x")]
                   + FAST + ["--set", "finetune_steps=2"])


def test_default_dataset_follows_the_preset(tmp_path):
    """Without --data, AGRA's and MV-WAM's tiny presets train on the close view with distractors in the named
    object's band (cached apart from the wide view's default, which `--preset scratch` and EA-WM use), the
    same episodes as data/toyworld.py --view close --distractor-band near."""
    from data.toyworld import default_dataset, generate
    for name in ("agra", "mvwam"):
        folder, world = train.default_data_folder(train.make_config(name, "tiny"))
        assert world == {"view": "close", "distractor_band": "near"} and os.path.basename(folder) == "close_near"
        assert train.default_data_folder(train.make_config(name, "tiny"), 1000)[0] == folder + "_1000"   # --episodes 1000
    for name, preset in (("agra", "scratch"), ("mvwam", "scratch"), ("eawm", "tiny")):
        assert train.default_data_folder(train.make_config(name, preset)) == (train.DEFAULT_DATA, {"view": "wide", "distractor_band": "any"})
    arrays, meta = default_dataset(str(tmp_path / "c"), episodes=2, quiet=True, **world)
    ref, _ = generate(2, "train", view="close", distractor_band="near")
    assert (meta["view"], meta["distractor_band"]) == ("close", "near")
    assert all(np.array_equal(arrays[k], ref[k]) for k in ref)


@pytest.mark.skipif(sys.platform != "linux", reason="gloo DDP test runs on Linux CI")
def test_ddp_two_cpu_processes(toy_data, tmp_path):
    out = str(tmp_path / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "train.py"), "--model", "agra", "--tiny", "--steps", "2", "--batch-size", "2",
           "--data", toy_data[0], "--out", out, "--threads", "1", "--set", "ground_steps=1",   # + the ground stage first
           "--set", "finetune_steps=1"]                                                          # and finetune after
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "batch 2x1x2" in r.stdout and len(losses(out)) == 1 and len(losses(os.path.join(out, "joint"))) == 2
    assert len(losses(os.path.join(out, "ground"))) == 1
    train.load_model(out)


def test_init_says_which_settings_differ_from_its_checkpoint(toy_data, tmp_path, capsys):
    """--init takes a checkpoint's weights, not its settings: a run whose Config differs from the checkpoint's
    (a WAM run continued without --set agra_weight=0) says which fields, old -> new; the fields a run's stages
    change by design (stage, steps, finetune_steps) and a matching run say nothing."""
    wam, cont = str(tmp_path / "wam"), str(tmp_path / "cont")
    train.main(["--model", "agra", "--tiny", "--steps", "1", "--data", toy_data[0], "--out", wam] + FAST
               + ["--set", "agra_weight=0"])
    capsys.readouterr()
    train.main(["--model", "agra", "--tiny", "--stage", "finetune", "--steps", "1", "--init", wam, "--data", toy_data[0],
                "--out", cont] + FAST)
    assert "settings differ from those it was trained with: agra_weight 0.0 -> 0.01 (" in capsys.readouterr().out
    train.main(["--model", "agra", "--tiny", "--stage", "finetune", "--steps", "1", "--init", wam, "--data", toy_data[0],
                "--out", cont + "2"] + FAST + ["--set", "agra_weight=0"])
    assert "settings differ" not in capsys.readouterr().out
    a = train.read_checkpoint(wam)[1]
    b = copy.deepcopy(a)
    b.stage, b.steps, b.finetune_steps, b.lr_head = "finetune", 7, 0, 2e-3
    assert train.config_changes(a, b) == [("lr_head", a.lr_head, 2e-3)]
