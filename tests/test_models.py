"""Model zoo: exact RepDistiller parameter counts, logits at 3x32x32 and 1x28x28, feature/classifier/CAM layers."""
import pytest
import torch
import torch.nn as nn

from mcmi_lab.models.features import capture
from mcmi_lab.models import MODELS, build_model, cam_layer, classifier_layer, feature_layers
from mcmi_lab.models.shufflenetv1 import channel_shuffle
from mcmi_lab.models.shufflenetv2 import BasicBlock as ShuffleV2Block
from mcmi_lab.models.wrn import WideResNet

# Parameters for num_classes=100, in_channels=3, counted by running RepDistiller's own model files
# (github.com/HobbitLong/RepDistiller, models/*.py at commit eedab9d; "ResNet152" is its resnetv2.py ResNet152)
# with torch 2.14 on 3x32x32 inputs; "resnet152" is the MCMI fork's CIFAR ResNet(152, [16, 16, 32, 64],
# 'basicblock') (github.com/iclr2024mcmi/ICLRMCMI, models/resnet.py; 2,417,076 as issue 13 states). They agree
# with the CRD paper's table (resnet8x4 1.23M, resnet32x4 7.43M, wrn_40_2 2.26M, wrn_16_2 0.70M, vgg13 9.46M,
# vgg8 3.96M, MobileNetV2 0.81M, ShuffleV1 0.95M, ShuffleV2 1.36M, ResNet50 23.71M, resnet56 0.86M, resnet20 0.28M,
# resnet110 1.74M).
REFERENCE_PARAMS = {
    "resnet8": 83_892, "resnet14": 181_108, "resnet20": 278_324, "resnet32": 472_756, "resnet44": 667_188,
    "resnet56": 861_620, "resnet110": 1_736_564, "resnet8x4": 1_233_540, "resnet32x4": 7_433_860,
    "resnet152": 2_417_076, "ResNet50": 23_705_252, "ResNet152": 58_341_028,
    "wrn_16_1": 180_916, "wrn_16_2": 703_284, "wrn_40_1": 569_780, "wrn_40_2": 2_255_156,
    "vgg8": 3_965_028, "vgg11": 9_277_284, "vgg13": 9_462_180, "vgg16": 14_774_436, "vgg19": 20_086_692,
    "mobile_half": 812_836, "ShuffleV1": 949_258, "ShuffleV2": 1_355_528,
}
SMALL = ("cnn_small", "cnn_tiny")
# Other spellings of the same builder: alias -> the name tested above (the MCMI fork's model_dict key).
ALIASES = {"MobileNetV2": "mobile_half"}
# Slow on CPU: one build and one forward each. Their code paths run at 1x28x28 through a smaller sibling
# (resnet110/resnet152/resnet32x4 -> resnet20/resnet8x4, ResNet50/ResNet152 -> none smaller: see test below,
# vgg16/19 -> vgg8).
BIG = {"resnet110", "resnet152", "resnet32x4", "ResNet50", "ResNet152", "vgg16", "vgg19"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Other processes share the two cores; OpenMP threads spinning against them make a forward 100x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_every_model_is_tested():
    assert set(MODELS) == set(REFERENCE_PARAMS) | set(SMALL) | set(ALIASES) | {"mlp"}


@pytest.mark.parametrize("alias,name", ALIASES.items())
def test_alias_is_the_same_builder(alias, name):
    assert MODELS[alias] is MODELS[name]
    model = build_model(alias, 100)
    assert model.spec["name"] == alias and n_params(model) == REFERENCE_PARAMS[name]
    model.load_state_dict(build_model(name, 100).state_dict())  # the other spelling's checkpoints load


def test_resnet152_is_the_mcmi_fork_cifar_resnet():
    # Key names and shapes read from the fork's models/resnet.py: conv1/bn1 stem, layer1..3 of
    # (152 - 2) / 6 = 25 BasicBlocks (conv1, bn1, conv2, bn2), a downsample Sequential(conv, BN) only where the
    # stride or width changes (first block of layer2 and layer3), and fc.
    state = build_model("resnet152", 100).state_dict()
    expected_shapes = {
        "conv1.weight": (16, 3, 3, 3), "bn1.running_var": (16,),
        "layer1.0.conv1.weight": (16, 16, 3, 3), "layer1.24.bn2.weight": (16,),
        "layer2.0.conv1.weight": (32, 16, 3, 3), "layer2.0.downsample.0.weight": (32, 16, 1, 1),
        "layer2.0.downsample.1.running_mean": (32,), "layer3.0.downsample.0.weight": (64, 32, 1, 1),
        "layer3.24.conv2.weight": (64, 64, 3, 3), "layer3.24.bn2.num_batches_tracked": (),
        "fc.weight": (100, 64), "fc.bias": (100,),
    }
    for key, shape in expected_shapes.items():
        assert tuple(state[key].shape) == shape, key
    for absent in ("layer1.0.downsample.0.weight", "layer2.1.downsample.0.weight", "layer3.25.conv1.weight",
                   "linear.weight", "layer4.0.conv1.weight"):
        assert absent not in state
    # Stem 1 + 5 (BN: weight, bias, running_mean, running_var, num_batches_tracked), 75 blocks of 12, two
    # downsamples of 6, fc 2.
    assert len(state) == 6 + 75 * 12 + 2 * 6 + 2


@pytest.mark.parametrize("name", list(REFERENCE_PARAMS) + list(SMALL))
def test_reference_model_counts_logits_and_layers(name):
    torch.manual_seed(0)
    model = build_model(name, 100).eval()
    if name in REFERENCE_PARAMS:
        assert n_params(model) == REFERENCE_PARAMS[name]
    assert model.spec == {"name": name, "num_classes": 100, "in_channels": 3}
    stages, pre, head, cam = feature_layers(model), feature_layers(model, preact=True), classifier_layer(model), \
        cam_layer(model)
    modules = dict(model.named_modules())
    assert all(n in modules for n in stages + pre + [head, cam])
    assert isinstance(modules[head], nn.Linear) and modules[head].out_features == 100
    assert len(pre) == len(stages) >= 3

    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), capture(model, stages + pre + [cam]) as feats, capture(model, head, inputs=True) as pooled:
        logits = model(x)
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, 100)
    sizes = [feats[n].shape[-1] for n in stages]
    assert all(feats[n].dim() == 4 and feats[n].shape[0] == 2 for n in stages + pre + [cam])
    assert sizes == sorted(sizes, reverse=True)  # stages go from fine to coarse
    for s, p in zip(stages, pre):
        assert feats[s].shape == feats[p].shape
    # The CAM layer is the map that is globally pooled into the classifier's input, and that input gives the logits.
    assert pooled[head].shape == (2, modules[head].in_features)
    torch.testing.assert_close(feats[cam].mean((2, 3)), pooled[head], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(modules[head](pooled[head]), logits)
    check_preact(model, stages, pre, feats)

    if name not in BIG:
        gray = build_model(name, 10, in_channels=1).eval()
        first_conv = next(m for m in gray.modules() if isinstance(m, nn.Conv2d))
        assert first_conv.in_channels == 1
        with torch.no_grad():
            assert gray(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_the_mlp_pools_to_its_grid_and_has_no_cam_layer():
    torch.manual_seed(0)
    model = build_model("mlp", 10, in_channels=1).eval()
    assert n_params(model) == (64 * 256 + 256) + (256 * 256 + 256) + (256 * 10 + 10)
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        fc1, fc2, fc = model.fc1, model.fc2, model.fc
        by_hand = fc(torch.relu(fc2(torch.relu(fc1(x.flatten(1))))))  # at 8x8 the pool is the identity
        torch.testing.assert_close(model(x), by_hand)
        assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert feature_layers(model) == ["relu1", "relu2"] and feature_layers(model, preact=True) == ["fc1", "fc2"]
    assert classifier_layer(model) == "fc"
    with pytest.raises(ValueError, match="no convolutional feature map"):
        cam_layer(model)


def check_preact(model, stages, pre, feats):
    """Each preact feature is the value before the ReLU that gives the stage feature (RepDistiller's preact)."""
    kind = type(model).__name__
    if kind == "MobileNetV2":  # the reference defines no preact features here
        assert pre == stages
    elif kind == "WideResNet":  # pre-activation blocks: the next BN applied to the stage output
        bns = [model.block2.layer[0].bn1, model.block3.layer[0].bn1, model.bn1]
        for s, p, bn in zip(stages[1:], pre[1:], bns):
            torch.testing.assert_close(feats[p], bn(feats[s]))
    else:
        first = 0 if kind == "SmallCNN" else 1  # the stem feature is the same in both lists
        assert pre[:first] == stages[:first]
        for s, p in zip(stages[first:], pre[first:]):
            assert (feats[p] < 0).any()  # really before a ReLU
            after = torch.relu(feats[p])
            if kind == "ShuffleNetV2":
                after = channel_shuffle(after, 2)
            torch.testing.assert_close(after, feats[s], rtol=0, atol=0)


@pytest.mark.parametrize("name", ["ResNet50"])
def test_four_stage_resnet_at_28(name):
    # ResNet50 and ResNet152 are one class; one forward at 1x28x28 covers both (28 -> 28, 14, 7, 4).
    model = build_model(name, 10, in_channels=1).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 28, 28)).shape == (1, 10)


