"""Training speed: our cached-tensor loop against the paper's decode-every-epoch loop.

Measures on the same data and machine, in one run: images/s of a paper-style epoch
(torchvision ImageFolder: PIL decode + resize of every JPEG every epoch, batch 16), of
our baseline epoch (decoded uint8 cache, the one training loop), of our KD epoch
(teacher logits cached), and student inference at batch 64. Also what tuning gave:
batch size, threads, channels-last.

    python benchmarks/train_speed.py [--data-root DIR] [--images 800]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.data import DataLoader, Subset
from torchvision import datasets, transforms

from benchmarks.common import quickstart_data, write_result
from edgemri.core.config import TrainSpec
from edgemri.core.data.dataset import load_dataset
from edgemri.core.data.images import MEAN, STD, normalize
from edgemri.core.training.losses import cross_entropy, make_kd_loss
from edgemri.core.training.train import TrainData, fit
from edgemri.models import Student


def paper_epoch(root, images: int) -> float:
    """The paper's loop: ImageFolder, Resize((128,128)), ToTensor, Normalize, batch 16, shuffled."""
    transform = transforms.Compose([transforms.Resize((128, 128)), transforms.ToTensor(),
                                    transforms.Normalize(mean=MEAN, std=STD)])
    folder = datasets.ImageFolder(str(root / "Training"), transform=transform)
    subset = Subset(folder, torch.randperm(len(folder), generator=torch.Generator().manual_seed(0))[:images])
    loader = DataLoader(subset, batch_size=16, shuffle=True)
    torch.manual_seed(0)
    model = Student()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=0.01)
    started = time.perf_counter()
    for x, y in loader:
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return images / (time.perf_counter() - started)


def our_epoch(data: TrainData, batch_size: int, loss=cross_entropy, channels_last: bool = False) -> float:
    torch.manual_seed(0)
    model = Student()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    result = fit(model, data, loss=loss, spec=TrainSpec(epochs=2, batch_size=batch_size, weight_decay=0.01),
                 seed=0, select="last")
    return len(data) / result.history[-1].seconds  # second epoch: warm


def inference(images: torch.Tensor, batch_size: int = 64) -> float:
    model = Student().eval()
    with torch.no_grad():
        model(normalize(images[:batch_size]))
        started = time.perf_counter()
        for i in range(0, len(images), batch_size):
            model(normalize(images[i:i + batch_size]))
    return len(images) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--images", type=int, default=800, help="training images per measured epoch")
    args = parser.parse_args()
    root = quickstart_data(args.data_root)
    started = time.perf_counter()
    dataset = load_dataset(root)
    decode_seconds = time.perf_counter() - started
    images, labels = dataset.train.images[: args.images], dataset.train.labels[: args.images]
    data = TrainData(images, labels)
    teacher_logits = torch.randn(len(labels), 4)  # cached logits: what KD reads each batch
    kd_data = TrainData(images, labels, extras=(teacher_logits,))
    results = {"images_per_epoch": len(labels), "first_decode_seconds_all_images": decode_seconds,
               "paper_loop_img_per_s": paper_epoch(root, len(labels))}
    results["ours_batch16_img_per_s"] = our_epoch(data, 16)
    results["ours_kd_batch16_img_per_s"] = our_epoch(kd_data, 16, make_kd_loss(1.0, 0.5))
    results["ours_batch64_img_per_s"] = our_epoch(data, 64)
    results["ours_batch16_channels_last_img_per_s"] = our_epoch(data, 16, channels_last=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    results["ours_batch16_1thread_img_per_s"] = our_epoch(data, 16)
    torch.set_num_threads(threads)
    results["speedup_vs_paper_x"] = results["ours_batch16_img_per_s"] / results["paper_loop_img_per_s"]
    results["kd_epoch_time_vs_baseline_x"] = results["ours_batch16_img_per_s"] / results["ours_kd_batch16_img_per_s"]
    results["student_inference_batch64_img_per_s"] = inference(dataset.test.images)
    for key, value in results.items():
        print(f"{key:45s} {value:10.2f}")
    write_result("train_speed", results)


if __name__ == "__main__":
    main()
