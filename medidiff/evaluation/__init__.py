"""Clinical evaluation: metrics with confidence intervals against references, tracked in MLflow.

    from medidiff.evaluation import evaluate
    result = evaluate("bone-suppression", "synthetic-cxr:test:20", baseline="identity")
    print(result.table())

Submodules: ``datasets`` (evaluation data), ``statistics`` (bootstrap CIs, paired tests),
``evaluate`` (the evaluation run), ``reader_study`` (blinded reader studies).
"""

from __future__ import annotations

from medidiff.evaluation.evaluate import EvaluationResult, evaluate

__all__ = ["EvaluationResult", "evaluate"]
