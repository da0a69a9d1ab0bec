"""The training engine under pretrain/finetune: a run's result does not depend on how often it was interrupted.

* ``strategy.py``: DDP or DeepSpeed (ZeRO 0/1/2) behind one interface (setup, autocast, micro_step,
  backward, step, skip, save, load, device); the only module that knows which one is active.
* ``checkpoint.py``: ``<stage folder>/checkpoints/step_N/`` written atomically by every rank, a stable
  ``latest`` pointer, the last K kept; model, optimizer, schedule, sampler position, step, RNG states
  of every rank, resolved config and tracking run id. Bad checkpoints fail with a clear message.
* ``harness.py``: the one training harness every stage runs in (set-up, the step protocol, the
  checkpointed ``TrainState``, stage folders); a stage supplies its data, model, loss, evaluation, export.
* ``loop.py``: resumable micro-batches, the non-finite-loss guard (skip, abort after K in a row) and
  SIGTERM/SIGUSR1 handling: save at the next step boundary, exit with ``REQUEUE_EXIT_CODE`` (75).

A run started again with the same ``output_dir`` resumes from its stage folder's ``latest``; ``--no-resume``
(``checkpoint.resume=false``) starts fresh and moves old checkpoints to ``checkpoints.old-<time>``.
"""
