"""Every shipped YAML loads as its config (configs/serve.yaml a ServeConfig, the others a
TrainConfig); flags override it; bad keys are named; the serve flags are the fields'."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest

from adapters.base import DEFAULT_BASE, BaseConfig
from adapters.cli import load_yaml
from serve.__main__ import build_parser as serve_parser
from serve.__main__ import check_web_args
from serve.config import ServeConfig
from train.config import TrainConfig, build_parser, config_from_args, config_from_dict

ROOT = Path(__file__).resolve().parents[1]
SERVE_CONFIGS = ("serve.yaml",)
"""The shipped YAML files that hold a saved ServeConfig; every other one holds a TrainConfig."""


def serve_config_from(argv: list[str]) -> ServeConfig:
    config, _ = check_web_args(serve_parser().parse_args(argv))
    return config


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_yaml_loads(path, monkeypatch):
    if path.name in SERVE_CONFIGS:
        monkeypatch.delenv("LORASWAP_AUTH", raising=False)
        assert serve_config_from(["web", "--config", str(path)]) == ServeConfig()  # it holds the defaults
        return
    config = config_from_args(["--config", str(path), "--name", "x"])
    assert isinstance(config, TrainConfig) and config.lora.r > 0


def test_the_serve_yaml_names_every_field():
    """A saved instance holds every key (a new field must be added there, with its comment)."""
    import yaml

    saved = yaml.safe_load((ROOT / "configs" / "serve.yaml").read_text())
    assert saved == yaml.safe_load(yaml.safe_dump(asdict(ServeConfig())))


def test_serve_flags_override_the_yaml_and_keep_their_old_names(tmp_path):
    saved = tmp_path / "serve.yaml"
    saved.write_text("service:\n  max_queue: 4\n  decode:\n    context: 512\naccess:\n  port: 9000\n")
    config = serve_config_from(["--base", "b", "--no-quant", "web", "--config", str(saved), "--port", "9001",
                                "--no-cuda-graphs", "--graph-context", "256", "--max-new-tokens-limit", "8",
                                "--deterministic", "--lora-kernel", "torch", "--auth", "ana:a", "--max-stop", "3"])
    service = config.service
    assert (service.base, service.quantize, service.max_queue, service.lora_kernel) == ("b", False, 4, "torch")
    assert (service.decode.static_cache, service.decode.context, service.decode.deterministic) == (False, 256, True)
    assert service.limits.max_new_tokens == 8 and service.max_loaded == 8  # a key neither sets keeps its default
    assert (config.access.port, config.access.auth, config.api.max_stop) == (9001, ("ana:a",), 3)
    new = serve_config_from(["--no-quantize", "web", "--static-cache", "--context", "128"])
    assert (new.service.quantize, new.service.decode.static_cache, new.service.decode.context) == (False, True, 128)


def test_a_bad_serve_yaml_is_named_before_anything_loads(tmp_path):
    from serve.__main__ import UsageError

    saved = tmp_path / "serve.yaml"
    saved.write_text("service:\n  max_queu: 4\n")
    with pytest.raises(UsageError, match=r"unknown keys in config section 'service': \['max_queu'\]"):
        serve_config_from(["web", "--config", str(saved)])
    saved.write_text("api:\n  max_stop: 0\n")
    with pytest.raises(UsageError, match="--max-stop must be at least 1, got 0"):
        serve_config_from(["web", "--config", str(saved)])
    with pytest.raises(UsageError, match=f"--config {tmp_path / 'none.yaml'}: cannot read it"):
        serve_config_from(["web", "--config", str(tmp_path / "none.yaml")])


def test_serve_chat_flags_are_the_sampling_fields():
    from serve.__main__ import sampling_params
    from serve.engine import RequestError, SamplingParams

    assert sampling_params(serve_parser().parse_args(["chat", "hi"])) == SamplingParams()
    params = sampling_params(serve_parser().parse_args(["chat", "hi", "--top-p", "0.5", "--max-new-tokens", "9",
                                                        "--seed", "3", "--stop", "a", "--stop", "b"]))
    assert params == SamplingParams(top_p=0.5, max_new_tokens=9, seed=3, stop=("a", "b"))
    with pytest.raises(RequestError, match="top_p"):
        sampling_params(serve_parser().parse_args(["chat", "hi", "--top-p", "2"]))


def test_one_default_base_and_one_quantization_flag():
    assert BaseConfig().path == ServeConfig().service.base == DEFAULT_BASE
    assert config_from_args(["--name", "x", "--data", "d.jsonl", "--no-quantize"]).base.quantize is False
    assert serve_config_from(["--no-quantize", "web"]).service.quantize is False
    assert serve_config_from(["--no-quant", "web"]).service.quantize is False


def test_flags_override_the_yaml():
    config = config_from_args(["--config", str(ROOT / "configs" / "demo-adapter.yaml"), "--name", "x",
                               "--r", "4", "--lr", "0.01", "--no-quant", "--target-modules", "q_proj", "v_proj"])
    assert (config.lora.r, config.optim.lr, config.base.quantize) == (4, 0.01, False)
    assert config.lora.target_modules == ["q_proj", "v_proj"] and config.lora.alpha == 32


@pytest.mark.parametrize("recipe", sorted((ROOT / "configs" / "demo").glob("*.yaml")), ids=lambda p: p.stem)
def test_a_demo_task_recipe_holds_only_what_differs_from_the_shared_one(recipe):
    """`make demo-adapters` gives configs/demo-adapter.yaml, then the task's own: its keys win,
    section by section, and every other key is the shared recipe's."""
    shared = config_from_args(["--config", str(ROOT / "configs" / "demo-adapter.yaml"), "--name", "x"])
    task = config_from_args(["--config", str(ROOT / "configs" / "demo-adapter.yaml"), "--config", str(recipe),
                             "--name", "x", "--seed", "3"])
    own = load_yaml(recipe)
    assert own and set(own) <= {"base", "lora", "optim", "data"}
    for section, keys in own.items():
        for key, value in keys.items():
            assert getattr(getattr(task, section), key) == value, (section, key)
    assert task.seed == 3  # a flag still overrides both files
    changed = {(section, key) for section, keys in own.items() for key in keys}
    for section in ("base", "lora", "optim", "data"):
        for key, value in vars(getattr(shared, section)).items():
            if (section, key) not in changed:
                assert getattr(getattr(task, section), key) == value, (section, key)


def test_unknown_keys_are_named():
    with pytest.raises(ValueError, match=r"unknown keys in config section 'lora': \['rank'\]"):
        config_from_dict({"name": "x", "data": {"path": "d.jsonl"}, "lora": {"rank": 4}})


def test_every_option_has_help():
    parser = build_parser()
    missing = [a.option_strings for a in parser._actions if not a.help]
    assert missing == []
    web = serve_parser()._subparsers._group_actions[0].choices["web"]
    assert [a.option_strings for a in web._actions if not a.help] == []
