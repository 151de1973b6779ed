"""Merge strategies and the explicit registries (STYLE §1: plain dicts written out here).

* ``STRATEGIES``: every strategy class by name.
* ``METHODS``: strategies that are a ``deploy`` choice of their own (the DFCMM methods of SPEC §3,
  MetaMerge); they assume init ``zs``. Deploy ``ft``/``ema``/``all`` is the TIME policy.
* Techniques (f_merge) have their own registry in ``techniques.TECHNIQUES``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mergewatch.strategies.base import BufferNeed, Pass, PassOutput, StepContext, Strategy, TensorInputs, TensorMeta, ViewSource
from mergewatch.strategies.continual import ContinualMagMax, ContinualTaskArithmetic, ContinualTIES, ContinualWeightAverage
from mergewatch.strategies.metamerge import MetaMerge, MetaMergeGNN
from mergewatch.strategies.nufilt import NuFILT
from mergewatch.strategies.opcm import OPCM
from mergewatch.strategies.techniques import TECHNIQUES, Technique
from mergewatch.strategies.time_policy import TimePolicy
from mergewatch.strategies.wudi import WUDI

if TYPE_CHECKING:
    from mergewatch.config import PolicySettings

#: deploy name -> strategy class (each declares its hyper-parameters: ``param_defs``)
METHODS: dict[str, type[Strategy]] = {
    "opcm": OPCM,
    "continual_wa": ContinualWeightAverage,
    "continual_ta": ContinualTaskArithmetic,
    "continual_ties": ContinualTIES,
    "continual_magmax": ContinualMagMax,
    "nufilt": NuFILT,
    "wudi": WUDI,
    "metamerge": MetaMerge,
    "metamerge_gnn": MetaMergeGNN,  # opt-in NiNo-GNN variant (METAMERGE §9)
}

#: every strategy class by name (deploy ft/ema/all are the TIME policy)
STRATEGIES: dict[str, type[Strategy]] = {"time": TimePolicy, **METHODS}


def build_technique(name: str, params: dict, weaving: dict | None = None) -> Technique:
    tech = TECHNIQUES[name](**params)
    if weaving is not None:
        from mergewatch.strategies.weaving import WeightWeaving

        tech = WeightWeaving(tech, **weaving)
    return tech


def build_strategy(policy: "PolicySettings") -> Strategy:
    """The strategy a validated policy describes."""
    if policy.deploy in METHODS:
        return METHODS[policy.deploy](policy.params)
    technique = build_technique(policy.technique, dict(policy.technique_params), policy.weaving)
    params = {"init": policy.init, "deploy": policy.deploy, **policy.params}
    if policy.lines is not None:
        params["lines"] = dict(policy.lines)
    return TimePolicy(params, technique)


__all__ = [
    "METHODS",
    "STRATEGIES",
    "TECHNIQUES",
    "BufferNeed",
    "Pass",
    "PassOutput",
    "StepContext",
    "Strategy",
    "TensorInputs",
    "TensorMeta",
    "ViewSource",
    "build_strategy",
    "build_technique",
]
