"""DIKI core: prefix attention against its formula written out, untrained DIKI against open_clip,
the calibration against scipy, task selection, weights and batch voting (independent oracles)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal

from zscl.diki import DIKIPrefixes, PrefixConfig, Route, TaskGaussians, calibrated_logits, majority, task_logits
from zscl.models import load_clip

ARCHS = ["zscl-tiny-vit", "zscl-synth-tiny"]  # 1 and 3 image heads, 1 and 2 text heads


def _inputs(bundle, n: int = 4):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(n, 3, bundle.image_size, bundle.image_size, generator=g)
    return images, bundle.tokenizer(["a photo of a cat.", "two red dots", "a diagram"])


def _randomise(prefixes: DIKIPrefixes, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in prefixes.parameters():
            p.copy_(torch.randn(p.shape, generator=g))


def _clip(arch: str):
    """A randomly initialised tiny CLIP with non-zero attention biases (torch initialises them to 0,
    which would hide a bias applied twice or to the wrong branch; pretrained CLIPs have them)."""
    bundle = load_clip(arch, None)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in bundle.model.named_parameters():
            if name.endswith(("in_proj_bias", "out_proj.bias")):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return bundle


# -- prefix attention ---------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_untrained_diki_is_open_clip_in_both_towers(one_thread, arch):
    bundle = _clip(arch)
    clip = bundle.model
    images, tokens = _inputs(bundle)
    keys = list(clip.state_dict())
    with torch.no_grad():
        expected, _ = clip.get_logits(images, tokens)  # open_clip's own logits, before any hook exists
    prefixes = DIKIPrefixes(clip, PrefixConfig(), num_tasks=3)
    assert list(clip.state_dict()) == keys, "the CLIP's state-dict keys must not change"
    gaussians = TaskGaussians(3, int(clip.text_projection.shape[1]))
    g = torch.Generator().manual_seed(1)
    gaussians.fit(0, torch.randn(40, gaussians.dim, generator=g))
    gaussians.fit(1, torch.randn(40, gaussians.dim, generator=g) + 0.5)
    with torch.no_grad():
        for task in range(3):  # training path, both towers at w = 1
            torch.testing.assert_close(task_logits(clip, prefixes, images, tokens, task), expected)
        for voting in (True, False):  # test path, per-image tasks and weights
            torch.testing.assert_close(calibrated_logits(clip, prefixes, gaussians, images, tokens, voting), expected)
    _randomise(prefixes)  # the prefixes really are in both towers' forward
    with torch.no_grad():
        img, txt = clip.encode_image(images), clip.encode_text(tokens)
        with prefixes.routing(image=Route(0, 1.0)):
            assert not torch.allclose(clip.encode_image(images), img)
        with prefixes.routing(text=Route(0, 1.0)):
            assert not torch.allclose(clip.encode_text(tokens), txt)


def _formula(block, x, keys, values, weight, mask):
    """The DIKI attention of one block, written out: separate softmaxes, prefixes not projected, no prefix mask."""
    attn = block.attn
    d, h = attn.embed_dim, attn.num_heads
    dh = d // h
    q, k, v = (x @ w.T + b for w, b in zip(attn.in_proj_weight.chunk(3), attn.in_proj_bias.chunk(3)))

    def heads(t):  # [B, M, d] -> [B, H, M, dh]
        return t.reshape(t.shape[0], t.shape[1], h, dh).permute(0, 2, 1, 3)

    q, k, v, pk, pv = map(heads, (q, k, v, keys, values))
    frozen = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dh) + mask, dim=-1) @ v
    prefix = torch.softmax(q @ pk.transpose(-1, -2) / math.sqrt(dh), dim=-1) @ pv
    out = frozen + weight[:, None, None, None] * prefix
    out = out.permute(0, 2, 1, 3).reshape(x.shape[0], x.shape[1], d)
    return out @ attn.out_proj.weight.T + attn.out_proj.bias


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("tower", ["image", "text"])
def test_prefix_attention_equals_the_formula(one_thread, arch, tower):
    clip = _clip(arch).model.double()
    prefixes = DIKIPrefixes(clip, PrefixConfig(), num_tasks=3).double()
    _randomise(prefixes, seed=2)
    i = prefixes.towers.index(tower)  # the tower's first prefixed block
    block, prefix = clip.get_submodule(prefixes.names[i]), prefixes.blocks[i]
    g = torch.Generator().manual_seed(3)
    n, d = 5, block.attn.embed_dim
    x = torch.randn(3, n, d, generator=g, dtype=torch.float64)
    causal = torch.zeros(n, n, dtype=torch.float64)
    if tower == "text":
        causal = torch.full((n, n), float("-inf"), dtype=torch.float64).triu(1)
    tasks, weights = torch.tensor([2, 0, 2]), torch.tensor([0.3, 1.0, 0.7], dtype=torch.float64)
    keys = torch.stack([prefix.keys[t] for t in tasks.tolist()])
    values = torch.stack([prefix.values[t] for t in tasks.tolist()])
    assert block.attn.batch_first, "open_clip >= 2.24 blocks are batch-first"
    with torch.no_grad(), prefixes.routing(**{tower: Route(tasks, weights)}):
        got = block.attention(q_x=x, attn_mask=causal if tower == "text" else None)
    torch.testing.assert_close(got, _formula(block, x, keys, values, weights, causal), rtol=1e-10, atol=1e-10)
    with torch.no_grad(), prefixes.routing(**{tower: Route(1, 0.5)}):  # one task and a scalar weight
        got = block.attention(q_x=x, attn_mask=causal if tower == "text" else None)
    expected = _formula(block, x, prefix.keys[1].expand(3, -1, -1), prefix.values[1].expand(3, -1, -1),
                        torch.full((3,), 0.5, dtype=torch.float64), causal)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_depth_and_initialisation():
    clip = load_clip("zscl-synth-tiny", None).model  # 3 image blocks (width 96), 2 text blocks (width 64)
    prefixes = DIKIPrefixes(clip, PrefixConfig(depth_image=2, depth_text=8, length=4), num_tasks=2)
    assert prefixes.names == ["visual.transformer.resblocks.0", "visual.transformer.resblocks.1",
                              "transformer.resblocks.0", "transformer.resblocks.1"]
    assert prefixes.parameters_per_task() == 2 * 4 * (96 + 96 + 64 + 64)
    keys = torch.cat([k.flatten() for b in prefixes.blocks for k in b.keys])
    assert keys.abs().max() <= 1 and keys.abs().max() > 0.9 and keys.std() > 0.5  # U(-1, 1)
    assert all(float(v.detach().abs().max()) == 0 for b in prefixes.blocks for v in b.values)
    chosen = prefixes.task_parameters(1)
    assert {name for name, _ in chosen} == {f"blocks.{i}.{k}.1" for i in range(4) for k in ("keys", "values")}
    assert sum(p.requires_grad for p in prefixes.parameters()) == 8


def test_a_resnet_image_tower_is_refused():
    clip = load_clip("zscl-tiny-rn", None).model
    with pytest.raises(ValueError, match="image tower"):
        DIKIPrefixes(clip, PrefixConfig(), num_tasks=2)


def test_vit_b16_matches_the_references_prefix_count():
    import open_clip

    with torch.device("meta"):  # shapes only
        clip = open_clip.create_model("ViT-B-16", device="meta")
    prefixes = DIKIPrefixes(clip, PrefixConfig(), num_tasks=11)
    assert prefixes.towers == ["image"] * 8 + ["text"] * 8
    assert prefixes.parameters_per_task() == 8 * 2 * 8 * 768 + 8 * 2 * 8 * 512 == 163_840  # 1.8 M for 11 tasks


def test_gradient_reaches_only_the_routed_task(one_thread):
    bundle = load_clip("zscl-tiny-vit", None)
    clip = bundle.model.requires_grad_(False)
    prefixes = DIKIPrefixes(clip, PrefixConfig(), num_tasks=2)
    prefixes.task_parameters(1)
    images, tokens = _inputs(bundle)
    task_logits(clip, prefixes, images, tokens, task=1).logsumexp(1).sum().backward()
    assert all(b.values[1].grad is not None and b.values[1].grad.abs().sum() > 0 for b in prefixes.blocks)
    assert all(b.values[0].grad is None for b in prefixes.blocks)


# -- calibration --------------------------------------------------------------------------------


def _three_tasks(dim: int = 8, n: int = 300, spread: float = 0.02, seed: int = 0):
    """Three tasks whose normalised features cluster around three orthogonal directions."""
    g = torch.Generator().manual_seed(seed)
    gauss = TaskGaussians(num_tasks=4, dim=dim)  # one slot left unfitted
    feats = []
    for t in range(3):
        centre = torch.zeros(dim)
        centre[t] = 1.0
        f = centre.double() + spread * torch.randn(n, dim, generator=g, dtype=torch.float64)
        gauss.fit(t, 3.0 * f)  # unnormalised on purpose: fit normalises
        feats.append(torch.nn.functional.normalize(f, dim=-1))
    return gauss, feats


def test_fit_and_log_density_match_numpy_and_scipy():
    gauss, feats = _three_tasks()
    g = torch.Generator().manual_seed(5)
    queries = torch.randn(6, 8, generator=g)
    unit = torch.nn.functional.normalize(queries.double(), dim=-1).numpy()
    ll = gauss.log_density(queries)
    for t in range(3):
        f = feats[t].numpy()
        mu, cov = f.mean(0), np.cov(f, rowvar=False, ddof=1) + 1e-7 * np.eye(8)
        np.testing.assert_allclose(gauss.means[t].numpy(), mu, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(gauss.covariances[t].numpy(), cov, rtol=1e-9, atol=1e-15)
        np.testing.assert_allclose(ll[:, t].numpy(), multivariate_normal(mu, cov).logpdf(unit), rtol=1e-9)
    assert torch.isneginf(ll[:, 3]).all(), "an unfitted task is never chosen"


def test_an_image_from_task_2_picks_task_2_and_a_far_image_falls_back_to_zero_shot():
    gauss, _ = _three_tasks()
    g = torch.Generator().manual_seed(6)
    mu, cov = gauss.means[2].numpy(), gauss.covariances[2].numpy()
    draws = torch.from_numpy(np.random.default_rng(7).multivariate_normal(mu, cov, size=16))
    sel = gauss.select(draws, voting=False)
    assert (sel.own_tasks == 2).all() and (sel.tasks == 2).all()
    ll = gauss.log_density(draws)
    torch.testing.assert_close(sel.weights, torch.sigmoid(ll[:, 2] / 8 - 1).float())  # w = sigma(l_{t*}/D - 1)
    assert (sel.weights > 0.5).all()
    far = torch.zeros(1, 8)
    far[0, 7] = 1.0  # orthogonal to every task's direction
    far = far + 0.01 * torch.randn(1, 8, generator=g)
    sel = gauss.select(far)
    assert float(sel.weights[0]) < 0.01 and sel.text_weight < 0.01


def test_batch_voting_picks_the_majority_and_voting_off_keeps_each_image_own():
    gauss, feats = _three_tasks()
    batch = torch.cat([feats[1][:5], feats[0][:2], feats[2][:1]]).float()
    own = torch.tensor([1] * 5 + [0] * 2 + [2])
    voted = gauss.select(batch, voting=True)
    assert torch.equal(voted.own_tasks, own) and torch.equal(voted.tasks, torch.full((8,), 1))
    alone = gauss.select(batch, voting=False)
    assert torch.equal(alone.tasks, own)
    torch.testing.assert_close(voted.weights, alone.weights)  # voting moves the prefixes, not w
    assert int(majority(torch.tensor([2, 0, 2, 0, 1]))) == 0  # a tie goes to the lowest task


def test_gaussians_survive_a_state_dict_round_trip():
    gauss, _ = _three_tasks()
    fresh = TaskGaussians(num_tasks=4, dim=8)
    fresh.load_state_dict(gauss.state_dict())
    assert set(gauss.state_dict()) == {"means", "covariances", "fitted"}
    q = torch.randn(5, 8, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(fresh.log_density(q), gauss.log_density(q), rtol=0, atol=0)


def test_calibrated_logits_use_each_images_own_task_without_voting(one_thread):
    bundle = load_clip("zscl-tiny-vit", None)
    clip = bundle.model
    images, tokens = _inputs(bundle, 4)
    prefixes = DIKIPrefixes(clip, PrefixConfig(), num_tasks=2)
    _randomise(prefixes, seed=4)
    gauss = TaskGaussians(2, int(clip.text_projection.shape[1]))
    with torch.no_grad(), prefixes.routing():
        feats = clip.encode_image(images)
    # task 0 fitted near images 0-2, task 1 near image 3: voting sends image 3 to task 0, no voting to task 1
    g = torch.Generator().manual_seed(9)
    gauss.fit(0, feats[:3].repeat(20, 1) + 1e-3 * torch.randn(60, feats.shape[1], generator=g))
    gauss.fit(1, feats[3:].repeat(20, 1) + 1e-3 * torch.randn(20, feats.shape[1], generator=g))
    with torch.no_grad():
        sel = gauss.select(feats, voting=False)
        assert sel.tasks.tolist() == [0, 0, 0, 1]
        w = sel.weights
        with prefixes.routing(image=Route(sel.tasks, w), text=Route(1, float(w.mean()))):
            image3 = clip.encode_image(images)[3:]
            text1 = clip.encode_text(tokens)
        expected3 = clip.logit_scale.exp() * torch.nn.functional.normalize(image3, dim=-1) @ \
            torch.nn.functional.normalize(text1, dim=-1).T
        torch.testing.assert_close(calibrated_logits(clip, prefixes, gauss, images, tokens, voting=False)[3:], expected3)
        voted = calibrated_logits(clip, prefixes, gauss, images, tokens, voting=True)
        torch.testing.assert_close(voted, task_logits_with_weights(clip, prefixes, images, tokens, 0, w))


def task_logits_with_weights(clip, prefixes, images, tokens, task, w):
    with prefixes.routing(image=Route(task, w), text=Route(task, float(w.mean()))):
        img, txt = clip.encode_image(images), clip.encode_text(tokens)
    n = torch.nn.functional.normalize
    return clip.logit_scale.exp() * n(img, dim=-1) @ n(txt, dim=-1).T


# -- published rows -----------------------------------------------------------------------------


@pytest.mark.parametrize("name,numbers", [("mtil_order1", (68.7, 76.3, 85.1)), ("mtil_order2", (64.4, 74.5, 85.5)),
                                          ("mtil_order1_fewshot16", (68.7, 72.5, 78.6))])
def test_published_diki_rows_carry_their_source(name, numbers):
    from zscl.evaluation.compare import load_published, published_row, published_table

    table = load_published(name)
    row = published_row(table, "diki")
    assert tuple(row["published"][k] for k in ("transfer", "avg", "last")) == numbers
    assert row["accuracy"] is None and "DPW" in row["source"] and row["note"]
    assert ("re-run" in row["method"]) == name.endswith("fewshot16")
    assert any(r[0] == row["method"] for r in published_table(table).rows)
