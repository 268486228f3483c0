"""The paper's 12,628-parameter student CNN."""

from __future__ import annotations

from torch import Tensor, nn


def _conv_block(channels: int) -> nn.Sequential:
    """Conv-ReLU-Conv-ReLU-MaxPool at a constant width, as in the paper's code."""
    return nn.Sequential(
        nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1),
        nn.ReLU(),
        nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
    )


class Student(nn.Module):
    """Two 3-channel conv blocks and one Linear layer.

    The attribute names reproduce the state-dict keys of the paper's published
    checkpoints (``conv_block_1.0.weight`` ... ``classifier.1.bias``), so those load
    with ``strict=True``. ``classifier`` is the head that personalization methods such
    as FedPer keep local; the conv blocks are the shared body.
    """

    HEAD_PREFIX = "classifier."

    def __init__(self, *, num_classes: int = 4, image_size: int = 128, channels: int = 3) -> None:
        super().__init__()
        if image_size % 4:
            raise ValueError(f"image_size must be a multiple of 4 (two 2x poolings), got {image_size}")
        self.conv_block_1 = _conv_block(channels)
        self.conv_block_2 = _conv_block(channels)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels * (image_size // 4) ** 2, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.conv_block_2(self.conv_block_1(x)))
