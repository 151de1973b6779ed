"""TIME: temporal merging policies, init × deploy (SPEC §1; Dziadzio et al., CVPR 2025,
"How to merge your multimodal models over time?").

* init (what the next expert is fine-tuned from; published as the ``init`` view): ``zs`` θ0,
  ``ft`` latest expert, ``ema`` θ^EMA_t, ``all`` f_merge over all experts.
* deploy (what is served): ``ft``, ``ema``, ``all``.
* EMA: θ^EMA_t = f_merge([θ_t, θ^EMA_{t−1}]; θ0), new expert first, weight ``w`` on it (WA, SLERP);
  seed ``zs`` (θ^EMA_0 = θ0) or ``first`` (θ^EMA_1 = θ_1).
* ALL: one f_merge over every stored expert (weights 1/t, or a recency scheme for WA; optionally θ0
  as the oldest member).

The f_merge technique (and its λ, LiNeS schedule, Weight Weaving wrapper) is shared by the EMA and
ALL merges. Techniques that need whole-model scalars (global TIES trimming) get one prep pass per
statistic and merge job before the final pass; every other configuration is a single pass that
writes the EMA state and both views together.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from mergewatch.params import Param, validate
from mergewatch.strategies.base import (
    BufferNeed,
    Pass,
    PassOutput,
    StepContext,
    Strategy,
    TensorInputs,
    TensorMeta,
    ViewSource,
)
from mergewatch.strategies.techniques import LINES_PARAMS, WEIGHTS, MergeInputs, Technique, lines_scale, recency_weights

INITS = ("zs", "ft", "ema", "all")
DEPLOYS = ("ft", "ema", "all")
EMA_SEEDS = ("zs", "first")


def valid_combination(init: str, deploy: str) -> bool:
    """SPEC §1: every init × deploy pair except init zs with deploy ft (meaningless)."""
    return init in INITS and deploy in DEPLOYS and not (init == "zs" and deploy == "ft")


class TimePolicy(Strategy):
    """``params``: ``init``, ``deploy``, the declared ``param_defs`` (written in ``[policy]``) and
    ``lines`` (LiNeS' parameters, ``techniques.LINES_PARAMS``; absent: one λ)."""

    name = "time"
    paper = "Dziadzio et al., CVPR 2025, 'How to merge your multimodal models over time?'"
    param_defs = (
        Param("w", float, 0.5, "EMA: weight of the new expert (WA, SLERP)", min=0.0, max=1.0),
        Param("ema_seed", str, "zs", "EMA start: θ^EMA_0 = θ0 (zs) or θ^EMA_1 = θ_1 (first)", choices=EMA_SEEDS),
        Param("lambda", float, 1.0, "λ of the λ-scaled techniques (TA, TIES, DARE-*, Breadcrumbs, MagMax)", min=0.0),
        WEIGHTS,
        Param("include_base", bool, False, "ALL merge: θ0 as the oldest member"),
    )

    def __init__(self, params: Mapping[str, Any], technique: Technique):
        # ``params`` as written (describe() and the resume check record exactly these), checked
        self.params = dict(params)
        self.init = params["init"]
        self.deploy = params["deploy"]
        if not valid_combination(self.init, self.deploy):
            raise ValueError(f"invalid TIME combination init={self.init!r} deploy={self.deploy!r}")
        self.technique = technique
        own = validate({k: v for k, v in params.items() if k not in ("init", "deploy", "lines")}, self.param_defs, self.name)
        self.w = own["w"]
        self.ema_seed = own["ema_seed"]
        self.lam = own["lambda"]
        self.weights = own["weights"]
        self.include_base = own["include_base"]
        lines = params.get("lines")
        self.lines: dict | None = None if lines is None else validate(lines, LINES_PARAMS, "lines")
        self.jobs = tuple(j for j in ("ema", "all") if j in (self.init, self.deploy))

    # Declarations ------------------------------------------------------------------------------
    def buffer_need(self) -> BufferNeed:
        return BufferNeed.ALL if "all" in self.jobs else BufferNeed.NONE

    def state_sets(self, t: int) -> tuple[str, ...]:
        return ("ema",) if "ema" in self.jobs else ()

    def view_sources(self, ctx: StepContext) -> dict[str, str]:
        return {"deploy": "deploy", "init": ViewSource.BASE if self.init == "zs" else "init"}

    def next_meta(self, ctx: StepContext) -> dict:
        return {"t": ctx.t}

    def describe(self) -> dict:
        d = super().describe()
        d["technique"] = {"name": self.technique.name, "paper": self.technique.paper, **self.technique.params}
        return d

    # Merge jobs ------------------------------------------------------------------------------
    def _job_inputs(self, job: str, meta: TensorMeta, inp: TensorInputs, ctx: StepContext) -> MergeInputs:
        name = meta.name
        if job == "ema":
            running = inp.state["ema"] if ctx.t > 1 else inp.base
            models: Sequence[torch.Tensor] = [inp.expert, running]
            weights: list[float] | None = [self.w, 1.0 - self.w]
            ids = [ctx.expert_ids[-1], ctx.expert_ids[-1] + ":ema-running"]
        else:
            models = list(inp.experts)
            ids = list(ctx.expert_ids)
            if self.include_base:
                models = [inp.base, *models]
                ids = ["base", *ids]
            weights = recency_weights(len(models), self.weights) if self.technique.name == "wa" else None

        def generator(purpose: str, i: int, _ids=ids, _name=name) -> torch.Generator:
            return ctx.generator(_name, f"{job}:{purpose}", _ids[i] if i >= 0 else ctx.expert_ids[-1])

        lam = self.lam
        if self.lines is not None:
            lam = lines_scale(meta.role.block_index, ctx.model.n_blocks, **self.lines)
        return MergeInputs(
            name=name,
            role=meta.role,
            base=inp.base,
            models=models,
            weights=weights,
            lam=lam,
            generator=generator,
            scalars=ctx.scalars.get(job, {}),
        )

    def _ema_is_copy(self, ctx: StepContext) -> bool:
        return ctx.t == 1 and self.ema_seed == "first"

    def passes(self, ctx: StepContext) -> list[Pass]:
        passes: list[Pass] = []
        for job in self.jobs:
            if job == "ema" and self._ema_is_copy(ctx):
                continue
            n_models = 2 if job == "ema" else ctx.t + int(self.include_base)
            for prep in self.technique.prep_passes(n_models):
                passes.append(self._prep_pass(job, prep))
        sinks = ("deploy", *(("init",) if self.init != "zs" else ()), *self.state_sets(ctx.t))
        passes.append(
            Pass(
                name="merge",
                tensor_fn=self._final,
                writes=sinks,
                reads=self._reads(ctx),
                label=f"{self.technique.name} {'+'.join(self.jobs) or 'ft'}",
            )
        )
        return passes

    def _reads(self, ctx: StepContext) -> frozenset[str]:
        r = set()
        if "all" in self.jobs:
            r.add("experts")
        if "ema" in self.jobs and ctx.t > 1:
            r.add("state")
        return frozenset(r)

    def _prep_pass(self, job: str, prep) -> Pass:
        def tensor_fn(meta: TensorMeta, inp: TensorInputs, ctx: StepContext) -> PassOutput:
            return PassOutput(stats=prep.stats(self._job_inputs(job, meta, inp, ctx)))

        def reduce_fn(totals: dict, ctx: StepContext) -> dict:
            scalars = dict(ctx.scalars.get(job, {}))
            scalars.update(prep.finish(totals, scalars))
            return {job: scalars}

        return Pass(name=f"{job}:{prep.name}", tensor_fn=tensor_fn, reduce_fn=reduce_fn, reads=self._reads_for_prep(job), label=f"{job} {prep.name}")

    def _reads_for_prep(self, job: str) -> frozenset[str]:
        return frozenset({"experts"} if job == "all" else {"state"})

    def _final(self, meta: TensorMeta, inp: TensorInputs, ctx: StepContext) -> PassOutput:
        merged: dict[str, torch.Tensor] = {"ft": inp.expert}
        outputs = [self.deploy, *((self.init,) if self.init != "zs" else ()), *(("ema",) if "ema" in self.jobs else ())]
        if "ema" in self.jobs:
            merged["ema"] = inp.expert if self._ema_is_copy(ctx) else self.technique.merge(self._job_inputs("ema", meta, inp, ctx))
        if "all" in self.jobs:
            # The ALL merge comes last: it may overwrite the experts the engine handed over
            # (TensorInputs.owns; e.g. TIES computes τ_i in θ_i's buffer), except θ0 (also its
            # base) and any tensor another output still is (ft, or the EMA when it copies θ_1).
            x = self._job_inputs("all", meta, inp, ctx)
            taken = {id(inp.base), *(id(merged[o]) for o in outputs if o != "all")}
            x.owned = [inp.owns(m) and id(m) not in taken for m in x.models]
            merged["all"] = self.technique.merge(x)
        out = {"deploy": merged[self.deploy]}
        if self.init != "zs":
            out["init"] = merged[self.init]
        if "ema" in self.jobs:
            out["ema"] = merged["ema"]
        return PassOutput(tensors=out)
