"""The worked loss-variant examples of the README ("Prototype a loss variant"), one per model file, each a
Config field that switches one line of the loss: AGRA's alignment distance (agra_distance), MV-WAM's
1/t^2 weight of the x0 loss (x0_weight, Eq. 7), EA-WM's timestep weight w(t) (time_weight, Eq. 8).
Oracles on hand-computed values, and the field reaching the model's loss."""

import pytest
import torch

import agra
import eawm
import mvwam
from common import bell_weight, sample_mean, x0_space_weight
from conftest import tiny_config


tiny = tiny_config


def parts_for(model, field: str, values, batch) -> dict:
    """The loss parts of one model under each value of a Config field, with the same noise draws."""
    out = {}
    for v in values:
        setattr(model.cfg, field, v)
        torch.manual_seed(1)
        with torch.no_grad():
            out[v] = model.loss(batch)[1]
    return out


# ------------------------------------------------------------------ AGRA: agra_distance = cosine | mse


def test_agra_mse_distance_oracle():
    z = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    # cosine (Eq. 6): both pairs point the same way -> -1, whatever the norms
    assert agra.agra_loss(z, y).item() == pytest.approx(-1.0, abs=1e-6)
    # mse of the raw features: ((2-1)^2 + 0 + 0 + (1-3)^2) / 4 elements = 5 / 4
    assert agra.agra_loss(z, y, distance="mse").item() == pytest.approx(1.25, abs=1e-6)
    # orthogonal unit vectors: cosine 0, mse (1 + 1) / 2 = 1
    e = torch.eye(2)
    assert agra.agra_loss(e[[0]], e[[1]], distance="mse").item() == pytest.approx(1.0, abs=1e-6)
    # k projections against one teacher tensor broadcast like the cosine does: (k=2, 1 token, 2) vs (1, 1, 2)
    zk = torch.tensor([[[1.0, 0.0]], [[3.0, 0.0]]])
    assert agra.agra_loss(zk, torch.tensor([[[1.0, 0.0]]]), distance="mse").item() == pytest.approx(1.0, abs=1e-6)


