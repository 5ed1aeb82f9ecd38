"""How long the countdown solver takes per problem, on this machine (prints; never passes or fails).

    PYTHONPATH=. python bench/countdown_solver.py            # 200 random 4-number problems
    PYTHONPATH=. python bench/countdown_solver.py --numbers 5 --problems 20

Each problem is solved twice: cold (the sub-multiset tables cleared first) and warm (tables cached).
The unit tests count the tables instead (``test_solver_tabulates_each_sub_multiset_once...``).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from shared.tasks import countdown_solver


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--numbers", type=int, default=4, help="numbers per problem")
    parser.add_argument("--problems", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    cold: list[float] = []
    warm: list[float] = []
    for _ in range(args.problems):
        numbers, target = [rng.randint(1, 99) for _ in range(args.numbers)], rng.randint(10, 100)
        countdown_solver._table.cache_clear()
        for times in (cold, warm):
            t0 = time.perf_counter()
            countdown_solver.solve(numbers, target)
            times.append(time.perf_counter() - t0)
    for name, times in (("cold", cold), ("warm", warm)):
        ms = sorted(t * 1000 for t in times)
        print(f"{name}: median {statistics.median(ms):.2f} ms, p95 {ms[int(0.95 * (len(ms) - 1))]:.2f} ms, "
              f"max {ms[-1]:.2f} ms over {len(ms)} problems of {args.numbers} numbers")  # fmt: skip


if __name__ == "__main__":
    main()
