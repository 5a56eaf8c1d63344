"""A small character-level GPT and its data, for training-quality comparisons of optimizers (bench/train_muon.py and
the Muon tests): it learns to continue Python source, the text of the standard library's argparse module, which every
Python installation carries, so the comparison needs no download."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["CharGPT", "GPTConfig", "batches", "corpus", "evaluate", "matrix_split", "plot_losses", "train"]


@dataclass(frozen=True)
class GPTConfig:
    vocab: int = 128  # ASCII
    context: int = 64
    width: int = 64
    heads: int = 4
    layers: int = 2


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.heads = config.heads
        self.norm1 = nn.LayerNorm(config.width)
        self.qkv = nn.Linear(config.width, 3 * config.width)
        self.proj = nn.Linear(config.width, config.width)
        self.norm2 = nn.LayerNorm(config.width)
        self.fc = nn.Linear(config.width, 4 * config.width)
        self.fc_proj = nn.Linear(4 * config.width, config.width)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(c, dim=-1)
        q, k, v = (y.view(b, t, self.heads, c // self.heads).transpose(1, 2) for y in (q, k, v))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, c)
        x = x + self.proj(attended)
        return x + self.fc_proj(F.gelu(self.fc(self.norm2(x))))


class CharGPT(nn.Module):
    def __init__(self, config: GPTConfig = GPTConfig()) -> None:
        super().__init__()
        self.embed = nn.Embedding(config.vocab, config.width)
        self.position = nn.Embedding(config.context, config.width)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.layers)])
        self.norm = nn.LayerNorm(config.width)
        self.head = nn.Linear(config.width, config.vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens) + self.position(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def matrix_split(model: CharGPT) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Muon's usual split: the hidden layers' weight matrices, and the rest (embeddings, head, norms, biases)."""
    hidden = [p for block in model.blocks for name, p in block.named_parameters() if p.dim() == 2]
    return hidden, [p for p in model.parameters() if all(p is not q for q in hidden)]


def corpus() -> Tensor:
    """The training text as ASCII codes (non-ASCII characters become '?')."""
    import argparse

    text = inspect.getsource(argparse)
    return torch.tensor([ord(ch) if ord(ch) < 128 else ord("?") for ch in text], dtype=torch.long)


def batches(data: Tensor, batch: int, context: int, seed: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Random windows of the first 90% of `data` (inputs, next-character targets), forever."""
    generator = torch.Generator().manual_seed(seed)
    limit = int(0.9 * len(data)) - context - 1
    while True:
        starts = torch.randint(0, limit, (batch,), generator=generator)
        windows = torch.stack([data[s:s + context + 1] for s in starts.tolist()])
        yield windows[:, :-1], windows[:, 1:]


@torch.no_grad()
def evaluate(model: CharGPT, data: Tensor, context: int, windows: int = 64) -> float:
    """Mean loss over evenly spaced windows of the held-out last 10% of `data`."""
    held_out = data[int(0.9 * len(data)):]
    starts = torch.linspace(0, len(held_out) - context - 2, windows).long().tolist()
    w = torch.stack([held_out[s:s + context + 1] for s in starts])
    logits = model(w[:, :-1]).float()
    return float(F.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten()))


def train(make_optimizers: Callable[[CharGPT], list[torch.optim.Optimizer]], steps: int, *, seed: int = 0,
          batch: int = 16, config: GPTConfig = GPTConfig(), dtype: torch.dtype = torch.float32
          ) -> tuple[list[float], float]:
    """Train a CharGPT (initialized from `seed` in fp32, then cast to `dtype`) for `steps` steps with the optimizers
    `make_optimizers` builds; returns the training loss of every step and the final held-out loss (losses in fp32)."""
    torch.manual_seed(seed)
    model = CharGPT(config).to(dtype)
    optimizers = make_optimizers(model)
    data = corpus()
    losses = []
    for _, (x, y) in zip(range(steps), batches(data, batch, config.context, seed + 1)):
        loss = F.cross_entropy(model(x).float().flatten(0, 1), y.flatten())
        loss.backward()
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses, evaluate(model, data, config.context)


def plot_losses(runs: dict[str, list[dict]], path: str, title: str, window: int, dashed: tuple[str, ...] = (),
                top: float | None = None) -> bool:
    """Plot each run's training loss (the mean over its seeds' "losses", averaged over the last `window` steps) to a
    PNG at `path`; the names in `dashed` dashed (curves that lie on others). False, with a message, without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, rs in runs.items():
        steps = len(rs[0]["losses"])
        curve = [sum(r["losses"][k] for r in rs) / len(rs) for k in range(steps)]
        smooth = [sum(curve[max(0, k - window + 1):k + 1]) / len(curve[max(0, k - window + 1):k + 1])
                  for k in range(steps)]
        ax.plot(smooth, label=name, linestyle="--" if name in dashed else "-")
    ax.set_xlabel("step")
    ax.set_ylabel(f"training loss (mean of seeds, {window}-step average)")
    if top is not None:
        ax.set_ylim(top=min(top, ax.get_ylim()[1]))
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
