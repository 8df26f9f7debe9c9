"""An arm kind is one module plus one registry line: a toy kind written the way
docs/ARCHITECTURE.md shows runs end to end (config, plan, training, audit, summary) with no
other change to pfreeze."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from pfreeze.models.load import load_model
from pfreeze.plan.selectors import Plan, compile_plan
from pfreeze.run.arms.base import ARM_KINDS, ArmStrategy, register
from pfreeze.settings import ArmConfig


# --- the toy kind: what its module would hold ---------------------------------------------
class EveryOtherArm(ArmConfig):
    """Trains one role in every other block, from block 1."""

    kind: Literal["every-other"] = "every-other"
    role: str = "q"


class EveryOther(ArmStrategy):
    def _plans(self, model: nn.Module) -> dict[int, Plan | None]:
        odd = ",".join(str(i) for i in range(1, model.config.num_hidden_layers, 2))
        return {0: compile_plan(model, self.family, f"layers={odd} roles={self.cfg.role}")}

    def describe(self) -> str:
        return f"every other block's {self.cfg.role}"
# --------------------------------------------------------------------------------------------


@pytest.fixture
def toy_kind(monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    from pfreeze import config

    monkeypatch.setitem(ARM_KINDS, "every-other", ARM_KINDS.get("every-other"))
    register(EveryOtherArm)(EveryOther)  # the registry line
    config.refresh_arm_kinds()  # a kind registered after pfreeze.config was imported
    yield
    monkeypatch.undo()
    config.refresh_arm_kinds()


def test_a_toy_arm_kind_trains_through_the_whole_run(toy_kind: None, corpus_file: Path,
                                                     tmp_path: Path) -> None:
    from pfreeze.config import load_config
    from pfreeze.run.session import run

    cfg = load_config(None, [
        f"data.corpus={corpus_file}", "model.name=random:llama", "data.block_size=32",
        "training.device=cpu", "training.max_steps=3", "training.learning_rate=1e-2",
        "generation.max_new_tokens=4", "generation.samples_per_prompt=1",
        "arms=[{kind: full}, {kind: every-other, role: v}]"])
    assert type(cfg.arms[1]) is EveryOtherArm and cfg.arms[1].name == "every-other"
    summary = run(cfg, tmp_path / "run")
    arm = summary["arms"]["every-other"]
    # random:llama: 4 blocks, width 64, 2 KV heads of 16: v is 32 x 64 (no bias) in blocks 1, 3
    assert arm["trainable_params"] == 2 * 32 * 64
    assert arm["description"] == "every other block's v" and arm["integrity"]["ok"]
    trained = load_file(str(tmp_path / "run" / "arms" / "every-other" / "trained.safetensors"))
    assert sorted(trained) == [f"model.layers.{i}.self_attn.v_proj.weight" for i in (1, 3)]
    theta0 = dict(load_model("random:llama", seed=0).model.named_parameters())
    for name, t in trained.items():
        assert not torch.equal(t, theta0[name].detach())  # it trained


def test_an_unknown_kind_names_the_registered_ones() -> None:
    from pfreeze.config import load_config
    from pfreeze.errors import PfreezeError

    with pytest.raises(PfreezeError, match="every-other|does not match any of the expected") as e:
        load_config(None, ["arms=[{kind: every-other}]"])
    assert "full" in str(e.value) and "lora" in str(e.value)
