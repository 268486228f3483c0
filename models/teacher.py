"""VGG16 teachers: the paper's frozen ImageNet VGG16 and a slim one trained from scratch.

Both are one architecture described as data (torchvision's VGG16 configuration "D",
scaled by a width factor) and turned into layers by torchvision's ``make_layers``.
"""

from __future__ import annotations

from torch import Tensor, nn


def scaled_layout(width: float) -> list[str | int]:
    """VGG16's 13-conv layout with every channel count scaled by ``width`` (min 4)."""
    # torchvision is imported where a teacher is built: the student's users (a client round, a device) never
    # pay its second of import time.
    from torchvision.models.vgg import cfgs

    return [v if v == "M" else max(4, round(int(v) * width)) for v in cfgs["D"]]


class Teacher(nn.Module):
    """VGG16 features without the final max-pool, AdaptiveAvgPool2d(7, 7), one Linear head.

    At 128 px the truncated features give C x 8 x 8 (the paper's choice); the head sees
    C x 7 x 7. ``body`` is the part that can be frozen and cached; ``head`` is trained.
    """

    def __init__(
        self, *, width: float = 1.0, batch_norm: bool = False, num_classes: int = 4
    ) -> None:
        super().__init__()
        from torchvision.models.vgg import make_layers

        layout = scaled_layout(width)
        # Drop the last max-pool: the paper keeps torchvision's features[:30].
        self.features = make_layers(layout, batch_norm=batch_norm)[:-1]
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        last_channels = int([v for v in layout if v != "M"][-1])
        self.classifier = nn.Linear(last_channels * 7 * 7, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # Kaiming init keeps a 13-layer ReLU stack trainable from scratch.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, 0.01)
                nn.init.zeros_(module.bias)

    def freeze_features(self) -> None:
        """Freeze the conv body (the paper trains only the Linear head)."""
        for p in self.features.parameters():
            p.requires_grad_(False)

    @property
    def features_frozen(self) -> bool:
        return not any(p.requires_grad for p in self.features.parameters())

    def head(self, features: Tensor) -> Tensor:
        """Logits from cached conv features (what the frozen teacher trains on)."""
        return self.classifier(self.avgpool(features).flatten(1))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))
