"""Typed configs: presets resolve, `base:` merges, errors name the full key (every shipped YAML loads:
test_shipped_yaml.py)."""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from pathlib import Path

import pytest
import yaml

from ppcr.batch.config import BatchConfig, StageConfig, load_batch_config
from ppcr.config import (
    PRESET_DIR,
    ConfigError,
    LossConfig,
    MixEntry,
    ModelConfig,
    RunConfig,
    from_dict,
    key,
    load_config,
    preset_names,
    require_above,
    require_at_least,
    to_dict,
)
from ppcr.data.synth import SynthConfig
from ppcr.serve.settings import ServeSettings, resolve_settings

REPO = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, data, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def test_presets_are_shipped():
    assert {"tiny", "llava-1.5-7b"} <= set(preset_names())


@pytest.mark.parametrize("name", preset_names())
def test_preset_names_resolve(name: str):
    by_name = load_config(name)
    by_path = load_config(PRESET_DIR / f"{name}.yaml")
    assert by_name == by_path
    assert by_name.model.preset == name


def test_tiny_preset_values():
    cfg = load_config("tiny")
    assert cfg.model.sam.size == "tiny"
    assert cfg.model.box_head == "attention"
    assert cfg.model.vision.image_size % cfg.model.vision.patch_size == 0
    assert cfg.train.betas == (0.9, 0.95) and isinstance(cfg.train.betas, tuple)
    assert isinstance(cfg.train.lr, float)


def test_base_plus_override_merges(tmp_path):
    path = _write(
        tmp_path,
        {
            "base": "tiny",
            "model": {"box_head": "mlp", "semantic_grounding": False, "vision": {"num_layers": 1}},
            "train": {"steps": 7},
        },
    )
    cfg = load_config(path)
    tiny = load_config("tiny")
    assert cfg.model.box_head == "mlp"
    assert cfg.model.vision.num_layers == 1
    # Sibling keys of an overridden mapping come from the preset (deep merge, not replace).
    assert cfg.model.vision.hidden_size == tiny.model.vision.hidden_size
    assert cfg.model.vision.image_size == tiny.model.vision.image_size
    assert cfg.model.sam == tiny.model.sam
    assert cfg.train.steps == 7
    assert cfg.train.lr == tiny.train.lr
    assert cfg.loss == tiny.loss and cfg.data == tiny.data


def test_overrides_argument_merges():
    cfg = load_config("tiny", overrides={"model": {"spatial_prompt": "expression"}, "train": {"seed": 3}})
    assert cfg.model.spatial_prompt == "expression"
    assert cfg.train.seed == 3
    assert cfg.model.box_head == load_config("tiny").model.box_head


def test_without_base_uses_dataclass_defaults(tmp_path):
    cfg = load_config(_write(tmp_path, {"train": {"steps": 3}}))
    assert cfg.train.steps == 3
    assert cfg.model == ModelConfig()


def test_unknown_base_names_key(tmp_path):
    with pytest.raises(ConfigError, match=r"base must be one of .*got 'tinyy'"):
        load_config(_write(tmp_path, {"base": "tinyy"}))


def test_unknown_key_names_key(tmp_path):
    with pytest.raises(ConfigError) as exc:
        load_config(_write(tmp_path, {"base": "tiny", "model": {"box_hed": "mlp"}}))
    assert "model.box_hed" in str(exc.value)
    assert "box_head" in str(exc.value)  # the valid keys are listed


def test_unknown_top_level_key(tmp_path):
    with pytest.raises(ConfigError, match="unknown key modle"):
        load_config(_write(tmp_path, {"modle": {}}))


def test_bad_literal_message(tmp_path):
    with pytest.raises(ConfigError) as exc:
        load_config(_write(tmp_path, {"base": "tiny", "model": {"box_head": "mpl"}}))
    assert "model.box_head must be one of mlp, attention; got 'mpl'" in str(exc.value)


