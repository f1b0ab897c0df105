"""deploy/k8s validates offline against the Kubernetes and KEDA schemas, and is wired together.

Built-in kinds are checked with kubernetes-validate's bundled strict JSON schemas (no network,
unknown fields rejected). KEDA's ScaledObject and TriggerAuthentication are checked against the
openAPIV3Schema of their CRDs, vendored in tests/data (see its README), made strict the way
`kubectl apply` (server-side strict field validation) treats unknown fields.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from streams.config import Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
DATA = ROOT / "tests" / "data"
# The oldest Kubernetes minor still supported by its upstream (and by KEDA 2.20) when written.
K8S_VERSION = "1.30"
CRD_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): "keda-scaledobject-v1alpha1.json",
    ("keda.sh/v1alpha1", "TriggerAuthentication"): "keda-triggerauthentication-v1alpha1.json",
}
# The kafka scaler's trigger metadata in KEDA v2.20.2 (pkg/scalers/kafka_scaler.go,
# kafkaMetadata fields read from triggerMetadata, with their enums). The CRD types metadata as
# a free map of strings, so a misspelled key (lagTreshold) would pass it and silently take a
# default; this schema catches it.
KAFKA_TRIGGER_METADATA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["bootstrapServers", "consumerGroup"],
    "properties": {
        **{
            key: {"type": "string"}
            for key in (
                "bootstrapServers",
                "bootstrapServersFromEnv",
                "consumerGroup",
                "consumerGroupFromEnv",
                "topic",
                "topicFromEnv",
                "partitionLimitation",
                "version",
                "awsRegion",
            )
        },
        **{key: {"type": "string", "pattern": "^[1-9][0-9]*$"} for key in ("lagThreshold",)},
        "activationLagThreshold": {"type": "string", "pattern": "^[0-9]+$"},
        "offsetResetPolicy": {"enum": ["latest", "earliest"]},
        "tls": {"enum": ["enable", "disable"]},
        "sasl": {
            "enum": ["none", "plaintext", "scram_sha256", "scram_sha512", "oauthbearer", "gssapi"]
        },
        "saslTokenProvider": {"enum": ["bearer", "aws_msk_iam"]},
        **{
            key: {"enum": ["true", "false"]}
            for key in (
                "allowIdleConsumers",
                "excludePersistentLag",
                "scaleToZeroOnInvalidOffset",
                "limitToPartitionsWithLag",
                "ensureEvenDistributionOfPartitions",
                "unsafeSsl",
            )
        },
    },
}
# The prometheus scaler's trigger metadata in KEDA v2.20 (pkg/scalers/prometheus_scaler.go;
# metricName is gone since v2.12), checked the same way.
PROMETHEUS_TRIGGER_METADATA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["serverAddress", "query", "threshold"],
    "properties": {
        **{
            key: {"type": "string"}
            for key in ("serverAddress", "query", "queryParameters", "namespace", "customHeaders")
        },
        **{
            key: {"type": "string", "pattern": "^[0-9]+(\\.[0-9]+)?$"}
            for key in ("threshold", "activationThreshold", "timeout")
        },
        **{key: {"enum": ["true", "false"]} for key in ("ignoreNullValues", "unsafeSsl")},
        "authModes": {"type": "string"},
    },
}

# KEDA's SASL names for the worker's INFLOW_KAFKA_SASL_MECHANISM values.
KEDA_SASL = {"PLAIN": "plaintext", "SCRAM-SHA-256": "scram_sha256", "SCRAM-SHA-512": "scram_sha512"}
NOT_IN_KUSTOMIZATION = {"secret.template.yaml"}  # a template; ops/ holds operator one-offs
DEFAULTS = Settings()


def load_manifests() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in sorted(K8S.rglob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                found.append((str(path.relative_to(K8S)), doc))
    return found


MANIFESTS = load_manifests()


def manifest_id(item: tuple[str, dict[str, Any]]) -> str:
    name, doc = item
    return f"{name}:{doc.get('kind')}"


def strict(schema: Any) -> Any:
    """The CRD schema with unknown fields rejected wherever the schema lists the fields.

    The API server prunes (or, with strict field validation, refuses) fields a structural schema
    does not declare; JSON Schema accepts them unless additionalProperties says otherwise.
    """
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: strict(value) for key, value in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def crd_validator(api_version: str, kind: str) -> jsonschema.Draft7Validator:
    schema = strict(json.loads((DATA / CRD_SCHEMAS[(api_version, kind)]).read_text()))
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def validate(doc: dict[str, Any]) -> None:
    """Raise jsonschema.ValidationError (or a kubernetes_validate error) when doc is invalid."""
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key in CRD_SCHEMAS:
        crd_validator(*key).validate(doc)
        # A CRD's schema types metadata only as an object: check it as Kubernetes would.
        kubernetes_validate.validate(
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc["metadata"]},
            K8S_VERSION,
            strict=True,
        )
        if doc["kind"] == "ScaledObject":
            for trigger in doc["spec"]["triggers"]:
                if trigger["type"] == "kafka":
                    jsonschema.validate(trigger["metadata"], KAFKA_TRIGGER_METADATA)
                elif trigger["type"] == "prometheus":
                    jsonschema.validate(trigger["metadata"], PROMETHEUS_TRIGGER_METADATA)
        return
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def one(kind: str, name: str | None = None, file: str | None = None) -> dict[str, Any]:
    docs = [
        doc
        for path, doc in MANIFESTS
        if doc["kind"] == kind
        and (name is None or doc["metadata"].get("name") == name)
        and (file is None or path == file)
    ]
    assert len(docs) == 1, f"expected one {kind} {name or ''}, found {len(docs)}"
    return docs[0]


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = doc["spec"]["template"]["spec"]
    return spec


def container(doc: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [c for c in pod_spec(doc)["containers"] if c["name"] == name]
    return found


def mount_of(doc: dict[str, Any], ctr: dict[str, Any], claim: str) -> dict[str, Any]:
    """The container's mount of the pod volume backed by PersistentVolumeClaim `claim`."""
    volumes = {
        v["name"]
        for v in pod_spec(doc)["volumes"]
        if v.get("persistentVolumeClaim", {}).get("claimName") == claim
    }
    (found,) = [m for m in ctr["volumeMounts"] if m["name"] in volumes]
    return found


