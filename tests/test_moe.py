"""MoE-Adapters: adapters hooked into open_clip blocks, top-k routing, what trains, activate-freeze,
DDAS routing on the synthetic world, and the method end to end through ``zscl sequence``."""

from __future__ import annotations

import os
import signal

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from zscl.models import load_clip
from zscl.moe.adapters import BlockExperts, MoEAdapters, MoEConfig, most_used
from zscl.moe.ddas import AutoEncoderBank, DDASConfig, clip_features, select_routes


def _inputs(bundle, n: int = 3):
    g = torch.Generator().manual_seed(1)
    images = torch.randn(n, 3, bundle.image_size, bundle.image_size, generator=g)
    return images, bundle.tokenizer(["a photo of a cat.", "two red dots"])


@pytest.mark.parametrize("arch", ["zscl-tiny-vit", "zscl-synth-tiny"])
def test_initial_adapters_leave_the_plain_clip_bit_identical(one_thread, arch):
    bundle = load_clip(arch, None)
    clip = bundle.model
    images, tokens = _inputs(bundle, 2)
    with torch.no_grad():
        plain_img, plain_txt = clip.encode_image(images), clip.encode_text(tokens)
    keys = list(clip.state_dict())
    moe = MoEAdapters(clip, MoEConfig(num_experts=3), num_tasks=2).train()  # noise and dropout on
    layers = len(clip.visual.transformer.resblocks) + len(clip.transformer.resblocks)
    assert len(moe.blocks) == layers and list(clip.state_dict()) == keys, "CLIP keys must not change"
    moe.seed_step(0, torch.device("cpu"))
    for routes in (1, torch.tensor([0, -1])):
        with torch.no_grad(), moe.routing(routes):
            assert torch.equal(clip.encode_image(images), plain_img)
            if isinstance(routes, int):
                assert torch.equal(clip.encode_text(tokens), plain_txt)
    # a non-zero up-projection changes the output (so the adapters are really in the forward)
    torch.nn.init.normal_(moe.blocks[0].up_weight)
    with torch.no_grad(), moe.routing(0):
        assert not torch.equal(clip.encode_image(images), plain_img)


@pytest.mark.parametrize("arch,blocks,widths", [("ViT-B-16", 24, {768, 512}), ("ViT-L-14", 36, {1024, 768})])
def test_every_block_of_both_towers_of_the_paper_architectures_is_adapted(arch, blocks, widths):
    import open_clip

    with torch.device("meta"):  # shapes only: no weights are allocated or initialised
        clip = open_clip.create_model(arch, device="meta")
    moe = MoEAdapters(clip, MoEConfig(), num_tasks=11)
    assert len(moe.blocks) == blocks and {int(b.routers[0].shape[0]) for b in moe.blocks} == widths
    assert all(len(b.routers) == 11 and b.routers[0].shape[1] == 22 and len(b.down_weight) == 22 for b in moe.blocks)
    assert moe.names[0] == "visual.transformer.resblocks.0" and moe.names[-1].startswith("transformer.resblocks.")


def test_top_k_gates_and_the_mixture_match_a_hand_computation():
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=5, top_k=2, bottleneck=3, dropout=0.0)
    block = BlockExperts(8, cfg, num_tasks=2).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_()
    x = torch.randn(4, 6, 8)
    idx, gates = block.gates(x[:, 0], 1, noisy=False, generator=None)
    logits = x[:, 0] @ block.routers[1]
    for b in range(4):
        want = torch.argsort(logits[b], descending=True)[:2]
        assert idx[b].tolist() == want.tolist() and len(set(idx[b].tolist())) == 2
        assert torch.allclose(gates[b], torch.softmax(logits[b, want], dim=0))
    assert torch.allclose(gates.sum(dim=1), torch.ones(4))
    noisy_idx, noisy_gates = block.gates(x[:, 0], 0, noisy=True, generator=torch.Generator().manual_seed(3))
    assert all(len(set(row.tolist())) == 2 for row in noisy_idx) and torch.allclose(noisy_gates.sum(1), torch.ones(4))
    y = block(x, idx, gates, None)
    for b in range(4):
        expect = torch.zeros(6, 8)
        for j in range(2):
            e = int(idx[b, j])
            hidden = F.relu(x[b] @ block.down_weight[e].t() + block.down_bias[e])
            expect += gates[b, j] * 0.1 * (hidden @ block.up_weight[e].t() + block.up_bias[e])
        assert torch.allclose(y[b], expect, atol=1e-5)


