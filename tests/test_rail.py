"""RAIL's core (zscl/rail) against independent oracles.

* primal head: a direct numpy float64 solve of (ΦᵀΦ + λI)W = ΦᵀY on all data seen so far, with Φ
  recomputed in numpy, whatever the chunking (1 sample, 128, whole tasks);
* dual head: a kernel ridge solve written here from pairwise differences;
* fusion: β = 0 gives zero-shot exactly; an image whose CLIP top class is unseen keeps CLIP's answer;
* union label space: a hand-built case where within-domain evaluation is right and the union is wrong;
* exports: state_dict round trips (safetensors) are bit-identical and a resumed head matches;
* the dual form's memory refusal: one line with the size needed.
Widths are tiny so the file runs in seconds.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from zscl.rail import (DualRidge, KernelMemoryError, PrimalRidge, build_union_classifier, check_kernel_memory, fuse,
                       fuse_known_domain, union_label_space)

D, WIDTH, LAM = 8, 48, 0.1
TASK_CLASSES = (4, 3, 5)  # classes per domain; the label space grows 4 -> 7 -> 12
TASK_SIZES = (150, 70, 200)  # not multiples of 128, so the batched chunking has ragged ends


def _tasks(seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Features and *union* labels per task (domain k owns the next TASK_CLASSES[k] indices)."""
    gen = torch.Generator().manual_seed(seed)
    out, offset = [], 0
    for n, c in zip(TASK_SIZES, TASK_CLASSES):
        out.append((torch.randn(n, D, generator=gen), torch.randint(offset, offset + c, (n,), generator=gen)))
        offset += c
    return out


def _numpy_primal(hidden: np.ndarray, x: np.ndarray, y: np.ndarray, classes: int, lam: float) -> np.ndarray:
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    phi = np.maximum(xn @ hidden.T, 0.0)
    onehot = np.eye(classes)[y]
    return np.linalg.solve(phi.T @ phi + lam * np.eye(phi.shape[1]), phi.T @ onehot)


def _fit_primal(chunk: int | None, tasks, width: int = WIDTH, stop_after: int | None = None) -> PrimalRidge:
    head = PrimalRidge(D, width=width, lam=LAM, seed=7)
    classes = 0
    for k, (x, y) in enumerate(tasks[:stop_after]):
        classes += TASK_CLASSES[k]
        _learn_task(head, classes, x, y, chunk)
    return head


def _learn_task(head: PrimalRidge, classes: int, x, y, chunk: int | None) -> None:
    """Grow to ``classes``, accumulate the task in chunks of ``chunk`` (None: whole), solve."""
    head.grow(classes)
    step = chunk or len(x)
    for i in range(0, len(x), step):
        head.accumulate(x[i:i + step], y[i:i + step])
    head.solve()


@pytest.mark.parametrize("chunk", [1, 128, None], ids=["one-sample", "batch-128", "whole-task"])
def test_primal_head_is_the_direct_joint_solve_after_every_task(chunk, one_thread):
    tasks = _tasks()
    head = PrimalRidge(D, width=WIDTH, lam=LAM, seed=7)
    hidden = head.hidden.double().numpy()
    classes, xs, ys = 0, [], []
    for k, (x, y) in enumerate(tasks):
        classes += TASK_CLASSES[k]
        _learn_task(head, classes, x, y, chunk)
        xs.append(x.double().numpy())
        ys.append(y.numpy())
        oracle = _numpy_primal(hidden, np.concatenate(xs), np.concatenate(ys), classes, LAM)
        assert head.head.shape == (WIDTH, classes)
        np.testing.assert_allclose(head.head.numpy(), oracle, rtol=1e-9, atol=1e-11)
    assert int(head.seen) == sum(TASK_SIZES)


