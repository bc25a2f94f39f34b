"""The KubeRay manifests of deploy/kuberay/: they parse, use KubeRay's field names, serve the shipped Serve
config, and ask Kubernetes for the GPUs, CPUs, memory and volumes the Ray jobs need."""

from __future__ import annotations

import copy
import shlex
from pathlib import Path

import pytest
import ray
import yaml
from ray.runtime_env import RuntimeEnv
from ray.serve.schema import ServeDeploySchema

from ppcr.cli import build_parser
from ppcr.config import load_config

REPO = Path(__file__).resolve().parents[1]
KUBERAY = REPO / "deploy/kuberay"
MANIFESTS = sorted(KUBERAY.glob("*.yaml"))
SERVE_CONFIG = REPO / "serve_configs/llava7b_l20.yaml"
L20_SELECTOR = {"nvidia.com/gpu.product": "NVIDIA-L20"}
OBJECT_STORE_SHARE = 0.3  # Ray's default object store: 30 % of the pod's memory

# Field names of KubeRay's ray.io/v1 API (ray-operator/apis/ray/v1/*_types.go) that these manifests may use.
RAYJOB_SPEC = {"entrypoint", "runtimeEnvYAML", "shutdownAfterJobFinishes", "ttlSecondsAfterFinished"}
RAYJOB_SPEC |= {"backoffLimit", "rayClusterSpec", "activeDeadlineSeconds", "submissionMode"}
RAYSERVICE_SPEC = {"serveConfigV2", "rayClusterConfig", "serveService"}
CLUSTER_SPEC = {"rayVersion", "authOptions", "headGroupSpec", "workerGroupSpecs", "enableInTreeAutoscaling"}
WORKER_GROUP = {"groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template"}


def load(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((KUBERAY / name).read_text()) if d]


def quantity(value: str | int) -> float:
    """A Kubernetes quantity ("8", "500m", "64Gi") as a number (bytes for memory)."""
    s = str(value)
    for suffix, factor in (("Ki", 2**10), ("Mi", 2**20), ("Gi", 2**30), ("Ti", 2**40), ("m", 1e-3)):
        if s.endswith(suffix):
            return float(s[: -len(suffix)]) * factor
    return float(s)


def groups(cluster: dict) -> list[tuple[str, dict, int, int]]:
    """(name, pod spec, min pods, max pods) of the head and every worker group."""
    out = [("head", cluster["headGroupSpec"]["template"]["spec"], 1, 1)]
    for g in cluster.get("workerGroupSpecs", []):
        out.append((g["groupName"], g["template"]["spec"], g["minReplicas"], g["maxReplicas"]))
    return out


def limits(pod: dict) -> dict[str, float]:
    (container,) = pod["containers"]  # one Ray container per pod
    res = container["resources"]
    assert res["requests"] == res["limits"], "Ray reads its CPUs/GPUs/memory from the limits; keep them equal"
    return {k: quantity(v) for k, v in res["limits"].items()}


def cluster_problems(cluster: dict, mounts: set[str]) -> list[str]:
    """What is wrong with a rayClusterSpec / rayClusterConfig (an empty list when nothing is)."""
    problems = []
    unknown = set(cluster) - CLUSTER_SPEC
    if unknown:
        problems.append(f"unknown RayCluster fields {sorted(unknown)}")
    if cluster.get("rayVersion") != ray.__version__:
        problems.append(f"rayVersion {cluster.get('rayVersion')} is not the client's {ray.__version__}")
    if cluster.get("authOptions") != {"mode": "token"}:
        problems.append("authOptions.mode must be token: the dashboard/job port runs code for anyone")
    if cluster["headGroupSpec"].get("rayStartParams", {}).get("num-cpus") != "0":
        problems.append("the head must run no tasks (rayStartParams num-cpus '0')")
    for g in cluster.get("workerGroupSpecs", []):
        if set(g) - WORKER_GROUP or not {"groupName", "minReplicas", "maxReplicas", "template"} <= set(g):
            problems.append(f"group {g.get('groupName')}: fields {sorted(g)}")
        if not g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"]:
            problems.append(f"group {g['groupName']}: replicas outside [minReplicas, maxReplicas]")
    for name, pod, _, _ in groups(cluster):
        (container,) = pod["containers"]
        if not container["image"].startswith(f"rayproject/ray:{ray.__version__}-"):
            problems.append(f"{name}: image {container['image']} is not Ray {ray.__version__}")
        params = (
            cluster["headGroupSpec"]
            if name == "head"
            else next(g for g in cluster["workerGroupSpecs"] if g["groupName"] == name)
        ).get("rayStartParams", {})
        if any(not isinstance(v, str) for v in params.values()):
            problems.append(f"{name}: rayStartParams values must be strings (KubeRay: map[string]string)")
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        mounted = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
        for path in sorted(mounts | {"/dev/shm"}):
            if path not in mounted:
                problems.append(f"{name}: {path} is not mounted")
            elif mounted[path] not in volumes:
                problems.append(f"{name}: volume {mounted[path]} of {path} is not defined")
        gpus = limits(pod).get("nvidia.com/gpu", 0)
        if gpus and pod.get("nodeSelector") != L20_SELECTOR:
            problems.append(f"{name}: GPU pods must select L20 nodes ({L20_SELECTOR})")
        if name == "head" and gpus:
            problems.append("the head asks for a GPU it never uses")
    return problems


