"""Every shipped Serve config parses as a Serve config and builds the ppcr app with its args."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("ray.serve")
from ray.serve._private.api import call_user_app_builder_with_args_if_necessary  # noqa: E402
from ray.serve.schema import ServeDeploySchema  # noqa: E402

from ppcr.serve import ServeSettings, build_app, describe_model, make_app, resolve_settings  # noqa: E402

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
        if settings.checkpoint is not None and not Path(settings.checkpoint).exists():
            # The production checkpoint is not on this machine: the builder refuses at once, naming it.
            with pytest.raises(FileNotFoundError, match=f"checkpoint {settings.checkpoint}: no such folder"):
                build_app(app.args)
            continue
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


def _serve_kwargs(argv: list[str], monkeypatch) -> dict:
    """What `ppcr serve ARGV` passes to ppcr.serve.start (not started: the stand-in stops it)."""
    import ppcr.serve.app as app
    from ppcr.cli import main

    seen = {}

    def fake_start(**kwargs):
        seen.update(kwargs)
        raise app.ServeStartError("stand-in")

    monkeypatch.setattr(app, "start", fake_start)
    assert main(["serve", *argv]) == 2
    return seen


def test_ppcr_serve_command_defaults_to_localhost(monkeypatch):
    got = _serve_kwargs(["--checkpoint", "ckpt", "--port", "8123"], monkeypatch)
    assert (got["host"], got["port"], got["args"]) == ("127.0.0.1", 8123, {"checkpoint": "ckpt"})


def test_ppcr_serve_runs_a_serve_config_with_its_options(monkeypatch):
    """`ppcr serve --config FILE` runs what `serve run FILE` runs (args, deployment options, host, port),
    but in this process, so a checkpoint that cannot load ends it at once."""
    path = CONFIGS[0].parent / "tiny_cpu.yaml"
    got = _serve_kwargs(["--config", str(path), "--checkpoint", "ckpt", "--port", "8124"], monkeypatch)
    raw = yaml.safe_load(path.read_text())
    assert got["args"] == {**raw["applications"][0]["args"], "checkpoint": "ckpt"}
    assert (got["host"], got["port"], got["name"]) == ("127.0.0.1", 8124, "ppcr")
    assert got["http_options"] == {"request_timeout_s": raw["http_options"]["request_timeout_s"]}
    for d in raw["applications"][0]["deployments"]:
        assert got["options"][d["name"]] == {k: v for k, v in d.items() if k != "name"}


def _break(ckpt: Path, how: str) -> None:
    if how == "no-weights":
        (ckpt / "model.safetensors").unlink()
    elif how == "corrupt-weights":
        (ckpt / "model.safetensors").write_bytes(b"not a safetensors file")
    elif how == "no-config":
        (ckpt / "config.yaml").unlink()
    elif how == "bad-config":
        (ckpt / "config.yaml").write_text("model:\n  box_head: mpl\n")
    elif how == "no-tokenizer":
        shutil.rmtree(ckpt / "tokenizer")


@pytest.mark.parametrize(
    "how, message",
    [
        ("no-weights", "has no model.safetensors: its weights are missing"),
        ("corrupt-weights", "is not a readable safetensors file"),
        ("no-config", "has no config.yaml: not a ppcr inference checkpoint"),
        ("bad-config", "box_head must be one of mlp, attention"),
        ("no-tokenizer", "has no tokenizer/ folder"),
    ],
)
def test_a_checkpoint_that_cannot_load_fails_the_builder_in_one_line(tiny_checkpoint, tmp_path, how, message):
    """Before, the builder only warned: replicas failed one after another while /healthz said "ok", and
    `serve run` never exited. Now the builder (`serve run`'s and `ppcr serve`'s) refuses before any
    deployment starts, naming the cause."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    _break(ckpt, how)
    with pytest.raises(Exception, match=message) as err:
        build_app({"checkpoint": str(ckpt)})
    assert "\n" not in str(err.value)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        build_app({"checkpoint": str(tmp_path / "absent")})
    with pytest.raises(FileNotFoundError, match="base SAM weights /nope/sam.pth"):
        build_app({"checkpoint": str(tiny_checkpoint), "sam_checkpoint": "/nope/sam.pth"})


