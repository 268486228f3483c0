"""The student with a BatchNorm2d after each conv, for training only (FedBN keeps the norms local).

Its state dict is the student's, key for key (``conv_block_1.0.weight`` ... ``classifier.1.bias``),
plus the four norms under ``norms.``: the conv blocks are the student's own modules and the norms
sit beside them, not inside them, so no index shifts and shared keys line up with a plain student.
An eval-mode BatchNorm is a per-channel affine, so ``fold_norms`` merges each into the conv before
it: what is exported is exactly the paper's 12,628-parameter student.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from edgemri.models.student import Student

NORM_EPS = 1e-5  # BatchNorm2d's default; fold_norms needs it, and a state dict does not carry it


class NormStudent(Student):
    """The student, conv -> BatchNorm2d -> ReLU in both blocks.

    ``NORMED_CONVS[i]`` is the student's conv that ``norms[i]`` follows; its keys are the student's,
    the norms' start with ``NORM_PREFIX``.
    """

    NORM_PREFIX = "norms."
    NORMED_CONVS = ("conv_block_1.0", "conv_block_1.2", "conv_block_2.0", "conv_block_2.2")

    def __init__(self, *, num_classes: int = 4, image_size: int = 128, channels: int = 3) -> None:
        super().__init__(num_classes=num_classes, image_size=image_size, channels=channels)
        self.norms = nn.ModuleList(nn.BatchNorm2d(channels, eps=NORM_EPS) for _ in self.NORMED_CONVS)

    def forward(self, x: Tensor) -> Tensor:
        norms = iter(self.norms)
        for block in (self.conv_block_1, self.conv_block_2):
            for layer in block:
                x = layer(x)
                if isinstance(layer, nn.Conv2d):
                    x = next(norms)(x)
        return self.classifier(x)

    @classmethod
    def from_student_state(cls, state: Mapping[str, Tensor], *, num_classes: int = 4,
                           image_size: int = 128) -> NormStudent:
        """A NormStudent with a student's weights and identity norms: in eval mode, the student's logits.

        gamma 1, beta 0, running mean 0 and running variance 1 - eps, so sqrt(var + eps) is 1 and each
        norm passes its input through unchanged. ``state`` must hold exactly the student's keys.
        """
        model = cls(num_classes=num_classes, image_size=image_size)
        student_keys = [key for key in model.state_dict() if not key.startswith(cls.NORM_PREFIX)]
        missing = [key for key in student_keys if key not in state]
        unexpected = [key for key in state if key not in student_keys]
        if missing or unexpected:
            odd = f"{missing[0]!r} is missing" if missing else f"{unexpected[0]!r} is unexpected"
            raise ValueError(f"a student state dict is needed, with exactly the keys {student_keys[0]!r} ... "
                             f"{student_keys[-1]!r}; {odd}")
        model.load_state_dict({**model.state_dict(), **state}, strict=True)
        with torch.no_grad():
            for norm in model.norms:
                norm.running_var.fill_(1.0 - norm.eps)
        return model


def fold_norms(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A NormStudent's state dict as the plain student's: each eval-mode norm folded into its conv.

    The norm computes gamma * (y - mean) / sqrt(var + eps) + beta on the conv's output y = w * x + b,
    so w' = w * s and b' = (b - mean) * s + beta with s = gamma / sqrt(var + eps) (in float64, then
    back to the conv's dtype). The student's other keys are copied; ``norms.`` keys are dropped.
    """
    norm_keys = ("weight", "bias", "running_mean", "running_var")
    needed = [f"{conv}.{p}" for conv in NormStudent.NORMED_CONVS for p in ("weight", "bias")]
    needed += [f"{NormStudent.NORM_PREFIX}{i}.{p}" for i in range(len(NormStudent.NORMED_CONVS)) for p in norm_keys]
    missing = [key for key in needed if key not in state]
    if missing:
        raise ValueError(f"not a norm-student state dict: no {missing[0]!r} ({len(missing)} keys missing)")
    folded = {key: value for key, value in state.items() if not key.startswith(NormStudent.NORM_PREFIX)}
    for index, conv in enumerate(NormStudent.NORMED_CONVS):
        gamma, beta, mean, var = (state[f"{NormStudent.NORM_PREFIX}{index}.{p}"].double() for p in norm_keys)
        if not bool((var + NORM_EPS > 0).all()):
            raise ValueError(f"norm {index} has a running variance below -eps ({float(var.min()):.3g}); "
                             f"it cannot be folded")
        weight, bias = state[f"{conv}.weight"], state[f"{conv}.bias"]
        factor = gamma / torch.sqrt(var + NORM_EPS)
        folded[f"{conv}.weight"] = (weight.double() * factor.view(-1, 1, 1, 1)).to(weight.dtype)
        folded[f"{conv}.bias"] = ((bias.double() - mean) * factor + beta).to(bias.dtype)
    return folded
