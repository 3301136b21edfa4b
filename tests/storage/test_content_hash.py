"""Equal content, equal hash: the content hash depends on the samples only (bug 8)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from lopd.storage.reader import Store
from lopd.storage.schema import META_RUN_KEY, ContentHasher
from tests.utils.factories import publish_samples, random_samples


def test_same_samples_from_other_runs_have_the_same_content_hash(tmp_path: Path) -> None:
    samples = random_samples(50, seed=3)
    a = publish_samples(tmp_path, "a", samples, per_part=16, run_key="1" * 64)
    b = publish_samples(tmp_path, "b", samples, per_part=16, run_key="2" * 64)
    # The shards differ (their footers carry the run key) ...
    pa_meta = pq.read_schema(tmp_path / "a" / "v1" / "part-000000.parquet").metadata
    assert pa_meta[META_RUN_KEY] == b"1" * 64
    assert [f.sha256 for f in a.files] != [f.sha256 for f in b.files]
    # ... the content does not, and neither does its hash, whatever the part size.
    c = publish_samples(tmp_path, "c", samples, per_part=7, run_key="3" * 64)
    assert a.content_hash == b.content_hash == c.content_hash
    assert Store(tmp_path).open("a").read_all().equals(Store(tmp_path).open("c").read_all())


def test_any_change_of_a_value_changes_the_hash(tmp_path: Path) -> None:
    samples = random_samples(20, seed=4)
    base = publish_samples(tmp_path, "base", samples, run_key="1" * 64).content_hash

    def variant(name: str, edit) -> str:  # type: ignore[no-untyped-def]
        changed = {k: list(v) for k, v in samples.items()}
        edit(changed)
        return publish_samples(tmp_path, name, changed, run_key="2" * 64).content_hash

    def flip_last_bit(s: dict) -> None:
        lp = s["teacher"][5].copy()
        lp.view(np.uint32)[0] ^= 1
        s["teacher"][5] = lp

    hashes = {
        variant("bit", flip_last_bit),
        variant("id", lambda s: s["ids"].__setitem__(0, "other")),
        variant("token", lambda s: s["responses"].__setitem__(1, s["responses"][1] + 1)),
        variant("null", lambda s: s["rollout"].__setitem__(1, None)),
        variant("order", lambda s: [s[k].reverse() for k in s]),
    }
    assert base not in hashes and len(hashes) == 5


def test_hasher_streams_do_not_depend_on_how_tables_are_split(tmp_path: Path) -> None:
    publish_samples(tmp_path, "ds", random_samples(40, seed=5), per_part=40, run_key="1" * 64)
    table = Store(tmp_path).open("ds").read_all()
    whole, pieces = ContentHasher(), ContentHasher()
    whole.update(table)
    for start in (0, 3, 17, 30):
        pieces.update(table.slice(start, {0: 3, 3: 14, 17: 13, 30: 10}[start]))
    assert whole.hexdigest() == pieces.hexdigest()
    assert whole.rows == pieces.rows == 40
