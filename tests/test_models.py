"""zscl.models: every checkpoint format loads into the right architecture with identical features,
errors say what was wrong, trainable-part selection and transforms follow the ZSCL reference code."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Callable

import open_clip
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from torchvision import transforms as T

from zscl.models import (
    ArchitectureMismatchError,
    is_jit_archive,
    list_models,
    load_clip,
    load_weights,
    read_state_dict,
    register_pretrained,
    save_state_dict,
    select_trainable,
    tiny_configs_dir,
)
from zscl.models.loading import _resolve_architecture

# Tracing and torch.jit.save/load warn about their own deprecation and about traced constants.
pytestmark = [
    pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
    pytest.mark.filterwarnings("ignore:.*torch.jit.*:FutureWarning"),
    pytest.mark.filterwarnings("ignore:.*TorchScript.*:UserWarning"),
    pytest.mark.filterwarnings("ignore:Found .* module\\(s\\) in eval mode"),  # the frozen teacher
]

VIT, RN = "zscl-tiny-vit", "zscl-tiny-rn"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's published normalisation
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def _source(arch: str, seed: int, quick_gelu: bool = False) -> torch.nn.Module:
    """A randomly initialised open_clip model built without zscl, standing for 'someone's weights'."""
    list_models()  # registers the tiny configs with open_clip
    torch.manual_seed(seed)
    return open_clip.create_model(arch, force_quick_gelu=quick_gelu).eval()


@pytest.fixture(scope="module")
def src() -> torch.nn.Module:
    return _source(VIT, seed=123)


