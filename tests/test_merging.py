"""Merge rules on hand-built state dicts: closed forms, TIES/DARE/MagMax details, fp32
accumulation, integer buffers, error messages, lazy one-key-at-a-time reading, Fisher estimation.

Tests parametrized over MERGE_RULES cover every registered rule, including future ones, as long
as their required hyper-parameters appear in REQUIRED_HPARAMS below.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator, Mapping

import pytest
import torch
from torch import nn

from zscl.merging import MERGE_RULES, MergeError, estimate_fisher, merge, mwa_weights
from zscl.merging import task_arithmetic as ta


def _score(sd: Mapping[str, torch.Tensor]) -> float:
    return -float(sum(t.float().square().sum() for t in sd.values() if t.is_floating_point()))


# Values for hyper-parameters without a default, keyed by hparam name (not by rule).
REQUIRED_HPARAMS = {
    "score": lambda models: _score,
    "fishers": lambda models: [{k: torch.full(v.shape, float(i + 1)) for k, v in make_state(0).items()
                                if v.is_floating_point()} for i in range(len(models))],
    "metrics": lambda models: [float(i + 1) for i in range(len(models))],
}


def make_state(seed: int, dtype: torch.dtype = torch.float32, mask: torch.Tensor | None = None) -> dict:
    """A small state dict: a 2-D weight (zeros where ``mask`` is False), a bias, an integer buffer."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(6, 5, generator=g)
    if mask is not None:
        weight = weight * mask
    return {
        "layer.weight": weight.to(dtype),
        "layer.bias": torch.randn(5, generator=g).to(dtype),
        "bn.num_batches_tracked": torch.tensor(100 + seed**2),  # no mean of several equals one
    }


SHARED_MASK = torch.rand(6, 5, generator=torch.Generator().manual_seed(99)) > 0.4


def run_rule(name: str, base, models, **hparams):
    """Call rule ``name`` with the number of models it takes and its required hparams filled in."""
    rule = MERGE_RULES.get(name)
    if rule.exact_models is not None:
        models = models[: rule.exact_models]
    for h in rule.required:
        hparams.setdefault(h, REQUIRED_HPARAMS[h](models))
    return merge(name, base if rule.needs_base else None, models, **hparams)


RULES = MERGE_RULES.names()


def test_every_required_hparam_has_a_test_value():
    for name, rule in MERGE_RULES.items():
        assert set(rule.required) <= set(REQUIRED_HPARAMS), f"add test values for {name}'s {rule.required}"


