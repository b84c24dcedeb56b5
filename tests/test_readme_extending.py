"""The README's "Extending" examples run as written, and what they register trains through the library."""
import re
from pathlib import Path

import pytest
import torch

import mcmi_lab as ml
from mcmi_lab.data.registry import DATASETS

README = Path(__file__).resolve().parents[1] / "README.md"


def _extending_code() -> str:
    text = README.read_text(encoding="utf-8")
    section = text.split("## Extending", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 3  # a KD method, a model, a data set
    return "\n".join(blocks)


@pytest.fixture
def registered():
    """Run the README's blocks; take their registry entries out again afterwards."""
    before = (dict(ml.KD_METHODS), dict(ml.MODELS), dict(DATASETS))
    namespace: dict = {}
    exec(compile(_extending_code(), str(README), "exec"), namespace)
    yield namespace
    for registry, saved in zip((ml.KD_METHODS, ml.MODELS, DATASETS), before):
        registry.clear()
        registry.update(saved)


def test_the_readme_examples_register_and_train(registered):
    assert {"logit_l2"} <= set(ml.KD_METHODS) and "cnn_wide" in ml.MODELS and "stripes" in DATASETS
    train, test = ml.load_dataset("stripes", "train"), ml.load_dataset("stripes", "test")
    assert list(train.classes) == ["horizontal", "vertical"] and tuple(train.images.shape) == (64, 1, 8, 8)
    fast = dict(batch_size=16, progress="off", log=False, augment=False)
    teacher, _ = ml.train_teacher(train, "cnn_wide", epochs=2, lr=0.1, **fast)
    student, history = ml.train_student(teacher, train, "logit_l2", model="cnn_wide", epochs=1, weight=0.5, **fast)
    assert {"ce", "l2"} <= set(history[0]) and history[0]["l2"] >= 0
    # the l2 term is the plain formula on the batch: zero against itself, the squared distance otherwise
    a, b = torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    loss = registered["logit_l2_loss"]
    assert float(loss(a, a)) == 0.0
    assert float(loss(a, b)) == pytest.approx(float(((a - b) ** 2).sum() / 4))
    assert 0 <= ml.evaluate(student, test)["accuracy"] <= 1
