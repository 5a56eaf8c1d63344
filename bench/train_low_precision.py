"""Training quality of the low-memory modes: the character-level GPT of fusedopt.bench.char_gpt trained with AdamW
- fp32: fp32 parameters and states (the reference run);
- bf16 + fp32 master: bf16 parameters with fp32 master weights (master_weights=True, 4 extra bytes per parameter);
- bf16 + Kahan: master_weights="kahan" (a bf16 compensation buffer, 2 bytes per parameter);
- bf16 + stochastic: master_weights="stochastic" (stochastic rounding of the parameter writes, no memory);
- bf16 plain: bf16 parameters rounded to nearest, nothing else (the failure mode: updates below half an ulp are lost);
- bf16 states: fp32 parameters with bf16 optimizer states (state_dtype=torch.bfloat16);
- 8-bit states: fp32 parameters with 8-bit optimizer states (state_dtype="8bit", about 2 bytes per parameter);
- bf16 + stochastic + 8-bit states: the smallest mode, bf16 parameters rounded stochastically with 8-bit states.
Same initialization (drawn in fp32) and batches for every mode. Writes the loss curves, final losses and a plot under
bench/results/.

    python bench/train_low_precision.py [--steps 400] [--seeds 0 1] [--lr 1e-3] [--name low-precision-training]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import fusedopt
import torch
from fusedopt.bench.char_gpt import plot_losses, train

RESULTS = Path(__file__).resolve().parent / "results"
BF16 = torch.bfloat16
# name -> (parameter dtype, fusedopt.AdamW keywords beyond lr/betas/weight_decay)
MODES: dict[str, tuple[torch.dtype, dict[str, Any]]] = {
    "fp32": (torch.float32, {}),
    "bf16 + fp32 master": (BF16, {"master_weights": True}),
    "bf16 + Kahan": (BF16, {"master_weights": "kahan"}),
    "bf16 + stochastic": (BF16, {"master_weights": "stochastic"}),
    "bf16 plain": (BF16, {}),
    "bf16 states": (torch.float32, {"state_dtype": BF16}),
    "8-bit states": (torch.float32, {"state_dtype": "8bit"}),
    "bf16 + stochastic + 8-bit states": (BF16, {"master_weights": "stochastic", "state_dtype": "8bit"}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--name", default="low-precision-training")
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {name: [] for name in MODES}
    for seed in args.seeds:
        for name, (dtype, options) in MODES.items():
            start = time.perf_counter()

            def make(model: torch.nn.Module, options: dict[str, Any] = options) -> list[torch.optim.Optimizer]:
                return [fusedopt.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95),
                                       weight_decay=args.weight_decay, **options)]

            losses, held_out = train(make, args.steps, seed=seed, dtype=dtype)
            tail = sum(losses[-20:]) / len(losses[-20:])
            runs[name].append({"seed": seed, "losses": losses, "final_train": tail, "held_out": held_out,
                               "seconds": time.perf_counter() - start})
            print(f"seed {seed} {name:20s} train {tail:.4f}  held-out {held_out:.4f}", flush=True)
    base = sum(r["held_out"] for r in runs["fp32"]) / len(runs["fp32"])
    master = sum(r["held_out"] for r in runs["bf16 + fp32 master"]) / len(runs["bf16 + fp32 master"])
    summary = {}
    for name, rs in runs.items():
        held = sum(r["held_out"] for r in rs) / len(rs)
        summary[name] = {"held_out": held, "final_train": sum(r["final_train"] for r in rs) / len(rs),
                         "vs_fp32": held / base - 1, "vs_fp32_master": held / master - 1}
    RESULTS.mkdir(exist_ok=True)
    info = {"steps": args.steps, "seeds": args.seeds, "lr": args.lr, "weight_decay": args.weight_decay,
            "torch": torch.__version__, "fusedopt": fusedopt.__version__}
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"info": info, "summary": summary, "runs": runs}, indent=1))
    lines = [f"# Low-memory modes: character-level GPT, AdamW lr {args.lr}, weight decay {args.weight_decay}, "
             f"{args.steps} steps, seeds {args.seeds}", "",
             "| mode | held-out loss (mean) | vs fp32 | vs bf16 + fp32 master | train loss, last 20 steps |",
             "|---|---|---|---|---|"]
    lines += [f"| {name} | {s['held_out']:.4f} | {s['vs_fp32']:+.2%} | {s['vs_fp32_master']:+.2%} | "
              f"{s['final_train']:.4f} |" for name, s in summary.items()]
    command = " ".join(["python bench/train_low_precision.py", *sys.argv[1:]])
    lines += ["", f"Command: `{command}`."]
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    if plot_losses(runs, str(RESULTS / f"{args.name}.png"),
                   "Character-level GPT, AdamW: parameter and state precision", 20,
                   dashed=("bf16 + Kahan", "bf16 + stochastic"), top=4.0):
        print(f"wrote {RESULTS / args.name}.json, .md, .png")


if __name__ == "__main__":
    main()
