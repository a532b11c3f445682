"""Model factory: names from three families, pretrained weights, and a clear error on a misfit."""

import pytest
import torch

from clf.errors import ModelLoadError, UsageError
from clf.models import create_model, default_preprocess, head, imagenet_classes


@pytest.mark.parametrize(
    "name", ["small_cnn", "resnet18", "timm/resnet18", "mobilenetv3_small_050"]
)
def test_any_family_builds_with_the_requested_head(name):
    model = create_model(name, 7).eval()
    assert head(model).out_features == 7
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 7)


def test_unknown_name_is_a_usage_error():
    with pytest.raises(UsageError, match="unknown model 'resnet9000'"):
        create_model("resnet9000", 2)


def test_pretrained_backbone_loads_and_head_is_replaced(mobilenet_weights):
    state = torch.load(mobilenet_weights, weights_only=True)
    model = create_model("mobilenet_v2", 3, pretrained=mobilenet_weights)
    assert torch.equal(model.features[0][0].weight, state["features.0.0.weight"])
    assert head(model).out_features == 3


@pytest.mark.parametrize("name", ["small_cnn", "resnet18", "timm/resnet18"])
def test_with_head_the_head_comes_from_the_weights_and_must_have_as_many_classes(name, tmp_path):
    torch.manual_seed(0)
    trained = create_model(name, 10)
    weights = tmp_path / "ten.pth"
    torch.save(trained.state_dict(), weights)

    model = create_model(name, 10, pretrained=str(weights), with_head=True)
    assert torch.equal(head(model).weight, head(trained).weight)
    with pytest.raises(ModelLoadError, match="hold a 10-class head, not the 2 classes asked"):
        create_model(name, 2, pretrained=str(weights), with_head=True)


def test_weights_of_another_architecture_are_refused(mobilenet_weights):
    with pytest.raises(ModelLoadError, match="do not fit resnet18: .* missing"):
        create_model("resnet18", 2, pretrained=mobilenet_weights)


def test_missing_weights_file_is_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        create_model("mobilenet_v2", 2, pretrained=str(tmp_path / "nope.pth"))


def test_preprocessing_follows_the_architecture():
    assert default_preprocess("mobilenet_v2").resize == 256
    lite = default_preprocess("tf_efficientnet_lite0")
    assert (lite.mean, lite.interpolation) == ((0.5, 0.5, 0.5), "bicubic")


def test_imagenet_class_names_ship_offline():
    names = imagenet_classes()
    assert len(names) == 1000 and names[0] == "tench"
