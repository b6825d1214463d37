"""Averaging callbacks on a tiny open_clip model trained for a few CPU steps: closed forms of the
weight ensemble, EMA, WiSE-FT and checkpoint averaging, buffers never averaged, bit-identical resume."""

from __future__ import annotations

import functools

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from zscl.merging import AVERAGING_CALLBACKS, mwa_weights
from zscl.merging.callbacks import EMA, CheckpointAveraging, UniformAveraging, WiSEFT
from zscl.models import load_clip

@functools.lru_cache(maxsize=1)
def prompt_tokens() -> torch.Tensor:
    return load_clip("zscl-tiny-vit").tokenizer(["a red circle", "a blue square", "a cat", "a dog"])


class TinyModule(pl.LightningModule):
    """Trains the tiny CLIP contrastively on images generated from the step number (resumable)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.clip = load_clip("zscl-tiny-vit").model.train()
        self.clip.token_embedding.requires_grad_(False)  # 94% of the parameters: frozen keeps steps fast
        self.clip.register_buffer("steps_seen", torch.zeros((), dtype=torch.long))  # an integer buffer
        self.initial = {n: p.detach().clone() for n, p in self.clip.named_parameters()}
        with torch.no_grad():  # the task starts from other weights than the initial ones
            for p in self.clip.parameters():
                p.add_(0.01 * torch.randn_like(p))
        self.task_start = {n: p.detach().clone() for n, p in self.clip.named_parameters()}
        self.tokens = prompt_tokens()
        self.recorded: dict[int, dict[str, torch.Tensor]] = {0: self.task_start}
        self.losses: dict[int, float] = {}

    def reference_weights(self, kind: str) -> dict[str, torch.Tensor]:
        return {"initial": self.initial, "task_start": self.task_start}[kind]

    def training_step(self, batch, batch_idx):
        g = torch.Generator().manual_seed(int(self.global_step))
        images = torch.randn(4, 3, 32, 32, generator=g)
        img = F.normalize(self.clip.encode_image(images), dim=-1)
        txt = F.normalize(self.clip.encode_text(self.tokens), dim=-1)
        self.clip.steps_seen += 1
        return F.cross_entropy(self.clip.logit_scale.exp() * img @ txt.T, torch.arange(4))

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.recorded[self.global_step] = {n: p.detach().clone() for n, p in self.clip.named_parameters()}
        self.losses[self.global_step] = float(outputs["loss"])

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.clip.parameters() if p.requires_grad], lr=1e-3)

    def train_dataloader(self):
        return DataLoader(range(10_000), batch_size=1)


def fit(module: TinyModule, callbacks: list, max_steps: int, **kwargs) -> pl.Trainer:
    trainer = pl.Trainer(
        max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        callbacks=callbacks,
    )
    trainer.fit(module, **kwargs)
    return trainer


def mean_of(states: list[dict], weights: list[float] | None = None) -> dict[str, torch.Tensor]:
    weights = weights or [1.0 / len(states)] * len(states)
    return {k: sum(w * s[k] for w, s in zip(weights, states)) for k in states[0]}


def assert_params(module: TinyModule, expected: dict[str, torch.Tensor], exact: bool = False) -> None:
    for n, p in module.clip.named_parameters():
        if exact:
            assert torch.equal(p.detach(), expected[n]), n
        else:
            torch.testing.assert_close(p.detach(), expected[n], rtol=1e-5, atol=1e-6, msg=n)


def assert_buffers_untouched(module: TinyModule, steps: int, mask: torch.Tensor) -> None:
    assert torch.equal(module.clip.attn_mask, mask)  # −inf above the diagonal, never averaged
    assert int(module.clip.steps_seen) == steps
    with torch.no_grad():
        assert torch.isfinite(module.clip.encode_text(module.tokens)).all()


def test_registry_names():
    assert set(AVERAGING_CALLBACKS.names()) == {"we", "ema", "checkpoint_avg", "wise", "we_wise", "moving_avg"}
    assert AVERAGING_CALLBACKS.get("we") is UniformAveraging


@pytest.mark.parametrize("steps", [4, 5])
def test_weight_ensemble_matches_the_reference_closed_form(steps):
    module = TinyModule()
    mask = module.clip.attn_mask.clone()
    fit(module, [UniformAveraging(every=2)], steps)
    # members: task start, weights after iterations k = 0, 2, 4 (global steps k + 1) within the
    # run, plus the final weights again when steps % every == 0 (the reference's lr-0 iteration N).
    members = [module.recorded[0]] + [module.recorded[k + 1] for k in range(0, steps, 2)]
    if steps % 2 == 0:
        members.append(module.recorded[steps])
    assert len(members) == 4
    assert_params(module, mean_of(members))
    assert_buffers_untouched(module, steps, mask)


def test_ema_closed_form():
    module = TinyModule()
    mask = module.clip.attn_mask.clone()
    beta = 0.8
    fit(module, [EMA(decay=beta, every=2)], 5)
    # updates after global steps 2 and 4: β² θ_start + (1−β) (β θ2 + θ4)
    r = module.recorded
    expected = {k: beta**2 * r[0][k] + (1 - beta) * (beta * r[2][k] + r[4][k]) for k in r[0]}
    assert_params(module, expected)
    assert_buffers_untouched(module, 5, mask)


def test_we_wise_blends_every_member_with_the_task_start_weights():
    """The reference's wise_we: when θ joins (n members so far), avg ← α (n avg + θ)/(n+1) + (1−α) θ_start."""
    from zscl.merging.callbacks import WeWiSE

    module = TinyModule()
    alpha = 0.9
    fit(module, [WeWiSE(every=2, alpha=alpha)], 4)
    r, start = module.recorded, module.task_start
    avg, n = dict(start), 1
    for member in (r[1], r[3], r[4]):  # after iterations 0 and 2, and the final weights (4 % 2 == 0)
        avg = {k: alpha * (n * avg[k] + member[k]) / (n + 1) + (1 - alpha) * start[k] for k in avg}
        n += 1
    assert_params(module, avg)


