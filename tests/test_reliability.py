"""Reliability and security: safe checkpoints, nothing lost to a kill, one clear line for every bad input."""
import math
import os
import pickle
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from conftest import random_images, tiny_cnn
from mcmi_lab import few_shot, from_tensors, omit_classes, stratified_split, subset
from mcmi_lab.training.checkpoint import (UnsafeCheckpointError, load_checkpoint, load_model, load_state, save_checkpoint,
                                 save_model)
from mcmi_lab.data.core import batches
from mcmi_lab.training.evaluate import evaluate, measure_cmi, predict
from mcmi_lab.models import build_model
from mcmi_lab.study.recipes import finetune_mcmi
from mcmi_lab.training.loop import fit
from mcmi_lab.training.objectives import Objective, StopTraining, kd_objective, mcmi_objective, mll_objective

FAST = dict(progress="off", log=False, batch_size=16, precision="fp32")  # not "auto": the same test on every CPU
NAN, INF = float("nan"), float("inf")


# ---- safe checkpoints -------------------------------------------------------------------------------------------

class _Payload:
    """Unpickling this calls open(target, "w"): a file appears if the loader runs code."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


def _write_torch(path, target):
    torch.save({"format": "mcmi_lab/1", "model": {"w": torch.ones(2)}, "extra": _Payload(target)}, path)


def _write_pickle(protocol):
    def write(path, target):
        with open(path, "wb") as f:
            pickle.dump({"model": _Payload(target)}, f, protocol=protocol)
    return write


def _write_through_save_checkpoint(path, target):
    save_checkpoint(path, model=tiny_cnn(), history=[_Payload(target)])


@pytest.mark.parametrize("write", [_write_torch, _write_pickle(2), _write_pickle(pickle.HIGHEST_PROTOCOL),
                                   _write_through_save_checkpoint],
                         ids=["torch.save", "pickle-2", "pickle-highest", "save_checkpoint"])
def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path, write):
    ckpt, target = tmp_path / "evil.pt", tmp_path / "pwned"
    write(ckpt, target)
    with pytest.raises(UnsafeCheckpointError, match=r"'.*evil\.pt' was refused: it is not plain data .*would run code"):
        load_checkpoint(ckpt)
    with pytest.raises(UnsafeCheckpointError):
        load_model(ckpt)
    assert not target.exists()
    # the payload is live: an unsafe loader does create the file
    with open(ckpt, "rb") as f:
        torch.load(f, weights_only=False) if f.read(2) == b"PK" and not f.seek(0) else pickle.load(f)
    assert target.exists()


def test_unsafe_refusal_names_the_global(tmp_path):
    _write_torch(tmp_path / "evil.pt", tmp_path / "pwned")
    with pytest.raises(UnsafeCheckpointError, match=r"\(Unsupported global: GLOBAL io\.open\)$"):
        load_checkpoint(tmp_path / "evil.pt")


def test_an_os_system_pickle_is_refused_without_advice_to_load_it_anyway(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))
    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(UnsafeCheckpointError) as err:
        load_checkpoint(tmp_path / "evil.pt")
    assert re.search(r"would run code \(unsupported GLOBAL (posix|os|nt)\.system\)$", str(err.value)), str(err.value)
    assert "weights_only" not in str(err.value) and not (tmp_path / "pwned").exists()


def test_disk_full_is_said_plainly_and_leaves_no_temp_file(tmp_path):
    import errno

    from mcmi_lab.utils import atomic_write, disk_full

    def full(handle):
        handle.write(b"x" * 10)
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(OSError, match=r"disk full: .*out\.bin could not be written \(free space on its file system: "):
        atomic_write(tmp_path / "out.bin", full)
    assert list(tmp_path.iterdir()) == []
    assert disk_full(RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos"), "/nonexistent") is False
    assert disk_full(RuntimeError("... file write failed: No space left on device"), tmp_path)
    assert not disk_full(RuntimeError("[enforce fail at inline_container.cc] write failed"), tmp_path)  # space left


@pytest.mark.parametrize("content", [b"", b"hello, not a checkpoint", b"# my notes\n", b"xyz", "half"])
def test_damaged_file_is_one_value_error(tmp_path, content):
    path = tmp_path / "bad.pt"
    if content == "half":
        save_checkpoint(path, x=torch.ones(100))
        content = path.read_bytes()[:200]
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"could not be read \(it is empty, truncated or not written by torch.save\)"):
        load_checkpoint(path)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")


@pytest.mark.parametrize("other, expected", [
    (lambda: build_model("cnn_tiny", 5, 1), r"shape mismatches \(2\): fc\.weight: \(10, 32\) vs model \(5, 32\), "
                                            r"fc\.bias: \(10,\) vs model \(5,\)"),
    (lambda: build_model("cnn_tiny", 10, 3), r"shape mismatches \(1\): stage1\.0\.weight: \(8, 1, 3, 3\) vs model "
                                             r"\(8, 3, 3, 3\)"),
    (lambda: build_model("resnet8", 10, 1), r"missing keys \(\d+\): conv1\.weight, bn1\.weight.*; unexpected keys "
                                            r"\(\d+\): stage1\.0\.weight"),
])
def test_checkpoint_of_another_model_names_keys_and_shapes(tmp_path, other, expected):
    save_model(tmp_path / "m.pt", build_model("cnn_tiny", 10, 1))
    state = load_checkpoint(tmp_path / "m.pt")
    with pytest.raises(ValueError, match=r"checkpoint does not fit this model \(\w+\): " + expected):
        load_state(other(), state["model"])


def test_load_model_with_a_spec_that_disagrees_names_the_shapes(tmp_path):
    save_model(tmp_path / "m.pt", build_model("cnn_tiny", 10, 1))
    state = load_checkpoint(tmp_path / "m.pt")
    state["spec"]["num_classes"] = 7  # a hand-edited or mixed-up file
    torch.save(state, tmp_path / "edited.pt")
    with pytest.raises(ValueError, match=r"edited\.pt' does not fit this model \(SmallCNN\): shape mismatches \(2\): "
                                         r"fc\.weight: \(10, 32\) vs model \(7, 32\)"):
        load_model(tmp_path / "edited.pt")
    torch.save({"model": state["model"]}, tmp_path / "bare.pt")
    with pytest.raises(ValueError, match="has no model spec"):
        load_model(tmp_path / "bare.pt")


def test_a_spec_claiming_millions_of_classes_is_refused_before_anything_is_allocated(tmp_path, monkeypatch):
    import mcmi_lab.training.checkpoint as ckpt

    save_model(tmp_path / "m.pt", build_model("cnn_tiny", 10, 1))
    state = load_checkpoint(tmp_path / "m.pt")
    state["spec"]["num_classes"] = 3_000_000  # a 377 MB classifier if it were built for real
    torch.save(state, tmp_path / "huge.pt")
    built_on = []
    real = ckpt.build_model
    monkeypatch.setattr(ckpt, "build_model", lambda *a, **k: built_on.append(torch.empty(0).device.type) or real(*a, **k))
    with pytest.raises(ValueError, match=r"huge\.pt' does not fit this model .*fc\.weight: \(10, 32\) vs model "
                                         r"\(3000000, 32\)"):
        load_model(tmp_path / "huge.pt")
    assert built_on == ["meta"]  # checked on the meta device; never built with memory
    torch.save({"spec": state["spec"], "weights": state["model"]}, tmp_path / "nomodel.pt")
    with pytest.raises(ValueError, match=r"nomodel\.pt' has no model spec and weights \(it holds spec, "
                                         r"weights\)"):
        load_model(tmp_path / "nomodel.pt")


def test_resume_from_another_architecture_names_keys(tmp_path):
    d = random_images(32, k=4)
    fit(build_model("cnn_tiny", 4, 1), d, epochs=1, checkpoint=tmp_path / "run.pt", **FAST)
    with pytest.raises(ValueError, match=r"run\.pt' does not fit this model \(SmallCNN\): shape mismatches \(\d+\): "
                                         r"stage1\.0\.weight: \(8, 1, 3, 3\) vs model \(16, 1, 3, 3\)"):
        fit(build_model("cnn_small", 4, 1), d, epochs=2, checkpoint=tmp_path / "run.pt", resume=True, **FAST)


PLAIN = (dict, OrderedDict, list, tuple, str, int, float, bool, type(None), torch.Tensor)


def _walk(obj, path="state"):
    assert type(obj) in PLAIN, f"{path}: {type(obj).__name__}"
    if isinstance(obj, dict):
        for k, v in obj.items():
            assert type(k) in (str, int), f"{path} key {k!r}"
            yield from _walk(v, f"{path}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _walk(v, f"{path}[{i}]")
    yield path, obj


def test_training_checkpoint_holds_only_plain_data(tmp_path):
    d = random_images(48, k=4)
    model = build_model("cnn_tiny", 4, 1)
    fit(model, d, mcmi_objective(0.1, update="ema"), epochs=2, checkpoint=tmp_path / "run.pt", eval_data=d, **FAST)
    path = tmp_path / "run.pt"
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == []
    state = load_checkpoint(path)
    found = dict(_walk(state))
    assert set(state) == {"format", "model", "spec", "optimizer", "objective", "epoch", "history", "config", "data", "rng"}
    assert state["epoch"] == 2 and state["spec"] == {"name": "cnn_tiny", "num_classes": 4, "in_channels": 1}
    assert state["objective"]["centroids"].shape == (4, 4)
    tensors = [v for v in found.values() if isinstance(v, torch.Tensor)]
    assert tensors and all(t.device.type == "cpu" for t in tensors)


# ---- nothing lost: SIGKILL mid-epoch, resume, same weights --------------------------------------------------------

KILL_SCRIPT = textwrap.dedent('''
    import sys, time
    from pathlib import Path
    import torch
    from mcmi_lab import from_tensors
    from mcmi_lab.training.checkpoint import save_model
    from mcmi_lab.models import build_model
    from mcmi_lab.training.loop import fit
    from mcmi_lab.training.objectives import MCMIObjective

    torch.set_num_threads(1)
    mode, ckpt, out, ready = sys.argv[1:5]
    DEVICE = sys.argv[5] if len(sys.argv) > 5 else "cpu"
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(160) % 4
    images = torch.randint(0, 80, (160, 1, 12, 12), generator=g, dtype=torch.uint8)
    for c in range(4):
        images[labels == c, :, 2 * c:2 * c + 3, 2:5] = 255
    data = from_tensors(images, labels, 4, pad=2, flip=True)


    class Noisy(MCMIObjective):
        """MCMI with EMA centroids, plus input noise from the global RNG (so its state must be resumed too)."""

        def on_epoch_start(self, model, data, epoch):
            super().on_epoch_start(model, data, epoch)
            self.epoch, self.step = epoch, 0

        def forward(self, model, images, labels, index=None):
            if mode == "hang" and self.epoch == 1 and self.step == 3:  # mid-epoch 2: wait to be killed
                Path(ready).touch()
                time.sleep(600)
            self.step += 1
            return super().forward(model, images + 0.1 * torch.randn_like(images), labels, index)


    torch.manual_seed(0)
    model = build_model("cnn_tiny", 4, 1, width=4)
    objective = Noisy(0.2, update="ema", ema_decay=0.9)
    hist = fit(model, data, objective, epochs=3, batch_size=16, lr=0.05, schedule="cosine", precision="fp32",
               device=DEVICE, progress="off", log=False, checkpoint=None if mode == "ref" else ckpt,
               resume=mode == "resume")
    save_model(out, model, centroids=objective.centroids,
               history=[{k: v for k, v in r.items() if k != "time"} for r in hist])
''')


KILL_DEVICE = "cpu"  # the device of the killed, resumed and reference runs (a GPU check sets "cuda")


def _start(script, *args):
    env = dict(os.environ, PYTHONHASHSEED="0")
    return subprocess.Popen([sys.executable, str(script), *map(str, args), KILL_DEVICE], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc, timeout=600):  # a hang guard only: a busy 2-core machine may take minutes
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out


def test_sigkill_mid_epoch_then_resume_gives_identical_weights(tmp_path):
    script = tmp_path / "train_run.py"
    script.write_text(KILL_SCRIPT)
    ckpt, ready = tmp_path / "run" / "ckpt.pt", tmp_path / "ready"
    reference = _start(script, "ref", ckpt, tmp_path / "ref.pt", ready)
    victim = _start(script, "hang", ckpt, tmp_path / "unused.pt", ready)
    deadline = time.monotonic() + 600  # a hang guard, not a speed check (pytest-timeout stops the test at 900 s)
    while not ready.exists():
        assert victim.poll() is None, victim.communicate()[0]
        assert time.monotonic() < deadline, "the training subprocess never reached epoch 2"
        time.sleep(0.1)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(timeout=60)
    assert victim.returncode == -signal.SIGKILL

    state = load_checkpoint(ckpt)  # the kill left a loadable checkpoint of the last finished epoch
    assert state["epoch"] == 1 and len(state["history"]) == 1
    # as if a kill had also hit a checkpoint write: its temp file must not survive the resume
    (ckpt.parent / f".{ckpt.name}.killed.tmp").write_bytes(b"half a checkpoint")
    _finish(_start(script, "resume", ckpt, tmp_path / "resumed.pt", ready))
    _finish(reference)

    ref, resumed = load_checkpoint(tmp_path / "ref.pt"), load_checkpoint(tmp_path / "resumed.pt")
    assert ref["model"].keys() == resumed["model"].keys()
    for name in ref["model"]:
        assert torch.equal(ref["model"][name], resumed["model"][name]), name
    assert torch.equal(ref["centroids"], resumed["centroids"])
    assert ref["history"] == resumed["history"] and len(ref["history"]) == 3
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["ckpt.pt"]  # no temp files left
    assert load_checkpoint(ckpt)["epoch"] == 3


# ---- bad input: one clear line naming the parameter, the value and what is accepted ----------------------------

@pytest.mark.parametrize("make, match", [
    (lambda: build_model("resnet9", 10), r"name='resnet9' is not accepted: expected one of .*cnn_tiny"),
    (lambda: build_model("cnn_tiny", 0), r"num_classes=0 is not accepted: expected an integer >= 1"),
    (lambda: build_model("resnet8", 10, depth=3), r"depth=3 is not accepted for model 'resnet8'"),
    (lambda: kd_objective(tiny_cnn(), temperature=-1.0), r"temperature=-1.0 is not accepted: .*\(0, inf\)"),
    (lambda: kd_objective(tiny_cnn(), temperature=NAN), r"temperature=nan is not accepted"),
    (lambda: kd_objective(tiny_cnn(), temperature=INF), r"temperature=inf is not accepted"),
    (lambda: kd_objective(tiny_cnn(), kd_weight=-0.5), r"kd_weight=-0.5 is not accepted: .*\[0, inf\)"),
    (lambda: kd_objective(tiny_cnn(), ce_weight=NAN), r"ce_weight=nan is not accepted"),
    (lambda: mcmi_objective(0.1, ema_decay=1.0), r"ema_decay=1.0 is not accepted: .*\[0, 1\)"),
    (lambda: mll_objective(label_smoothing=1.0), r"label_smoothing=1.0 is not accepted: .*\[0, 1\)"),
    (lambda: mll_objective(label_smoothing=-0.1), r"label_smoothing=-0.1 is not accepted"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_bad_arguments_of_builders_and_objectives(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("kwargs, match", [
    (dict(epochs=-1), r"epochs=-1 is not accepted: expected an integer >= 1"),
    (dict(epochs=2.5), r"epochs=2.5 is not accepted"),
    (dict(momentum=1.0), r"momentum=1.0 is not accepted: .*\[0, 1\)"),
    (dict(weight_decay=-1e-4), r"weight_decay=-0.0001 is not accepted"),
    (dict(lr=NAN), r"lr=nan is not accepted"),
    (dict(lr="0.1"), r"lr='0.1' is not accepted: expected a finite number"),  # a string, even one that parses
    (dict(check_every=0), r"check_every=0 is not accepted"),
    (dict(eval_every=0), r"eval_every=0 is not accepted"),
    (dict(seed=-1), r"seed=-1 is not accepted"),
    (dict(progress="loud"), r"progress='loud' is not accepted: expected one of 'auto', 'bar', 'off'"),
])
def test_bad_train_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fit(tiny_cnn(num_classes=4), random_images(16, k=4), **{**FAST, **kwargs})


@pytest.mark.parametrize("call", ["measure_cmi", "evaluate"])
@pytest.mark.parametrize("temperature", [0.0, -1.0, NAN, INF])
def test_bad_measurement_temperature(call, temperature):
    fn = {"measure_cmi": measure_cmi, "evaluate": evaluate}[call]
    with pytest.raises(ValueError, match=rf"temperature={temperature!r} is not accepted: expected a finite number"):
        fn(tiny_cnn(num_classes=4), random_images(8, k=4), temperature=temperature)


@pytest.mark.parametrize("call", [
    lambda d: stratified_split(d, 0.0), lambda d: stratified_split(d, 1.5), lambda d: few_shot(d, INF),
    lambda d: few_shot(d, "half"), lambda d: few_shot(d, "0.5")],
    ids=["split-0", "split-1.5", "few_shot-inf", "few_shot-str", "few_shot-numeric-str"])
def test_bad_fraction(call):
    with pytest.raises(ValueError, match=r"fraction=.* is not accepted: expected a finite number in \(0, 1\]"):
        call(random_images(16, k=4))


@pytest.mark.parametrize("classes, match", [
    ([-1], r"omitted class -1 is not accepted: expected a class index in \[0, 3\]"),
    ([4], r"omitted class 4 is not accepted"),
    (["c9"], r"omitted class 'c9' is not accepted: .* names \['c0', 'c1', 'c2', 'c3'\]"),
    ([True], r"omitted class True is not accepted"),
    (["c0", 1, "c2", 3], r"omitting classes \[0, 1, 2, 3\] is not accepted: at least one of the 4 classes must remain"),
])
def test_bad_omitted_classes(classes, match):
    with pytest.raises(ValueError, match=match):
        omit_classes(random_images(16, k=4), classes)


@pytest.mark.parametrize("n", [0, 17])
def test_bad_subset_size(n):
    with pytest.raises(ValueError, match=rf"n={n} is not accepted: expected an integer in \[1, 16\]"):
        subset(random_images(16, k=4), n)


def test_empty_class_is_refused_by_the_mcmi_recipe_and_accepted_by_kd():
    d = omit_classes(random_images(32, k=4), [2])
    with pytest.raises(ValueError, match=r"data with empty classes \[2\] is not accepted for MCMI training"):
        finetune_mcmi(tiny_cnn(num_classes=4), d, 0.1, epochs=1, **FAST)
    fit(tiny_cnn(num_classes=4, width=4), d, kd_objective(tiny_cnn(num_classes=4)), epochs=1, **FAST)  # zero-shot


@pytest.mark.parametrize("call", [predict, evaluate, measure_cmi])
def test_wrong_channels_for_measurement(call):
    with pytest.raises(ValueError, match=r"images with 3 channel\(s\) \(custom\) are not accepted by this model: its "
                                         r"first convolution expects 1; build it with in_channels=3"):
        call(tiny_cnn(in_channels=1, num_classes=4), random_images(8, k=4, c=3))


def test_wrong_channels_for_the_teacher():
    teacher = build_model("cnn_tiny", 4, 3)
    with pytest.raises(ValueError, match=r"not accepted by the teacher: its first convolution expects 3"):
        fit(build_model("cnn_tiny", 4, 1), random_images(16, k=4), kd_objective(teacher), epochs=1, **FAST)


def test_nan_image_stops_at_its_step_naming_the_term():
    d = random_images(64, k=4)
    images = d.images.float() / 255
    images[37, 0, 5, 5] = NAN
    d = from_tensors(images, d.labels, 4, mean=(0.3,), std=(0.3,))
    order = [b[2] for b in batches(d, 16, shuffle=True, seed=0, epoch=0, index=True)]
    step = next(i for i, idx in enumerate(order) if 37 in idx.tolist()) + 1
    with pytest.raises(StopTraining, match=rf"non-finite ce at epoch 1, step {step}: training stopped"):
        fit(tiny_cnn(num_classes=4), d, epochs=1, augment=False, **FAST)


def test_non_finite_teacher_names_the_kd_term():
    class FlakyTeacher(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net, self.calls = tiny_cnn(num_classes=4), 0

        def forward(self, x):
            self.calls += 1
            out = self.net(x)
            return out * INF if self.calls == 2 else out
    with pytest.raises(StopTraining, match=r"non-finite kd at epoch 1, step 2"):
        fit(tiny_cnn(num_classes=4), random_images(64, k=4), kd_objective(FlakyTeacher()), epochs=1, **FAST)


def test_resume_without_a_checkpoint_starts_fresh(tmp_path):
    hist = fit(tiny_cnn(num_classes=4), random_images(32, k=4), epochs=1, checkpoint=tmp_path / "new.pt",
               resume=True, **FAST)
    assert [r["epoch"] for r in hist] == [1] and load_checkpoint(tmp_path / "new.pt")["epoch"] == 1
    assert not math.isnan(hist[0]["loss"])


@pytest.mark.parametrize("change, match", [
    (dict(lr=0.1), r"other settings \(lr 0.05 -> 0.1\)"),
    (dict(epochs=1), r"other settings \(epochs 2 -> 1\)"),
    (dict(seed=3), r"other settings \(seed 0 -> 3\)"),
    (dict(batch_size=8), r"other settings \(batch_size 16 -> 8\)"),
    (dict(data=1), r"trained on other data \(n 32 -> 24"),  # a smaller subset
    (dict(data=2), r"trained on other data \(labels"),  # the same size, other labels
])
def test_resume_refuses_another_run(tmp_path, change, match):
    """A resume continues the run its checkpoint holds, or is refused in one line naming what differs."""
    data = random_images(32, k=4)
    kw = dict(epochs=2, lr=0.05, seed=0, **FAST)
    fit(tiny_cnn(num_classes=4), data, checkpoint=tmp_path / "run.pt", **kw)
    other = {1: subset(data, 24, seed=0), 2: from_tensors(data.images, (data.labels + 1) % 4)}.get(change.pop("data", 0),
                                                                                                 data)
    with pytest.raises(ValueError, match=r"resume from .*run.pt' is not accepted: .*" + match):
        fit(tiny_cnn(num_classes=4), other, checkpoint=tmp_path / "run.pt", resume=True, **{**kw, **change})
    # the same settings and data resume (here: nothing left to train), whatever the RESUME_FREE fields say
    hist = fit(tiny_cnn(num_classes=4), data, checkpoint=tmp_path / "run.pt", resume=True, **{**kw, "name": "again"})
    assert [r["epoch"] for r in hist] == [1, 2]
    # with a constant learning rate more epochs extend the same run (the schedule does not depend on the count)
    fit(tiny_cnn(num_classes=4), data, checkpoint=tmp_path / "flat.pt", **{**kw, "schedule": "constant"})
    more = fit(tiny_cnn(num_classes=4), data, checkpoint=tmp_path / "flat.pt", resume=True,
               **{**kw, "schedule": "constant", "epochs": 3})
    assert [r["epoch"] for r in more] == [1, 2, 3]


def test_resume_from_a_checkpoint_that_is_not_a_training_run(tmp_path):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"other.pt' cannot be resumed: it lacks model, optimizer, .* \(it holds "
                                         r"weights\); resume needs a checkpoint written by fit"):
        fit(tiny_cnn(num_classes=4), random_images(16, k=4), epochs=1, checkpoint=tmp_path / "other.pt",
            resume=True, **FAST)


# ---- bad input on the command line (mcmi_lab.cli.train) -----------------------------------------------------------

@pytest.mark.parametrize("argv, match", [
    (["--epochs", "0"], r"argument --epochs: --epochs=0 is not accepted: expected an integer >= 1"),
    (["--epochs", "two"], r"--epochs='two' is not accepted: expected an integer >= 1"),
    (["--lam", "-0.5"], r"--lam=-0.5 is not accepted: expected a finite number in \[0, inf\)"),
    (["--lam", "nan"], r"--lam=nan is not accepted"),
    (["--lam", "inf"], r"--lam=inf is not accepted"),
    (["--temperature", "0"], r"--temperature=0.0 is not accepted: expected a finite number in \(0, inf\)"),
    (["--fraction", "0"], r"--fraction=0.0 is not accepted: expected a finite number in \(0, 1\]"),
    (["--fraction", "1.5"], r"--fraction=1.5 is not accepted"),
    (["--lr", "-1"], r"--lr=-1.0 is not accepted"),
    (["--objective", "focal"], r"argument --objective: invalid choice: 'focal'"),
    (["--data", "mnist2"], r"argument --data: invalid choice: 'mnist2'"),
    (["--model", "resnet9"], r"argument --model: invalid choice: 'resnet9'"),
    (["--update", "sometimes"], r"argument --update: invalid choice: 'sometimes'"),
    (["--refresh-steps", "0"], r"--refresh-steps=0 is not accepted: expected an integer >= 1"),
    (["--compile", "fast"], r"argument --compile: invalid choice: 'fast'"),
    (["--nproc", "0"], r"--nproc=0 is not accepted: expected an integer >= 1"),
    (["--master-port", "70000"], r"--master-port=70000 is not accepted: expected an integer in \[1, 65535\]"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_launch_rejects_bad_values(argv, match, tmp_path, capsys, monkeypatch):
    from mcmi_lab.cli import train as launch

    # an argument that has become valid must fail here, not train a 40-epoch teacher inside the suite
    monkeypatch.setattr(launch, "_load_data", lambda *a, **k: pytest.fail(f"{argv} was accepted: training began"))
    with pytest.raises(SystemExit) as exit_:
        launch.main(["train", "--out", str(tmp_path), *argv])
    assert exit_.value.code == 2
    assert len(re.findall(match, capsys.readouterr().err)) == 1


@pytest.mark.parametrize("argv, match", [
    (["--objective", "mcmi"], r"--objective mcmi needs --teacher PATH"),
    (["--objective", "kd"], r"--objective kd needs --teacher PATH"),
    (["--lam", "0.5"], r"--lam is not accepted with --objective mll: it weighs the CMI term of --objective mcmi, "
                       r"cmim, ncmi"),
    (["--objective", "cmim", "--target-cmi", "0.1"], r"--target-cmi is not accepted with --objective cmim"),
    (["--objective", "mcmi", "--teacher", "missing.pt"], r"--teacher 'missing.pt' does not exist"),
    (["--temperature", "2"], r"--method and --temperature are not accepted with --objective mll: they configure "
                             r"--objective kd"),
    (["--refresh-steps", "50"], r"--refresh-steps is not accepted with --objective mll --update running"),
    (["--nnodes", "2"], r"--nnodes 2 needs --master-addr"),
    (["--nnodes", "2", "--node-rank", "2", "--master-addr", "h"], r"--node-rank=2 is not accepted: expected an "
                                                                  r"integer in \[0, 1\]"),
    (["--omit", "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "--data", "synthetic", "--subset", "20",
      "--no-eval"], r"omitting classes \[0, 1, 2, 3, 4, 5, 6, 7, 8, 9\] is not accepted"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_launch_rejects_bad_combinations(argv, match, tmp_path, capsys, monkeypatch):
    from mcmi_lab.cli import train as launch

    if "--omit" not in argv:  # the omitted-classes check needs the data; the others must stop before it
        monkeypatch.setattr(launch, "_load_data", lambda *a, **k: pytest.fail(f"{argv} was accepted: training began"))
    monkeypatch.chdir(tmp_path)
    assert launch.main(["train", "--out", str(tmp_path / "run"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m mcmi_lab.cli.train train: error: ") and len(err.strip().splitlines()) == 1
    assert re.search(match, err), err


@pytest.mark.parametrize("case, code, match", [
    ("device bogus", 2, r"error: device='bogus' is not accepted: expected cpu, cuda, cuda:<index> or mps"),
    ("device cuda:7", 2, r"error: device='cuda:7' is not available: this machine has \d+ CUDA device"),
    ("out is a file", 2, r"error: --out '.*/run' is a file: expected a folder"),  # before any training
    ("non-finite", 1, r"training stopped: non-finite ce at epoch 1, step \d+: training stopped"),
    ("hparam", 2, r"--hparam beta 2 is not accepted for --method kd: expected one of kd_weight, ce_weight"),
])
def test_launch_failures_are_one_line(case, code, match, tmp_path, capsys):
    """Errors a user meets through `mcmi-lab train` end in one line and an exit status, never a traceback."""
    from mcmi_lab.cli import train as launch

    base = ["train", "--data", "synthetic", "--subset", "40", "--epochs", "1", "--no-eval", "--batch-size", "8"]
    out = tmp_path / "run"
    if case == "out is a file":
        out.write_text("not a folder")
    argv = {"device bogus": ["--device", "bogus"], "device cuda:7": ["--device", "cuda:7"]}.get(case, [])
    if case in ("non-finite", "hparam"):
        save_model(tmp_path / "t.pt", build_model("cnn_tiny", 10, 1))
        argv = (["--objective", "mcmi", "--lam", "1e30", "--lr", "1e30"] if case == "non-finite"
                else ["--objective", "kd", "--hparam", "beta", "2"]) + ["--teacher", str(tmp_path / "t.pt")]
    assert launch.main(base + argv + ["--out", str(out)]) == code
    raw = capsys.readouterr().err
    err = raw.strip().splitlines()
    assert len(err) == 1 and re.search(match, err[0]), err
    assert "Traceback" not in "\n".join(err) and "\r" not in raw  # no progress bar, however slow a step was


def test_train_with_stderr_to_a_pipe_ends_in_the_one_line_error(tmp_path):
    """`mcmi-lab train … 2> log`: no tqdm bar in a pipe (not even its first, 0% one, drawn before any step, so
    this holds however fast the machine is), and the error is the log's last line. ipykernel is imported first, as
    the test suite has it: that alone once turned the bars on."""
    save_model(tmp_path / "t.pt", build_model("cnn_tiny", 10, 1))
    argv = ["train", "--data", "synthetic", "--subset", "40", "--epochs", "1", "--no-eval", "--batch-size", "8",
            "--objective", "mcmi", "--lam", "1e30", "--lr", "1e30", "--teacher", str(tmp_path / "t.pt"),
            "--out", str(tmp_path / "run")]
    code = f"import sys, ipykernel.iostream; from mcmi_lab.cli.commands import main; sys.exit(main({argv!r}))"
    proc = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert proc.returncode == 1, proc.stderr
    assert "\r" not in proc.stderr and "%|" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert re.search(r"training stopped: non-finite ce at epoch 1, step \d+", last), proc.stderr


def test_report_on_corrupt_or_misshapen_results_names_the_file(tmp_path):
    out = tmp_path / "run"
    (out / "seed_0" / "results").mkdir(parents=True)
    bad = out / "seed_0" / "results" / "01_teachers.json"
    bad.write_text('{"teachers": [1,')
    from mcmi_lab.report.build import build_report
    with pytest.raises(ValueError, match=r"results file '.*01_teachers.json' is not valid JSON"):
        build_report(out)
    bad.write_text('{"teachers": 5}')
    with pytest.raises(ValueError, match=r"01_teachers.json': 'teachers' is not accepted: expected a list of row "
                                         r"objects, got int"):
        build_report(out)
    bad.write_text('[1, 2]')
    with pytest.raises(ValueError, match=r"01_teachers.json' holds a list: expected a JSON object"):
        build_report(out)


def test_launch_refuses_to_overwrite_a_run_without_resume(tmp_path, capsys):
    from mcmi_lab.cli import train as launch

    save_checkpoint(tmp_path / "checkpoint.pt", epoch=1)
    assert launch.main(["train", "--out", str(tmp_path)]) == 2
    assert "already holds checkpoint.pt: pass --resume to continue it" in capsys.readouterr().err


def test_launch_teacher_with_other_classes(tmp_path, capsys):
    from mcmi_lab.cli import train as launch

    save_model(tmp_path / "t.pt", build_model("cnn_tiny", 3, 1))
    argv = ["train", "--objective", "kd", "--teacher", str(tmp_path / "t.pt"), "--data", "synthetic", "--subset", "20",
            "--no-eval", "--out", str(tmp_path / "run")]
    assert launch.main(argv) == 2
    assert "has 3 classes: expected 10, the classes of --data synthetic" in capsys.readouterr().err


def test_atomic_writes_get_the_usual_file_mode(tmp_path):
    import os
    from mcmi_lab.utils import write_json
    mask = os.umask(0o022)
    try:
        path = write_json(tmp_path / "results.json", {"a": 1})
    finally:
        os.umask(mask)
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o644)  # readable by others, as open() would make it


# ---- user tensors: what from_tensors and fit refuse ----------------------------------------------------------------

@pytest.mark.parametrize("images, labels, kwargs, match", [
    (torch.rand(10, 28, 28, 1), torch.arange(10) % 2, {},
     r"images of shape \(10, 28, 28, 1\) are not accepted: they look like \(N, H, W, C\) with 1 channel\(s\); "
     r"expected \(N, C, H, W\): pass images.permute\(0, 3, 1, 2\)"),
    (torch.rand(10, 1, 8, 8), torch.full((10,), 0.5), {},
     r"labels such as 0.5 are not accepted: expected integer class indices"),
    (torch.rand(10, 1, 8, 8) * 255, torch.arange(10) % 2, {},
     r"float images in \[\d.*, 2\d\d.*\] are not accepted: expected values in \[0, 1\] \(divide 0..255 images by 255"),
    (torch.rand(0, 1, 8, 8), torch.zeros(0, dtype=torch.long), {},
     r"an empty set of images is not accepted: expected at least one image"),
    (torch.rand(10, 1, 8, 8), torch.arange(10) % 3, {"classes": ["a", "b"]},
     r"labels in \[0, 2\] are not accepted: expected class indices in \[0, 1\] for 2 classes"),
    (torch.randint(0, 9, (10, 1, 8, 8), dtype=torch.int32), torch.arange(10) % 2, {},
     r"images of dtype torch.int32 are not accepted: expected uint8 \(0..255\) or float in \[0, 1\]"),
    (torch.rand(10, 1, 8, 8), torch.arange(9) % 2, {},
     r"labels of shape \(9,\) are not accepted: expected a 1-D tensor of 10 class indices"),
], ids=["nhwc", "fractional-labels", "float-0-255", "empty", "labels-outside-classes", "int32", "length"])
def test_from_tensors_refuses_silently_wrong_input(images, labels, kwargs, match):
    with pytest.raises(ValueError, match=match):
        from_tensors(images, labels, **kwargs)


def test_from_tensors_keeps_what_is_right():
    d = from_tensors(torch.rand(6, 3, 8, 8), torch.tensor([0.0, 1.0, 2.0, 0.0, 1.0, 2.0]))  # integral floats: fine
    assert d.labels.dtype == torch.long and d.num_classes == 3 and d.in_channels == 3
    nan = torch.rand(4, 1, 8, 8)
    nan[0, 0, 0, 0] = NAN  # a NaN is the training guard's to name (test_nan_image_stops_at_its_step_naming_the_term)
    assert len(from_tensors(nan, torch.arange(4) % 2)) == 4
    assert len(from_tensors(torch.randn(4, 1, 8, 8) * 9, torch.arange(4) % 2, unit_range=False)) == 4


@pytest.mark.parametrize("outputs", [2, 10])
def test_a_model_whose_outputs_differ_from_the_classes_is_refused(outputs):
    data = random_images(32, k=4)
    with pytest.raises(ValueError, match=rf"data with 4 classes \(custom\) is not accepted by this model: it has "
                                         rf"{outputs} outputs; build it with num_classes=4"):
        fit(build_model("cnn_tiny", outputs, 1), data, epochs=1, **FAST)
    with pytest.raises(ValueError, match=rf"it has {outputs} outputs"):
        fit(tiny_cnn(num_classes=outputs), data, epochs=1, **FAST)  # no spec: its last Linear layer
