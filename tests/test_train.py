import copy
import shutil

import pytest
import torch

from conftest import random_images, tiny_cnn
from mcmi_lab import subset
from mcmi_lab.training.evaluate import evaluate, measure_cmi, predict
from mcmi_lab.training.loop import TrainConfig, fit
from mcmi_lab.training.objectives import MCMIObjective, Objective, StopTraining, kd_objective, mcmi_objective, mll_objective

FAST = dict(progress="off", log=False, batch_size=16, precision="fp32")  # not "auto": the same test on every CPU


def test_fit_learns_and_reports_history():
    d = random_images(96, k=4)
    torch.manual_seed(0)
    model = tiny_cnn(num_classes=4)
    hist = fit(model, d, epochs=4, lr=0.05, schedule="cosine", eval_data=d, **FAST)
    assert [r["epoch"] for r in hist] == [1, 2, 3, 4]
    assert {"loss", "ce", "train_acc", "lr", "time", "eval_acc", "eval_cmi"} <= set(hist[-1])
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert hist[0]["lr"] == 0.05 and hist[-1]["lr"] < 0.05
    assert evaluate(model, d)["accuracy"] > 0.5
    assert not model.training


def test_schedules():
    cfg = TrainConfig(epochs=240)
    assert [cfg.lr_at(e) for e in (0, 149, 150, 180, 210)] == pytest.approx([0.05, 0.05, 0.005, 0.0005, 0.00005])
    cos = TrainConfig(epochs=20, schedule="cosine")
    assert cos.lr_at(0) == 0.05 and cos.lr_at(10) == pytest.approx(0.025)


def _run(d, epochs, checkpoint=None, resume=False, callbacks=(), objective=None, precision="fp32"):
    torch.manual_seed(1)
    model = tiny_cnn(num_classes=4)
    hist = fit(model, d, objective or mll_objective(), epochs=epochs, checkpoint=checkpoint, resume=resume,
               callbacks=callbacks, **{**FAST, "precision": precision})
    return model, hist


