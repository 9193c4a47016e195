"""A/B analysis: lifts with CIs, CUPED, SRM, power / MDE, guardrails, decision, A/A mode.

- :mod:`flywheel.ab.delta`: the statistics of one metric (delta method, CUPED, tests).
- :mod:`flywheel.ab.analysis`: all metrics of a user-day table, SRM, multiplicity, decision.
- :mod:`flywheel.ab.aa`: A/A re-randomisation of a logged table (false-positive rate, KS).
- :mod:`flywheel.ab.paired`: counterfactual twins (both arms lived by the same users).
- :mod:`flywheel.ab.sequential`: always-valid daily monitoring (confidence sequences).
- :mod:`flywheel.ab.planner`: users x days and token cost each design needs for an MDE.

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
from flywheel.ab.paired import (
    PairedMetricResult,
    PairedResult,
    analyze_paired,
    is_twin_table,
    standard_view,
    variance_ratio,
)
from flywheel.ab.planner import Plan, format_plan, plan_experiment
from flywheel.ab.sequential import Look, SequentialResult, sequential_monitor

__all__ = [
    "AAMetricResult",
    "AAResult",
    "ABResult",
    "AnalysisConfig",
    "LiftEstimates",
    "Look",
    "MetricResult",
    "PairedMetricResult",
    "PairedResult",
    "Plan",
    "SRMResult",
    "SequentialResult",
    "aa_test",
    "analyze",
    "analyze_paired",
    "compare",
    "decide",
    "format_plan",
    "is_twin_table",
    "plan_experiment",
    "sequential_monitor",
    "srm_test",
    "standard_view",
    "variance_ratio",
]
