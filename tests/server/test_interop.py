"""Export to and import from the reference Lightning-OPD (slime) Parquet layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import typer
from typer.testing import CliRunner

from lopd.cli.store import export_command, import_command
from lopd.errors import InvalidInput
from lopd.fingerprint import tokenizer_fingerprint
from lopd.storage.interop import export_lightning_opd, import_lightning_opd
from lopd.storage.manifest import Manifest
from lopd.storage.reader import Store
from tests.utils.factories import OTHER_FP, TEACHER_FP, provenance, publish_samples

VOCAB = 105  # the tiny char-level tokenizer
FIRST_PLAIN = 8  # ids 0-7 are special tokens


def _samples(n: int, seed: int, *, rollout_every: int | None = 3) -> dict[str, list]:
    """Real token ids of the tiny tokenizer; prompts avoid special ids so text round-trips exactly."""
    rng = np.random.default_rng(seed)
    out: dict[str, list] = {k: [] for k in ("ids", "prompts", "responses", "teacher", "rollout")}
    for i in range(n):
        p, r = int(rng.integers(1, 30)), int(rng.integers(1, 50))
        out["ids"].append(f"s-{i:04d}")
        out["prompts"].append(rng.integers(FIRST_PLAIN, VOCAB, p).astype(np.int32))
        out["responses"].append(rng.integers(0, VOCAB, r).astype(np.int32))
        # Full float32 precision, tiny and subnormal magnitudes included: widening must be exact.
        teacher = (-rng.gamma(1.0, 1.5, r)).astype(np.float32)
        teacher[0] = np.float32(-1e-42) if i % 5 == 0 else teacher[0]
        out["teacher"].append(teacher)
        has_rollout = rollout_every is not None and i % rollout_every != 0
        out["rollout"].append((-rng.gamma(1.0, 1.0, r)).astype(np.float32) if has_rollout else None)
    return out


def _build(store: Path, dataset: str, samples: dict[str, list], tok_fp: str, per_part: int = 8) -> Manifest:
    prov = provenance().model_copy(update={"tokenizer_fingerprint": tok_fp, "rollout_tokenizer_fingerprint": tok_fp})
    return publish_samples(store, dataset, samples, prov=prov, per_part=per_part)


@pytest.fixture()
def source(tmp_path: Path, tokenizer) -> tuple[Path, dict[str, list]]:  # type: ignore[no-untyped-def]
    samples = _samples(30, seed=7)
    store = tmp_path / "src"
    _build(store, "orig", samples, tokenizer_fingerprint(tokenizer))
    return store, samples


def _bits(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float32).view(np.uint32)


def test_round_trip_is_exact(tmp_path: Path, tokenizer, source) -> None:  # type: ignore[no-untyped-def]
    store, samples = source
    out = tmp_path / "ref.parquet"
    assert export_lightning_opd(store, "orig", out, tokenizer) == 30

    m = import_lightning_opd([out], tmp_path / "dst", "back", tokenizer, samples_per_part=7)
    assert m.num_samples == 30 and len(m.files) == 5
    table = Store(tmp_path / "dst").open("back").read_all().to_pydict()
    assert table["sample_id"] == samples["ids"]
    for i in range(30):
        assert table["response_ids"][i] == samples["responses"][i].tolist()
        assert table["prompt_ids"][i] == samples["prompts"][i].tolist()
        np.testing.assert_array_equal(_bits(table["teacher_logprobs"][i]), _bits(samples["teacher"][i]))
        if samples["rollout"][i] is None:
            assert table["rollout_logprobs"][i] is None
        else:
            np.testing.assert_array_equal(_bits(table["rollout_logprobs"][i]), _bits(samples["rollout"][i]))
    prov = m.provenance
    assert prov.tokenizer_fingerprint == tokenizer_fingerprint(tokenizer)
    assert prov.backend == "import:lightning-opd" and prov.dtype == "float64->float32"
    assert prov.rollout_logprobs_source == "mixed"
    assert prov.rollouts.records == 30

    # Importing the same bytes with the same settings again gives back the published version.
    again = import_lightning_opd([out], tmp_path / "dst", "back", tokenizer, samples_per_part=7)
    assert again.version == m.version and again.content_hash == m.content_hash


def test_export_has_reference_columns_and_types(tmp_path: Path, tokenizer, source) -> None:  # type: ignore[no-untyped-def]
    store, samples = source
    out = tmp_path / "ref.parquet"
    export_lightning_opd(store, "orig", out, tokenizer)
    schema = pq.read_schema(out)
    assert schema.names == ["prompt", "label", "metadata", "sample_id"]
    assert schema.field("prompt").type == pa.string()
    assert schema.field("label").type == pa.string()
    meta = schema.field("metadata").type
    assert pa.types.is_struct(meta)
    got = {meta.field(i).name: meta.field(i).type for i in range(meta.num_fields)}
    assert got == {
        "is_lightning_opd": pa.bool_(),
        "response_tokens": pa.list_(pa.int64()),
        "loss_mask": pa.list_(pa.int64()),
        "response": pa.string(),
        "teacher_log_probs": pa.list_(pa.float64()),
        "student_log_probs": pa.list_(pa.float64()),
    }
    rows = pq.read_table(out).to_pylist()
    first = rows[1]
    assert first["label"] == "" and first["sample_id"] == samples["ids"][1]
    assert first["prompt"] == tokenizer.decode(samples["prompts"][1].tolist(), skip_special_tokens=False)
    md = first["metadata"]
    assert md["is_lightning_opd"] is True
    assert md["response_tokens"] == samples["responses"][1].tolist()
    assert md["loss_mask"] == [1] * len(samples["responses"][1])
    assert md["response"] == tokenizer.decode(samples["responses"][1].tolist(), skip_special_tokens=False)
    assert md["teacher_log_probs"] == [float(x) for x in samples["teacher"][1]]
    assert rows[0]["metadata"]["student_log_probs"] is None  # sample 0 has no rollout log-probs


def test_export_without_rollout_logprobs_omits_student_field(tmp_path: Path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    samples = _samples(5, seed=1, rollout_every=None)
    _build(tmp_path / "s", "d", samples, tokenizer_fingerprint(tokenizer))
    out = tmp_path / "ref.parquet"
    export_lightning_opd(tmp_path / "s", "d", out, tokenizer)
    meta = pq.read_schema(out).field("metadata").type
    assert [meta.field(i).name for i in range(meta.num_fields)] == [
        "is_lightning_opd",
        "response_tokens",
        "loss_mask",
        "response",
        "teacher_log_probs",
    ]
    m = import_lightning_opd([out], tmp_path / "dst", "d", tokenizer)
    assert m.provenance.rollout_logprobs_source == "none"
    assert Store(tmp_path / "dst").open("d").read_all()["rollout_logprobs"].null_count == 5


def test_import_provenance_unknown_unless_fingerprints_given(tmp_path: Path, tokenizer, source) -> None:  # type: ignore[no-untyped-def]
    store, _ = source
    out = tmp_path / "ref.parquet"
    export_lightning_opd(store, "orig", out, tokenizer)
    dst = tmp_path / "dst"

    unknown = import_lightning_opd([out], dst, "a", tokenizer)
    assert unknown.provenance.teacher.fingerprint == "unknown"
    assert unknown.provenance.teacher.name_or_path is None
    assert unknown.provenance.sft_teacher_fingerprint == "unknown"
    assert unknown.provenance.consistency.verdict == "inconsistent"
    assert unknown.provenance.consistency.mismatch_allowed is True
    assert unknown.provenance.consistency.rollout_tokenizer_checked is False

    only_teacher = import_lightning_opd([out], dst, "b", tokenizer, teacher_fingerprint=TEACHER_FP)
    assert only_teacher.provenance.consistency.verdict == "inconsistent"

    different = import_lightning_opd(
        [out], dst, "c", tokenizer, teacher_fingerprint=TEACHER_FP, sft_teacher_fingerprint=OTHER_FP
    )
    assert different.provenance.consistency.verdict == "inconsistent"

    same = import_lightning_opd(
        [out], dst, "d", tokenizer, teacher_fingerprint=TEACHER_FP, sft_teacher_fingerprint=TEACHER_FP
    )
    assert same.provenance.consistency.verdict == "consistent"
    assert same.provenance.consistency.mismatch_allowed is False
    assert same.provenance.teacher.fingerprint == TEACHER_FP


def test_unknown_provenance_is_explained_with_the_import_fix(tmp_path: Path, tokenizer, source) -> None:  # type: ignore[no-untyped-def]
    """Bug 6: an import without fingerprints is not "built with --allow-teacher-mismatch", and the fix is an import."""
    from lopd.client.consistency import check_dataset_for_training
    from lopd.errors import TeacherMismatch
    from lopd.stats_text import render_text
    from lopd.storage import stats

    store, _ = source
    out = tmp_path / "ref.parquet"
    export_lightning_opd(store, "orig", out, tokenizer)
    dst = tmp_path / "dst"
    m = import_lightning_opd([out], dst, "a", tokenizer)
    assert m.provenance.consistency.verdict == "inconsistent"  # the API's verdict values are unchanged

    con = stats.consistency(dst, "a")
    assert con.verdict == "inconsistent" and con.provenance_known is False
    assert "provenance unknown" in con.explanation
    text = render_text(stats.coverage(dst, "a"), con)
    verdict_line = next(line for line in text.splitlines() if "verdict" in line)
    assert "INCONSISTENT: provenance unknown" in verdict_line
    assert "lopd import --teacher-fingerprint FP --sft-teacher-fingerprint FP" in verdict_line
    assert "--allow-teacher-mismatch" not in text

    with pytest.raises(TeacherMismatch) as err:
        check_dataset_for_training(m.model_dump(mode="json"), allow_inconsistent=False)
    message = str(err.value)
    assert "provenance is unknown" in message and "--teacher-fingerprint FP --sft-teacher-fingerprint FP" in message
    assert "lopd precompute" not in message and "--allow-teacher-mismatch" not in message

    # A real mismatch still names the two teachers and the precompute fix.
    different = import_lightning_opd(
        [out], dst, "c", tokenizer, teacher_fingerprint=TEACHER_FP, sft_teacher_fingerprint=OTHER_FP
    )
    assert "lopd precompute" in stats.consistency(dst, "c").explanation
    with pytest.raises(TeacherMismatch, match="lopd precompute"):
        check_dataset_for_training(different.model_dump(mode="json"))
    assert stats.consistency(dst, "c").provenance_known is True


def _reference_table(rows: list[dict]) -> pa.Table:
    meta = pa.struct(
        [
            pa.field("is_lightning_opd", pa.bool_()),
            pa.field("response_tokens", pa.list_(pa.int64())),
            pa.field("loss_mask", pa.list_(pa.int64())),
            pa.field("response", pa.string()),
            pa.field("teacher_log_probs", pa.list_(pa.float64())),
        ]
    )
    schema = pa.schema([pa.field("prompt", pa.string()), pa.field("label", pa.string()), pa.field("metadata", meta)])
    return pa.Table.from_pylist(rows, schema=schema)


def _row(prompt: str, tokens: list[int], lps: list[float]) -> dict:
    md = {"is_lightning_opd": True, "response_tokens": tokens, "loss_mask": [1] * len(tokens)}
    return {"prompt": prompt, "label": "", "metadata": {**md, "response": "", "teacher_log_probs": lps}}


def test_import_refuses_mismatched_lengths_naming_the_row(tmp_path: Path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "bad.parquet"
    rows = [_row("abc", [10, 11], [-0.5, -1.0]), _row("xyz", [12, 13, 14], [-0.5, -1.0])]
    pq.write_table(_reference_table(rows), path)
    with pytest.raises(InvalidInput, match=r"row 1 \(sample 'row-1'\): 2 teacher_log_probs for 3 response_tokens"):
        import_lightning_opd([path], tmp_path / "dst", "d", tokenizer)
    assert not (tmp_path / "dst").exists()  # refused before anything was written


def test_import_refuses_null_values_naming_the_row(tmp_path: Path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "holes.parquet"
    rows = [_row("abc", [10, 11], [-0.5, -1.0]), _row("de", [12], [-0.5]), _row("xyz", [12, 13], [-0.5, None])]
    pq.write_table(_reference_table(rows), path)
    with pytest.raises(InvalidInput, match=r"row 2 \(sample 'row-2'\): null value in teacher_log_probs"):
        import_lightning_opd([path], tmp_path / "dst", "d", tokenizer)
    assert not (tmp_path / "dst").exists()


def test_import_without_sample_id_numbers_rows_across_files(tmp_path: Path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    pq.write_table(_reference_table([_row("hi", [20], [-0.25])]), a)
    pq.write_table(_reference_table([_row("yo", [21, 22], [-0.1, -0.2])]), b)
    m = import_lightning_opd([a, b], tmp_path / "dst", "d", tokenizer)
    t = Store(tmp_path / "dst").open("d").read_all().to_pydict()
    assert t["sample_id"] == ["row-0", "row-1"]
    assert t["prompt_ids"][0] == tokenizer("hi", add_special_tokens=False)["input_ids"]
    assert t["rollout_logprobs"] == [None, None]
    assert m.provenance.rollouts.records == 2 and m.provenance.rollout_logprobs_source == "none"


def _cli() -> typer.Typer:
    app = typer.Typer(pretty_exceptions_enable=False)
    app.command("export")(export_command)
    app.command("import")(import_command)
    return app


def test_cli_export_import(tmp_path: Path, tokenizer, tokenizer_dir: Path, source) -> None:  # type: ignore[no-untyped-def]
    store, samples = source
    out = tmp_path / "ref.parquet"
    runner = CliRunner()
    tok = str(tokenizer_dir)
    res = runner.invoke(_cli(), ["export", str(store), "--dataset", "orig", "--out", str(out), "--tokenizer", tok])
    assert res.exit_code == 0, res.output
    res = runner.invoke(
        _cli(),
        ["import", str(out), "--store", str(tmp_path / "dst"), "--dataset", "back", "--tokenizer", tok]
        + ["--teacher-fingerprint", TEACHER_FP, "--sft-teacher-fingerprint", TEACHER_FP],
    )
    assert res.exit_code == 0, res.output
    assert "teacher consistency: consistent" in res.output
    assert Store(tmp_path / "dst").open("back").manifest.num_samples == len(samples["ids"])

    res = runner.invoke(
        _cli(), ["export", str(store), "--dataset", "orig", "--out", str(out), "--tokenizer", tok, "--format", "x"]
    )
    assert res.exit_code == 2 and "error: unknown format 'x'" in res.output
    res = runner.invoke(_cli(), ["export", str(store), "--dataset", "nope", "--out", str(out), "--tokenizer", tok])
    assert res.exit_code == 2 and "error:" in res.output