def test_primal_chunkings_agree_with_each_other(one_thread):
    tasks = _tasks(1)
    heads = [_fit_primal(c, tasks).head for c in (1, 128, None)]
    for h in heads[1:]:
        torch.testing.assert_close(h, heads[0], rtol=1e-10, atol=1e-12)


def test_primal_hidden_layer_is_seeded_and_refuses_labels_outside_the_label_space():
    assert torch.equal(PrimalRidge(D, width=WIDTH, seed=3).hidden, PrimalRidge(D, width=WIDTH, seed=3).hidden)
    assert not torch.equal(PrimalRidge(D, width=WIDTH, seed=3).hidden, PrimalRidge(D, width=WIDTH, seed=4).hidden)
    head = PrimalRidge(D, width=WIDTH, num_classes=4)
    with pytest.raises(ValueError, match="grow"):
        head.accumulate(torch.randn(2, D), torch.tensor([1, 4]))


def _numpy_rbf(a: np.ndarray, b: np.ndarray, gamma: float) -> np.ndarray:
    diff = a[:, None, :] - b[None, :, :]
    return np.exp(-gamma * (diff ** 2).sum(-1))


def test_dual_prediction_is_the_direct_kernel_ridge_solve(one_thread):
    gamma, lam = 0.1, 1e-3
    tasks = _tasks(2)[:2]
    test_x = torch.randn(9, D, generator=torch.Generator().manual_seed(5))
    head = DualRidge(D, gamma=gamma, lam=lam)
    classes, xs, ys = 0, [], []
    for k, (x, y) in enumerate(tasks):
        classes += TASK_CLASSES[k]
        head.grow(classes)
        for i in range(0, len(x), 64):
            head.add(x[i:i + 64], y[i:i + 64])
        head.solve()
        xs.append(x.numpy())
        ys.append(y.numpy())
        mem = np.concatenate(xs).astype(np.float64)
        mem /= np.linalg.norm(mem, axis=1, keepdims=True)
        tx = test_x.double().numpy() / np.linalg.norm(test_x.double().numpy(), axis=1, keepdims=True)
        targets = np.eye(classes)[np.concatenate(ys)]
        alpha = np.linalg.solve(_numpy_rbf(mem, mem, gamma) + lam * np.eye(len(mem)), targets)
        oracle = _numpy_rbf(tx, mem, gamma) @ alpha
        np.testing.assert_allclose(head.alpha.numpy(), alpha, rtol=1e-7, atol=1e-7)
        np.testing.assert_allclose(head(test_x).numpy(), oracle, rtol=1e-5, atol=1e-5)  # the output is float32


def test_dual_refuses_a_kernel_over_the_memory_budget_up_front_in_one_line():
    with pytest.raises(KernelMemoryError) as err:
        check_kernel_memory(100_000, budget_bytes=8 * 1024**3)
    message = str(err.value)
    assert "\n" not in message
    assert "100,000" in message and "74.5 GiB" in message and "8.0 GiB" in message
    check_kernel_memory(1000, budget_bytes=8 * 1000**2)  # exactly at the budget: allowed
    head = DualRidge(D, num_classes=2, budget_bytes=8 * 50**2)
    head.add(torch.randn(40, D), torch.zeros(40, dtype=torch.long))
    with pytest.raises(KernelMemoryError, match="needs"):
        head.add(torch.randn(20, D), torch.zeros(20, dtype=torch.long))  # 60² would not fit
    assert head.memory.shape[0] == 40, "the refused chunk was not stored"
    with pytest.raises(RuntimeError, match="solve"):
        head(torch.randn(1, D))  # stored but not solved: refused rather than answered with a stale α


def _random_fusion_case(seed: int = 0, n: int = 400, classes: int = 12, learned: int = 7):
    gen = torch.Generator().manual_seed(seed)
    logits = 100 * torch.nn.functional.normalize(torch.randn(n, classes, generator=gen), dim=1)
    ridge = 3 * torch.randn(n, learned, generator=gen)  # raw scores, large enough to flip answers
    return logits, ridge, learned


