"""Schedule objects: step tables, the small/large degradation mix, the cosine-restart learning rate."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from codeformer_lightning.models.schedules import CosineRestartLR, DegradationMix, StepTable

PUBLISHED_W = [[0, 1.0], [40000, 1.3], [80000, 0.0], [120000, 1.3]]
PUBLISHED_MIX = [[0, 1], [80000, 0], [120000, 15]]


def test_step_table_is_piecewise_constant_with_left_closed_ranges():
    table = StepTable(PUBLISHED_W)
    assert [table(s) for s in (0, 39999, 40000, 79999, 80000, 119999, 120000, 10**7)] == [
        1.0, 1.0, 1.3, 1.3, 0.0, 0.0, 1.3, 1.3,
    ]


def test_step_table_matches_published_one_based_iterations():
    # published: "current_iter <= 40000 -> w = 1" with current_iter = step + 1
    table = StepTable(PUBLISHED_W)

    def published(it: int) -> float:
        if it <= 40000:
            return 1.0
        if it <= 80000:
            return 1.3
        if it <= 120000:
            return 0.0
        return 1.3

    for it in (1, 40000, 40001, 80000, 80001, 120000, 120001, 150000):
        assert table(it - 1) == published(it)


def test_step_table_accepts_numbers_lists_and_omegaconf():
    assert StepTable(0.5)(123) == 0.5
    assert StepTable.of(StepTable(2)) == StepTable([[0, 2]])
    cfg = OmegaConf.create({"w": PUBLISHED_W})
    assert StepTable(cfg.w).as_list() == PUBLISHED_W


@pytest.mark.parametrize(
    "entries, message",
    [
        ([], "at least one"),
        ([[5, 1.0]], "start at step 0"),
        ([[0, 1.0], [10, 2.0], [10, 3.0]], "strictly increase"),
        ([[0, 1.0, 2.0]], "pairs"),
    ],
)
def test_step_table_rejects_bad_tables(entries, message):
    with pytest.raises(ValueError, match=message):
        StepTable(entries)


def test_negative_step_is_rejected():
    with pytest.raises(ValueError, match=">= 0"):
        StepTable(1.0)(-1)


def test_degradation_mix_reproduces_published_counts():
    mix = DegradationMix(PUBLISHED_MIX)
    assert not any(mix.is_large(s) for s in range(0, 80000, 997))
    assert all(mix.is_large(s) for s in range(80000, 120000, 997))
    # mixed phase: one small step in 15, exactly where the published `current_iter % 15 == 0` puts it
    window = range(120000, 120000 + 15 * 40)
    small = [s for s in window if not mix.is_large(s)]
    assert len(small) == 40
    assert all((s + 1) % 15 == 0 for s in small)


def test_degradation_mix_constants_and_errors():
    assert DegradationMix(1).never_large()
    assert not any(DegradationMix(1).is_large(s) for s in range(50))
    assert all(DegradationMix(0).is_large(s) for s in range(50))
    assert not DegradationMix(PUBLISHED_MIX).never_large()
    with pytest.raises(ValueError, match="integers >= 0"):
        DegradationMix([[0, 1.5]])


def _lrs(scheduler, optimizer, n: int) -> list[float]:
    out = []
    for _ in range(n):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def _opt(lr: float = 5e-5):
    return torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def test_cosine_restart_single_period_is_half_cosine_to_eta_min():
    opt = _opt()
    lrs = _lrs(CosineRestartLR(opt, periods=[100], eta_min=2e-5), opt, 130)
    assert lrs[0] == pytest.approx(5e-5)
    assert lrs[50] == pytest.approx((5e-5 + 2e-5) / 2)
    assert lrs[99] == pytest.approx(2e-5 + 3e-5 * 0.5 * (1 + math.cos(math.pi * 0.99)))
    assert lrs[100:] == pytest.approx([2e-5] * 30)  # stays at eta_min after the last period
    # one period equals torch's CosineAnnealingLR
    opt2 = _opt()
    ref = _lrs(torch.optim.lr_scheduler.CosineAnnealingLR(opt2, T_max=100, eta_min=2e-5), opt2, 100)
    assert lrs[:100] == pytest.approx(ref)


def test_cosine_restart_restarts_with_weights():
    opt = _opt(1.0)
    lrs = _lrs(CosineRestartLR(opt, periods=[10, 20], restart_weights=[1.0, 0.5], eta_min=0.0), opt, 30)
    assert lrs[0] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(0.5)  # restart at half height
    assert lrs[20] == pytest.approx(0.25)  # halfway through the second period
    assert lrs[9] < 0.05 and lrs[29] < 0.01


def test_cosine_restart_resumes_from_state_dict():
    opt = _opt()
    sch = CosineRestartLR(opt, periods=[40], eta_min=1e-5)
    _lrs(sch, opt, 17)
    state = sch.state_dict()
    expected = _lrs(sch, opt, 10)
    opt2 = _opt()
    sch2 = CosineRestartLR(opt2, periods=[40], eta_min=1e-5)
    sch2.load_state_dict(state)
    opt2.param_groups[0]["lr"] = sch2.get_last_lr()[0]
    assert _lrs(sch2, opt2, 10) == pytest.approx(expected)


def test_cosine_restart_rejects_bad_periods():
    with pytest.raises(ValueError, match="positive"):
        CosineRestartLR(_opt(), periods=[0])
    with pytest.raises(ValueError, match="same length"):
        CosineRestartLR(_opt(), periods=[10, 10], restart_weights=[1.0])
