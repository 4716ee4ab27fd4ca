"""compare.py (sample.py --compare / --curves) on fake run folders: a 1-parameter model.safetensors with
train.py's metadata plus a hand-written metrics.json / metrics.jsonl, so no training runs. Grouping,
the standard error and the marker against hand-computed values, the files written, clear errors."""
import copy
import json
import math
import os
import xml.etree.ElementTree as ET

import pytest
import torch

import compare
import sample
from common import config_to_dict, save_weights


def fake_run(root, name, model="agra", step=100, metrics=None, jsonl=None, sub="samples", seed=None, data=None, **fields):
    """A run folder as train.py + sample.py write it; `fields` override the tiny preset's Config; `seed`:
    the training seed train.py records (None: a checkpoint from before it did); `data`: the dataset metadata."""
    import train
    cfg = copy.deepcopy(train.model_module(model).CONFIGS["tiny"])
    for k, v in fields.items():
        setattr(cfg, k, v)
    folder = os.path.join(str(root), name)
    os.makedirs(folder, exist_ok=True)
    save_weights(os.path.join(folder, "model.safetensors"), {"w": torch.zeros(1)},
                 {"model": model, "config": config_to_dict(cfg), "step": step, "data": data or {"res": 32, "gamma": 0.99},
                  **({"run": {"seed": seed, "init": None}} if seed is not None else {})})
    if metrics is not None:
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
        with open(os.path.join(folder, sub, "metrics.json"), "w") as f:
            json.dump(metrics, f)
    if jsonl is not None:
        with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in jsonl))
    return folder


def agra_metrics(train, layout, in_mask=0.05, steps=4, episodes=20):
    return {"model": "agra", "episodes": episodes, "settings": {"steps": steps, "episodes": episodes, "seed": 100000},
            "splits": {"train": {"success": train, "episodes": episodes, "reached": 1.0}, "ood_layout": {"success": layout}},
            "diagnostics": {s: {"in_mask_ratio": in_mask, "mask_fraction": 0.04, "centroid_error": 1.5,
                                "msr": {"mean": 1.0}, "attention_entropy": 0.9, "current_frame_share": 0.2,
                                "current_frame_uniform": 1 / 3} for s in ("train", "ood_layout")}}


@pytest.fixture
def wam_vs_agra(tmp_path):
    """3 seeds of the WAM baseline (agra_weight=0) and of AGRA (0.01), success given per seed."""
    runs = []
    for s, (tr, lay) in enumerate([(0.5, 0.0), (0.6, 0.1), (0.7, 0.2)]):
        runs.append(fake_run(tmp_path, f"wam_s{s}", metrics=agra_metrics(tr, lay, 0.04), agra_weight=0.0))
    for s, (tr, lay) in enumerate([(0.8, 0.1), (0.9, 0.2), (0.85, 0.3)]):
        runs.append(fake_run(tmp_path, f"agra_s{s}", metrics=agra_metrics(tr, lay, 0.08)))
    return runs


def test_runs_differing_in_one_field_become_two_rows_and_seeds_merge(wam_vs_agra, tmp_path):
    res = compare.compare_runs(wam_vs_agra, splits=("train", "ood_layout"), out_dir=str(tmp_path / "cmp"), quiet=True)
    assert res["differing_fields"] == ["agra_weight"]
    assert [r["name"] for r in res["rows"]] == ["agra_weight=0", "agra_weight=0.01"]   # first run given = baseline
    assert [r["seeds"] for r in res["rows"]] == [3, 3]
    assert res["baseline"] == "agra_weight=0"


