"""The run configuration: one pydantic tree, loaded from YAML, overridable with `--set`.

The tree is put together here from the settings of each part (pfreeze.settings) and the arm
kinds registered in pfreeze.run.arms, each with its own settings class. Every model forbids
unknown keys, so a typo is an error that names its path and the closest valid key instead of
a silently ignored setting.
"""

from __future__ import annotations

import copy
import difflib
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from pfreeze.errors import PfreezeError
from pfreeze.run.arms import ARM_KINDS
from pfreeze.settings import (
    DataConfig,
    GenerationConfig,
    ModelConfig,
    Strict,
    TrainingConfig,
    dump,
)


def _arm_union() -> Any:
    """Every registered arm kind's settings, told apart by `kind`."""
    configs = tuple(cls.Config for cls in ARM_KINDS.values())
    return Annotated[typing.Union[configs], Field(discriminator="kind")]  # noqa: UP007


Arm = _arm_union()








































class RunConfig(Strict):
    """A whole experiment: the model, the data, training, generation and the arms (the YAML
    file's top level; README lists every setting)."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    arms: list[Arm] = Field(default_factory=lambda: [{"kind": "full"}, {"kind": "plan"}],
                            min_length=1, validate_default=True)
    # Where the arms live. together: all on the device, stepped side by side. sequential:
    # one after the other on the identical batch stream, one arm on the device at a time.
    # auto: together where the memory plan says they fit, else sequential.
    arms_placement: Literal["auto", "together", "sequential"] = "auto"
    # Which matrices get per-step ‖ΔW‖ (selector language; tracked in every arm).
    track: str = "roles=q,k,v,o"
    output_dir: str = "runs/latest"
    save_pretrained: bool = False
    # Run the whole paired experiment this many times (seed + r); statistics over repeats.
    repeats: int = Field(1, ge=1)

    @field_validator("arms")
    @classmethod
    def _unique_arm_names(cls, arms: list[Any]) -> list[Any]:
        named = [a.name for a in arms if a.name is not None]
        for name in named:
            if named.count(name) > 1:
                raise ValueError(f"two arms are named {name!r}; give each arm a unique name")
        # Unnamed arms are called after their kind (plan, plan2, ...), never taking a name
        # that another arm was given explicitly.
        taken = set(named)
        for arm in arms:
            if arm.name is None:
                name, i = arm.kind, 1
                while name in taken:
                    i += 1
                    name = f"{arm.kind}{i}"
                arm.name = name
                taken.add(name)
        return arms

    @model_validator(mode="after")
    def _prefix_needs_epochs(self) -> RunConfig:
        if self.training.prefix_cache is True and self.data.sampling != "epochs":
            raise ValueError("training.prefix_cache=true needs data.sampling=epochs: with "
                             "random windows no window repeats, so nothing could be reused")
        return self


# --------------------------------------------------------------------------- loading


def _inner(ann: Any) -> Any:
    """The model behind an annotation: a BaseModel, {tag: model} for a tagged union, or None."""
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin in (list, Annotated):
        return _inner(args[0])
    if origin in (typing.Union, types.UnionType):
        members = [m for m in map(_inner, args) if isinstance(m, type)]
        tags = {m.model_fields["kind"].default: m for m in members if "kind" in m.model_fields}
        if len(tags) > 1:
            return tags
        return members[0] if len(members) == 1 else None
    return None


def _closest_key(loc: tuple[Any, ...]) -> str | None:
    """Suggest the valid key nearest to the misspelt one at `loc` (pydantic's raw loc)."""
    if not loc:
        return None
    model: Any = RunConfig
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        if isinstance(model, dict):  # a tagged union: pydantic puts the tag in the loc
            model = model.get(part)
            continue
        field = model.model_fields.get(part) if model is not None else None
        if field is None:
            return None
        model = _inner(field.annotation)
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return None
    match = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1)
    return match[0] if match else None


