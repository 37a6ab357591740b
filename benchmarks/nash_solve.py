"""Nash-MTL's solve: ours (one DPP program per task count, re-solved) against torchjd's NashMTL.

Both run the official implementation's sequence of convex programs (ECOS, ``optim_niter`` = 20,
warm-started from the previous solution); torchjd's program is not DPP, so cvxpy compiles it
again at every solve. For each k, both solvers see the same sequence of task Jacobians
(``--rounds`` of them, k×``--dim`` Gaussian rows with one conflicting pair) and carry their warm
start from round to round; ours gets G (as a step hands it), torchjd the Jacobian. A round times
one call of each, paired; the table shows the medians, the ratio (median over the rounds of
torchjd's time over ours), our first call (which compiles the program) and the largest
relative difference of the weights (they should agree to ECOS's precision). CPU time of the
process by default (``--clock process``), so the ratios hold on a loaded machine.

    uv run python benchmarks/nash_solve.py [--ks 3 10 40] [--rounds 5] [--dim 64]
        [--clock process|wall]

Prints a Markdown table and a one-line summary.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torchjd import aggregation as jd

from lightning_mtl.weighting import StepContext, build_weighting


def timed(clock, call, *args):
    start = clock()
    result = call(*args)
    return result, clock() - start


def measure(k: int, rounds: int, dim: int, clock) -> dict[str, float]:
    """Paired rounds at k tasks: our rule and torchjd's aggregator on the same Jacobians."""
    generator = torch.Generator().manual_seed(k)
    ours = build_weighting("nash_mtl", [f"t{i}" for i in range(k)])
    official = jd.NashMTL(n_tasks=k)
    present, losses, context = list(range(k)), torch.ones(k, dtype=torch.float64), StepContext()
    ratios, mine, theirs, first, worst = [], [], [], 0.0, 0.0
    for index in range(rounds + 1):
        jacobian = torch.randn(k, dim, generator=generator, dtype=torch.float64)
        jacobian[1] -= 0.5 * jacobian[0]
        gram = jacobian @ jacobian.T
        weights, ours_time = timed(clock, ours.gram_weights, gram, present, losses, context)
        expected, their_time = timed(clock, official.weighting, jacobian)
        worst = max(worst, float((weights - expected).norm() / expected.norm()))
        if index == 0:  # ours compiles its program here (once per task count)
            first = ours_time
            continue
        mine.append(ours_time)
        theirs.append(their_time)
        ratios.append(their_time / ours_time)
    return {
        "ours": statistics.median(mine),
        "torchjd": statistics.median(theirs),
        "ratio": statistics.median(ratios),
        "first": first,
        "worst": worst,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[3, 10, 40])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--clock", choices=["process", "wall"], default="process")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")  # cvxpy's "not DPP" notice on torchjd's program
    torch.set_num_threads(1)
    clock = time.process_time if args.clock == "process" else time.perf_counter
    print(f"Nash-MTL solve per step ({args.clock} time), {args.rounds} paired rounds, D={args.dim}")
    print()
    print("| k | ours (ms) | torchjd (ms) | torchjd / ours | our first call (ms) | max rel diff |")
    print("|---|---|---|---|---|---|")
    results = {}
    for k in args.ks:
        r = results[k] = measure(k, args.rounds, args.dim, clock)
        print(
            f"| {k} | {r['ours'] * 1e3:.1f} | {r['torchjd'] * 1e3:.1f} | {r['ratio']:.1f}× "
            f"| {r['first'] * 1e3:.0f} | {r['worst']:.1e} |",
            flush=True,
        )
    print()
    slowest = min(results, key=lambda k: results[k]["ratio"])
    verdict = "faster at every k" if results[slowest]["ratio"] >= 1 else "NOT faster at every k"
    print(
        f"summary: ours is {verdict} (smallest speed-up {results[slowest]['ratio']:.1f}× at "
        f"k={slowest}; largest {max(r['ratio'] for r in results.values()):.1f}×); weights agree "
        f"to {max(r['worst'] for r in results.values()):.0e}"
    )


if __name__ == "__main__":
    main()