def test_standard_error_and_marker_hand_computed(wam_vs_agra, tmp_path):
    res = compare.compare_runs(wam_vs_agra, splits=("train", "ood_layout"), out_dir=str(tmp_path / "cmp"), quiet=True)
    wam, agra = (r["metrics"]["success"] for r in res["rows"])
    # train: WAM 50, 60, 70 -> mean 60, sample std 10, SE 10 / sqrt(3); AGRA 80, 90, 85 -> 85, std 5, SE 5 / sqrt(3)
    assert wam["train"]["mean"] == pytest.approx(60.0) and wam["train"]["se"] == pytest.approx(10 / math.sqrt(3))
    assert agra["train"]["mean"] == pytest.approx(85.0) and agra["train"]["se"] == pytest.approx(5 / math.sqrt(3))
    # difference 25 > 2 sqrt(100/3 + 25/3) = 12.9: marked
    assert agra["train"]["combined_se"] == pytest.approx(math.sqrt(125 / 3)) and agra["train"]["differs"]
    # ood_layout: 0, 10, 20 vs 10, 20, 30 -> difference 10 < 2 sqrt(2 * 100/3) = 16.3: not marked
    assert agra["ood_layout"]["diff"] == pytest.approx(10.0) and not agra["ood_layout"]["differs"]
    assert "differs" not in wam["train"]                                # the baseline is not tested against itself
    # the mean over splits is taken per seed first: WAM (25, 35, 45) -> 35 +- 10 / sqrt(3)
    assert wam["mean"]["mean"] == pytest.approx(35.0) and wam["mean"]["se"] == pytest.approx(10 / math.sqrt(3))
    assert wam["train"]["n_per_seed"] == [20, 20, 20]
    # the diagnostics go through the same path, with the chance level carried along
    im = res["rows"][1]["metrics"]["in_mask_ratio"]["train"]
    assert im["mean"] == pytest.approx(0.08) and im["se"] == pytest.approx(0.0) and im["ref"] == pytest.approx(0.04)
    cur = res["rows"][0]["metrics"]["current_frame_share"]["train"]       # with its uniform-attention level
    assert cur["mean"] == pytest.approx(0.2) and cur["ref"] == pytest.approx(1 / 3)
    assert res["rows"][0]["metrics"]["attention_entropy"]["ood_layout"]["mean"] == pytest.approx(0.9)
    assert wam["train"]["values"] == pytest.approx([50, 60, 70])
    reached = res["rows"][0]["metrics"]["reached"]                      # stage flags, in % like success
    assert reached["train"]["mean"] == 100.0 and "ood_layout" not in reached


def test_a_runs_evaluations_of_the_same_episodes_count_them_once(tmp_path):
    """Two metrics.json of one run with the same settings (the same 20 episodes, evaluated twice) average
    their values and count 20 episodes (they counted 40); one with another episode seed is a row of its own."""
    base = fake_run(tmp_path, "wam", metrics=agra_metrics(0.4, 0.0), agra_weight=0.0)
    fake_run(tmp_path, "agra", metrics=agra_metrics(0.5, 0.0))
    run = fake_run(tmp_path, "agra", metrics=agra_metrics(0.7, 0.0), sub="again")
    twice = ("samples/metrics.json", "again/metrics.json")
    res = compare.compare_runs([base, run], twice, splits=("train",), out_dir=str(tmp_path / "c1"), quiet=True)
    cell = res["rows"][1]["metrics"]["success"]["train"]
    assert cell["values"] == pytest.approx([60.0]) and cell["n_per_seed"] == [20]
    other = agra_metrics(0.9, 0.0)
    other["settings"]["seed"] = 200000
    fake_run(tmp_path, "agra", metrics=other, sub="seed2")
    res = compare.compare_runs([base, run], twice + ("seed2/metrics.json",), splits=("train",), out_dir=str(tmp_path / "c2"),
                               quiet=True)
    assert [r["name"] for r in res["rows"]] == ["agra_weight=0, sample.seed=100000", "agra_weight=0.01, sample.seed=100000",
                                                "agra_weight=0.01, sample.seed=200000"]
    assert [r["metrics"]["success"]["train"]["n_per_seed"] for r in res["rows"]] == [[20], [20], [20]]


