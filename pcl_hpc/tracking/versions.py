"""Registered model versions: the one routine every kind of version is registered with.

:func:`register_version` registers a :class:`VersionKind` (an encoder, a segmentation model, ...)
as a new version of a registered model, within the run of this process's :class:`Tracker` (or a
given run, MLflow's active run, or a run of its own), points an alias at it and tags it. If the
server is unreachable it warns and returns None: a tracking failure never fails a training job
(a kind may keep a copy of its files for :func:`pcl_hpc.tracking.replay_fallback`).
:func:`log_version` is the same without the outage handling (it raises), for the replay.

A kind says how its files are packed (:meth:`VersionKind.stage`), which version tags it adds
(:meth:`VersionKind.version_tags`) and, optionally, a model signature and what it keeps during an
outage (:meth:`VersionKind.keep`). Every version is a "models from code" pyfunc: its artifacts are
plain files and its code a string (``pyfunc_code``); the registry holds no pickled Python objects.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
import warnings
from pathlib import Path

from pcl_hpc.atomic import sha256_file
from pcl_hpc.tracking._common import _ensure_experiment, _is_data_error, _short, _tag_str
from pcl_hpc.tracking.tracker import Tracker

log = logging.getLogger(__package__)

_RESERVED_ALIAS = re.compile(r"^(latest|[vV]\d+)$", re.IGNORECASE)
_ALIAS_CHARS = re.compile(r"^[\w\-]+$")


def check_alias(alias: str) -> None:
    """A ValueError unless ``alias`` is one MLflow accepts and does not reserve (``latest``, ``v3``)."""
    if not alias:
        raise ValueError("alias must not be empty (e.g. 'candidate')")
    if alias.lower() == "latest":
        raise ValueError(
            "alias 'latest' is reserved by MLflow (models:/<name>@latest always means the newest "
            "version); choose another alias, e.g. 'candidate' or 'champion'"
        )
    if _RESERVED_ALIAS.match(alias):
        raise ValueError(f"alias {alias!r} is reserved by MLflow for version numbers; choose another alias")
    if not _ALIAS_CHARS.match(alias):
        raise ValueError(f"alias {alias!r}: only letters, digits, '_' and '-' are allowed")


class VersionKind:
    """One version to register, and how its kind is packed: subclass it for a new kind.

    Class attributes: ``label`` (in messages, "encoder"), ``tag_prefix`` (the version tags
    ``<prefix>.sha256`` of the weights file, ``<prefix>.tensors``, ``<prefix>.run_id``),
    ``name_in_run`` (the logged model's name in its run), ``model_type``, ``weights_artifact``
    (the key of the weights among the artifacts), ``code_file`` and ``pyfunc_code`` (the model's
    code), ``temp_prefix``, ``log_label``. ``tensors``: how many tensors the weights hold.
    """

    label = "model"
    tag_prefix = "model"
    name_in_run = "model"
    model_type = "pcl"
    weights_artifact = "model"
    code_file = "pcl_model.py"
    pyfunc_code = ""
    temp_prefix = "pcl-model-"
    log_label = ""  # "registered <log_label><name> version ..." in the log
    tensors = 0

    def stage(self, folder: Path) -> dict[str, Path]:
        """Write the version's files into ``folder``: ``{artifact key: path}``, the weights among them."""
        raise NotImplementedError

    def version_tags(self) -> dict:
        """Tags of the kind (the model's settings, lineage), set after ``<prefix>.*`` and before the caller's."""
        return {}

    def signature(self):
        """The ``mlflow.models.ModelSignature`` of the logged model, or None."""
        return None

    def describe(self) -> str:
        """What the warning of a failed registration calls it: ``could not register the <this> as ...``."""
        return self.label

    def keep(self, path: Path) -> dict | None:
        """During an outage, with a Tracker running: save what a replay needs at ``path`` and return
        the extra fields of the fallback file's ``register`` line; None (the default): nothing kept."""
        return None

    def register_later(self, name: str, kept: Path | None, tracker: Tracker | None) -> str:
        """The end of the warning of a failed registration: how to register it later."""
        raise NotImplementedError


def register_version(version: VersionKind, name: str, alias: str, tags: dict | None = None,
                     run_id: str | None = None) -> str | None:
    """Register ``version`` as a new version of model ``name``, point ``alias`` at it; returns the version.

    Logged within ``run_id``, else the run of the running :class:`Tracker` of this process (created
    now if the server was down when it started), else MLflow's active run, else a new run
    ``register-<name>`` (experiment ``$MLFLOW_EXPERIMENT_NAME`` or "pcl-hpc"), using the process's
    tracking/registry URI. Version tags: ``<prefix>.sha256``, ``<prefix>.tensors``,
    ``<prefix>.run_id``, the kind's, then ``tags``.

    A bad alias raises ValueError and a request the server refuses (e.g. an invalid name) raises
    MlflowException. If the server is unreachable it warns (``RuntimeWarning``) and returns None;
    when a Tracker is running, the kind may keep a copy under ``<output_dir>/unregistered/`` and a
    ``register`` line goes to its fallback file (see :meth:`VersionKind.keep`).
    """
    check_alias(alias)  # before anything is logged
    tracker = Tracker.current()
    if tracker is not None and run_id is not None and tracker.run_id not in (None, run_id):
        tracker = None  # another run than the Tracker's: the Tracker has nothing to do with it
    if run_id is None and tracker is not None:
        run_id = tracker.ensure_run()  # the server may be back: create the Tracker's run first
    try:
        if tracker is not None and run_id is None:
            raise ConnectionError(f"the run of this process was never created at {tracker.uri}")
        return log_version(version, name, alias, tags, run_id)
    except Exception as err:  # noqa: BLE001 - decided below
        if _is_data_error(err):
            raise
        kept = _keep(version, tracker, name, alias, tags) if tracker is not None else None
        message = (f"could not register the {version.describe()} as {name!r} at {_registry_uri()}: {_short(err)}. "
                   + version.register_later(name, kept, tracker))
        warnings.warn(message, RuntimeWarning, stacklevel=3)  # at the caller of register_encoder & co.
        log.warning("tracking: %s", message)
        return None


def _keep(version: VersionKind, tracker: Tracker, name: str, alias: str, tags: dict | None) -> Path | None:
    path = tracker.unregistered_path(name)
    try:
        fields = version.keep(path)
    except OSError as err:
        log.warning("tracking: cannot keep the unregistered %s in %s: %s", version.label, path.parent, err)
        return None
    if fields is None:
        return None
    tracker.write_fallback({"kind": "register", "name": name, "alias": alias, "path": str(path.absolute()),
                            **fields, "tags": {str(k): _tag_str(v) for k, v in (tags or {}).items()}})
    return path


def _registry_uri() -> str:
    try:
        import mlflow

        return mlflow.get_registry_uri()
    except Exception:  # noqa: BLE001
        return "?"


@contextlib.contextmanager
def registration_run(client, run_id: str | None, name: str):
    """The run a model version is logged in: ``run_id``, else MLflow's active run, else a new run
    ``register-<name>`` (experiment ``$MLFLOW_EXPERIMENT_NAME`` or pcl-hpc) ended FINISHED or FAILED."""
    import mlflow

    own_run = None
    if run_id is None:
        active = mlflow.active_run()
        if active is not None:
            run_id = active.info.run_id
        else:
            experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "pcl-hpc"
            exp_id = os.environ.get("MLFLOW_EXPERIMENT_ID") or _ensure_experiment(
                client, experiment, mlflow.get_tracking_uri()
            )
            own_run = client.create_run(exp_id, run_name=f"register-{name}")
            run_id = own_run.info.run_id
    try:
        yield run_id
    except BaseException:
        if own_run is not None:
            try:
                client.set_terminated(own_run.info.run_id, status="FAILED")
            except Exception:  # noqa: BLE001 - the server may be gone; report the first error
                pass
        raise
    if own_run is not None:
        client.set_terminated(own_run.info.run_id, status="FINISHED")


def log_version(version: VersionKind, name: str, alias: str, tags: dict | None, run_id: str | None) -> str:
    """Log ``version`` as a model of its run, register it as a version of ``name``, move ``alias``
    and set the version tags; returns the version. Raises whatever MLflow raises (see
    :func:`register_version` for the run and the tags)."""
    import mlflow
    import torch
    from mlflow import MlflowClient
    from mlflow.models import Model

    client = MlflowClient()
    with registration_run(client, run_id, name) as run_id:
        with tempfile.TemporaryDirectory(prefix=version.temp_prefix) as tmp:
            artifacts = version.stage(Path(tmp))
            code = Path(tmp) / version.code_file
            code.write_text(version.pyfunc_code)
            digest = sha256_file(artifacts[version.weights_artifact])
            # Create the logged model in the run's experiment: Model.log alone would put it in the
            # fluent "current" experiment (often Default, with artifacts in ./mlruns).
            logged = mlflow.initialize_logged_model(
                name=version.name_in_run, source_run_id=run_id,
                experiment_id=client.get_run(run_id).info.experiment_id, model_type=version.model_type)
            with warnings.catch_warnings():  # a signature says it all: an example would be run at log time
                warnings.filterwarnings("ignore", message=".*input example was not provided", category=UserWarning)
                info = Model.log(
                    artifact_path=None, name=version.name_in_run, flavor=mlflow.pyfunc, run_id=run_id,
                    python_model=str(code), artifacts={key: str(path) for key, path in artifacts.items()},
                    pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"],
                    registered_model_name=name, flavor_name="pyfunc.ModelFromCode", model_id=logged.model_id,
                    signature=version.signature())
        number = str(info.registered_model_version)
        client.set_registered_model_alias(name, alias, number)
        prefix = version.tag_prefix
        version_tags = {f"{prefix}.sha256": digest, f"{prefix}.tensors": str(version.tensors),
                        f"{prefix}.run_id": run_id, **version.version_tags(), **(tags or {})}
        for key, value in version_tags.items():
            client.set_model_version_tag(name, number, str(key), _tag_str(value))
    log.info("registered %s%s version %s (alias %s) from run %s", version.log_label, name, number, alias, run_id)
    return number
