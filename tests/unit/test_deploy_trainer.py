"""The trainer service in the deployment files: compose profiles and the k8s base and gpu overlay.

Checkpoints must be readable at the same path (/checkpoints) by the trainer and by every process that
loads weights, or a published version could not be loaded; these checks read the YAML with PyYAML
(rendered overlays need kubectl: skipped without it, a failure where ``CI`` is set).
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.missing import require_tool
from tests.unit.test_deploy_files import KUBECTL_INSTALL

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]  # type: ignore[no-any-return]


def _mounts(svc: dict[str, Any]) -> list[str]:
    return [str(v) for v in svc.get("volumes") or []]


def test_compose_runs_the_trainer_in_both_profiles(services: dict[str, Any]) -> None:
    cpu, gpu = services["trainer-cpu"], services["trainer"]
    assert cpu["profiles"] == ["cpu"] and gpu["profiles"] == ["gpu"]
    for svc in (cpu, gpu):
        assert "asyncthink serve trainer --out /checkpoints" in " ".join(svc["command"])
        assert "checkpoints:/checkpoints" in _mounts(svc)
        assert svc["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        assert "9108/metrics" in " ".join(svc["healthcheck"]["test"])
    assert "--device cpu" in " ".join(cpu["command"]) and "--device cuda" in " ".join(gpu["command"])
    assert not cpu["environment"]["ASYNCTHINK_MODEL"].startswith("sglang:")
    assert gpu["environment"]["ASYNCTHINK_MODEL"].startswith("sglang:http://sglang:30000?tokenizer=/model")
    assert gpu["depends_on"]["sglang"]["condition"] == "service_healthy"
    [device] = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia"


def test_every_process_that_loads_weights_sees_the_checkpoints(services: dict[str, Any]) -> None:
    for name in ("organizer-cpu", "worker-model-cpu"):
        assert "checkpoints:/checkpoints:ro" in _mounts(services[name]), name
    assert "checkpoints:/checkpoints" in _mounts(services["sglang"])


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_k8s_base_has_the_trainer_and_a_shared_checkpoints_claim() -> None:
    base = ROOT / "k8s" / "base"
    assert "trainer.yaml" in yaml.safe_load((base / "kustomization.yaml").read_text())["resources"]
    objects = {(o["kind"], o["metadata"]["name"]): o for o in _docs(base / "trainer.yaml")}
    claim = objects[("PersistentVolumeClaim", "checkpoints")]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    deployment = objects[("Deployment", "trainer")]
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
    [c] = deployment["spec"]["template"]["spec"]["containers"]
    assert c["command"][:3] == ["asyncthink", "serve", "trainer"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/metrics" == c["livenessProbe"]["httpGet"]["path"]
    assert {"name": "checkpoints", "mountPath": "/checkpoints"} in c["volumeMounts"]
    assert objects[("Service", "trainer")]["spec"]["ports"][0]["port"] == 9108
    for name in ("organizer", "worker-model"):
        [dep] = _docs(base / f"{name}.yaml")
        spec = dep["spec"]["template"]["spec"]
        mounts = spec["containers"][0]["volumeMounts"]
        assert any(m["mountPath"] == "/checkpoints" and m.get("readOnly") for m in mounts), name
        assert spec["volumes"][0]["persistentVolumeClaim"]["claimName"] == "checkpoints"


def test_the_gpu_overlay_trains_on_a_gpu_and_sglang_reads_the_checkpoints() -> None:
    kubectl = require_tool("kubectl", KUBECTL_INSTALL)
    out = subprocess.run([kubectl, "kustomize", str(ROOT / "k8s" / "overlays" / "gpu")], capture_output=True,
                         text=True, check=True, timeout=120).stdout  # fmt: skip
    deployments = {o["metadata"]["name"]: o for o in yaml.safe_load_all(out) if o and o["kind"] == "Deployment"}
    trainer = deployments["trainer"]["spec"]["template"]["spec"]
    [c] = trainer["containers"]
    assert "--device" in c["command"] and c["command"][c["command"].index("--device") + 1] == "cuda"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1 and trainer["tolerations"]
    sglang = deployments["sglang"]["spec"]["template"]["spec"]
    assert any(m["mountPath"] == "/checkpoints" for m in sglang["containers"][0]["volumeMounts"])
    cpu = subprocess.run([kubectl, "kustomize", str(ROOT / "k8s" / "overlays" / "cpu")], capture_output=True,
                         text=True, check=True, timeout=120).stdout  # fmt: skip
    cpu_trainer = next(o for o in yaml.safe_load_all(cpu) if o and o["kind"] == "Deployment" and o["metadata"]["name"] == "trainer")
    assert "cuda" not in cpu_trainer["spec"]["template"]["spec"]["containers"][0]["command"]
