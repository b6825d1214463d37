"""The fast training step of ContinualCLIP computes the same loss and gradients as a plain ZSCL step.

The module runs through a real Lightning fit (its own concatenated student forward, teacher
text embeddings cached once, WC folded into the gradient after backward). The reference below
is written straight from the ZSCL recipe (the README's "One training step"), in fp32 with nothing shared: separate
student forwards for task and reference images, teacher text embeddings recomputed from the
tokens, KD written out, WC added to the loss with a Python loop, autograd for everything.
"""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from zscl.bench.step import RandomBatches, build_module, make_trainer

pytestmark = pytest.mark.usefixtures("one_thread")
MODEL = "zscl-tiny-vit"
T = 2.0  # KD temperature of the method configs
SMOOTHING = 0.2


class Capture(L.Callback):
    """Step 0's inputs (student weights, batch), gradients before the optimizer step, and loss."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 0:
            self.student = copy.deepcopy(pl_module.clip)
            self.batch = batch

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == 0:
            self.grads = {n: p.grad.detach().clone() for n, p in pl_module.clip.named_parameters() if p.grad is not None}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 1:  # incremented by the optimizer step of step 0
            self.loss = outputs["loss"].detach().clone()


def kd(teacher_logits, student_logits):
    """Hinton KD: cross-entropy of the student's softened distribution to the teacher's, times T^2."""
    target = torch.softmax(teacher_logits / T, dim=1)
    return -(target * torch.log_softmax(student_logits / T, dim=1)).sum(dim=1).mean() * T**2


def plain_step(student, teacher, tokenizer, prompts, ref_tokens, batch, *, train_mode, text_mode,
               anchors=None, text_subset=None):
    """One ZSCL iteration as the recipe states it; returns (loss, {name: grad}).

    ``anchors``: WC's task-start weights by name (default: the teacher's, i.e. a first task);
    ``text_subset``: indices of the reference texts the paper-mode text loss uses this step.
    """
    images, labels = batch["task"]
    ref = batch["ref"]
    for name, p in student.named_parameters():
        p.requires_grad_(name != "logit_scale" and (train_mode == "whole" or name.startswith("visual.")))
        p.grad = None
    scale = student.logit_scale.exp().detach()
    f_task = F.normalize(student.encode_image(images), dim=-1)
    f_ref = F.normalize(student.encode_image(ref), dim=-1)
    g_class = F.normalize(student.encode_text(tokenizer(prompts)), dim=-1)
    loss = F.cross_entropy(scale * f_task @ g_class.t(), labels, label_smoothing=SMOOTHING)
    with torch.no_grad():
        g_ref_teacher = F.normalize(teacher.encode_text(ref_tokens), dim=-1)
        f_ref_teacher = F.normalize(teacher.encode_image(ref), dim=-1)
    t = scale * f_ref_teacher @ g_ref_teacher.t()
    u = scale * f_ref @ g_ref_teacher.t()
    loss = loss + kd(t, u)
    if text_mode == "coded":
        loss = loss + kd(t.t(), u.t())
    else:  # the paper's text side: the student's own embeddings of the reference texts
        keep = slice(None) if text_subset is None else text_subset
        g_ref_student = F.normalize(student.encode_text(ref_tokens[keep]), dim=-1)
        loss = loss + kd(t[:, keep].t(), (scale * f_ref @ g_ref_student.t()).t())
    # WC, lambda = 1: the anchor is the task-start model (for a first task, the initial weights).
    anchors = dict(teacher.named_parameters()) if anchors is None else anchors
    for name, p in student.named_parameters():
        if p.requires_grad:
            loss = loss + ((p - anchors[name]) ** 2).sum()
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in student.named_parameters() if p.grad is not None}


def perturb_(model):
    """Move the student away from the teacher and the WC anchor, so KD and WC have gradients."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "logit_scale":
                p.add_(torch.randn(p.shape, generator=g) * 0.3 * (p.std() if p.numel() > 1 else 0.1))


