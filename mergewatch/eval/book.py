"""The evaluation record of one workspace: what needs evaluating, recording results, the deploy gate.

Shared by the daemon (results arrive from the evaluation worker) and the batch CLI (results computed
inline). The ledger's ``evaluations`` table is the source of truth: a row per attempt, the latest
row per (view, version) wins; ``EVAL.json`` in the version directory is written (atomically) after
the row. θ0 is evaluated once as view ``base``, version 0, step 0: it gives FWT's zero-shot
reference and the report's starting point.

Only the deploy view is evaluated (it is what inference servers load); the init view is what the
next expert is fine-tuned from and is never held back by the gate.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from mergewatch.eval import runner


@dataclass(frozen=True)
class EvalJob:
    view: str  # "deploy" | "base"
    version: int
    step: int
    path: str  # version directory (or θ0's checkpoint)

    @property
    def key(self) -> tuple[str, int]:
        return (self.view, self.version)


class EvalBook:
    def __init__(self, settings, ledger, publishers: dict):
        self.settings = settings
        self.ledger = ledger
        self.publishers = publishers
        self.deploy = publishers["deploy"]

    @property
    def gate(self) -> float | None:
        return self.settings.eval.gate_max_drop

    # What to evaluate ---------------------------------------------------------------------------
    def latest_rows(self) -> dict[tuple[str, int], dict]:
        out: dict[tuple[str, int], dict] = {}
        for r in self.ledger.evaluations():
            out[(r["view"], r["version"])] = r
        return out

    def attempts(self, key: tuple[str, int]) -> int:
        return sum(1 for r in self.ledger.evaluations() if (r["view"], r["version"]) == key)

    def step_versions(self) -> list[tuple[int, int]]:
        """(step, deploy version) of every published step, by step (rollbacks are not steps)."""
        rows = self.ledger.steps(limit=1_000_000)
        return sorted((r["step"], r["deploy_version"]) for r in rows if r.get("deploy_version") is not None)

    def pending(self) -> list[EvalJob]:
        """Versions with no successful evaluation and attempts left (θ0 first, then by step)."""
        all_rows = self.ledger.evaluations()
        rows = {(r["view"], r["version"]): r for r in all_rows}  # the latest row per version wins
        tries = Counter((r["view"], r["version"]) for r in all_rows)
        limit = 1 + self.settings.eval.retries
        jobs = [EvalJob(runner.BASE_VIEW, 0, 0, str(self.settings.base))]
        published = set(self.deploy.versions())
        for step, version in self.step_versions():
            if version in published:
                jobs.append(EvalJob("deploy", version, step, str(self.deploy.path(version))))
        out = []
        for job in jobs:
            row = rows.get(job.key)
            if row is not None and row["metrics"].get("status") == "ok":
                continue
            if tries[job.key] >= limit:
                continue
            out.append(job)
        return out

    # Recording ----------------------------------------------------------------------------------
    def _experts_by_step(self) -> list[tuple[int, str, dict]]:
        merged = sorted((e for e in self.ledger.experts("merged") if e.step), key=lambda e: e.step)
        return [(e.step, e.name, e.meta) for e in merged]

    def record(self, job: EvalJob, ok: bool, result) -> dict:
        """Record one evaluation attempt (``result``: the runner's dict, or the error text)."""
        if not ok:
            row = {"status": "failed", "error": str(result)[:2000], "evaluator": self.settings.eval.evaluator,
                   "attempt": self.attempts(job.key) + 1}
            self.ledger.add_evaluation(job.view, job.version, job.step, row)
            return row
        rows = self.latest_rows()
        ok_rows = {k: r for k, r in rows.items() if r["metrics"].get("status") == "ok"}
        base = ok_rows.get((runner.BASE_VIEW, 0))
        zero_shot = {k: v["accuracy"] for k, v in base["metrics"]["tasks"].items()} if base else None
        if job.view == runner.BASE_VIEW:
            summary = runner.summarize(0, result["tasks"], [], {}, self.settings.eval, zero_shot=None)
        else:
            trained = runner.trained_at([e for e in self._experts_by_step() if e[0] <= job.step], self.settings.eval)
            earlier = [runner.StepEval(r["step"], r["metrics"]["tasks"]) for (view, _), r in ok_rows.items() if view == "deploy"]
            summary = runner.summarize(job.step, result["tasks"], earlier, trained, self.settings.eval, zero_shot)
        row = {"status": "ok", **result, **summary, "held_back": False, "gate_reason": ""}
        if job.view == "deploy" and self.gate is not None:
            promote, reason = self.gate_check(job, row)
            row["held_back"] = not promote
            row["gate_reason"] = reason
        self.ledger.add_evaluation(job.view, job.version, job.step, row)
        if job.view == "deploy" and job.version in self.deploy.versions():
            self.deploy.write_eval(job.version, runner.eval_document(job.view, job.version, job.step, row))
        return row

    # Gate ---------------------------------------------------------------------------------------
    def tasks_of_version(self, version: int | None) -> dict | None:
        """Per-task results of a deploy version (a rollback's come from the version it republished)."""
        seen = set()
        rows = self.latest_rows()
        while version is not None and version not in seen:
            seen.add(version)
            r = rows.get(("deploy", version))
            if r is not None and r["metrics"].get("status") == "ok":
                return r["metrics"]["tasks"]
            try:
                version = self.deploy.manifest(version).get("rolled_back_from")
            except Exception:  # noqa: BLE001 - gone or unreadable: nothing to compare with
                return None
        return None

    def gate_check(self, job: EvalJob, row: dict) -> tuple[bool, str]:
        current = self.deploy.current()
        if current is not None and current >= job.version:
            return True, f"version {current} is already current"
        return runner.gate_decision(row["tasks"], row.get("task_order", []), self.tasks_of_version(current), self.gate)

    def apply_gate(self, job: EvalJob, row: dict) -> bool:
        """Move ``current`` to the evaluated version when the gate lets it (newer than current only)."""
        if job.view != "deploy" or self.gate is None or row.get("status") != "ok" or row.get("held_back"):
            return False
        current = self.deploy.current()
        if current is not None and current >= job.version:
            return False
        if job.version not in self.deploy.versions():
            return False
        self.deploy.promote(job.version)
        return True

    def settle(self, job: EvalJob, row: dict) -> str | None:
        """The gate's outcome for a recorded evaluation, with its ledger event: ``"held_back"``,
        ``"promoted"`` (now current) or ``None`` (failed, no gate, or nothing to move)."""
        if row.get("status") != "ok":
            return None
        if row.get("held_back"):
            outcome = "held_back"
        elif self.apply_gate(job, row):
            outcome = "promoted"
        else:
            return None
        self.ledger.record_event(outcome, step=job.step, version=job.version, data={"reason": row["gate_reason"]})
        return outcome

    def conclude(self, job: EvalJob, ok: bool, result) -> tuple[dict, str | None]:
        """An evaluation's whole bookkeeping, for the daemon and the batch CLI: the attempt recorded
        (``record``) and the gate settled on it (``settle``); returns ``(row, gate outcome)``."""
        row = self.record(job, ok, result)
        return row, self.settle(job, row)

    def held_back(self) -> list[dict]:
        """Published deploy versions newer than current that the gate held back (with the reason)."""
        current = self.deploy.current() or 0
        out = []
        for (view, version), r in sorted(self.latest_rows().items()):
            if view == "deploy" and version > current and r["metrics"].get("held_back"):
                out.append({"version": version, "step": r["step"], "reason": r["metrics"].get("gate_reason", "")})
        return out

    def waiting(self) -> list[int]:
        """With the gate on: published deploy versions newer than current not evaluated yet."""
        if self.gate is None:
            return []
        current = self.deploy.current() or 0
        rows = self.latest_rows()
        return [v for _, v in self.step_versions() if v > current and rows.get(("deploy", v), {}).get("metrics", {}).get("status") != "ok"]


    # Views of the record ------------------------------------------------------------------------
    def matrix_document(self) -> dict:
        """The accuracy matrix and per-step metrics as JSON-ready data (batch ``merge``, ``status``)."""
        from mergewatch.eval import metrics as M

        rows = self.latest_rows()
        ok = {k: r for k, r in rows.items() if r["metrics"].get("status") == "ok"}
        steps = [(s, v) for s, v in self.step_versions() if ("deploy", v) in ok]
        trained = runner.trained_at(self._experts_by_step(), self.settings.eval)
        m = M.build_matrix([{"step": s, "tasks": ok[("deploy", v)]["metrics"]["tasks"]} for s, v in steps], list(trained), trained)
        base = ok.get((runner.BASE_VIEW, 0))
        per_step = []
        for s, v in steps:
            r = ok[("deploy", v)]["metrics"]
            per_step.append({"step": s, "version": v, **{k: r.get(k) for k in ("acc", "bwt", "bwt_denominator", "fwt", "a_ka", "a_zs", "gm", "held_back")}})
        return {
            "tasks": m.tasks,
            "steps": m.steps,
            "values": m.values,
            "zero_shot": {k: v["accuracy"] for k, v in base["metrics"]["tasks"].items()} if base else None,
            "held_out": runner.held_out_tasks(self.settings.eval),
            "per_step": per_step,
        }

    def status(self) -> dict:
        """``status --json``'s ``eval``: per deploy version ACC, BWT and per-task accuracy (latest row)."""
        out = {}
        for (view, version), r in sorted(self.latest_rows().items()):
            m = r["metrics"]
            key = "base" if view == runner.BASE_VIEW else str(version)
            entry = {"view": view, "version": version, "step": r["step"], "status": m.get("status")}
            if m.get("status") == "ok":
                entry.update({k: m.get(k) for k in ("acc", "bwt", "bwt_denominator", "fwt", "a_ka", "a_zs", "gm", "held_back", "gate_reason")})
                entry["tasks"] = {k: v["accuracy"] for k, v in m["tasks"].items()}
            else:
                entry["error"] = m.get("error")
            out[key] = entry
        return out
