"""Settings reach what they configure (a setting that is accepted but ignored is a silent lie)."""

from __future__ import annotations

from pathlib import Path

from lopd.server.api.app import create_app
from lopd.server.api.settings import ServerSettings
from tests.utils.factories import build_dataset


def test_the_scrub_rate_reaches_the_catalog(tmp_path: Path) -> None:
    build_dataset(tmp_path / "store", "ds", n=4, per_part=4, seed=1)
    for rate in (0.0, 1234.0):
        app = create_app(ServerSettings(store=tmp_path / "store", scrub_bytes_per_s=rate))
        assert app.state.catalog.scrub_bytes_per_s == rate
