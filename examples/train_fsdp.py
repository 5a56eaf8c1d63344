"""Train a small transformer language model with FSDP2 and fusedopt.AdamW on CPU or GPU.

    torchrun --nproc-per-node 2 examples/train_fsdp.py            # 2 CPU ranks (gloo)
    torchrun --nproc-per-node 8 examples/train_fsdp.py --steps 500  # 8 GPUs (nccl), when CUDA is available

Each rank holds a shard of every parameter (DTensor); fusedopt updates the local shards through its flat buffers
and clips by the global gradient norm (one all-reduce of the sum of squares across the ranks).
"""
from __future__ import annotations

import argparse
import gc
import os

import fusedopt
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard


class TinyLM(nn.Module):
    def __init__(self, vocab: int, dim: int, layers: int, heads: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        mask = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1], device=tokens.device)
        for block in self.blocks:
            x = block(x, src_mask=mask, is_causal=True)
        return self.head(self.norm(x))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=8, help="sequences per rank")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=512)
    args = parser.parse_args()

    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    mesh = init_device_mesh(device.type, (world,))

    torch.manual_seed(0)  # the same initial model on every rank
    model = TinyLM(args.vocab, args.dim, args.layers, heads=4).to(device)
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)

    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = fusedopt.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                         lr=3e-3, betas=(0.9, 0.95), max_grad_norm=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 10))

    # Synthetic data with structure to learn: each sequence counts upwards from a random start.
    generator = torch.Generator().manual_seed(1 + rank)
    for step in range(args.steps):
        start = torch.randint(0, args.vocab, (args.batch, 1), generator=generator)
        tokens = ((start + torch.arange(args.seq + 1)) % args.vocab).to(device)
        logits = model(tokens[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, args.vocab), tokens[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        scheduler.step()
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            print(f"step {step:4d}  loss {loss.item():.4f}  grad norm {opt.last_grad_norm:.3f}", flush=True)
    # FSDP2's modules hold the process group in reference cycles: free them and let every rank finish its
    # collectives first, or a gloo thread may still be working while Python shuts down (which aborts the process).
    del model, opt, scheduler
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
