"""Human-readable rendering of `lopd stats` (the JSON form is the models themselves)."""

from __future__ import annotations

from lopd.storage.stats import ConsistencyStats, CoverageStats, Distribution


def _dist(d: Distribution | None, fmt: str = "{:.0f}") -> str:
    if d is None or d.count == 0:
        return "-"
    q = d.quantiles
    f = lambda v: "-" if v is None else fmt.format(v)  # noqa: E731
    return f"min {f(d.min)}  p50 {f(q.get('p50'))}  p90 {f(q.get('p90'))}  p99 {f(q.get('p99'))}  max {f(d.max)}"


def _parts(indices: list[int]) -> str:
    """Part indices as ranges: [0, 1, 2, 5] -> "parts 0-2, 5"."""
    ranges: list[list[int]] = []
    for i in indices:
        if ranges and ranges[-1][1] == i - 1:
            ranges[-1][1] = i
        else:
            ranges.append([i, i])
    text = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in ranges)
    return ("part " if len(indices) == 1 else "parts ") + text


def render_text(cov: CoverageStats, con: ConsistencyStats | None) -> str:
    lines = [f"dataset {cov.dataset}" + (f" v{cov.version}" if cov.version is not None else " (not published yet)")]
    lines.append("coverage")
    lines.append(f"  input records     {cov.input_records}")
    lines.append(f"  scored            {cov.scored}")
    lines.append(f"  skipped           {cov.skipped}")
    for reason, n in sorted(cov.skipped_by_reason.items(), key=lambda kv: -kv[1]):
        lines.append(f"    {n:>6}  {reason}")
    lines.append(f"  response tokens   {cov.num_response_tokens}   (prompt tokens {cov.num_prompt_tokens})")
    lines.append(f"  response length   {_dist(cov.response_length)}")
    lines.append(f"  prompt length     {_dist(cov.prompt_length)}")
    bpt = f"{cov.bytes_per_response_token:.2f} B/response token" if cov.bytes_per_response_token else "-"
    lines.append(f"  shards            {cov.shards}   {cov.bytes:,} bytes   {bpt}")
    for run in cov.in_progress:
        lines.append(
            f"  in progress       run {run.run_key[:16]}: {run.parts_done}/{run.parts_total} parts, "
            f"{run.samples_done}/{run.samples_total} samples"
        )
    for group in cov.scored_with if len(cov.scored_with) > 1 or any(g.settings for g in cov.scored_with) else []:
        settings = " ".join(f"{k}={v}" for k, v in sorted(group.settings.items())) or "not recorded"
        lines.append(f"  scored with       {settings} ({_parts(group.parts)})")
    if len(cov.scored_with) > 1:
        lines.append(f"{'':20}(resumed with other batch budgets: those parts may differ within float rounding)")
    if con is None:
        return "\n".join(lines)
    lines.append("consistency")
    lines.append(f"  verdict           {con.verdict.upper()}: {con.explanation}")
    lines.append(f"  teacher           {con.teacher_fingerprint}")
    lines.append(f"  SFT-data teacher  {con.sft_teacher_fingerprint}")
    lines.append(f"  tokenizer         {con.tokenizer_fingerprint}")
    checked = "checked" if con.rollout_tokenizer_checked else "NOT declared: assumed equal to the teacher's"
    lines.append(f"  rollout tokenizer {con.rollout_tokenizer_fingerprint or '-'} ({checked})")
    lines.append(f"  rollout policy    {con.rollout_policy_fingerprint or '-'}")
    lines.append(f"  temperature       {con.temperature}")
    d = con.teacher_logprobs
    mean = "-" if d.mean is None else f"{d.mean:.4f}"
    lines.append(f"  teacher log-prob  mean {mean}  {_dist(d, '{:.3f}')}")
    if con.share_below_log_1e_4 is not None:
        lines.append(f"  tokens with teacher p < 1e-4: {100 * con.share_below_log_1e_4:.2f}%")
    if con.rollout_vs_teacher is not None:
        r = con.rollout_vs_teacher
        lines.append(
            f"  KL(rollout || teacher) estimate {r.kl_rollout_teacher_estimate:.4f} nats/token "
            f"(mean rollout lp {r.mean_rollout_logprob:.4f}, teacher lp {r.mean_teacher_logprob:.4f}, "
            f"{r.tokens} tokens)"
        )
    if con.per_teacher:
        lines.append(f"  per teacher       {len(con.per_teacher)} routed teachers (each on its own samples)")
        lines.extend(_per_teacher(con))
    total = sum(b.count for b in con.teacher_logprob_histogram) or 1
    lines.append("  teacher log-prob histogram")
    for b in con.teacher_logprob_histogram:
        bar = "#" * max(1, round(40 * b.count / total)) if b.count else ""
        label = f"< {b.hi:.0f}" if b.lo <= -20 else f"[{b.lo:.0f}, {b.hi:.0f})"
        lines.append(f"    {label:>9} {b.count:>9}  {bar}")
    return "\n".join(lines)


def _per_teacher(con: ConsistencyStats) -> list[str]:
    """A multi-teacher dataset's routes: verdict, size and log-prob summary, then the fingerprints, per route."""
    lines = []
    for t in con.per_teacher:
        mean = "-" if t.mean_teacher_logprob is None else f"{t.mean_teacher_logprob:.4f}"
        below = "" if t.share_below_log_1e_4 is None else f", p < 1e-4: {100 * t.share_below_log_1e_4:.2f}%"
        lines.append(
            f"    {t.key!r}: {t.verdict.upper()}, {t.samples} samples, {t.tokens} tokens, teacher log-prob mean "
            f"{mean}{below}"
        )
        lines.append(f"      teacher           {t.teacher_fingerprint}")
        lines.append(f"      SFT-data teacher  {t.sft_teacher_fingerprint}")
        if t.rollout_vs_teacher is not None:
            r = t.rollout_vs_teacher
            lines.append(
                f"      KL(rollout || teacher) estimate {r.kl_rollout_teacher_estimate:.4f} nats/token "
                f"({r.tokens} tokens)"
            )
    return lines
