"""Experiment configuration: frozen dataclasses, TOML loading, dotted CLI overrides, validation.

One concern per module; this package re-exports the names the rest of vlp3d imports, so
`from vlp3d.config import X` is all a caller needs:

- `fields`      ConfigError, `setting` (a key with its help text), did-you-mean hints, `is_uri`
- `data`, `model`, `objective`, `train`, `eval`, `finetune`, `tune`, `tracking`, `cluster`:
  one section each (`[objective]`: the keys every method shares)
- `methods`     the method registry: each method registers its objective class, its
  `[objective.<method>]` table and its published set-up from its own module
  (`@register_method`); the built-in ones are discovered on first use, so importing this
  package imports neither torch nor vlp3d.objectives
- `experiment`  ExperimentConfig and SECTIONS, `to_dict`, `config_hash`
- `schema`      walking the sections, the annotation of a dotted key, coercion, unknown-key messages,
  `describe()`
- `checks`      value ranges (declared with each key) and keys that must be local folders
- `loading`     TOML files, overrides, `from_dict`, `replace`, stored-config migration
- `public`      `flatten`, the MLflow params (`logged_params`), `public_config`
- `toml`        `to_toml`
"""

from vlp3d.config.checks import LOCAL_ONLY, check_ranges, check_value_range, key_ranges
from vlp3d.config.cluster import ClusterConfig
from vlp3d.config.data import DataConfig
from vlp3d.config.eval import EvalConfig
from vlp3d.config.experiment import SECTIONS, ExperimentConfig, config_hash, to_dict
from vlp3d.config.fields import URI_SCHEME, ConfigError, Range, did_you_mean, is_uri, setting
from vlp3d.config.finetune import FinetuneConfig
from vlp3d.config.loading import (
    chosen_method,
    from_dict,
    load_config,
    load_config_with_sources,
    load_stored_config,
    method_defaults_applied,
    migrate_stored,
    parse_override,
    read_toml,
    replace,
    with_method_defaults,
)
from vlp3d.config.methods import (
    METHOD_DEFAULTS,
    METHOD_SECTIONS,
    MOVED_OBJECTIVE_KEYS,
    OBJECTIVES,
    Method,
    register_method,
    registered_methods,
    unregister_method,
)
from vlp3d.config.model import ModelConfig
from vlp3d.config.objective import ObjectiveConfig
from vlp3d.config.public import (
    LOGGED_SECTIONS,
    flatten,
    logged_params,
    public_config,
)
from vlp3d.config.schema import (
    coerce_value,
    describe,
    get_key,
    key_annotation,
    leaf_fields,
    moved_key_message,
    sub_tables,
)
from vlp3d.config.toml import to_toml
from vlp3d.config.tracking import TrackingConfig
from vlp3d.config.train import TrainConfig
from vlp3d.config.tune import TuneConfig

__all__ = [
    "LOCAL_ONLY", "LOGGED_SECTIONS", "METHOD_DEFAULTS", "METHOD_SECTIONS", "MOVED_OBJECTIVE_KEYS", "OBJECTIVES",
    "SECTIONS", "URI_SCHEME", "ClusterConfig", "ConfigError", "DataConfig", "EvalConfig",
    "ExperimentConfig", "FinetuneConfig", "Method", "ModelConfig", "ObjectiveConfig", "TrackingConfig",
    "Range", "TrainConfig", "TuneConfig", "check_ranges", "check_value_range", "key_ranges",
    "chosen_method", "coerce_value", "config_hash", "describe", "did_you_mean", "flatten", "from_dict",
    "get_key", "is_uri", "key_annotation", "leaf_fields", "load_config", "load_config_with_sources",
    "load_stored_config", "logged_params", "method_defaults_applied", "migrate_stored", "moved_key_message",
    "parse_override", "public_config", "read_toml", "register_method", "registered_methods",
    "replace", "setting", "sub_tables", "unregister_method",
    "to_dict", "to_toml", "with_method_defaults",
]
