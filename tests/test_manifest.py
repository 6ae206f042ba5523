"""Manifest parsing and validation (`shoal.manifest`): specs, every problem at once, lines."""

from __future__ import annotations

import io
import json
import os
import shutil
import time
from pathlib import Path

import pytest

from shoal import manifest, model
from shoal.errors import ManifestError
from shoal.manifest import MAX_DOCUMENT_BYTES, load_paths, parse_cpu, parse_memory, parse_raw, parse_text

DATA = Path(__file__).parent / "testdata" / "manifests"
SEED_DEPLOYMENT = (DATA / "seed-deployment.yaml").read_text()
SEED_SERVICE = (DATA / "seed-service.yaml").read_text()


def problems(text: str | bytes, source: str = "m.yaml") -> list[str]:
    with pytest.raises(ManifestError) as info:
        parse_text(text, source)
    assert str(info.value) == "\n".join(str(p) for p in info.value.problems)
    return [str(p) for p in info.value.problems]


def seed_with(old: str, new: str, text: str = SEED_DEPLOYMENT) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


# ----------------------------------------------------------------------------- specs


def test_seed_example_parses_to_the_right_specs() -> None:
    docs = load_paths([str(DATA / "seed-deployment.yaml"), str(DATA / "seed-service.yaml")])
    assert [(d.kind, d.name, d.line) for d in docs] == [
        ("Deployment", "hello-world", 1),
        ("Service", "hello-world", 1),
    ]
    assert docs[0].spec == model.DeploymentSpec(
        name="hello-world",
        replicas=3,
        selector=(("app", "hello-world"),),
        template_labels=(("app", "hello-world"),),
        container=model.Container(
            name="hello-world",
            image="shoal-hello:1.0",
            ports=(model.ContainerPort(container_port=8080),),
        ),
    )
    assert docs[1].spec == model.ServiceSpec(
        name="hello-world",
        selector=(("app", "hello-world"),),
        ports=(model.ServicePort(port=80, target_port=8080, protocol="TCP"),),
        type="LoadBalancer",
    )
    assert docs[0].source == str(DATA / "seed-deployment.yaml")
    assert docs[1].raw == {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "hello-world"},
        "spec": {
            "selector": {"app": "hello-world"},
            "ports": [{"protocol": "TCP", "port": 80, "targetPort": 8080}],
            "type": "LoadBalancer",
        },
    }


def test_the_seed_placeholder_image_is_refused() -> None:
    text = seed_with("shoal-hello:1.0", "<your-docker-image>")  # the seed as published
    assert problems(text, "deployment.yaml") == [
        "deployment.yaml:17: spec.template.spec.containers[0].image: must be an image reference like "
        'nginx:1.27 or registry:5000/team/app@sha256:..., got "<your-docker-image>"'
    ]


def test_full_manifest_maps_every_field() -> None:
    api, svc, grpc = parse_text((DATA / "full.yaml").read_text(), "full.yaml")
    assert (api.line, svc.line, grpc.line) == (2, 75, 98)
    assert api.spec == model.DeploymentSpec(
        name="api",
        replicas=5,
        labels=(("app", "api"), ("tier", "backend")),  # sorted by key
        # the template's shoal.io/ annotations join the Deployment's: every knob in one place
        annotations=(
            ("shoal.io/driver", "process"),
            ("shoal.io/placement", "spread"),
            ("shoal.io/weight", "3"),
            ("team.example.com/owner", "payments"),
        ),
        selector=(("app", "api"),),
        template_labels=(("app", "api"), ("version", "1.2")),
        template_annotations=(("shoal.io/driver", "process"), ("shoal.io/weight", "3")),
        container=model.Container(
            name="api",
            image="",
            command=("python3", "-m", "http.server"),
            args=("8080",),
            env=(("MODE", "production"), ("EMPTY", "")),
            ports=(
                model.ContainerPort(container_port=8080, name="http"),
                model.ContainerPort(container_port=9090, name="metrics", protocol="UDP"),
            ),
            requests=model.Resources(cpu_millis=250, memory_bytes=64 * 2**20),
            limits=model.Resources(cpu_millis=1000, memory_bytes=10**9),
            liveness_probe=model.Probe(
                kind=model.ProbeKind.HTTP,
                port=8080,  # the container port named "http"
                path="/healthz",
                initial_delay_seconds=2.0,
                period_seconds=5.0,
            ),
            readiness_probe=model.Probe(
                kind=model.ProbeKind.TCP, port=8080, success_threshold=2, failure_threshold=1, timeout_seconds=3.0
            ),
            startup_probe=model.Probe(kind=model.ProbeKind.EXEC, command=("test", "-f", "/tmp/ready")),
        ),
        node_selector=(("disk", "ssd"),),
        strategy="RollingUpdate",
        rolling_update=model.RollingUpdate(max_surge=1, max_unavailable="0%"),
        driver=model.Driver.PROCESS,
        placement=model.Placement.SPREAD,
        revision_history_limit=3,
        min_ready_seconds=5,
        progress_deadline_seconds=120,
    )
    assert api.spec.weight == 3
    assert svc.spec == model.ServiceSpec(
        name="api",
        selector=(("app", "api"),),
        ports=(
            model.ServicePort(port=80, target_port="http", name="web", node_port=30080),
            model.ServicePort(port=8081, target_port=8081, name="admin"),  # targetPort defaults to port
        ),
        type="NodePort",
        labels=(("app", "api"),),
        annotations=(("shoal.io/balance", "weighted"),),
        algorithm=model.Algorithm.WEIGHTED,
    )
    assert isinstance(grpc.spec, model.DeploymentSpec)
    assert grpc.spec.strategy == "Recreate"
    assert grpc.spec.weight == 1
    assert grpc.spec.container.readiness_probe == model.Probe(
        kind=model.ProbeKind.GRPC, port=50051, service="shoal.Health"
    )