OBJECTIVES = {"mll": lambda: mll_objective(), "mcmi_ema": lambda: mcmi_objective(0.2, update="ema", ema_decay=0.9),
              "mcmi_running": lambda: mcmi_objective(0.2, update="running", refresh_steps=2),
              # 5 steps per epoch, the controller every 3: its count runs across the epochs and through the resume
              "mcmi_target": lambda: mcmi_objective(target_cmi=0.1, control_steps=3)}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_resume_equals_uninterrupted(tmp_path, objective, precision):
    """Bit for bit in either precision: the resumed run repeats the same operations on the same values."""
    d = random_images(80, k=4)
    make = OBJECTIVES[objective]
    ref_model, ref_hist = _run(d, 3, objective=make(), precision=precision)

    class Interrupt(Exception):
        pass

    def stop_after_two(record, model):
        if record["epoch"] == 2:
            raise Interrupt
    ckpt = tmp_path / "run.pt"
    with pytest.raises(Interrupt):
        _run(d, 3, ckpt, callbacks=[stop_after_two], objective=make(), precision=precision)
    model, hist = _run(d, 3, ckpt, resume=True, objective=make(), precision=precision)
    for a, b in zip(ref_model.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
    strip = lambda h: [{k: v for k, v in r.items() if k != "time"} for r in h]
    assert strip(hist) == strip(ref_hist)


def test_kd_teacher_frozen_in_eval_mode():
    d = random_images(64, k=4)
    torch.manual_seed(0)
    teacher = tiny_cnn(num_classes=4)
    fit(teacher, d, epochs=1, **FAST)
    before = copy.deepcopy(teacher.state_dict())
    student = tiny_cnn(num_classes=4, width=4)
    objective = kd_objective(teacher)
    fit(student, d, objective, epochs=2, **FAST)
    objective.train()
    assert not teacher.training
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k  # BatchNorm running statistics did not move
    assert "teacher" not in dict(objective.named_modules()) and not list(objective.state_dict())


def test_mcmi_finetune_raises_train_cmi_over_control(fashion_train):
    d = subset(fashion_train, 3000, seed=0)
    torch.manual_seed(0)
    teacher = tiny_cnn(num_classes=10, width=8)
    fit(teacher, d, epochs=3, batch_size=64, progress="off", log=False, schedule="cosine")
    cmis = {}
    for lam in (0.0, 0.5):
        model = copy.deepcopy(teacher)
        fit(model, d, mcmi_objective(lam), epochs=2, lr=0.01, schedule="cosine", batch_size=64,
            progress="off", log=False)
        cmis[lam] = measure_cmi(model, d)["cmi"].item()
    assert cmis[0.5] > cmis[0.0], cmis


def test_centroid_updates():
    d = random_images(64, k=4)
    torch.manual_seed(0)
    model = tiny_cnn(num_classes=4)
    start = measure_cmi(model, d)["centroids"]
    frozen = mcmi_objective(0.1, update="frozen")
    fit(copy.deepcopy(model), d, frozen, epochs=2, **FAST)
    assert torch.allclose(frozen.centroids, start.to(frozen.centroids))  # the reference: one pass, then fixed
    ema = mcmi_objective(0.1, update="ema", ema_decay=0.5)
    fit(copy.deepcopy(model), d, ema, epochs=1, **FAST)
    assert not torch.allclose(ema.centroids, start.to(ema.centroids))
    assert torch.allclose(ema.centroids.sum(1), torch.ones(4, dtype=torch.float64))
    trained = copy.deepcopy(model)
    per_epoch = mcmi_objective(0.1, update="epoch")
    fit(trained, d, per_epoch, epochs=2, **FAST)
    assert not torch.allclose(per_epoch.centroids, start.to(per_epoch.centroids))


@pytest.mark.parametrize("refresh_steps", [None, 2, 4])
def test_running_centroids_are_the_class_means_of_the_training_outputs_since_the_last_refresh(refresh_steps):
    d = random_images(90, k=3)  # 90 / 16: 6 steps, a short last batch
    torch.manual_seed(0)
    model = tiny_cnn(num_classes=3)
    start = measure_cmi(model, d)["centroids"]
    seen = []
    model.register_forward_hook(lambda module, args, out: seen.append(out.detach().float()) if module.training else None)

    class Recording(MCMIObjective):
        def forward(self, model, images, labels, index=None):
            seen_labels.append(labels.clone())
            return super().forward(model, images, labels, index)

    # the block the last refresh saw: the whole epoch, steps 5-6 (refresh at 2, 4, 6) or steps 5-6 (at 4, end)
    last_block = {None: 0, 2: 4, 4: 4}[refresh_steps]
    for epoch in range(2):
        seen_labels, seen[:] = [], []
        running = Recording(0.3, update="running", refresh_steps=refresh_steps)
        if epoch:  # the second epoch starts from the first one's centroids
            running.centroids = first.clone()
        fit(model, d, running, epochs=1, **FAST)
        assert sum(map(len, seen_labels)) == 90 and running._steps == 0 and not running._counts.any()
        logits, labels = torch.cat(seen[last_block:]), torch.cat(seen_labels[last_block:])
        expected = torch.stack([torch.stack([p.double() for p, y in zip(logits.softmax(1), labels) if y == c]).mean(0)
                                for c in range(3)])  # brute force, sample by sample
        assert torch.allclose(running.centroids, expected, rtol=0, atol=1e-12)
        assert not torch.allclose(running.centroids, start.to(running.centroids), atol=1e-3)
        first = running.centroids.clone()


def test_collapse_guard_names_lambda():
    d = random_images(256, k=4)
    torch.manual_seed(0)
    model = tiny_cnn(num_classes=4)
    fit(model, d, epochs=3, **FAST)
    with pytest.raises(StopTraining, match=r"collapsed with lam=50"):
        fit(model, d, mcmi_objective(50.0, update="frozen"), epochs=5, lr=0.5, check_every=2, **FAST)


def test_non_finite_loss_names_step_and_term():
    class Broken(Objective):
        def forward(self, model, images, labels, index=None):
            logits = model(images)
            loss = torch.nn.functional.cross_entropy(logits, labels)
            step_bad = torch.tensor(float("nan")) if index.min() >= 0 and Broken.calls == 2 else torch.tensor(0.0)
            Broken.calls += 1
            return loss + step_bad, {"ce": loss.detach(), "bad": step_bad}
    Broken.calls = 0
    d = random_images(64, k=4)
    with pytest.raises(StopTraining, match=r"non-finite (loss|bad) at epoch 1, step 3"):
        fit(tiny_cnn(num_classes=4), d, Broken(), epochs=1, **FAST)


def test_bad_input_is_one_clear_line():
    d = random_images(32, k=4)
    for kwargs, name in [(dict(epochs=0), "epochs"), (dict(lr=-1.0), "lr"), (dict(schedule="linear"), "schedule"),
                         (dict(precision="fp8"), "precision"), (dict(batch_size=0), "batch_size")]:
        with pytest.raises(ValueError, match=name):
            fit(tiny_cnn(num_classes=4), d, **{**FAST, **kwargs})
    for lam in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="lam="):
            mcmi_objective(lam)
    with pytest.raises(ValueError, match="update="):
        mcmi_objective(0.1, update="sometimes")
    with pytest.raises(ValueError, match=r"refresh_steps=0 is not accepted: expected an integer >= 1"):
        mcmi_objective(0.1, update="running", refresh_steps=0)
    with pytest.raises(ValueError, match=r"refresh_steps=5 is not accepted with update='frozen'"):
        mcmi_objective(0.1, update="frozen", refresh_steps=5)
    with pytest.raises(ValueError, match="temperature="):
        kd_objective(tiny_cnn(), temperature=0)
    with pytest.raises(ValueError, match=r"3 channel\(s\).*in_channels=3"):
        fit(tiny_cnn(in_channels=1, num_classes=4), random_images(32, k=4, c=3), **FAST)
    from mcmi_lab import omit_classes
    with pytest.raises(ValueError, match=r"empty classes \[1\]"):
        fit(tiny_cnn(num_classes=4), omit_classes(d, [1]), mcmi_objective(0.1), **FAST)