def test_agra_distance_reaches_the_loss(toy_data):
    from data.toyworld import ClipDataset
    cfg = tiny(agra)
    ds = ClipDataset(toy_data[1], toy_data[2], cfg.frames, cfg.horizon, cfg.latent_q, cfg.teacher_patch, cfg.teacher_dim)
    batch = ds.sample(2, torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = agra.Model(cfg)
    parts = parts_for(model, "agra_distance", ("cosine", "mse"), batch)
    assert -1.0 <= parts["cosine"]["agra"].item() <= 1.0 and parts["mse"]["agra"].item() >= 0
    assert parts["cosine"]["agra"] != parts["mse"]["agra"]
    assert parts["cosine"]["video"] == parts["mse"]["video"]        # the same noise: only the AGRA term changes
    with pytest.raises(ValueError, match="agra_distance"):
        tiny(agra, agra_distance="l1")


# ------------------------------------------------------------------ MV-WAM: x0_weight = none | inv_t2 (Eq. 7)


def test_flow_loss_inv_t2_weight_oracle():
    pred, x0, noise = torch.zeros(2, 1, 1), torch.ones(2, 1, 1), torch.zeros(2, 1, 1)
    assert mvwam.flow_loss(pred, x0, noise, "x0").item() == pytest.approx(1.0)
    t = torch.tensor([0.5, 1.0])                                    # weights 1/t^2 = 4 and 1
    assert mvwam.flow_loss(pred, x0, noise, "x0", t ** -2).item() == pytest.approx((4 + 1) / 2)
    # Eq. 7: the weighted x0 loss equals the velocity-space loss ||(x_t - x0_hat)/t - (x_t - x0)/t||^2
    x0, noise, x0_hat = torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
    v_space = (((x_t - x0_hat) / t[:, None, None] - (x_t - x0) / t[:, None, None]) ** 2).mean()
    assert mvwam.flow_loss(x0_hat, x0, noise, "x0", t ** -2).item() == pytest.approx(v_space.item(), rel=1e-5)


def test_x0_weight_reaches_the_loss(monkeypatch):
    cfg = tiny(mvwam, image_encoder="tiny", image_dim=64, freeze_video=False)     # the video loss too
    g = torch.Generator().manual_seed(0)
    batch = {"video": torch.rand(2, 3, cfg.frames, cfg.height, cfg.width, generator=g) * 2 - 1,
             "state": torch.randn(2, cfg.state_dim, generator=g), "actions": torch.randn(2, cfg.horizon, cfg.action_dim, generator=g),
             "value": torch.rand(2, generator=g), "text": ["put the red cube in the bin"] * 2}
    monkeypatch.setattr(mvwam, "sample_t", lambda kind, n, device=None, **kw: torch.full((n,), 0.5, device=device))
    torch.manual_seed(0)
    model = mvwam.Model(cfg)
    parts = parts_for(model, "x0_weight", ("none", "inv_t2"), batch)
    assert parts["inv_t2"]["video"] == parts["none"]["video"]
    for k in ("action", "value"):                                  # t = 0.5 for every sample: 1/t^2 = 4
        assert parts["inv_t2"][k].item() == pytest.approx(4 * parts["none"][k].item(), rel=1e-5)
    with pytest.raises(ValueError, match="action_target is 'v'"):
        tiny(mvwam, action_target="v", x0_weight="inv_t2")


# ------------------------------------------------------------------ EA-WM: time_weight = bell | uniform (Eq. 8)


def test_time_weight_uniform_removes_the_bell(toy_data, monkeypatch):
    import train
    cfg = tiny(eawm, dim=64, heads=2, ffn_dim=256, kvaf_cond_prob=0.0)   # every sample's KVAF stream is noised
    batch = train.dataset_for(cfg, toy_data[1], toy_data[2]).sample(2, torch.Generator().manual_seed(1))
    t = torch.tensor([0.7, 0.7])                                    # one t for both samples: w(t) is one factor
    monkeypatch.setattr(eawm, "sample_t", lambda kind, n, device=None, **kw: t.to(device))
    torch.manual_seed(0)
    model = eawm.Model(cfg)
    parts = parts_for(model, "time_weight", ("bell", "uniform"), batch)
    w07 = bell_weight(t, cfg.t_shift if cfg.t_sampler == "shifted" else 1.0)[0].item()
    assert abs(w07 - 1) > 0.05                                      # the bell does weigh this t
    for k in ("video", "kvaf"):                                     # bell = w(0.7) * uniform
        assert parts["bell"][k].item() == pytest.approx(w07 * parts["uniform"][k].item(), rel=1e-5)
    assert parts["bell"]["edls"] == parts["uniform"]["edls"]        # EDLS is not weighted by w(t)
    with pytest.raises(ValueError, match="time_weight"):
        tiny(eawm, time_weight="snr")


def test_x0_space_weight_oracle():
    """w(t) = max(t, t_min)^2 / Z, Z = the mean over the 1,000-point grid t = k / 1000, k = 1..1000 (shift 1):
    sum k^2 = 1000 * 1001 * 2001 / 6 = 333,833,500; with t_min = 0.05 the 49 points below it count as
    0.05^2: Z = (333,833,500 - 40,425) / 1e9 + 49 * 0.0025 = 0.333915575."""
    Z = 0.333915575
    w = x0_space_weight(torch.tensor([1.0, 0.5, 0.05, 0.01]), shift=1.0, t_min=0.05)
    assert w.tolist() == pytest.approx([1 / Z, 0.25 / Z, 0.0025 / Z, 0.0025 / Z], rel=1e-6)
    assert x0_space_weight(torch.tensor([1.0]), 1.0)[0].item() == pytest.approx(1 / 0.3338335, rel=1e-6)
    # why: with x_t = (1 - t) x0 + t n, v = n - x0 and x0_hat = x_t - t v_hat, t^2 |v_hat - v|^2 = |x0_hat - x0|^2
    g = torch.Generator().manual_seed(0)
    x0, n, v_hat = (torch.randn(5, generator=g) for _ in range(3))
    t = 0.3
    x_t = (1 - t) * x0 + t * n
    assert (t ** 2 * (v_hat - (n - x0)) ** 2).sum().item() == pytest.approx(((x_t - t * v_hat - x0) ** 2).sum().item())


def test_time_weight_x0_reaches_the_loss(toy_data, monkeypatch):
    import train
    cfg = tiny(eawm, dim=64, heads=2, ffn_dim=256, kvaf_cond_prob=0.0)
    batch = train.dataset_for(cfg, toy_data[1], toy_data[2]).sample(2, torch.Generator().manual_seed(1))
    t = torch.tensor([0.7, 0.7])
    monkeypatch.setattr(eawm, "sample_t", lambda kind, n, device=None, **kw: t.to(device))
    torch.manual_seed(0)
    model = eawm.Model(cfg)
    parts = parts_for(model, "time_weight", ("x0", "uniform"), batch)
    shift = cfg.t_shift if cfg.t_sampler == "shifted" else 1.0
    w07 = x0_space_weight(t, shift, cfg.x0_t_min)[0].item()
    for k in ("video", "kvaf"):
        assert parts["x0"][k].item() == pytest.approx(w07 * parts["uniform"][k].item(), rel=1e-5)


# ------------------------------------------------------------------ a per-sample action mask (failing toy demos)


def test_sample_mean_oracle():
    err = torch.tensor([[1.0, 1.0], [3.0, 5.0]], requires_grad=True)
    assert sample_mean(err).item() == pytest.approx(2.5)
    assert sample_mean(err, torch.ones(2)).item() == pytest.approx(2.5)              # all kept: the plain mean
    assert sample_mean(err, torch.tensor([1.0, 0.0])).item() == pytest.approx(1.0)    # sample 1 does not count
    assert sample_mean(err, torch.tensor([0.0, 1.0])).item() == pytest.approx(4.0)
    loss = sample_mean(err, torch.zeros(2))
    loss.backward()
    assert loss.item() == 0.0 and not err.grad.any()                                # nothing kept: no gradient


@pytest.mark.parametrize("mod", [agra, mvwam])
def test_action_weight_zero_removes_a_sample_from_the_action_loss(mod, toy_data):
    """batch['action_weight'] = [1, 0]: changing the masked sample's actions leaves the action loss as it
    was (same noise draws); changing the kept sample's actions changes it; all ones = no mask."""
    from data.toyworld import ClipDataset
    cfg = tiny(mod)
    model = mod.Model(cfg).eval()
    ds = ClipDataset(toy_data[1], toy_data[2], cfg.frames, cfg.horizon, cfg.latent_q, getattr(cfg, "teacher_patch", 0),
                     getattr(cfg, "teacher_dim", 16))
    batch = ds.sample(2, torch.Generator().manual_seed(0))

    def action_loss(b):
        torch.manual_seed(1)
        with torch.no_grad():
            return model.loss(b)[1]["action"].item()

    unmasked = action_loss({k: v for k, v in batch.items() if k != "action_weight"})
    assert action_loss(dict(batch, action_weight=torch.ones(2))) == pytest.approx(unmasked, rel=1e-5)
    masked = dict(batch, action_weight=torch.tensor([1.0, 0.0]))
    base = action_loss(masked)
    other = batch["actions"].clone()
    other[1] += 3.0
    assert action_loss(dict(masked, actions=other)) == pytest.approx(base, rel=1e-5)
    other = batch["actions"].clone()
    other[0] += 3.0
    assert action_loss(dict(masked, actions=other)) != pytest.approx(base, rel=1e-2)
