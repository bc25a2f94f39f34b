"""cluster.yaml passes Ray's own launcher checks, in the order `ray up` runs them, and is safe to run."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster.yaml"


def readme_torch_pins() -> set[str]:
    """The torch/torchvision pins of the README's set-up commands (the one place they are decided)."""
    return set(re.findall(r"torch(?:vision)?==[\w.+]+", (REPO / "README.md").read_text()))


def launch(config: dict) -> dict:
    """What `ray up` does with the file before it touches a machine."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


def test_ray_launcher_accepts_cluster_yaml(cluster):
    prepared = launch(cluster)
    # The local provider makes its single node type from the IPs: one worker per worker_ips entry.
    (node_type,) = prepared["available_node_types"].values()
    assert node_type["max_workers"] == len(cluster["provider"]["worker_ips"])


def test_ray_launcher_refuses_what_the_old_file_had(cluster):
    nulled = copy.deepcopy(cluster)
    nulled["provider"]["head_ip"] = None
    with pytest.raises(Exception, match="None is not of type 'string'"):
        launch(nulled)
    typed = copy.deepcopy(cluster)
    typed["available_node_types"] = {"l20": {"resources": {"GPU": 1}, "node_config": {}}}
    with pytest.raises(Exception, match="available_node_types is not supported"):
        launch(typed)


def test_local_provider_with_placeholders_the_user_fills(cluster):
    p = cluster["provider"]
    assert p["type"] == "local"
    for ip in [p["head_ip"], *p["worker_ips"]]:
        assert isinstance(ip, str) and ip.startswith("<"), f"{ip!r}: a placeholder, not a real address"
    text = CLUSTER.read_text()
    assert "ray up cluster.yaml" in text and "ray job submit" in text


def test_ships_code_and_pinned_stack_to_every_node(cluster):
    assert cluster["file_mounts"]["~/ppcr"] == "."  # the repository, from where `ray up` runs
    setup = " ".join(cluster["setup_commands"])
    pins = readme_torch_pins()
    assert pins == {"torch==2.14.1", "torchvision==0.29.1"}
    for pin in pins:
        assert pin in setup, f"setup_commands must install {pin} (README's pin)"
    assert f"ray[default,train,serve,data]=={ray.__version__}" in setup, "nodes must run the client's Ray"
    assert "pip install -e ~/ppcr" in setup
    assert setup.index("torch==") < setup.index("pip install -e ~/ppcr"), "pins first, then the project"
    assert ".gitignore" in cluster["rsync_filter"]  # no .venv or runs/ copied


def test_relies_on_rays_own_l20_label(cluster):
    # No hand-made resources: Ray labels an "NVIDIA L20" node accelerator_type:L20 by itself.
    assert "resources" not in yaml.safe_dump(cluster)
    train = yaml.safe_load((REPO / "configs/train/ppcr_llava7b.yaml").read_text())
    assert train["distributed"]["accelerator_type"] == "L20"


def test_every_ray_start_requires_a_token_and_the_dashboard_stays_local(cluster):
    starts = cluster["head_start_ray_commands"] + cluster["worker_start_ray_commands"]
    ray_starts = [c for c in starts if "ray start" in c]
    assert len(ray_starts) == 2
    for cmd in ray_starts:
        assert "RAY_AUTH_MODE=token" in cmd, f"{cmd!r} would start a cluster without authentication"
        assert "ppcr-venv/bin/activate" in cmd
    (head,) = [c for c in ray_starts if "--head" in c]
    assert "--dashboard-host=127.0.0.1" in head
    # The token reaches every node through file_mounts, from where `ray get-auth-token --generate` puts it.
    assert cluster["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert "ray get-auth-token --generate" in CLUSTER.read_text()


JOBS = {"prepare_data": ["prepare", "--ray"], "train": ["train"], "evaluate": ["evaluate", "--ray"]}
JOBS["batch_segment"] = ["batch"]


def test_readme_real_model_commands_exist_in_the_cli():
    import shlex

    from ppcr.cli import build_parser

    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Train and serve the real model") :]
    section = section[: section.index("\nDocs:")]
    parser, seen = build_parser(), set()
    for line in section.splitlines():
        if not line.startswith(("ray job submit", "ppcr ")):
            continue
        argv = shlex.split(line)
        if "ray_jobs/" in line:
            script = argv[argv.index("python") + 1]
            assert (REPO / script).is_file(), script
            args = parser.parse_args([*JOBS[Path(script).stem], *argv[argv.index(script) + 1 :]])
        else:
            args = parser.parse_args(argv[1:])
        seen.add(args.fn.__name__)
        for value in vars(args).values():  # configs the commands name are shipped
            if isinstance(value, str) and value.startswith(("configs/", "serve_configs/")):
                assert (REPO / value).is_file(), value
    assert seen == {"cmd_prepare", "cmd_train", "cmd_export", "cmd_evaluate", "cmd_batch"}
    for split in ("--splits val testA testB", "--splits val test"):
        assert split in section