def test_predict_restores_mode_and_is_exact():
    d = random_images(50, k=4)
    model = tiny_cnn(num_classes=4).train()
    logits, labels = predict(model, d, batch_size=7)
    assert model.training and logits.shape == (50, 4) and torch.equal(labels, d.labels)
    model.eval()
    with torch.no_grad():
        ref = model(d.normalize(d.images))
    assert torch.allclose(logits, ref, atol=1e-5)


def test_teacher_selection_never_reads_test_labels():
    """Poisoned test labels (reported through eval_data) leave the trained and fine-tuned teachers unchanged:
    the teacher is the last epoch's weights, never the best-test-accuracy checkpoint."""
    import dataclasses
    from mcmi_lab.study.recipes import finetune_mcmi, train_teacher
    train, test = random_images(96, k=4, seed=0), random_images(48, k=4, seed=1)
    poisoned = dataclasses.replace(test, labels=(test.labels + 1) % 4)
    teachers = []
    for eval_data in (test, poisoned):
        torch.manual_seed(0)
        t, hist = train_teacher(train, tiny_cnn(num_classes=4), epochs=6, eval_data=eval_data, schedule="cosine", **FAST)
        m, _ = finetune_mcmi(t, train, 0.3, epochs=2, eval_data=eval_data, **FAST)
        teachers.append((t, m, hist))
    (t1, m1, h1), (t2, m2, h2) = teachers
    assert (h1[-1]["eval_acc"], h1[-1]["eval_cmi"]) != (h2[-1]["eval_acc"], h2[-1]["eval_cmi"])  # the poisoned labels were seen by the evaluation...
    for a, b in ((t1, t2), (m1, m2)):  # ...and changed nothing that was selected
        for x, y in zip(a.state_dict().values(), b.state_dict().values()):
            assert torch.equal(x, y)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_compiled_fit_trains_the_same_model(precision):
    """torch.compile fuses the forward, so it rounds in other places than eager: fp32 to 1e-4 (2 epochs); bf16 over
    one epoch (4 steps) to 2^-6 of what training moved a weight. bf16 (8-bit mantissa) rounds by 2^-8 = 3.9e-3 of a
    value; eager rounds each op's output to bf16 where the fused kernel keeps fp32, up to ~4 roundings per
    conv-BN-ReLU block that one run makes and the other not, so a step's update differs by up to 4·2^-8 = 2^-6
    (held on an AVX-512 BF16 CPU; fit_stack's eager runs agree to 2^-8, test_stack.BF16_REL)."""
    if not (shutil.which("g++") or shutil.which("c++")):
        pytest.skip("torch.compile on a CPU needs a C++ compiler")
    from torch._dynamo.utils import counters

    d = random_images(64, k=4)
    epochs = 1 if precision == "bf16" else 2
    models = []
    counters.clear()
    for compile_ in (False, True):
        torch.manual_seed(0)
        model = tiny_cnn(num_classes=4)
        start = copy.deepcopy(model.state_dict())
        hist = fit(model, d, mcmi_objective(0.2), epochs=epochs, lr=0.05, compile=compile_,
                   **{**FAST, "precision": precision})
        models.append((model, hist))
    (eager, h_eager), (compiled, h_compiled) = models
    assert counters["stats"]["unique_graphs"] >= 1  # dynamo did compile the training forward
    assert not isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule)  # fit trains the model it was given
    if precision == "fp32":
        assert h_compiled[-1]["loss"] == pytest.approx(h_eager[-1]["loss"], rel=1e-4)
        for (name, a), b in zip(eager.state_dict().items(), compiled.state_dict().values()):
            assert torch.allclose(a.float(), b.float(), atol=1e-4), name
        return
    moved = max(float((a - start[k]).abs().max()) for k, a in eager.state_dict().items() if a.is_floating_point())
    assert h_compiled[-1]["loss"] == pytest.approx(h_eager[-1]["loss"], rel=2 ** -6)
    for (name, a), b in zip(eager.state_dict().items(), compiled.state_dict().values()):
        if a.is_floating_point():
            worst = float((a - b).abs().max())
            assert worst <= 2 ** -6 * moved, (name, worst, moved)


