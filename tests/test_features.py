"""capture(): forward hooks as a context manager; feature_shapes(): shapes from one zero forward."""
import pytest
import torch
import torch.nn as nn

from mcmi_lab.models.features import capture, feature_shapes
from mcmi_lab.models import build_model, classifier_layer, feature_layers


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()  # see tests/test_models.py: shared cores
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return build_model("cnn_tiny", 5, in_channels=1).eval()


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def manual_forward(m, x):
    """The SmallCNN forward written out, keeping every intermediate."""
    s1 = m.stage1(x)
    s2 = m.stage2(m.pool1(s1))
    s3 = m.stage3(m.pool2(s2))
    pooled = s3.mean((2, 3))
    return s1, s2, s3, pooled, m.fc(pooled)


def test_outputs_equal_a_manual_forward(model):
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad(), capture(model, ["stage1", "stage2", "stage3"]) as feats, \
            capture(model, "fc", inputs=True) as fc_in:
        logits = model(x)
        s1, s2, s3, pooled, manual_logits = manual_forward(model, x)
    assert list(feats) == ["stage1", "stage2", "stage3"]
    for got, expected in zip(feats.values(), (s1, s2, s3)):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.testing.assert_close(fc_in["fc"], pooled)  # inputs=True on the classifier: the pooled feature
    torch.testing.assert_close(logits, manual_logits)


def test_inputs_true_on_classifier_is_the_pooled_last_stage():
    model = build_model("resnet8", 7).eval()
    with torch.no_grad(), capture(model, "layer3") as out, capture(model, classifier_layer(model), inputs=True) as inp:
        model(torch.randn(2, 3, 32, 32))
    assert inp["fc"].shape == (2, 64)
    torch.testing.assert_close(inp["fc"], out["layer3"].mean((2, 3)))


def test_entries_are_overwritten_by_the_next_forward(model):
    x1, x2 = torch.randn(2, 1, 28, 28), torch.randn(4, 1, 28, 28)
    with torch.no_grad(), capture(model, "stage2") as feats:
        model(x1)
        first = feats["stage2"]
        model(x2)
        assert feats["stage2"].shape[0] == 4 and feats["stage2"] is not first
        torch.testing.assert_close(feats["stage2"], manual_forward(model, x2)[1])


def test_hooks_are_removed_on_exit(model):
    before = hook_count(model)
    with capture(model, feature_layers(model)) as feats:
        assert hook_count(model) == before + 3
        with torch.no_grad():
            model(torch.randn(1, 1, 28, 28))
    assert hook_count(model) == before
    kept = dict(feats)
    with torch.no_grad():
        model(torch.randn(2, 1, 28, 28))
    assert {k: id(v) for k, v in feats.items()} == {k: id(v) for k, v in kept.items()}  # nothing wrote to it


def test_hooks_are_removed_after_an_exception(model):
    before = hook_count(model)
    with pytest.raises(RuntimeError, match="boom"):
        with capture(model, ["stage1", "fc"], inputs=True):
            assert hook_count(model) == before + 2
            raise RuntimeError("boom")
    assert hook_count(model) == before


def test_unknown_layer_names_valid_ones_and_registers_nothing(model):
    with pytest.raises(ValueError, match=r"layer 'stage_2' is not accepted.*'stage2'"):
        with capture(model, ["stage1", "stage_2"]):
            pass  # pragma: no cover
    assert hook_count(model) == 0


def test_gradients_flow_through_captured_features(model):
    model.train()
    with capture(model, "stage2") as feats:
        model(torch.randn(4, 1, 28, 28))
    feats["stage2"].pow(2).mean().backward()
    assert model.stage1[0].weight.grad.abs().sum() > 0
    assert model.fc.weight.grad is None  # the loss did not pass through the head


def test_feature_shapes_match_a_real_forward():
    model = build_model("resnet8", 10, in_channels=1)
    layers = feature_layers(model)[::-1] + [feature_layers(model, preact=True)[-1]]
    shapes = feature_shapes(model, layers, (1, 28, 28))
    assert shapes == [torch.Size(s) for s in ([64, 7, 7], [32, 14, 14], [16, 28, 28], [16, 28, 28], [64, 7, 7])]
    with torch.no_grad(), capture(model, layers) as feats:
        model.eval()(torch.randn(2, 1, 28, 28))
    assert shapes == [feats[n].shape[1:] for n in layers]


def test_feature_shapes_restores_modes_and_leaves_state_alone(model):
    model.train()
    model.stage2.eval()  # a mixed-mode model (e.g. a frozen part) must come back mixed
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert feature_shapes(model, "stage3", (1, 12, 12)) == [torch.Size([32, 3, 3])]
    assert model.training and model.stage1.training and not model.stage2.training and model.stage3.training
    for k, v in model.state_dict().items():  # BN running statistics untouched
        assert torch.equal(v, state[k]), k
    assert all(p.grad is None for p in model.parameters())
    assert hook_count(model) == 0


@pytest.mark.parametrize("shape", [(1, 28), (1, 28, 28, 1), (1, 28, 28.0), (0, 28, 28), (True, 28, 28)])
def test_feature_shapes_rejects_bad_input_shape(model, shape):
    with pytest.raises(ValueError, match="input_shape=.*three positive integers"):
        feature_shapes(model, "stage1", shape)


def test_feature_shapes_rejects_a_layer_that_never_runs():
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.spare = nn.Conv2d(1, 2, 3), nn.Conv2d(2, 2, 3)

        def forward(self, x):
            return self.used(x)

    model = Unused()
    with pytest.raises(ValueError, match=r"\['spare'\].*no output"):
        feature_shapes(model, ["used", "spare"], (1, 8, 8))
    assert model.training and hook_count(model) == 0