def claims() -> set[str]:
    return {d["metadata"]["name"] for d in load("storage.yaml") if d["kind"] == "PersistentVolumeClaim"}


# ----------------------------------------------------------------------------- every manifest


def test_the_three_manifests_exist():
    assert {p.name for p in MANIFESTS} == {"rayjob-train.yaml", "rayservice.yaml", "storage.yaml"}


@pytest.mark.parametrize("path", MANIFESTS, ids=[p.name for p in MANIFESTS])
def test_manifest_parses_with_known_fields(path):
    for doc in load(path.name):
        assert {"apiVersion", "kind", "metadata", "spec"} <= set(doc), path.name
        assert doc["metadata"]["name"]
        if doc["kind"] == "RayJob":
            assert doc["apiVersion"] == "ray.io/v1"
            assert set(doc["spec"]) <= RAYJOB_SPEC, set(doc["spec"]) - RAYJOB_SPEC
        elif doc["kind"] == "RayService":
            assert doc["apiVersion"] == "ray.io/v1"
            assert set(doc["spec"]) <= RAYSERVICE_SPEC, set(doc["spec"]) - RAYSERVICE_SPEC
        else:
            assert (doc["apiVersion"], doc["kind"]) == ("v1", "PersistentVolumeClaim")
            assert doc["spec"]["accessModes"] == ["ReadWriteMany"], "pods on several nodes share it"
        for vol in _volumes(doc):
            if "persistentVolumeClaim" in vol:
                assert vol["persistentVolumeClaim"]["claimName"] in claims()


def _volumes(doc: dict) -> list[dict]:
    spec = doc["spec"].get("rayClusterSpec") or doc["spec"].get("rayClusterConfig")
    if not spec:
        return []
    return [v for _, pod, _, _ in groups(spec) for v in pod.get("volumes", [])]


# ----------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def rayjob() -> dict:
    (job,) = load("rayjob-train.yaml")
    return job


@pytest.fixture(scope="module")
def capacity(capacity):
    """conftest's deploy/capacity.py module, with its parameter counts."""
    return capacity, capacity.parameter_counts()


def test_rayjob_runs_the_training_entry_point_with_the_paper_config(rayjob):
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    assert argv[:2] == ["python", "ray_jobs/train.py"] and (REPO / argv[1]).is_file()
    args = build_parser().parse_args(["train", *argv[2:]])  # the flags exist in the CLI today
    assert args.config == "configs/train/ppcr_llava7b.yaml" and (REPO / args.config).is_file()
    assert args.storage == "/runs", "run storage on the shared /runs volume"
    assert rayjob["spec"]["shutdownAfterJobFinishes"] is True


def test_rayjob_cluster_fits_the_training_config(rayjob, capacity):
    module, counts = capacity
    cluster = rayjob["spec"]["rayClusterSpec"]
    assert cluster_problems(cluster, {"/models", "/data", "/runs"}) == []
    cfg = load_config(REPO / "configs/train/ppcr_llava7b.yaml")
    d = cfg.distributed
    gpu_pods = [(pod, lo, hi) for name, pod, lo, hi in groups(cluster) if limits(pod).get("nvidia.com/gpu")]
    assert d.use_gpu and d.accelerator_type == "L20"
    assert sum(lo * limits(pod)["nvidia.com/gpu"] for pod, lo, _ in gpu_pods) == d.num_workers
    assert all(lo == hi for _, lo, hi in gpu_pods), "a fixed-size training cluster"
    cpus = sum(lo * limits(pod)["cpu"] for name, pod, lo, _ in groups(cluster) if name != "head")
    assert cpus >= d.num_workers * d.cpus_per_worker + d.data_cpus
    for pod, _, _ in gpu_pods:
        assert limits(pod)["cpu"] >= d.cpus_per_worker
        ram = limits(pod)["memory"] * (1 - OBJECT_STORE_SHARE) / 1e9
        assert ram >= module.host_ram_per_worker_gb(counts), "a worker's start-up peak must fit"
    # Every path the config reads is on a mounted volume.
    for path in (cfg.model.mllm_path, cfg.model.sam.checkpoint, *(m.shards_root for m in d.datasets)):
        assert path.startswith(("/models/", "/data/")), path