def test_paired_by_seed_hand_computed(wam_vs_agra, tmp_path):
    """The same runs with their seeds recorded: the differences to the baseline per seed."""
    paired = []
    for run in wam_vs_agra:                                             # wam_s0..2, agra_s0..2: seed from the name
        with open(os.path.join(run, "samples", "metrics.json")) as f:
            m = json.load(f)
        name = os.path.basename(run)
        paired.append(fake_run(tmp_path / "seeded", name, metrics=m, seed=int(name[-1]),
                               agra_weight=0.0 if name.startswith("wam") else 0.01))
    res = compare.compare_runs(paired, splits=("train", "ood_layout"), out_dir=str(tmp_path / "cmp"), quiet=True)
    agra = res["rows"][1]["metrics"]["success"]
    # train: AGRA - WAM per seed = 80-50, 90-60, 85-70 = 30, 30, 15 -> 25, sample std sqrt(75), SE 5: marked
    p = agra["train"]["paired"]
    assert p["seeds"] == [0, 1, 2] and p["diffs"] == pytest.approx([30, 30, 15])
    assert p["diff"] == pytest.approx(25.0) and p["se"] == pytest.approx(5.0) and p["differs"]
    # ood_layout: 10 - 0, 20 - 10, 30 - 20 = 10 each, SE 0: resolved by pairing, not by the independent test
    assert agra["ood_layout"]["paired"]["diff"] == pytest.approx(10.0) and agra["ood_layout"]["paired"]["se"] == 0.0
    assert agra["ood_layout"]["paired"]["differs"] and not agra["ood_layout"]["differs"]
    # mean over splits per seed: AGRA 45, 55, 57.5; WAM 25, 35, 45 -> 20, 20, 12.5
    assert agra["mean"]["paired"]["diffs"] == pytest.approx([20, 20, 12.5])
    assert "paired" not in res["rows"][0]["metrics"]["success"]["train"]          # not the baseline against itself
    md = open(tmp_path / "cmp" / "comparison.md").read()
    assert "| success %: row - first, paired by seed | agra_weight=0.01 | 3 |  | +25.0 ± 5.0 * | +10.0 ± 0.0 * |" in md
    assert "paired by seed = mean" in md
    # no pairing without recorded seeds (the unseeded fixture), nor with fewer than two seeds in common
    plain = compare.compare_runs(wam_vs_agra, splits=("train",), out_dir=str(tmp_path / "c2"), quiet=True)
    assert "paired" not in plain["rows"][1]["metrics"]["success"]["train"]
    one = compare.compare_runs(paired[:2] + paired[5:], splits=("train",), out_dir=str(tmp_path / "c3"), quiet=True)
    assert "paired" not in one["rows"][1]["metrics"]["success"]["train"]            # seeds {0, 1} vs {2}
    # two seeds paired: ood_layout's differences 10, 10 have SE 0, but two seeds are never marked
    two = compare.compare_runs(paired[:2] + paired[3:5], splits=("ood_layout",), out_dir=str(tmp_path / "c4"), quiet=True)
    p2 = two["rows"][1]["metrics"]["success"]["ood_layout"]["paired"]
    assert p2["seeds"] == [0, 1] and p2["se"] == 0.0 and not p2["differs"]


def test_table_json_md_and_svg_are_written(wam_vs_agra, tmp_path, capsys):
    out = str(tmp_path / "cmp")
    sample.main(["--compare", *wam_vs_agra, "--splits", "train", "ood_layout", "--out", out])
    text = capsys.readouterr().out
    assert "agra_weight=0.01" in text and "85.0 ± 2.9 *" in text and "60.0 ± 5.8" in text
    assert "20.0 ± 5.8 " in text.replace("\n", " ")                     # ood_layout of AGRA, unmarked
    with open(os.path.join(out, "comparison.json")) as f:
        assert json.load(f)["rows"][1]["metrics"]["success"]["train"]["values"] == pytest.approx([80, 90, 85])
    md = open(os.path.join(out, "comparison.md")).read()
    assert "| success % | agra_weight=0.01 | 3 | 20 | 85.0 ± 2.9 * |" in md
    svg = ET.parse(os.path.join(out, "comparison.svg")).getroot()
    ns = "{http://www.w3.org/2000/svg}"
    bars = [r for r in svg.iter(ns + "rect") if r.find(ns + "title") is not None]
    assert len(bars) == 2 * 2                                            # 2 rows x 2 splits
    texts = [t.text for t in svg.iter(ns + "text")]
    assert {"agra_weight=0", "agra_weight=0.01", "train", "ood_layout", "split", "success %"} <= set(texts)
    assert texts.count("*") == 1                                          # the one marked cell


def test_default_out_is_next_to_the_runs(wam_vs_agra, tmp_path):
    compare.compare_runs(wam_vs_agra, splits=("train",), quiet=True)
    assert os.path.isfile(tmp_path / "compare" / "comparison.svg")


