"""Comparing runs: one table of variants (`sample.py --compare`) and learning curves (`sample.py --curves`).

    python sample.py --compare runs/wam_s* runs/agra_s*                 # rows agra_weight=0 | agra_weight=0.01
    python sample.py --compare runs/x0_s* --metrics 'samples*/metrics.json'   # + every evaluation of each run
    python sample.py --curves runs/wam_s* runs/agra_s*                  # success against training step

A run folder is what train.py writes (model.safetensors, whose metadata holds the model name, its Config,
the step and the dataset's metadata; metrics.jsonl) plus the metrics.json of each `sample.py --ckpt RUN`
evaluation. --compare groups the evaluations into rows by what tells them apart: the Config fields whose
values differ between the runs (but `toy_episodes`, which the dataset's own `data.episodes` records), the
checkpoint step ("ckpt_step"), the dataset metadata ("data.*") and the
settings sample.py recorded ("sample.*": denoising steps, episodes, rollback delta, ...). The training seed
is not a Config field, so the seeds of one recipe share a row. A row is named by its differing fields in
`--set` syntax (`agra_weight=0`); the first row (that of the first run given) is the baseline.

Every cell is the mean over seeds +- the standard error of that mean: SE = s / sqrt(n), s the sample
standard deviation (ddof 1) of the n per-seed values (a seed evaluated twice in one row counts once, with
the mean of its evaluations). A cell is marked `*` when it differs from the baseline row's cell by more
than 2 sqrt(SE_row^2 + SE_baseline^2), i.e. by more than about two standard errors of the difference of
two independent means: with 3+ seeds per row, a difference the seed-to-seed spread is unlikely to make.
Rows with one seed have no SE and are never marked.

Runs trained by this repository's train.py record their `--seed` (and `--init`) in the checkpoint: where a
row and the baseline hold runs of the same seeds (two or more in common), the table adds for the outcome
metrics (success, EA-WM's PSNR) a line "row - first, paired by seed": the per-seed differences' mean +- SE
(marked `*` beyond 2 SE when 3+ seeds are paired). Runs of one seed share their initialisation and data order (and, from one
`--init`, their start), so pairing removes the spread the two rows share and resolves smaller differences
than the independent test.

Success, the stages reached (object reached, grasped, lifted; a distractor grasped) and the failures' median
gripper-object distance at the first close of the fingers (against the grasp tolerance: a reach beside the
object or elsewhere) come from the closed-loop episodes (AGRA, MV-WAM; an MV-WAM evaluation with --rollback adds a row
"sample.rollback=<delta>" with its success, rollbacks per episode, the episodes it won and lost, paired by episode
with the evaluation's first pass, the share of the episodes where it fired that fail without it, and the median steps
it fired at and went back to), the diagnostics from held-out expert clips: AGRA's attention-in-mask ratio (chance level in
brackets), centroid error and Matched Sensitivity Ratio (AGRA Sec. 3.2, 4.2.1, Table 1), MV-WAM's value
against the Monte-Carlo return (Eq. 4) and its AUC between the named object and a distractor in hand,
EA-WM's PSNR / latent MSE against the true rendering (copy-first-frame level in brackets) and
end-effector track error.

Outputs (--out, default <the runs' common parent folder>/compare): comparison.md (the table as Markdown,
for a README), comparison.json (every number, the per-seed values included), comparison.svg (bars per split
with +- SE error bars, for the first metric: success, or EA-WM's KVAF-conditioned PSNR); curves.json and
curves.svg (one panel per split, mean line with a +- SE band). The SVGs are written by hand: no plotting
dependency. This module reads files only: no model is built and no episode is run.
"""
from __future__ import annotations

import json
import math
import os

from data.toyworld import SPLITS

SE_NOTE = ("mean ± SE over seeds; SE = sample standard deviation (ddof 1) of the per-seed values / "
           "sqrt(seeds); one value per seed: the mean over its evaluations in that row")
MARK_NOTE = ("* = differs from the first row (the baseline: the first run given) by more than "
             "2 sqrt(SE_row^2 + SE_first^2); needs 2+ seeds in both rows")
PAIRED_NOTE = ("row - first, paired by seed = mean +- SE of the per-seed differences to the first row over the seeds "
               "both rows hold (train.py --seed, recorded in the checkpoint); * = beyond 2 SE, with 3+ seeds paired")