class BeforePull(pl.Callback):
    """The student's weights after each optimizer step, before a later callback changes them."""

    def __init__(self) -> None:
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.weights[trainer.global_step] = {n: p.detach().clone() for n, p in pl_module.clip.named_parameters()}


@pytest.mark.parametrize("toward", ["task_start", "initial", "previous"])
def test_moving_avg_pulls_the_student_toward_its_target(toward):
    """The reference's --moving_avg (every 2, decay d): θ ← d θ + (1−d) θ_target after iteration 0 (global step 1)
    and at the end (2 % 2 == 0); the target is θ_start, θ_initial, or (previous) the weights before the last pull."""
    from zscl.merging.callbacks import MovingAverage

    module = TinyModule()
    d = 0.7
    before = BeforePull()
    fit(module, [before, MovingAverage(decay=d, every=2, toward=toward)], 2)
    pre1, pre2 = before.weights[1], before.weights[2]
    first = module.initial if toward == "initial" else module.task_start
    second = pre1 if toward == "previous" else first
    pulled1 = {k: d * pre1[k] + (1 - d) * first[k] for k in pre1}
    for k, v in module.recorded[1].items():  # the module's hook runs after the callbacks
        torch.testing.assert_close(v, pulled1[k], rtol=1e-5, atol=1e-6)
    assert_params(module, {k: d * pre2[k] + (1 - d) * second[k] for k in pre2})