def test_evaluation_settings_and_rollback_become_rows(tmp_path):
    """MV-WAM x0 with 1 and 5 denoising steps (two evaluations of each run in sub-folders) + rollback."""
    def mv(success, steps, rollback=None):
        m = {"model": "mvwam", "episodes": 10, "settings": {"steps": steps, "episodes": 10},
             "splits": {"train": {"success": success}}, "value": {"train": {"pearson": 0.9, "mae": 0.02, "n": 32}}}
        if rollback is not None:
            m["rollback_delta"] = 0.2
            m["splits"]["train"].update(success_rollback=rollback, rollbacks_per_episode=1.5, rollback_won=0.25,
                                        rollback_lost=0.05, rollback_fired_failing=0.8, rollback_episodes=5,
                                        rollback_fire_step=30.0, rollback_restore_step=22.0)
        return m
    runs = []
    for s in range(2):
        r = fake_run(tmp_path, f"x0_s{s}", "mvwam", metrics=mv(0.5 + 0.1 * s, 5, rollback=0.7))
        fake_run(tmp_path, f"x0_s{s}", "mvwam", metrics=mv(0.1 * s, 1), sub="samples_steps1")
        runs.append(r)
    res = compare.compare_runs(runs, ("samples*/metrics.json",), splits=("train",), out_dir=str(tmp_path / "c"), quiet=True)
    names = [r["name"] for r in res["rows"]]
    assert names == ["sample.steps=5, sample.rollback=off", "sample.steps=5, sample.rollback=0.2",
                     "sample.steps=1, sample.rollback=off"]
    base, rb, one = (r["metrics"] for r in res["rows"])
    assert base["success"]["train"]["mean"] == pytest.approx(55.0) and rb["success"]["train"]["mean"] == pytest.approx(70.0)
    assert one["success"]["train"]["mean"] == pytest.approx(5.0) and rb["rollbacks_per_episode"]["train"]["mean"] == 1.5
    assert rb["rollback_won"]["train"]["mean"] == pytest.approx(25) and rb["rollback_lost"]["train"]["mean"] == pytest.approx(5)
    assert rb["rollback_fired_failing"]["train"]["mean"] == pytest.approx(80)
    assert rb["rollback_fire_step"]["train"]["mean"] == 30 and rb["rollback_restore_step"]["train"]["mean"] == 22
    assert base["value_pearson"]["train"]["mean"] == pytest.approx(0.9) and "value_pearson" not in rb


def test_runs_differing_only_in_the_generated_dataset_size_field_share_a_row(tmp_path):
    """toy_episodes says what train.py generates (`--episodes` overrides it); the dataset's metadata says what a run
    trained on, so a run of flags (toy_episodes 400, --episodes 1000) and one of a preset with toy_episodes=1000 on the
    same data share a row."""
    a = fake_run(tmp_path, "flags", metrics=agra_metrics(0.9, 0.1), seed=0)
    b = fake_run(tmp_path, "preset", metrics=agra_metrics(0.8, 0.1), seed=1, toy_episodes=1000)
    res = compare.compare_runs([a, b], splits=("train",), out_dir=str(tmp_path / "c"), quiet=True)
    assert res["differing_fields"] == [] and len(res["rows"]) == 1
    assert res["rows"][0]["metrics"]["success"]["train"]["mean"] == pytest.approx(85.0)


def test_a_toy_scene_option_added_after_a_run_keeps_its_default(tmp_path):
    """A run trained before train.py recorded data.shape_texture saw the untextured world: it shares a row with
    a run that recorded shape_texture=False, not with one that trained on textures; a real dataset's metadata
    (it names its "source") gets no toy-world options."""
    old = fake_run(tmp_path, "old", metrics=agra_metrics(0.9, 0.1), seed=0)
    new = fake_run(tmp_path, "new", metrics=agra_metrics(0.7, 0.1), seed=1,
                   data={"res": 32, "gamma": 0.99, "view": "wide", "distractor_band": "any", "shape_texture": False})
    tex = fake_run(tmp_path, "tex", metrics=agra_metrics(0.5, 0.1), seed=0,
                   data={"res": 32, "gamma": 0.99, "shape_texture": True})
    res = compare.compare_runs([old, new, tex], splits=("train",), out_dir=str(tmp_path / "c"), quiet=True)
    assert res["differing_fields"] == ["data.shape_texture"]
    assert [r["name"] for r in res["rows"]] == ["data.shape_texture=False", "data.shape_texture=True"]
    assert res["rows"][0]["metrics"]["success"]["train"]["mean"] == pytest.approx(80.0)
    real = fake_run(tmp_path, "real", data={"source": "lerobot/pusht", "fps": 10})
    assert compare.read_run(real)["data"] == {"source": "lerobot/pusht", "fps": 10}