def test_raw_round_trips_through_json_to_the_identical_spec() -> None:
    docs = parse_text((DATA / "full.yaml").read_text(), "full.yaml")
    docs += parse_text(SEED_DEPLOYMENT + "---\n" + SEED_SERVICE, "seed.yaml")
    for doc in docs:
        stored = json.loads(json.dumps(doc.raw, sort_keys=True))  # what the server keeps
        assert stored == doc.raw
        assert parse_raw(stored) == doc.spec


def test_status_is_ignored_and_left_out_of_raw() -> None:
    (doc,) = parse_text(SEED_DEPLOYMENT + "status:\n  replicas: 3\n  conditions: [{type: Available}]\n", "d.yaml")
    assert "status" not in doc.raw
    assert parse_raw(doc.raw) == doc.spec


def test_parse_raw_reports_problems_without_lines() -> None:
    (doc,) = parse_text(SEED_DEPLOYMENT, "d.yaml")
    raw = json.loads(json.dumps(doc.raw))
    raw["spec"]["replicas"] = "three"
    raw["spec"]["paused"] = True
    with pytest.raises(ManifestError) as info:
        parse_raw(raw)
    assert str(info.value).splitlines() == [
        "<stored>: spec.paused: field not supported by shoal",
        '<stored>: spec.replicas: must be an integer >= 0, got "three"',
    ]


def test_anchors_and_merge_keys_work_and_explicit_keys_win() -> None:
    text = """\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  labels: &labels
    app: web
spec:
  selector:
    matchLabels: *labels
  template:
    metadata:
      labels:
        <<: *labels
        tier: front
    spec:
      containers:
      - &c
        name: web
        image: nginx
      - <<: *c
        name: sidecar
"""
    assert problems(text) == [
        "m.yaml:16: spec.template.spec.containers: shoal runs one container per replica, got 2 containers"
    ]
    (doc,) = parse_text(text.split("      - <<: *c")[0], "m.yaml")
    assert isinstance(doc.spec, model.DeploymentSpec)
    assert doc.spec.template_labels == (("app", "web"), ("tier", "front"))
    assert doc.raw["spec"]["template"]["metadata"]["labels"] == {"app": "web", "tier": "front"}


def test_merge_keys_follow_yaml_precedence() -> None:
    text = seed_with(
        "  selector:\n    app: hello-world\n",
        "  selector:\n    <<: [{app: hello-world, a: first}, {a: second, b: second}]\n    b: mine\n",
        SEED_SERVICE,
    )
    (doc,) = parse_text(text, "m.yaml")
    assert isinstance(doc.spec, model.ServiceSpec)
    assert doc.spec.selector == (("a", "first"), ("app", "hello-world"), ("b", "mine"))
    bad = seed_with("  selector:\n    app: hello-world\n", "  selector:\n    <<: 3\n    app: a\n", SEED_SERVICE)
    assert problems(bad) == ['m.yaml:7: spec.selector["<<"]: must be a mapping or a list of mappings']


def test_json_with_tab_indentation_is_accepted() -> None:
    docs = load_paths([str(DATA / "dir" / "c-service.json")])
    assert "\t" in (DATA / "dir" / "c-service.json").read_text()
    assert [d.name for d in docs] == ["hello-json"]


def test_driver_annotation_on_deployment_metadata_and_weight_default() -> None:
    text = seed_with("  name: hello-world\n", "  name: hello-world\n  annotations:\n    shoal.io/driver: process\n")
    text = seed_with("        image: shoal-hello:1.0\n", "        command: [./hello]\n", text)
    (doc,) = parse_text(text, "m.yaml")
    assert isinstance(doc.spec, model.DeploymentSpec)
    assert doc.spec.driver is model.Driver.PROCESS
    assert doc.spec.container.image == ""
    assert doc.spec.container.command == ("./hello",)
    assert doc.spec.weight == 1