@pytest.mark.parametrize("name", RULES)
def test_models_equal_to_base_give_the_base(name):
    base = make_state(0, mask=SHARED_MASK)
    out = run_rule(name, base, [dict(base), dict(base), dict(base)])
    assert list(out) == list(base)
    for k, v in base.items():
        assert out[k].dtype == v.dtype
        torch.testing.assert_close(out[k], v, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", RULES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_accumulate_in_fp32(name, dtype):
    base = make_state(0, dtype, SHARED_MASK)
    models = [make_state(s, dtype, SHARED_MASK) for s in (1, 2, 3)]
    out = run_rule(name, base, models)
    as_fp32 = lambda sd: {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}  # noqa: E731
    ref = run_rule(name, as_fp32(base), [as_fp32(m) for m in models])
    for k in base:
        assert out[k].dtype == base[k].dtype
        assert torch.equal(out[k], ref[k].to(base[k].dtype)), k


def test_average_in_low_precision_differs_from_fp32_accumulation():
    # Guards the test above: with these inputs, accumulating in bf16 would give other values.
    models = [make_state(s, torch.bfloat16) for s in (1, 2, 3)]
    naive = sum(m["layer.weight"] for m in models) / 3
    assert not torch.equal(naive, merge("average", None, models)["layer.weight"])


@pytest.mark.parametrize("name", RULES)
def test_integer_buffers_are_copied_not_averaged(name):
    base = make_state(0, mask=SHARED_MASK)
    models = [make_state(s, mask=SHARED_MASK) for s in (1, 2, 3)]
    out = run_rule(name, base, models)
    buffer = out["bn.num_batches_tracked"]
    assert buffer.dtype == torch.int64
    assert any(torch.equal(buffer, sd["bn.num_batches_tracked"]) for sd in [base, *models])
    if name != "greedy_soup":  # greedy soup: from its first member, the best-scoring model
        source = base if MERGE_RULES.get(name).needs_base else models[0]
        assert torch.equal(buffer, source["bn.num_batches_tracked"])


@pytest.mark.parametrize("name", RULES)
def test_mismatched_keys_name_the_tensor_and_the_model(name):
    base = make_state(0, mask=SHARED_MASK)
    models = [make_state(1, mask=SHARED_MASK), make_state(2, mask=SHARED_MASK)]
    if MERGE_RULES.get(name).exact_models == 1:
        models = models[:1]
    del models[-1]["layer.bias"]
    with pytest.raises(MergeError, match=r"models\[\d\].*lacks 'layer.bias'"):
        run_rule(name, base, models)
    models[-1]["layer.bias"], models[-1]["extra"] = torch.zeros(5), torch.zeros(1)
    with pytest.raises(MergeError, match="has extra 'extra'"):
        run_rule(name, base, models)


@pytest.mark.parametrize("name", RULES)
def test_mismatched_shapes_name_the_tensor_and_the_model(name):
    base = make_state(0, mask=SHARED_MASK)
    models = [make_state(1, mask=SHARED_MASK), make_state(2, mask=SHARED_MASK)][: MERGE_RULES.get(name).exact_models]
    models[-1]["layer.bias"] = torch.zeros(7)
    with pytest.raises(MergeError, match=r"'layer.bias' has shape \[\d\] in models\[\d\] but \[\d\]"):
        run_rule(name, base, models)


class LazyStateDict(Mapping):
    """Hands out fresh tensors like a safetensors file and checks that merges read one key at a time."""

    def __init__(self, state: dict, log: list, live: dict) -> None:
        self._state, self._log, self._live = state, log, live

    def __getitem__(self, key: str) -> torch.Tensor:
        stale = [k for k, refs in self._live.items() if k != key and any(r() is not None for r in refs)]
        assert not stale, f"read {key!r} while tensors of {stale} are still alive"
        tensor = self._state[key].clone()
        self._live.setdefault(key, []).append(weakref.ref(tensor))
        self._log.append(key)
        return tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self._state)

    def __len__(self) -> int:
        return len(self._state)

    def values(self):  # a merge must never pull every tensor of an input at once
        raise AssertionError("values() called on a lazy input")

    def items(self):
        raise AssertionError("items() called on a lazy input")


