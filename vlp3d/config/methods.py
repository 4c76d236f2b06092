"""The method registry: each pretraining method declares, in one place in its own module, its
objective class, its `[objective.<name>]` table and its published set-up:

    @dataclass(frozen=True)
    class MG3DConfig:
        mim_weight: float = setting(1.0, "MG-3D `mim`: text-guided masked image reconstruction.")

    @register_method(section=MG3DConfig, defaults={"model.image_encoder": "swin3d", "train.lr": 1e-5})
    class MG3DObjective(Objective):
        name = "mg3d"                  # objective.name
        terms = ("align", "mim")       # weights: objective.align_weight, objective.mg3d.mim_weight

Registering a method makes `objective.name = "<name>"` valid (the error for another name lists
the registered ones), adds the field `<name>` to ObjectiveConfig (`cfg.objective.mg3d.mim_weight`,
`[objective.mg3d]` in TOML, `objective.mg3d.mim_weight=0` overrides, `describe()`, `to_toml`,
`flatten`, ...), and applies `defaults` whenever a config chooses the method. `defaults` are dotted
keys, each checked against the schema when the method registers: the method's published set-up
(docs/methods.md), applied - in a file, by an override or by `replace` - to every key the user
did not set; explicit keys win (the CPU demo configs set a tiny encoder and coarse data). Budget
keys (max_steps, warmup_steps, batch), precision and the cluster stay the user's: they depend on
the hardware, not on the method.

Lazy discovery: this is the one deliberate reach from the config, the bottom layer, up to the
methods; the registry works as a plugin registry. Importing vlp3d.config imports neither torch nor
vlp3d.objectives. The first time anything needs the registry - building a config
(`ExperimentConfig()`, `from_dict`, `load_config`, `replace`), walking the schema (`describe()`,
`to_toml`, `key_annotation`, `leaf_fields`), reading the views below - `discover()` imports the
package vlp3d.objectives, whose `__init__` imports every module of the package (pkgutil, no
hand-kept list), and each module registers its method as its class is defined: the built-in
methods register in module-name order (clip, mg3d, t3d, unimedi). A method defined elsewhere (a
plugin, a test) registers when its module is imported, after the built-in ones; a process that
unpickles a config holding its table imports that module on the way.

The views OBJECTIVES (names), METHOD_SECTIONS, METHOD_DEFAULTS and MOVED_OBJECTIVE_KEYS (and
vlp3d.objectives.REGISTRY, name -> class) are read from the registry on every access.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, TypeVar

from vlp3d.config.fields import ConfigError
from vlp3d.config.objective import general_keys, rebuild
from vlp3d.errors import InputError

T = TypeVar("T", bound=type)


@dataclass(frozen=True)
class Method:
    """One registered method."""

    name: str  # objective.name
    objective: type  # its objective class (a vlp3d.objectives.base.Objective)
    section: type | None  # the frozen dataclass of `[objective.<name>]`; None: no keys of its own
    defaults: Mapping[str, Any]  # dotted key -> value, applied when a config chooses the method


_METHODS: dict[str, Method] = {}


def discover() -> None:
    """Register the built-in methods: import vlp3d.objectives (its `__init__` imports every module
    of the package). A no-op once imported; a second thread waits for the first one's import, and
    a call made while this thread imports the package returns at once (what has registered so far)."""
    importlib.import_module("vlp3d.objectives")


def registered_methods() -> Mapping[str, Method]:
    """{name: Method} of every registered method, in registration order (built-in ones first)."""
    discover()
    return MappingProxyType(_METHODS)


def register_method(section: type | None = None, defaults: Mapping[str, Any] | None = None
                    ) -> Callable[[T], T]:
    """Class decorator: register an objective class (its `name` attribute is `objective.name`) with
    its config table `section` (a frozen dataclass of `setting(default, help)` fields, read as
    `cfg.objective.<name>`) and its published set-up `defaults` ({dotted key: value}).

    Registering a name again replaces the method when it is the same class (a module imported
    twice); another class under a registered name is an error. `unregister_method` removes it."""

    def wrap(objective: T) -> T:
        name = getattr(objective, "name", None)
        if not isinstance(name, str) or not name.isidentifier():
            raise TypeError(f"{objective.__qualname__}.name must be the method's name (an identifier), got {name!r}")
        _check_section(name, section)
        old = _METHODS.get(name)
        if old is not None and _where(old.objective) != _where(objective):
            raise InputError(f"method {name!r} is already registered by {_where(old.objective)}; "
                             f"{_where(objective)} needs another name")
        method = Method(name, objective, section, MappingProxyType(dict(defaults or {})))
        _METHODS[name] = method
        _rebuild()
        try:
            _check_defaults(method)
        except BaseException:  # leave the registry as it was
            if old is None:
                del _METHODS[name]
            else:
                _METHODS[name] = old
            _rebuild()
            raise
        return objective

    return wrap


def unregister_method(name: str) -> None:
    """Remove the method `name` (and its `[objective.<name>]` table); a KeyError if it is not
    registered. For tests that register a method of their own."""
    del _METHODS[name]
    _rebuild()


def check_method_name(value: Any, where: str = "objective.name") -> str:
    """`value` if it names a registered method; otherwise a ConfigError naming the key, the
    registered methods and the closest one."""
    names = list(registered_methods())
    if value in names:
        return value
    close = difflib.get_close_matches(value, names, n=1, cutoff=0.5) if isinstance(value, str) else []
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, names))} (the registered "
                      f"methods).{hint}")


def method_sections() -> dict[str, type]:
    """{method: the dataclass of its `[objective.<method>]` table}, for the methods that have one."""
    return {name: m.section for name, m in registered_methods().items() if m.section is not None}


def method_defaults() -> dict[str, Mapping[str, Any]]:
    """{method: its defaults ({dotted key: value})}, every registered method (clip: none)."""
    return {name: m.defaults for name, m in registered_methods().items()}


def objective_classes() -> dict[str, type]:
    """{method: its objective class}."""
    return {name: m.objective for name, m in registered_methods().items()}


def moved_objective_keys() -> dict[str, tuple[str, ...]]:
    """{key: the methods whose tables hold it} of every key of a method's table: keys that were
    flat `objective.<key>` before the tables (decoder_dim: mg3d and t3d)."""
    moved: dict[str, tuple[str, ...]] = {}
    for method, cls in method_sections().items():
        for f in dataclasses.fields(cls):
            moved[f.name] = (*moved.get(f.name, ()), method)
    return moved


def _where(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _rebuild() -> None:
    rebuild(tuple(_METHODS), {name: m.section for name, m in _METHODS.items() if m.section is not None})


def _check_section(name: str, section: type | None) -> None:
    """A method's table: a frozen dataclass whose keys have help texts and do not shadow the
    shared `[objective]` keys (a flat `objective.<key>` of a table is read as a moved key)."""
    if name in general_keys():
        raise InputError(f"method name {name!r} is a key of [objective]; choose another name")
    if section is None:
        return
    params = getattr(section, "__dataclass_params__", None)
    if not dataclasses.is_dataclass(section) or not isinstance(section, type) or not params.frozen:
        raise TypeError(f"method {name!r}: section must be a frozen dataclass (@dataclass(frozen=True)), "
                        f"got {section!r}")
    for f in dataclasses.fields(section):
        if not f.metadata.get("help"):
            raise TypeError(f"method {name!r}: {section.__qualname__}.{f.name} has no help text; declare it "
                            "with vlp3d.config.setting(default, help)")
        if f.name in general_keys():
            raise InputError(f"method {name!r}: {section.__qualname__}.{f.name} shadows objective.{f.name}, "
                             "a key every method shares; give it another name")


def _check_defaults(method: Method) -> None:
    """Each default names a key and holds a value of its type (a ConfigError naming both)."""
    # the schema sits above the registry: imported here, when a method registers
    from vlp3d.config.schema import coerce_value, key_annotation

    for key, value in method.defaults.items():
        try:
            if key == "objective.name":
                raise ConfigError("a method's defaults cannot choose the method")
            coerce_value(value, key_annotation(key), key)
        except ConfigError as err:
            raise ConfigError(f"method {method.name!r}: defaults: {err}") from None


class RegistryView(Mapping):
    """A read-only mapping computed from the registry on every access."""

    def __init__(self, compute: Callable[[], Mapping]):
        self._compute = compute

    def __getitem__(self, key: Any) -> Any:
        return self._compute()[key]

    def __iter__(self) -> Iterator:
        return iter(self._compute())

    def __len__(self) -> int:
        return len(self._compute())

    def __repr__(self) -> str:
        return repr(dict(self._compute()))


class _Names(Sequence):
    """The registered methods' names, read from the registry on every access (a tuple-like view)."""

    def __getitem__(self, index: Any) -> Any:
        return tuple(registered_methods())[index]

    def __len__(self) -> int:
        return len(registered_methods())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and not isinstance(other, str) and tuple(self) == tuple(other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return repr(tuple(self))


OBJECTIVES: Sequence[str] = _Names()
METHOD_SECTIONS: Mapping[str, type] = RegistryView(method_sections)
METHOD_DEFAULTS: Mapping[str, Mapping[str, Any]] = RegistryView(method_defaults)
MOVED_OBJECTIVE_KEYS: Mapping[str, tuple[str, ...]] = RegistryView(moved_objective_keys)
