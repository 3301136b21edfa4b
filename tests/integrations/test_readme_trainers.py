"""The README's "Train with your trainer" runs as written: `torchrun ... lopd train` and the TRL script on 2
processes (gloo on CPU) against a served store, and the slime flags and YAML against slime's contract."""

from __future__ import annotations

import importlib
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from tests.integrations.slime_contract import consume
from tests.utils.launch import output, torchrun

README = Path(__file__).resolve().parents[2] / "README.md"


def _section() -> str:
    text = README.read_text()
    return text[
        text.index("## Train with your trainer") : text.index("\n## ", text.index("## Train with your trainer") + 5)
    ]


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", _section(), flags=re.S)


def _command(block: str) -> list[str]:
    return shlex.split(block.replace("\\\n", " "), comments=True)


@pytest.mark.slow
def test_readme_torchrun_lopd_train(served, tiny_qwen2_dir, tmp_path):
    (block,) = [b for b in _blocks("bash") if "-m lopd train" in b]
    words = _command(block)
    assert words[:3] == ["torchrun", "--nproc-per-node", "8"] and words[3:6] == ["-m", "lopd", "train"]
    swap = {"http://store:8000": served.url, "math-v1": "scored", "/models/student-sft": str(tiny_qwen2_dir),
            "runs/opd8": str(tmp_path / "run"), "sha256:...": served.store.teacher_fingerprint, "cuda": "cpu",
            "200": "2"}  # fmt: skip
    args = [swap.get(w, w) for w in words[3:]]
    result = torchrun(args, nproc=2)
    assert result.returncode == 0, output(result)
    assert "global batch 4 x 2 x 2 = 16 sequences per step" in result.stdout and "step 2/2" in result.stdout
    assert (tmp_path / "run" / "checkpoint.pt").is_file() and (tmp_path / "run" / "model" / "config.json").is_file()


@pytest.mark.slow
def test_readme_trl_script_on_two_processes_and_resume(served, tiny_qwen2_dir, tmp_path):
    (script,) = [b for b in _blocks("python") if "LightningOPDTrainer" in b]
    assert len(script.strip().splitlines()) < 20  # the promise: a TRL user's script under 20 lines
    out = tmp_path / "trl"
    code = (
        script.replace('"runs/opd-trl"', repr(str(out)))
        .replace('"http://store:8000"', repr(served.url))
        .replace('"math-v1"', '"scored"')
        .replace('"sha256:..."', repr(served.store.teacher_fingerprint))
        .replace('"/models/student-sft"', repr(str(tiny_qwen2_dir)))
        .replace("bf16=True", "bf16=False")  # CPU: float32, so that the numbers are comparable
        .replace("save_steps=50", "save_steps=2, disable_tqdm=True")
    )
    first = tmp_path / "first.py"
    first.write_text(code.replace("max_steps=200", "max_steps=2"))
    cpu = {"ACCELERATE_USE_CPU": "1"}  # what `accelerate launch --cpu` sets: DDP over gloo
    result = torchrun([str(first)], nproc=2, env=cpu)
    assert result.returncode == 0, output(result)
    saved = json.loads((out / "checkpoint-2" / "lopd_loader.json").read_text())
    assert saved["world_size"] == 2 and [s["rank"] for s in saved["loaders"]] == [0, 1]
    # 2 steps x 2 micro-batches of 4 per rank: 4 batches into the epoch (24 samples: 3 per rank).
    assert {(s["epoch"], s["batches_consumed"]) for s in saved["loaders"]} == {(1, 1)}

    again = tmp_path / "again.py"
    again.write_text(
        code.replace("max_steps=200", "max_steps=4").replace(
            "resume_from_checkpoint=None", "resume_from_checkpoint=True"
        )
    )
    result = torchrun([str(again)], nproc=2, env=cpu)
    assert result.returncode == 0, output(result)
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    saved = json.loads((out / "checkpoint-4" / "lopd_loader.json").read_text())
    assert {(s["epoch"], s["batches_consumed"]) for s in saved["loaders"]} == {(2, 2)}  # 8 batches of 3 an epoch


def test_readme_slime_flags_and_config(served, tiny_qwen2_dir, slime):
    (flags,) = [b for b in _blocks("bash") if "--rollout-function-path" in b]
    (config,) = _blocks("yaml")
    words = _command(flags)
    opts = {w: words[i + 1] if i + 1 < len(words) and not words[i + 1].startswith("--") else True
            for i, w in enumerate(words) if w.startswith("--")}  # fmt: skip
    # slime's load_function (slime/utils/misc.py): module path, then the attribute.
    module_path, _, attr = opts["--rollout-function-path"].rpartition(".")
    fn = getattr(importlib.import_module(module_path), attr)
    assert fn is slime.module.generate_rollout
    assert opts["--use-opd"] is True and opts["--opd-type"] in ("sglang", "megatron")  # slime's choices
    assert int(opts["--global-batch-size"]) == int(opts["--rollout-batch-size"]) * int(opts["--n-samples-per-prompt"])

    # slime/utils/arguments.py: every key of --custom-config-path's YAML is set on args.
    from types import SimpleNamespace

    args = SimpleNamespace(rollout_batch_size=4, n_samples_per_prompt=int(opts["--n-samples-per-prompt"]),
                           hf_checkpoint=str(tiny_qwen2_dir), seed=1)  # fmt: skip
    settings = yaml.safe_load(config)
    assert set(settings) == {"lopd_url", "lopd_dataset", "lopd_version", "lopd_seed", "lopd_sft_teacher"}
    settings.update(lopd_url=served.url, lopd_dataset="scored", lopd_version=1,
                    lopd_sft_teacher=served.store.teacher_fingerprint)  # fmt: skip
    for key, value in settings.items():
        setattr(args, key, value)
    out = slime.base.call_rollout_fn(fn, args, 5, None, evaluation=False)
    train = consume(out, slime.types.Sample)
    assert len(train["tokens"]) == 4 and all(t.dtype.is_floating_point for t in train["teacher_log_probs"])
