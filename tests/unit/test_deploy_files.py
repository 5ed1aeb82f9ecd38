"""The deployment files: offline validation with real tools, plus the structural facts the system relies on.

Validation runs ``.ci/validate_deploy.sh`` step by step (Debian's ``docker-compose config``, the Compose
Specification schema through check-jsonschema, ``kubectl kustomize`` + kubernetes-validate). A step
whose tool is missing is skipped with the script's reason and install hint (exit 77), or fails where ``CI``
is set (``tests/missing.py``; the script itself fails with ``ASYNCTHINK_REQUIRE_DEPLOY_TOOLS=1``). The
rendered overlays need kubectl, the same way. The structural checks read the YAML with PyYAML and need
nothing else.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.missing import missing, require_tool

# kubectl >= 1.27 bundles kustomize v5; Debian/Ubuntu: the Kubernetes apt repository's kubectl package
KUBECTL_INSTALL = "install kubectl >= 1.27 (https://kubernetes.io/docs/tasks/tools/; apt-get install kubectl)"
ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / ".ci" / "validate_deploy.sh"
INFRA = {"postgres", "redis", "migrate", "sglang"}  # every other compose service is an app service
READY = {"service_healthy", "service_completed_successfully"}


def run_step(step: str) -> None:
    env = {**os.environ, "PYTHON": sys.executable}  # the script finds the PyPI tools in this interpreter
    proc = subprocess.run(["bash", str(SCRIPT), step], cwd=ROOT, capture_output=True, text=True, timeout=240, env=env)
    out = proc.stdout + proc.stderr
    if proc.returncode == 77:  # each SKIP line names the tool and how to install it
        missing(" / ".join(line for line in out.splitlines() if line.startswith("SKIP")), "install what it names")
    assert proc.returncode == 0, out


@pytest.mark.parametrize("step", ["compose", "compose-schema", "k8s"])
def test_validation_step(step: str) -> None:
    run_step(step)


# -- compose.yaml -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "compose.yaml").read_text())
    assert isinstance(data, dict)
    return data


def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]  # type: ignore[no-any-return]


def profiles(svc: dict[str, Any]) -> set[str]:
    return set(svc.get("profiles") or [])


def test_every_dependency_waits_on_a_condition(compose: dict[str, Any]) -> None:
    for name, svc in services(compose).items():
        deps = svc.get("depends_on") or {}
        assert isinstance(deps, dict), f"{name}: depends_on must use conditions, not a bare list"
        for dep, spec in deps.items():
            assert spec.get("condition") in READY, f"{name} -> {dep}: {spec}"
            target = services(compose)[dep]
            if spec["condition"] == "service_healthy":
                assert "healthcheck" in target, (
                    f"{name} waits for {dep} to be healthy, but it has no healthcheck"
                )


def test_app_services_are_healthchecked_or_wait_on_healthy_ones(compose: dict[str, Any]) -> None:
    for name, svc in services(compose).items():
        if name in INFRA:
            continue
        deps = svc.get("depends_on") or {}
        assert "healthcheck" in svc or deps, f"{name}: neither a healthcheck nor healthy dependencies"
        assert deps, f"{name} starts without waiting for anything"


def test_migrations_run_first(compose: dict[str, Any]) -> None:
    s = services(compose)
    assert s["migrate"]["command"] == ["asyncthink", "db", "upgrade"]
    assert s["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert str(s["migrate"].get("restart")) == "no"
    for name in ("gateway", "organizer", "organizer-cpu", "worker-model", "worker-model-cpu", "worker-tool"):
        assert s[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully", name


def test_infrastructure_healthchecks(compose: dict[str, Any]) -> None:
    s = services(compose)
    assert "pg_isready" in " ".join(s["postgres"]["healthcheck"]["test"])
    assert "redis-cli ping" in " ".join(s["redis"]["healthcheck"]["test"])  # authenticated: see below
    assert "/health" in " ".join(s["sglang"]["healthcheck"]["test"])
    assert "/healthz" in " ".join(s["gateway"]["healthcheck"]["test"])


def test_sglang_reserves_a_gpu_and_takes_its_model_from_the_environment(compose: dict[str, Any]) -> None:
    sglang = services(compose)["sglang"]
    assert "lmsysorg/sglang" in sglang["image"]
    assert profiles(sglang) == {"gpu"}
    [device] = sglang["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"] and device["count"] == 1
    assert any("ASYNCTHINK_SGLANG_MODEL" in v and v.endswith(":/model:ro") for v in sglang["volumes"])
    assert "--model-path" in sglang["command"]


def test_profiles_pick_the_backend(compose: dict[str, Any]) -> None:
    s = services(compose)
    cpu_run = {n: v for n, v in s.items() if not profiles(v) or "cpu" in profiles(v)}
    gpu_run = {n: v for n, v in s.items() if not profiles(v) or "gpu" in profiles(v)}
    assert "sglang" not in cpu_run and "sglang" in gpu_run
    for name, svc in cpu_run.items():
        assert "sglang" not in (svc.get("depends_on") or {}), f"{name} (cpu) depends on sglang"
        model = (svc.get("environment") or {}).get("ASYNCTHINK_MODEL", "")
        assert not model.startswith("sglang:"), f"{name} (cpu) uses SGLang"
    for kind in ("organizer", "worker-model"):
        assert s[f"{kind}-cpu"]["environment"]["ASYNCTHINK_MODEL"] == "/app/models/asyncthink-countdown-small"
        assert s[kind]["environment"]["ASYNCTHINK_MODEL"].startswith("sglang:http://sglang:30000?tokenizer=")
        assert s[kind]["depends_on"]["sglang"]["condition"] == "service_healthy"
    # each profile runs exactly one organizer and one model worker
    assert sorted(n for n in cpu_run if n.startswith(("organizer", "worker-model"))) == [
        "organizer-cpu", "worker-model-cpu",
    ]  # fmt: skip
    assert sorted(n for n in gpu_run if n.startswith(("organizer", "worker-model"))) == [
        "organizer",
        "worker-model",
    ]


def test_service_commands(compose: dict[str, Any]) -> None:
    s = services(compose)
    assert s["gateway"]["command"][:3] == ["asyncthink", "serve", "gateway"]
    assert s["organizer"]["command"] == s["organizer-cpu"]["command"]
    assert s["organizer"]["command"][:3] == ["asyncthink", "serve", "organizer"]
    for name, queue in (("worker-model", "model"), ("worker-model-cpu", "model"), ("worker-tool", "tool")):
        cmd = s[name]["command"]
        assert cmd[:4] == ["celery", "-A", "services.workers.app", "worker"], name
        assert cmd[cmd.index("-Q") + 1] == queue, name
    assert s["flower"]["command"][:4] == ["celery", "-A", "services.workers.app", "flower"]


def test_every_service_has_its_own_healthcheck(compose: dict[str, Any]) -> None:
    """The image's HEALTHCHECK probes the gateway's port: any other service that inherited it would stay
    unhealthy for good (and `docker compose up --wait` would fail), so each one sets its own, and the
    one-shot migration job turns it off."""
    for name, svc in services(compose).items():
        check = svc.get("healthcheck")
        assert check, f"{name} inherits the image's healthcheck (the gateway's port)"
        if name == "migrate":
            assert check == {"disable": True}
        else:
            assert check.get("test") and not check.get("disable"), name


def test_the_organizer_probe_reads_the_file_its_command_writes(compose: dict[str, Any]) -> None:
    for name in ("organizer", "organizer-cpu"):
        svc = services(compose)[name]
        command = " ".join(svc["command"]).split()
        written = command[command.index("--heartbeat-file") + 1]
        test = svc["healthcheck"]["test"]
        assert test[:4] == ["CMD", "python", "-m", "services.organizer.heartbeat"], name
        assert test[4] == written, f"{name} probes {test[4]} but writes {written}"


def dockerignore_patterns(path: Path) -> list[str]:
    lines = (line.strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def test_both_builders_get_the_same_context_filter() -> None:
    """The legacy builder reads only the root .dockerignore, BuildKit prefers docker/Dockerfile.dockerignore."""
    root = dockerignore_patterns(ROOT / ".dockerignore")
    assert root == dockerignore_patterns(ROOT / "docker" / "Dockerfile.dockerignore")
    assert {".git", ".venv", "tests/", "bench/", "runs/", "*.db"} <= set(root)
    copied = {"models", "models/", "README.md", "pyproject.toml", "shared/", "services/", "cli/"}
    assert not copied & set(root), "the Dockerfile needs these in the context"
    assert not any(p.startswith("!") for p in root)  # no re-inclusions to reason about


def test_the_dockerfile_installs_the_serve_extra() -> None:
    text = (ROOT / "docker" / "Dockerfile").read_text()
    assert text.splitlines()[
        [i for i, line in enumerate(text.splitlines()) if line.startswith("FROM")][0]
    ] == ("FROM python:3.11-slim")
    assert 'pip install ".[serve]"' in text
    assert (ROOT / "docker" / "Dockerfile.dockerignore").is_file()


# -- k8s/ ---------------------------------------------------------------------------------------------------


def load_docs(*paths: Path) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in paths:
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


@pytest.fixture(scope="module")
def k8s_objects() -> list[dict[str, Any]]:
    base = ROOT / "k8s" / "base"
    kustomization = yaml.safe_load((base / "kustomization.yaml").read_text())
    return load_docs(
        *(base / r for r in kustomization["resources"]), ROOT / "k8s" / "overlays" / "gpu" / "sglang.yaml"
    )


def by_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def test_one_deployment_and_service_per_service(k8s_objects: list[dict[str, Any]]) -> None:
    deployments = by_kind(k8s_objects, "Deployment")
    assert {"gateway", "organizer", "worker-model", "worker-tool", "redis", "sglang", "flower"} <= set(
        deployments
    )
    assert "postgres" in by_kind(k8s_objects, "StatefulSet")
    assert {"gateway", "redis", "postgres", "sglang"} <= set(by_kind(k8s_objects, "Service"))
    assert "asyncthink-config" in by_kind(k8s_objects, "ConfigMap")
    assert "asyncthink-secrets" in by_kind(k8s_objects, "Secret")


def test_every_deployment_has_probes(k8s_objects: list[dict[str, Any]]) -> None:
    for name, dep in by_kind(k8s_objects, "Deployment").items():
        for c in dep["spec"]["template"]["spec"]["containers"]:
            assert "readinessProbe" in c and "livenessProbe" in c, f"{name}/{c['name']} lacks probes"
    gateway = by_kind(k8s_objects, "Deployment")["gateway"]["spec"]["template"]["spec"]["containers"][0]
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert gateway["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for worker in ("worker-model", "worker-tool"):
        c = by_kind(k8s_objects, "Deployment")[worker]["spec"]["template"]["spec"]["containers"][0]
        assert "celery -A services.workers.app inspect ping" in " ".join(
            c["livenessProbe"]["exec"]["command"]
        )


def test_the_organizer_liveness_probe_reads_its_heartbeat(k8s_objects: list[dict[str, Any]]) -> None:
    [c] = by_kind(k8s_objects, "Deployment")["organizer"]["spec"]["template"]["spec"]["containers"]
    command = " ".join(c["command"]).split()
    written = command[command.index("--heartbeat-file") + 1]
    assert c["livenessProbe"]["exec"]["command"][:4] == ["python", "-m", "services.organizer.heartbeat", written]


def test_workers_autoscale_and_migrations_run_as_a_job(k8s_objects: list[dict[str, Any]]) -> None:
    deployments = by_kind(k8s_objects, "Deployment")
    hpas = by_kind(k8s_objects, "HorizontalPodAutoscaler")
    # issue 19: organizers scale too, and every HPA scales on the load (an external metric the gateway
    # exports: episodes in flight, worker queue depth), with CPU only beside it
    assert {h["spec"]["scaleTargetRef"]["name"] for h in hpas.values()} == {"organizer", "worker-model", "worker-tool"}
    for h in hpas.values():
        target = deployments[h["spec"]["scaleTargetRef"]["name"]]
        assert target["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]["cpu"]
        external = [m["external"]["metric"]["name"] for m in h["spec"]["metrics"] if m["type"] == "External"]
        assert external and set(external) <= {"asyncthink_episodes_in_flight", "asyncthink_worker_queue_depth"}
    [job] = by_kind(k8s_objects, "Job").values()
    assert job["spec"]["template"]["spec"]["containers"][0]["command"] == ["asyncthink", "db", "upgrade"]


def test_gpu_overlay_runs_sglang_on_a_gpu_node(k8s_objects: list[dict[str, Any]]) -> None:
    pod = by_kind(k8s_objects, "Deployment")["sglang"]["spec"]["template"]["spec"]
    [c] = pod["containers"]
    assert c["image"].startswith("lmsysorg/sglang")
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"


def test_overlays_point_the_model_at_the_right_backend() -> None:
    overlays = ROOT / "k8s" / "overlays"
    for name in ("cpu", "gpu"):
        k = yaml.safe_load((overlays / name / "kustomization.yaml").read_text())
        assert "../../base" in k["resources"]
    gpu = (overlays / "gpu" / "kustomization.yaml").read_text()
    assert "value: sglang:http://sglang:30000?tokenizer=" in gpu
    cpu = (overlays / "cpu" / "kustomization.yaml").read_text().splitlines()
    assert not [line for line in cpu if "sglang" in line.lower() and not line.lstrip().startswith("#")]


def test_rendered_overlays_set_the_model() -> None:
    kubectl = require_tool("kubectl", KUBECTL_INSTALL)
    for overlay, expected in (("cpu", "/app/models/"), ("gpu", "sglang:http://sglang:30000")):
        out = subprocess.run(
            [kubectl, "kustomize", str(ROOT / "k8s" / "overlays" / overlay)],
            capture_output=True, text=True, check=True, timeout=120,
        ).stdout  # fmt: skip
        objects = [d for d in yaml.safe_load_all(out) if d]
        [config] = [o for o in objects if o["kind"] == "ConfigMap"]
        assert config["data"]["ASYNCTHINK_MODEL"].startswith(expected)
        assert all(
            o["metadata"].get("namespace") == "asyncthink" for o in objects if o["kind"] != "Namespace"
        )
        assert ("sglang" in by_kind(objects, "Deployment")) is (overlay == "gpu")


# -- security defaults: nothing runs open ---------------------------------------------------------------


def app_env(svc: dict[str, Any]) -> dict[str, str]:
    return {k: str(v) for k, v in (svc.get("environment") or {}).items()}


def test_compose_gateway_needs_keys_and_listens_on_loopback(compose: dict[str, Any]) -> None:
    s = services(compose)
    env = app_env(s["gateway"])
    assert env["ASYNCTHINK_ENVIRONMENT"] == "production" and env["ASYNCTHINK_AUTH"] == "keys"
    assert env["ASYNCTHINK_ADMIN_KEY"].startswith("${ASYNCTHINK_ADMIN_KEY:?")  # required, from the environment
    assert env["ASYNCTHINK_SECRET_KEY"].startswith("${ASYNCTHINK_SECRET_KEY:?")  # signs the /ui sessions
    for name, svc in s.items():
        if name != "gateway":
            assert "ASYNCTHINK_ADMIN_KEY" not in app_env(svc), f"{name} gets the admin key"
            assert "ASYNCTHINK_SECRET_KEY" not in app_env(svc), f"{name} gets the session secret"
        for port in svc.get("ports") or []:
            assert str(port).startswith(("127.0.0.1:", "${ASYNCTHINK_GATEWAY_BIND:-127.0.0.1}:")), (name, port)


def test_compose_redis_has_a_password_and_every_url_carries_it(compose: dict[str, Any]) -> None:
    s = services(compose)
    redis = s["redis"]
    assert "--requirepass" in " ".join(redis["command"])
    assert app_env(redis)["REDIS_PASSWORD"].startswith("${REDIS_PASSWORD:?")
    assert "REDISCLI_AUTH" in " ".join(redis["healthcheck"]["test"])
    urls = {name: app_env(svc).get("REDIS_URL") for name, svc in s.items() if name not in INFRA | {"migrate"}}
    assert urls and all(url and url.startswith("redis://:${REDIS_PASSWORD") for url in urls.values()), urls


def test_k8s_redis_has_a_password_and_the_gateway_needs_keys(k8s_objects: list[dict[str, Any]]) -> None:
    config = by_kind(k8s_objects, "ConfigMap")["asyncthink-config"]["data"]
    assert config["ASYNCTHINK_ENVIRONMENT"] == "production" and config["ASYNCTHINK_AUTH"] == "keys"
    assert "REDIS_URL" not in config  # it carries the password: it lives in the Secret
    secrets = by_kind(k8s_objects, "Secret")
    shared = secrets["asyncthink-secrets"]["stringData"]
    assert "ASYNCTHINK_SECRET_KEY" not in shared and "ASYNCTHINK_ADMIN_KEY" not in shared
    assert shared["REDIS_URL"].startswith(f"redis://:{shared['REDIS_PASSWORD']}@redis:")
    deployments = by_kind(k8s_objects, "Deployment")
    [redis] = deployments["redis"]["spec"]["template"]["spec"]["containers"]
    assert "--requirepass" in redis["args"] and "$(REDIS_PASSWORD)" in redis["args"]
    env = {e["name"]: e for e in redis["env"]}
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == "REDIS_PASSWORD"
    assert env["REDISCLI_AUTH"]["valueFrom"]["secretKeyRef"]["key"] == "REDIS_PASSWORD"
    [gateway] = deployments["gateway"]["spec"]["template"]["spec"]["containers"]
    for name in ("ASYNCTHINK_ADMIN_KEY", "ASYNCTHINK_SECRET_KEY"):  # the gateway's own Secret
        ref = {e["name"]: e for e in gateway.get("env", [])}[name]["valueFrom"]["secretKeyRef"]
        assert ref["name"] in secrets and ref["key"] in secrets[ref["name"]]["stringData"]
    for name, dep in deployments.items():  # only the gateway holds the admin key
        for c in dep["spec"]["template"]["spec"]["containers"]:
            if name != "gateway":
                assert not {"ASYNCTHINK_ADMIN_KEY", "ASYNCTHINK_SECRET_KEY"} & {e["name"] for e in c.get("env", [])}, name