def test_eawm_psnr_with_the_copy_first_reference(tmp_path):
    def ea(psnr):
        split = {"kvaf": {"psnr": psnr, "latent_mse": 0.03, "ee_track_px": 1.5}, "joint": {"psnr": psnr - 1, "latent_mse": 0.04,
                 "ee_track_px": float("nan")}, "copy_first": {"psnr": 21.0, "latent_mse": 0.033, "ee_track_px": 4.0}}
        return {"model": "eawm", "clips": 16, "splits": {"train": split}}
    runs = [fake_run(tmp_path, "full", "eawm", metrics=ea(22.0)), fake_run(tmp_path, "plain", "eawm", metrics=ea(20.0), fusion="plain")]
    res = compare.compare_runs(runs, splits=("train",), out_dir=str(tmp_path / "c"), quiet=True)
    assert [r["name"] for r in res["rows"]] == ["fusion=event", "fusion=plain"]
    cell = res["rows"][1]["metrics"]["psnr_kvaf"]["train"]
    assert cell["mean"] == 20.0 and cell["se"] is None and cell["ref"] == 21.0 and "differs" not in cell   # one seed
    assert "ee_track_px" not in res["rows"][0]["metrics"]                # NaN: the heatmap was never found
    assert res["rows"][0]["metrics"]["ee_track_px_true"]["train"]["mean"] == 1.5   # the recovery on the true KVAF
    assert res["rows"][0]["metrics"]["psnr_kvaf"]["train"]["n_per_seed"] == [16]
    assert "ee_track_px_first" not in res["rows"][0]["metrics"]          # a metrics.json from before the thirds


def test_eawm_track_by_episode_third(tmp_path):
    """sample.py's ee_track_px_thirds become three rows, each counting the clips in its third and showing the arm held
    still in that third as its reference."""
    def ea(first, seed):
        split = {"kvaf": {"psnr": 25.0, "latent_mse": 0.03, "ee_track_px": 0.04},
                 "joint": {"psnr": 24.0, "latent_mse": 0.04, "ee_track_px": 2.0, "ee_track_px_thirds": [first, 1.5, 0.5],
                           "clips_thirds": [5, 6, 5]},
                 "copy_first": {"psnr": 21.0, "latent_mse": 0.033, "ee_track_px": 4.0, "ee_track_px_thirds": [3.0, 7.0, 2.0],
                                "clips_thirds": [5, 6, 5]}}
        return {"model": "eawm", "clips": 16, "splits": {"train": split}}
    runs = [fake_run(tmp_path, f"s{s}", "eawm", metrics=ea(x, s), seed=s) for s, x in ((0, 3.0), (1, 2.0))]
    m = compare.compare_runs(runs, splits=("train",), out_dir=str(tmp_path / "c"), quiet=True)["rows"][0]["metrics"]
    assert m["ee_track_px_first"]["train"]["mean"] == 2.5 and m["ee_track_px_first"]["train"]["se"] == pytest.approx(0.5)
    assert m["ee_track_px_first"]["train"]["ref"] == 3.0 and m["ee_track_px_first"]["train"]["n_per_seed"] == [5, 5]
    assert m["ee_track_px_middle"]["train"]["mean"] == 1.5 and m["ee_track_px_middle"]["train"]["n_per_seed"] == [6, 6]
    assert m["ee_track_px_last"]["train"]["ref"] == 2.0
    assert "clips in the episode's first third" in open(tmp_path / "c" / "comparison.md").read()