# the outcome metrics that get a paired line in the table (comparison.json has it for every metric)
PAIRED = ("success", "psnr_kvaf", "psnr_joint", "ee_track_px", "arm_px_kvaf", "arm_px_joint")
# metric -> (label, decimals, reference shown in brackets); the reference is a property of the evaluated
# episodes or clips, not of the model: the share of tokens inside the interaction mask (the in-mask
# ratio of attention spread uniformly) and the first frame repeated (a model that predicts no motion)
METRICS = {
    "success": ("success %", 1, None),
    "reached": ("reached the object %", 1, None),
    "grasped": ("grasped it %", 1, None),
    "lifted": ("lifted it %", 1, None),
    "distractor_grasped": ("grasped a distractor %", 1, None),
    "close_miss_failed": ("failures: gripper-object distance at the first close", 3, None),
    "close_toward_failed": ("failures: that offset towards the nearest other object", 3, None),
    "success_same_color": ("success % when a distractor has its colour", 1, None),
    "success_other_color": ("success % otherwise", 1, None),
    "rollbacks_per_episode": ("rollbacks per episode", 2, None),
    "rollback_won": ("episodes that succeed only with rollback %", 1, None),
    "rollback_lost": ("episodes that succeed only without it %", 1, None),
    "rollback_fired_failing": ("episodes where it fired: failing without it %", 1, None),
    "rollback_fire_step": ("rollback: the step it fired at (median)", 1, None),
    "rollback_restore_step": ("rollback: the step it went back to (median)", 1, None),
    "in_mask_ratio": ("attention in mask (chance)", 3, "mask_fraction"),
    "centroid_error": ("attention centroid error", 2, None),
    "attention_entropy": ("attention entropy / uniform", 3, None),
    "current_frame_share": ("attention on the current frame (uniform)", 3, "current_frame_uniform"),
    "msr_mean": ("MSR, mean intervention", 2, None),
    "msr_zero": ("MSR, zero intervention", 2, None),
    "msr_shuffle": ("MSR, shuffle intervention", 2, None),
    "msr_swap": ("MSR, swap intervention", 2, None),
    "value_pearson": ("value vs return, Pearson r", 3, None),
    "value_mae": ("value vs return, MAE", 3, None),
    "value_holding_auc": ("value AUC, named object vs distractor in hand", 3, None),
    "psnr_kvaf": ("PSNR dB, KVAF-conditioned (copy first frame)", 2, "psnr_copy_first"),
    "psnr_joint": ("PSNR dB, joint (copy first frame)", 2, "psnr_copy_first"),
    "latent_mse_kvaf": ("latent MSE, KVAF-conditioned (copy first frame)", 4, "latent_mse_copy_first"),
    "ee_track_px": ("EE track error px, joint (the arm held still)", 2, "ee_track_px_still"),
    "ee_track_px_true": ("EE track error px, from the given true KVAF", 2, None),
    # the same by where the clip starts in its episode (sample.py's ee_track_px_thirds)
    "ee_track_px_first": ("EE track px, joint, clips in the episode's first third: approach (held still)", 2, "ee_track_px_first_still"),
    "ee_track_px_middle": ("EE track px, joint, clips in its middle third: grasp, carry (held still)", 2, "ee_track_px_middle_still"),
    "ee_track_px_last": ("EE track px, joint, clips in its last third: place (held still)", 2, "ee_track_px_last_still"),
    # the first third's joint track against the nearest expert track to another object (sample.py's ee_other_px_thirds)
    "ee_other_px_first": ("EE track px, joint, first third, from the expert's track to another object (the true track's)", 2,
                          "ee_other_px_first_true"),
    "closer_to_other_first": ("EE track, joint, first third: share of clips nearer that track than the true one", 2, None),
    # where the generated video puts the arm (sample.py's arm_px: toyworld.fit_arm on each RGB frame)
    "arm_px_kvaf": ("arm px in the video, KVAF-conditioned (the arm held still)", 2, "ee_track_px_still"),
    "arm_px_joint": ("arm px in the video, joint (the arm held still)", 2, "ee_track_px_still"),
    "arm_px_true": ("arm px read from the true video (the fit's floor)", 2, None),
    "arm_px_kvaf_first": ("arm px, KVAF-conditioned, clips in the episode's first third (held still)", 2, "ee_track_px_first_still"),
}


def read_run(run: str) -> dict:
    """-> {"run", "model", "config" (defaults filled in), "step", "data", "seed" (None for a checkpoint
    written before train.py recorded it)} from RUN/model.safetensors' metadata, without reading the weights."""
    import dataclasses
    from safetensors import safe_open
    from train import model_module
    f = os.path.join(run, "model.safetensors")
    if not os.path.isfile(f):
        raise FileNotFoundError(f"{run}: no model.safetensors; expected a run folder written by "
                                f"`python train.py --out {run}`")
    try:
        with safe_open(f, framework="pt") as fh:
            meta = {k: json.loads(v) for k, v in (fh.metadata() or {}).items()}
    except Exception as e:  # safetensors raises its own error types for truncated / foreign files
        raise ValueError(f"{f}: could not read it as a safetensors checkpoint ({e})") from None
    for key in ("model", "config"):
        if key not in meta:
            raise ValueError(f"{f}: no '{key}' in its metadata; expected a checkpoint written by train.py")
    # a Config field added after the run was trained keeps its default (which reproduces the old behaviour)
    defaults = {fl.name: (fl.default if fl.default is not dataclasses.MISSING else fl.default_factory())
                for fl in dataclasses.fields(model_module(meta["model"]).Config)}
    data = meta.get("data", {})
    if data and "source" not in data:             # the toy world: a scene option added after the run keeps its default
        from sample import WORLD_DEFAULTS
        data = {**WORLD_DEFAULTS, **data}
    return {"run": run, "model": meta["model"], "config": {**json.loads(json.dumps(defaults)), **meta["config"]},
            "step": meta.get("step"), "data": data, "seed": (meta.get("run") or {}).get("seed")}


def _need(d: dict, key: str, where: str, fix: str):
    """d[key], or an error naming the file, the missing key and the command that writes it."""
    if not isinstance(d, dict) or key not in d:
        raise ValueError(f"{where}: no '{key}'; {fix}")
    return d[key]