def test_activate_freeze_picks_the_most_used_experts_per_block():
    moe = MoEAdapters(load_clip("zscl-tiny-vit", None).model, MoEConfig(num_experts=4, freeze_top=2), num_tasks=1)
    moe.blocks[0].usage.copy_(torch.tensor([5, 9, 1, 7]))
    moe.blocks[1].usage.copy_(torch.tensor([0, 0, 3, 8]))
    moe.freeze_most_used()
    assert moe.blocks[0].frozen.nonzero().flatten().tolist() == [1, 3]
    assert moe.blocks[1].frozen.nonzero().flatten().tolist() == [2, 3]
    assert not moe.blocks[2].frozen.any(), "a block that routed nothing freezes nothing"
    assert int(moe.blocks[0].usage.sum()) == 0, "usage restarts for the next task"



def test_activate_freeze_breaks_ties_toward_the_lower_expert_index():
    """Tied counts: the lower index wins (torch.topk picks experts 3 and 5 of these four 12s on CPU)."""
    counts = [3, 7, 12, 12, 0, 12, 12, 5]
    assert most_used(torch.tensor(counts), 2).tolist() == [2, 3]
    assert most_used(torch.tensor([12] * 22), 3).tolist() == [0, 1, 2]
    moe = MoEAdapters(load_clip("zscl-tiny-vit", None).model, MoEConfig(num_experts=8, freeze_top=3), num_tasks=1)
    moe.blocks[0].usage.copy_(torch.tensor(counts))
    moe.freeze_most_used()
    assert moe.blocks[0].frozen.nonzero().flatten().tolist() == [2, 3, 5]

# ---------------------------------------------------------------------------- the module, trained in-process
def _module(**kw):
    from zscl.moe.module import MoEAdapterCLIP

    torch.manual_seed(0)
    return MoEAdapterCLIP(clip="zscl-tiny-vit", pretrained=None, lr=1e-2, warmup_steps=1, moe={"num_experts": 4}, **kw)


def _fit(module, steps: int = 3):
    from zscl.bench.step import RandomBatches

    data = RandomBatches(module.bundle.image_size, 4, 1, classes=3, ref_texts=1, with_ref=False)
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, max_epochs=-1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    return trainer


@pytest.fixture(scope="module")
def first_task(tmp_path_factory):
    """Task 0 trained for 3 steps and exported; (module, CLIP state before training, export path)."""
    torch.set_num_threads(1)
    module = _module()
    before = {k: v.clone() for k, v in module.clip.state_dict().items()}
    _fit(module)
    path = tmp_path_factory.mktemp("moe") / "00-Task.safetensors"
    module.export_weights(str(path))
    return module, before, path


