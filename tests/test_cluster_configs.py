"""cluster/gpu.yaml, cluster/onprem.yaml and cluster/kuberay.yaml: valid for Ray / KubeRay, pinned to the project's
Ray, secure by default; gpu.yaml and onprem.yaml share their file mounts, setup and start commands
(cluster/common.yaml).

Offline: the AWS config goes through Ray's own prepare_config/validate_config (schema ray-schema.json plus the
AWS provider defaults shipped with Ray) with network access blocked; nothing talks to AWS or Kubernetes.
Every security check is a helper that is also run on a deliberately bad config, so the checks can fail.
"""

from __future__ import annotations

import copy
import re
import socket
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = None

REPO = Path(__file__).resolve().parents[1]
GPU_YAML = REPO / "cluster" / "gpu.yaml"
KUBERAY_YAML = REPO / "cluster" / "kuberay.yaml"
ONPREM_YAML = REPO / "cluster" / "onprem.yaml"
COMMON_YAML = REPO / "cluster" / "common.yaml"
LOCALHOST = {"127.0.0.1", "localhost", "::1"}
RAY_PORTS = {6379, 8265, 10001}


# ---------------------------------------------------------------- loading


def _gpu() -> dict:
    return yaml.safe_load(GPU_YAML.read_text())


def _onprem() -> dict:
    return yaml.safe_load(ONPREM_YAML.read_text())


def _kuberay_docs() -> list[dict]:
    return [d for d in yaml.safe_load_all(KUBERAY_YAML.read_text()) if d is not None]


def _raycluster() -> dict:
    clusters = [d for d in _kuberay_docs() if d.get("kind") == "RayCluster"]
    assert len(clusters) == 1, "kuberay.yaml must define exactly one RayCluster"
    return clusters[0]


def _project_ray_pin() -> str:
    text = (REPO / "pyproject.toml").read_text()
    if tomllib is not None:
        deps = tomllib.loads(text)["project"]["dependencies"]
    else:
        deps = re.findall(r'^\s*"(ray[^"]*)"', text, flags=re.M)
    pins = [m.group(2) for d in deps if (m := re.fullmatch(r"ray(\[[^\]]*\])?==([\w.]+)", d.replace(" ", "")))]
    assert len(pins) == 1, f"pyproject.toml should pin ray exactly once, found {deps}"
    return pins[0]


def _constraints_ray_pin() -> str:
    pins = re.findall(r"(?m)^ray==([\w.]+)\s*$", (REPO / "constraints.txt").read_text())
    assert len(pins) == 1, "constraints.txt should pin ray exactly once"
    return pins[0]


def _all_commands(cfg: dict) -> list[str]:
    keys = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands")
    cmds = [c for k in keys for c in cfg.get(k) or []]
    for node in cfg.get("available_node_types", {}).values():
        cmds += node.get("initialization_commands", []) + node.get("worker_setup_commands", [])
    return cmds


def _images_gpu(cfg: dict) -> list[str]:
    docker = cfg.get("docker") or {}
    images = [docker[k] for k in ("image", "head_image", "worker_image") if docker.get(k)]
    for node in cfg.get("available_node_types", {}).values():
        if (node.get("docker") or {}).get("worker_image"):
            images.append(node["docker"]["worker_image"])
    return images


def _pod_specs(cluster: dict) -> list[dict]:
    spec = cluster["spec"]
    return [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec.get("workerGroupSpecs", [])]


def _ray_containers(cluster: dict) -> list[dict]:
    return [c for pod in _pod_specs(cluster) for c in pod["containers"] if c["name"].startswith("ray-")]


# ---------------------------------------------------------------- reusable checks (each also run on a bad config)


def dashboard_host_violations(commands: list[str]) -> list[str]:
    """`ray start --head` commands whose dashboard is not bound to loopback (Ray's launcher example uses 0.0.0.0)."""
    bad = []
    for cmd in commands:
        if re.search(r"\bray start\b", cmd) and "--head" in cmd:
            hosts = re.findall(r"--dashboard-host[= ]+['\"]?([^\s'\";]+)", cmd)
            if not hosts or any(h not in LOCALHOST for h in hosts):
                bad.append(cmd)
        elif re.search(r"--dashboard-host[= ]+['\"]?(0\.0\.0\.0|::)(?![\w.:])", cmd):
            bad.append(cmd)
    return bad