@pytest.mark.parametrize("name", [*RULES, "ties_global"])
def test_lazy_inputs_are_read_one_key_at_a_time(name):
    hparams = {"trim_scope": "global"} if name == "ties_global" else {}
    name = "ties" if name == "ties_global" else name
    log, live = [], {}
    states = [make_state(s, mask=SHARED_MASK) for s in (0, 1, 2, 3)]
    base, *models = [LazyStateDict(s, log, live) for s in states]
    out = run_rule(name, base, models, **hparams)
    assert set(out) == set(states[0])
    # Reads come in runs of one key (one or more passes over the keys, never interleaved).
    runs = [k for i, k in enumerate(log) if i == 0 or log[i - 1] != k]
    keys = list(states[0])
    assert len(runs) % len(keys) == 0 and runs == keys * (len(runs) // len(keys)), runs


def test_average_and_task_arithmetic_closed_forms():
    base, a, b = make_state(0), make_state(1), make_state(2)
    w = "layer.weight"
    torch.testing.assert_close(merge("average", None, [a, b])[w], (a[w] + b[w]) / 2)
    torch.testing.assert_close(merge("average", None, [a, b], [1.0, 3.0])[w], (a[w] + 3 * b[w]) / 4)
    out = merge("task_arithmetic", base, [a, b], [0.5, 2.0], scale=0.3)[w]
    torch.testing.assert_close(out, base[w] + 0.3 * (0.5 * (a[w] - base[w]) + 2.0 * (b[w] - base[w])))


def _trimmed_count(out: dict, base: dict, key: str) -> int:
    return int((out[key] != base[key]).sum())


def test_ties_trims_per_tensor_and_globally():
    zeros = {"big": torch.zeros(30), "small": torch.zeros(10)}
    big = torch.arange(1.0, 31.0) * torch.tensor([1.0, -1.0]).repeat(15)  # |τ| = 1..30, mixed signs
    model = {"big": big, "small": torch.linspace(0.01, 0.1, 10)}
    per_tensor = merge("ties", zeros, [model], density=0.25)
    assert _trimmed_count(per_tensor, zeros, "big") == 8  # 7.5 rounded half up
    assert _trimmed_count(per_tensor, zeros, "small") == 3  # 2.5 rounded half up
    assert torch.equal(per_tensor["big"][-8:], big[-8:])  # the largest magnitudes survive unchanged
    glob = merge("ties", zeros, [model], density=0.25, trim_scope="global")
    assert _trimmed_count(glob, zeros, "big") == 10 and _trimmed_count(glob, zeros, "small") == 0
    assert torch.equal(glob["big"][-10:], big[-10:])


def test_global_threshold_bisection_matches_exact_ranking(monkeypatch):
    g = torch.Generator().manual_seed(0)
    base = {f"t{i}": torch.randn(50 + 37 * i, generator=g) for i in range(5)}
    models = [{k: v + torch.randn(v.shape, generator=g) * (i + 1) for k, v in base.items()} for i in range(2)]
    exact = ta.global_thresholds(base, models, 0.3)  # few candidates: ranked directly
    monkeypatch.setattr(ta, "_GATHER_LIMIT", 8)
    monkeypatch.setattr(ta, "_BINS", 4)  # forces several histogram passes before the final ranking
    assert ta.global_thresholds(base, models, 0.3) == exact
    for i, m in enumerate(models):
        mags = torch.cat([(m[k] - base[k]).abs() for k in base])
        assert int((mags >= exact[i]).sum()) == ta.keep_count(0.3, mags.numel())


def test_ties_sign_election_and_disjoint_mean():
    base = {"x": torch.zeros(4)}
    taus = [torch.tensor(t) for t in ([2.0, 3.0, 0.0, -1.0], [1.0, -1.0, 0.0, 1.0], [-4.0, 1.0, 0.0, 0.0])]
    models = [{"x": t} for t in taus]
    out = merge("ties", base, models, density=1.0)["x"]
    # entry 0: Σ = −1 → only −4 agrees; entry 1: Σ = 3 → mean(3, 1); entry 3: Σ = 0 → nothing agrees
    torch.testing.assert_close(out, torch.tensor([-4.0, 2.0, 0.0, 0.0]))
    weighted = merge("ties", base, models, [1.0, 1.0, 2.0], density=1.0, scale=0.5)["x"]
    torch.testing.assert_close(weighted, 0.5 * torch.tensor([-4.0, 5.0 / 3.0, 0.0, 0.0]))


def test_dare_keep_rate_rescale_and_seed():
    base, model = {"x": torch.zeros(100_000)}, {"x": torch.ones(100_000)}
    out = merge("dare_linear", base, [model], drop_rate=0.9, seed=1)["x"]
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.1) < 0.005
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], 10.0))
    assert torch.equal(out, merge("dare_linear", base, [model], drop_rate=0.9, seed=1)["x"])
    assert not torch.equal(out, merge("dare_linear", base, [model], drop_rate=0.9, seed=2)["x"])


def test_dare_is_unbiased_over_seeds():
    base = {"x": torch.zeros(2000)}
    tau = torch.randn(2000, generator=torch.Generator().manual_seed(0))
    mean = sum(merge("dare_linear", base, [{"x": tau}], drop_rate=0.5, seed=s)["x"] for s in range(200)) / 200
    ratio = float((mean * tau).sum() / tau.square().sum())  # 1 if E[τ̂] = τ; 0.5 without the rescale
    assert abs(ratio - 1.0) < 0.02
    assert float((mean - tau).abs().mean()) < 0.1  # per-entry std of the mean ≈ 0.07·|τ|


