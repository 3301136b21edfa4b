"""The served store of the client tests (`served`) for the integrations too, and slime's stand-in."""

from __future__ import annotations

import importlib
import sys
from types import SimpleNamespace

import pytest

from tests.client.conftest import client_store, served, store_client  # noqa: F401
from tests.integrations.slime_contract import STUB


@pytest.fixture()
def slime(monkeypatch):
    """slime's modules (the stand-in), and a fresh `lopd.integrations.slime` (as in a restarted job)."""
    monkeypatch.syspath_prepend(str(STUB))
    for name in [m for m in sys.modules if m == "slime" or m.startswith("slime.")]:
        monkeypatch.delitem(sys.modules, name)
    module = importlib.import_module("lopd.integrations.slime")
    module._sources.clear()
    yield SimpleNamespace(
        module=module,
        types=importlib.import_module("slime.utils.types"),
        base=importlib.import_module("slime.rollout.base_types"),
    )
    module._sources.clear()
