"""``zscl merge`` on tiny open_clip checkpoints (safetensors and .pt) for every registered rule,
its flag errors, and ``zscl fisher`` on a tiny image-folder dataset."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from zscl.cli.main import main as zscl
from zscl.merging import MERGE_RULES
from zscl.models import load_clip, save_state_dict

ARCH = "zscl-tiny-vit"


def _perturbed(state: dict, seed: int, masks: dict) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in state.items():
        v = v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
        out[k] = v * masks[k] if k in masks else v  # one pruning mask shared by both models
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """base.safetensors, a.safetensors, b.pt (one shared sparsity mask), and a Fisher per model."""
    root = tmp_path_factory.mktemp("ckpts")
    torch.manual_seed(0)
    base = load_clip(ARCH).model.state_dict()
    g = torch.Generator().manual_seed(1)
    masks = {k: torch.rand(v.shape, generator=g) > 0.3 for k, v in base.items() if v.ndim == 2 and "embedding" not in k}
    paths = {"base": root / "base.safetensors", "a": root / "a.safetensors", "b": root / "b.pt"}
    save_state_dict(base, paths["base"])
    save_state_dict(_perturbed(base, 2, masks), paths["a"])
    torch.save(_perturbed(base, 3, masks), paths["b"])
    for i, name in enumerate(("fa", "fb")):
        paths[name] = root / f"{name}.safetensors"
        save_state_dict({k: torch.full(v.shape, float(i + 1)) for k, v in base.items() if v.is_floating_point()},
                        paths[name])
    return paths


def run(*argv: str) -> int:
    with pytest.raises(SystemExit) as exit_info:
        zscl(list(argv))
    return exit_info.value.code


def merge_argv(name: str, files: dict, out: Path) -> list[str]:
    """A command line for rule ``name``: its base, model count and required options."""
    rule = MERGE_RULES.get(name)
    models = [str(files["a"]), str(files["b"])][: rule.exact_models]
    argv = ["merge", "--method", name, "--models", *models, "--out", str(out)]
    if rule.needs_base:
        argv += ["--base", str(files["base"])]
    if "fishers" in rule.required:
        argv += ["--fisher", str(files["fa"]), str(files["fb"])][: 1 + len(models)]
    if "metrics" in rule.required:
        argv += ["--metrics", *["1.5", "0.5"][: len(models)]]
    return argv


CLI_RULES = [n for n, r in MERGE_RULES.items() if set(r.required) <= {"fishers", "metrics"}]


def test_rules_outside_the_cli_are_known():
    assert set(MERGE_RULES.names()) - set(CLI_RULES) == {"greedy_soup"}  # needs a Python score function


@pytest.mark.parametrize("name", CLI_RULES)
def test_every_rule_merges_tiny_checkpoints(name, files, tmp_path, capsys):
    out = tmp_path / "merged.safetensors"
    assert run(*merge_argv(name, files, out)) == 0
    printed = capsys.readouterr().out
    assert f"with {name}" in printed and "peak RSS" in printed
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["zscl.merge.method"] == name
        assert all(torch.isfinite(f.get_tensor(k)).all() for k in f.keys())
    model = open_clip.create_model(ARCH, pretrained=str(out))
    a = load_clip(ARCH, str(files["a"])).model
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, a.get_parameter(n))]
    assert changed  # the merge did something (model a alone was not copied through)
    with torch.no_grad():
        assert torch.isfinite(model.encode_text(open_clip.get_tokenizer(ARCH)(["a photo of a cat"]))).all()


def test_metadata_and_hparams_are_recorded(files, tmp_path):
    out = tmp_path / "ties.safetensors"
    argv = merge_argv("ties", files, out) + ["--density", "0.5", "--scale", "0.8", "--weights", "1", "2"]
    assert run(*argv) == 0
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["zscl.merge.hparams"]) == {"density": 0.5, "scale": 0.8}
    assert json.loads(meta["zscl.merge.weights"]) == [1.0, 2.0]
    assert meta["zscl.merge.base"] == str(files["base"])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--method", "ties"], "needs --base"),
        (["--method", "average", "--density", "0.3"], "--density not used by method 'average'"),
        (["--method", "average", "--base", "B"], "does not use --base"),
        (["--method", "average", "--weights", "1"], "got 1 weights for 2 models"),
        (["--method", "fisher", "--fisher", "F"], "got 1 entries in 'fishers' for 2 models"),
        (["--method", "mwa", "--metrics", "1", "2", "3"], "got 3 entries in 'metrics' for 2 models"),
        (["--method", "mwa"], "needs the hyper-parameter(s) metrics"),
        (["--method", "wise", "--base", "B"], "takes exactly 1 model(s), got 2"),
        (["--method", "greedy_soup"], "command line cannot give"),
        (["--method", "tie"], "unknown merge rule 'tie'. Did you mean ties"),
    ],
)
def test_flag_errors_exit_2(extra, message, files, tmp_path, capsys):
    argv = ["merge", "--models", str(files["a"]), str(files["b"]), "--out", str(tmp_path / "o.safetensors"), *extra]
    assert run(*argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o.safetensors").exists()


def test_incompatible_checkpoints_exit_2_naming_the_tensor(files, tmp_path, capsys):
    state = torch.load(files["b"], weights_only=True)
    state["ln_final.bias"] = torch.zeros(3)
    torch.save(state, tmp_path / "bad.pt")
    argv = ["merge", "--method", "average", "--models", str(files["a"]), str(tmp_path / "bad.pt"),
            "--out", str(tmp_path / "o.safetensors")]
    assert run(*argv) == 2
    err = capsys.readouterr().err
    assert "'ln_final.bias' has shape [3] in models[1]" in err and "bad.pt" in err


def test_fisher_estimation_then_fisher_merge(files, tmp_path, capsys):
    root = tmp_path / "data"
    for split in ("train", "test"):
        for c, colour in enumerate(("red", "blue")):
            (root / "shapes" / split / colour).mkdir(parents=True)
            for i in range(3):
                rgb = (200 + 10 * i, 0, 0) if c == 0 else (0, 0, 200 + 10 * i)
                Image.new("RGB", (40, 40), rgb).save(root / "shapes" / split / colour / f"{i}.png")
    config = tmp_path / "datasets.yaml"
    config.write_text("- {name: TinyShapes, kind: imagefolder, path: shapes, templates: ['a {c} picture.']}\n")
    fishers = []
    for mode, model in (("empirical", "a"), ("sampled", "b")):
        out = tmp_path / f"fisher_{model}.safetensors"
        argv = ["fisher", "--model", ARCH, "--pretrained", str(files[model]), "--dataset", "TinyShapes",
                "--data-root", str(root), "--custom-datasets", str(config), "--n", "4", "--batch-size", "3",
                "--mode", mode, "--device", "cpu", "--out", str(out)]
        assert run(*argv) == 0
        assert "(4 examples)" in capsys.readouterr().out
        with safe_open(str(out), "pt") as f:
            fisher = {k: f.get_tensor(k) for k in f.keys()}
            assert f.metadata()["zscl.fisher.mode"] == mode
        params = dict(load_clip(ARCH).model.named_parameters())
        assert set(fisher) == set(params)
        assert all(torch.isfinite(v).all() and (v >= 0).all() for v in fisher.values())
        assert float(fisher["visual.conv1.weight"].sum()) > 0 and float(fisher["text_projection"].sum()) > 0
        fishers.append(str(out))
    merged = tmp_path / "fisher_merged.safetensors"
    argv = ["merge", "--method", "fisher", "--models", str(files["a"]), str(files["b"]),
            "--fisher", *fishers, "--out", str(merged)]
    assert run(*argv) == 0
    model = open_clip.create_model(ARCH, pretrained=str(merged))
    assert all(torch.isfinite(p).all() for p in model.parameters())


# Non-default values for every hyper-parameter the CLI can give, so a flag that is dropped or
# misrouted on its way to the rule changes the output. hparam -> (flag values, Python value).
EXPLICIT = {
    "scale": (["--scale", "0.7"], 0.7),
    "density": (["--density", "0.5"], 0.5),
    "trim_scope": (["--trim-scope", "global"], "global"),
    "drop_rate": (["--drop-rate", "0.5"], 0.5),
    "seed": (["--seed", "3"], 3),
    "alpha": (["--alpha", "0.3"], 0.3),
    "metric_kind": (["--metric-kind", "step"], "step"),
    "penalty": (["--penalty", "2.0"], 2.0),
}


@pytest.mark.parametrize("name", MERGE_RULES.names())
def test_cli_output_equals_merge_on_the_same_inputs(name, files, tmp_path, capsys):
    """Every registered rule: the file ``zscl merge`` writes equals ``merge(...)`` tensor by tensor."""
    from zscl.merging import merge, open_state_dict

    rule = MERGE_RULES.get(name)
    out = tmp_path / "merged.safetensors"
    argv = merge_argv(name, files, out)
    if name not in CLI_RULES:  # greedy_soup: its score is a Python function, so the CLI refuses it
        assert run(*argv) == 2 and "command line cannot give" in capsys.readouterr().err
        return
    n_models = rule.exact_models or 2
    hparams: dict = {}
    for h in rule.hparams:
        if h in EXPLICIT:
            argv += EXPLICIT[h][0]
            hparams[h] = EXPLICIT[h][1]
    weights = [1.0, 3.0][:n_models] if rule.uses_weights else None
    if weights:
        argv += ["--weights", *map(str, weights)]
    assert run(*argv) == 0
    if "fishers" in rule.required:
        hparams["fishers"] = [open_state_dict(files[f]) for f in ("fa", "fb")][:n_models]
    if "metrics" in rule.required:
        hparams["metrics"] = [1.5, 0.5][:n_models]
    base = open_state_dict(files["base"]) if rule.needs_base else None
    models = [open_state_dict(files[m]) for m in ("a", "b")][:n_models]
    expected = merge(name, base, models, weights, **hparams)
    with safe_open(str(out), "pt") as f:
        assert set(f.keys()) == set(expected)
        for key, value in expected.items():
            got = f.get_tensor(key)
            assert got.dtype == value.dtype and torch.equal(got, value), f"{name}: {key} differs"