@pytest.mark.parametrize(("alpha", "reference"), [(0.0, "initial"), (1.0, "initial"), (0.25, "task_start")])
def test_wiseft(alpha, reference):
    module = TinyModule()
    mask = module.clip.attn_mask.clone()
    fit(module, [WiSEFT(alpha=alpha, reference=reference)], 2)
    final, ref = module.recorded[2], module.reference_weights(reference)
    if alpha in (0.0, 1.0):
        assert_params(module, ref if alpha == 0.0 else final, exact=True)
    else:
        assert_params(module, {k: (1 - alpha) * ref[k] + alpha * final[k] for k in ref})
    assert_buffers_untouched(module, 2, mask)


@pytest.mark.parametrize("weighting", ["uniform", "loss", "step"])
def test_checkpoint_averaging(weighting):
    module = TinyModule()
    mask = module.clip.attn_mask.clone()
    fit(module, [CheckpointAveraging(every=2, last_k=2, weighting=weighting, penalty=2.0)], 6)
    kept = [4, 6]  # snapshots at 2, 4, 6; the last two kept
    metrics = {"uniform": None, "loss": [module.losses[s] for s in kept], "step": kept}[weighting]
    weights = None if metrics is None else mwa_weights(metrics, weighting, 2.0)
    if weights is not None:
        assert abs(weights[0] - weights[1]) > 1e-3  # the weighting matters for this check
    assert_params(module, mean_of([module.recorded[s] for s in kept], weights))
    assert_buffers_untouched(module, 6, mask)


def _states(callbacks: list) -> list[dict]:
    return [cb.state_dict() for cb in callbacks]


def _assert_same(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys() and all(_assert_same(a[k], b[k]) is None for k in a)
    elif isinstance(a, list):
        assert len(a) == len(b) and all(_assert_same(x, y) is None for x, y in zip(a, b))
    else:
        assert a == b


def test_resume_mid_task_is_bit_identical(tmp_path):
    def callbacks():
        return [UniformAveraging(every=2), EMA(decay=0.9), CheckpointAveraging(every=2, last_k=2, weighting="loss")]

    straight = TinyModule()
    cbs_straight = callbacks()
    saver = ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=3, save_top_k=-1)
    fit(straight, [*cbs_straight, saver], 6)
    resumed = TinyModule()
    cbs_resumed = callbacks()
    fit(resumed, [*cbs_resumed, ModelCheckpoint(dirpath=tmp_path / "again")], 6, ckpt_path=tmp_path / "step=3.ckpt")
    assert sorted(resumed.recorded) == [0, 4, 5, 6]  # it really resumed at step 3
    _assert_same(_states(cbs_straight), _states(cbs_resumed))
    assert_params(resumed, {n: p.detach() for n, p in straight.clip.named_parameters()}, exact=True)


def test_ablation_method_configs_resolve_to_their_parts():
    """method/we_wise, method/moving_avg: the reference's defaults (alpha 0.98; decay 0.999 toward the task start,
    every 100); method/wise_eval: sequential training, the wise_last merge with alpha 0.5 evaluated and exported."""
    from zscl.bench.step import build_module
    from zscl.cli.sequence import build_parser
    from zscl.merging.callbacks import MovingAverage, WeWiSE
    from zscl.runner.configs import resolve_config_args

    cbs = {m: [c for c in build_module("zscl-tiny-vit", m, compile="off").configure_callbacks()
               if isinstance(c, (WeWiSE, MovingAverage))] for m in ("we_wise", "moving_avg")}
    (we,), (mv,) = cbs["we_wise"], cbs["moving_avg"]
    assert (type(we), we.every, we.alpha) == (WeWiSE, 100, 0.98)
    assert (type(mv), mv.every, mv.decay, mv.toward) == (MovingAverage, 100, 0.999, "task_start")
    args = resolve_config_args(["--config", "benchmark/synthetic", "--config", "method/wise_eval", "--out", "unused"])
    cfg = build_parser(args).parse_args(args)
    assert (cfg.continual.init, cfg.continual.merge, cfg.continual.hparams) == ("sequential", "wise_last", {"alpha": 0.5})
