"""DP-SGD local training speed against plain training on the same client data.

    python -m benchmarks.dp_speed [--data-root DIR]
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import quickstart_data, write_result
from edgemri.core.config import DPTierConfig, TrainSpec
from edgemri.core.data.dataset import load_dataset
from edgemri.core.privacy.dp import opacus_wrap, plan_dp
from edgemri.core.training.losses import cross_entropy
from edgemri.core.training.train import TrainData, fit
from edgemri.models import Student


def epoch_img_per_s(data: TrainData, spec: TrainSpec, wrap=None) -> float:
    torch.manual_seed(0)
    result = fit(Student(), data, loss=cross_entropy, spec=spec, seed=0, select="last", wrap=wrap)
    return result.images_seen / sum(r.seconds for r in result.history)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--images", type=int, default=300, help="a hospital-sized client")
    args = parser.parse_args()
    dataset = load_dataset(quickstart_data(args.data_root))
    data = TrainData(dataset.train.images[: args.images], dataset.train.labels[: args.images])
    results = {"client_images": len(data)}
    for batch in (8, 16):
        spec = TrainSpec(epochs=2, batch_size=batch)
        plan = plan_dp(DPTierConfig(enabled=True, target_epsilon=8.0), n=len(data), batch_size=batch,
                       local_epochs=2, rounds=5, accountant="rdp")
        plain = epoch_img_per_s(data, spec)
        private = epoch_img_per_s(data, spec, opacus_wrap(plan, seed=0))
        results[f"plain_batch{batch}_img_per_s"] = plain
        results[f"dp_batch{batch}_img_per_s"] = private
        results[f"dp_speed_vs_plain_batch{batch}_x"] = private / plain
    for key, value in results.items():
        print(f"{key:35s} {value:10.3f}")
    write_result("dp_speed", results)


if __name__ == "__main__":
    main()