def _shown_loc(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """Drop the union tags pydantic inserts after a list index (arms.0.plan.x -> arms.0.x)."""
    return tuple(p for i, p in enumerate(loc)
                 if not (p in ARM_KINDS and i > 0 and isinstance(loc[i - 1], int)))


def _explain(err: ValidationError, source: str) -> PfreezeError:
    errors = err.errors()
    # A misspelt key also makes the real one "missing": report the typo, which explains both.
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = _shown_loc(tuple(first["loc"]))
    path = ".".join(str(p) for p in loc) or "(top level)"
    if first["type"] == "extra_forbidden":
        hint = _closest_key(tuple(first["loc"]))
        fix = f"did you mean '{hint}'?" if hint else "remove it (see configs/ for valid keys)"
        return PfreezeError(f"{source}: unknown config key '{path}'", fix)
    msg = first["msg"].removeprefix("Value error, ")
    return PfreezeError(f"{source}: invalid value for '{path}': {msg}", "correct it and rerun")




def parse_override(item: str) -> tuple[list[str], Any]:
    """`training.learning_rate=3e-4` -> (["training", "learning_rate"], 3e-4)."""
    if "=" not in item:
        raise PfreezeError(f"--set '{item}' has no '='", "write --set key.path=value")
    key, raw = item.split("=", 1)
    if not key.strip():
        raise PfreezeError(f"--set '{item}' has an empty key", "write --set key.path=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


class NotASection(TypeError):
    """An override path that runs through a value, not a section (training.seed.x)."""


def apply_override(tree: dict[str, Any], path: list[str], value: Any,
           defaults: dict[str, Any] | None = None) -> None:
    """Set `value` at `path`; a list the config does not spell out (arms) starts from its default,
    so `--set arms.1.select=...` edits the default arms instead of replacing them by a dict."""
    node: Any = tree
    dnode: Any = defaults
    for k, part in enumerate(path[:-1]):
        if isinstance(node, list):
            i = int(part)
            node = node[i]
            dnode = None
        elif isinstance(node, dict):
            if part not in node:
                d = dnode.get(part) if isinstance(dnode, dict) else None
                node[part] = copy.deepcopy(d) if isinstance(d, list) else {}
            dnode = dnode.get(part) if isinstance(dnode, dict) else None
            node = node[part]
        else:
            raise NotASection(f"{path[k - 1]} is not a section of the config")
    if isinstance(node, list):
        node[int(path[-1])] = value
    elif isinstance(node, dict):
        node[path[-1]] = value
    else:
        raise NotASection(f"{path[-2]} is not a section of the config")


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None
) -> RunConfig:
    """Read YAML (or start from defaults), apply `--set` overrides, validate."""
    tree: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise PfreezeError(f"config file {path} not found", "check the path") from None
        except (OSError, UnicodeDecodeError) as e:
            raise PfreezeError(f"cannot read config {path}: {e}", "check the file") from None
        try:
            tree = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise PfreezeError(
                f"{path}: YAML syntax error{where}", "fix the indentation or quoting there"
            ) from None
        if not isinstance(tree, dict):
            raise PfreezeError(f"{path}: top level must be a mapping", "see configs/ examples")
    defaults = RunConfig().model_dump(mode="json") if overrides else None
    for item in overrides or []:
        keys, value = parse_override(item)
        try:
            apply_override(tree, keys, value, defaults)
        except OVERRIDE_ERRORS as e:
            raise PfreezeError(f"--set '{item}': {override_problem(e)}",
                               "check the key path") from None
    if overrides:
        source = f"{source} + --set"
    return validate(tree, source)


# What apply_override raises for a path that leads nowhere (NotASection: says where).
OVERRIDE_ERRORS = (ValueError, IndexError, TypeError, AttributeError, KeyError)


def override_problem(e: Exception) -> str:
    return str(e) if isinstance(e, NotASection) else "no such place in the config"


def validate(tree: dict[str, Any], source: str = "the config") -> RunConfig:
    """The RunConfig of a config tree (as YAML would give it); a mistake in one line."""
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as e:
        raise _explain(e, source) from None


def dump_config(cfg: RunConfig) -> str:
    return dump(cfg)


def refresh_arm_kinds() -> None:
    """Take in arm kinds registered after this module was imported (a plugin's, a test's)."""
    global Arm
    Arm = _arm_union()
    RunConfig.model_fields["arms"].annotation = list[Arm]  # type: ignore[valid-type]
    RunConfig.model_rebuild(force=True)
