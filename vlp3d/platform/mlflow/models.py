"""The one model logger (pretraining, sweep trials and fine-tuning: the package's code, pinned pip
requirements, signature, metadata, registration) and loading a logged embedder."""

from __future__ import annotations

from pathlib import Path

import mlflow

import vlp3d
from vlp3d.config import ExperimentConfig
from vlp3d.errors import InputError
from vlp3d.platform.mlflow.registry import finetuned_name, registered_name
from vlp3d.platform.mlflow.store import PRETRAINED_TAG, TASK_TAG, client, uri
from vlp3d.redact import redact


def load_pyfunc(model_uri: str, model_config: dict | None = None):
    """The pyfunc at `model_uri`; an unknown name/alias/run is a ValueError saying where it looked.
    `model_config` replaces the logged one's keys (`allowed_root`, `device`: vlp3d.platform.pyfunc)."""
    try:
        return mlflow.pyfunc.load_model(model_uri, model_config=model_config)
    except mlflow.exceptions.MlflowException as err:
        raise InputError(redact(
            f"cannot load --model {model_uri} from the MLflow store {mlflow.get_tracking_uri()}: {err.message} "
            "(set --workdir/--tracking-uri or MLFLOW_TRACKING_URI to the store the model was registered in)"
        )) from None


def load_embedder(model_uri: str, model_config: dict | None = None):
    """The pyfunc at `model_uri` and its Embedder (`load_pyfunc`); a model that embeds nothing (a fine-tuned
    one) is an InputError."""
    model = load_pyfunc(model_uri, model_config)
    embedder = getattr(model.unwrap_python_model(), "embedder", None)
    if embedder is None:
        raise InputError(f"--model {model_uri} is not an embedding model (a `vlp3d pretrain` model); it is a "
                         f"{type(model.unwrap_python_model()).__name__}")
    return model, embedder


def predict(model, model_input, params: dict | None = None):
    """`model.predict(model_input, params=params)` of a loaded pyfunc; an input the model refuses (an
    MlflowException: bad columns, a path outside its allowed root, ...) is a ValueError with its message."""
    try:
        return model.predict(model_input, params=params)
    except mlflow.exceptions.MlflowException as err:
        raise InputError(err.message) from None


def model_metadata(cfg: ExperimentConfig, checkpoint_dir: Path, metrics: dict) -> dict:
    """What a user of the logged model needs besides the embeddings (`mlflow.models.get_model_info(
    uri).metadata`): the method and encoder, the logit scale the zero-shot softmax uses, the label
    names of the pretraining shards, and the prompt ensemble evaluation used (templates with `{name}`,
    `{Name}`, `{a}`; vlp3d.evaluation.prompts)."""
    from vlp3d.evaluation.prompts import load_prompt_sets
    from vlp3d.train.checkpoint import read_meta

    temperature = metrics.get("temperature")
    sets = load_prompt_sets(cfg.eval.prompts)
    return {
        "vlp3d_version": vlp3d.__version__,
        "objective": cfg.objective.name,
        "image_encoder": f"{cfg.model.image_encoder}/{cfg.model.size}",
        "logit_scale": 1.0 / float(temperature) if temperature else None,
        "label_names": list(read_meta(checkpoint_dir).get("label_names", [])),
        "prompt_ensemble": list(cfg.eval.prompt_ensemble),
        "prompt_templates": {name: {"positive": list(sets[name].positive), "negative": list(sets[name].negative)}
                             for name in cfg.eval.prompt_ensemble if name in sets},
    }


