"""The benchmark entry point at a tiny size (no timing assertions), its helpers, and the speed fixes it led to
(batch augmentation, evaluation passes) against plainly written references."""
import argparse
import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import random_images, tiny_cnn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks` lives at the repository root

from benchmarks import common  # noqa: E402
from mcmi_lab.data.core import augment_batch  # noqa: E402
from mcmi_lab.training.evaluate import iter_logits, measure_cmi, predict  # noqa: E402

RATIO_LINE = re.compile(r"^ratios: loop/limit=(\S+) loop/usual=(\S+) mcmi/mll=(\S+) cmi/infer=(\S+)$")


def test_quick_run_ends_with_the_ratio_line(capsys):
    pytest.importorskip("torchvision")
    from mcmi_lab.data.registry import fashion_mnist_root

    try:
        fashion_mnist_root(download=False)
    except FileNotFoundError:
        pytest.skip("Fashion-MNIST is not installed")
    from benchmarks.__main__ import main

    threads = torch.get_num_threads()
    try:
        ratios = main(["--quick", "--threads", "1", "--profile"])
    finally:
        torch.set_num_threads(threads)
    lines = capsys.readouterr().out.strip().splitlines()
    match = RATIO_LINE.match(lines[-1])
    assert match, lines[-1]
    assert all(float(v) > 0 for v in match.groups())
    assert set(ratios) >= {"loop/limit", "loop/usual", "mcmi/mll", "cmi/infer"}
    assert sum(bool(RATIO_LINE.match(line)) for line in lines) == 1  # exactly one line of that form
    assert any(line.startswith("ratios: at/kd=") for line in lines)  # the KD benchmark ran and reported
    shares = [re.findall(r"(\d+)%", line) for line in lines if "profile of the limit step" in line]
    assert shares and all(95 <= sum(map(int, s)) <= 105 for s in shares)  # the kinds of op cover the step


def test_loop_benchmark_times_the_compiled_fit(capsys, fashion_train):
    if not (shutil.which("g++") or shutil.which("c++")):
        pytest.skip("torch.compile on a CPU needs a C++ compiler")
    from benchmarks import loop

    threads = torch.get_num_threads()
    try:
        loop.main(["--quick", "--compile", "--reps", "1", "--cases", "cnn_tiny@fashion-mnist", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    line = next(x for x in capsys.readouterr().out.splitlines() if x.strip().startswith("torch.compile"))
    assert re.search(r"fit compiled / fit = \d+\.\d\dx throughput; first epoch \(compiling\) \d+\.\d s", line), line


def test_stacked_study_trains_the_models_of_the_sequential_one(tmp_path, fashion_train):
    """benchmarks.study stacks each step across seeds (teachers, fine-tunes, students per view, each member its own
    split, seed, objective and teacher); every model must be the one its one-at-a-time run trains.

    Precision: float64 (models, data and training; "--precision fp32" means no autocast). In fp32 the stacked and the
    one-at-a-time runs drift apart by a discrete event, not by rounding: Fashion-MNIST's constant background makes
    max-pooling near-ties and ReLU inputs near 0 that the grouped convolutions' rounding (~1e-7) puts on the other
    side, routing a gradient elsewhere: 3.3e-4 measured on a CPU without AVX-512, 2.7e-3 on one with it (the MCMI
    fine-tune's λ=0 twin is 3.7e-3 away, a few-shot student's twin 1.5e-5), so fp32 cannot tell a model from its
    twin on every CPU. In float64 such an event needs a value within ~1e-16: measured, every model is within
    4.1e-10 of its one-at-a-time run (the CPU's float64 convolutions add in one order, grouped or not), and its
    nearest other model is 1.5e-5 away or more. fit_stack's fp32 and bf16 comparisons are in test_stack.py."""
    from benchmarks import study

    args = ["--seeds", "0", "1", "--train-size", "400", "--test-size", "300", "--teacher-epochs", "1",
            "--finetune-epochs", "1", "--student-epochs", "1", "--device", "cpu", "--precision", "fp32"]
    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    try:
        torch.set_num_threads(1)
        torch.set_default_dtype(torch.float64)
        log, stacked = study.run(args + ["--json", str(tmp_path / "study.json")])
        seq_log, sequential = study.run(args + ["--sequential"])
    finally:
        torch.set_num_threads(threads)
        torch.set_default_dtype(dtype)
    assert len(stacked) == len(sequential) == 2 * (4 + 4 + 4 * 2)  # per seed: 4 teachers, 4 KD + 4 x 2 students
    assert stacked.keys() == sequential.keys()

    def distance(a, b):
        a, b = a.state_dict(), b.state_dict()
        return max(float((a[k] - b[k]).abs().max()) for k in a if a[k].is_floating_point())
    for key, model in stacked.items():
        own = distance(model, sequential[key])
        shapes = {k: v.shape for k, v in model.state_dict().items()}
        others = {k: distance(model, m) for k, m in sequential.items()
                  if k != key and {n: v.shape for n, v in m.state_dict().items()} == shapes}
        assert own < 1e-8, (key, own)
        assert next(model.parameters()).dtype == torch.float64
        nearest = min(others, key=others.get)
        assert own < others[nearest], (key, own, nearest, others[nearest])
    steps = [s["step"] for s in log["steps"]]
    assert steps[:3] == ["teachers (MLL, label smoothing) ×2", "fine-tunes (λ=0, MCMI λ=0.5) ×2", "KD students (4) ×2"]
    assert sum(s.startswith("zero-shot") for s in steps) == 2 and len(seq_log["steps"]) == 2 * 9
    assert set(log["student_acc"]) == {"mll", "label_smoothing", "control", "mcmi"}
    assert log["teacher_acc"] == seq_log["teacher_acc"]
    assert json.loads((tmp_path / "study.json").read_text())["wall_s"] == log["wall_s"] > 0


def test_centroid_study_runs_and_reports_every_update(capsys, fashion_train):
    from benchmarks import centroids

    threads = torch.get_num_threads()
    try:
        rows = centroids.main(["--train-size", "300", "--test-size", "100", "--teacher-epochs", "1",
                               "--finetune-epochs", "1", "--updates", "running:2", "frozen", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    assert [r["run"] for r in rows] == ["teacher", "control", "running:2", "frozen"]
    assert all(0 <= r["train_acc"] <= 1 and r["train_cmi"] >= 0 for r in rows if "stopped" not in r)
    assert "train CMI" in capsys.readouterr().out
    for bad in ("weekly", "frozen:5", "running:0", "running:x"):
        with pytest.raises(argparse.ArgumentTypeError, match=f"{bad!r} is not accepted"):
            centroids.parse_update(bad)


# ---- helpers --------------------------------------------------------------------------------------------------

def test_ratio_is_the_median_of_paired_ratios():
    assert common.ratio({"a": [2.0, 9.0, 3.0], "b": [1.0, 3.0, 1.0]}, "a", "b") == 3.0  # pairs 2, 3, 3
    times = {"a": [1.0, 6.0, 6.0], "b": [1.0, 3.0, 2.0]}
    assert common.ratio(times, "a", "b") == 2.0  # pairs 1, 2, 3 (the ratio of the medians would be 6 / 2 = 3)


def test_interleave_alternates_the_order_and_times_every_call():
    calls = []
    fns = {name: (lambda n=name: calls.append(n)) for name in "abc"}
    times = common.interleave(fns, reps=2, device=torch.device("cpu"), warmup=1)
    assert calls == list("abc") + list("abc") + list("cba")
    assert {k: len(v) for k, v in times.items()} == {"a": 2, "b": 2, "c": 2}


def test_ratio_line_and_parse_case():
    assert common.ratio_line({"x/y": 0.934, "z/w": None}) == "ratios: x/y=0.93 z/w=n/a"
    assert common.parse_case("resnet20@random32") == common.Case("resnet20", "random32")
    assert common.parse_case("cnn_small").data == "fashion-mnist"
    with pytest.raises(Exception, match="random32"):
        common.parse_case("resnet20@cifar")


def test_peak_memory_on_cpu_counts_a_freed_temporary():
    def work():
        x = torch.ones(1 << 20)  # 4 MiB
        y = x * 2  # 4 MiB more while x is alive
        del x, y
        return torch.zeros(1 << 18)  # 1 MiB, kept
    with common.PeakMemory(torch.device("cpu")) as peak:
        kept = work()
    assert peak.mib == pytest.approx(8.0, abs=0.01)
    assert kept.numel() == 1 << 18


# ---- speed fixes keep the results --------------------------------------------------------------------------------

def reference_augment(images, pad, flip, generator):
    """Per sample: zero-pad, cut the window at the drawn offsets, flip when drawn (same draws, same order)."""
    b, c, h, w = images.shape
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=generator) if pad else torch.zeros(b, dtype=torch.long)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=generator) if pad else torch.zeros(b, dtype=torch.long)
    mask = torch.rand(b, generator=generator) < 0.5 if flip else torch.zeros(b, dtype=torch.bool)
    out = torch.empty_like(images)
    for i in range(b):
        padded = F.pad(images[i], (pad, pad, pad, pad))
        window = padded[:, oy[i]:oy[i] + h, ox[i]:ox[i] + w]
        out[i] = window.flip(2) if mask[i] else window
    return out


@pytest.mark.parametrize("pad,flip", [(0, True), (2, False), (2, True), (4, True)])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_augment_batch_equals_the_per_sample_reference(pad, flip, dtype):
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(9, 3, 7, 5, generator=g) * 255).to(dtype)
    for layout in (torch.contiguous_format, torch.channels_last):
        x = images.contiguous(memory_format=layout)
        out = augment_batch(x, pad, flip, torch.Generator().manual_seed(7))
        assert torch.equal(out, reference_augment(images, pad, flip, torch.Generator().manual_seed(7)))
    assert torch.equal(x, images)  # input not mutated


def test_eval_batch_size_and_memory_format_do_not_change_results():
    data = random_images(300, k=4, c=3)
    torch.manual_seed(0)
    model = tiny_cnn(in_channels=3, num_classes=4).eval()
    ref_logits, labels = predict(model, data, batch_size=1000)
    ref = measure_cmi(model, data, batch_size=1000)
    model.to(memory_format=torch.channels_last)  # as after fit; inputs now follow the model's format
    logits, labels2 = predict(model, data)  # CPU default batch (256): two batches
    assert torch.equal(labels, labels2)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    out = measure_cmi(model, data, batch_size=7)
    torch.testing.assert_close(out["cmi"], ref["cmi"], rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(out["centroids"], ref["centroids"], rtol=1e-5, atol=1e-9)
    assert out["accuracy"] == ref["accuracy"]


def test_precision_of_a_pass():
    data = random_images(64, k=4, c=3)
    torch.manual_seed(0)
    model = tiny_cnn(in_channels=3, num_classes=4)
    fp32, _ = predict(model, data)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inherited, _ = predict(model, data)  # default: the caller's autocast applies
        forced, _ = predict(model, data, precision="fp32")  # "fp32" turns it off
    bf16, _ = predict(model, data, precision="bf16")
    assert torch.equal(forced, fp32)
    assert torch.equal(inherited, bf16) and not torch.equal(bf16, fp32)
    torch.testing.assert_close(bf16, fp32, rtol=0.05, atol=0.05)
    with pytest.raises(ValueError, match="precision='fp16'"):
        predict(model, data, precision="fp16")


def test_measure_cmi_peak_memory_does_not_grow_with_the_data():
    model = tiny_cnn(num_classes=4).eval()
    peaks = []
    for n in (64, 256):
        data = random_images(n, k=4)
        with common.PeakMemory(torch.device("cpu")) as peak:
            measure_cmi(model, data, batch_size=32)
        peaks.append(peak.mib)
    assert peaks[0] > 0 and peaks[1] == pytest.approx(peaks[0], abs=1e-3)


def test_iter_logits_leaves_no_mode_set_between_batches():
    data = random_images(20, k=4)
    model = tiny_cnn(num_classes=4)
    batches = iter_logits(model, data, batch_size=8, precision="bf16")
    next(batches)
    assert not torch.is_inference_mode_enabled()
    assert not torch.is_autocast_enabled("cpu")
    batches.close()
    assert model.training


def test_dose_controller_reports_every_target(capsys, fashion_train):
    from benchmarks import dose_controller

    rows = dose_controller.main(["--targets", "0.05", "0.2", "--epochs", "2", "--train-size", "300",
                                 "--teacher-epochs", "2"])
    assert [r["target"] for r in rows] == [0.05, 0.2]
    assert all(len(r["lam"]) == 2 and min(r["lam"]) >= 0 and len(r["train_cmi"]) == 2 for r in rows)
    assert all(abs(r["relative_error"] - (r["reached"] / r["target"] - 1)) < 2e-3 for r in rows)
    assert capsys.readouterr().out.splitlines()[-1] == \
        f"within ±25%: {sum(abs(r['relative_error']) <= 0.25 for r in rows)}/2"


def test_stack_benchmark_ends_with_its_ratio_line(capsys, fashion_train):
    from benchmarks import stack

    threads = torch.get_num_threads()
    try:
        ratios = stack.main(["--quick", "--threads", "1", "--reps", "1"])
    finally:
        torch.set_num_threads(threads)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"ratios: stack/sequential=\d+\.\d\d cnn_tiny_x2=\d+\.\d\d", last), last
    assert ratios["stack/sequential"] == ratios["cnn_tiny_x2"] > 0
