"""LeNet-5 (LeCun et al. 1998): two convolutions and three fully connected layers on 32x32 inputs.

ReLU and max-pooling replace the original tanh and sub-sampling, as in every modern re-implementation.
The third fully connected layer is the classifier head, kept outside the backbone.
"""
from collections import OrderedDict

from torch import nn


class LeNet(nn.Sequential):
    """Backbone: (B, 3, 32, 32) -> (B, 84) features."""

    input_size = 32
    num_features = 84

    def __init__(self):
        super().__init__(OrderedDict([
            ("conv1", nn.Conv2d(3, 6, 5)), ("relu1", nn.ReLU()), ("pool1", nn.MaxPool2d(2)),
            ("conv2", nn.Conv2d(6, 16, 5)), ("relu2", nn.ReLU()), ("pool2", nn.MaxPool2d(2)),
            ("flatten", nn.Flatten()),
            ("fc1", nn.Linear(16 * 5 * 5, 120)), ("relu3", nn.ReLU()),
            ("fc2", nn.Linear(120, 84)), ("relu4", nn.ReLU()),
        ]))
