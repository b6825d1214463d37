"""ZSCL's loss terms against hand computations."""

import math

import pytest
import torch
import torch.nn.functional as F

from zscl.methods.losses import add_weight_constraint_grad_, cosine_warmup_factor, kd_loss, weight_constraint


def test_kd_loss_equals_hand_computed_value():
    t = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    s = torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 1.0]])
    T = 2.0
    expected = 0.0
    for i in range(2):
        p = [math.exp(v / T) for v in t[i].tolist()]
        p = [v / sum(p) for v in p]
        logq = [v / T for v in s[i].tolist()]
        lse = math.log(sum(math.exp(v) for v in logq))
        expected += -sum(pi * (lq - lse) for pi, lq in zip(p, logq))
    expected = expected / 2 * T**2
    assert kd_loss(t, s, T).item() == pytest.approx(expected, rel=1e-6)


def test_kd_loss_is_minimal_when_student_equals_teacher():
    t = torch.randn(4, 7)
    base = kd_loss(t, t.clone())
    assert kd_loss(t, t + 0.3 * torch.randn(4, 7)) > base


def test_transposed_kd_is_a_distribution_over_images():
    t, s = torch.randn(5, 9), torch.randn(5, 9)
    manual = F.cross_entropy(s.t() / 2, F.softmax(t.t() / 2, dim=1)) * 4
    assert kd_loss(t.t(), s.t()).item() == pytest.approx(manual.item(), rel=1e-6)


def test_weight_constraint_value_and_folded_gradient_match_autograd():
    params = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5))]
    anchors = [p.detach() + 0.1 * torch.randn_like(p) for p in params]
    lam = 0.7
    wc = sum(((p - a) ** 2).sum() for p, a in zip(params, anchors))
    assert weight_constraint(params, anchors).item() == pytest.approx(wc.item(), rel=1e-5)
    (lam * wc).backward()
    expected = [p.grad.clone() for p in params]
    for p in params:
        p.grad = torch.zeros_like(p)
    add_weight_constraint_grad_(params, anchors, lam)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad, e)


def test_schedule_matches_the_reference_formula():
    steps, warmup = 1000, 100
    assert cosine_warmup_factor(0, steps, warmup) == pytest.approx(0.01)
    assert cosine_warmup_factor(99, steps, warmup) == pytest.approx(1.0)
    assert cosine_warmup_factor(100, steps, warmup) == pytest.approx(1.0)
    assert cosine_warmup_factor(550, steps, warmup) == pytest.approx(0.5)
    assert cosine_warmup_factor(1000, steps, warmup) == pytest.approx(0.0, abs=1e-12)


def test_feature_mse_is_the_mean_squared_difference_of_normalised_features():
    s, t = F.normalize(torch.randn(4, 6), dim=-1), F.normalize(torch.randn(4, 6), dim=-1)
    by_hand = sum((s[i, d] - t[i, d]) ** 2 for i in range(4) for d in range(6)) / 24
    from zscl.methods.losses import feature_mse

    assert feature_mse(s, t).item() == pytest.approx(by_hand.item(), rel=1e-6)
    assert feature_mse(t, t).item() == 0.0


def test_image_image_kd_compares_each_image_with_the_other_images_only():
    """Row i: softmax over j != i of s <f_i, f_j> / T (the own entry at -1e4 has weight 0), KD times T^2."""
    from zscl.methods.losses import image_image_kd

    g = torch.Generator().manual_seed(0)
    fs, ft = (F.normalize(torch.randn(5, 8, generator=g), dim=-1) for _ in range(2))
    scale, temp = torch.tensor(100.0), 2.0
    total = 0.0
    for i in range(5):
        others = [j for j in range(5) if j != i]
        t = torch.softmax(torch.stack([scale * ft[i] @ ft[j] for j in others]) / temp, dim=0)
        log_u = torch.log_softmax(torch.stack([scale * fs[i] @ fs[j] for j in others]) / temp, dim=0)
        total += -(t * log_u).sum()
    by_hand = total / 5 * temp**2
    assert image_image_kd(fs, ft, scale, temp).item() == pytest.approx(by_hand.item(), rel=1e-5)