@pytest.mark.parametrize("config", [[], ["--config", str(CONFIGS[0].parent / "tiny_cpu.yaml")]])
def test_ppcr_serve_with_a_broken_checkpoint_fails_at_once(tiny_checkpoint, tmp_path, capsys, config):
    from ppcr.cli import main

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    _break(ckpt, "no-weights")
    t0 = time.monotonic()
    assert main(["serve", *config, "--checkpoint", str(ckpt), "--port", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"ppcr serve: error: checkpoint {ckpt} has no model.safetensors: its weights are missing"]
    assert time.monotonic() - t0 < 30  # before Ray starts: no replica is tried


@pytest.mark.slow  # starts Ray and Serve; the MLLM replica fails three times before Serve gives up
def test_weights_that_do_not_fit_the_model_name_the_tensor_when_serve_start_fails(tiny_checkpoint, tmp_path):
    """A checkpoint whose header reads but whose tensors do not fit the model passes the builder's
    check and fails in the replica that loads it. Before, `ppcr serve` then said only "Failed to
    update the deployments ['MLLM']"; now the one line names the deployment and the tensor."""
    import ray
    from safetensors.torch import load_file, save_file

    from ppcr.serve import ServeStartError, free_port, start

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    tensors = load_file(ckpt / "model.safetensors")
    name = next(k for k, v in tensors.items() if k.startswith("mllm.") and v.ndim == 2)
    tensors[name] = torch.zeros(tensors[name].shape[0] + 1, tensors[name].shape[1])
    save_file(tensors, ckpt / "model.safetensors")
    one = {"autoscaling_config": {"min_replicas": 1, "max_replicas": 1}}
    try:
        with pytest.raises(ServeStartError) as err:
            start({"checkpoint": str(ckpt)}, port=free_port(), name="ppcr-misfit", num_cpus=4,
                  options={"Ingress": one, "MLLM": one, "SAM": one})  # fmt: skip
    finally:
        ray.shutdown()
    message = str(err.value)
    assert message.startswith("the app did not start: MLLM: ") and "\n" not in message, message
    assert f"mis-shaped tensors: {name}" in message and "WeightsError" not in message, message


def test_ppcr_serve_on_a_port_in_use_is_one_line_before_ray_starts(tiny_checkpoint, capsys, monkeypatch):
    """Before, Serve's proxy failed to bind after Ray started, and ppcr serve ended in a 50-line
    traceback ending "Failed to bind to address"."""
    import socket

    import ppcr.ray_cluster
    from ppcr.cli import main

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray started before the port was checked")

    monkeypatch.setattr(ppcr.ray_cluster, "init_ray", no_ray)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--checkpoint", str(tiny_checkpoint), "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"ppcr serve: error: cannot listen on 127.0.0.1:{port} (Address already in use): "
        "is another server using the port? Choose another with --port"
    ]


def test_serve_run_import_path_with_a_broken_checkpoint_is_one_line(tiny_checkpoint, tmp_path):
    """Ray's `serve run ppcr.serve:build_app checkpoint=DIR` calls the builder in its own process:
    a checkpoint that cannot load ends it at once with click's one-line `Error:`, not a traceback
    (and before Ray starts)."""
    from click.testing import CliRunner
    from ray.serve.scripts import cli

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    _break(ckpt, "no-weights")
    result = CliRunner().invoke(cli, ["run", "ppcr.serve:build_app", f"checkpoint={ckpt}"])
    assert result.exit_code == 1, result.output
    assert f"Error: checkpoint {ckpt} has no model.safetensors: its weights are missing" in result.output
    assert "Traceback" not in result.output


