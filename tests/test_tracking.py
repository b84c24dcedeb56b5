"""TensorBoard tracking: what fit's records say is what TensorBoard reads back, one run folder per training."""
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import random_images, tiny_cnn
from mcmi_lab.training.tracking import TensorBoardLogger, run_folder
from mcmi_lab.training.loop import fit


def _scalars(folder) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_fit_writes_every_record_value_as_a_scalar(tmp_path):
    data = random_images(48, k=3)
    model = tiny_cnn(num_classes=3)
    history = fit(model, data, epochs=2, batch_size=16, lr=0.05, tensorboard=str(tmp_path), name="mcmi λ=0.5", log=False,
                  progress="off")
    (folder,) = tmp_path.iterdir()
    assert folder.name == "mcmi_λ=0.5"
    scalars = _scalars(folder)
    keys = {k for r in history for k, v in r.items() if k != "epoch" and isinstance(v, (int, float))}
    assert set(scalars) == keys and {"loss", "train_acc", "lr", "time"} <= keys
    for key in keys:  # float32 in the event file
        assert scalars[key] == [(r["epoch"], pytest.approx(r[key], rel=1e-6, abs=1e-7)) for r in history]


def test_run_folders_never_mix_two_runs_of_one_name(tmp_path):
    names = [run_folder(tmp_path, "student kd ← mcmi").name for _ in range(3)]
    assert names == ["student_kd_mcmi", "student_kd_mcmi-2", "student_kd_mcmi-3"]
    assert run_folder(tmp_path, "").name == "run" and run_folder(tmp_path, "a/../b").name == "a_.._b"


def test_logger_skips_what_is_not_a_number(tmp_path):
    logger = TensorBoardLogger(tmp_path, "x")
    logger({"epoch": 3, "loss": 0.5, "stopped": True, "note": "warm-up", "lam": 2})
    logger.close()
    assert _scalars(logger.folder) == {"loss": [(3, 0.5)], "lam": [(3, 2.0)]}


def test_resume_is_not_refused_for_another_log_folder(tmp_path):
    data = random_images(32, k=2)
    torch.manual_seed(0)
    model = tiny_cnn(num_classes=2)
    ckpt = tmp_path / "ckpt.pt"
    fit(model, data, epochs=1, batch_size=16, schedule="constant", checkpoint=ckpt, log=False, tensorboard=str(tmp_path / "a"))
    history = fit(model, data, epochs=2, batch_size=16, schedule="constant", checkpoint=ckpt, resume=True, log=False,
                  tensorboard=str(tmp_path / "b"))
    assert [r["epoch"] for r in history] == [1, 2]
    assert [step for step, _ in _scalars(tmp_path / "b" / "run")["loss"]] == [2]  # the resumed epoch only
