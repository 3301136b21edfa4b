"""Lightning OPD in the trainers people already use, each reading the store through `lopd.client`.

* `lopd.integrations.hf`: `LightningOPDTrainer`, a `transformers.Trainer` (TRL conventions) whose
  data is the store and whose loss is `lightning_opd_loss` (`pip install 'lightning-opd[trl]'`).
* `lopd.integrations.slime`: a `--rollout-function-path` for slime that hands each rollout step a
  batch of the store as slime `Sample`s with `teacher_log_probs`.

Like the client, nothing here imports `lopd.server` or `lopd.storage`: only the HTTP contract.
"""