def test_fusion_with_beta_zero_is_zero_shot_exactly():
    logits, ridge, learned = _random_fusion_case()
    out = fuse(logits, ridge, learned, beta=0.0)
    assert torch.equal(out, logits.softmax(dim=1))
    assert torch.equal(out.argmax(1), logits.argmax(1))


def test_fusion_keeps_clip_where_its_top_class_is_unseen_and_mixes_elsewhere():
    logits, ridge, learned = _random_fusion_case(1)
    out = fuse(logits, ridge, learned, beta=0.8)
    probs = logits.softmax(dim=1)
    unseen = logits.argmax(1) >= learned
    assert 0 < int(unseen.sum()) < len(logits)
    assert torch.equal(out[unseen], probs[unseen])  # CLIP alone, bit for bit: its answer is kept
    seen = ~unseen
    expected = 0.2 * probs[seen] + 0.8 * torch.cat([ridge[seen], torch.zeros(int(seen.sum()), 12 - learned)], 1)
    torch.testing.assert_close(out[seen], expected)
    assert (out[seen].argmax(1) != logits[seen].argmax(1)).any(), "the ridge head does change some answers"


def test_mtil_fusion_reads_the_evaluated_domains_columns_only():
    gen = torch.Generator().manual_seed(3)
    clip = 100 * torch.nn.functional.normalize(torch.randn(5, 3, generator=gen), dim=1)  # a 3-class domain
    union_ridge = torch.randn(5, 7, generator=gen)  # learned union: 4 + 3 classes; the domain is at offset 4
    out = fuse_known_domain(clip, union_ridge, offset=4, learned=True, beta=0.8)
    torch.testing.assert_close(out, 0.2 * clip.softmax(1) + 0.8 * union_ridge[:, 4:7])
    assert torch.equal(fuse_known_domain(clip, union_ridge, offset=7, learned=False), clip.softmax(1))
    assert torch.equal(fuse_known_domain(clip, None, offset=0, learned=False), clip.softmax(1))


class _TableText(torch.nn.Module):
    """A text tower that returns a fixed vector per prompt (the tokenizer maps prompt -> row)."""

    def __init__(self, prompts: dict[str, list[float]]) -> None:
        super().__init__()
        self.rows = {p: i for i, p in enumerate(prompts)}
        self.table = torch.nn.Parameter(torch.tensor(list(prompts.values())), requires_grad=False)

    def tokenize(self, texts):
        return torch.tensor([self.rows[t] for t in texts])

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.table[tokens]


def test_union_label_space_can_be_wrong_where_within_domain_evaluation_is_right():
    pets = SimpleNamespace(name="Pets", classnames=("cat", "dog", "lotus"), templates=("a photo of a {c}.",))
    wild = SimpleNamespace(name="Wild", classnames=("tiger", "lotus"), templates=("a {c} in the wild.",))
    text = _TableText({
        "a photo of a cat.": [1.0, 0.0, 0.0], "a photo of a dog.": [0.0, 1.0, 0.0],
        "a photo of a lotus.": [0.0, 0.0, 1.0], "a tiger in the wild.": [0.9, 0.0, 0.436],
        "a lotus in the wild.": [0.0, 0.6, 0.8],
    })
    space = union_label_space([pets, wild])
    assert space.classnames == ("cat", "dog", "lotus", "tiger", "lotus")  # a repeated name keeps two indices
    assert space.offsets == (0, 3) and space.domain_slice("wild") == slice(3, 5)
    assert space.class_templates[4] == ("a {c} in the wild.",) and space.class_domain == (0, 0, 0, 1, 1)
    union = build_union_classifier(text, text.tokenize, [pets, wild], device="cpu")
    assert union.shape == (3, 5) and not torch.equal(union[:, 2], union[:, 4])  # each lotus with its own template

    image = torch.nn.functional.normalize(torch.tensor([[0.8, 0.0, 0.6]]), dim=1)  # a cat, in the Pets test set
    label = torch.tensor([0])
    within = image @ union[:, space.domain_slice("Pets")]
    assert torch.equal(within.argmax(1), label)  # MTIL-style (domain known): right
    assert int((image @ union).argmax(1)) == 3  # X-TAIL (union): the Wild domain's tiger, wrong
    assert not torch.equal((image @ union).argmax(1), space.to_union("Pets", label))