def test_eawm_track_against_another_objects_expert(tmp_path):
    """sample.py's ee_other_px_thirds / closer_to_other_thirds: the first third's values become two rows, the first with
    the true track's own distance to those tracks as its reference."""
    def ea(other, seed):
        split = {"kvaf": {"psnr": 25.0, "latent_mse": 0.03, "ee_track_px": 0.04},
                 "joint": {"psnr": 24.0, "latent_mse": 0.04, "ee_track_px": 2.0, "ee_track_px_thirds": [3.0, 1.5, 0.5],
                           "clips_thirds": [5, 6, 5], "ee_other_px_thirds": [other, 4.0, 3.0],
                           "closer_to_other_thirds": [0.2 * seed, 0.1, 0.0]},
                 "copy_first": {"psnr": 21.0, "latent_mse": 0.033, "ee_track_px": 4.0, "ee_track_px_thirds": [3.0, 7.0, 2.0],
                                "clips_thirds": [5, 6, 5]},
                 "true_track": {"ee_other_px_thirds": [3.5, 4.5, 2.5]}}
        return {"model": "eawm", "clips": 16, "splits": {"ood_layout": split}}
    runs = [fake_run(tmp_path, f"s{s}", "eawm", metrics=ea(x, s), seed=s) for s, x in ((0, 2.0), (1, 3.0))]
    m = compare.compare_runs(runs, splits=("ood_layout",), out_dir=str(tmp_path / "c"), quiet=True)["rows"][0]["metrics"]
    assert m["ee_other_px_first"]["ood_layout"]["mean"] == 2.5 and m["ee_other_px_first"]["ood_layout"]["ref"] == 3.5
    assert m["ee_other_px_first"]["ood_layout"]["n_per_seed"] == [5, 5]
    assert m["closer_to_other_first"]["ood_layout"]["mean"] == pytest.approx(0.1)
    assert "first third, from the expert's track to another object" in open(tmp_path / "c" / "comparison.md").read()


def test_clear_errors(wam_vs_agra, tmp_path):
    other = fake_run(tmp_path, "mv", "mvwam", metrics={"model": "mvwam", "episodes": 1, "splits": {"train": {"success": 0}}})
    with pytest.raises(ValueError, match="different models.*wam_s0: agra.*mv: mvwam"):
        compare.compare_runs([wam_vs_agra[0], other], quiet=True)
    with pytest.raises(ValueError, match="two or more run folders.*sample.py --ckpt RUN"):
        compare.compare_runs(wam_vs_agra[:1], quiet=True)
    bare = fake_run(tmp_path, "bare")
    with pytest.raises(FileNotFoundError, match=r"bare: no evaluation matches --metrics samples/metrics.json; "
                                               r"write one with `python sample.py --ckpt .*bare`"):
        compare.compare_runs([wam_vs_agra[0], bare], quiet=True)
    broken = fake_run(tmp_path, "broken", metrics={"model": "agra", "splits": {"train": {"reached": 0.5}}})
    with pytest.raises(ValueError, match=r"broken/samples/metrics.json splits.train: no 'success'; re-run `python sample.py --ckpt"):
        compare.compare_runs([wam_vs_agra[0], broken], quiet=True)
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="empty: no model.safetensors"):
        compare.compare_runs([wam_vs_agra[0], str(tmp_path / "empty")], quiet=True)


def test_learning_curves_group_like_compare(tmp_path):
    def log(values):                                                     # train success at steps 100 and 200
        return ([{"step": 1, "loss": 1.0}] + [{"step": st, "time": 10.0 * st, "eval": {"train": {"success": v, "episodes": 20},
                                                                                           "ood_layout": {"success": 0.0}}}
                                              for st, v in zip((100, 200), values)])
    runs = [fake_run(tmp_path, f"wam_s{s}", jsonl=log(v), agra_weight=0.0) for s, v in enumerate([(0.1, 0.4), (0.3, 0.6)])]
    runs += [fake_run(tmp_path, f"agra_s{s}", jsonl=log(v)) for s, v in enumerate([(0.2, 0.7), (0.2, 0.9)])]
    out = str(tmp_path / "c")
    res = sample.main(["--curves", *runs, "--out", out])["curves"]
    wam, agra = res["rows"]
    assert (wam["name"], agra["name"]) == ("agra_weight=0", "agra_weight=0.01")
    p = wam["splits"]["train"][1]                                        # step 200: 40, 60 -> 50 +- 10
    assert (p["step"], p["mean"], p["se"], p["seeds"], p["time"]) == (200, pytest.approx(50.0), pytest.approx(10.0), 2, 2000.0)
    assert agra["splits"]["train"][0]["se"] == 0.0
    svg = ET.parse(os.path.join(out, "curves.svg")).getroot()
    ns = "{http://www.w3.org/2000/svg}"
    assert len(list(svg.iter(ns + "polyline"))) == 2 * 2 and len(list(svg.iter(ns + "polygon"))) == 2 * 2
    assert "training step" in [t.text for t in svg.iter(ns + "text")]
    flat = fake_run(tmp_path, "flat", jsonl=[{"step": 1, "loss": 1.0}])
    with pytest.raises(ValueError, match="no evaluation lines; train with .*--eval-every N"):
        compare.learning_curves([flat], quiet=True)


