"""Third-party networks for the zoo test (issue 23): Hugging Face's own ResNet (BatchNorm, a ``ModelOutput``) and
MobileNetV2 (BatchNorm, depthwise convs, dropout before the classifier), tiny random configs for 1x8x8 digits.
Nothing here knows Esper: a factory per model, as a user would write it."""

from __future__ import annotations

from torch import nn
from transformers import (
    MobileNetV2Config,
    MobileNetV2ForImageClassification,
    ResNetConfig,
    ResNetForImageClassification,
)


def make_resnet(cfg: object, input_shape: tuple[int, ...], n_outputs: int) -> nn.Module:
    return ResNetForImageClassification(ResNetConfig(num_channels=input_shape[0], embedding_size=16,
                                                     hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic",
                                                     num_labels=n_outputs))


def make_mobilenet(cfg: object, input_shape: tuple[int, ...], n_outputs: int) -> nn.Module:
    return MobileNetV2ForImageClassification(MobileNetV2Config(num_channels=input_shape[0], image_size=8,
                                                               depth_multiplier=0.25, min_depth=4,
                                                               classifier_dropout_prob=0.2, num_labels=n_outputs))