def test_bad_nested_literal(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.sam\.size must be one of"):
        load_config(_write(tmp_path, {"base": "tiny", "model": {"sam": {"size": "vit_x"}}}))


@pytest.mark.parametrize(
    ("override", "key", "fragment"),
    [
        ({"train": {"steps": "ten"}}, "train.steps", "must be an integer"),
        ({"train": {"steps": 1.5}}, "train.steps", "must be an integer"),
        ({"train": {"steps": True}}, "train.steps", "must be an integer"),
        ({"train": {"lr": "fast"}}, "train.lr", "must be a number"),
        ({"model": {"train_base": "yes"}}, "model.train_base", "must be true or false"),
        ({"model": {"vision": 3}}, "model.vision", "must be a mapping"),
        ({"model": {"lora": {"target_modules": "q_proj"}}}, "model.lora.target_modules", "must be a list"),
        ({"model": {"lora": {"target_modules": ["q_proj", 3]}}}, "model.lora.target_modules[1]", "string"),
        ({"train": {"betas": [0.9]}}, "train.betas", "must have 2 items"),
        ({"model": {"prompt_dim": None}}, "model.prompt_dim", "must be an integer; got None"),
        ({"model": {"mllm_path": 5}}, "model.mllm_path", "must be a string"),
    ],
)
def test_wrong_type_names_key(tmp_path, override, key, fragment):
    with pytest.raises(ConfigError) as exc:
        load_config(_write(tmp_path, {"base": "tiny", **override}))
    assert key in str(exc.value)
    assert fragment in str(exc.value)


def test_vision_image_size_not_multiple_of_patch(tmp_path):
    with pytest.raises(ConfigError) as exc:
        load_config(_write(tmp_path, {"base": "tiny", "model": {"vision": {"image_size": 100}}}))
    msg = str(exc.value)
    assert "model.vision.image_size" in msg and "patch_size" in msg and "100" in msg


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ({"model": {"sam": {"image_size": 100}}}, "model.sam.image_size"),
        ({"model": {"sam": {"size": "vit_b"}}}, "model.sam.image_size"),  # official SAM needs 1024
        (
            {"model": {"sam": {"patch_size": 0}}},
            "model.sam.image_size (128) must be a multiple of patch_size",
        ),
        (
            {"model": {"sam": {"patch_size": 48}}},
            "model.sam.image_size (128) must be a multiple of patch_size",
        ),
        (
            {"model": {"sam": {"size": "vit_b", "image_size": 1024, "patch_size": 8}}},
            "model.sam.image_size/patch_size",
        ),
        ({"loss": {"dice": -1.0}}, "loss.dice"),
        ({"train": {"steps": 0}}, "train.steps"),
        ({"train": {"lr": 0.0}}, "train.lr"),
        ({"model": {"language": {"num_heads": 3}}}, "model.language.hidden_size"),
        ({"model": {"language": {"initializer_range": 0.0}}}, "model.language.initializer_range"),
        ({"model": {"language": {"initializer_range": 2.0}}}, "model.language.initializer_range"),
    ],
)
def test_cross_field_validation_names_key(tmp_path, override, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(_write(tmp_path, {"base": "tiny", **override}))


def test_missing_file_names_path(tmp_path):
    missing = tmp_path / "nope" / "run.yaml"
    with pytest.raises(ConfigError) as exc:
        load_config(missing)
    assert str(missing) in str(exc.value)


def test_invalid_yaml_names_path(tmp_path):
    path = _write(tmp_path, "model: {box_head: [mlp\ntrain: : :\n", name="broken.yaml")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert str(path) in str(exc.value)
    assert "not valid YAML" in str(exc.value)


def test_top_level_not_mapping(tmp_path):
    path = _write(tmp_path, "- a\n- b\n", name="list.yaml")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(path)


def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize("name", preset_names())
def test_to_dict_from_dict_round_trip(name: str, tmp_path):
    cfg = load_config(name)
    d = to_dict(cfg)
    # Plain YAML-safe types only (tuples become lists).
    assert d["train"]["betas"] == list(cfg.train.betas)
    text = yaml.safe_dump(d)
    assert from_dict(RunConfig, d) == cfg
    assert from_dict(RunConfig, yaml.safe_load(text)) == cfg
    # And through a file on disk.
    assert load_config(_write(tmp_path, text, name="dumped.yaml")) == cfg


def test_model_config_round_trip():
    cfg = load_config("tiny").model
    assert from_dict(ModelConfig, to_dict(cfg)) == cfg


def test_scientific_notation_lr(tmp_path):
    cfg = load_config(_write(tmp_path, "base: tiny\ntrain: {lr: 3e-4}\n"))
    assert cfg.train.lr == pytest.approx(3e-4)


# ----------------------------------------------------------------------------- the validate convention


@pytest.mark.parametrize(
    ("load", "message"),
    [
        (
            lambda: load_batch_config(None, {"sam": {"concurrency": 0}}),
            "batch.sam.concurrency must be >= 1; got 0",
        ),
        (
            lambda: load_batch_config(None, {"mllm": {"num_gpus": -1}}),
            "batch.mllm.num_gpus must be >= 0; got -1.0",
        ),
        (lambda: load_batch_config(None, {"torch_threads": 0}), "batch.torch_threads must be >= 1; got 0"),
        (lambda: resolve_settings({"max_pixels": 0}), "args.max_pixels must be >= 1; got 0"),
        (lambda: resolve_settings({"request_timeout_s": 0}), "args.request_timeout_s must be > 0; got 0.0"),
        (
            lambda: load_config("tiny", {"distributed": {"num_workers": 0}}),
            "tiny: distributed.num_workers must be >= 1; got 0",
        ),
        (
            lambda: load_config(
                "tiny", {"distributed": {"datasets": [{"shards_root": "s", "dataset": "d", "weight": 0}]}}
            ),
            "tiny: distributed.datasets[0].weight must be > 0; got 0.0",
        ),
        (lambda: load_config("tiny", {"loss": {"dice": -1}}), "tiny: loss.dice must be >= 0; got -1.0"),
        (
            lambda: load_config("tiny", {"model": {"vision": {"patch_size": 0}}}),
            "tiny: model.vision.patch_size must be >= 1; got 0",
        ),
        (lambda: from_dict(SynthConfig, {"num_images": 0}, "synth"), "synth.num_images must be >= 1; got 0"),
        (lambda: SynthConfig(colors=("mauve",)).validate("synth"), "synth.colors: unknown colours ['mauve']"),
    ],
)
def test_every_message_names_its_full_key(load, message):
    with pytest.raises(ConfigError) as exc:
        load()
    assert str(exc.value).startswith(message), str(exc.value)


def _config_dataclasses() -> set[type]:
    """Every dataclass reachable from the configs ppcr loads through `from_dict`."""
    found: set[type] = set()
    todo = [RunConfig, BatchConfig, ServeSettings, SynthConfig]
    while todo:
        cls = todo.pop()
        if cls in found:
            continue
        found.add(cls)
        for tp in typing.get_type_hints(cls).values():
            for arg in (tp, *typing.get_args(tp)):
                if dataclasses.is_dataclass(arg):
                    todo.append(arg)
    return found


def test_config_checks_follow_one_convention():
    """Checks live in `validate(self, prefix)` (called by from_dict with the full key), never in
    __post_init__ (which cannot know the key) or in a separate function."""
    classes = _config_dataclasses()
    assert {StageConfig, MixEntry, LossConfig} <= classes
    for cls in classes:
        assert "__post_init__" not in vars(cls), f"{cls.__name__}: put its checks in validate(self, prefix)"
        check = vars(cls).get("validate")
        if check is not None:
            assert list(inspect.signature(check).parameters) == ["self", "prefix"], cls.__name__


def test_key_and_require_helpers():
    assert key("", "model") == "model" and key("model.sam", "size") == "model.sam.size"
    require_at_least(1, 1, "a.b")
    require_above(0.5, 0, "a.b")
    with pytest.raises(ConfigError, match=r"^a\.b must be >= 1; got 0$"):
        require_at_least(0, 1, "a.b")
    with pytest.raises(ConfigError, match=r"^a\.b must be > 0; got 0$"):
        require_above(0, 0, "a.b")


def test_test_hooks_are_not_user_config():
    """The worker-crash hook of the distributed tests is run_training's `_fail_at_step` keyword."""
    with pytest.raises(ConfigError, match="unknown key distributed.fail_at_step"):
        load_config("tiny", {"distributed": {"fail_at_step": 3}})
    from ppcr.distributed_train import run_training

    hook = inspect.signature(run_training).parameters["_fail_at_step"]
    assert hook.kind is inspect.Parameter.KEYWORD_ONLY and hook.default is None