@pytest.mark.parametrize(
    ("balance", "dataplane", "algorithm", "plane"),
    [
        (None, None, model.Algorithm.ROUND_ROBIN, model.DataPlane.PROXY),
        (None, "kernel", model.Algorithm.ROUND_ROBIN, model.DataPlane.KERNEL),
        ("random", "kernel", model.Algorithm.RANDOM, model.DataPlane.KERNEL),
        ("round_robin", "kernel", model.Algorithm.ROUND_ROBIN, model.DataPlane.KERNEL),
        ("least_conn", "proxy", model.Algorithm.LEAST_CONN, model.DataPlane.PROXY),
    ],
)
def test_service_dataplane_annotation(balance: str | None, dataplane: str | None, algorithm: model.Algorithm,
                                      plane: model.DataPlane) -> None:
    notes = "".join(f"    {k}: {v}\n" for k, v in (("shoal.io/balance", balance), ("shoal.io/dataplane", dataplane)) if v)
    text = seed_with("  name: hello-world\n", f"  name: hello-world\n  annotations:\n{notes}", SEED_SERVICE) if notes else SEED_SERVICE
    (doc,) = parse_text(text, "m.yaml")
    assert isinstance(doc.spec, model.ServiceSpec)
    assert (doc.spec.algorithm, doc.spec.dataplane) == (algorithm, plane)


@pytest.mark.parametrize("algorithm", sorted(set(model.Algorithm) - model.KERNEL_ALGORITHMS, key=lambda a: a.value))
def test_kernel_dataplane_refuses_every_algorithm_nftables_cannot_do(algorithm: model.Algorithm) -> None:
    text = seed_with("  name: hello-world\n", "  name: hello-world\n  annotations:\n    shoal.io/dataplane: kernel\n"
                     f"    shoal.io/balance: {algorithm.value}\n", SEED_SERVICE)
    (problem,) = problems(text)
    assert problem.startswith('m.yaml:6: metadata.annotations["shoal.io/dataplane"]: the kernel data plane balances')
    assert f"not {algorithm.value}:" in problem


def _service(annotations: str = "", port_extra: str = "") -> str:
    text = SEED_SERVICE
    if annotations:
        text = seed_with("  name: hello-world\n", f"  name: hello-world\n  annotations:\n{annotations}", text)
    if port_extra:
        text = seed_with("      targetPort: 8080\n", f"      targetPort: 8080\n{port_extra}", text)
    return text


@pytest.mark.parametrize(
    ("annotations", "port_extra", "app_protocol", "hash_header"),
    [
        ("", "", model.AppProtocol.TCP, ""),
        ("    shoal.io/protocol: http\n", "", model.AppProtocol.HTTP, ""),
        ("", "      appProtocol: http\n", model.AppProtocol.HTTP, ""),
        ("    shoal.io/protocol: http\n", "      appProtocol: tcp\n", model.AppProtocol.TCP, ""),  # the port wins
        ("    shoal.io/protocol: http\n    shoal.io/balance: consistent_hash\n    shoal.io/hash-header: X-User\n",
         "", model.AppProtocol.HTTP, "X-User"),
    ],
)
def test_service_port_app_protocol_and_hash_header(annotations: str, port_extra: str,
                                                   app_protocol: model.AppProtocol, hash_header: str) -> None:
    (doc,) = parse_text(_service(annotations, port_extra), "m.yaml")
    assert isinstance(doc.spec, model.ServiceSpec)
    assert [p.app_protocol for p in doc.spec.ports] == [app_protocol]
    assert doc.spec.hash_header == hash_header
    assert parse_raw(json.loads(json.dumps(doc.raw))) == doc.spec


@pytest.mark.parametrize(
    ("annotations", "port_extra", "expected"),
    [
        ("", "      appProtocol: h2c\n", 'm.yaml:12: spec.ports[0].appProtocol: must be one of tcp, http, got "h2c"'),
        ("    shoal.io/protocol: HTTP\n", "",
         'm.yaml:6: metadata.annotations["shoal.io/protocol"]: must be one of tcp, http, got "HTTP"'),
        ("    shoal.io/dataplane: kernel\n", "      appProtocol: http\n",
         "m.yaml:14: spec.ports[0].appProtocol: http needs the proxy (the kernel data plane forwards TCP and cannot "
         "parse HTTP): remove shoal.io/dataplane: kernel, or use tcp"),
        ("    shoal.io/dataplane: kernel\n    shoal.io/protocol: http\n", "",
         'm.yaml:7: metadata.annotations["shoal.io/protocol"]: http needs the proxy (the kernel data plane forwards '
         "TCP and cannot parse HTTP): remove shoal.io/dataplane: kernel, or use tcp"),
        ("    shoal.io/protocol: http\n    shoal.io/hash-header: X-User\n", "",
         'm.yaml:7: metadata.annotations["shoal.io/hash-header"]: only used with shoal.io/balance: consistent_hash'),
        ("    shoal.io/balance: consistent_hash\n    shoal.io/hash-header: X-User\n", "",
         'm.yaml:7: metadata.annotations["shoal.io/hash-header"]: only used on http ports (set appProtocol: http '
         "or shoal.io/protocol: http)"),
        ("    shoal.io/balance: consistent_hash\n    shoal.io/hash-header: X User\n", "",
         'm.yaml:7: metadata.annotations["shoal.io/hash-header"]: must be an HTTP header name (letters, digits '
         'and -, at most 64), got "X User"'),
    ],
)
def test_app_protocol_and_hash_header_mistakes(annotations: str, port_extra: str, expected: str) -> None:
    assert problems(_service(annotations, port_extra)) == [expected]