def public_ingress_violations(cfg: dict) -> list[dict]:
    """Extra security-group rules open to the whole internet for anything but SSH."""
    rules = ((cfg.get("provider") or {}).get("security_group") or {}).get("IpPermissions") or []
    bad = []
    for rule in rules:
        cidrs = [r.get("CidrIp") for r in rule.get("IpRanges", [])] + [r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])]
        if not any(c in ("0.0.0.0/0", "::/0") for c in cidrs):
            continue
        if not (rule.get("FromPort") == 22 and rule.get("ToPort") == 22 and str(rule.get("IpProtocol")).lower() == "tcp"):
            bad.append(rule)
    return bad


AUTH_DISABLED = re.compile(r"RAY_AUTH_MODE\s*[=:]\s*['\"]?disabled|AUTH_MODE['\"]?\s*:\s*['\"]?disabled", re.I)

CREDENTIAL_PATTERNS = {
    "AWS access key id": re.compile(r"\b(AKIA|ASIA|AIDA|AROA)[0-9A-Z]{16}\b"),
    "AWS secret key setting": re.compile(r"(?i)aws_secret_access_key|aws_access_key_id|aws_session_token|secretAccessKey"),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "inline Ray token": re.compile(r"RAY_AUTH_TOKEN\s*=\s*['\"]?[A-Za-z0-9+/=_-]{16,}"),
}


def credential_findings(text: str) -> list[str]:
    return [name for name, pat in CREDENTIAL_PATTERNS.items() if pat.search(text)]


def image_problems(image: str, version: str) -> list[str]:
    problems = []
    repo, _, tag = image.partition(":")
    if repo not in ("rayproject/ray", "docker.io/rayproject/ray"):
        problems.append(f"{image}: not the official rayproject/ray image")
    if "ray-ml" in image:
        problems.append(f"{image}: rayproject/ray-ml is deprecated")
    if not (tag == version or tag.startswith(version + "-")):
        problems.append(f"{image}: tag does not start with Ray {version}")
    if not re.search(r"-py3\d+(-|$)", tag):
        problems.append(f"{image}: tag does not pin the Python version")
    return problems


# ---------------------------------------------------------------- gpu.yaml: Ray's own validation


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("cluster config validation must not use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_gpu_yaml_passes_rays_own_prepare_and_validate(no_network):
    cfg = _gpu()
    assert cfg["provider"]["type"] == "aws"
    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)  # raises on any schema error
    # prepare_config merged the AWS defaults and setup commands the way `ray up` does.
    assert prepared["head_node_type"] == "ray.head.default" and prepared["cluster_synced_files"] == []
    assert prepared["worker_setup_commands"][: len(cfg["setup_commands"])] == cfg["setup_commands"]
    assert prepared["available_node_types"]["ray.head.default"]["max_workers"] == 0
    assert sum(t["min_workers"] for t in prepared["available_node_types"].values()) <= prepared["max_workers"]


def test_rays_schema_rejects_a_broken_variant(no_network):
    bad = _gpu()
    bad["head_start_ray_command"] = bad.pop("head_start_ray_commands")  # a typo the schema must catch
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad))
    bad = _gpu()
    bad["available_node_types"]["gpu-1x-spot"]["resources"]["GPU"] = "one"
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad))


# ---------------------------------------------------------------- gpu.yaml: security


def test_gpu_dashboard_bound_to_localhost():
    cfg = _gpu()
    assert dashboard_host_violations(_all_commands(cfg)) == []
    head = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    assert not any("0.0.0.0" in c for c in _all_commands(cfg))
    # The checker catches Ray's example default and a missing flag (Ray's start default is localhost, but be explicit).
    assert dashboard_host_violations(["ray start --head --dashboard-host=0.0.0.0"])
    assert dashboard_host_violations(["ray start --head --port=6379"])