def log_model(run_id: str, cfg: ExperimentConfig, python_model, artifacts: dict[str, str], metadata: dict,
              name: str | None, signature, input_example=None, text_encoder: str = "",
              model_config: dict | None = None, status: str = "FINISHED",
              version_tags: dict[str, str] | None = None) -> str:
    """The one way vlp3d logs a model (pretraining, sweep trials, fine-tuning): `python_model` with its
    `artifacts` into run `run_id`, the vlp3d package as the model's code (its environment needs no vlp3d
    release), pip requirements pinned to this process's versions (vlp3d.platform.pyfunc.model_requirements),
    its signature, input example, metadata and model_config; registered as a new version of `name`
    (None: logged only). The run then ends with `status`; a registered version gets `version_tags` and
    its model card. Returns `models:/NAME/VERSION`, or the logged model's URI when not registered."""
    from vlp3d.platform import pyfunc
    from vlp3d.platform.mlflow.card import update_model_card

    mlflow_client = client(cfg)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=python_model,
            artifacts=artifacts,
            code_paths=[str(Path(vlp3d.__file__).parent)],
            pip_requirements=pyfunc.model_requirements(text_encoder),
            model_config=model_config,
            signature=signature,
            input_example=input_example,
            registered_model_name=name,
            metadata=metadata,
        )
    mlflow_client.set_terminated(run_id, status)
    if name is None:
        return info.model_uri
    version = str(info.registered_model_version)
    for key, value in (version_tags or {}).items():
        mlflow_client.set_model_version_tag(name, version, key, value)
    update_model_card(uri(cfg), name, version)
    return f"models:/{name}/{version}"


def finish_training(run_id: str, cfg: ExperimentConfig, checkpoint_dir: Path, metrics: dict,
                    register: bool = True, status: str = "FINISHED") -> str:
    """Log the final pretraining checkpoint as a pyfunc embedder (`log_model`) and register a new version:
    returns `models:/NAME/VERSION` (with `register=False`, e.g. a sweep trial: the logged model's URI)."""
    from vlp3d.encoders.text import DEFAULT_TEXT_ENCODER, resolve_text_encoder
    from vlp3d.platform import pyfunc

    metadata = model_metadata(cfg, checkpoint_dir, metrics)
    artifacts = {"checkpoint": str(checkpoint_dir)}
    text_encoder = cfg.model.text_encoder
    if text_encoder != DEFAULT_TEXT_ENCODER and Path(resolve_text_encoder(text_encoder)).is_dir():
        artifacts["text_encoder"] = text_encoder  # a local folder: the model carries its copy
    return log_model(run_id, cfg, pyfunc.Vlp3dEmbedder(metadata), artifacts, metadata,
                     registered_name(cfg) if register else None, pyfunc.signature(), pyfunc.input_example(),
                     text_encoder=text_encoder,
                     model_config={"allowed_root": cfg.tracking.model_allowed_root, "device": "auto"}, status=status)


def log_finetuned(run_id: str, cfg: ExperimentConfig, checkpoint_dir: Path, plan_, metrics: dict,
                  register: bool = True) -> str:
    """Log a fine-tuned checkpoint as a pyfunc (`log_model`; `plan_`: vlp3d.platform.finetune.Plan) and
    register it, the run and the version tagged with the pretrained model it started from; returns
    models:/NAME/VERSION (or the logged model's URI)."""
    from vlp3d.platform import pyfunc

    name = finetuned_name(plan_.pretrained.name, plan_.network.task, plan_.cfg) if register else None
    metadata = {"vlp3d_version": vlp3d.__version__, "task": plan_.network.task, "names": plan_.names,
                "pretrained_model": plan_.pretrained.uri, "init": cfg.finetune.init,
                "label_fraction": cfg.finetune.label_fraction,
                "image_encoder": f"{plan_.network.encoder}/{plan_.network.size}"}
    client(cfg).set_tag(run_id, PRETRAINED_TAG, plan_.pretrained.uri)
    return log_model(run_id, cfg, pyfunc.FineTunedModel(), {"checkpoint": str(checkpoint_dir)}, metadata, name,
                     pyfunc.finetuned_signature(), model_config={"allowed_root": cfg.tracking.model_allowed_root},
                     version_tags={PRETRAINED_TAG: plan_.pretrained.uri, TASK_TAG: plan_.network.task})
