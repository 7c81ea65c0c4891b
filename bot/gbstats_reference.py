"""Runs GrowthBook's own ``gbstats`` on counts read from stdin: the reference for baselines.py.

gbstats 0.8.0 pins numpy<2 and pandas<2, so it lives in an environment of its own and this file
is run there as a plain script (it imports nothing from loopbot). Input: one JSON object
``{"alpha": 0.05, "tuning": 5000, "cases": [[n_a, x_a, n_b, x_b], ...]}`` where ``a`` is the
control; output: one JSON list of ``[low, high, p_value]`` per case, as
``SequentialTwoSidedTTest(...).compute_result()`` gives them for the absolute difference.
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    from gbstats.frequentist.tests import SequentialConfig, SequentialTwoSidedTTest
    from gbstats.models.statistics import ProportionStatistic

    request = json.load(sys.stdin)
    config = SequentialConfig(alpha=request["alpha"], difference_type="absolute",
                              sequential_tuning_parameter=request["tuning"])
    out = []
    for n_a, x_a, n_b, x_b in request["cases"]:
        test = SequentialTwoSidedTTest(ProportionStatistic(n=n_a, sum=x_a),
                                       ProportionStatistic(n=n_b, sum=x_b), config)
        result = test.compute_result()
        out.append([float(result.ci[0]), float(result.ci[1]), float(result.p_value)])
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
