"""Model size and cost: parameters, MFLOPs, state-dict bytes, torchsummary's estimate.

The paper's Table 1 "estimated size" is torchsummary's Estimated Total Size for one
image: input + forward/backward activations + parameters, all float32. It is
recomputed here with forward hooks so the paper's column (teacher 128.14 MB,
student 2.25 MB) can be checked without torchsummary.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass

import torch
from torch import nn

MIB = 1024**2


@dataclass(frozen=True)
class ModelSummary:
    name: str
    total_params: int
    trainable_params: int
    mflops: float  # 2 x multiply-accumulates of conv and linear layers, one image
    state_dict_bytes: int
    estimated_size_mb: float  # torchsummary's "Estimated Total Size (MB)"
    input_size_mb: float
    forward_backward_mb: float
    params_size_mb: float

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _is_container(module: nn.Module) -> bool:
    return isinstance(module, (nn.Sequential, nn.ModuleList, nn.ModuleDict))


def summarize(name: str, model: nn.Module, image_size: int = 128) -> ModelSummary:
    """Measure ``model`` on one 3 x image_size x image_size input."""
    activations = 0
    macs = 0

    def hook(module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        nonlocal activations, macs
        activations += output.numel()
        if isinstance(module, nn.Conv2d):
            kernel = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            macs += output.numel() * kernel
        elif isinstance(module, nn.Linear):
            macs += output.numel() * module.in_features

    # torchsummary hooks every module but containers and the root model.
    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if m is not model and not _is_container(m)
    ]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, image_size, image_size))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)

    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    total = sum(p.numel() for p in model.parameters())
    input_mb = 3 * image_size * image_size * 4 / MIB
    fwd_bwd_mb = 2 * activations * 4 / MIB  # x2: gradients of every activation
    params_mb = total * 4 / MIB
    return ModelSummary(
        name=name,
        total_params=total,
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        mflops=2 * macs / 1e6,
        state_dict_bytes=buffer.getbuffer().nbytes,
        estimated_size_mb=round(input_mb + fwd_bwd_mb + params_mb, 2),
        input_size_mb=round(input_mb, 2),
        forward_backward_mb=round(fwd_bwd_mb, 2),
        params_size_mb=round(params_mb, 2),
    )