def test_gpu_no_internet_ingress_beyond_ssh():
    cfg = _gpu()
    assert public_ingress_violations(cfg) == []
    # Ports of the GCS, dashboard and client must not appear in any extra rule at all.
    rules = (cfg["provider"].get("security_group") or {}).get("IpPermissions") or []
    for rule in rules:
        assert not set(range(rule.get("FromPort", 0), rule.get("ToPort", 0) + 1)) & RAY_PORTS, rule
    bad = copy.deepcopy(cfg)
    bad["provider"]["security_group"] = {"IpPermissions": [
        {"FromPort": 8265, "ToPort": 8265, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]}
    assert public_ingress_violations(bad)


def test_gpu_token_auth_is_on_everywhere():
    cfg = _gpu()
    text = GPU_YAML.read_text()
    assert not AUTH_DISABLED.search(text)
    run_options = " ".join(cfg["docker"].get("run_options", []))
    assert re.search(r"(--env|-e)[ =]RAY_AUTH_MODE=token\b", run_options), "containers must run with RAY_AUTH_MODE=token"
    starts = [c for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token" in c for c in starts)
    # The token comes from the user's local token file, never from the repository.
    assert cfg["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    assert AUTH_DISABLED.search("export RAY_AUTH_MODE=disabled; ray start --head")


def test_no_credentials_in_cluster_files():
    for path in (GPU_YAML, KUBERAY_YAML, ONPREM_YAML, COMMON_YAML):
        assert credential_findings(path.read_text()) == [], path
    assert credential_findings("export AWS_SECRET_ACCESS_KEY=x") and credential_findings("AKIAABCDEFGHIJKLMNOP")
    # Nodes get AWS access from instance profiles / the ServiceAccount, not from keys in env or config.
    cfg = _gpu()
    for name, node in cfg["available_node_types"].items():
        if name != cfg["head_node_type"]:
            assert node["node_config"].get("IamInstanceProfile"), f"{name} needs an instance profile for s3://"
    for container in _ray_containers(_raycluster()):
        names = {e.get("name", "") for e in container.get("env", [])}
        assert not {n for n in names if n.startswith("AWS_ACCESS") or n.startswith("AWS_SECRET")}, container["name"]
    assert not [d for d in _kuberay_docs() if d.get("kind") == "Secret"], "no Secret objects with data in the repo"


# ---------------------------------------------------------------- gpu.yaml: versions, nodes, setup


def test_ray_version_pins_agree():
    version = ray.__version__
    assert _project_ray_pin() == version, "installed Ray differs from pyproject.toml"
    assert _constraints_ray_pin() == version, "installed Ray differs from constraints.txt"
    assert str(_raycluster()["spec"]["rayVersion"]) == version


def test_gpu_image_is_official_ray_at_the_pinned_version():
    images = _images_gpu(_gpu())
    assert images, "gpu.yaml must run in the rayproject/ray container"
    for image in images:
        assert image_problems(image, ray.__version__) == []
        assert re.search(r"-(gpu|cu\d+)$", image), f"{image}: workers need a CUDA image"
    assert image_problems("rayproject/ray-ml:2.60.0-py311-gpu", "2.60.0")
    assert image_problems("rayproject/ray:2.59.0-py311-gpu", "2.60.0")


def test_gpu_worker_types_declare_gpus_autoscale_and_one_is_spot():
    cfg = _gpu()
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and not head["resources"].get("GPU"), "no trials on the head"
    workers = {n: t for n, t in types.items() if n != cfg["head_node_type"]}
    assert len(workers) >= 2
    for name, node in workers.items():
        assert node["resources"].get("GPU", 0) >= 1 and node["resources"].get("CPU", 0) >= 1, name
        assert node.get("min_workers", 0) == 0 < node["max_workers"] <= cfg["max_workers"], name
        assert node["node_config"]["InstanceType"], name
    spot = [n for n, t in workers.items() if (t["node_config"].get("InstanceMarketOptions") or {}).get("MarketType") == "spot"]
    assert spot, "at least one GPU worker type must use spot instances"
    eight = [n for n, t in workers.items() if t["resources"]["GPU"] >= 8]
    assert eight, "the 8-worker ImageNet search needs an 8-GPU node type"
    assert not set(eight) & set(spot), "long DDP searches stay on on-demand nodes"
    assert sum(t["max_workers"] for t in workers.values()) <= cfg["max_workers"]


def test_gpu_setup_installs_this_project_with_constraints():
    cfg = _gpu()
    assert cfg["file_mounts"].get("~/pcdarts") == ".", "the repository root goes to ~/pcdarts"
    assert (REPO / "constraints.txt").is_file() and (REPO / "pyproject.toml").is_file()
    installs = [c for c in cfg["setup_commands"] if re.search(r"\bpip install\b", c)]
    assert any(re.search(r"-c ~/pcdarts/constraints\.txt\b", c) and re.search(r"-e ~/pcdarts(\s|$)", c) for c in installs), installs
    # The upload leaves out the local virtualenv and git history.
    assert ".gitignore" in cfg.get("rsync_filter", [])
    assert ".venv" in (REPO / ".gitignore").read_text()
    assert {"/.venv", "**/.git"} <= set(cfg.get("rsync_exclude", []))
    head = " ".join(cfg["head_start_ray_commands"])
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head, "without it the head never launches workers"
    assert all("$RAY_HEAD_IP:6379" in c for c in cfg["worker_start_ray_commands"] if "ray start" in c)


# ---------------------------------------------------------------- one source for gpu.yaml and onprem.yaml


def _sync_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("cluster_sync", REPO / "cluster" / "sync.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_and_onprem_share_mounts_setup_and_start_commands_from_common_yaml():
    sync = _sync_module()
    assert set(sync.SHARING) == {GPU_YAML.name, ONPREM_YAML.name}
    assert sync.out_of_step() == [], "run python cluster/sync.py"
    common = yaml.safe_load(COMMON_YAML.read_text())
    assert {"file_mounts", "setup_commands", "head_start_ray_commands", "worker_start_ray_commands"} <= set(common)
    for cfg in (_gpu(), _onprem()):
        assert {key: cfg[key] for key in common} == common
    # The check sees a file edited by hand, and a file without the block.
    edited = GPU_YAML.read_text().replace("--dashboard-port=8265", "--dashboard-port=8266")
    assert sync.synced(edited, COMMON_YAML.read_text()) != edited
    with pytest.raises(ValueError, match="BEGIN common"):
        sync.synced("cluster_name: x\n", COMMON_YAML.read_text())


# ---------------------------------------------------------------- onprem.yaml


def test_onprem_yaml_passes_rays_own_prepare_and_validate(no_network):
    cfg = _onprem()
    provider = cfg["provider"]
    assert provider["type"] == "local" and provider["head_ip"] and len(provider["worker_ips"]) >= 1
    assert cfg["auth"]["ssh_user"] and cfg["auth"]["ssh_private_key"]
    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    node = prepared["available_node_types"][prepared["head_node_type"]]
    assert node["min_workers"] == node["max_workers"] == len(provider["worker_ips"])  # every machine is kept
    bad = _onprem()
    bad["worker_start_ray_command"] = bad.pop("worker_start_ray_commands")
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad))


def test_onprem_placeholders_key_and_security():
    import ipaddress

    cfg = _onprem()
    # The example addresses are in a documentation range: a `ray up` of the unedited file reaches nobody.
    for ip in [cfg["provider"]["head_ip"], *cfg["provider"]["worker_ips"]]:
        assert ipaddress.ip_address(ip) in ipaddress.ip_network("192.0.2.0/24"), ip
    key = cfg["auth"]["ssh_private_key"]
    assert key.startswith("~/") and not (REPO / key).exists(), "the SSH key is a path on the user's machine"
    commands = _all_commands(cfg)
    assert dashboard_host_violations(commands) == [] and not any("0.0.0.0" in c for c in commands)
    assert "0.0.0.0" not in ONPREM_YAML.read_text() and not AUTH_DISABLED.search(ONPREM_YAML.read_text())
    starts = [c for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token" in c for c in starts)
    assert cfg["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    assert "docker" not in cfg, "the lab's machines run Ray in the virtualenv of initialization_commands"
    venv = "~/pcdarts-venv"
    assert any(venv in c and "python3 -m venv" in c for c in cfg["initialization_commands"])
    assert any(f"source {venv}/bin/activate" in c and "~/.bashrc" in c for c in cfg["initialization_commands"])


# ---------------------------------------------------------------- kuberay.yaml


def test_kuberay_documents_and_required_fields():
    docs = _kuberay_docs()
    assert {d["kind"] for d in docs} <= {"RayCluster", "RayJob", "ServiceAccount"}
    cluster = _raycluster()
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["metadata"]["name"]
    spec = cluster["spec"]
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict) and head["template"]["spec"]["containers"]
    assert spec["workerGroupSpecs"]
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"] and isinstance(group["rayStartParams"], dict) and group["template"]["spec"]["containers"]
        assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"] and group["maxReplicas"] >= 1
    for params in [head["rayStartParams"]] + [g["rayStartParams"] for g in spec["workerGroupSpecs"]]:
        # The CRD types rayStartParams as map[string]string: an unquoted number would be rejected by the API server.
        assert all(isinstance(v, str) for v in params.values()), params
    for container in _ray_containers(cluster):
        assert image_problems(container["image"], ray.__version__) == [], container["image"]


def test_kuberay_gpu_workers_and_autoscaling():
    spec = _raycluster()["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    gpu_counts = []
    for group in spec["workerGroupSpecs"]:
        container = group["template"]["spec"]["containers"][0]
        limits = container["resources"]["limits"]
        gpus = int(limits.get("nvidia.com/gpu", 0))
        assert gpus >= 1, f"{group['groupName']} must request GPUs"
        requests = container["resources"].get("requests", {})
        if "nvidia.com/gpu" in requests:  # Kubernetes requires request == limit for extended resources
            assert int(requests["nvidia.com/gpu"]) == gpus
        assert group["maxReplicas"] > group["minReplicas"], "the autoscaler needs room to scale"
        gpu_counts.append(gpus)
    assert max(gpu_counts) >= 8
    head_limits = spec["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "nvidia.com/gpu" not in head_limits and spec["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0"


def test_kuberay_head_reachable_only_by_port_forward():
    cluster = _raycluster()
    head = cluster["spec"]["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") not in ("LoadBalancer", "NodePort")
    assert (head.get("headService") or {}).get("spec", {}).get("type", "ClusterIP") not in ("LoadBalancer", "NodePort")
    assert not head.get("enableIngress", False)
    # KubeRay's default is --dashboard-host=0.0.0.0, so the loopback binding must be explicit.
    assert head["rayStartParams"].get("dashboard-host") in LOCALHOST
    assert "0.0.0.0" not in yaml.safe_dump(cluster)
    assert not [d for d in _kuberay_docs() if d.get("kind") in ("Ingress", "Service")]


def test_kuberay_token_auth_and_s3_via_service_account():
    docs = _kuberay_docs()
    cluster = _raycluster()
    assert (cluster["spec"].get("authOptions") or {}).get("mode") == "token"
    assert not AUTH_DISABLED.search(KUBERAY_YAML.read_text())
    for container in _ray_containers(cluster):
        for env in container.get("env", []):
            assert not (env.get("name") == "RAY_AUTH_MODE" and env.get("value") != "token")
    accounts = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ServiceAccount"}
    for pod in _pod_specs(cluster):
        assert pod.get("serviceAccountName") in accounts, "every Ray pod gets S3 access from the ServiceAccount"
    for account in accounts.values():
        annotations = account["metadata"].get("annotations") or {}
        assert re.fullmatch(r"arn:aws:iam::[^:]+:role/[\w+=,.@/-]+", annotations.get("eks.amazonaws.com/role-arn", ""))


def test_kuberay_installs_this_project_with_constraints():
    cluster = _raycluster()
    for pod in _pod_specs(cluster):
        container = next(c for c in pod["containers"] if c["name"].startswith("ray-"))
        script = " ".join(container.get("command", []) + container.get("args", []))
        assert re.search(r"pip install .*-c ~/pcdarts/constraints\.txt .*-e ~/pcdarts", script), container["name"]
        mounts = {m["name"]: m for m in container.get("volumeMounts", [])}
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        assert mounts["pcdarts-src"]["mountPath"] == "/opt/pcdarts-src"
        assert volumes["pcdarts-src"]["configMap"]["name"] == "pcdarts-src"


# ---------------------------------------------------------------- README stays in step with the files


def test_readme_cluster_section_matches_the_files():
    readme = (REPO / "README.md").read_text()
    section = readme.split("<!-- BEGIN section:cluster -->", 1)[1].split("<!-- END section:cluster -->", 1)[0]
    for needle in ("ray up cluster/gpu.yaml", "ray dashboard cluster/gpu.yaml", "ray down cluster/gpu.yaml",
                   "ray get-auth-token --generate", "RAY_AUTH_MODE=token", "--address http://127.0.0.1:8265",
                   "kubectl apply -f cluster/kuberay.yaml", "kubectl port-forward svc/pcdarts-head-svc 8265:8265",
                   "s3://", "docs/cluster.md", "RAY_UP_enable_autoscaler_v2=0 ray up cluster/onprem.yaml"):
        assert needle in section, needle
    assert "0.0.0.0" not in section


def test_cluster_doc_walks_each_cluster_file_from_ray_up_to_ray_down():
    doc = (REPO / "docs" / "cluster.md").read_text()
    onprem = ONPREM_YAML.read_text()
    up = "RAY_UP_enable_autoscaler_v2=0 ray up cluster/onprem.yaml"
    assert up in doc and up in onprem, "the doc and the file's header start the cluster the same way"
    for needle in ("ray up cluster/gpu.yaml", "kubectl apply -f cluster/kuberay.yaml", "ray get-auth-token --generate",
                   "ray dashboard cluster/onprem.yaml", "ray job submit --address http://127.0.0.1:8265",
                   "hpo:\n  study_storage: postgresql://", "python -m orchestrator.report",
                   "ray down cluster/onprem.yaml", "ray down cluster/gpu.yaml",
                   "kubectl delete -f cluster/kuberay.yaml", "python cluster/sync.py", "ray stop"):
        assert needle in doc, needle
    assert "0.0.0.0" not in doc and credential_findings(doc) == []