def env_value(ctr: dict[str, Any], name: str) -> Any:
    for item in ctr.get("env", []):
        if item["name"] == name:
            return item.get("value", item.get("valueFrom"))
    raise KeyError(name)


@pytest.fixture(scope="module")
def config() -> dict[str, str]:
    data: dict[str, str] = one("ConfigMap", "inflow-config")["data"]
    return data


# --- schema validation ---------------------------------------------------------------------------


def test_there_are_manifests_of_every_expected_kind() -> None:
    kinds = {doc["kind"] for _, doc in MANIFESTS}
    assert {
        "Namespace",
        "ConfigMap",
        "Secret",
        "PersistentVolumeClaim",
        "Job",
        "Deployment",
        "Service",
        "ScaledObject",
        "TriggerAuthentication",
    } <= kinds


@pytest.mark.parametrize("item", MANIFESTS, ids=manifest_id)
def test_manifest_passes_offline_schema_validation(item: tuple[str, dict[str, Any]]) -> None:
    # A kind without a bundled schema raises SchemaNotFoundError: nothing is skipped silently.
    validate(item[1])


def test_vendored_crd_schemas_are_cited_and_whole() -> None:
    for (api_version, _kind), file in CRD_SCHEMAS.items():
        schema = json.loads((DATA / file).read_text())
        assert set(schema["properties"]) >= {"apiVersion", "kind", "metadata", "spec"}, file
        assert api_version.endswith("/v1alpha1")
        assert file in (DATA / "README.md").read_text(), f"tests/data/README.md must cite {file}"


def deployment_with(change: Any) -> dict[str, Any]:
    doc = copy.deepcopy(one("Deployment", "inflow-worker"))
    change(doc)
    return doc


def scaledobject_with(change: Any) -> dict[str, Any]:
    doc = copy.deepcopy(one("ScaledObject", "inflow-worker"))
    change(doc)
    return doc


def _worker(doc: dict[str, Any]) -> dict[str, Any]:
    return container(doc, "worker")