def test_protocol_annotations_belong_to_services() -> None:
    text = seed_with("  name: hello-world\n", "  name: hello-world\n  annotations:\n    shoal.io/protocol: http\n")
    assert any('shoal.io/protocol"]: applies to a Service, not a Deployment' in p for p in problems(text))


# -------------------------------------------------------------------------- problems


def test_a_manifest_with_many_mistakes_reports_all_of_them_with_lines() -> None:
    with pytest.raises(ManifestError) as info:
        load_paths([str(DATA / "mistakes.yaml")])
    src = str(DATA / "mistakes.yaml")
    c = "spec.template.spec.containers[0]"
    assert str(info.value).splitlines() == [
        f"{src}:5: metadata.name: must be a DNS-1123 label (at most 63 lowercase letters, digits and '-', "
        'starting and ending with a letter or digit), got "Web_App"',
        f'{src}:7: metadata.annotations["shoal.io/balance"]: applies to a Service, not a Deployment',
        f'{src}:8: metadata.annotations["shoal.io/colour"]: unknown shoal annotation '
        "(known: shoal.io/balance, shoal.io/dataplane, shoal.io/driver, shoal.io/hash-header, shoal.io/placement, shoal.io/protocol, shoal.io/weight)",
        f"{src}:10: spec.replicas: must be an integer >= 0, got -1",
        f'{src}:18: spec.template.metadata.labels.version: must be a string, got 2 (quote it: "2")',
        f"{src}:23: {c}.imagePullPolicy: field not supported by shoal",
        f"{src}:26: {c}.env[0].valueFrom: field not supported by shoal",
        f'{src}:28: {c}.ports[0].containerPort: must be an integer between 1 and 65535, got "80a"',
        f'{src}:32: {c}.resources.requests.cpu: must be a CPU quantity such as 500m, 0.5 or 2, got "2 cores"',
        f'{src}:33: {c}.resources.requests.memory: must be a whole number of bytes, got "128m" '
        '("m" means thousandths; did you mean "128Mi"?)',
        f"{src}:36: {c}.livenessProbe.successThreshold: must be 1 for a livenessProbe, got 2",
        f"{src}:37: {c}.volumeMounts: field not supported by shoal",
        f'{src}:44: metadata.annotations["shoal.io/balance"]: must be one of round_robin, random, weighted, least_conn, p2c_ewma, consistent_hash, '
        'got "fastest"',
        f"{src}:50: spec.ports[0].name: required when a service has more than one port",
        f"{src}:52: spec.ports[0].nodePort: only allowed when type is NodePort or LoadBalancer",
        f"{src}:55: spec.ports[1].protocol: UDP is not supported by shoal yet (the service proxy forwards TCP)",
    ]
    first = info.value.problems[0]
    assert (first.source, first.line, first.path) == (src, 5, "metadata.name")


C0 = "spec.template.spec.containers[0]"