def test_describe_model_reads_the_training_record(tiny_checkpoint, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    record = {
        "steps": 1800,
        "planned_steps": 1800,
        "trained_on": {"dataset": "synthref", "synthetic": True},
        "evaluation": {"synthref/unc/val": {"mIoU": 0.68}},
    }
    (ckpt / "meta.json").write_text(json.dumps(record))
    model = describe_model(resolve_settings({"checkpoint": str(ckpt)}))
    assert model["trained_on"] == {
        "dataset": "synthref",
        "synthetic": True,
        "steps": 1800,
        "planned_steps": 1800,
    }
    assert model["evaluation"] == {"synthref/unc/val": {"mIoU": 0.68}}
    assert model["random_weights"] is False and model["toy"] is True and model["preset"] == "tiny"
    (ckpt / "meta.json").write_text(json.dumps({"steps": 3, "planned_steps": 9, "stopped_by_time": True}))
    assert "cut short" in describe_model(resolve_settings({"checkpoint": str(ckpt)}))["warning"]


# ----------------------------------------------------------------------------- one source of options

REPO = Path(__file__).resolve().parents[1]


def _deployments(app) -> dict:
    """The Deployment objects of a built app by name (the ingress binds MLLM and SAM as its first args)."""
    ingress = app._bound_deployment
    return {
        "Ingress": ingress,
        **{a._bound_deployment.name: a._bound_deployment for a in ingress.init_args[:2]},
    }


def test_deployment_options_have_one_source(monkeypatch):
    """The options are written once, in ppcr/serve/tiny_cpu.yaml (package data); serve_configs/tiny_cpu.yaml
    is that file, and the code neither repeats them nor sets others."""
    from ppcr.serve.app import DEFAULT_SERVE_CONFIG, default_options, read_serve_config

    shipped = REPO / "serve_configs/tiny_cpu.yaml"
    assert (
        shipped.resolve() == DEFAULT_SERVE_CONFIG.resolve() == (REPO / "ppcr/serve/tiny_cpu.yaml").resolve()
    )
    assert default_options() == read_serve_config(shipped)["options"]
    monkeypatch.delenv("PPCR_CHECKPOINT", raising=False)
    for name, d in _deployments(make_app({})).items():
        want = default_options()[name]
        assert d.ray_actor_options == want["ray_actor_options"], name
        assert d.max_ongoing_requests == want["max_ongoing_requests"], name
        assert d.max_queued_requests == want["max_queued_requests"], name
        scale = d._deployment_config.autoscaling_config
        for k, v in want["autoscaling_config"].items():
            assert getattr(scale, k) == v, (name, k)
    # make_app's options replace single keys, the rest stays the file's.
    one = {"autoscaling_config": {"min_replicas": 1, "max_replicas": 1}}
    mllm = _deployments(make_app({}, {"MLLM": one}))["MLLM"]
    assert mllm._deployment_config.autoscaling_config.max_replicas == 1
    assert mllm.max_queued_requests == default_options()["MLLM"]["max_queued_requests"]


def test_tiny_cpu_args_are_the_settings_defaults():
    """The tiny config spells out ServeSettings' defaults (what `ppcr serve` without --config serves)."""
    raw = yaml.safe_load((REPO / "ppcr/serve/tiny_cpu.yaml").read_text())
    args = raw["applications"][0]["args"]
    defaults = ServeSettings()
    assert {k: getattr(defaults, k) for k in args} == args


def test_the_wheel_ships_the_default_serve_config(tmp_path):
    """An installed ppcr reads its deployment options from the wheel: the file is in it (a real file)."""
    import shutil
    import subprocess
    import sys
    import zipfile

    src = tmp_path / "src"  # a copy: setuptools builds in the source tree (build/, *.egg-info)
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "ppcr", src / "ppcr", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(src),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("ppcr-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        assert "ppcr/serve/tiny_cpu.yaml" in names and "ppcr/configs/tiny.yaml" in names
        assert z.read("ppcr/serve/tiny_cpu.yaml") == (REPO / "ppcr/serve/tiny_cpu.yaml").read_bytes()


def test_serve_run_key_value_args_are_read_as_the_settings_types():
    """`serve run ppcr.serve:build_app max_pixels=0` passes the string "0": it is read as the integer
    setting it names, so the error is about the value (>= 1), not about "0" being a string; a value that
    is no number is still refused by name."""
    from click.testing import CliRunner
    from ray.serve.scripts import cli

    from ppcr.serve.settings import command_line_args

    assert command_line_args({"max_pixels": "0", "batch_wait_timeout_s": "0.5", "checkpoint": "123"}) == {
        "max_pixels": 0,
        "batch_wait_timeout_s": 0.5,
        "checkpoint": "123",  # a string setting stays a string, even when it looks like a number
    }
    result = CliRunner().invoke(cli, ["run", "ppcr.serve:build_app", "max_pixels=0"])
    assert result.exit_code == 1, result.output
    assert "Error: args.max_pixels must be >= 1; got 0" in result.output
    assert "Traceback" not in result.output
    result = CliRunner().invoke(cli, ["run", "ppcr.serve:build_app", "max_pixels=big"])
    assert result.exit_code == 1 and "args.max_pixels" in result.output, result.output