def test_a_two_stage_run_is_one_curve_counted_on_from_the_joint_stage(tmp_path):
    """--preset long writes stage joint into RUN/joint and stage finetune into RUN: read_curve chains them, the
    finetune stage's steps and times counted on from the joint stage's last step (4) and its last time (41 s,
    after its evaluation);
    the SVG marks where the finetune stage starts."""
    ev = lambda st, t, v: {"step": st, "time": t, "eval": {"train": {"success": v, "episodes": 20}}}   # noqa: E731
    run = fake_run(tmp_path, "long_s0", jsonl=[{"step": 1, "loss": 1.0, "time": 3.0}, ev(3, 5.0, 0.5), ev(6, 9.0, 0.75)])
    fake_run(run, "joint", jsonl=[ev(2, 10.0, 0.25), {"step": 3, "loss": 0.5, "time": 30.0},
                                  {"step": 4, "loss": 0.4, "time": 40.0}, ev(4, 41.0, 0.5)])
    curve = compare.read_curve(run)
    assert curve["finetune_from"] == 4 and curve["metric"] == "success"
    assert {st: (p["time"], p["splits"]["train"]) for st, p in curve["points"].items()} == {
        2: (10.0, 25.0), 4: (41.0, 50.0), 7: (46.0, 50.0), 10: (50.0, 75.0)}
    out = str(tmp_path / "c")
    res = compare.learning_curves([run], out_dir=out, quiet=True)
    assert [p["step"] for p in res["rows"][0]["splits"]["train"]] == [2, 4, 7, 10] and res["finetune_from"] == [4]
    svg = ET.parse(os.path.join(out, "curves.svg")).getroot()
    assert any(ln.get("stroke-dasharray") for ln in svg.iter("{http://www.w3.org/2000/svg}line"))
    assert compare.read_curve(os.path.join(run, "joint"))["finetune_from"] is None     # one stage: as before
    quiet = fake_run(tmp_path, "quiet_s0", jsonl=[ev(3, 5.0, 0.5)])       # a joint stage without evaluations
    fake_run(quiet, "joint", jsonl=[{"step": 4, "loss": 0.4, "time": 40.0}])
    assert {st: p["time"] for st, p in compare.read_curve(quiet)["points"].items()} == {7: 45.0}
    compare.learning_curves([quiet], out_dir=out, quiet=True)            # its stage start drawn, left of the points
    assert any(ln.get("stroke-dasharray") for ln in ET.parse(os.path.join(out, "curves.svg")).getroot().iter(
        "{http://www.w3.org/2000/svg}line"))
    bare = fake_run(tmp_path, "bare_s0", jsonl=[{"step": 1, "loss": 1.0}])   # neither stage evaluated
    fake_run(bare, "joint", jsonl=[{"step": 4, "loss": 0.4, "time": 40.0}])
    with pytest.raises(ValueError, match="no evaluation lines"):
        compare.read_curve(bare)


def test_nice_ticks():
    assert compare.nice_ticks(0, 87) == [0, 20, 40, 60, 80, 100]
    assert compare.nice_ticks(0, 0.05) == [0, 0.01, 0.02, 0.03, 0.04, 0.05]
    assert compare.nice_ticks(-0.2, 0.9) == [-0.5, 0, 0.5, 1.0]                 # step 0.5: the first of 1, 2, 5 >= 1.1 / 5