def wc_value(student, teacher, train_mode):
    anchors = dict(teacher.named_parameters())
    return sum(((p - anchors[n]) ** 2).sum() for n, p in student.named_parameters()
               if n != "logit_scale" and (train_mode == "whole" or n.startswith("visual."))).detach()


CASES = [  # (method config, train mode, text mode, WC folded into the gradient)
    ("zscl", "whole", "coded", True),
    ("zscl", "image", "coded", True),
    ("zscl_paper_text", "whole", "paper", True),
    ("zscl", "whole", "coded", False),
]


@pytest.mark.parametrize("method,train_mode,text_mode,fold", CASES)
def test_module_step_matches_plain_fp32_step(method, train_mode, text_mode, fold):
    from zscl.methods.config import Speed

    torch.manual_seed(0)
    module = build_module(MODEL, method, train_mode=train_mode, compile="off",
                          speed=Speed(compile=False, fold_weight_constraint=fold))
    perturb_(module.clip)
    teacher = copy.deepcopy(module.teacher)
    data = RandomBatches(module.bundle.image_size, batch=6, ref_batch=5, classes=7, ref_texts=9, seed=1)
    capture = Capture()
    make_trainer(torch.device("cpu"), "32-true", max_steps=3, callbacks=[capture]).fit(module, datamodule=data)

    tokenizer = module.bundle.tokenizer
    loss, grads = plain_step(capture.student, teacher, tokenizer, data.spec.prompts(), data.reference_tokens(tokenizer),
                             capture.batch, train_mode=train_mode, text_mode=text_mode)
    # Folded WC is not part of the returned loss (its gradient is added after backward).
    module_loss = capture.loss + (wc_value(capture.student, teacher, train_mode) if fold else 0.0)
    torch.testing.assert_close(module_loss, loss, rtol=1e-5, atol=1e-6)
    assert set(capture.grads) == set(grads)
    for name, grad in grads.items():
        tol = 1e-5 * grad.abs().max().item()  # rtol on the tensor's scale: summation order differs
        torch.testing.assert_close(capture.grads[name], grad, rtol=1e-5, atol=tol, msg=lambda m: f"{name}: {m}")
    if train_mode == "image":
        assert not any(n.startswith("transformer.") for n in grads)


def test_teacher_is_frozen_and_outside_the_module():
    torch.manual_seed(0)
    module = build_module(MODEL, "zscl", compile="off")
    teacher_before = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in module.clip.state_dict().items()}
    data = RandomBatches(module.bundle.image_size, batch=4, ref_batch=4, classes=3, ref_texts=6, seed=2)
    make_trainer(torch.device("cpu"), "32-true", max_steps=3, callbacks=[]).fit(module, datamodule=data)

    teacher_after = module.teacher.state_dict()
    assert all(torch.equal(teacher_before[k], teacher_after[k]) for k in teacher_before)
    assert not any(p.requires_grad for p in module.teacher.parameters())
    # The optimizer did move the student, so an identical teacher is a real check.
    assert any(not torch.equal(student_before[k], v) for k, v in module.clip.state_dict().items())
    assert not any(k.startswith("teacher") for k in module.state_dict())
    teacher_ids = {id(p) for p in module.teacher.parameters()}
    assert not teacher_ids & {id(p) for p in module.parameters()}
    assert all(module.teacher is not m for m in module.modules())


