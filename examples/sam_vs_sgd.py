"""SAM + SGD against plain SGD on a small CIFAR-like conv net (synthetic 3x32x32 images, 10 classes), on the CPU.

    python examples/sam_vs_sgd.py                        # SAM (rho 0.1) vs SGD, 20 epochs, ~15 s on one core
    python examples/sam_vs_sgd.py --adaptive --rho 0.5   # ASAM

Both runs start from the same weights and see the same batches; SAM takes two forward-backward passes per step (the
gradient at w + e, then the base step from w). The images are class templates plus noise, and a fifth of the
training labels are wrong, so a model can memorise the training set: the test loss shows which run generalises.
"""
from __future__ import annotations

import argparse
import time

import fusedopt
import torch
from torch import nn

CLASSES = 10
AMPLITUDE = 0.5  # of the class templates against unit noise


def make_data(n_train: int, n_test: int, seed: int) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    generator = torch.Generator().manual_seed(seed)
    templates = torch.randn(CLASSES, 3, 32, 32, generator=generator)

    def sample(n: int, label_noise: float) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.randint(0, CLASSES, (n,), generator=generator)
        images = AMPLITUDE * templates[labels] + torch.randn(n, 3, 32, 32, generator=generator)
        flipped = torch.rand(n, generator=generator) < label_noise
        labels = torch.where(flipped, torch.randint(0, CLASSES, (n,), generator=generator), labels)
        return images, labels

    return sample(n_train, 0.2), sample(n_test, 0.0)


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 8 * 8, 64), nn.ReLU(), nn.Linear(64, CLASSES),
    )


def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        logits = model(images)
        return float(nn.functional.cross_entropy(logits, labels)), float((logits.argmax(1) == labels).float().mean())


def train(use_sam: bool, args: argparse.Namespace, data: tuple[tuple[torch.Tensor, torch.Tensor], ...]) -> None:
    (train_x, train_y), (test_x, test_y) = data
    model = make_model(args.seed)
    base = fusedopt.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    opt: torch.optim.Optimizer = fusedopt.SAM(base, rho=args.rho, adaptive=args.adaptive) if use_sam else base
    generator = torch.Generator().manual_seed(args.seed + 1)
    start = time.perf_counter()
    for _ in range(args.epochs):
        order = torch.randperm(train_x.shape[0], generator=generator)
        for batch in order.split(args.batch):
            x, y = train_x[batch], train_y[batch]

            def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                return loss

            closure()
            if use_sam:
                opt.step(closure)  # first_step on the gradient at w, closure at w + e, second_step
            else:
                opt.step()
            opt.zero_grad()
    seconds = time.perf_counter() - start
    train_loss, train_acc = evaluate(model, train_x, train_y)
    test_loss, test_acc = evaluate(model, test_x, test_y)
    name = ("ASAM" if args.adaptive else "SAM") + "+SGD" if use_sam else "SGD"
    print(f"{name:9s} train loss {train_loss:.4f} acc {train_acc:.3f}   test loss {test_loss:.4f} acc {test_acc:.3f}"
          f"   ({seconds:.1f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--rho", type=float, default=0.1)
    parser.add_argument("--adaptive", action="store_true", help="ASAM instead of SAM")
    parser.add_argument("--train", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    # One thread, with denormals flushed (set_flush_denormal reaches the calling thread only): once the training
    # set is memorised, the softmax's gradients fall below float32's normal range and would slow every kernel 30x.
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    data = make_data(args.train, 2048, args.seed)
    for use_sam in (False, True):
        train(use_sam, args, data)


if __name__ == "__main__":
    main()
