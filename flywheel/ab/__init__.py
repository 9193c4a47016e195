"""A/B analysis: lifts with CIs, CUPED, SRM, power / MDE, guardrails, decision, A/A mode.

- :mod:`flywheel.ab.delta`: the statistics of one metric (delta method, CUPED, tests).
- :mod:`flywheel.ab.analysis`: all metrics of a user-day table, SRM, multiplicity, decision.
- :mod:`flywheel.ab.aa`: A/A re-randomisation of a logged table (false-positive rate, KS).

The input format is the user-day table of :mod:`flywheel.metrics`.
"""

from flywheel.ab.aa import AAMetricResult, AAResult, aa_test
from flywheel.ab.analysis import (
    ABResult,
    AnalysisConfig,
    MetricResult,
    SRMResult,
    analyze,
    decide,
    srm_test,
)
from flywheel.ab.delta import LiftEstimates, compare

__all__ = [
    "AAMetricResult",
    "AAResult",
    "ABResult",
    "AnalysisConfig",
    "LiftEstimates",
    "MetricResult",
    "SRMResult",
    "aa_test",
    "analyze",
    "compare",
    "decide",
    "srm_test",
]