def read_evaluations(run: str, patterns=("samples/metrics.json",)) -> list[dict]:
    """Every metrics.json of RUN that matches one of `patterns` (globs relative to RUN) -> evaluations
    {"run", "file", "info" (read_run), "settings", "metrics": {metric: {split: value}}, "counts": {metric:
    {split: episodes or clips}}, "refs": {metric: {split: reference value}}}. An MV-WAM file written with
    --rollback gives two evaluations: without rollback and with it (setting "rollback" = delta)."""
    import glob
    info = read_run(run)
    files = sorted({f for p in patterns for f in glob.glob(os.path.join(glob.escape(run), p))})
    if not files:
        sub = os.path.dirname(patterns[0])
        out = "" if sub in ("", "samples") or any(c in sub for c in "*?[") else f" --out {os.path.join(run, sub)}"
        raise FileNotFoundError(f"{run}: no evaluation matches --metrics {' '.join(patterns)}; write one with "
                                f"`python sample.py --ckpt {run}{out}`")
    evals = []
    for f in files:
        with open(f) as fh:
            res = json.load(fh)
        fix = f"re-run `python sample.py --ckpt {run} --out {os.path.dirname(f)}` (it writes that key)"
        if res.get("model", info["model"]) != info["model"]:
            raise ValueError(f"{f} is an evaluation of model '{res['model']}', but {run} holds a '{info['model']}' checkpoint")
        splits = _need(res, "splits", f, fix)
        settings = res.get("settings") or {k: res[k] for k in ("episodes", "exec_steps", "clips") if k in res}
        ev = {"run": run, "file": f, "info": info, "settings": {**settings, "rollback": "off"},
              "metrics": {}, "counts": {}, "refs": {}}

        def put(e, metric, split, value, count, ref=None):
            if value is None or value != value:                  # missing or NaN (e.g. the EE heatmap never found)
                return
            e["metrics"].setdefault(metric, {})[split] = float(value)
            e["counts"].setdefault(metric, {})[split] = count
            if ref is not None:
                e["refs"].setdefault(metric, {})[split] = float(ref)

        if info["model"] == "eawm":
            for split, r in splits.items():
                where = f"{f} splits.{split}"
                kv, joint, still = (_need(r, k, where, fix) for k in ("kvaf", "joint", "copy_first"))
                n = res.get("clips")
                put(ev, "psnr_kvaf", split, _need(kv, "psnr", where + ".kvaf", fix), n, still.get("psnr"))
                put(ev, "psnr_joint", split, joint.get("psnr"), n, still.get("psnr"))
                put(ev, "latent_mse_kvaf", split, kv.get("latent_mse"), n, still.get("latent_mse"))
                put(ev, "ee_track_px", split, joint.get("ee_track_px"), n, still.get("ee_track_px"))
                put(ev, "ee_track_px_true", split, kv.get("ee_track_px"), n)
                if "ee_track_px_thirds" in joint:                     # metrics.json files before it: without these rows
                    for k, part in enumerate(("first", "middle", "last")):
                        put(ev, f"ee_track_px_{part}", split, joint["ee_track_px_thirds"][k], joint["clips_thirds"][k],
                            still["ee_track_px_thirds"][k])
                if "ee_other_px_thirds" in joint:                     # metrics.json files before it: without this row
                    put(ev, "ee_other_px_first", split, joint["ee_other_px_thirds"][0], joint["clips_thirds"][0],
                        r["true_track"]["ee_other_px_thirds"][0])
                    put(ev, "closer_to_other_first", split, joint["closer_to_other_thirds"][0], joint["clips_thirds"][0])
                if "arm_px" in kv:                                    # metrics.json files before it: without these rows
                    put(ev, "arm_px_kvaf", split, kv["arm_px"], n, still.get("ee_track_px"))
                    put(ev, "arm_px_joint", split, joint["arm_px"], n, still.get("ee_track_px"))
                    put(ev, "arm_px_true", split, r["true_video"]["arm_px"], n)
                    put(ev, "arm_px_kvaf_first", split, kv["arm_px_thirds"][0], joint["clips_thirds"][0],
                        still["ee_track_px_thirds"][0])
            evals.append(ev)
            continue
        rb = None
        if any("success_rollback" in r for r in splits.values()):
            rb = {**ev, "settings": {**settings, "rollback": res.get("rollback_delta")}, "metrics": {}, "counts": {}, "refs": {}}
        for split, r in splits.items():
            n = r.get("episodes", res.get("episodes"))
            put(ev, "success", split, 100 * _need(r, "success", f"{f} splits.{split}", fix), n)
            for stage in ("reached", "grasped", "lifted", "distractor_grasped"):   # toy world info["stages"]
                put(ev, stage, split, 100 * r[stage] if stage in r else None, n)
            put(ev, "close_miss_failed", split, r.get("close_miss_failed"), n)          # median over the failures
            put(ev, "close_toward_failed", split, r.get("close_toward_failed"), n)
            for k in ("success_same_color", "success_other_color"):        # only the shape word names it, or not
                put(ev, k, split, None if r.get(k) is None else 100 * r[k],
                    r.get("same_color_episodes") if k == "success_same_color" else
                    (None if r.get("same_color_episodes") is None else n - r["same_color_episodes"]))
            if rb is not None:
                put(rb, "success", split, 100 * _need(r, "success_rollback", f"{f} splits.{split}", fix), n)
                put(rb, "rollbacks_per_episode", split, r.get("rollbacks_per_episode"), n)
                for k in ("rollback_won", "rollback_lost"):                # paired by episode with the first pass
                    put(rb, k, split, None if r.get(k) is None else 100 * r[k], n)
                if r.get("rollback_fired_failing") is not None:            # over the episodes where one fired
                    put(rb, "rollback_fired_failing", split, 100 * r["rollback_fired_failing"], r.get("rollback_episodes"))
                for k in ("rollback_fire_step", "rollback_restore_step"):
                    put(rb, k, split, r.get(k), r.get("rollback_episodes"))
        for split, d in res.get("diagnostics", {}).items():        # AGRA (Sec. 3.2, 4.2.1, Table 1)
            n = d.get("n", settings.get("diag_clips"))
            put(ev, "in_mask_ratio", split, d.get("in_mask_ratio"), n, d.get("mask_fraction"))
            put(ev, "centroid_error", split, d.get("centroid_error"), n)
            put(ev, "attention_entropy", split, d.get("attention_entropy"), n)
            put(ev, "current_frame_share", split, d.get("current_frame_share"), n, d.get("current_frame_uniform"))
            for kind in ("mean", "zero", "shuffle", "swap"):
                put(ev, f"msr_{kind}", split, (d.get("msr") or {}).get(kind), n)
        for split, d in res.get("value", {}).items():              # MV-WAM value vs Monte-Carlo return (Eq. 4)
            put(ev, "value_pearson", split, d.get("pearson"), d.get("n"))
            put(ev, "value_mae", split, d.get("mae"), d.get("n"))
            put(ev, "value_holding_auc", split, d.get("holding_auc"), d.get("n_holding"))
        evals += [ev] + ([rb] if rb is not None else [])
    return evals