def test_only_adapters_routers_noise_and_the_autoencoder_train(first_task):
    module, before, _ = first_task
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    for name in trainable:
        assert name.startswith(("moe.blocks.", "ddas.autoencoders.0.")), name
        if name.startswith("moe."):
            assert name.endswith((".routers.0", ".noise.0", "down_weight", "down_bias", "up_weight", "up_bias")), name
    n_blocks, experts = len(module.moe.blocks), 4
    assert len(trainable) == n_blocks * (2 + 4) + 4, "router + noise + 4 stacked expert tensors per block + the AE"
    optimised = {id(p) for group in module.trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimised == {id(p) for n, p in module.named_parameters() if n in trainable}
    after = module.clip.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the CLIP weights must stay bit-identical"
    assert any(bool(b.up_weight.abs().sum() > 0) for b in module.moe.blocks)
    assert float(module.ddas.thresholds[0]) > 0 and int(module.tasks_done) == 1


def test_next_task_loads_the_adapters_and_frozen_experts_get_no_gradient(first_task):
    from safetensors.torch import load_file

    module, _, path = first_task
    saved = load_file(str(path.with_name("00-Task.moe.safetensors")))
    frozen = {i: b.frozen.nonzero().flatten().tolist() for i, b in enumerate(module.moe.blocks)}
    assert all(len(v) == 2 for v in frozen.values()), "top-2 most-used experts frozen in every block"
    nxt = _module(init_from=str(path))
    assert nxt.task == 1 and len(nxt.moe.blocks[0].routers) == 2
    trainable = {n for n, p in nxt.named_parameters() if p.requires_grad}
    assert {n for n in trainable if n.startswith("ddas.")} == {f"ddas.autoencoders.1.{n}" for n, _ in
                                                                nxt.ddas.autoencoders[1].named_parameters()}
    assert not any(".routers.0" in n or ".noise.0" in n for n in trainable), "task 0's router is final"
    assert torch.equal(nxt.moe.blocks[0].routers[0], module.moe.blocks[0].routers[0])
    grads, unused = {}, set()

    def record():
        grads.update({n: p.grad for n, p in nxt.moe.named_parameters()})
        # DDP (without find_unused_parameters) needs a gradient for every parameter that requires one
        unused.update(n for n, p in nxt.named_parameters() if p.requires_grad and p.grad is None)

    nxt.on_after_backward = record
    _fit(nxt, steps=2)
    assert not unused, f"trainable but unused (DDP would fail): {sorted(unused)}"
    params = dict(nxt.moe.named_parameters())
    for i, experts in frozen.items():
        for e in range(4):
            for part in ("down_weight", "up_weight"):
                key = f"blocks.{i}.{part}"
                if e in experts:
                    assert torch.count_nonzero(grads[key][e]) == 0, f"frozen expert {e} of {key} got a gradient"
                    assert torch.equal(params[key][e], saved[f"moe.{key}"][e]), f"frozen expert {e} of {key} moved"
    assert any(torch.count_nonzero(grads[f"blocks.{i}.up_weight"]) > 0 for i in frozen), "unfrozen experts learn"
    assert grads["blocks.0.routers.0"] is None and grads["blocks.0.routers.1"] is not None


def test_routes_follow_the_autoencoders_and_untrained_tasks_never_take_part(first_task):
    _, _, path = first_task
    module = _module(init_from=str(path)).eval()  # task 1's module: AE 0 trained, AE 1 not yet
    assert int(module.tasks_done) == 1 and len(module.ddas.autoencoders) == 2
    images = torch.randn(5, 3, 32, 32)
    with torch.no_grad():  # make the untrained AE 1 the better reconstructor: it must still not take part
        module.ddas.autoencoders[0].decoder.bias.fill_(-30.0)
    module.ddas.thresholds[0] = torch.finfo(torch.float32).max
    assert module.routes_for(images).tolist() == [0] * 5
    module.ddas.thresholds[0] = 0.0
    assert module.routes_for(images).tolist() == [-1] * 5
    module.tasks_done.fill_(0)
    assert module.routes_for(images).tolist() == [-1] * 5, "no trained task: zero-shot CLIP"
    errors = torch.tensor([[0.1, 0.3], [0.5, 0.2], [0.9, 0.8]])
    assert select_routes(errors, torch.tensor([0.4, 0.4])).tolist() == [0, 1, -1]
    assert select_routes(errors, torch.tensor([0.6, 0.6]), "batch").tolist() == [1, 1, 1]  # means 0.5, 0.43



def test_cil_recipe_one_shared_router_no_ddas_no_freeze(tmp_path):
    """The reference's cil/ set-up: router 0 trains and routes every image at every step, no autoencoder
    trains, no expert is frozen, and the next step continues router 0 from the export."""
    cil = {"moe": {"num_experts": 2, "top_k": 2, "freeze_top": 0, "shared_router": True}, "ddas": {"enabled": False}}
    torch.manual_seed(0)
    from zscl.moe.module import MoEAdapterCLIP

    first = MoEAdapterCLIP(clip="zscl-tiny-vit", pretrained=None, lr=1e-2, warmup_steps=1, **cil)
    trainable = {n for n, p in first.named_parameters() if p.requires_grad}
    assert not any(n.startswith("ddas.") for n in trainable), "no DDAS: no autoencoder trains"
    assert all(n.endswith(".routers.0") for n in trainable if ".routers." in n)
    _fit(first, steps=2)
    assert len(first.trainer.optimizers[0].param_groups) == 1
    assert not any(b.frozen.any() for b in first.moe.blocks), "no activate-freeze"
    path = tmp_path / "00-Step.safetensors"
    first.export_weights(str(path))
    nxt = MoEAdapterCLIP(clip="zscl-tiny-vit", pretrained=None, init_from=str(path), lr=1e-2, warmup_steps=1, **cil)
    assert nxt.task == 1 and nxt.route == 0 and len(nxt.moe.blocks[0].routers) == 1
    assert nxt.moe.blocks[0].routers[0].requires_grad, "the shared router keeps training"
    assert torch.equal(nxt.moe.blocks[0].routers[0], first.moe.blocks[0].routers[0])
    assert nxt.routes_for(torch.randn(3, 3, 32, 32)).tolist() == [0, 0, 0], "every image: the shared router"


def test_eval_gate_noise_is_off_by_default_and_seeded_when_on():
    """Off: evaluation gates are softmax(top-k(x0 W)). On (the reference's cil/ quirk): noisy, and equal for
    equal seeds, so an evaluation is reproducible."""
    clip = load_clip("zscl-tiny-vit", None).model
    moe = MoEAdapters(clip, MoEConfig(num_experts=4), num_tasks=1)
    block = moe.blocks[0]
    torch.manual_seed(0)
    with torch.no_grad():
        block.routers[0].normal_()
        block.noise[0].normal_()
        block.up_weight.normal_()
    moe.eval()
    x0 = torch.randn(3, block.routers[0].shape[0])
    expect = torch.softmax((x0 @ block.routers[0]).topk(2, dim=1).values, dim=1)
    image = torch.randn(3, 3, 32, 32)
    with moe.routing(0), torch.no_grad():
        clean = clip.encode_image(image)
        assert torch.allclose(block.gates(x0, 0, False, None)[1], expect)
        moe.cfg.eval_gate_noise = True
        runs = []
        for seed in (5, 5, 6):
            moe.seed_step(seed, torch.device("cpu"))
            runs.append(clip.encode_image(image))
        moe.cfg.eval_gate_noise = False
        assert torch.equal(clip.encode_image(image), clean)
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2]) and not torch.equal(runs[0], clean)

