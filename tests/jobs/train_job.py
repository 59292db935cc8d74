"""A small fine-tuning job run as a subprocess by the tests (kill -9 and resume, torchrun)."""
import argparse
import os
import time
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

import fxlop


class Net(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.fc = nn.Linear(width, 4)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv1(x)))
        return self.fc(torch.relu(self.conv2(x)).mean((2, 3)))


class Blobs(Dataset):
    """240 noisy images in 4 classes; `delay` seconds per item make the job slow enough to kill."""

    def __init__(self, delay=0.0):
        generator = torch.Generator().manual_seed(0)
        self.y = torch.arange(240) % 4
        self.x = torch.randn(240, 3, 8, 8, generator=generator) + self.y.view(-1, 1, 1, 1).float() * 0.5
        self.delay = delay

    def __len__(self):
        return len(self.y)

    def __getitem__(self, index):
        if self.delay:
            time.sleep(self.delay)
        return self.x[index] + 0.1 * torch.randn(3, 8, 8), self.y[index]  # augmentation uses torch's RNG


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--distributed", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    torch.manual_seed(1)
    teacher = Net(12)
    torch.manual_seed(2)
    student = fxlop.expand(Net(4), seed=0)
    data = Blobs(args.delay)
    if args.distributed:
        fxlop.train.init_distributed()
        loader = DataLoader(data, batch_size=16, sampler=DistributedSampler(data, shuffle=True, seed=0))
    else:
        loader = DataLoader(data, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))
    fxlop.finetune(student, loader, teacher=teacher, gamma=10.0, epochs=args.epochs, lr=0.05,
                   checkpoint_path=out / "checkpoint.pt", log_path=out / "log.jsonl", resume=args.resume)
    rank = int(os.environ.get("RANK", "0"))
    torch.save(student.state_dict(), out / f"weights_rank{rank}.pt")  # for the test to compare ranks


if __name__ == "__main__":
    main()