def test_sample_records_the_settings_that_group_evaluations():
    import agra
    import mvwam
    args = sample.get_args(["--ckpt", "runs/x", "--episodes", "7"])
    s = sample.eval_settings(args, "agra", agra.CONFIGS["tiny"])
    assert s["steps"] == agra.CONFIGS["tiny"].action_steps and s["episodes"] == 7 and s["exec_steps"] == 4
    args = sample.get_args(["--ckpt", "runs/x", "--steps", "1"])
    assert sample.eval_settings(args, "mvwam", mvwam.CONFIGS["tiny"])["steps"] == 1
    world = {"view": "close", "distractor_band": "any"}                       # only what is not the default
    s = sample.eval_settings(args, "agra", agra.CONFIGS["tiny"], world)
    assert s["view"] == "close" and "distractor_band" not in s
    assert sample.eval_settings(args, "eawm", None, {"view": "wide", "distractor_band": "near"})["distractor_band"] == "near"


def test_eawm_arm_in_the_video_rows(tmp_path):
    """sample.py's arm_px (toyworld.fit_arm on the generated frames) becomes a row per mode with the arm held still as
    its reference, and the fit on the true frames a row of its own."""
    def ea(kvaf_arm, seed):
        split = {"kvaf": {"psnr": 25.0, "latent_mse": 0.03, "ee_track_px": 0.04, "arm_px": kvaf_arm, "arm_px_se": 0.1,
                          "arm_px_thirds": [kvaf_arm + 1, kvaf_arm, kvaf_arm - 0.5]},
                 "joint": {"psnr": 24.0, "latent_mse": 0.04, "ee_track_px": 2.0, "ee_track_px_thirds": [3.0, 1.5, 0.5],
                           "clips_thirds": [5, 6, 5], "arm_px": 3.0, "arm_px_se": 0.2, "arm_px_thirds": [4.0, 3.0, 2.0]},
                 "copy_first": {"psnr": 21.0, "latent_mse": 0.033, "ee_track_px": 4.0, "ee_track_px_thirds": [3.0, 7.0, 2.0],
                                "clips_thirds": [5, 6, 5]},
                 "true_video": {"arm_px": 0.25, "arm_px_se": 0.02, "arm_px_thirds": [0.2, 0.3, 0.25]}}
        return {"model": "eawm", "clips": 16, "splits": {"train": split}}
    runs = [fake_run(tmp_path, f"s{s}", "eawm", metrics=ea(x, s), seed=s) for s, x in ((0, 1.0), (1, 2.0))]
    m = compare.compare_runs(runs, splits=("train",), out_dir=str(tmp_path / "c"), quiet=True)["rows"][0]["metrics"]
    assert m["arm_px_kvaf"]["train"]["mean"] == 1.5 and m["arm_px_kvaf"]["train"]["se"] == pytest.approx(0.5)
    assert m["arm_px_kvaf"]["train"]["ref"] == 4.0 and m["arm_px_joint"]["train"]["mean"] == 3.0
    assert m["arm_px_true"]["train"]["mean"] == 0.25
    assert m["arm_px_kvaf_first"]["train"]["mean"] == 2.5 and m["arm_px_kvaf_first"]["train"]["ref"] == 3.0
    assert m["arm_px_kvaf_first"]["train"]["n_per_seed"] == [5, 5]
    # a variant on the same seeds (w/o EAF): the arm rows get a paired line, as success and PSNR do
    plain = [fake_run(tmp_path, f"p{s}", "eawm", metrics=ea(x, s), seed=s, fusion="plain") for s, x in ((0, 1.5), (1, 3.0))]
    res = compare.compare_runs(runs + plain, splits=("train",), out_dir=str(tmp_path / "c2"), quiet=True)
    p = res["rows"][1]["metrics"]["arm_px_kvaf"]["train"]["paired"]
    assert p["seeds"] == [0, 1] and p["diffs"] == pytest.approx([0.5, 1.0]) and p["se"] == pytest.approx(0.25)
    assert res["rows"][1]["metrics"]["arm_px_joint"]["train"]["paired"]["diff"] == 0.0
    md = open(tmp_path / "c2" / "comparison.md").read()
    assert "| arm px in the video, KVAF-conditioned (the arm held still): row - first, paired by seed | fusion=plain | 2 |  " \
           "| +0.75 ± 0.25 |" in md
    assert "| EE track error px, joint (the arm held still): row - first, paired by seed | fusion=plain | 2 |  | +0.00 ± 0.00 |" in md