# ---------------------------------------------------------------------------- DDAS on the synthetic world
def test_ddas_routes_trained_tasks_to_their_router_and_new_tasks_to_zero_shot(one_thread):
    from zscl.synthetic import world as W

    torch.manual_seed(0)
    bundle = load_clip("zscl-synth-tiny", "synthetic")
    mean, std = torch.tensor(bundle.mean).view(1, 3, 1, 1), torch.tensor(bundle.std).view(1, 3, 1, 1)

    def features(task, split: str, per_class: int) -> torch.Tensor:
        rng = W.stream_rng(0, f"{task.name}/{split}")
        arrays = [W.render_array(W.make_scene(task.sample(rng, label), rng), W.IMAGE_SIZE)
                  for label in range(len(task.classes)) for _ in range(per_class)]
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255
        with torch.no_grad():
            return clip_features(bundle.model.encode_image((x - mean) / std))

    names = ["SynthShape", "SynthColor", "SynthCount", "SynthDigit", "SynthPosition"]  # 3 trained, 2 never trained
    trained, unseen = names[:3], names[3:]
    bank = AutoEncoderBank(bundle.model.visual.output_dim, DDASConfig(), num_tasks=3)
    g = torch.Generator().manual_seed(0)
    for t, name in enumerate(trained):
        train = features(W.TASKS[name], "train", 16)  # thresholds come from these training images only
        opt = torch.optim.Adam(bank.autoencoders[t].parameters(), lr=0.01)
        for step in range(300):
            loss = bank.training_loss(train[torch.randint(0, len(train), (32,), generator=g)], t, step >= 225)
            opt.zero_grad()
            loss.backward()
            opt.step()
        bank.set_threshold(t, bank.calibrated_values())
    with torch.no_grad():
        for t, name in enumerate(trained):
            routes = select_routes(bank.errors(features(W.TASKS[name], "test", 8), 3), bank.thresholds)
            assert (routes == t).float().mean() >= 0.9, (name, routes.tolist())
        for name in unseen:
            routes = select_routes(bank.errors(features(W.TASKS[name], "test", 8), 3), bank.thresholds)
            assert (routes == -1).float().mean() >= 0.8, (name, routes.tolist())