class CaptureWithMember(Capture):
    """Also the weights after iteration 0: the WE member that joins the task-start weights."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if trainer.global_step == 1:
            self.after_first = {n: p.detach().clone() for n, p in pl_module.clip.named_parameters()}


def test_second_task_distils_to_the_initial_model_and_anchors_to_the_previous_export(tmp_path):
    """Task 2 starts from task 1's export θ1 ≠ θ0: teacher = θ0, WC anchor = θ1, WE's first member = θ1."""
    from zscl.models import load_clip, save_state_dict

    torch.manual_seed(0)
    initial = load_clip(MODEL).model
    save_state_dict(initial.state_dict(), tmp_path / "initial.safetensors")
    exported = copy.deepcopy(initial)
    perturb_(exported)  # stands for task 1's export
    save_state_dict(exported.state_dict(), tmp_path / "task1.safetensors")
    theta0 = dict(load_clip(MODEL, str(tmp_path / "initial.safetensors")).model.named_parameters())
    theta1 = dict(load_clip(MODEL, str(tmp_path / "task1.safetensors")).model.named_parameters())

    module = build_module(MODEL, "zscl", compile="off", pretrained=str(tmp_path / "initial.safetensors"),
                          init_from=str(tmp_path / "task1.safetensors"))
    assert all(torch.equal(p, theta0[n]) for n, p in module.teacher.named_parameters())
    assert all(torch.equal(a, theta1[n]) for n, a in zip(module.trainable_names, module.anchors))
    assert not torch.equal(theta0["visual.proj"], theta1["visual.proj"])

    data = RandomBatches(module.bundle.image_size, batch=6, ref_batch=5, classes=7, ref_texts=9, seed=1)
    capture = CaptureWithMember()
    make_trainer(torch.device("cpu"), "32-true", max_steps=3, callbacks=[capture]).fit(module, datamodule=data)

    teacher = load_clip(MODEL, str(tmp_path / "initial.safetensors")).model.eval()
    anchors = {n: p.detach() for n, p in theta1.items()}
    loss, grads = plain_step(capture.student, teacher, module.bundle.tokenizer, data.spec.prompts(),
                             data.reference_tokens(module.bundle.tokenizer), capture.batch, train_mode="whole",
                             text_mode="coded", anchors=anchors)
    module_loss = capture.loss + wc_value(capture.student, load_clip(MODEL, str(tmp_path / "task1.safetensors")).model,
                                          "whole")
    torch.testing.assert_close(module_loss, loss, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        tol = 1e-5 * grad.abs().max().item()
        torch.testing.assert_close(capture.grads[name], grad, rtol=1e-5, atol=tol, msg=lambda m: f"{name}: {m}")
    # WE (every 100, 3 steps): mean(θ_start, θ after iteration 0), with θ_start the previous export.
    for name, p in module.clip.named_parameters():
        expected = (theta1[name].detach() + capture.after_first[name]) / 2
        torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-7, msg=lambda m: f"{name}: {m}")


class TextSubsets(L.Callback):
    """Which reference texts the student text tower encodes at each step, read from its token embedding.

    ``losses[k]`` is step k's returned loss. Rows of the embedding's input that are reference texts
    (not class prompts) are mapped back to their indices among all reference texts.
    """

    def __init__(self, ref_tokens: torch.Tensor):
        self.ref_rows = {tuple(row.tolist()): i for i, row in enumerate(ref_tokens)}
        self.subsets: dict[int, list[int]] = {}
        self.losses: dict[int, torch.Tensor] = {}
        self.active = False

    def on_fit_start(self, trainer, pl_module):
        def hook(module, args, output):
            rows = [self.ref_rows.get(tuple(r.tolist())) for r in args[0]]
            if self.active and rows and all(i is not None for i in rows):
                self.subsets[pl_module.global_step] = rows
        pl_module.clip.token_embedding.register_forward_hook(hook)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.active = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.active = False
        self.losses[trainer.global_step - 1] = outputs["loss"].detach().clone()


def _paper_module():
    torch.manual_seed(0)
    module = build_module(MODEL, "zscl_paper_text", compile="off", text_batch=4)
    perturb_(module.clip)
    data = RandomBatches(module.bundle.image_size, batch=6, ref_batch=5, classes=7, ref_texts=9, seed=1)
    return module, data


def _checkpointing_trainer(max_steps, callbacks, folder):
    from lightning.pytorch.callbacks import ModelCheckpoint

    every2 = ModelCheckpoint(dirpath=folder, every_n_train_steps=2, save_top_k=-1, filename="{step}")
    return L.Trainer(accelerator="cpu", max_steps=max_steps, max_epochs=-1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                     callbacks=[*callbacks, every2])


def test_paper_text_batch_samples_per_step_resumes_and_its_loss_is_the_subset_loss(tmp_path):
    """``text_mode: paper`` with ``text_batch``: text_batch of the 9 texts per step, different at different
    steps, the same after a resume, and the loss is the hand-written one on exactly those texts."""
    module, data = _paper_module()
    tokens = data.reference_tokens(module.bundle.tokenizer)
    capture, subsets = Capture(), TextSubsets(tokens)
    _checkpointing_trainer(4, [capture, subsets], tmp_path / "ckpt").fit(module, datamodule=data)
    assert sorted(subsets.subsets) == [0, 1, 2, 3]
    assert all(len(set(s)) == 4 for s in subsets.subsets.values())
    assert len({tuple(sorted(s)) for s in subsets.subsets.values()}) > 1, "the same texts at every step"

    teacher = load_teacher_like(module)
    subset = torch.tensor(subsets.subsets[0])
    loss, grads = plain_step(capture.student, teacher, module.bundle.tokenizer, data.spec.prompts(), tokens,
                             capture.batch, train_mode="whole", text_mode="paper", text_subset=subset)
    torch.testing.assert_close(capture.loss + wc_value(capture.student, teacher, "whole"), loss, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        tol = 1e-5 * grad.abs().max().item()
        torch.testing.assert_close(capture.grads[name], grad, rtol=1e-5, atol=tol, msg=lambda m: f"{name}: {m}")

    resumed, data2 = _paper_module()
    again = TextSubsets(tokens)
    _checkpointing_trainer(4, [again], tmp_path / "ckpt2").fit(resumed, datamodule=data2,
                                                              ckpt_path=str(tmp_path / "ckpt" / "step=2.ckpt"))
    assert sorted(again.subsets) == [2, 3]
    assert all(again.subsets[k] == subsets.subsets[k] for k in (2, 3))
    assert all(torch.equal(again.losses[k], subsets.losses[k]) for k in (2, 3))


def load_teacher_like(module):
    """The module's initial (teacher) weights rebuilt outside it: the same seeded random init, unperturbed."""
    from zscl.models import load_clip

    torch.manual_seed(0)
    return load_clip(MODEL).model.eval()