def test_vgg_pools_a_fourth_time_only_at_64():
    model = build_model("vgg8", 10).eval()
    for size, fired in ((32, False), (64, True)):
        with torch.no_grad(), capture(model, ["pool3", "relu4"]) as feats:
            model(torch.randn(1, 3, size, size))
        assert ("pool3" in feats) is fired
        assert feats["relu4"].shape[-1] == 4  # the extra pool brings 64x64 inputs to CIFAR's last map size


def test_shufflev2_block_matches_reference_formula():
    # The block applies ReLU to the whole concatenation; the reference applies it to the right half only.
    # The two agree because block inputs are >= 0; check it against the reference formula written out.
    torch.manual_seed(0)
    block = ShuffleV2Block(8).eval()
    x = torch.relu(torch.randn(2, 8, 5, 5))
    left, right = x[:, :4], x[:, 4:]
    right = block.bn2(block.conv2(torch.relu(block.bn1(block.conv1(right)))))
    right = torch.relu(block.bn3(block.conv3(right)))
    expected = channel_shuffle(torch.cat([left, right], 1), 2)
    with torch.no_grad():
        torch.testing.assert_close(block(x), expected.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("width,in_channels,classes", [(16, 1, 10), (8, 3, 100), (32, 1, 10)])
def test_small_cnn_parameter_count(width, in_channels, classes):
    w = [in_channels, width, width, 2 * width, 2 * width, 4 * width, 4 * width]
    convs = sum(9 * a * b for a, b in zip(w[:-1], w[1:]))  # six 3x3 convs, no bias (BN follows)
    bns = 2 * sum(w[1:])
    linear = 4 * width * classes + classes
    name = "cnn_tiny" if width == 8 else "cnn_small"
    model = build_model(name, classes, in_channels, **({"width": width} if width == 32 else {}))
    assert n_params(model) == convs + bns + linear


def test_width_override_goes_into_spec_and_rebuilds():
    model = build_model("cnn_small", 10, 1, width=32)
    assert model.spec == {"name": "cnn_small", "num_classes": 10, "in_channels": 1, "width": 32}
    assert model.fc.in_features == 128
    again = build_model(**model.spec)
    again.load_state_dict(model.state_dict())  # same architecture: strict load succeeds
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(again.eval()(x), model.eval()(x))


def test_train_step_reaches_the_stem():
    model = build_model("resnet8", 10, in_channels=1).train()
    loss = nn.functional.cross_entropy(model(torch.randn(4, 1, 28, 28)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert model.conv1.weight.grad is not None and model.conv1.weight.grad.abs().sum() > 0


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError, match="name='resnet1000'.*resnet20.*cnn_small"):
        build_model("resnet1000", 10)


@pytest.mark.parametrize("kwargs,match", [
    ({"name": "resnet20", "num_classes": 10, "width": 4}, "width=4.*resnet20.*no keyword"),
    ({"name": "cnn_small", "num_classes": 10, "depth": 4}, "depth=4.*expected only width"),
    ({"name": "cnn_small", "num_classes": 10, "width": 0}, "width=0"),
    ({"name": "resnet20", "num_classes": 0}, "num_classes=0"),
    ({"name": "resnet20", "num_classes": 10, "in_channels": 0}, "in_channels=0"),
    ({"name": "resnet20", "num_classes": 2.0}, "num_classes=2.0"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_model(**kwargs)


@pytest.mark.parametrize("get", [feature_layers, classifier_layer, cam_layer])
def test_layer_names_for_unknown_model(get):
    with pytest.raises(ValueError, match="Sequential is not accepted"):
        get(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.LazyLinear(2)))


def test_layer_names_for_subclass():
    class Custom(WideResNet):
        pass
    assert cam_layer(Custom(16, 1, 10)) == "relu"