# ---------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_sequence_end_to_end_and_sigkill_resume_is_bit_identical(tmp_path):
    import json

    from safetensors.torch import load_file

    from tests.test_sequence import run_zscl, zscl_cmd
    from tests.tiny_world import benchmark_yaml, make_tiny_world

    make_tiny_world(tmp_path, per_class=4)
    benchmark_yaml(tmp_path, steps=4)

    def args(out):
        return ["sequence", "--config", str(tmp_path / "tiny" / "benchmark.yaml"), "--config", "method/moe_adapters",
                "--out", str(out), "--checkpoint_every", "2", "--progress", "none", "--model.moe.num_experts", "4"]

    run_zscl(*args(tmp_path / "ref"))
    import subprocess

    env = {**os.environ, "ZSCL_KILL_AT": "1:3"}  # SIGKILL after step 3 of task 1 (checkpoints every 2)
    killed = subprocess.run(zscl_cmd(*args(tmp_path / "killed")), capture_output=True, text=True, env=env)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert (tmp_path / "killed" / "tasks" / "01-TinyStripes" / "last.ckpt").exists()
    rerun = run_zscl(*args(tmp_path / "killed"))
    assert "resuming from" in rerun.stdout
    ref, res = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("ref", "killed"))
    assert res["accuracy"] == ref["accuracy"] and ref["config"]["model_class"] == "moe_adapters"
    for name in ("01-TinyStripes.safetensors", "01-TinyStripes.moe.safetensors"):
        a, b = (load_file(str(tmp_path / d / "checkpoints" / name)) for d in ("ref", "killed"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{name} differs after resume"
    # `zscl eval` rebuilds the routed model from the export and reproduces the runner's last row
    from zscl.cli.eval import main as eval_main

    report = tmp_path / "eval.json"
    assert eval_main(["--model", "zscl-tiny-vit", "--pretrained", str(tmp_path / "ref" / "checkpoints" / "01-TinyStripes.safetensors"),
                      "--datasets", "TinyColors,TinyStripes", "--custom-datasets", str(tmp_path / "tiny" / "datasets.yaml"),
                      "--data-root", str(tmp_path), "--cache-dir", str(tmp_path / "cache"), "--num-workers", "0",
                      "--progress", "false", "--json", str(report)]) == 0
    evaluated = json.loads(report.read_text())["results"]
    assert [evaluated[n]["top1"] for n in ("TinyColors", "TinyStripes")] == ref["accuracy"][-1]
    assert evaluated["TinyColors"]["routed"][1] >= 0.9 and evaluated["TinyStripes"]["routed"][2] >= 0.9, evaluated
    first = load_file(str(tmp_path / "ref" / "checkpoints" / "00-TinyColors.moe.safetensors"))
    second = load_file(str(tmp_path / "ref" / "checkpoints" / "01-TinyStripes.moe.safetensors"))
    assert "moe.blocks.0.routers.1" in second and "moe.blocks.0.routers.1" not in first
    frozen = first["moe.blocks.0.frozen"].nonzero().flatten().tolist()
    for e in frozen:  # activate-freeze end to end: task 0's chosen experts are untouched by task 1
        assert torch.equal(first["moe.blocks.0.up_weight"][e], second["moe.blocks.0.up_weight"][e])


def test_bench_step_times_moe_adapters_beside_a_baseline(one_thread):
    from zscl.bench.step import StepBench, run_step

    r = run_step(StepBench(method="moe_adapters", baseline="finetune", rounds=2, batch=4, classes=3, steps=2, warmup=0))
    assert r["settings"]["method"] == "moe_adapters" and r["baseline"]["settings"]["method"] == "finetune"
    assert r["tflops_per_step"] is None, "the analytic count is for full fine-tuning only"
    rounds = r["rounds_ms_per_step_median"]
    assert len(rounds["method"]) == len(rounds["baseline"]) == 2
    # the median of two rounds is their mean, so the ratio of medians is the ratio of sums
    assert r["step_time_ratio"] == pytest.approx(sum(rounds["method"]) / sum(rounds["baseline"]))


@pytest.mark.parametrize("extractor", ["torchvision:squeezenet1_0", "timm:test_resnet"])
def test_ddas_extractor_from_a_local_weights_file(tmp_path, one_thread, extractor):
    """A torchvision / timm extractor is built without downloads and loads the given file exactly."""
    from zscl.moe.ddas import build_extractor

    kind, _, name = extractor.partition(":")
    torch.manual_seed(0)
    if kind == "torchvision":
        import torchvision

        source = torchvision.models.get_model(name, weights=None)
    else:
        import timm

        source = timm.create_model(name, pretrained=False, num_classes=0)
    weights = tmp_path / "w.pt"
    torch.save(source.state_dict(), weights)
    cfg = DDASConfig(extractor=extractor, extractor_weights=str(weights))
    features = build_extractor(cfg)
    trunk = dict(features.model.state_dict())
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in trunk.items() if k in source.state_dict())
    assert any(k in source.state_dict() for k in trunk)
    out = features(torch.randn(2, 3, 64, 64))
    assert out.dim() == 2 and out.shape[0] == 2 and bool(((out > 0) & (out < 1)).all())
    with pytest.raises(ValueError, match="extractor_weights"):
        build_extractor(DDASConfig(extractor=extractor))
    torch.save({"other.weight": torch.zeros(1)}, tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match="missing tensors"):
        build_extractor(DDASConfig(extractor=extractor, extractor_weights=str(tmp_path / "wrong.pt")))