def test_runtime_env_ships_the_code_and_the_readme_pins(rayjob):
    from tests.test_cluster_yaml import readme_torch_pins

    env = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])
    RuntimeEnv(**env)  # Ray's own validation of the fields
    archive = env["working_dir"].removeprefix("file://")
    assert env["working_dir"].startswith("file:///models/") and archive.endswith(".zip")
    assert set(env["pip"]["packages"]) == readme_torch_pins() | {archive}
    (service,) = load("rayservice.yaml")
    app = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]
    assert app["runtime_env"] == env, "training and serving run the same code and stack"


# ----------------------------------------------------------------------------- serving


@pytest.fixture(scope="module")
def rayservice() -> dict:
    (service,) = load("rayservice.yaml")
    return service


def test_serve_config_v2_is_the_shipped_serve_config(rayservice):
    served = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(served)  # Ray Serve's own schema
    shipped = yaml.safe_load(SERVE_CONFIG.read_text())
    served = copy.deepcopy(served)
    for app in served["applications"]:
        app.pop("runtime_env")  # the one addition: Kubernetes pods have no ppcr installed
    assert served == shipped, "edit serve_configs/llava7b_l20.yaml and copy it into rayservice.yaml"


def serving_problems(service: dict) -> list[str]:
    """Do the pod groups hold every replica the Serve config's autoscaling may ask for?"""
    cluster = service["spec"]["rayClusterConfig"]
    problems = cluster_problems(cluster, {"/models"})
    app = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]
    for key in ("checkpoint", "mllm_path", "sam_checkpoint"):
        if not app["args"][key].startswith("/models/"):
            problems.append(f"args.{key} {app['args'][key]} is not on the /models volume")
    pods = {name: (limits(pod), lo, hi) for name, pod, lo, hi in groups(cluster)}
    gpu = {n: v for n, v in pods.items() if v[0].get("nvidia.com/gpu")}
    cpu = {n: v for n, v in pods.items() if not v[0].get("nvidia.com/gpu") and n != "head"}
    need = {"min": 0.0, "max": 0.0}
    for d in app["deployments"]:
        opts, scale = d["ray_actor_options"], d["autoscaling_config"]
        if opts.get("num_gpus", 0):
            if opts.get("accelerator_type") != "L20":
                problems.append(f"{d['name']} runs on GPU pods that select L20s: say accelerator_type L20")
            need["min"] += scale["min_replicas"] * opts["num_gpus"]
            need["max"] += scale["max_replicas"] * opts["num_gpus"]
            if any(lim["cpu"] < opts["num_cpus"] for lim, _, _ in gpu.values()):
                problems.append(f"{d['name']}: a GPU pod has fewer CPUs than one replica asks for")
        else:
            room = sum(hi * lim["cpu"] for lim, _, hi in cpu.values())
            if room < scale["max_replicas"] * opts["num_cpus"]:
                problems.append(f"{d['name']}: CPU groups hold {room:g} CPUs, max replicas need more")
    have_min = sum(lo * lim["nvidia.com/gpu"] for lim, lo, _ in gpu.values())
    have_max = sum(hi * lim["nvidia.com/gpu"] for lim, _, hi in gpu.values())
    if have_min < need["min"] or have_max < need["max"]:
        problems.append(
            f"GPU pods hold {have_min:g}..{have_max:g} GPUs; replicas need {need['min']:g}..{need['max']:g}"
        )
    return problems


def test_rayservice_pods_hold_every_replica(rayservice, capacity):
    assert serving_problems(rayservice) == []
    module, counts = capacity
    for name, pod, _, _ in groups(rayservice["spec"]["rayClusterConfig"]):
        if limits(pod).get("nvidia.com/gpu"):
            ram = limits(pod)["memory"] * (1 - OBJECT_STORE_SHARE) / 1e9
            assert ram >= module.host_ram_per_worker_gb(counts), f"{name}: a replica's load peak must fit"


def test_serving_check_catches_a_pod_shortfall(rayservice):
    served = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    sam = next(d for d in served["applications"][0]["deployments"] if d["name"] == "SAM")
    sam["autoscaling_config"]["max_replicas"] += 1
    ingress = next(d for d in served["applications"][0]["deployments"] if d["name"] == "Ingress")
    ingress["ray_actor_options"]["num_cpus"] = 4
    broken = copy.deepcopy(rayservice)
    broken["spec"]["serveConfigV2"] = yaml.safe_dump(served)
    broken["spec"]["rayClusterConfig"]["authOptions"] = {"mode": "disabled"}
    problems = "\n".join(serving_problems(broken))
    assert "GPU pods hold 2..12 GPUs; replicas need 2..13" in problems
    assert "Ingress: CPU groups hold 16 CPUs" in problems
    assert "authOptions.mode must be token" in problems
