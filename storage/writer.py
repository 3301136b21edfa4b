"""The writing protocol in one place: plan the parts, open staging, write the missing parts, publish.

Every writer of the store follows the steps of docs/store-format.md ("Writing protocol") through
`RunWriter`: the precompute job (which splits the parts over workers and scores between planning
and writing) and the importer of other layouts (which has every sample at hand, `write_run`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import IO

import pyarrow as pa

from .fs import StoreDir
from .manifest import Manifest
from .publish import find_published_run, publish
from .staging import PartPlan, RunPlan, Staging, missing_parts


class RunWriter:
    """One writer of one run: the staged plan, the parts already written, and publishing.

    Opening takes the run's worker lock (held until `close`, or until the writer is garbage-collected
    or its process ends: `lopd gc` never removes a run while it is held), stages `plan` (or checks it
    against the plan another worker already staged, raising `Conflict` when they differ) and finds
    the parts already written and intact; a damaged part is deleted so that it is written again.
    `plan` is the staged plan from then on.

    With `worker`, the writer also claims that worker index of the run exclusively (`Staging.claim_worker`):
    a second process claiming it gets `Conflict` before it scores anything.

    `scored_with` is written into every part's footer (`schema.META_SCORED_WITH`): the settings that
    may differ between workers or after a resume without changing the run key (batch budgets), so
    that parts whose numbers differ within float rounding say why.
    """

    def __init__(
        self,
        store: StoreDir,
        plan: RunPlan,
        *,
        scored_with: Mapping[str, object] | None = None,
        worker: int | None = None,
    ) -> None:
        self.staging = Staging(store, plan.dataset, plan.run_key)
        self._lock = self.staging.hold()
        self._worker_lock: IO[str] | None = None
        try:
            if worker is not None:
                self._worker_lock = self.staging.claim_worker(worker)
            self.plan = self.staging.open(plan)
            self.done = frozenset(self.staging.completed_parts(self.plan))
        except BaseException:
            self.close()
            raise
        self.scored_with = dict(scored_with) if scored_with else None

    def close(self) -> None:
        """Release the run's worker locks (idempotent)."""
        if self._worker_lock is not None:
            self._worker_lock.close()
        self._lock.close()

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def todo(self, parts: Sequence[PartPlan] | None = None) -> list[PartPlan]:
        """Of `parts` (default: every part of the plan), those not written when the run was opened."""
        return [p for p in (self.plan.parts if parts is None else parts) if p.index not in self.done]

    def write_part(self, index: int, table: pa.Table) -> StoreDir:
        """Write part `index` atomically (a table of `SAMPLE_SCHEMA` holding that part's samples)."""
        return self.staging.write_part(index, table, self.plan.provenance.teacher.fingerprint, self.scored_with)

    def missing_parts(self) -> list[int]:
        """Parts of any worker that do not exist yet; publish when there are none."""
        return missing_parts(self.staging, self.plan)

    def publish(self) -> Manifest:
        """Publish the run as the dataset's next version (`Corrupt` if a part is missing or damaged)."""
        return publish(self.staging, self.plan)


def write_run(store: StoreDir, plan: RunPlan, part_table: Callable[[PartPlan], pa.Table]) -> Manifest:
    """The whole protocol for a single writer: the published version of `plan`'s run, written now if needed.

    `part_table(part)` returns the samples of `part` (the rows `plan.part_rows(part.index)` of the
    run's samples); it is called only for parts not written yet. A run already published is returned
    as it is, without writing anything.
    """
    published = find_published_run(store, plan.dataset, plan.run_key)
    if published is not None:
        return published
    with RunWriter(store, plan) as run:
        for part in run.todo():
            run.write_part(part.index, part_table(part))
        return run.publish()