def features(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    size = model.visual.image_size
    size = size if isinstance(size, int) else size[0]
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(3, 3, size, size, generator=gen)
    tokens = open_clip.get_tokenizer(VIT)(["a photo of a cat.", "a red square", "x"])
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(tokens)


def assert_same_model(loaded: torch.nn.Module, source: torch.nn.Module) -> None:
    got, want = loaded.state_dict(), source.state_dict()
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key].float(), want[key].float()), key
    for a, b in zip(features(loaded), features(source)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


# --- writers: one per on-disk format, producing exactly what the tool in question writes ---------


def write_plain_pt(model: torch.nn.Module, path: Path) -> Path:
    torch.save(model.state_dict(), path)
    return path


def write_safetensors(model: torch.nn.Module, path: Path) -> Path:
    save_state_dict(model.state_dict(), path.with_suffix(".safetensors"))
    return path.with_suffix(".safetensors")


def write_open_clip_training(model: torch.nn.Module, path: Path) -> Path:
    # open_clip's training/main.py under DDP: {"epoch", "name", "state_dict" (module.*), "optimizer"}.
    class DDPLike(torch.nn.Module):
        def __init__(self, module: torch.nn.Module) -> None:
            super().__init__()
            self.module = module

    wrapped = DDPLike(model)
    opt = torch.optim.AdamW(wrapped.parameters(), lr=0.0)
    wrapped.module.logit_scale.grad = torch.zeros_like(model.logit_scale)
    opt.step()  # fills the optimizer state (lr 0: weights unchanged)
    torch.save({"epoch": 3, "name": "run", "state_dict": wrapped.state_dict(), "optimizer": opt.state_dict()}, path)
    model.logit_scale.grad = None
    return path


def write_zscl_reference(model: torch.nn.Module, path: Path) -> Path:
    torch.save({"state_dict": model.state_dict()}, path)  # mtil/src/utils.py torch_save
    return path


def write_compiled(model: torch.nn.Module, path: Path) -> Path:
    torch.save(torch.compile(model).state_dict(), path)  # keys "_orig_mod.*"; compiles nothing
    return path


WRITERS: dict[str, Callable[[torch.nn.Module, Path], Path]] = {
    "plain_pt": write_plain_pt,
    "safetensors": write_safetensors,
    "open_clip_training": write_open_clip_training,
    "zscl_reference": write_zscl_reference,
    "compiled": write_compiled,
}


@pytest.mark.parametrize("fmt", list(WRITERS))
def test_every_format_loads_with_identical_features(fmt, src, tmp_path):
    path = WRITERS[fmt](src, tmp_path / "weights.pt")
    assert read_state_dict(path).keys() == src.state_dict().keys()
    bundle = load_clip(VIT, pretrained=str(path))
    assert bundle.name == VIT and bundle.pretrained == str(path)
    assert not bundle.model.training
    assert_same_model(bundle.model, src)


def test_resnet_safetensors_round_trip_keeps_batchnorm_stats(tmp_path):
    source = _source(RN, seed=7)
    source.visual.bn1.running_mean.uniform_(-1, 1)  # non-default statistics must survive
    path = write_safetensors(source, tmp_path / "rn")
    assert_same_model(load_clip(RN, pretrained=str(path)).model, source)


def test_fp16_file_loads_into_fp32_model(src, tmp_path):
    path = tmp_path / "half.safetensors"
    save_state_dict({k: v.half() for k, v in src.state_dict().items()}, path)
    loaded = load_clip(VIT, pretrained=str(path)).model
    assert loaded.visual.conv1.weight.dtype == torch.float32
    assert torch.equal(loaded.visual.conv1.weight, src.visual.conv1.weight.half().float())


def test_lightning_checkpoint_keeps_the_student_only(tmp_path):
    import lightning as L

    class Module(L.LightningModule):
        def __init__(self, lr: float = 0.1) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.clip = torch.compile(_source(VIT, seed=1))  # "clip._orig_mod.*" keys
            self.teacher = _source(VIT, seed=2).requires_grad_(False)

        def training_step(self, batch, _):
            return self.clip.encode_image(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.clip.parameters(), lr=self.hparams.lr)

    module = Module()
    before = module.clip.visual.conv1.weight.detach().clone()
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, 3, 32, 32)), batch_size=4)
    trainer = L.Trainer(
        max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    with torch.compiler.set_stance("force_eager"):  # keep the test fast: no compilation
        trainer.fit(module, data)
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    student = module.clip._orig_mod.eval()
    assert not torch.equal(student.visual.conv1.weight, before)  # the step changed the student
    assert read_state_dict(path).keys() == student.state_dict().keys()  # teacher dropped
    assert_same_model(load_clip(VIT, pretrained=str(path)).model, student)


# --- OpenAI TorchScript archives -------------------------------------------------------------------


def write_openai_jit(model: torch.nn.Module, path: Path, image_size: int) -> Path:
    """A TorchScript archive laid out like OpenAI's: CLIP weights plus three hyper-parameter entries."""
    for key, value in {"input_resolution": image_size, "context_length": 16, "vocab_size": 49408}.items():
        if hasattr(model, key):
            delattr(model, key)
        model.register_buffer(key, torch.tensor(value))
    # OpenAI's causal mask is a traced constant, not a state-dict entry.
    model.attn_mask = model._buffers.pop("attn_mask")
    images, tokens = torch.zeros(2, 3, image_size, image_size), torch.zeros(2, 16, dtype=torch.long)
    # OpenAI's archives also hold traced encode_image/encode_text; readers only need the weights.
    traced = torch.jit.trace_module(model, {"forward": (images, tokens)})
    torch.jit.save(traced, str(path))
    return path


@pytest.fixture(scope="module", params=[(VIT, 32), (RN, 32)], ids=["vit", "rn"])
def jit_archive(request, tmp_path_factory) -> tuple[str, torch.nn.Module, Path]:
    arch, size = request.param
    source = _source(arch, seed=11, quick_gelu=True)
    path = write_openai_jit(_source(arch, seed=11, quick_gelu=True), tmp_path_factory.mktemp("jit") / "clip.pt", size)
    return arch, source, path


def test_jit_archive_is_valid_for_open_clip(jit_archive):
    arch, source, path = jit_archive
    assert is_jit_archive(path)
    reference = open_clip.load_openai_model(str(path), device="cpu")  # open_clip's own reader
    for a, b in zip(features(reference), features(source)):
        torch.testing.assert_close(a, b, rtol=0, atol=5e-3)  # open_clip rounds through fp16


@pytest.mark.parametrize("how", ["as_model", "as_pretrained"])
def test_jit_archive_loads_with_quickgelu_and_same_weights(jit_archive, how):
    arch, source, path = jit_archive
    bundle = load_clip(str(path)) if how == "as_model" else load_clip(arch, pretrained=str(path))
    assert bundle.name == f"{arch}-quickgelu"  # architecture inferred (as_model) and QuickGELU chosen
    acts = {type(m).__name__ for m in bundle.model.transformer.modules()}
    assert "QuickGELU" in acts and "GELU" not in acts
    assert bundle.tokenizer(["a"]).shape == (1, 16)
    assert_same_model(bundle.model, source)


def test_is_jit_archive_rejects_other_files(src, tmp_path):
    assert not is_jit_archive(write_plain_pt(src, tmp_path / "a.pt"))  # also a zip, but torch.save's
    assert not is_jit_archive(write_safetensors(src, tmp_path / "b"))


def test_quickgelu_name_is_accepted_back(src, tmp_path):
    bundle = load_clip(f"{VIT}-quickgelu", pretrained=str(write_safetensors(src, tmp_path / "w")))
    assert bundle.name == f"{VIT}-quickgelu"
    assert any(type(m).__name__ == "QuickGELU" for m in bundle.model.modules())


# --- names, tags, random init ----------------------------------------------------------------------


def test_random_init_is_seeded_by_the_caller():
    torch.manual_seed(5)
    a = load_clip(VIT).model
    torch.manual_seed(5)
    b = load_clip(VIT)
    assert b.pretrained is None and b.image_size == 32
    assert_same_model(b.model, a)
    torch.manual_seed(6)
    assert not torch.equal(load_clip(VIT).model.visual.conv1.weight, a.visual.conv1.weight)


def test_names_and_tiny_configs():
    assert {VIT, RN, "ViT-B-16"} <= set(list_models())
    assert (tiny_configs_dir() / f"{VIT}.json").is_file()
    assert _resolve_architecture("ViT-B/16") == "ViT-B-16"
    assert _resolve_architecture("vit-b-16") == "ViT-B-16"
    with pytest.raises(ValueError, match=r"unknown CLIP architecture 'ViT-B-61'.*Did you mean ViT-B-16"):
        load_clip("ViT-B-61")


def test_registered_tag(src, tmp_path):
    path = write_safetensors(src, tmp_path / "registered")
    register_pretrained(VIT, "unit-test", path)
    assert_same_model(load_clip(VIT, "unit-test").model, src)
    register_pretrained(VIT, "unit-test-lazy", lambda: path)  # resolved at load time
    assert load_clip(VIT, "unit-test-lazy").pretrained == "unit-test-lazy"
    register_pretrained(VIT, "unit-test-gone", tmp_path / "gone.safetensors")
    with pytest.raises(FileNotFoundError, match="unit-test-gone"):
        load_clip(VIT, "unit-test-gone")


def test_offline_hub_tag_says_to_pass_a_file(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(open_clip.pretrained, "download_pretrained", offline)
    with pytest.raises(RuntimeError, match=r"RN50/openai.*Name or service not known.*pass a local file"):
        load_clip("RN50", "openai")


def test_unknown_tag_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"'no-such-tag'.*open_clip tags for RN50: openai"):
        load_clip("RN50", "no-such-tag")


# --- errors ----------------------------------------------------------------------------------------


def test_missing_and_garbage_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_clip(VIT, pretrained=str(tmp_path / "nope.pt"))
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        read_state_dict(tmp_path / "nope.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match="garbage.pt is neither safetensors"):
        load_clip(VIT, pretrained=str(garbage))
    with pytest.raises(FileNotFoundError, match="gone.pt"):
        load_clip(str(tmp_path / "gone.pt"))
    with pytest.raises(ValueError, match="not an OpenAI TorchScript archive"):
        load_clip(str(write_plain_pt(_source(VIT, seed=0), tmp_path / "plain.pt")))
    fake = tmp_path / "fake.safetensors"
    fake.write_bytes(b"not really")
    with pytest.raises(ValueError, match="fake.safetensors is not a readable safetensors"):
        read_state_dict(fake)


class Opaque:  # stands for a custom class pickled into a checkpoint
    pass


def test_pickled_objects_are_refused_with_advice(tmp_path):
    path = tmp_path / "objects.ckpt"
    torch.save({"state_dict": {"logit_scale": torch.ones(())}, "hparams": Opaque()}, path)
    with pytest.raises(ValueError, match=r"weights_only=True.*Opaque.*If you trust the file"):
        read_state_dict(path)


def test_non_clip_state_dict_is_rejected(tmp_path):
    path = tmp_path / "resnet.pt"
    torch.save({"conv.weight": torch.ones(2), "fc.bias": torch.ones(1)}, path)
    with pytest.raises(ValueError, match=r"does not look like a CLIP state dict.*'conv.weight'"):
        read_state_dict(path)


def test_wrong_architecture_names_the_tensor(tmp_path):
    list_models()  # registers the tiny configs with open_clip
    cfg = open_clip.get_model_config(VIT)
    cfg["vision_cfg"]["patch_size"] = 4  # "another architecture": same widths, smaller patches
    other = open_clip.model.CLIP(**cfg)
    path = tmp_path / "x.safetensors"
    save_state_dict(other.state_dict(), path)
    with pytest.raises(ArchitectureMismatchError) as err:
        load_clip(VIT, pretrained=str(path))
    msg = str(err.value)
    assert "checkpoint x.safetensors does not fit zscl-tiny-vit" in msg
    assert "visual.conv1.weight has shape [64,3,4,4] in the file but [64,3,8,8] in the model" in msg
    assert "visual.positional_embedding has shape [65,64]" in msg
    with pytest.raises(ArchitectureMismatchError, match=r"missing from the file \(e\.g\. visual\.class_embedding"):
        load_clip(VIT, pretrained=str(write_safetensors(_source(RN, seed=0), tmp_path / "rn")))


def test_load_weights_strict_and_partial(src):
    target = _source(VIT, seed=99)
    visual_only = {k: v for k, v in src.state_dict().items() if k.startswith("visual.")}
    with pytest.raises(ArchitectureMismatchError, match=r"missing from the file \(e\.g\. positional_embedding"):
        load_weights(target, visual_only)
    load_weights(target, visual_only, strict=False)
    assert torch.equal(target.visual.conv1.weight, src.visual.conv1.weight)
    assert not torch.equal(target.token_embedding.weight, src.token_embedding.weight)


def test_save_state_dict_format(src, tmp_path):
    state = dict(src.state_dict())
    state["text_projection"] = state["text_projection"].t()  # a non-contiguous view
    state["alias"] = state["logit_scale"]  # shared storage: safetensors needs a copy
    path = tmp_path / "out" / "w.safetensors"
    save_state_dict(state, path, metadata={"arch": VIT})
    assert [p.name for p in path.parent.iterdir()] == ["w.safetensors"]  # no temp file left
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"arch": VIT}
        assert torch.equal(f.get_tensor("text_projection"), state["text_projection"])
    with pytest.raises(TypeError, match="'bad'"):
        save_state_dict({"bad": 1.0}, tmp_path / "bad.safetensors")  # type: ignore[dict-item]
    good = tmp_path / "good.safetensors"
    save_state_dict(src.state_dict(), good)
    assert_same_model(open_clip.create_model(VIT, pretrained=str(good)).eval(), src)  # open_clip reads it



def test_save_state_dict_bytes_do_not_depend_on_metadata_order(tmp_path):
    """Equal tensors and equal metadata give byte-identical files, whatever the dict's insertion order.

    safetensors itself writes metadata in a per-process hash order; the header must list the keys sorted.
    """
    state = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.ones(3, dtype=torch.float16)}
    meta = {f"k{i}": f"v{i}" for i in range(8)} | {"hparams": '{"x": "é"}', "nl": "a\nb"}
    orders = [dict(meta), dict(reversed(meta.items())), dict(sorted(meta.items(), key=lambda kv: kv[1]))]
    paths = []
    for i, order in enumerate(orders * 2):
        paths.append(tmp_path / f"{i}.safetensors")
        save_state_dict(state, paths[-1], metadata=order)
    blobs = {p.read_bytes() for p in paths}
    assert len(blobs) == 1, "equal weights and metadata must give equal bytes"
    blob = blobs.pop()
    size = int.from_bytes(blob[:8], "little")
    header = blob[8 : 8 + size].decode("utf-8")
    assert size % 8 == 0 and header.startswith('{"__metadata__":{"hparams":"{\\"x\\": \\"é\\"}","k0":"v0","k1":"v1"')
    with safe_open(str(paths[0]), framework="pt") as f:
        assert f.metadata() == meta
        assert torch.equal(f.get_tensor("b"), state["b"]) and torch.equal(f.get_tensor("a"), state["a"])

