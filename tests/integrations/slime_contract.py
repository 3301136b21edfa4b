"""slime's side of the rollout-function contract (THUDM/slime@624b824): its args and how it consumes a rollout."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch

STUB = Path(__file__).parent / "slime_stub"


def slime_args(served, tiny_qwen2_dir, **kw) -> SimpleNamespace:
    """slime's args after `--custom-config-path` set the lopd_* keys (slime/utils/arguments.py)."""
    base = dict(
        lopd_url=served.url, lopd_dataset="scored", lopd_version=1, lopd_seed=0,
        lopd_sft_teacher=served.store.teacher_fingerprint, rollout_batch_size=4, n_samples_per_prompt=2,
        hf_checkpoint=str(tiny_qwen2_dir), seed=1234,
    )  # fmt: skip
    base.update(kw)
    return SimpleNamespace(**base)


def consume(output, Sample) -> dict:  # noqa: N803
    """What slime does with a train rollout's output, reduced to the lines that touch a `Sample`
    (slime/ray/rollout.py `_get_rollout_data` and `_convert_samples_to_train_data`,
    slime/observability/rollout_data_utils.py `tensorize_rollout_data_for_training`,
    slime/backends/megatron_utils/loss.py `apply_opd_kl_to_advantages`)."""
    data = output.samples
    while isinstance(data[0], list):  # flatten the data if it is a list of lists
        data = [s for group in data for s in group]
    samples = data
    train = {
        "tokens": [s.tokens for s in samples],
        "response_lengths": [s.response_length for s in samples],
        "rewards": [s.reward for s in samples],
        "truncated": [1 if s.status == Sample.Status.TRUNCATED else 0 for s in samples],
        "sample_indices": [s.index for s in samples],
    }
    for s in samples:
        if s.loss_mask is None:
            s.loss_mask = [1] * s.response_length
        assert len(s.loss_mask) == s.response_length
    train["loss_masks"] = [s.loss_mask for s in samples]
    if samples[0].rollout_log_probs is not None:
        train["rollout_log_probs"] = [torch.as_tensor(s.rollout_log_probs, dtype=torch.float32) for s in samples]
    if samples[0].teacher_log_probs is not None:
        train["teacher_log_probs"] = [torch.as_tensor(s.teacher_log_probs, dtype=torch.float32) for s in samples]
    # apply_opd_kl_to_advantages: student_log_probs[i] - teacher_log_probs[i], over the response.
    student = [torch.zeros(n) for n in train["response_lengths"]]
    train["opd_reverse_kl"] = [st - te for st, te in zip(student, train["teacher_log_probs"], strict=True)]
    return train
