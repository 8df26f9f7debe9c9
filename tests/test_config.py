"""The run configuration: defaults, YAML, `--set` overrides, and errors that name their place."""

from __future__ import annotations

from pathlib import Path

import pytest

from pfreeze.config import RunConfig, dump_config, load_config, parse_override
from pfreeze.errors import PfreezeError
from pfreeze.run.arms.full import FullArm
from pfreeze.run.arms.lora import LoraArm
from pfreeze.run.arms.plan import PlanArm
from pfreeze.run.arms.schedule import ScheduleArm

REPO = Path(__file__).resolve().parents[1]


def error(*args, **kwargs) -> str:
    """load_config(...) must fail with a one-line PfreezeError that says how to fix it."""
    with pytest.raises(PfreezeError) as info:
        load_config(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg, msg
    assert info.value.fix, msg
    return msg


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "run.yaml"
    p.write_text(text, encoding="utf-8")
    return p


# --------------------------------------------------------------------------- defaults


def test_defaults_validate_and_name_the_arms() -> None:
    cfg = load_config()
    assert cfg == RunConfig()
    assert [(a.kind, a.name) for a in cfg.arms] == [("full", "full"), ("plan", "plan")]
    assert isinstance(cfg.arms[1], PlanArm)
    assert cfg.arms[1].select == "layers=50%: roles=q,k,v"
    assert cfg.training.learning_rate == 1e-4
    assert cfg.training.optim == "adamw"
    assert cfg.track == "roles=q,k,v,o"


def test_shipped_config_loads() -> None:
    cfg = load_config(REPO / "configs" / "moby-dick.yaml")
    assert cfg.model.name == "smollm2-135m"
    assert [a.name for a in cfg.arms] == ["full", "qkv-upper"]
    assert cfg.training.learning_rate == 2e-4


def test_dump_then_load_round_trips(tmp_path: Path) -> None:
    cfg = load_config(None, ["arms=[{kind: full}, {kind: lora, r: 4}, "
                             "{kind: schedule, phases: [{start: 2, select: roles=q}]}]",
                             "training.max_steps=7", "data.encoding=latin-1"])
    again = load_config(write(tmp_path, dump_config(cfg)))
    assert again == cfg
    assert [type(a) for a in again.arms] == [FullArm, LoraArm, ScheduleArm]


def test_set_overrides_apply_with_yaml_types() -> None:
    cfg = load_config(None, ["training.learning_rate=3e-4", "training.max_steps=12",
                             "training.bf16=false", "generation.prompts=[Call me, The]",
                             "data.corpus=/tmp/x.txt"])
    assert cfg.training.learning_rate == 3e-4
    assert isinstance(cfg.training.learning_rate, float)
    assert cfg.training.max_steps == 12
    assert cfg.training.bf16 is False
    assert cfg.generation.prompts == ["Call me", "The"]
    assert cfg.data.corpus == "/tmp/x.txt"
    # Untouched settings keep their defaults.
    default = RunConfig().training
    assert cfg.training.per_device_train_batch_size == default.per_device_train_batch_size


def test_set_overrides_win_over_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "training:\n  learning_rate: 1.0e-3\n  max_steps: 5\n")
    cfg = load_config(path, ["training.learning_rate=3e-4"])
    assert cfg.training.learning_rate == 3e-4
    assert cfg.training.max_steps == 5


def test_set_can_edit_one_default_arm() -> None:
    cfg = load_config(None, ["arms.1.select=roles=q", "arms.0.name=everything"])
    assert [(a.kind, a.name) for a in cfg.arms] == [("full", "everything"), ("plan", "plan")]
    assert cfg.arms[1].select == "roles=q"


def test_set_can_replace_the_arms() -> None:
    cfg = load_config(None, ["arms=[{kind: plan, select: 'layers=0: roles=q'}]"])
    assert len(cfg.arms) == 1 and cfg.arms[0].select == "layers=0: roles=q"