def test_shared_path_dare_ties_without_dropping_is_ties_without_trimming():
    base, models = make_state(0), [make_state(s) for s in (1, 2, 3)]
    a = merge("dare_ties", base, models, drop_rate=0.0, scale=0.7)
    b = merge("ties", base, models, density=1.0, scale=0.7)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fisher_merge_equal_dominant_and_missing_fishers():
    a, b = make_state(1), make_state(2)
    ones = {k: torch.ones_like(v) for k, v in a.items() if v.is_floating_point()}
    equal = merge("fisher", None, [a, b], fishers=[ones, ones])
    avg = merge("average", None, [a, b])
    assert all(torch.allclose(equal[k], avg[k]) for k in a)
    zeros = {k: torch.zeros_like(v) for k, v in ones.items()}  # floored at 1e-6
    dominant = merge("fisher", None, [a, b], fishers=[{k: v * 1e3 for k, v in ones.items()}, zeros])
    assert all(torch.allclose(dominant[k], a[k], rtol=1e-6, atol=1e-7) for k in a)
    weight_only = [{"layer.weight": ones["layer.weight"] * 1e3}, {"layer.weight": zeros["layer.weight"]}]
    partial = merge("fisher", None, [a, b], fishers=weight_only)
    torch.testing.assert_close(partial["layer.bias"], avg["layer.bias"])  # no Fisher: plain average
    with pytest.raises(MergeError, match="'layer.weight' has a Fisher in fishers\\[0\\] but not in fishers\\[1\\]"):
        merge("fisher", None, [a, b], fishers=[ones, {"layer.bias": ones["layer.bias"]}])


def test_wise_endpoints_are_exact():
    base, ft = make_state(0, torch.bfloat16), make_state(1, torch.bfloat16)
    for alpha, expected in ((0.0, base), (1.0, ft)):
        out = merge("wise", base, [ft], alpha=alpha)
        assert all(torch.equal(out[k], expected[k]) for k in base if base[k].is_floating_point())
    mid = merge("wise", make_state(0), [make_state(1)], alpha=0.25)["layer.bias"]
    torch.testing.assert_close(mid, 0.75 * make_state(0)["layer.bias"] + 0.25 * make_state(1)["layer.bias"])


def test_mwa_weights():
    losses = [0.5, 1.0, 2.0, 4.0]
    for kind, metrics, best_first in (("loss", losses, True), ("step", [100, 200, 300, 400], False)):
        w = mwa_weights(metrics, kind, penalty=2.0)
        assert math.isclose(sum(w), 1.0)
        assert w == sorted(w, reverse=best_first) and len(set(w)) == 4  # strictly monotone in the metric
        assert mwa_weights(metrics, kind, penalty=0.0) == [0.25] * 4
    w1, w3 = mwa_weights(losses, "loss", 1.0), mwa_weights(losses, "loss", 3.0)
    assert w3[0] > w1[0]  # a larger penalty concentrates the weight on the best loss
    torch.testing.assert_close(torch.tensor(w1), torch.tensor([1 / m for m in losses]) / sum(1 / m for m in losses))
    with pytest.raises(MergeError, match="positive losses"):
        mwa_weights([0.0, 1.0], "loss")
    a, b = make_state(1), make_state(2)
    out = merge("mwa", None, [a, b], metrics=[1.0, 3.0], penalty=1.0)
    torch.testing.assert_close(out["layer.weight"], 0.75 * a["layer.weight"] + 0.25 * b["layer.weight"])


def test_magmax_takes_largest_magnitude_and_later_task_on_ties():
    base = {"x": torch.full((4,), 10.0)}
    taus = [torch.tensor(t) for t in ([1.0, 2.0, -5.0, 0.0], [-3.0, -2.0, 4.0, 0.0], [2.0, 1.0, 1.0, 0.0])]
    out = merge("magmax", base, [{"x": 10.0 + t} for t in taus])["x"]
    torch.testing.assert_close(out, 10.0 + 0.5 * torch.tensor([-3.0, -2.0, -5.0, 0.0]))


