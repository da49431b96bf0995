"""Open a run directory with the reader API and compute a statistic of your own.

For every replayed checkpoint: the share of G carried by the 10% of pairs with the
largest |contribution|, and how strongly a pair's contribution follows its weight ω.

    python examples/custom_statistic.py runs/demo
"""

import sys

import numpy as np
from scipy import stats

from graddyn.store.reader import RunReader


def main(run_dir: str) -> None:
    run = RunReader(run_dir)
    print(f"{run_dir}: {len(run.steps)} captured steps, loss {run.manifest['run']['loss']}")
    print(f"{'step':>6} {'G':>11} {'top-10% share':>14} {'spearman(ω, |c·δ|)':>20}")
    for record in run.alignment()["checkpoints"]:
        items = run.item_alignment(record["step"])
        contribution = -items["coefficient"] * items["delta"]  # each item's share of G
        order = np.argsort(-np.abs(contribution))
        top = order[: max(1, len(order) // 10)]
        share = contribution[top].sum() / contribution.sum()
        rho = stats.spearmanr(items["weight"], np.abs(contribution)).statistic
        print(
            f"{record['step']:>6} {record['alignment']['whole']:>11.3e} {share:>14.2f} "
            f"{rho:>20.2f}"
        )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/demo")