class LossRecorder(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].detach().clone())


@pytest.mark.slow
def test_compiled_zscl_steps_give_the_eager_losses_on_cpu():
    """``speed.compile`` on CPU (inductor's generated C++ kernels, compiled with the system's C compiler):
    three ZSCL steps give eager's losses. The image tower trains (its backward is compiled too); the text
    tower is frozen, which keeps the compile time down."""
    import torch._dynamo

    losses = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        module = build_module(MODEL, "zscl", train_mode="image", compile="on" if compiled else "off")
        perturb_(module.clip)  # distillation and WC have gradients from the first step on
        data = RandomBatches(module.bundle.image_size, batch=4, ref_batch=4, classes=3, ref_texts=6, seed=1)
        record = LossRecorder()
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        make_trainer(torch.device("cpu"), "32-true", max_steps=3, callbacks=[record]).fit(module, datamodule=data)
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        assert (graphs > 0) == compiled, f"compiled={compiled} but dynamo captured {graphs} graphs"
        losses[compiled] = torch.stack(record.losses)
    torch._dynamo.reset()
    # fp32 with fused kernels: reassociated sums differ from eager by a few ulps per op.
    torch.testing.assert_close(losses[True], losses[False], rtol=1e-4, atol=1e-5)
    assert not torch.equal(losses[False][0], losses[False][2]), "the steps trained"