# --- trainable parts --------------------------------------------------------------------------------


def test_select_trainable_modes():
    model = _source(VIT, seed=0)
    names = {n for n, _ in model.named_parameters()}
    visual = {n for n in names if n.startswith("visual.")}
    text = names - visual - {"logit_scale"}
    assert {"token_embedding.weight", "positional_embedding", "text_projection", "ln_final.weight"} <= text
    for mode, expected in [("image", visual), ("text", text), ("whole", names - {"logit_scale"})]:
        chosen = select_trainable(model, mode)
        assert {n for n, _ in chosen} == expected, mode
        assert {n for n, p in model.named_parameters() if p.requires_grad} == expected, mode
        assert all(p is dict(model.named_parameters())[n] for n, p in chosen)
    with pytest.raises(ValueError, match="'both'.*whole, image, text"):
        select_trainable(model, "both")  # type: ignore[arg-type]


# --- transforms and tokenizer -----------------------------------------------------------------------


def test_transforms_follow_the_reference_code():
    bundle = load_clip(VIT)
    assert bundle.mean == OPENAI_MEAN and bundle.std == OPENAI_STD
    train, test = bundle.train_transform.transforms, bundle.test_transform.transforms
    crop = next(t for t in train if isinstance(t, T.RandomResizedCrop))
    assert crop.size == (32, 32) and crop.scale == (0.9, 1.0)
    assert crop.interpolation == T.InterpolationMode.BICUBIC
    assert [type(t) for t in test[:2]] == [T.Resize, T.CenterCrop]
    assert test[0].size == 32 and test[0].interpolation == T.InterpolationMode.BICUBIC
    for pipeline in (train, test):
        norm = pipeline[-1]
        assert isinstance(norm, T.Normalize) and norm.mean == OPENAI_MEAN and norm.std == OPENAI_STD
    gray = Image.new("L", (48, 64), color=128)  # grayscale and not square
    expected = (128 / 255 - torch.tensor(OPENAI_MEAN)) / torch.tensor(OPENAI_STD)
    for transform in (bundle.train_transform, bundle.test_transform):
        out = transform(gray)
        assert out.shape == (3, 32, 32)
        torch.testing.assert_close(out, expected[:, None, None].expand(3, 32, 32), rtol=0, atol=1e-5)
        pickle.dumps(transform)  # DataLoader workers must be able to receive it


def test_tokenizer_uses_the_config_context_length():
    tokens = load_clip(VIT).tokenizer(["a photo of a dog.", "b"])
    assert tokens.shape == (2, 16) and tokens.dtype == torch.long
    sot = open_clip.get_tokenizer(VIT).sot_token_id
    assert tokens[:, 0].tolist() == [sot, sot]