def test_sparse_soup_keeps_the_mask_and_rejects_other_masks():
    models = [make_state(s, mask=SHARED_MASK) for s in (1, 2)]
    out = merge("sparse_soup", None, models)["layer.weight"]
    assert torch.equal(out == 0, ~SHARED_MASK)
    torch.testing.assert_close(out, (models[0]["layer.weight"] + models[1]["layer.weight"]) / 2)
    models[1]["layer.weight"] = models[1]["layer.weight"].clone()
    models[1]["layer.weight"][~SHARED_MASK] = 1.0
    with pytest.raises(MergeError, match=r"'layer.weight' of models\[1\] has another sparsity mask"):
        merge("sparse_soup", None, models)


def test_greedy_soup_keeps_only_models_that_do_not_hurt():
    models = [{"x": torch.tensor([v])} for v in (-1.2, 5.0, 1.0)]  # the score prefers x near 0
    out = merge("greedy_soup", None, models, score=lambda sd: -abs(float(sd["x"])))
    torch.testing.assert_close(out["x"], torch.tensor([-0.1]))  # mean(1.0, −1.2); 5.0 rejected


def test_call_errors():
    base, a = make_state(0), make_state(1)
    with pytest.raises(MergeError, match="needs a base model"):
        merge("ties", None, [a])
    with pytest.raises(MergeError, match="does not use density"):
        merge("average", None, [a], density=0.5)
    with pytest.raises(MergeError, match="got 1 weights for 2 models"):
        merge("average", None, [a, a], [1.0])
    with pytest.raises(MergeError, match="takes no per-model weights"):
        merge("magmax", base, [a], [1.0])
    with pytest.raises(MergeError, match="takes exactly 1 model"):
        merge("wise", base, [a, a])
    with pytest.raises(MergeError, match="non-negative"):
        merge("average", None, [a, a], [1.0, -2.0])
    with pytest.raises(MergeError, match=r"entries in 'metrics' for 2 models"):
        merge("mwa", None, [a, a], metrics=[1.0])


def test_estimate_fisher_is_the_mean_squared_per_example_gradient():
    torch.manual_seed(0)
    model = nn.Linear(3, 4)
    x, y = torch.randn(6, 3), torch.tensor([0, 1, 2, 3, 0, 1])
    loader = [(x[:4], y[:4]), (x[4:], y[4:])]
    fisher = estimate_fisher(model, loader, n_examples=6, mode="empirical")
    p = torch.softmax(model(x), dim=-1).detach()
    g = nn.functional.one_hot(y, 4).float() - p  # ∂ log p_y / ∂ logits, per example
    torch.testing.assert_close(fisher["weight"], (g[:, :, None] * x[:, None, :]).square().mean(0))
    torch.testing.assert_close(fisher["bias"], g.square().mean(0))
    model.bias.requires_grad_(False)
    assert set(estimate_fisher(model, loader, 2, mode="empirical")) == {"weight"}


def test_sampled_fisher_approaches_the_true_fisher():
    torch.manual_seed(0)
    model = nn.Linear(2, 3)
    x = torch.randn(1, 2)
    loader = [(x.repeat(500, 1), torch.zeros(500, dtype=torch.long))] * 4
    fisher = estimate_fisher(model, loader, n_examples=2000, mode="sampled", seed=3)
    p = torch.softmax(model(x), dim=-1).detach()[0]
    g = torch.eye(3) - p  # row y: ∂ log p_y / ∂ logits
    true_bias = (p[:, None] * g.square()).sum(0)  # E_{y~p}[(e_y − p)²]
    torch.testing.assert_close(fisher["bias"], true_bias, rtol=0.1, atol=1e-3)


def test_wise_last_is_the_wise_blend_of_the_last_model_with_the_base():
    """Eval-time WiSE (the reference's --wise-ft --alpha): (1−α)θ0 + αθ_t, θ_t the latest model, by hand."""
    base = make_state(0)
    models = [make_state(s) for s in (1, 2, 3)]
    out = merge("wise_last", base, models, alpha=0.3)
    for k in ("layer.weight", "layer.bias"):
        torch.testing.assert_close(out[k], 0.7 * base[k] + 0.3 * models[-1][k], rtol=1e-6, atol=1e-6)
