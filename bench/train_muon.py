"""Training quality of Muon's whole-model recipe: a character-level GPT (fusedopt.bench.char_gpt) trained with
- fusedopt: one fusedopt.Muon, its hidden matrices in a Muon group and the rest in a use_muon=False (AdamW) group;
- torch: torch.optim.Muon on the hidden matrices plus torch.optim.AdamW on the rest (the two-optimizer setup);
- adamw: torch.optim.AdamW on everything, for context.
Same initialization and batches for every recipe. Writes the loss curves and final losses as JSON and markdown, and a
plot, under bench/results/.

    python bench/train_muon.py [--steps 300] [--seeds 0 1 2] [--name muon-training]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import fusedopt
import torch
from fusedopt.bench.char_gpt import CharGPT, matrix_split, plot_losses, train

RESULTS = Path(__file__).resolve().parent / "results"
MUON_LR, ADAMW_LR, WEIGHT_DECAY, BETAS = 0.02, 3e-3, 0.01, (0.9, 0.95)


def fusedopt_recipe(model: CharGPT) -> list[torch.optim.Optimizer]:
    hidden, rest = matrix_split(model)
    return [fusedopt.Muon([{"params": hidden},
                           {"params": rest, "use_muon": False, "lr": ADAMW_LR, "betas": BETAS}],
                          lr=MUON_LR, weight_decay=WEIGHT_DECAY)]


def torch_recipe(model: CharGPT) -> list[torch.optim.Optimizer]:
    hidden, rest = matrix_split(model)
    return [torch.optim.Muon(hidden, lr=MUON_LR, weight_decay=WEIGHT_DECAY),
            torch.optim.AdamW(rest, lr=ADAMW_LR, betas=BETAS, weight_decay=WEIGHT_DECAY)]


def adamw_recipe(model: CharGPT) -> list[torch.optim.Optimizer]:
    return [torch.optim.AdamW(model.parameters(), lr=ADAMW_LR, betas=BETAS, weight_decay=WEIGHT_DECAY)]


RECIPES = {"fusedopt": fusedopt_recipe, "torch": torch_recipe, "adamw": adamw_recipe}


def smoothed(losses: list[float], window: int = 20) -> float:
    return sum(losses[-window:]) / len(losses[-window:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--name", default="muon-training")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    runs: dict[str, list[dict]] = {name: [] for name in RECIPES}
    for seed in args.seeds:
        for name, recipe in RECIPES.items():
            start = time.perf_counter()
            losses, held_out = train(recipe, args.steps, seed=seed)
            runs[name].append({"seed": seed, "losses": losses, "final_train": smoothed(losses),
                               "held_out": held_out, "seconds": time.perf_counter() - start})
            print(f"seed {seed} {name:9s} train {smoothed(losses):.4f}  held-out {held_out:.4f}", flush=True)
    summary = {name: {"held_out": sum(r["held_out"] for r in rs) / len(rs),
                      "final_train": sum(r["final_train"] for r in rs) / len(rs)} for name, rs in runs.items()}
    ratio = summary["fusedopt"]["held_out"] / summary["torch"]["held_out"]
    spread = [abs(a["held_out"] - b["held_out"]) / b["held_out"] for a, b in zip(runs["fusedopt"], runs["torch"])]
    RESULTS.mkdir(exist_ok=True)
    info = {"steps": args.steps, "seeds": args.seeds, "torch": torch.__version__, "fusedopt": fusedopt.__version__,
            "muon_lr": MUON_LR, "adamw_lr": ADAMW_LR, "weight_decay": WEIGHT_DECAY, "betas": BETAS}
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"info": info, "summary": summary, "runs": runs}, indent=1))
    lines = [f"# Muon whole-model recipe: character-level GPT, {args.steps} steps, seeds {args.seeds}", "",
             "| recipe | held-out loss (mean) | train loss, last 20 steps (mean) |", "|---|---|---|"]
    lines += [f"| {name} | {s['held_out']:.4f} | {s['final_train']:.4f} |" for name, s in summary.items()]
    lines += ["", f"fusedopt / torch held-out loss: {ratio:.4f} (per seed: "
              f"{', '.join(f'{x:.2%}' for x in spread)} apart).", "",
              "fusedopt: one fusedopt.Muon (Muon group + use_muon=False AdamW group); torch: torch.optim.Muon + "
              "torch.optim.AdamW; adamw: torch.optim.AdamW on everything. Command: `python bench/train_muon.py`."]
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    if plot_losses(runs, str(RESULTS / f"{args.name}.png"), "Character-level GPT: Muon whole-model recipe", 10,
                   dashed=("fusedopt",)):
        print(f"wrote {RESULTS / args.name}.json, .md, .png")


if __name__ == "__main__":
    main()