def test_union_of_the_xtail_domains_keeps_repeated_names_apart():
    order1 = ["Aircraft", "Caltech101", "DTD", "EuroSAT", "Flowers", "Food", "MNIST", "OxfordPet", "StanfordCars",
              "SUN397"]
    space = union_label_space(order1)
    # zscl's Caltech101 has 101 classes (ZSCL's split); RAIL's CoOp split has 100, hence 1,101 not 1,100
    assert space.num_classes == 1101 and space.sizes[1] == 101
    assert space.classnames.count("lotus") == 2 and space.learned_classes(2) == 201
    assert space.domain_slice("SUN397") == slice(704, 1101)


def _round_trip(module: torch.nn.Module, fresh: torch.nn.Module, tmp_path) -> torch.nn.Module:
    from safetensors.torch import load_file, save_file

    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(tmp_path / "head.safetensors"))
    fresh.load_state_dict(load_file(str(tmp_path / "head.safetensors")))
    return fresh


def test_state_dict_round_trip_is_bit_identical_and_resumes_exactly(tmp_path, one_thread):
    tasks = _tasks(4)
    probe = torch.randn(6, D)
    primal = _fit_primal(128, tasks, stop_after=2)
    restored = _round_trip(primal, PrimalRidge(D, width=WIDTH, lam=LAM, seed=999), tmp_path)
    for key, value in primal.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value) and restored.state_dict()[key].dtype == value.dtype, key
    assert torch.equal(restored(probe), primal(probe))
    for head in (primal, restored):  # resume: the third task on both gives the same bits
        head.grow(sum(TASK_CLASSES))
        head.accumulate(*tasks[2])
        head.solve()
    assert torch.equal(restored.head, primal.head)

    dual = DualRidge(D, num_classes=4)
    dual.add(*tasks[0])
    dual.solve()
    back = _round_trip(dual, DualRidge(D), tmp_path)
    assert back.num_classes == 4 and torch.equal(back.memory, dual.memory) and torch.equal(back.alpha, dual.alpha)
    assert torch.equal(back(probe), dual(probe))


def test_the_zero_shot_head_cache_keys_on_the_prompts_not_the_name():
    """RAIL keeps CLIP's zero-shot heads across tasks (the CLIP is frozen): a cached head is exactly what the CLIP
    computes, and a spec with the same name but other prompts is never served another spec's head."""
    from dataclasses import replace

    from zscl.datasets import DatasetSpec
    from zscl.evaluation.zeroshot import spec_classifier
    from zscl.rail.module import RAILCLIP, fingerprint

    torch.set_num_threads(1)
    model = RAILCLIP(clip="zscl-synth-tiny", pretrained="synthetic", width=16)
    model._clip_print = fingerprint(list(model.clip.state_dict().values()))
    a = DatasetSpec(name="SameName", classnames=("red", "blue"), templates=("a {c} thing.",),
                    builder=lambda *args: None, layout="-")
    b = replace(a, templates=("a photo of a {c} circle.",))
    first_a, first_b, again_a = model._classifier(a), model._classifier(b), model._classifier(a)
    assert torch.equal(first_a, spec_classifier(model.clip, model.bundle.tokenizer, a))
    assert torch.equal(first_b, spec_classifier(model.clip, model.bundle.tokenizer, b))
    assert torch.equal(again_a, first_a) and not torch.equal(first_a, first_b)