# case: (manifest, a fragment of the error it must raise)
BROKEN: dict[str, tuple[dict[str, Any], str]] = {
    "misspelled readinessProbe": (
        deployment_with(
            lambda d: _worker(d).__setitem__("readinesProbe", _worker(d).pop("readinessProbe"))
        ),
        "'readinesProbe' was unexpected",
    ),
    "containerPort as a string": (
        deployment_with(lambda d: _worker(d)["ports"][0].__setitem__("containerPort", "6066")),
        "is not of type 'integer'",
    ),
    "misspelled metadata field": (
        deployment_with(lambda d: d["metadata"].__setitem__("lables", d["metadata"].pop("labels"))),
        "'lables' was unexpected",
    ),
    "container without a name": (
        deployment_with(lambda d: _worker(d).pop("name")),
        "'name' is a required property",
    ),
    "ScaledObject: maxReplicas for maxReplicaCount": (
        scaledobject_with(
            lambda d: d["spec"].__setitem__("maxReplicas", d["spec"].pop("maxReplicaCount"))
        ),
        "'maxReplicas' was unexpected",
    ),
    "ScaledObject: minReplicaCount as a string": (
        scaledobject_with(lambda d: d["spec"].__setitem__("minReplicaCount", "1")),
        "is not of type 'integer'",
    ),
    "ScaledObject: lagThreshold as a number": (
        scaledobject_with(
            lambda d: d["spec"]["triggers"][0]["metadata"].__setitem__("lagThreshold", 500)
        ),
        "is not of type 'string'",
    ),
    "ScaledObject: misspelled trigger metadata key": (
        scaledobject_with(
            lambda d: d["spec"]["triggers"][0]["metadata"].__setitem__(
                "lagTreshold", d["spec"]["triggers"][0]["metadata"].pop("lagThreshold")
            )
        ),
        "'lagTreshold' was unexpected",
    ),
    "ScaledObject: misspelled prometheus trigger key": (
        scaledobject_with(
            lambda d: d["spec"]["triggers"][1]["metadata"].__setitem__(
                "treshold", d["spec"]["triggers"][1]["metadata"].pop("threshold")
            )
        ),
        "'treshold' was unexpected",
    ),
    "ScaledObject: misspelled metadata field": (
        scaledobject_with(
            lambda d: d["metadata"].__setitem__("namespce", d["metadata"].pop("namespace"))
        ),
        "'namespce' was unexpected",
    ),
    "ScaledObject: unknown scaleTargetRef field": (
        scaledobject_with(lambda d: d["spec"]["scaleTargetRef"].__setitem__("replicas", 2)),
        "'replicas' was unexpected",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_the_validator_rejects_a_broken_manifest(case: str) -> None:
    doc, fragment = BROKEN[case]
    with pytest.raises(jsonschema.ValidationError) as caught:
        validate(doc)
    assert fragment in caught.value.message


def test_strict_keeps_preserve_unknown_fields_open() -> None:
    schema = strict(
        {
            "type": "object",
            "properties": {
                "a": {"type": "object", "properties": {"b": {"type": "string"}}},
                "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
            },
        }
    )
    assert schema["additionalProperties"] is False
    assert schema["properties"]["a"]["additionalProperties"] is False
    assert "additionalProperties" not in schema["properties"]["free"]


# --- wiring --------------------------------------------------------------------------------------


def test_kustomization_lists_every_manifest_but_the_templates_and_ops() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk - NOT_IN_KUSTOMIZATION
    assert kustomization["namespace"] == "inflow"
    images = {image["name"] for image in kustomization["images"]}
    used = {
        c["image"].partition(":")[0]
        for _, doc in MANIFESTS
        if doc["kind"] in ("Deployment", "Job")
        for c in pod_spec(doc)["containers"] + pod_spec(doc).get("initContainers", [])
    }
    assert used <= images


def test_every_resource_lives_in_the_namespace() -> None:
    namespace = one("Namespace")["metadata"]["name"]
    for name, doc in MANIFESTS:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == namespace, name


def test_settings_keys_name_real_settings(config: dict[str, str]) -> None:
    known = {f"INFLOW_{name.upper()}" for name in Settings.model_fields if name != "extra"}
    secret = one("Secret", "inflow-secrets")["stringData"]
    assert set(config) <= known, set(config) - known
    assert set(secret) <= known, set(secret) - known
    assert not set(config) & set(secret), "a setting is in both the ConfigMap and the Secret"
    for key, value in {**config, **secret}.items():
        assert isinstance(value, str), f"{key}: ConfigMap/Secret values must be strings"
    # the template holds placeholders only, never a real secret
    placeholders = [v for k, v in secret.items() if "PASSWORD" in k or "KEY" in k]
    assert placeholders and all(v.startswith("CHANGE-ME") for v in placeholders), placeholders
    # the settings the ConfigMap gives must load (types, SASL consistency)
    Settings.load(env={**config, **secret, "INFLOW_STATE_DIR": "/nonexistent"})


def test_worker_serves_the_registry_it_never_builds(config: dict[str, str]) -> None:
    deployment = one("Deployment", "inflow-worker")
    worker = container(deployment, "worker")
    assert worker["image"].partition(":")[0] == "inflow"  # the serving image
    command = " ".join(worker.get("command", []) + worker.get("args", []))
    assert command == "inflow worker"
    for ctr in pod_spec(deployment).get("initContainers", []):
        text = " ".join(ctr.get("command", []) + ctr.get("args", []))
        assert "engine" not in text and ctr["image"].partition(":")[0] == "inflow", text
    assert "replicas" not in deployment["spec"], "KEDA owns the replica count"
    refs = {next(iter(ref.values()))["name"] for ref in worker["envFrom"]}
    assert refs == {"inflow-config", "inflow-secrets"}
    assert env_value(worker, "INFLOW_WEB_HOST") == "0.0.0.0"
    mount = mount_of(deployment, worker, "inflow-engines")
    assert mount["readOnly"] is True
    assert config["INFLOW_ENGINE_DIR"].startswith(mount["mountPath"] + "/")
    (claim,) = [v for v in pod_spec(deployment)["volumes"] if v["name"] == mount["name"]]
    assert claim["persistentVolumeClaim"]["readOnly"] is True


def test_worker_probes_resources_and_security(config: dict[str, str]) -> None:
    deployment = one("Deployment", "inflow-worker")
    worker = container(deployment, "worker")
    ports = {p["name"]: p["containerPort"] for p in worker["ports"]}
    assert ports == {"http": int(config["INFLOW_WEB_PORT"])}
    probes = {
        kind: (worker[kind]["httpGet"]["path"], worker[kind]["httpGet"]["port"])
        for kind in ("startupProbe", "livenessProbe", "readinessProbe")
    }
    assert probes == {
        "startupProbe": ("/health/live", "http"),
        "livenessProbe": ("/health/live", "http"),
        "readinessProbe": ("/health/ready", "http"),
    }
    for bound in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(worker["resources"][bound]), bound
    # ONNX Runtime runs one batch per core of the CPU limit (not of the node), one thread each
    assert env_value(worker, "INFLOW_ORT_CONCURRENT_RUNS")["resourceFieldRef"] == {
        "containerName": "worker",
        "resource": "limits.cpu",
        "divisor": "1",
    }
    assert env_value(worker, "INFLOW_ORT_THREADS") == "1"
    pod_security = pod_spec(deployment)["securityContext"]
    assert pod_security["runAsNonRoot"] is True and pod_security["runAsUser"] != 0
    for ctr in pod_spec(deployment)["containers"] + pod_spec(deployment)["initContainers"]:
        security = ctr["securityContext"]
        assert security["readOnlyRootFilesystem"] is True, ctr["name"]
        assert security["allowPrivilegeEscalation"] is False, ctr["name"]
        assert security["capabilities"]["drop"] == ["ALL"], ctr["name"]
    # the state dir is writable: an emptyDir is mounted on it
    empty_dirs = {v["name"] for v in pod_spec(deployment)["volumes"] if "emptyDir" in v}
    mounts = {m["mountPath"]: m["name"] for m in worker["volumeMounts"]}
    assert mounts[config["INFLOW_STATE_DIR"]] in empty_dirs
    assert mounts["/tmp"] in empty_dirs


def test_engine_build_job_writes_the_shared_registry(config: dict[str, str]) -> None:
    job = one("Job", "inflow-engine-build")
    build = container(job, "engine-build")
    assert build["image"].partition(":")[0] == "inflow-build"
    assert build["command"][:3] == ["inflow", "engine", "ensure"]
    assert pod_spec(job)["restartPolicy"] == "Never"
    mount = mount_of(job, build, "inflow-engines")
    assert not mount.get("readOnly", False)
    assert config["INFLOW_ENGINE_DIR"].startswith(mount["mountPath"] + "/")
    assert env_value(build, "INFLOW_ENGINE_DIR") == {
        "configMapKeyRef": {"name": "inflow-config", "key": "INFLOW_ENGINE_DIR"}
    }
    assert str(env_value(build, "INFLOW_MODEL_DIR")).startswith(mount["mountPath"] + "/")
    assert pod_spec(job)["securityContext"]["runAsNonRoot"] is True
    pvc = one("PersistentVolumeClaim", "inflow-engines")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


def test_service_exposes_health_and_metrics_for_prometheus(config: dict[str, str]) -> None:
    service = one("Service", "inflow-worker")
    deployment = one("Deployment", "inflow-worker")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    (port,) = service["spec"]["ports"]
    assert port["port"] == int(config["INFLOW_WEB_PORT"]) and port["targetPort"] == "http"
    for notes in (
        service["metadata"]["annotations"],
        deployment["spec"]["template"]["metadata"]["annotations"],
    ):
        assert notes["prometheus.io/scrape"] == "true"
        assert notes["prometheus.io/port"] == config["INFLOW_WEB_PORT"]
        assert notes["prometheus.io/path"] == "/metrics"
    # a not-ready worker is still scraped (the not-ready alert needs it)
    assert service["spec"]["publishNotReadyAddresses"] is True


def test_keda_scales_the_worker_on_the_consumer_groups_lag(config: dict[str, str]) -> None:
    scaled = one("ScaledObject", "inflow-worker")["spec"]
    assert scaled["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": one("Deployment", "inflow-worker")["metadata"]["name"],
    }
    assert scaled["minReplicaCount"] == 1
    # more consumers than partitions sit idle
    assert scaled["maxReplicaCount"] == int(config["INFLOW_TOPIC_PARTITIONS"]) == 4
    trigger, backlog = scaled["triggers"]
    assert trigger["type"] == "kafka"
    # Sized by seconds of backlog, from the job the shipped Prometheus config scrapes.
    assert backlog["type"] == "prometheus"
    assert backlog["metadata"]["query"] == 'sum(inflow_backlog_seconds{job="inflow"})'
    assert float(backlog["metadata"]["threshold"]) > 0
    meta = trigger["metadata"]
    assert meta["bootstrapServers"] == config["INFLOW_KAFKA_BOOTSTRAP"]
    assert meta["consumerGroup"] == config.get("INFLOW_APP_ID", DEFAULTS.app_id) == "inflow"
    assert meta["topic"] == config.get("INFLOW_TEXTS_TOPIC", DEFAULTS.texts_topic)
    assert int(meta["lagThreshold"]) > 0
    # KEDA reads the lag with the workers' Kafka security
    protocol = config.get("INFLOW_KAFKA_SECURITY_PROTOCOL", "PLAINTEXT")
    assert meta.get("tls", "disable") == ("enable" if protocol.endswith("SSL") else "disable")
    expected_sasl = (
        KEDA_SASL[config.get("INFLOW_KAFKA_SASL_MECHANISM", "PLAIN")]
        if protocol.startswith("SASL")
        else "none"
    )
    assert meta.get("sasl", "none") == expected_sasl
    auth = one("TriggerAuthentication", trigger["authenticationRef"]["name"])
    secret = one("Secret", "inflow-secrets")
    refs = {ref["parameter"]: ref for ref in auth["spec"]["secretTargetRef"]}
    assert set(refs) == ({"username", "password"} if expected_sasl != "none" else set())
    for ref in refs.values():
        assert ref["name"] == secret["metadata"]["name"]
        assert ref["key"] in secret["stringData"]


def test_ops_jobs_are_one_offs_on_the_same_registry(config: dict[str, str]) -> None:
    for file, image in (
        ("ops/engine-build-version.yaml", "inflow-build"),
        ("ops/engine-admin.yaml", "inflow"),
    ):
        job = one("Job", file=file)
        assert "generateName" in job["metadata"] and "name" not in job["metadata"], file
        (ctr,) = pod_spec(job)["containers"]
        assert ctr["image"].partition(":")[0] == image, file
        mount = mount_of(job, ctr, "inflow-engines")
        assert config["INFLOW_ENGINE_DIR"].startswith(mount["mountPath"] + "/"), file
