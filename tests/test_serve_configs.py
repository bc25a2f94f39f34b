"""Every shipped Serve config parses as a Serve config and builds the ppcr app with its args."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

pytest.importorskip("ray.serve")
from ray.serve._private.api import call_user_app_builder_with_args_if_necessary  # noqa: E402
from ray.serve.schema import ServeDeploySchema  # noqa: E402

from ppcr.serve import ServeSettings, build_app, make_app, resolve_settings  # noqa: E402

CONFIGS = sorted((Path(__file__).parent.parent / "serve_configs").glob("*.yaml"))


def test_both_shipped_configs_exist():
    assert {p.name for p in CONFIGS} >= {"tiny_cpu.yaml", "llava7b_l20.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_parses_and_builds_the_app(path, monkeypatch):
    monkeypatch.delenv("PPCR_CHECKPOINT", raising=False)
    raw = yaml.safe_load(path.read_text())
    schema = ServeDeploySchema.model_validate(raw)
    assert "host" in raw["http_options"], "a shipped config says where it binds (Serve's default is 0.0.0.0)"
    assert f"host: {raw['http_options']['host']}" in path.read_text()
    for app in schema.applications:
        assert app.import_path == "ppcr.serve:build_app"
        settings = resolve_settings(app.args)  # unknown or mistyped args are errors
        assert isinstance(settings, ServeSettings)
        # What `serve run` itself calls (a private helper: it enforces the one-`args`-parameter rule).
        built = call_user_app_builder_with_args_if_necessary(build_app, app.args)
        names = {d.name for d in app.deployments}
        assert names == {"Ingress", "MLLM", "SAM"}
        assert built._bound_deployment.name == "Ingress"
        for d in app.deployments:
            assert d.autoscaling_config, f"{path.name}: {d.name} has no autoscaling_config"
            if d.name != "Ingress":
                # @serve.batch fills only if a replica may hold a whole batch at once.
                assert d.max_ongoing_requests >= settings.max_batch_size
                assert d.max_queued_requests > 0, "an unbounded queue"


def test_tiny_config_binds_localhost_and_production_config_asks_for_l20_gpus():
    tiny = yaml.safe_load((CONFIGS[0].parent / "tiny_cpu.yaml").read_text())
    assert tiny["http_options"]["host"] == "127.0.0.1"
    assert tiny["applications"][0]["args"]["checkpoint"] is None  # -> $PPCR_CHECKPOINT
    prod = yaml.safe_load((CONFIGS[0].parent / "llava7b_l20.yaml").read_text())
    app = prod["applications"][0]
    assert app["args"]["device"] == "cuda" and app["args"]["checkpoint"].startswith("/")
    for d in app["deployments"]:
        opts = d["ray_actor_options"]
        if d["name"] == "Ingress":
            assert opts.get("num_gpus", 0) == 0
        else:
            assert opts["num_gpus"] == 1 and opts["accelerator_type"] == "L20"
            scale = d["autoscaling_config"]
            assert scale["min_replicas"] <= scale["max_replicas"] and scale["target_ongoing_requests"] > 0


def test_bad_args_are_clear_errors():
    with pytest.raises(Exception, match="max_batch_sise"):
        resolve_settings({"max_batch_sise": 4})
    with pytest.raises(ValueError, match="max_pixels must be >= 1"):
        resolve_settings({"max_pixels": 0})
    with pytest.raises(ValueError, match="unknown deployment"):
        make_app({}, {"Sam": {}})


def test_ppcr_serve_command_defaults_to_localhost():
    from ppcr.cli import build_parser, cmd_serve

    a = build_parser().parse_args(["serve", "--checkpoint", "ckpt", "--port", "8123"])
    assert a.fn is cmd_serve and (a.host, a.port, a.checkpoint) == ("127.0.0.1", 8123, "ckpt")
