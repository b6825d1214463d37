"""``zscl bench step | eval | loader`` on CPU with tiny settings, the analytic FLOP count, GPU-path decoding."""

from __future__ import annotations

import json

import pytest
import torch

from zscl.cli.main import main as zscl_main


pytestmark = pytest.mark.usefixtures("one_thread")


def run_cli(argv, capsys, tmp_path) -> dict:
    """Run ``zscl bench ...`` with ``--json``; stdout must be exactly one JSON object, equal to the file."""
    out_file = tmp_path / "result.json"
    with pytest.raises(SystemExit) as exit_info:
        zscl_main(["bench", *argv, "--json", str(out_file)])
    assert exit_info.value.code == 0
    result = json.loads(capsys.readouterr().out)
    assert json.loads(out_file.read_text()) == result
    return result


def assert_times(result: dict, prefix: str) -> None:
    assert 0 < result[f"{prefix}_min"] <= result[f"{prefix}_median"] <= result[f"{prefix}_max"]


@pytest.mark.parametrize("method", ["zscl", "finetune"])
def test_bench_step(method, capsys, tmp_path):
    from zscl.bench.flops import step_flops

    argv = ["step", "--method", method, "--batch", "4", "--ref-batch", "3", "--classes", "5", "--ref-texts", "8",
            "--steps", "3", "--warmup", "1"]
    r = run_cli(argv, capsys, tmp_path)
    assert_times(r, "ms_per_step")
    assert r["first_step_ms"] > 0 and r["setup_s"] > 0 and 0 < r["ms_in_hooks_median"]
    assert r["compiled"] is False and r["compile_s"] is None  # auto: no torch.compile on CPU
    assert r["mfu"] is None and r["peak_tflops"] is None  # no CPU peak in the table
    assert r["device"].startswith("cpu") and r["torch"] == torch.__version__
    assert r["settings"]["model"] == "zscl-tiny-vit" and r["settings"]["precision"] == "32-true"
    distill = method == "zscl"
    expected = step_flops("zscl-tiny-vit", batch=4, ref_batch=3, classes=5, ref_texts=8, distill=distill).total / 1e12
    assert r["tflops_per_step"] == pytest.approx(expected)
    assert ("teacher_image" in r["tflops_parts"]) == distill
    assert r["achieved_tflops"] == pytest.approx(expected / (r["ms_per_step_median"] / 1e3))
    assert r["peak_mem_gib"] is None or r["peak_mem_gib"] >= 0


def test_bench_step_mfu_uses_the_given_peak(capsys, tmp_path):
    r = run_cli(["step", "--method", "finetune", "--batch", "2", "--classes", "3", "--steps", "2", "--warmup", "0",
                 "--peak-tflops", "0.5"], capsys, tmp_path)
    assert r["mfu"] == pytest.approx(r["achieved_tflops"] / 0.5)


def test_bench_eval(capsys, tmp_path):
    r = run_cli(["eval", "--images", "12", "--classes", "3", "--batch", "5", "--num-workers", "1"], capsys, tmp_path)
    for key in ("jpeg_img_s", "cache_img_s", "model_img_s", "cache_build_s", "classifier_s", "jpeg_write_s"):
        assert r[key] > 0, key
    assert r["n_images"] == 12
    assert r["cache_matches"] and r["top1_jpeg"] == r["top1_cache"]  # the cache is bit-identical to the transform


def test_bench_loader(capsys, tmp_path):
    argv = ["loader", "--images", "8", "--classes", "2", "--batch", "4", "--ref-batch", "2", "--batches", "2",
            "--warmup-batches", "1", "--num-workers", "1", "--step-ms", "40", "--workdir", str(tmp_path / "jpegs")]
    r = run_cli(argv, capsys, tmp_path)
    assert r["img_s"] > 0 and r["batches_s"] == pytest.approx(r["img_s"] / 4)
    assert r["needed_img_s"] == pytest.approx((4 + 2) / 40 * 1000)
    assert r["keeps_up"] == (r["img_s"] >= r["needed_img_s"])
    assert 10 < r["jpeg_kb"] < 400  # photo-like files, not flat synthetic ones
    assert len(list((tmp_path / "jpegs" / "train").glob("class_*/*.jpg"))) == 8


