"""MLflow experiment tracking and the encoder model registry.

* :func:`resolve_tracking_uri` picks where runs go: ``tracking.uri``, else ``$MLFLOW_TRACKING_URI``,
  else a sqlite file in the experiment's folder (``<output_dir>/mlflow.db``), so the pretrain and
  finetune runs of one experiment share a database and its registry without any server.
  ``tools/mlflow_server.sh`` starts a shared server (127.0.0.1, sqlite, artifact folder).
* :class:`Tracker` logs one run from global rank 0 only (other ranks: no-ops, no ghost runs). It
  adds :func:`standard_tags` (git commit, world size, SLURM ids), logs the params in batches
  (long values truncated, id lists hashed), logs each metric at most once per step, samples
  system metrics (CPU, memory, GPU), and continues a run given its id (resume/requeue). It never
  raises into the training loop once the run has started: if the tracking server goes away it
  warns once per outage, appends what could not be sent to ``<output_dir>/metrics_fallback.jsonl``,
  keeps it in memory, retries every ``retry_interval_s`` seconds and sends the backlog when the
  server is back.
* :func:`replay_fallback` sends what is in a fallback file and never reached the server (e.g. the
  server was still down when training ended): ``python -m pcl_hpc.tracking replay <file> --uri URI``.
* :func:`register_encoder` stores an encoder ``state_dict`` as a registered MLflow model version
  (a "models from code" pyfunc: no pickled Python objects at all) whose artifacts are
  ``encoder.pt`` (``torch.save`` of the tensors) and ``model_config.json``. If the server is
  unreachable it warns and returns None (and, when a Tracker is running, keeps a copy of the
  weights for :func:`replay_fallback`): a tracking failure never fails the training job.
* :func:`register_segmentation_model` does the same for a fine-tuned model (``model.pt`` +
  ``model_spec.json``). Both go through one routine, :func:`register_version`: a kind of version
  (:class:`VersionKind`: :class:`EncoderVersion`, :class:`SegmentationVersion`) only says how its
  files are packed and which tags it adds.
* :func:`promote_alias` moves an alias (default ``champion``) to a version.
* :func:`load_encoder_state` reads ``models:/<name>@<alias>``, ``models:/<name>/<version>`` or a
  path to ``encoder.pt``, always with ``torch.load(..., weights_only=True)``;
  :func:`encoder_lineage` gives the name, version and pretrain run of such a source.

Medical data hygiene: lists of volume ids in the params (any key ending in ``volumes``, e.g.
``pretrain.volumes``, ``finetune.test_volumes``) are logged as a count and a hash, never as ids.
No host or user names are logged.

Modules: :mod:`.tracker` (the run, URIs, standard tags; :meth:`Tracker.current` is the running one),
:mod:`.system_metrics`, :mod:`.versions` (the registration routine every kind goes through),
:mod:`.registry` (encoders: register, load, aliases), :mod:`.models` (segmentation models),
:mod:`.fallback` (the fallback file and its replay), :mod:`._common` (shared constants and
helpers); ``python -m pcl_hpc.tracking`` is :mod:`.__main__`.
"""

from pcl_hpc.tracking._common import (
    FALLBACK_FILE,
    MAX_PARAM_CHARS,
    MAX_TAG_CHARS,
    METRICS_PER_BATCH,
    PARAMS_PER_BATCH,
    UNREGISTERED_DIR,
)
from pcl_hpc.tracking.fallback import REPLAY_TAG, read_fallback, replay_fallback
from pcl_hpc.tracking.models import (
    SEG_SPEC_FILE,
    SEG_WEIGHTS_FILE,
    SegmentationModel,
    SegmentationVersion,
    load_segmentation_model,
    open_segmentation_model,
    register_segmentation_model,
    segmentation_model_name,
)
from pcl_hpc.tracking.registry import (
    ENCODER_FILE,
    MODEL_CONFIG_FILE,
    MODEL_NAME_IN_RUN,
    EncoderVersion,
    encoder_lineage,
    encoder_version_tags,
    load_encoder_state,
    local_encoder_file,
    promote_alias,
    register_encoder,
)
from pcl_hpc.tracking.tracker import (
    HTTP_ENV_DEFAULTS,
    MAX_PENDING_METRICS,
    SLURM_TAG_VARS,
    Tracker,
    git_commit,
    resolve_tracking_uri,
    standard_tags,
    use_tracking_uri,
)
from pcl_hpc.tracking.versions import VersionKind, register_version

__all__ = [
    "SEG_SPEC_FILE",
    "SEG_WEIGHTS_FILE",
    "SegmentationModel",
    "SegmentationVersion",
    "load_segmentation_model",
    "open_segmentation_model",
    "register_segmentation_model",
    "segmentation_model_name",
    "ENCODER_FILE",
    "EncoderVersion",
    "FALLBACK_FILE",
    "HTTP_ENV_DEFAULTS",
    "MAX_PARAM_CHARS",
    "MAX_PENDING_METRICS",
    "MAX_TAG_CHARS",
    "METRICS_PER_BATCH",
    "MODEL_CONFIG_FILE",
    "MODEL_NAME_IN_RUN",
    "PARAMS_PER_BATCH",
    "REPLAY_TAG",
    "SLURM_TAG_VARS",
    "UNREGISTERED_DIR",
    "VersionKind",
    "Tracker",
    "encoder_lineage",
    "encoder_version_tags",
    "git_commit",
    "load_encoder_state",
    "local_encoder_file",
    "promote_alias",
    "read_fallback",
    "register_encoder",
    "register_version",
    "replay_fallback",
    "resolve_tracking_uri",
    "standard_tags",
    "use_tracking_uri",
]