ONE_LINE_CASES = [
    pytest.param("", "m.yaml: no documents (the input is empty or only comments)", id="empty"),
    pytest.param("# only\n---\n---\n", "m.yaml: no documents (the input is empty or only comments)", id="comments"),
    pytest.param(
        "apiVersion: v1\nkind: Service\n  metadata: x: y\n",
        "m.yaml:3: not valid YAML: mapping values are not allowed here",
        id="not-yaml",
    ),
    pytest.param(b"kind: \xff\n", "m.yaml:1: not valid YAML: invalid start byte: 0xff", id="not-utf8"),
    pytest.param(
        "- a\n- b\n",
        "m.yaml:1: a manifest document must be a mapping with apiVersion, kind, metadata and spec, got a list",
        id="list-document",
    ),
    pytest.param(
        "just words\n",
        "m.yaml:1: a manifest document must be a mapping with apiVersion, kind, metadata and spec, "
        'got a single value "just words"',
        id="scalar-document",
    ),
    pytest.param(
        seed_with("  replicas: 3\n", "  replicas: 3\n  replicas: 4\n"),
        "m.yaml:7: spec.replicas: duplicate key (first at line 6)",
        id="duplicate-key",
    ),
    pytest.param(
        seed_with("kind: Deployment", "kind: StatefulSet"),
        'm.yaml:2: kind: must be Deployment or Service, got "StatefulSet"',
        id="unknown-kind",
    ),
    pytest.param(
        seed_with("kind: Deployment\n", ""), "m.yaml:1: kind: required (Deployment or Service)", id="no-kind"
    ),
    pytest.param(
        seed_with("apiVersion: apps/v1", "apiVersion: apps/v1beta1"),
        'm.yaml:1: apiVersion: must be apps/v1 for a Deployment, got "apps/v1beta1"',
        id="bad-api-version",
    ),
    pytest.param(
        seed_with("apiVersion: v1", "apiVersion: apps/v1", SEED_SERVICE),
        'm.yaml:1: apiVersion: must be v1 for a Service, got "apps/v1"',
        id="service-api-version",
    ),
    pytest.param(
        seed_with("apiVersion: apps/v1\n", ""),
        "m.yaml:1: apiVersion: required: apps/v1 for a Deployment",
        id="no-api-version",
    ),
    pytest.param(
        SEED_DEPLOYMENT + "---\n" + SEED_DEPLOYMENT,
        'm.yaml:24: metadata.name: Deployment "hello-world" is also defined at m.yaml:4',
        id="same-kind-and-name-twice",
    ),
    pytest.param(
        seed_with("        - containerPort: 8080\n", "        - containerPort: 8080\n      - name: log\n        image: busybox\n"),
        f"m.yaml:15: spec.template.spec.containers: shoal runs one container per replica, got 2 containers",
        id="two-containers",
    ),
    pytest.param(
        seed_with("      app: hello-world\n  template", "      app: hello\n  template"),
        "m.yaml:8: spec.selector.matchLabels: does not match the template's labels: app=hello "
        "not in spec.template.metadata.labels",
        id="selector-mismatch",
    ),
    pytest.param(
        seed_with("  name: hello-world\n", "  name: hello-world\n  namespace: prod\n"),
        'm.yaml:5: metadata.namespace: must be "default" (shoal has one namespace), got "prod"',
        id="namespace",
    ),
    pytest.param(
        seed_with("  name: hello-world\n", "  name: " + "a" * 64 + "\n"),
        "m.yaml:4: metadata.name: must be a DNS-1123 label (at most 63 lowercase letters, digits and '-', "
        f'starting and ending with a letter or digit), got "{"a" * 57}..."',
        id="name-too-long",
    ),
    pytest.param(
        seed_with("        image: shoal-hello:1.0\n", ""),
        f"m.yaml:16: {C0}.image: required (or set shoal.io/driver: process and give a command)",
        id="docker-needs-image",
    ),
    pytest.param(
        seed_with("    metadata:\n", "    metadata:\n      annotations: {shoal.io/driver: process}\n").replace(
            "        image: shoal-hello:1.0\n", ""
        ),
        f"m.yaml:17: {C0}.command: required with shoal.io/driver: process (no image supplies one)",
        id="process-needs-command",
    ),
    pytest.param(
        seed_with("  name: hello-world\n", "  name: hello-world\n  annotations: {shoal.io/driver: docker}\n")
        .replace("    metadata:\n", "    metadata:\n      annotations: {shoal.io/driver: process}\n"),
        'm.yaml:13: spec.template.metadata.annotations["shoal.io/driver"]: "process" contradicts '
        'metadata.annotations["shoal.io/driver"] ("docker")',
        id="driver-conflict",
    ),
    pytest.param(
        seed_with("    metadata:\n", "    metadata:\n      annotations: {shoal.io/weight: \"0\"}\n"),
        'm.yaml:12: spec.template.metadata.annotations["shoal.io/weight"]: must be a positive integer '
        '(as a string, e.g. "3"), got "0"',
        id="weight-zero",
    ),
    pytest.param(
        seed_with("  name: hello-world\n", "  name: hello-world\n  annotations: {shoal.io/weight: \"2\"}\n"),
        'm.yaml:5: metadata.annotations["shoal.io/weight"]: belongs in the Deployment\'s '
        "spec.template.metadata.annotations (it weighs each replica)",
        id="weight-on-deployment",
    ),
    pytest.param(
        seed_with("  name: hello-world\n", "  name: hello-world\n  annotations: {shoal.io/placement: random}\n"),
        'm.yaml:5: metadata.annotations["shoal.io/placement"]: must be one of binpack, spread, got "random"',
        id="placement-value",
    ),
    pytest.param(
        seed_with("  name: hello-world\n", "  name: hello-world\n  annotations: {shoal.io/driver: process}\n", SEED_SERVICE),
        'm.yaml:5: metadata.annotations["shoal.io/driver"]: applies to a Deployment (metadata or '
        "spec.template.metadata), not a Service",
        id="driver-on-service",
    ),
    pytest.param(
        seed_with("  replicas: 3", "  replicas: !!python/object/apply:os.system [ls]"),
        "m.yaml:6: spec.replicas: YAML tag !!python/object/apply:os.system is not supported",
        id="unsafe-tag",
    ),
    pytest.param(
        seed_with("  name: hello-world", "  name: !custom hello-world"),  # no "name: required" as well
        "m.yaml:4: metadata.name: YAML tag !custom is not supported",
        id="custom-tag",
    ),
    pytest.param(
        seed_with("  replicas: 3", "  replicas: .inf"),
        "m.yaml:6: spec.replicas: must be a finite number, got .inf",
        id="infinity",
    ),
    pytest.param(
        seed_with("  replicas: 3", "  replicas: 3.0"),
        "m.yaml:6: spec.replicas: must be an integer >= 0, got 3.0",
        id="float-replicas",
    ),
    pytest.param(
        seed_with("  replicas: 3", "  replicas: 3000000000"),
        "m.yaml:6: spec.replicas: must be at most 2147483647, got 3000000000",
        id="huge-replicas",
    ),
    pytest.param(
        seed_with("    matchLabels:\n      app: hello-world\n", "    matchExpressions: []\n"),
        "m.yaml:8: spec.selector.matchExpressions: field not supported by shoal",
        id="match-expressions",
    ),
    pytest.param(
        seed_with("containerPort", "containerport"),
        f"m.yaml:19: {C0}.ports[0].containerport: field not supported by shoal (did you mean containerPort?)\n"
        f"m.yaml:19: {C0}.ports[0].containerPort: required",
        id="typo-suggestion",
    ),
    pytest.param(
        seed_with("        - containerPort: 8080\n", "        - containerPort: 8080\n        livenessProbe: {periodSeconds: 5}\n"),
        f"m.yaml:20: {C0}.livenessProbe: needs exactly one handler: httpGet, tcpSocket, exec or grpc",
        id="probe-without-handler",
    ),
    pytest.param(
        seed_with(
            "        - containerPort: 8080\n",
            "        - containerPort: 8080\n        readinessProbe:\n          tcpSocket: {port: 8080}\n"
            "          exec: {command: [true]}\n",
        ),
        f"m.yaml:20: {C0}.readinessProbe: needs exactly one handler: httpGet, tcpSocket, exec or grpc "
        "(got tcpSocket, exec)",
        id="probe-two-handlers",
    ),
    pytest.param(
        seed_with(
            "        - containerPort: 8080\n",
            "        - containerPort: 8080\n          name: web\n        readinessProbe:\n"
            "          httpGet: {port: http}\n          periodSeconds: 0\n",
        ),
        f'm.yaml:22: {C0}.readinessProbe.httpGet.port: no port named "http" in this container '
        "(its ports are named web)\n"
        f"m.yaml:23: {C0}.readinessProbe.periodSeconds: must be an integer >= 1, got 0",
        id="probe-port-name",
    ),
    pytest.param(
        seed_with("        - containerPort: 8080\n", "        - containerPort: 8080\n          hostPort: 80\n"),
        f"m.yaml:20: {C0}.ports[0].hostPort: field not supported by shoal",
        id="host-port",
    ),
    pytest.param(
        seed_with(
            "        - containerPort: 8080\n",
            "        - containerPort: 8080\n        resources:\n          requests: {cpu: 2}\n"
            "          limits: {cpu: 500m, nvidia.com/gpu: 1}\n",
        ),
        f"m.yaml:21: {C0}.resources.requests.cpu: must be less than or equal to the cpu limit \"500m\", got 2\n"
        f'm.yaml:22: {C0}.resources.limits["nvidia.com/gpu"]: field not supported by shoal',
        id="requests-over-limits",
    ),
    pytest.param(
        seed_with("  replicas: 3\n", "  replicas: 3\n  strategy:\n    type: Recreate\n    rollingUpdate: {maxSurge: 1}\n"),
        "m.yaml:9: spec.strategy.rollingUpdate: not allowed when strategy.type is Recreate",
        id="recreate-with-rolling-update",
    ),
    pytest.param(
        seed_with("  replicas: 3\n", "  replicas: 3\n  strategy:\n    rollingUpdate: {maxSurge: 0, maxUnavailable: 0%}\n"),
        "m.yaml:8: spec.strategy.rollingUpdate.maxUnavailable: may not be 0 when maxSurge is 0 "
        "(the rollout could never progress)",
        id="rolling-update-zero",
    ),
    pytest.param(
        seed_with("  replicas: 3\n", "  replicas: 3\n  strategy:\n    rollingUpdate: {maxSurge: \"1\", maxUnavailable: 120%}\n"),
        'm.yaml:8: spec.strategy.rollingUpdate.maxSurge: must be an integer >= 0 or a percentage like "25%", '
        'got "1"\n'
        "m.yaml:8: spec.strategy.rollingUpdate.maxUnavailable: must be an integer >= 0 or a percentage like "
        '"25%" up to 100%, got "120%"',
        id="rolling-update-values",
    ),
    pytest.param(
        seed_with("  replicas: 3\n", "  replicas: 3\n  minReadySeconds: 900\n"),
        "m.yaml:7: spec.minReadySeconds: progressDeadlineSeconds (default 600) must be greater than minReadySeconds",
        id="min-ready-over-deadline",
    ),
    pytest.param(
        seed_with("      targetPort: 8080\n", "      targetPort: 8080\n    - port: 81\n      name: b\n", SEED_SERVICE),
        "m.yaml:9: spec.ports[0].name: required when a service has more than one port",
        id="service-ports-need-names",
    ),
    pytest.param(
        seed_with("protocol: TCP", "protocol: UDP", SEED_SERVICE),
        "m.yaml:9: spec.ports[0].protocol: UDP is not supported by shoal yet (the service proxy forwards TCP)",
        id="service-udp",
    ),
    pytest.param(
        seed_with("      targetPort: 8080\n", "      targetPort: 8080\n      nodePort: 80\n", SEED_SERVICE),
        "m.yaml:12: spec.ports[0].nodePort: must be an integer between 30000 and 32767, got 80",
        id="node-port-range",
    ),
    pytest.param(
        seed_with("targetPort: 8080", "targetPort: '8080'", SEED_SERVICE),
        'm.yaml:11: spec.ports[0].targetPort: must be a port number between 1 and 65535 or a container port '
        'name, got "8080"',
        id="target-port-string-number",
    ),
    pytest.param(
        seed_with("LoadBalancer", "ExternalName", SEED_SERVICE),
        'm.yaml:12: spec.type: must be one of ClusterIP, NodePort, LoadBalancer, got "ExternalName"',
        id="service-type",
    ),
    pytest.param(
        seed_with("  selector:\n    app: hello-world\n", "", SEED_SERVICE),
        "m.yaml:5: spec.selector: required: the labels of the replicas this service sends traffic to",
        id="service-without-selector",
    ),
    pytest.param(
        SEED_SERVICE + "  clusterIP: None\n",
        "m.yaml:13: spec.clusterIP: field not supported by shoal",
        id="service-unknown-field",
    ),
    pytest.param(
        seed_with("  name: hello-world\n", "  name: hello-world\n  annotations:\n    shoal.io/balance: least_conn\n"
                  "    shoal.io/dataplane: kernel\n", SEED_SERVICE),
        'm.yaml:7: metadata.annotations["shoal.io/dataplane"]: the kernel data plane balances with round_robin or '
        "random only (nftables numgen), not least_conn: set shoal.io/balance to one of those, or remove "
        "shoal.io/dataplane to use the proxy, which has every algorithm",
        id="kernel-dataplane-least-conn",
    ),
    pytest.param(
        seed_with("  name: hello-world\n", "  name: hello-world\n  annotations:\n    shoal.io/dataplane: ebpf\n",
                  SEED_SERVICE),
        'm.yaml:6: metadata.annotations["shoal.io/dataplane"]: must be one of proxy, kernel, got "ebpf"',
        id="dataplane-unknown",
    ),
    pytest.param(
        seed_with("  name: hello-world\n", "  name: hello-world\n  annotations:\n    shoal.io/dataplane: kernel\n"),
        'm.yaml:6: metadata.annotations["shoal.io/dataplane"]: applies to a Service, not a Deployment',
        id="dataplane-on-deployment",
    ),
    pytest.param(
        "a: &a [x,x,x,x,x,x,x,x,x,x]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b]\n"
        "d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c]\ne: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d]\nf: [*e,*e,*e,*e,*e,*e,*e,*e,*e,*e]\n",
        "m.yaml:1: more than 100000 values once YAML aliases are expanded",
        id="billion-laughs",
    ),
    pytest.param("a: &x [1, *x]\n", "m.yaml:1: nested more than 64 levels deep", id="recursive-alias"),
    # The scanner is quadratic in flow depth and the composer recursive: refused early.
    pytest.param("[" * 1_000_000, "m.yaml:1: not valid YAML: nested more than 64 levels deep", id="deep-flow"),
    pytest.param("- " * 500_000, "m.yaml:1: not valid YAML: nested more than 64 levels deep", id="deep-block"),
]


