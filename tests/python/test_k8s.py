"""The Kubernetes manifests: every overlay renders with kustomize
(kubectl's built-in) and each object validates, offline, against the
Kubernetes schemas (pip kubernetes-validate, strict: unknown fields are
errors). The ServiceMonitor is the Prometheus operator's own kind, outside
those schemas. The pod's grace period covers the server's drain, and the
server accepts each overlay's config (`fusechat serve --check-config`)."""

import shutil
import subprocess
import tomllib

import kubernetes_validate
import pytest
import yaml

from conftest import BIN, REPO

OVERLAYS = ["cpu", "gpu"]
KUBERNETES = "1.32.0"
OPERATOR_KINDS = {"ServiceMonitor"}


def render(overlay: str) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("`kubectl` (with its built-in kustomize) is needed to render k8s/overlays")
    out = subprocess.run([kubectl, "kustomize", str(REPO / "k8s" / "overlays" / overlay)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_rendered_object_validates_against_the_kubernetes_schemas(overlay):
    docs = render(overlay)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "PersistentVolumeClaim",
                            "Service", "Service", "ServiceMonitor"]), kinds
    for doc in docs:
        if doc["kind"] in OPERATOR_KINDS:
            assert doc["apiVersion"] == "monitoring.coreos.com/v1"
            continue
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_pod_outlives_the_drain_and_the_server_takes_its_config(overlay, tmp_path):
    docs = render(overlay)
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    config_map = next(d for d in docs if d["kind"] == "ConfigMap")
    pod = deployment["spec"]["template"]["spec"]
    serve_toml = config_map["data"]["serve.toml"]
    grace = tomllib.loads(serve_toml)["listen"]["shutdown_grace_s"]
    assert pod["terminationGracePeriodSeconds"] > grace
    container = pod["containers"][0]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True
    probes = {k: container[k]["httpGet"]["path"] for k in ("livenessProbe", "readinessProbe", "startupProbe")}
    assert probes == {"livenessProbe": "/health", "readinessProbe": "/ready", "startupProbe": "/health"}
    if overlay == "gpu":
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    path = tmp_path / "serve.toml"
    path.write_text(serve_toml)
    out = subprocess.run([str(BIN), "serve", "--config", str(path), "--check-config"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
