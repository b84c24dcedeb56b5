"""centroid_pass: the MCMI centroids from an eval-mode pass (default) or the reference code's train-mode,
augmented pass, each against the class means computed by hand."""
import dataclasses

import pytest
import torch

from conftest import random_images, tiny_cnn
from mcmi_lab.data.core import batches
from mcmi_lab.training.objectives import MCMIObjective, reference_centroids


def _class_means(probs, labels, k):
    return torch.stack([probs[labels == c].mean(0) for c in range(k)])


@pytest.fixture
def model_and_data():
    torch.manual_seed(0)
    data = dataclasses.replace(random_images(n=96, k=4, size=12), pad=2, flip=True)  # augmented, as CIFAR
    return tiny_cnn(num_classes=4), data


def test_eval_pass_is_the_class_mean_of_eval_softmax(model_and_data):
    model, data = model_and_data
    obj = MCMIObjective(0.1, update="frozen")
    obj.on_epoch_start(model, data, 0)
    model.eval()
    with torch.no_grad():
        probs = model(data.normalize(data.images)).double().softmax(1)
    assert torch.allclose(obj.centroids, _class_means(probs, data.labels, 4), atol=1e-6)


def test_reference_pass_is_train_mode_over_augmented_batches(model_and_data):
    model, data = model_and_data
    model.eval()
    start = model[1].running_mean.clone()
    expected_model = __import__("copy").deepcopy(model).train()
    probs, labels = [], []
    with torch.no_grad():  # by hand: the same batches, the model in train mode
        for images, y in batches(data, 64, shuffle=True, augment=True, seed=0, epoch=3):
            probs.append(expected_model(images).double().softmax(1))
            labels.append(y)
    expected = _class_means(torch.cat(probs), torch.cat(labels), 4)
    got = reference_centroids(model, data, epoch=3)
    assert torch.allclose(got.double(), expected, atol=1e-6)
    assert not model.training  # its mode is restored
    assert not torch.allclose(model[1].running_mean, start)  # and the pass moved BatchNorm's running statistics
    assert torch.allclose(model[1].running_mean, expected_model[1].running_mean)

    obj = MCMIObjective(0.1, update="frozen", centroid_pass="reference")
    fresh = tiny_cnn(num_classes=4)
    fresh.load_state_dict(expected_model.state_dict())
    obj.on_epoch_start(fresh, data, 0)
    assert not torch.allclose(obj.centroids, expected)  # epoch 0 draws other batches than epoch 3


def test_a_bad_centroid_pass_is_one_line():
    with pytest.raises(ValueError, match=r"centroid_pass='train' is not accepted: expected one of 'eval', 'reference'"):
        MCMIObjective(0.1, centroid_pass="train")