def test_parse_override() -> None:
    assert parse_override("training.max_steps=12") == (["training", "max_steps"], 12)
    assert parse_override("training.bf16=false") == (["training", "bf16"], False)
    assert parse_override("data.corpus=a=b.txt") == (["data", "corpus"], "a=b.txt")
    assert parse_override("model.revision=") == (["model", "revision"], "")


@pytest.mark.parametrize(("item", "needle"), [
    ("training.learning_rate", "has no '='"),
    ("=3", "empty key"),
    ("arms.5.select=x", "no such place"),
    ("arms.x.select=x", "no such place"),
])
def test_bad_set_items(item: str, needle: str) -> None:
    assert needle in error(None, [item])


def test_a_set_item_below_a_value_says_so_as_the_api_does() -> None:
    assert "seed is not a section" in error(None, ["training.seed=1", "training.seed.x=2"])


# --------------------------------------------------------------------------- arm names


def test_unnamed_arms_get_unique_names() -> None:
    cfg = load_config(None, ["arms=[{kind: plan}, {kind: plan}, {kind: full}]"])
    names = [a.name for a in cfg.arms]
    assert names == ["plan", "plan2", "full"]


def test_automatic_names_avoid_names_given_later() -> None:
    cfg = load_config(None, ["arms=[{kind: plan}, {kind: plan}, {kind: full, name: plan2}]"])
    names = [a.name for a in cfg.arms]
    assert len(set(names)) == 3 and names[0] == "plan" and names[2] == "plan2"


def test_duplicate_arm_names_are_an_error() -> None:
    msg = error(None, ["arms=[{kind: full, name: a}, {kind: plan, name: a}]"])
    assert "two arms are named 'a'" in msg
    assert "'arms'" in msg


@pytest.mark.parametrize("name", ["../x", "a/b", "has space", ""])
def test_arm_names_must_be_safe_folder_names(name: str) -> None:
    msg = error(None, [f"arms=[{{kind: full, name: '{name}'}}]"])
    assert "arms.0.name" in msg


# --------------------------------------------------------------------------- errors


def test_typo_gets_a_suggestion(tmp_path: Path) -> None:
    msg = error(write(tmp_path, "training:\n  learnig_rate: 1.0e-3\n"))
    assert "unknown config key 'training.learnig_rate'" in msg
    assert "did you mean 'learning_rate'" in msg


def test_typo_nested_in_arms_names_its_path() -> None:
    msg = error(None, ["arms=[{kind: full}, {kind: plan, selct: 'roles=q'}]"])
    assert "'arms.1.selct'" in msg
    assert "did you mean 'select'" in msg


def test_typo_nested_in_schedule_phases_names_its_path(tmp_path: Path) -> None:
    path = write(tmp_path, "arms:\n  - kind: schedule\n    phases:\n"
                           "      - {start: 0, selec: roles=q}\n")
    msg = error(path)
    assert "'arms.0.phases.0.selec'" in msg and "did you mean 'select'" in msg


@pytest.mark.parametrize("key", ["plan", "full"])
def test_unknown_top_level_key_named_like_an_arm_kind(tmp_path: Path, key: str) -> None:
    msg = error(write(tmp_path, f"{key}: 3\n"))
    assert f"unknown config key '{key}'" in msg


def test_unknown_arm_kind_names_the_arm() -> None:
    msg = error(None, ["arms=[{kind: fulll}]"])
    assert "arms.0" in msg and "fulll" in msg


def test_negative_learning_rate() -> None:
    msg = error(None, ["training.learning_rate=-1e-4"])
    assert "invalid value for 'training.learning_rate'" in msg
    assert "greater than 0" in msg


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    msg = error(write(tmp_path, "training:\n  learning_rate: [1e-4\n  max_steps: 3\n"))
    assert "YAML syntax error at line" in msg


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    assert "must be a mapping" in error(write(tmp_path, "- a\n- b\n"))


def test_missing_config_file(tmp_path: Path) -> None:
    assert "not found" in error(tmp_path / "nope.yaml")


def test_empty_file_means_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "")) == RunConfig()
