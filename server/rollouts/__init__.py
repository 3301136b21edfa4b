"""Reading rollout files: validate everything once, keep only where each record is, read back on demand.

Rollouts are samples from the student policy that the teacher scores. They come as JSONL
(`.jsonl`, `.jsonl.gz`) or Parquet (`.parquet`) files; a directory stands for every such file in
it (not recursive), in name order. Every record has a unique `id` (string or integer, kept as a
string) and exactly one of three forms:

* `prompt_ids` + `response_ids`: lists of token ids exactly as sampled. Preferred: nothing is
  re-tokenized, so the teacher scores exactly the tokens the policy produced.
* `messages`: a chat (list of `{role, content}`) whose last message is the assistant turn, the
  response. The prompt is the chat template applied to the messages before it with
  `add_generation_prompt=True`. The response is what the templated full conversation adds after
  that prompt, when the prompt's tokens are a prefix of the conversation's tokens (so the
  end-of-turn token the policy sampled is part of the response); otherwise it is the assistant
  content tokenized alone (`add_special_tokens=False`), without an end-of-turn token.
* `prompt` + `response`: strings. The prompt is tokenized with the tokenizer's default special
  tokens, the response with `add_special_tokens=False`.

The text forms are re-tokenized, which may not reproduce the sampled tokens; they are counted in
`RolloutScan.retokenized` so callers can warn about it.

Optional `rollout_logprobs`: the sampling policy's log-prob of each response token (floats <= 0,
one per response token). Fields other than these (rewards, metadata) are ignored.

Aliases from common generation pipelines are accepted for single fields: `prompt_token_ids` for
`prompt_ids` (vLLM), `output_token_ids` or `completion_ids` for `response_ids`, `completion` for
`response` (OpenAI / TRL). Giving a field and one of its aliases together is an error.

A line (or row) that is a dumped `vllm.RequestOutput` (`request_id`, `prompt_token_ids`,
`outputs: [{index, token_ids, logprobs, ...}]`) holds one record per output, with id
`<request_id>/<index>` and rollout log-probs taken from `logprobs` by the sampled token ids
(`request_outputs`). `RecordRef.output` says which output of its line a record is.

Inputs can be millions of records with thousands of tokens each, so the work is split in two:
`scan_rollouts` streams through every file once, validates every record and keeps only a small
`RecordRef` per valid record (where it is, and its sizes); `load_rollouts` reads a chosen set of
records back (seeking to byte offsets in JSONL, reading only the needed row groups of Parquet)
when a batch is about to be scored.

The public reading API is what this package exports:

* `expand_rollout_paths(paths)`: the rollout files that files and directories name, in order.
* `rollout_files_fingerprint(paths)`: the inputs' `sha256:` fingerprint, without parsing them.
* `scan_rollouts(paths, tokenizer, vocab_size=, max_context=)`: validate every record, return a `RolloutScan`.
* `load_rollouts(scan, refs, tokenizer)`: read chosen records of a scan back, as `Rollout`s.
* `RolloutScan`: the valid records (`RecordRef`s), the bad ones with reasons, the input fingerprint.
* `RecordRef`: where a valid record is and its sizes. `Rollout`: one record's tokens, ready to score.
* `ROLLOUT_SUFFIXES`: the file suffixes read. `MAX_LOGPROB`: how far above 0 a log-prob may round.

Inside, each module has one job: `files` reads file formats (paths, fingerprint, raw lines and rows),
`fields` names a record's fields and checks their values, `records` reads the records of a raw item
(flat forms) and `request_outputs` those of a vLLM `RequestOutput` line, `scan` runs the two phases.
"""

from .fields import MAX_LOGPROB
from .files import ROLLOUT_SUFFIXES, expand_rollout_paths, rollout_files_fingerprint
from .scan import RecordRef, Rollout, RolloutScan, load_rollouts, scan_rollouts

__all__ = [
    "MAX_LOGPROB",
    "ROLLOUT_SUFFIXES",
    "RecordRef",
    "Rollout",
    "RolloutScan",
    "expand_rollout_paths",
    "load_rollouts",
    "rollout_files_fingerprint",
    "scan_rollouts",
]
