"""Every shipped YAML loads as a TrainConfig; flags override it; bad keys are named."""

from __future__ import annotations

from pathlib import Path

import pytest

from train.config import TrainConfig, build_parser, config_from_args, config_from_dict

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_yaml_loads(path):
    config = config_from_args(["--config", str(path), "--name", "x"])
    assert isinstance(config, TrainConfig) and config.lora.r > 0


def test_flags_override_the_yaml():
    config = config_from_args(["--config", str(ROOT / "configs" / "demo-adapter.yaml"), "--name", "x",
                               "--r", "4", "--lr", "0.01", "--no-quant", "--target-modules", "q_proj", "v_proj"])
    assert (config.lora.r, config.optim.lr, config.base.quantize) == (4, 0.01, False)
    assert config.lora.target_modules == ["q_proj", "v_proj"] and config.lora.alpha == 32


def test_unknown_keys_are_named():
    with pytest.raises(ValueError, match=r"unknown keys in config section 'lora': \['rank'\]"):
        config_from_dict({"name": "x", "data": {"path": "d.jsonl"}, "lora": {"rank": 4}})


def test_every_option_has_help():
    parser = build_parser()
    missing = [a.option_strings for a in parser._actions if not a.help]
    assert missing == []
