"""Local paths out of API answers (`ServerSettings.redact_paths`, on by default).

A manifest records where its teacher, its SFT-data teacher, its rollout policy and its rollout
files were read from, as the machine that ran precompute saw them (`/home/alice/models/...`).
Over HTTP they are served as their last component (`Qwen3-8B`, `rollouts.jsonl`): the model's
name, which with its fingerprint is what a reader needs, without the directories of that
machine. Hub names (`Qwen/Qwen3-8B`) are not paths and stay whole. The manifest on disk is never
changed.
"""

from __future__ import annotations

import re

from lopd.storage.fs import StoreDir
from lopd.storage.manifest import Manifest, ModelRef

_LOCAL = re.compile(r"^(?:[/\\~]|\.{1,2}(?:[/\\]|$)|[A-Za-z]:[/\\])")  # /abs, ~, ./rel, ../rel, C:\ or \\share
_SEPARATORS = re.compile(r"[/\\]+")


def redact_store(message: str, root: StoreDir) -> str:
    """`message` with the store's location (as given and resolved) replaced by `<store>`, for an HTTP answer."""
    for location in {str(root.resolve()), str(root)}:
        if location not in (".", ""):
            message = message.replace(location, "<store>")
    return message


def last_component(path: str) -> str:
    parts = [p for p in _SEPARATORS.split(path) if p not in ("", ".", "..", "~")]
    return parts[-1] if parts else "<local>"


def redact_path(value: str) -> str:
    """A local path's last component; anything else (a hub name) unchanged."""
    return last_component(value) if _LOCAL.match(value) else value


def _model(ref: ModelRef) -> ModelRef:
    name = ref.name_or_path
    return ref if name is None else ref.model_copy(update={"name_or_path": redact_path(name)})


def public_manifest(manifest: Manifest) -> Manifest:
    """The manifest as the API serves it: every path in its provenance cut to its last component."""
    p = manifest.provenance
    source = p.sft_teacher_source
    prov = p.model_copy(
        update={
            "teacher": _model(p.teacher),
            "rollout_policy": None if p.rollout_policy is None else _model(p.rollout_policy),
            "sft_teacher_source": None if source is None else redact_path(source),
            # rollout inputs are always local files, relative or not: their names only
            "rollouts": p.rollouts.model_copy(update={"paths": [last_component(x) for x in p.rollouts.paths]}),
        }
    )
    return manifest.model_copy(update={"provenance": prov})
