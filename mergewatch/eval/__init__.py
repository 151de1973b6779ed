"""Evaluation of published versions (issue 9): settings, data, evaluators, metrics, report.

Imports are light here; ``mergewatch.eval.evaluators`` (torch models, transformers) is imported by
the evaluation worker only.
"""

from mergewatch.eval.base import EvalError, Evaluator
from mergewatch.eval.settings import EvalSettings, TaskSettings, parse_eval

__all__ = ["EvalError", "EvalSettings", "Evaluator", "TaskSettings", "parse_eval"]