def test_bench_loader_gpu_decode_needs_cuda(capsys, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available: the error path is not reachable")
    with pytest.raises(SystemExit) as exit_info:
        zscl_main(["bench", "loader", "--decode", "gpu", "--images", "2", "--classes", "1"])
    assert exit_info.value.code == 2
    assert "needs CUDA" in capsys.readouterr().err


def test_gpu_decode_path_matches_the_pil_transform(tmp_path):
    """decode_random_resized_crop (run on CPU here) against PIL resize + ToTensor + Normalize, full-image crop."""
    from open_clip import OPENAI_DATASET_MEAN as MEAN, OPENAI_DATASET_STD as STD
    from PIL import Image
    from torchvision import transforms as T

    from zscl.bench.jpegs import write_jpeg_tree
    from zscl.bench.loader import FileBytes, collate_bytes, decode_random_resized_crop

    paths = write_jpeg_tree(tmp_path, 3, 1)
    datas, labels = collate_bytes([FileBytes(paths, [0, 0, 0])[i] for i in range(3)])
    # scale 1 and the images' own aspect ratio (500 / 375) make the random crop the whole image.
    x = decode_random_resized_crop(datas, 64, MEAN, STD, torch.device("cpu"), scale=(1.0, 1.0), ratio=(4 / 3, 4 / 3))
    pil = T.Compose([T.Resize((64, 64), interpolation=T.InterpolationMode.BICUBIC), T.ToTensor(), T.Normalize(MEAN, STD)])
    expected = torch.stack([pil(Image.open(p).convert("RGB")) for p in paths])
    assert x.shape == (3, 3, 64, 64) and x.dtype == torch.float32 and labels.tolist() == [0, 0, 0]
    diff = (x - expected).abs()
    assert diff.mean() < 0.02 and diff.max() < 0.3  # interpolation kernels differ slightly; one grey level ~0.015


def test_flops_vit_b16_matches_the_measured_anchor():
    """ViT-B/16, 64 + 64 images, 100 classes -> 13.5 + 2.3 + 1.7 ≈ 17.5 TFLOP per ZSCL step.

    By hand: one ViT-B/16 image forward is 12 x (24·197·768² + 4·197²·768) + 2·196·(3·16²)·768
    ≈ 35.1 GFLOP, so the student (forward + backward = 3 passes over 128 images) is ≈ 13.5 T and
    the teacher (one pass over 64) ≈ 2.3 T.
    """
    from zscl.bench.flops import step_flops

    f = step_flops("ViT-B-16", batch=64, ref_batch=64, classes=100, ref_texts=13000)
    assert f.total / 1e12 == pytest.approx(17.5, rel=0.03)
    assert f.parts["student_image"] / 1e12 == pytest.approx(13.5, rel=0.03)
    assert f.parts["teacher_image"] / 1e12 == pytest.approx(2.3, rel=0.03)
    assert f.parts["student_image"] == pytest.approx(6 * f.parts["teacher_image"])  # 3 passes x 128 vs 1 x 64


@pytest.mark.parametrize("tower", ["image", "text"])
def test_flops_tower_forward_equals_counted_matmuls(tower):
    """The per-layer formula against torch's FLOP counter on a real forward (math attention, so QK^T/AV count)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from zscl.bench.flops import clip_shape
    from zscl.models import load_clip

    bundle = load_clip("zscl-tiny-vit", None)
    shape = clip_shape("zscl-tiny-vit")
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        if tower == "image":
            bundle.model.encode_image(torch.randn(3, 3, bundle.image_size, bundle.image_size))
        else:
            bundle.model.encode_text(bundle.tokenizer(["a photo of a dog", "x", "a b c"]))
    analytic = (shape.image if tower == "image" else shape.text).forward()
    assert counter.get_total_flops() / 3 == pytest.approx(analytic, rel=1e-9)


def test_flops_refuses_resnet_towers():
    from zscl.bench.flops import FlopsUnsupported, step_flops

    with pytest.raises(FlopsUnsupported, match="ViT"):
        step_flops("zscl-tiny-rn", batch=1, classes=1)
