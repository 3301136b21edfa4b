"""Multi-teacher datasets: each rollout record is scored by the teacher its routing key names.

`lopd precompute --teacher-map FILE` reads a map from a key (the value of each record's
`--teacher-key` field, `data_source` by default, as verl's `teacher_key` and TRL's `teacher_id`) to
that domain's teacher and SFT-data teacher:

    {"math": {"teacher": "/models/math-teacher", "sft_teacher": "/models/math-teacher"},
     "code": {"teacher": "/models/code-teacher", "sft_teacher": "/models/code-teacher"}}

(JSON, or the same in YAML). The dataset is ordered by route (the map's keys sorted, then input order
within a route), so each route is one contiguous range of dataset indices (`provenance.routes` records
it, with the route's teacher and its own consistency) and a worker loads one teacher at a time. A record
whose key the map does not route, or that has no such field, is an error naming the record, the key and
the fix: scoring it with some other teacher would silently break that domain's consistency.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lopd.errors import InvalidInput

from .rollouts import RolloutScan
from .rollouts.files import read_items


class TeacherRoute(BaseModel):
    """One entry of a teacher map: the teacher that scores a domain, and the model that made its SFT data."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    teacher: Path = Field(description="Teacher model directory for this key's records.")
    sft_teacher: str = Field(description="The model (directory or fingerprint) that generated this domain's SFT data.")


def load_teacher_map(path: Path) -> dict[str, TeacherRoute]:
    """The routes of a teacher map file (JSON, or YAML by its suffix), keys sorted.

    Raises `InvalidInput` saying what is wrong."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise InvalidInput(f"--teacher-map {path}: cannot read it ({e})") from e
    raw: Any
    if Path(path).suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as e:
            raise InvalidInput(
                f"--teacher-map {path}: YAML maps need PyYAML (pip install pyyaml); or write it as JSON"
            ) from e
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise InvalidInput(f"--teacher-map {path} is not valid YAML: {e}") from e
    else:
        try:
            raw = json.loads(text)
        except ValueError as e:
            raise InvalidInput(f"--teacher-map {path} is not valid JSON (YAML needs a .yaml suffix): {e}") from e
    if not isinstance(raw, Mapping) or not raw:
        raise InvalidInput(
            f"--teacher-map {path} must map each routing key to {{teacher, sft_teacher}}, e.g. "
            '{"math": {"teacher": "/models/math", "sft_teacher": "/models/math"}}'
        )
    routes: dict[str, TeacherRoute] = {}
    for key in sorted(raw, key=str):
        try:
            routes[str(key)] = TeacherRoute.model_validate(raw[key])
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'entry'}: {err['msg']}" for err in e.errors())
            raise InvalidInput(
                f"--teacher-map {path}: the entry for {key!r} needs a teacher and an sft_teacher ({problems})"
            ) from None
    return routes


@dataclass(frozen=True)
class RoutedScan:
    """A scan reordered by route: `scan.records[start:start + count]` are route `key`'s, for each entry of `ranges`."""

    scan: RolloutScan
    ranges: dict[str | None, tuple[int, int]]  # key -> (start, count), in dataset order


def route_records(scan: RolloutScan, field: str, routes: Mapping[str, TeacherRoute], map_path: Path) -> RoutedScan:
    """Read each valid record's `field`, refuse keys the map does not route, and order the records by route."""
    keys = record_keys(scan, field)
    unknown: dict[str | None, str] = {}
    for ref, key in zip(scan.records, keys):
        if key not in routes:
            unknown.setdefault(key, ref.id)
    if unknown:
        key, rid = next(iter(unknown.items()))
        what = f"has no {field!r} field" if key is None else f"has {field} {key!r}, which"
        more = (
            f" ({len(unknown) - 1} other unrouted key(s) too: {sorted(map(str, unknown))})" if len(unknown) > 1 else ""
        )
        known = ", ".join(repr(k) for k in routes)
        if key is None:
            raise InvalidInput(
                f"record {rid!r} {what}: every record of a multi-teacher dataset needs it to choose its teacher "
                f"(--teacher-key {field}; the map routes {known}){more}"
            )
        raise InvalidInput(
            f"record {rid!r} {what} --teacher-map {map_path} does not route (it routes {known}){more}. Add "
            f'"{key}": {{"teacher": ..., "sft_teacher": ...}} to the map, or leave these records out'
        )
    order = {k: i for i, k in enumerate(routes)}
    ranked = sorted(range(len(keys)), key=lambda i: (order[str(keys[i])], i))  # stable: input order within a route
    records = [scan.records[i] for i in ranked]
    ranges: dict[str | None, tuple[int, int]] = {}
    start = 0
    for key in routes:
        count = sum(1 for k in keys if k == key)
        ranges[key] = (start, count)
        start += count
    return RoutedScan(replace(scan, records=records), ranges)


def record_keys(scan: RolloutScan, field: str) -> list[str | None]:
    """Each valid record's `field` as a string (None where missing or null), in `scan.records` order."""
    out: list[str | None] = [None] * len(scan.records)
    by_source: dict[int, list[tuple[int, int]]] = {}
    for k, ref in enumerate(scan.records):
        by_source.setdefault(ref.source, []).append((k, ref.offset))
    for source, wanted in by_source.items():
        for k, item in read_items(scan.paths[source], wanted, (field,)):
            try:
                obj = item if isinstance(item, dict) else json.loads(item)
            except ValueError:
                obj = None  # unreachable for a record the scan accepted
            value = obj.get(field) if isinstance(obj, dict) else None
            out[k] = None if value is None else str(value)
    return out


def route_of_rows(ranges: Mapping[str | None, tuple[int, int]], rows: slice) -> list[tuple[str | None, slice]]:
    """The routes a run of dataset rows (a part) spans, each with its rows, in order."""
    out = []
    for key, (start, count) in ranges.items():
        lo, hi = max(start, rows.start), min(start + count, rows.stop)
        if lo < hi:
            out.append((key, slice(lo, hi)))
    return out
