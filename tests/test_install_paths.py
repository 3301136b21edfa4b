"""The README's install table, tested: each part runs on the install it promises, and fails clearly without it.

Each check runs in a subprocess where the packages a base install (`pip install lightning-opd`) does not
have are unimportable (`sys.modules[name] = None`, which `import` and `find_spec` treat as absent).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from lopd.server.api.background import serve_in_background
from lopd.server.api.settings import ServerSettings
from tests.utils.factories import build_dataset

ROOT = Path(__file__).resolve().parents[1]
# What no extra of the base install brings (the optional dependencies' import names).
NOT_IN_BASE = (
    "torch", "transformers", "tokenizers", "safetensors", "duckdb", "fastapi", "starlette", "uvicorn",
    "prometheus_client", "orjson", "matplotlib", "vllm", "peft",
)  # fmt: skip
PRELUDE = f"import sys\nfor _m in {NOT_IN_BASE!r}: sys.modules[_m] = None\n"
LOPD = PRELUDE + "from lopd.cli import app\napp(sys.argv[1:], prog_name='lopd')\n"


def base_install(code: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=300, cwd=ROOT
    )


def extras() -> dict[str, set[str]]:
    """Each extra of pyproject.toml with the import names it installs (extras it includes resolved)."""
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]

    def names(extra: str) -> set[str]:
        out: set[str] = set()
        for req in declared[extra]:
            dist = re.match(r"[A-Za-z0-9_.-]+", req).group(0)  # type: ignore[union-attr]
            if dist == "lightning-opd":
                for inner in re.search(r"\[(.*)\]", req).group(1).split(","):  # type: ignore[union-attr]
                    out |= names(inner.strip())
            else:
                out.add(dist.lower().replace("-", "_"))
        return out

    return {extra: names(extra) for extra in declared}


def test_the_client_runs_an_epoch_without_torch(tmp_path: Path) -> None:
    """`from lopd.client import StoreClient, OPDLoader` and one loader epoch, on the base install: numpy batches."""
    build_dataset(tmp_path / "store", "ds", n=23, per_part=8, seed=3)
    code = PRELUDE + (
        "import json, numpy as np\n"
        "from lopd.client import StoreClient, OPDLoader\n"
        "with StoreClient(sys.argv[1]) as client:\n"
        "    loader = OPDLoader(client, 'ds', 5, seed=1)\n"
        "    batches = list(loader)\n"
        "assert all(isinstance(b['input_ids'], np.ndarray) and b['input_ids'].dtype == np.int64 for b in batches)\n"
        "assert all(b['teacher_logprobs'].dtype == np.float32 for b in batches)\n"
        "try:\n"
        "    from lopd.client import lightning_opd_loss\n"
        "except ModuleNotFoundError as e:\n"
        "    refused = str(e)\n"
        "print(json.dumps({'indices': sorted(i for b in batches for i in b['index'].tolist()),\n"
        "                  'state': loader.state_dict()['epoch'], 'refused': refused,\n"
        "                  'loaded': sorted(m for m in sys.modules if sys.modules[m] is not None\n"
        "                                   and m.split('.')[0] in " + repr(NOT_IN_BASE) + ")}))\n"
    )
    with serve_in_background(ServerSettings(store=tmp_path / "store")) as server:
        done = base_install(code, server.base_url)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout)
    assert out["indices"] == list(range(23)) and out["state"] == 1 and out["loaded"] == []
    assert "lopd.client.lightning_opd_loss needs torch" in out["refused"] and "pip install torch" in out["refused"]


def test_asking_the_loader_for_tensors_without_torch_says_so() -> None:
    code = PRELUDE + (
        "from lopd.client import StoreClient, OPDLoader\n"
        "OPDLoader(StoreClient('http://127.0.0.1:9'), 'ds', 4, arrays='torch')\n"
    )
    done = base_install(code)
    assert done.returncode == 1 and "ModuleNotFoundError: OPDLoader(arrays='torch') needs torch" in done.stderr


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("install-paths")
    build_dataset(root / "store", "ds", n=4, per_part=4, seed=1)
    rollouts = root / "r.jsonl"
    rollouts.write_text(json.dumps({"id": "a", "prompt_ids": [5, 6], "response_ids": [7]}) + "\n")
    return {"store": root / "store", "model": tiny_llama_dir, "rollouts": rollouts, "out": root / "out"}


# (command line, the modules it needs that the message's extra must install)
COMMANDS = [
    ("stats {store} --dataset ds", {"duckdb"}),
    ("serve {store}", {"fastapi", "uvicorn"}),
    ("train --url http://127.0.0.1:9 --dataset ds --student {model} --out {out}/train", {"torch", "transformers"}),
    ("tiny-model {out}/tiny", {"torch", "transformers", "tokenizers"}),
    ("demo --run-dir {out}/demo --preset fast", {"torch", "transformers", "fastapi", "matplotlib"}),
    ("precompute {rollouts} --teacher {model} --sft-teacher {model} --store {out}/s --dataset d", {"transformers"}),
    ("verify {store} --dataset ds --teacher {model}", {"torch", "transformers"}),
    ("export {store} --dataset ds --out {out}/e.parquet --tokenizer {model}", {"transformers"}),
    ("fingerprint {model} --tokenizer", {"transformers"}),
    ("pipeline sft-data {model} {out}/sft.jsonl", {"torch", "transformers", "matplotlib"}),
]


@pytest.mark.parametrize(("command", "needs"), COMMANDS, ids=[c.split()[0] for c, _ in COMMANDS])
def test_a_command_without_its_extra_names_it(inputs: dict[str, Path], command: str, needs: set[str]) -> None:
    done = base_install(LOPD, *command.format(**inputs).split())
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr and done.stderr.startswith("error: "), done.stderr
    named = re.findall(r"pip install 'lightning-opd\[([\w-]+)\]'", done.stderr)
    assert len(named) == 1, done.stderr
    assert needs <= extras()[named[0]], f"[{named[0]}] does not install {needs - extras()[named[0]]}"


def test_the_light_commands_run_on_the_base_install(inputs: dict[str, Path]) -> None:
    assert base_install(LOPD, "--help").returncode == 0
    fingerprint = base_install(LOPD, "fingerprint", inputs["model"])  # reads safetensors headers itself
    assert fingerprint.returncode == 0 and fingerprint.stdout.startswith("sha256:"), fingerprint.stderr


def test_the_readme_install_table_names_real_extras() -> None:
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Install") : readme.index("## Precompute")]
    named = set(re.findall(r"lightning-opd\[([\w,-]+)\]", table))
    assert named and {e for group in named for e in group.split(",")} <= set(extras())
    base = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    base_names = {re.match(r"[A-Za-z0-9_.-]+", d).group(0).lower().replace("-", "_") for d in base}  # type: ignore[union-attr]
    assert base_names.isdisjoint(NOT_IN_BASE)
    assert {"httpx", "pyarrow", "numpy", "pydantic", "pydantic_settings", "typer", "tqdm"} <= base_names
