"""The Helm chart rendered by Helm's own engine (helm-python-sdk binds the Go SDK): what each
value turns into. kubernetes-validate checks the same renders' schema in make deploy-check."""

from __future__ import annotations

import base64
from pathlib import Path

import helm_python as helm
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "cascade"


def render(values: dict | None = None) -> dict[tuple[str, str], dict]:
    chart = helm.Chart.load(CHART)
    try:
        chart.validate_schema(values or {})
        files = chart.render(values or {}, name="rel", namespace="ns", is_install=True)
    finally:
        chart.close()
    out = {}
    for path, text in files.items():
        if path.endswith(".txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                out[(doc["kind"], doc["metadata"]["name"])] = doc
    return out


def env_of(objects, deployment: str) -> dict[str, dict]:
    (container,) = objects[("Deployment", deployment)]["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e for e in container["env"]}


def test_defaults_render_every_component_with_probes_limits_and_restricted_security():
    objects = render()
    workloads = [o for (kind, _), o in objects.items() if kind in ("Deployment", "StatefulSet")]
    assert {o["metadata"]["name"] for o in workloads} == {
        "rel-cascade-gateway", "rel-cascade-triton", "rel-cascade-redis"
    }  # fmt: skip
    for workload in workloads:
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["automountServiceAccountToken"] is False
        for c in pod["containers"]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            assert c["securityContext"]["readOnlyRootFilesystem"] is True
            assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
            assert c["resources"]["requests"] and c["resources"]["limits"]
            assert "readinessProbe" in c and "livenessProbe" in c
    for name in ("rel-cascade-gateway", "rel-cascade-triton"):
        assert objects[("PodDisruptionBudget", name)]["spec"]["maxUnavailable"] == 1
        assert ("Service", name) in objects
    triton = objects[("Deployment", "rel-cascade-triton")]["spec"]["template"]["spec"]
    assert triton["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_gateway_reads_control_from_the_release_redis_with_its_generated_password():
    objects = render()
    env = env_of(objects, "rel-cascade-gateway")
    assert env["CASCADE_CONTROL_STORE"]["value"] == "redis"
    assert (
        env["CASCADE_REDIS_URL"]["value"] == "redis://:$(REDIS_PASSWORD)@rel-cascade-redis:6379/0"
    )
    password_ref = env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert password_ref == {"name": "rel-cascade-redis", "key": "password"}
    assert env["CASCADE_BUNDLES"]["value"] == "/bundles/digits,/bundles/intents"
    assert env["CASCADE_TRITON_URL"]["value"] == "rel-cascade-triton:8001"
    # Only the gateways may reach Redis.
    policy = objects[("NetworkPolicy", "rel-cascade-redis")]["spec"]
    (rule,) = policy["ingress"]
    gateway_labels = objects[("Deployment", "rel-cascade-gateway")]["spec"]["selector"]
    assert rule["from"][0]["podSelector"] == gateway_labels


def test_secrets_are_generated_per_install_never_a_default():
    first, second = render(), render()
    for name, key in (("rel-cascade-admin", "token"), ("rel-cascade-redis", "password")):
        a = base64.b64decode(first[("Secret", name)]["data"][key]).decode()
        b = base64.b64decode(second[("Secret", name)]["data"][key]).decode()
        assert len(a) == 40 and a.isalnum() and a != b
        assert (
            first[("Secret", name)]["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
        )


def test_a_given_token_or_existing_secret_is_used():
    given = render({"admin": {"token": "s3cret-token"}})
    data = given[("Secret", "rel-cascade-admin")]["data"]["token"]
    assert base64.b64decode(data).decode() == "s3cret-token"
    existing = render({"admin": {"existingSecret": "ops-admin"}})
    assert ("Secret", "rel-cascade-admin") not in existing
    ref = env_of(existing, "rel-cascade-gateway")["CASCADE_ADMIN_TOKEN"]["valueFrom"]
    assert ref["secretKeyRef"]["name"] == "ops-admin"


def test_an_external_redis_needs_its_url_secret():
    with pytest.raises(helm.HelmError, match="urlSecret"):
        render({"redis": {"enabled": False}})
    objects = render({"redis": {"enabled": False, "external": {"urlSecret": "my-redis"}}})
    assert not [k for k in objects if k[1] == "rel-cascade-redis"]
    url = env_of(objects, "rel-cascade-gateway")["CASCADE_REDIS_URL"]["valueFrom"]
    assert url["secretKeyRef"] == {"name": "my-redis", "key": "url"}


def test_autoscalers_ask_for_the_metrics_the_adapter_serves():
    adapter = yaml.safe_load((CHART.parent / "prometheus-adapter-values.yaml").read_text())
    served = {rule["name"]["as"] for rule in adapter["rules"]["custom"]}
    objects = render({"gateway": {"autoscaling": {"metric": "inFlight"}}})
    asked = set()
    for name in ("rel-cascade-gateway", "rel-cascade-triton"):
        hpa = objects[("HorizontalPodAutoscaler", name)]["spec"]
        assert hpa["scaleTargetRef"]["name"] == name
        (metric,) = hpa["metrics"]
        assert metric["type"] == "Pods"
        asked.add(metric["pods"]["metric"]["name"])
    assert asked == served == {"cascade_in_flight_requests", "triton_queue_us_per_request"}
    cpu = render()[("HorizontalPodAutoscaler", "rel-cascade-gateway")]["spec"]["metrics"]
    assert cpu[0]["resource"]["name"] == "cpu"
    # With an autoscaler the Deployment leaves replicas to it.
    assert "replicas" not in objects[("Deployment", "rel-cascade-gateway")]["spec"]


def test_a_cpu_teacher_and_fixed_replicas():
    objects = render({"triton": {"gpus": 0, "replicas": 3, "autoscaling": {"enabled": False}}})
    triton = objects[("Deployment", "rel-cascade-triton")]
    assert triton["spec"]["replicas"] == 3
    assert (
        "nvidia.com/gpu"
        not in triton["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    )
    assert ("HorizontalPodAutoscaler", "rel-cascade-triton") not in objects


def test_bad_values_are_refused_with_the_key():
    with pytest.raises(helm.HelmError, match="metric"):
        render({"gateway": {"autoscaling": {"metric": "memory"}}})
    with pytest.raises(helm.HelmError, match="CASCADE_"):
        render({"gateway": {"env": {"PATH": "/tmp"}}})
    with pytest.raises(helm.HelmError, match="drainS"):
        render({"gateway": {"drainS": 30, "terminationGracePeriodSeconds": 30}})


def test_capture_is_off_by_default_and_enabled_writes_to_its_own_volume():
    objects = render()
    assert "CASCADE_CAPTURE__DIRECTORY" not in env_of(objects, "rel-cascade-gateway")
    assert ("PersistentVolumeClaim", "rel-cascade-capture") not in objects
    objects = render({"gateway": {"capture": {"enabled": True, "fraction": 0.5}}})
    env = env_of(objects, "rel-cascade-gateway")
    assert env["CASCADE_CAPTURE__DIRECTORY"]["value"] == "/capture"
    assert env["CASCADE_CAPTURE__FRACTION"]["value"] == "0.5"
    assert env["CASCADE_CAPTURE__MAX_BYTES"]["value"] == "1073741824"
    pod = objects[("Deployment", "rel-cascade-gateway")]["spec"]["template"]["spec"]
    (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "capture"]
    assert mount["mountPath"] == "/capture" and not mount.get("readOnly")
    (volume,) = [v for v in pod["volumes"] if v["name"] == "capture"]
    assert volume["persistentVolumeClaim"]["claimName"] == "rel-cascade-capture"
    claim = objects[("PersistentVolumeClaim", "rel-cascade-capture")]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    with pytest.raises(Exception, match="fraction"):
        render({"gateway": {"capture": {"enabled": True, "fraction": 2}}})
