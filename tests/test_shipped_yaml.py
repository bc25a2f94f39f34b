"""Every YAML file the project ships is loaded, by the loader that reads it in use, by this test.

The files are found by glob, so a new YAML must be given a loader in `LOADERS` (the test fails
otherwise): a shipped file that nothing loads is how a config rots unnoticed.
"""

from __future__ import annotations

import copy
import logging.config
from pathlib import Path

import pytest
import yaml

from ppcr.batch.config import BatchConfig, load_batch_config
from ppcr.config import RunConfig, from_dict, load_config, to_dict
from ppcr.serve.app import read_serve_config
from ppcr.serve.settings import resolve_settings

REPO = Path(__file__).resolve().parents[1]
# Where shipped YAML lives (the repository root itself only for cluster.yaml).
ROOTS = ("ppcr", "configs", "serve_configs", "deploy")


def shipped_yaml() -> list[Path]:
    files = set(REPO.glob("*.yaml")) | set(REPO.glob("*.yml"))
    for root in ROOTS:
        files |= set((REPO / root).rglob("*.yaml")) | set((REPO / root).rglob("*.yml"))
    return sorted(f for f in files if "egg-info" not in f.parts)


def load_run_config(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    assert from_dict(RunConfig, to_dict(cfg)) == cfg  # the dumped tree re-validates to the same config


def load_batch(path: Path) -> None:
    cfg = load_batch_config(path)
    assert isinstance(cfg, BatchConfig)
    assert cfg.demand()["CPU"] > 0


def load_deepspeed(path: Path) -> None:
    from ppcr.distributed_train import deepspeed_config

    cfg = load_config("tiny", {"distributed": {"deepspeed_config": str(path)}})
    ds = deepspeed_config(cfg)
    assert "auto" not in yaml.safe_dump(ds), "every 'auto' is filled from the run config"
    assert ds["train_batch_size"] == cfg.train.batch_size


def load_serve_config(path: Path) -> None:
    from ray import serve

    from ppcr.serve.app import Ingress
    from ppcr.serve.deployments import MLLMDeployment, SAMDeployment

    read = read_serve_config(path)  # Serve's own schema, one application of ppcr.serve:build_app
    resolve_settings(read["args"])  # the builder's args, validated as build_app does
    deployments = {d.name: d for d in (Ingress, MLLMDeployment, SAMDeployment)}
    assert set(read["options"]) == set(deployments), path
    for name, options in read["options"].items():
        assert isinstance(deployments[name].options(**options), serve.Deployment)


def load_logging(path: Path) -> None:
    data = yaml.safe_load(path.read_text())
    assert data["version"] == 1
    resolve = logging.config.BaseConfigurator({}).resolve  # what dictConfig imports by dotted name
    for handler in data["handlers"].values():
        assert isinstance(resolve(handler["class"]), type)
        assert handler.get("formatter") in data["formatters"]
    for spec in data.get("filters", {}).values():
        assert callable(resolve(spec["()"]))
    for logger in data["loggers"].values():
        assert set(logger["handlers"]) <= set(data["handlers"])


def load_cluster(path: Path) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(yaml.safe_load(path.read_text()))))


def load_kubernetes(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs
    for doc in docs:
        assert {"apiVersion", "kind", "metadata"} <= set(doc), path
        assert doc["metadata"]["name"]
        if doc["kind"] == "RayService":  # its Serve config is the same kind of file as serve_configs/
            served = yaml.safe_load(doc["spec"]["serveConfigV2"])
            (app,) = served["applications"]
            assert app["import_path"] == "ppcr.serve:build_app"
            resolve_settings(app["args"])


# Relative path pattern -> loader. Order matters: the first match wins.
LOADERS = [
    ("ppcr/configs/*.yaml", load_run_config),
    ("configs/train/*.yaml", load_run_config),
    ("configs/batch/*.yaml", load_batch),
    ("configs/deepspeed/*.yaml", load_deepspeed),
    ("serve_configs/*.yaml", load_serve_config),
    ("ppcr/serve/*.yaml", load_serve_config),
    ("ppcr/batch/ray_data_logging.yaml", load_logging),
    ("cluster.yaml", load_cluster),
    ("deploy/kuberay/*.yaml", load_kubernetes),
]


def loader_for(path: Path):
    rel = path.relative_to(REPO)
    for pattern, loader in LOADERS:
        if rel.match(pattern) and len(rel.parts) == len(Path(pattern).parts):
            return loader
    return None


def test_shipped_yaml_are_found():
    names = {str(p.relative_to(REPO)) for p in shipped_yaml()}
    assert {"ppcr/configs/tiny.yaml", "configs/batch/cpu.yaml", "serve_configs/tiny_cpu.yaml"} <= names


@pytest.mark.parametrize("path", shipped_yaml(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_yaml_is_loaded(path: Path):
    loader = loader_for(path)
    assert loader is not None, f"{path.relative_to(REPO)}: add the loader that reads it to LOADERS"
    loader(path)