def test_compile_is_refused_where_it_cannot_pay():
    from mcmi_lab.kd import build_objective
    from mcmi_lab.models import build_model

    d = random_images(32, k=4)
    teacher, student = build_model("cnn_tiny", 4, 1), build_model("cnn_tiny", 4, 1, width=4)
    with pytest.raises(ValueError, match=r"compile=True is not accepted with FitNetObjective: it captures"):
        fit(student, d, build_objective("fitnet", teacher), epochs=1, compile=True, **FAST)
    with pytest.raises(ValueError, match=r"compile='fast' is not accepted: expected True, False or a torch.compile "
                                         r"mode \(default, reduce-overhead"):
        TrainConfig(compile="fast").validate()


def _kernel_stream():
    """A Jupyter kernel's stderr (ipykernel's OutStream) that keeps what is written instead of sending it."""
    from ipykernel.iostream import OutStream

    class KernelStream(OutStream):
        def __init__(self):  # no session, no publishing thread
            self._isatty, self.text = False, []

        def write(self, s):
            self.text.append(s)
            return len(s)

        def flush(self):
            pass
    return KernelStream()


def test_progress_bars_are_text_bars_even_in_a_kernel(monkeypatch):
    """Widget bars leave saved views of widget models that no longer exist ("Error displaying widget: model not
    found" when a notebook is reopened); the bar is tqdm's text bar wherever it runs, in a kernel on its stream."""
    import sys

    import IPython
    import tqdm.std

    from mcmi_lab.training.loop import TrainConfig, _progress

    class Kernel:  # what tqdm.auto takes for a Jupyter kernel (it would then give its ipywidgets bar)
        config = {"IPKernelApp": {}}
    stream = _kernel_stream()  # not a tty: the kernel's stream is what says "JupyterLab shows the bar"
    monkeypatch.setattr(sys, "stderr", stream)
    monkeypatch.setattr(IPython, "get_ipython", lambda: Kernel())
    for name in ("tqdm.auto", "tqdm.autonotebook"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    bar = _progress(TrainConfig(progress="auto"), 3, "x")
    try:
        assert type(bar) is tqdm.std.tqdm
    finally:
        bar.close()
    assert any("x:   0%" in t for t in stream.text), stream.text


@pytest.mark.parametrize("progress, shown", [("auto", False), ("off", False), ("bar", True)])
def test_progress_to_a_file_or_pipe_is_no_bar(progress, shown, monkeypatch):
    """stderr a file, a pipe or a capture, with ipykernel imported in the process (as in the test suite, where the
    old check `"ipykernel" in sys.modules` gave bars before the one-line error): "auto" draws no bar, only a bar the
    caller forces with progress="bar"."""
    import io
    import sys

    import ipykernel.iostream  # noqa: F401  (imported, but stderr is not its stream)

    from mcmi_lab.training.loop import TrainConfig, _progress

    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    bar = _progress(TrainConfig(progress=progress), 3, "x")
    assert (bar is not None) is shown
    if bar is not None:
        bar.close()
    assert ("\r" in stream.getvalue()) is shown
