"""Sorscher et al.'s phase transition in the teacher-student perceptron (the theory setting).

    python bench/reproduce_phase_theory.py [--d 100] [--seeds 10] [--probe-noise 0.0]
        [--out-dir bench/measured/cpu-2026-12-02/pruning]

Writes ``theory.md`` (error(easy) - error(hard) per grid point, the winning policy, the crossover
training-set size per kept fraction) and ``theory.png`` (the heat map).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d", type=int, default=100)
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.5, 1, 2, 4, 8, 16, 32])
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.2, 0.4, 0.6, 0.8])
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--probe-noise", type=float, default=0.0)
    ap.add_argument("--out-dir", default="bench/measured/cpu-2026-12-02/pruning")
    args = ap.parse_args()
    import torch

    from fastdd.pruning.theory import phase_diagram

    torch.set_num_threads(2)
    t = time.perf_counter()
    diagram = phase_diagram(args.d, args.alphas, args.fractions, args.seeds, args.probe_noise, progress=True)
    seconds = time.perf_counter() - t
    os.makedirs(args.out_dir, exist_ok=True)
    diagram.plot(os.path.join(args.out_dir, "theory.png"))
    cross = diagram.crossover_alpha()
    lines = ["# The phase transition in the teacher-student perceptron", "",
             f"`python bench/reproduce_phase_theory.py --d {args.d} --seeds {args.seeds} --probe-noise "
             f"{args.probe_noise:g}` ({seconds:.0f} s). Gaussian inputs in d={args.d}, a random teacher, difficulty "
             "= distance to the teacher's boundary (probe noise 0: the ideal metric), logistic-regression students "
             f"on the kept fraction of P = alpha d examples, exact test error angle/pi, mean over {args.seeds} seeds.",
             "", "Cells: error(keep easy) - error(keep hard) in points of test error (positive: keeping the hard "
             "examples wins) and the best of easy / hard / random.", "", diagram.table(), "",
             "Crossover (smallest alpha of the grid from which keep-hard wins at every larger alpha): " +
             ", ".join(f"keep {f:.0%}: {'none' if a is None else f'alpha {a:g}'}" for f, a in zip(args.fractions, cross)),
             "", "![phase diagram](theory.png)", ""]
    with open(os.path.join(args.out_dir, "theory.md"), "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
