"""The client depends on the HTTP contract only: importing it must not load the server or the store."""

from __future__ import annotations

import subprocess
import sys

import pytest

CLIENT_MODULES = (
    "lopd.client",
    "lopd.client.errors",
    "lopd.client.types",
    "lopd.client.http",
    "lopd.client.sampler",
    "lopd.client.collate",
    "lopd.client.logprobs",
    "lopd.client.loss",
    "lopd.client.consistency",
    "lopd.client.loader",
    "lopd.client.torch_dataset",
    "lopd.client.trainer",
    "lopd.client.config",
)


def _loaded_after(imports: str, prefixes: tuple[str, ...]) -> list[str]:
    code = f"import sys; {imports}; print(sorted(m for m in sys.modules if m.startswith({prefixes!r})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return eval(out.stdout.strip())


def test_client_never_imports_server_or_storage():
    imports = "; ".join(f"import {m}" for m in CLIENT_MODULES)
    imports += "; from lopd.client import StoreClient, OPDLoader, lightning_opd_loss, train_student"
    assert _loaded_after(imports, ("lopd.server", "lopd.storage")) == []


@pytest.mark.parametrize(
    "module", ["lopd.client", "lopd.client.http", "lopd.client.loader", "lopd.client.config", "lopd.cli"]
)
def test_light_modules_do_not_import_torch(module):
    # The HTTP client, the loader (numpy batches) and the command's registration must work (and start
    # fast) without torch; tests/test_install_paths.py runs them where torch cannot be imported at all.
    assert _loaded_after(f"import {module}", ("torch", "transformers", "fastapi", "duckdb")) == []