@pytest.mark.parametrize(("text", "expected"), ONE_LINE_CASES)
def test_each_mistake_gives_clear_lines(text: str | bytes, expected: str) -> None:
    assert problems(text) == expected.splitlines()


def test_input_over_the_limit_is_refused_quickly_without_parsing(tmp_path: Path) -> None:
    big = "a: [" + "1, " * (10 * 1024 * 1024 // 3) + "1]\n"  # 10 MB, valid YAML
    expected = "larger than the 1 MiB limit (1048576 bytes) for one file; split it into several files"
    start = time.perf_counter()
    assert problems(big, "big.yaml") == [f"big.yaml: {expected}"]
    assert problems(big.encode(), "big.yaml") == [f"big.yaml: {expected}"]
    path = tmp_path / "big.yaml"
    path.write_text(big)
    with pytest.raises(ManifestError) as from_file:
        load_paths([str(path)])
    with pytest.raises(ManifestError) as from_stdin:
        load_paths(["-"], stdin=io.BytesIO(big.encode()))
    assert time.perf_counter() - start < 1.0
    assert str(from_file.value) == f"{path}: {expected}"
    assert str(from_stdin.value) == f"<stdin>: {expected}"


def test_the_limit_counts_bytes_not_characters() -> None:
    padding = "é" * (MAX_DOCUMENT_BYTES // 2 + 1)  # fewer characters than the limit, more bytes
    assert len(padding) < MAX_DOCUMENT_BYTES < len(padding.encode())
    assert problems(f"# {padding}\n") == [
        "m.yaml: larger than the 1 MiB limit (1048576 bytes) for one file; split it into several files"
    ]


# --------------------------------------------------------------------------- loading


def test_directory_loads_its_manifests_sorted_and_not_recursively() -> None:
    docs = load_paths([str(DATA / "dir")])
    assert [(os.path.basename(d.source), d.kind, d.name) for d in docs] == [
        ("a-deployment.yaml", "Deployment", "hello-world"),
        ("b-service.yml", "Service", "hello-world"),
        ("c-service.json", "Service", "hello-json"),
    ]


def test_stdin_as_text_or_bytes() -> None:
    for stream in (io.StringIO(SEED_SERVICE), io.BytesIO(SEED_SERVICE.encode())):
        (doc,) = load_paths(["-"], stdin=stream)
        assert (doc.source, doc.kind, doc.line) == ("<stdin>", "Service", 1)


def test_files_dirs_and_stdin_are_one_apply(tmp_path: Path) -> None:
    shutil.copy(DATA / "seed-service.yaml", tmp_path / "svc.yaml")
    with pytest.raises(ManifestError) as info:
        load_paths([str(tmp_path), "-"], stdin=io.StringIO(SEED_DEPLOYMENT + "---\n" + SEED_SERVICE))
    assert str(info.value) == f'<stdin>:24: metadata.name: Service "hello-world" is also defined at {tmp_path}/svc.yaml:4'


def test_problems_from_every_file_are_reported_sorted_by_source_then_line(tmp_path: Path) -> None:
    (tmp_path / "b.yaml").write_text(seed_with("  replicas: 3", "  replicas: many"))
    (tmp_path / "a.yaml").write_text(seed_with("  type: LoadBalancer", "  type: Magic", SEED_SERVICE).replace("port: 80", "port: 0"))
    (tmp_path / "empty.yml").write_text("")
    with pytest.raises(ManifestError) as info:
        load_paths([str(tmp_path / "b.yaml"), str(tmp_path), str(tmp_path / "missing.yaml")])
    t = str(tmp_path)
    assert str(info.value).splitlines() == [
        f"{t}/a.yaml:10: spec.ports[0].port: must be an integer between 1 and 65535, got 0",
        f'{t}/a.yaml:12: spec.type: must be one of ClusterIP, NodePort, LoadBalancer, got "Magic"',
        f'{t}/b.yaml:6: spec.replicas: must be an integer >= 0, got "many"',
        f'{t}/b.yaml:6: spec.replicas: must be an integer >= 0, got "many"',  # named twice, parsed twice
        f"{t}/empty.yml: no documents (the input is empty or only comments)",
        f"{t}/missing.yaml: no such file or directory",
    ]


def test_empty_directory_and_no_paths(tmp_path: Path) -> None:
    with pytest.raises(ManifestError) as info:
        load_paths([str(tmp_path)])
    assert str(info.value) == f"{tmp_path}: no .yaml, .yml or .json files in this directory"
    with pytest.raises(ManifestError) as info:
        load_paths([])
    assert str(info.value) == "-f: no manifest file given"


def test_stdin_given_twice() -> None:
    with pytest.raises(ManifestError) as info:
        load_paths(["-", "-"], stdin=io.StringIO(SEED_SERVICE))
    assert str(info.value) == '<stdin>: given more than once ("-")'


# ------------------------------------------------------------------------ quantities


@pytest.mark.parametrize(
    ("value", "millis"),
    [
        ("500m", 500),
        ("0.5", 500),
        (0.5, 500),
        (1, 1000),
        ("1", 1000),
        ("2.25", 2250),
        ("100m", 100),
        ("0.0001", 1),  # rounded up to the millicore, as Kubernetes does
        ("1k", 1_000_000),
        ("1e3", 1_000_000),
        ("0", 0),
        ("+2", 2000),
        (".5", 500),
    ],
)
def test_cpu_quantities(value: object, millis: int) -> None:
    assert parse_cpu(value) == millis


@pytest.mark.parametrize(
    ("value", "size"),
    [
        ("64Mi", 64 * 2**20),
        ("1Gi", 2**30),
        ("1.5Gi", 3 * 2**29),
        ("128M", 128 * 10**6),
        ("1e3", 1000),
        ("1E3", 1000),
        ("1E", 10**18),  # E alone is exa
        (1000, 1000),
        ("1000", 1000),
        ("1Ki", 1024),
        ("1k", 1000),
        ("2Ti", 2 * 2**40),
        ("0", 0),
        ("1000m", 1),
    ],
)
def test_memory_quantities(value: object, size: int) -> None:
    assert parse_memory(value) == size


@pytest.mark.parametrize(
    ("parse", "value", "message"),
    [
        (parse_cpu, "2 cores", 'must be a CPU quantity such as 500m, 0.5 or 2, got "2 cores"'),
        (parse_cpu, "-1", 'must not be negative, got "-1"'),
        (parse_cpu, True, "must be a CPU quantity such as 500m, 0.5 or 2, got true"),
        (parse_cpu, "1e99", 'is out of range, got "1e99"'),
        (parse_cpu, "9" * 80, f'must be a CPU quantity such as 500m, 0.5 or 2, got "{"9" * 57}..."'),
        (parse_memory, "64MB", 'must be a memory quantity such as 64Mi, 1Gi, 128M or 1e3, got "64MB" (did you mean "64Mi"?)'),
        (parse_memory, "1.5", 'must be a whole number of bytes, got "1.5"'),
        (parse_memory, "100Ei", 'is too large, got "100Ei"'),
        (parse_memory, "1e", 'must be a memory quantity such as 64Mi, 1Gi, 128M or 1e3, got "1e"'),
        (parse_memory, "", 'must be a memory quantity such as 64Mi, 1Gi, 128M or 1e3, got ""'),
    ],
)
def test_bad_quantities(parse: object, value: object, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse(value)  # type: ignore[operator]
    assert str(info.value) == message


def test_public_surface() -> None:
    assert set(manifest.__all__) == {
        "MAX_DOCUMENT_BYTES",
        "Document",
        "parse_text",
        "load_paths",
        "parse_raw",
        "parse_cpu",
        "parse_memory",
    }
    assert MAX_DOCUMENT_BYTES == 1024 * 1024