def _show(v) -> str:
    """A field value as `--set` writes it: 0.01, x0, 1,2,3, True; ? for a value that was not recorded."""
    if v is None:
        return "?"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return ",".join(_show(x) for x in v)
    return str(v)


def group_rows(evals: list[dict], with_settings: bool = True) -> tuple[list[str], list[dict]]:
    """Group evaluations by the fields that differ between them -> (differing field names, rows); rows in
    order of first appearance, each {"name", "fields", "evals"}. Fields: every Config field, the
    checkpoint step ("ckpt_step"), the dataset metadata ("data.*") and, with_settings, the evaluation
    settings ("sample.*"). Runs that differ only by their training seed share a row."""
    def identity(ev):
        info = ev["info"]
        out = dict(info["config"])
        out.pop("toy_episodes", None)             # what train.py would generate; data.episodes is what the run had
        if with_settings:
            out["ckpt_step"] = info["step"]
        out.update({f"data.{k}": v for k, v in info["data"].items()})
        if with_settings:
            out.update({f"sample.{k}": v for k, v in ev["settings"].items()})
        return out
    ids = [identity(ev) for ev in evals]
    keys = list(dict.fromkeys(k for i in ids for k in i))
    canon = lambda v: json.dumps(v, sort_keys=True)                          # noqa: E731
    differ = [k for k in keys if len({canon(i.get(k)) for i in ids}) > 1]
    rows = {}
    for ev, i in zip(evals, ids):
        key = tuple(canon(i.get(k)) for k in differ)
        if key not in rows:
            fields = {k: i.get(k) for k in differ}
            rows[key] = {"name": ", ".join(f"{k}={_show(v)}" for k, v in fields.items()) or "all runs",
                         "fields": fields, "evals": []}
        rows[key]["evals"].append(ev)
    return differ, list(rows.values())


def mean_se(xs) -> tuple[float, float | None]:
    """Mean and standard error of the mean (sample std with ddof 1 / sqrt(n)); SE is None for one value."""
    import statistics
    m = sum(xs) / len(xs)
    return m, (statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else None)


def compare_rows(rows: list[dict], splits: list[str]) -> list[dict]:
    """Per row, metric and split: the per-seed values (a run's evaluations in one row averaged), their
    mean +- SE, the episodes / clips per seed, the reference level, and the test against row 0."""
    out = []
    for row in rows:
        runs = list(dict.fromkeys(ev["run"] for ev in row["evals"]))
        metrics = {}
        for metric in METRICS:
            cells, per_run_splits = {}, {}
            for split in splits:
                vals, counts, refs = [], [], []
                for run in runs:
                    evs = [ev for ev in row["evals"] if ev["run"] == run and split in ev["metrics"].get(metric, {})]
                    if not evs:
                        continue
                    vals.append(sum(ev["metrics"][metric][split] for ev in evs) / len(evs))
                    c = {json.dumps(ev["settings"], sort_keys=True): ev["counts"][metric][split] for ev in evs}
                    counts.append(None if None in c.values() else sum(c.values()))   # the same episodes count once
                    refs += [ev["refs"][metric][split] for ev in evs if split in ev["refs"].get(metric, {})]
                    per_run_splits.setdefault(run, {})[split] = vals[-1]
                if vals:
                    m, se = mean_se(vals)
                    cells[split] = {"mean": m, "se": se, "seeds": len(vals), "values": vals, "n_per_seed": counts,
                                    "ref": sum(refs) / len(refs) if refs else None,
                                    "runs": [r for r in runs if split in per_run_splits.get(r, {})]}   # as `values`
            complete = [r for r, v in per_run_splits.items() if len(v) == len(splits)]
            whole = [sum(per_run_splits[r].values()) / len(splits) for r in complete]
            if whole and len(splits) > 1:
                m, se = mean_se(whole)
                refs = [cells[s]["ref"] for s in splits if s in cells]
                cells["mean"] = {"mean": m, "se": se, "seeds": len(whole), "values": whole, "n_per_seed": [],
                                 "ref": sum(refs) / len(refs) if refs and None not in refs else None, "runs": complete}
            if cells:
                metrics[metric] = cells
        files = [ev["file"] + ("" if ev["settings"]["rollback"] == "off" else f" (rollback {ev['settings']['rollback']})")
                 for ev in row["evals"]]
        out.append({"name": row["name"], "fields": row["fields"], "runs": runs, "seeds": len(runs), "evaluations": files,
                    "metrics": metrics})
    seed_of = {ev["run"]: ev["info"].get("seed") for row in rows for ev in row["evals"]}
    base = out[0]["metrics"]
    for r in out[1:]:                                                        # each row against the first
        for metric, cells in r["metrics"].items():
            for split, c in cells.items():
                b = base.get(metric, {}).get(split)
                if b is None:
                    continue
                if c["se"] is not None and b["se"] is not None:              # two independent means
                    c["diff"] = c["mean"] - b["mean"]
                    c["combined_se"] = math.sqrt(c["se"] ** 2 + b["se"] ** 2)
                    c["differs"] = abs(c["diff"]) > 2 * c["combined_se"]
                paired = paired_difference(c, b, seed_of)
                if paired is not None:
                    c["paired"] = paired
    return out


def paired_difference(cell: dict, base: dict, seed_of: dict) -> dict | None:
    """The per-seed differences cell - base over the seeds both hold -> {"seeds", "diffs", "diff", "se",
    "differs" (|diff| > 2 SE, with 3+ seeds: the SE of two differences is half their gap, 0 when they happen
    to be equal)}; None unless every run of both cells has a recorded seed, distinct within its row, and two
    or more seeds are common."""
    def by_seed(c):
        seeds = [seed_of.get(r) for r in c["runs"]]
        return None if None in seeds or len(set(seeds)) != len(seeds) else dict(zip(seeds, c["values"]))
    a, b = by_seed(cell), by_seed(base)
    common = sorted(set(a) & set(b)) if a is not None and b is not None else []
    if len(common) < 2:
        return None
    diffs = [a[s] - b[s] for s in common]
    m, se = mean_se(diffs)
    return {"seeds": common, "diffs": diffs, "diff": m, "se": se, "differs": len(common) >= 3 and abs(m) > 2 * se}


