"""The tuning rule, fixed before any result: both headline arms stable, then the best mean validation accuracy."""

from __future__ import annotations

from lopd.pipeline.tune import TuningRow, choose


def _row(lr: float, method: str, final: float, kl: float, stable: bool) -> TuningRow:
    return TuningRow(lr=lr, method=method, sft_accuracy=0.4, final_accuracy=final, best_accuracy=final,
                     sft_reverse_kl=0.5, final_reverse_kl=kl, stable=stable)  # fmt: skip


def test_the_best_rate_where_both_arms_are_stable_is_chosen():
    rows = [
        _row(1e-5, "lightning_opd", 0.45, 0.4, True), _row(1e-5, "online_opd", 0.46, 0.4, True),
        _row(3e-5, "lightning_opd", 0.55, 0.3, True), _row(3e-5, "online_opd", 0.57, 0.3, True),
        # the best online accuracy, but Lightning OPD collapses here: not eligible
        _row(1e-4, "lightning_opd", 0.05, 2.0, False), _row(1e-4, "online_opd", 0.70, 0.2, True),
    ]  # fmt: skip
    assert choose(rows) == (3e-5, None)
    assert choose([r for r in rows if r.lr == 1e-4]) is None
    # With TIS, the collapsing rate is stable and better: chosen, TIS cap included.
    tis = [r.model_copy(update={"tis_cap": 2.0, "stable": True, "final_accuracy": 0.7}) for r in rows if r.lr == 1e-4]
    assert choose(rows + tis) == (1e-4, 2.0)
