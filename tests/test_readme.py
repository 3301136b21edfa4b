"""The README's code stays true: its client snippet runs against a real served store."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_starts_with_the_two_commands():
    lines = README.read_text().splitlines()
    block = lines[lines.index("```bash") + 1 : lines.index("```bash") + 3]
    assert block[0].startswith("bash scripts/setup.sh && .venv/bin/lopd demo")
    assert block[1].startswith("bash scripts/setup.sh && .venv/bin/python -m pytest")
    ci = (README.parent / ".ci" / "run").read_text()
    assert "bash scripts/setup.sh && .venv/bin/python -m pytest" in ci


@pytest.mark.slow
def test_readme_client_snippet_trains_one_epoch(tmp_path, tiny_llama_dir, tiny_llama_b_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from lopd.server.api.background import serve_in_background
    from lopd.server.api.settings import ServerSettings
    from lopd.server.precompute import PrecomputeConfig, run_precompute
    from tests.server.test_precompute import write_rollouts

    rollouts = write_rollouts(tmp_path / "r.jsonl", 12, seed=4)
    store = tmp_path / "store"
    run_precompute(
        PrecomputeConfig(
            rollouts=[rollouts], teacher=tiny_llama_dir, sft_teacher=str(tiny_llama_dir), store=store,
            dataset="math-v1", progress=False,
        )
    )  # fmt: skip
    (snippet,) = [b for b in _python_blocks() if "OPDLoader(" in b]  # the client's (the TRL script: tests/integrations)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_b_dir))  # a student that is not the teacher
    before = [p.detach().clone() for p in model.parameters()]
    with serve_in_background(ServerSettings(store=store)) as server:
        code = snippet.replace('"http://store:8000", token="..."', f'"{server.base_url}"')
        ns = {"model": model, "optimizer": torch.optim.SGD(model.parameters(), lr=0.1), "rank": 0, "world_size": 1}
        exec(compile(code, "README.md", "exec"), ns)
    assert ns["state"]["epoch"] == 1  # one full epoch consumed
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))  # and it trained