def _cell(c: dict, digits: int) -> str:
    text = f"{c['mean']:.{digits}f}" + (f" ± {c['se']:.{digits}f}" if c["se"] is not None else "")
    if c.get("ref") is not None:
        text += f" ({c['ref']:.{digits}f})"
    return text + (" *" if c.get("differs") else "")


def _paired_cell(p: dict, digits: int) -> str:
    return f"{p['diff']:+.{digits}f} ± {p['se']:.{digits}f}" + (" *" if p["differs"] else "")


def format_table(table: list[dict], splits: list[str], markdown: bool = False) -> str:
    """One table: a block of rows per metric; columns seeds, episodes (or clips) per seed, each split, mean."""
    cols = ["metric", "row", "seeds", "n/seed"] + splits + (["mean"] if len(splits) > 1 else [])
    lines = []
    for metric, (label, digits, _) in METRICS.items():
        for r in table:
            cells = r["metrics"].get(metric)
            if not cells:
                continue
            counts = {n for c in cells.values() for n in c["n_per_seed"]}
            n = "?" if None in counts or not counts else (str(min(counts)) if len(counts) == 1 else f"{min(counts)}-{max(counts)}")
            seeds = sorted({c["seeds"] for c in cells.values()})
            lines.append([label, r["name"], "-".join(map(str, seeds)), n]
                         + [_cell(cells[s], digits) if s in cells else "-" for s in cols[4:]])
        for r in table[1:] if metric in PAIRED else []:                     # row - first, paired by seed
            cells = r["metrics"].get(metric, {})
            pairs = {s: cells[s]["paired"] for s in cols[4:] if "paired" in cells.get(s, {})}
            if pairs:
                seeds = sorted({len(p["seeds"]) for p in pairs.values()})
                lines.append([f"{label}: row - first, paired by seed", r["name"], "-".join(map(str, seeds)), ""]
                             + [_paired_cell(pairs[s], digits) if s in pairs else "-" for s in cols[4:]])
    if markdown:
        return "\n".join(["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)] + ["| " + " | ".join(l) + " |" for l in lines])
    width = [max(len(x) for x in col) for col in zip(cols, *lines)]
    fmt = lambda l: "  ".join(x.ljust(w) if i < 2 else x.rjust(w) for i, (x, w) in enumerate(zip(l, width)))  # noqa: E731
    return "\n".join([fmt(cols)] + [fmt(l) for l in lines])


# ---------------------------------------------------------------- SVG figures (written by hand: no plotting dependency)

PALETTE = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c", "#ccb974", "#64b5cd")


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round tick values (1, 2, 5 x 10^k apart) covering [lo, hi]."""
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    return [round(k * step, 10) for k in range(math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9) + 1)]


def _svg(width: float, height: float, body: list[str]) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
            f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="sans-serif" font-size="12">\n'
            f'<rect width="100%" height="100%" fill="white"/>\n' + "\n".join(body) + "\n</svg>\n")


def _text(x, y, s, anchor="middle", size=12, extra=""):
    from xml.sax.saxutils import escape
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" font-size="{size}"{extra}>{escape(str(s))}</text>'


def _legend(names: list[str], x: float, y: float, ref_label: str | None = None) -> list[str]:
    out = []
    for i, name in enumerate(names):
        out += [f'<rect x="{x:.1f}" y="{y + 16 * i - 9:.1f}" width="10" height="10" fill="{PALETTE[i % len(PALETTE)]}"/>',
                _text(x + 15, y + 16 * i, name, "start")]
    if ref_label:
        yy = y + 16 * len(names) - 4
        out += [f'<line x1="{x:.1f}" y1="{yy:.1f}" x2="{x + 10:.1f}" y2="{yy:.1f}" stroke="black" stroke-dasharray="3,2"/>',
                _text(x + 15, yy + 4, ref_label, "start")]
    return out


def _y_axis(x0, y_of, ticks, label, top, bottom, right) -> list[str]:
    out = [f'<line x1="{x0}" y1="{top}" x2="{x0}" y2="{bottom}" stroke="black"/>']
    for t in ticks:
        out += [f'<line x1="{x0 - 4}" y1="{y_of(t):.1f}" x2="{right}" y2="{y_of(t):.1f}" stroke="#e5e5e5"/>',
                _text(x0 - 6, y_of(t) + 4, f"{t:g}", "end", 11)]
    mid = (top + bottom) / 2
    return out + [_text(14, mid, label, extra=f' transform="rotate(-90 14 {mid:.1f})"')]


def svg_bars(path: str, title: str, ylabel: str, splits: list[str], series: list[dict], ref_label: str | None = None):
    """Grouped bars: one group per split, one bar per series {"name", "means", "ses", "marks", "refs"} (lists
    over splits; None where missing), error bars +- SE, '*' over marked bars, a dashed reference level
    per split where given."""
    marked = any(m for x in series for m in x["marks"])
    bar, gap, left, right = max(14, min(32, 96 // len(series))), 26, 64, 16
    top = 34 + 16 * (len(series) + (1 if ref_label else 0) + marked)
    plot_h, bottom_pad = 220, 46
    group_w = max(bar * len(series) + gap, 7 * max(len(x) for x in splits) + 14)  # room for the split's name
    width = max(360, left + right + group_w * len(splits), 8 * len(title) + 20)   # room for the title (14 px)
    group_w = (width - left - right) / len(splits)                               # spread the groups over the width
    lo_hi = [m + s * (se or 0) for x in series for m, se in zip(x["means"], x["ses"]) if m is not None for s in (-1, 1)]
    lo_hi += [r for x in series for r in x.get("refs") or [] if r is not None]
    hi = max(lo_hi, default=0.0)
    ticks = nice_ticks(min(0.0, min(lo_hi, default=0.0)), hi if hi > 0 else 100.0 if "%" in ylabel else 1.0)
    y0, y1, bottom = ticks[0], ticks[-1], top + plot_h
    y_of = lambda v: bottom - (v - y0) / (y1 - y0) * plot_h                    # noqa: E731
    body = [_text(width / 2, 18, title, size=14)] + _legend([x["name"] for x in series], left, 38, ref_label)
    if marked:
        body.append(_text(left, 38 + 16 * (len(series) + (1 if ref_label else 0)),
                          f"*  differs from {series[0]['name']} by more than 2 sqrt(SE1² + SE2²)", "start"))
    body += _y_axis(left, y_of, ticks, ylabel, top, bottom, width - right)
    body.append(f'<line x1="{left}" y1="{y_of(max(0.0, y0)):.1f}" x2="{width - right}" y2="{y_of(max(0.0, y0)):.1f}" stroke="black"/>')
    for g, split in enumerate(splits):
        gx = left + (group_w - bar * len(series)) / 2 + g * group_w
        body.append(_text(gx + bar * len(series) / 2, bottom + 18, split))
        for i, x in enumerate(series):
            m, se = x["means"][g], x["ses"][g]
            if m is None:
                continue
            bx, base = gx + i * bar, y_of(max(0.0, y0))
            tip = f"{m:.3g}" + (f" ± {se:.2g}" if se is not None else "")       # shown on hover
            body.append(f'<rect x="{bx + 1:.1f}" y="{min(base, y_of(m)):.1f}" width="{bar - 2}" height="{abs(base - y_of(m)):.1f}" '
                        f'fill="{PALETTE[i % len(PALETTE)]}"><title>{tip}</title></rect>')
            cx, hi = bx + bar / 2, y_of(m + (se or 0))
            if se is not None:
                lo = y_of(m - se)
                body += [f'<line x1="{cx:.1f}" y1="{lo:.1f}" x2="{cx:.1f}" y2="{hi:.1f}" stroke="black"/>',
                         f'<line x1="{cx - 4:.1f}" y1="{lo:.1f}" x2="{cx + 4:.1f}" y2="{lo:.1f}" stroke="black"/>',
                         f'<line x1="{cx - 4:.1f}" y1="{hi:.1f}" x2="{cx + 4:.1f}" y2="{hi:.1f}" stroke="black"/>']
            if x["marks"][g]:
                body.append(_text(cx, hi - 4, "*", size=14))
        refs = [x["refs"][g] for x in series if x.get("refs") and x["refs"][g] is not None]
        if refs:
            yr = y_of(sum(refs) / len(refs))
            body.append(f'<line x1="{gx - 4:.1f}" y1="{yr:.1f}" x2="{gx + bar * len(series) + 4:.1f}" y2="{yr:.1f}" '
                        f'stroke="black" stroke-dasharray="3,2"/>')
    body.append(_text(left + (width - left - right) / 2, bottom + 38, "split"))
    with open(path, "w") as f:
        f.write(_svg(width, bottom + bottom_pad, body))


def svg_curves(path: str, title: str, ylabel: str, splits: list[str], series: list[dict], marks=()):
    """One panel per split: a line per series {"name", "splits": {split: [{"step", "mean", "se"}]}} with a
    shaded band of +- SE, all on the same axes; a dashed vertical line at each step of `marks` (where a
    stage starts)."""
    pw, ph, left, gap, right = 230, 170, 64, 34, 16
    top = 34 + 16 * len(series) + 10
    width = left + len(splits) * (pw + gap) - gap + right
    pts = [p for x in series for s in splits for p in x["splits"].get(s, [])]
    steps = ([p["step"] for p in pts] + list(marks)) or [0, 1]                  # a stage start before the first point shows
    x0, x1 = min(steps), max(steps) if max(steps) > min(steps) else min(steps) + 1
    vals = [p["mean"] + k * (p["se"] or 0) for p in pts for k in (-1, 1)]
    ticks = nice_ticks(min(0.0, min(vals, default=0.0)), max(vals, default=1.0))
    if ylabel.startswith("success"):
        ticks = nice_ticks(0.0, 100.0)
    y0, y1, bottom = ticks[0], ticks[-1], top + ph
    y_of = lambda v: bottom - (min(max(v, y0), y1) - y0) / (y1 - y0) * ph      # noqa: E731
    body = [_text(width / 2, 18, title, size=14)] + _legend([x["name"] for x in series], left, 38)
    body += _y_axis(left, y_of, ticks, ylabel, top, bottom, left + pw)
    xt = nice_ticks(x0, x1, 4)
    for j, split in enumerate(splits):
        px = left + j * (pw + gap)
        x_of = lambda v: px + (v - xt[0]) / (xt[-1] - xt[0]) * pw                # noqa: E731
        body += [f'<rect x="{px}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="black"/>',
                 _text(px + pw / 2, top - 4, split)]
        if j:
            body += [f'<line x1="{px}" y1="{y_of(t):.1f}" x2="{px + pw}" y2="{y_of(t):.1f}" stroke="#e5e5e5"/>' for t in ticks]
        body += [f'<line x1="{x_of(m):.1f}" y1="{top}" x2="{x_of(m):.1f}" y2="{bottom}" stroke="#888" '
                 f'stroke-dasharray="4 3"/>' for m in marks if xt[0] <= m <= xt[-1]]
        for t in xt:
            body += [f'<line x1="{x_of(t):.1f}" y1="{bottom}" x2="{x_of(t):.1f}" y2="{bottom + 4}" stroke="black"/>',
                     _text(x_of(t), bottom + 16, f"{t:g}", size=11)]
        for i, x in enumerate(series):
            p = x["splits"].get(split, [])
            if not p:
                continue
            color = PALETTE[i % len(PALETTE)]
            band = ([f"{x_of(q['step']):.1f},{y_of(q['mean'] + (q['se'] or 0)):.1f}" for q in p]
                    + [f"{x_of(q['step']):.1f},{y_of(q['mean'] - (q['se'] or 0)):.1f}" for q in reversed(p)])
            line = [f"{x_of(q['step']):.1f},{y_of(q['mean']):.1f}" for q in p]
            body += [f'<polygon points="{" ".join(band)}" fill="{color}" fill-opacity="0.2" stroke="none"/>',
                     f'<polyline points="{" ".join(line)}" fill="none" stroke="{color}" stroke-width="2"/>']
            body += [f'<circle cx="{xy.split(",")[0]}" cy="{xy.split(",")[1]}" r="2.5" fill="{color}"/>' for xy in line]
    body.append(_text(left + (width - left - right) / 2, bottom + 36, "training step"))
    with open(path, "w") as f:
        f.write(_svg(width, bottom + 46, body))


# ---------------------------------------------------------------- the two commands


def _check_runs(runs: list[str], flag: str) -> list[dict]:
    runs = list(dict.fromkeys(os.path.normpath(r) for r in runs))
    infos = [read_run(r) for r in runs]
    models = {i["model"] for i in infos}
    if len(models) > 1:
        which = ", ".join(f"{i['run']}: {i['model']}" for i in infos)
        raise ValueError(f"{flag}: run folders of different models ({which}); compare runs of one model at a time")
    return infos


def default_out(infos: list[dict]) -> str:
    """<the folder that holds the runs>/compare (runs/wam_s0 runs/agra_s0 -> runs/compare)."""
    parent = os.path.commonpath([os.path.dirname(os.path.abspath(i["run"])) for i in infos])
    rel = os.path.relpath(parent)
    return os.path.join(parent if rel.startswith("..") else rel, "compare")


def compare_runs(runs: list[str], patterns=("samples/metrics.json",), splits=SPLITS, out_dir: str | None = None,
                 quiet: bool = False) -> dict:
    """sample.py --compare: the table (printed, comparison.md), comparison.json and comparison.svg (the
    first metric: success, or EA-WM's KVAF-conditioned PSNR) in out_dir."""
    infos = _check_runs(runs, "--compare")
    if len(infos) < 2:
        raise ValueError(f"--compare needs two or more run folders (e.g. runs/wam_s* runs/agra_s*); got {len(infos)}: "
                         f"{[i['run'] for i in infos]}. One run's numbers: `python sample.py --ckpt RUN`")
    evals = [ev for i in infos for ev in read_evaluations(i["run"], patterns)]
    have = [s for s in splits if all(any(s in m for m in ev["metrics"].values()) for ev in evals)]
    dropped = [s for s in splits if s not in have and any(any(s in m for m in ev["metrics"].values()) for ev in evals)]
    if not have:
        raise ValueError(f"--compare: no split of {list(splits)} was evaluated in every metrics file "
                         f"({sorted({ev['file'] for ev in evals})})")
    differ, rows = group_rows(evals)
    table = compare_rows(rows, have)
    model = infos[0]["model"]
    out_dir = out_dir or default_out(infos)
    os.makedirs(out_dir, exist_ok=True)
    head = (f"{model}: {len(infos)} runs, {len(evals)} evaluations, {len(table)} rows"
            + (f" (rows differ in: {', '.join(differ)})" if differ else " (no field differs: one row)"))
    notes = [f"cells: {SE_NOTE}", MARK_NOTE, "n/seed = episodes (success) or clips (diagnostics) per seed"]
    if any("paired" in c for r in table for m in PAIRED for c in r["metrics"].get(m, {}).values()):
        notes.append(PAIRED_NOTE)
    present = {m for r in table for m in r["metrics"]}
    if "in_mask_ratio" in present:
        notes.append("(x) after the attention-in-mask ratio: its chance level, the mask's share of tokens "
                     "(attention spread uniformly)")
    if "current_frame_share" in present:
        notes.append("(x) after the attention on the current frame: its level under uniform attention (1 / latent frames)")
    if present & {"psnr_kvaf", "psnr_joint", "latent_mse_kvaf"}:
        notes.append("(x) after PSNR / latent MSE: the first frame repeated (a model that predicts no motion), on the same clips")
    if dropped:
        notes.append(f"left out: splits {dropped}, not evaluated in every metrics file")
    text, md = format_table(table, have), format_table(table, have, markdown=True)
    result = {"model": model, "differing_fields": differ, "splits": have, "se": SE_NOTE, "marker": MARK_NOTE,
              "baseline": table[0]["name"], "rows": table}
    with open(os.path.join(out_dir, "comparison.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(out_dir, "comparison.md"), "w") as f:
        f.write(head + "\n\n" + md + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    metric = next(m for m in METRICS if any(m in r["metrics"] for r in table))
    label, _, ref = METRICS[metric]
    series = [{"name": r["name"], **{k: [r["metrics"].get(metric, {}).get(s, {}).get(key) for s in have]
                                     for k, key in (("means", "mean"), ("ses", "se"), ("marks", "differs"), ("refs", "ref"))}}
              for r in table]
    svg = os.path.join(out_dir, "comparison.svg")
    svg_bars(svg, f"{model}: {label.split(' (')[0]}, mean ± SE over seeds", label.split(" (")[0], have, series,
             {"mask_fraction": "chance", "psnr_copy_first": "copy first frame"}.get(ref))
    if not quiet:
        print(head + "\n" + "\n".join(notes) + "\n\n" + text)
        print(f"\nwrote {out_dir}/comparison.md, comparison.json, comparison.svg")
    return result


def read_curve(run: str) -> dict:
    """RUN/metrics.jsonl lines with an "eval" entry (train.py --eval-every) -> {"metric", "points": {step:
    {"time", "splits": {split: value}}}, "finetune_from"}; a later line for the same step (a resumed run) wins.
    A run whose stage joint trained into RUN/joint (AGRA's `--preset long`: joint, then finetune into RUN) is one
    curve: the joint stage's points, then the finetune stage's, their steps and times counted on from the joint
    stage's last step and time ("finetune_from": that step; None for a one-stage run). A joint stage trained
    without --eval-every (the finetune stage evaluated alone, `--stage finetune --init RUN/joint --eval-every N`)
    adds no points, only that offset."""
    joint = os.path.join(run, "joint", "metrics.jsonl")
    if os.path.isfile(joint):
        first, (last_step, last_time) = _read_evals(joint, must=False), _last_step(joint)
        rest = _read_evals(os.path.join(run, "metrics.jsonl"), must=not first["points"])
        if first["points"] and rest["metric"] not in (None, first["metric"]):
            raise ValueError(f"{run}: the joint and finetune stages log different metrics")
        points = dict(first["points"])
        for st, p in rest["points"].items():
            points[last_step + st] = {"time": None if p["time"] is None else last_time + p["time"], "splits": p["splits"]}
        return {"metric": first["metric"] or rest["metric"], "points": points, "finetune_from": last_step}
    return {**_read_evals(os.path.join(run, "metrics.jsonl")), "finetune_from": None}


def _last_step(path: str) -> tuple[int, float]:
    """The last step of a metrics.jsonl and the last time logged at it (after its evaluation, if any)."""
    step, t = 0, 0.0
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "step" in rec and rec.get("time") is not None and rec["step"] >= step:
                step, t = rec["step"], rec["time"]
    return step, t


def _read_evals(path: str, must: bool = True) -> dict:
    run = os.path.dirname(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{run}: no metrics.jsonl; train.py writes it")
    points, metric = {}, None
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:                     # a line cut off by a running or killed trainer
                continue
            if "eval" not in rec:
                continue
            row = {}
            for split, d in rec["eval"].items():
                key = "success" if "success" in d else "psnr" if "psnr" in d else None
                if key is None:
                    raise ValueError(f"{path} step {rec.get('step')} split {split}: neither 'success' nor 'psnr' "
                                     f"in {sorted(d)}")
                if metric not in (None, key):
                    raise ValueError(f"{path}: evaluation lines mix 'success' and 'psnr'")
                metric = key
                row[split] = 100 * d[key] if key == "success" else d[key]
            points[rec["step"]] = {"time": rec.get("time"), "splits": row}
    if not points and must:
        raise ValueError(f"{path} has no evaluation lines; train with `python train.py ... --eval-every N` "
                         f"(a few closed-loop episodes per split every N steps)")
    return {"metric": metric, "points": points}


def learning_curves(runs: list[str], splits=SPLITS, out_dir: str | None = None, quiet: bool = False) -> dict:
    """sample.py --curves: runs grouped like --compare (by Config difference; seeds merge), mean +- SE over
    seeds at every evaluated step -> curves.json, curves.svg (one panel per split)."""
    infos = _check_runs(runs, "--curves")
    curves = {i["run"]: read_curve(i["run"]) for i in infos}
    metrics = {c["metric"] for c in curves.values()}
    if len(metrics) > 1:
        raise ValueError(f"--curves: runs log different metrics {sorted(metrics)}")
    metric = metrics.pop()
    evals = [{"run": i["run"], "info": i, "settings": {}} for i in infos]
    differ, rows = group_rows(evals, with_settings=False)
    have = [s for s in splits if any(s in p["splits"] for c in curves.values() for p in c["points"].values())]
    table = []
    for row in rows:
        runs_ = [ev["run"] for ev in row["evals"]]
        per_split = {}
        for split in have:
            steps = sorted({st for r in runs_ for st, p in curves[r]["points"].items() if split in p["splits"]})
            pts = []
            for st in steps:
                got = [curves[r]["points"][st] for r in runs_ if split in curves[r]["points"].get(st, {}).get("splits", {})]
                m, se = mean_se([p["splits"][split] for p in got])
                times = [p["time"] for p in got if p["time"] is not None]
                pts.append({"step": st, "mean": m, "se": se, "seeds": len(got),
                            "time": sum(times) / len(times) if times else None})
            per_split[split] = pts
        table.append({"name": row["name"], "fields": row["fields"], "runs": runs_, "seeds": len(runs_), "splits": per_split})
    model = infos[0]["model"]
    out_dir = out_dir or default_out(infos)
    os.makedirs(out_dir, exist_ok=True)
    label = "success %" if metric == "success" else "PSNR dB"
    marks = sorted({c["finetune_from"] for c in curves.values() if c["finetune_from"] is not None})   # stage finetune starts
    result = {"model": model, "metric": label, "differing_fields": differ, "splits": have, "se": SE_NOTE, "rows": table,
              "finetune_from": marks}
    with open(os.path.join(out_dir, "curves.json"), "w") as f:
        json.dump(result, f, indent=1)
    svg_curves(os.path.join(out_dir, "curves.svg"), f"{model}: {label} during training, mean ± SE over seeds"
               + (" (dashed: the finetune stage starts)" if marks else ""), label, have, table, marks)
    if not quiet:
        for r in table:
            last = {s: p[-1] for s, p in r["splits"].items() if p}
            print(f"{r['name']} ({r['seeds']} seeds): " + ", ".join(
                f"{s} {q['mean']:.1f}" + (f" ± {q['se']:.1f}" if q["se"] is not None else "") + f" at step {q['step']}"
                for s, q in last.items()))
        print(f"wrote {out_dir}/curves.json, curves.svg")
    return result


def main(args):
    """sample.py --compare / --curves (args from sample.get_args)."""
    out = {}
    if args.compare:
        out["compare"] = compare_runs(args.compare, args.metrics, args.splits, args.out)
    if args.curves:
        out["curves"] = learning_curves(args.curves, args.splits, args.out)
    return out
