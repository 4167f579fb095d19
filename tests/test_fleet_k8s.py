"""`llmsup fleet k8s-manifests` (issue 18, item 4), checked offline: the built-in kinds against
Kubernetes' own schemas (kubernetes-validate, strict: an unknown field fails), the CRD kinds
and the endpoint picker's config against schemas written here from the upstream API sources,
and what the objects must mean together: readiness on /health at the pool's target port, a
pool that selects the llmsup pods and nothing else, a picker that reads the gauge names
llmsup's gateway really exports, and a command line that llmsup's own `start` accepts."""

from __future__ import annotations

import jsonschema
import kubernetes_validate
import pytest
import yaml
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from llmsup.supervisor.commands.start import check_http, start
from llmsup.supervisor.fleet import k8s
from llmsup.supervisor.gateway.metrics import Metrics

pytestmark = pytest.mark.timeout(60)

# The oldest Kubernetes the manifests are for (preStop `sleep` is on by default from 1.30)
# and the newest kubernetes-validate 1.37.0 ships.
K8S_VERSIONS = ("1.30.0", "1.37.0")

# --- schemas of the CRD kinds and of the picker's config, covering the fields we write -------
# Enums, bounds and required fields as the Go types' kubebuilder markers state them;
# additionalProperties false so that a misspelt field fails here, not in the cluster.


def obj(*required: str, **properties) -> dict:
    return {
        "type": "object",
        "required": list(required),
        "additionalProperties": False,
        "properties": properties,
    }


def array(items: dict, **bounds) -> dict:
    return {"type": "array", "items": items, **bounds}


def string(pattern: str | None = None, **bounds) -> dict:
    return {"type": "string", **({"pattern": pattern} if pattern else {}), **bounds}


DNS_LABEL = string("^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", maxLength=63)
# Kubernetes' label syntax. (The Go markers of LabelKey escape the dot twice, and a CRD's
# schema cannot check map keys anyway: the API server checks them as label keys.)
LABEL_KEY = string(
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
LABEL_VALUE = string("^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$", maxLength=63)
LABELS = {"type": "object", "propertyNames": LABEL_KEY, "additionalProperties": LABEL_VALUE}
META = obj("name", name=DNS_LABEL, namespace=DNS_LABEL, labels=LABELS)
PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
PORT_REF = obj("number", number=PORT)
GROUP = string(
    r"^$|^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$", maxLength=253
)
KIND = string("^[a-zA-Z]([-a-zA-Z0-9]*[a-zA-Z0-9])?$", maxLength=63)
OBJECT_NAME = string(minLength=1, maxLength=253)

# From Gateway API Inference Extension v1.6.0, api/v1/inferencepool_types.go and
# shared_types.go (InferencePoolSpec, Port, EndpointPickerRef, LabelSelector).
PICKER_REF = obj(
    "name",
    group=GROUP,
    kind=KIND,
    name=OBJECT_NAME,
    port=PORT_REF,
    failureMode={"enum": ["FailOpen", "FailClose"]},
)
# Its CEL rule: a port when the kind is Service, the default.
PICKER_REF["anyOf"] = [
    {"required": ["port"]},
    {"required": ["kind"], "properties": {"kind": {"not": {"const": "Service"}}}},
]
INFERENCE_POOL = obj(
    "apiVersion",
    "kind",
    "metadata",
    "spec",
    apiVersion={"const": "inference.networking.k8s.io/v1"},
    kind={"const": "InferencePool"},
    metadata=META,
    spec=obj(
        "selector",
        "targetPorts",
        selector=obj(
            "matchLabels", matchLabels={**LABELS, "minProperties": 1, "maxProperties": 64}
        ),
        # uniqueItems: its CEL rule, port numbers unique
        targetPorts=array(PORT_REF, minItems=1, maxItems=8, uniqueItems=True),
        appProtocol={"enum": ["http", "kubernetes.io/h2c"]},
        endpointPickerRef=PICKER_REF,
    ),
)

# From Gateway API v1.6.1, apis/v1/httproute_types.go, shared_types.go and
# object_reference_types.go (ParentReference, HTTPRouteRule, HTTPBackendRef, HTTPPathMatch,
# HTTPRouteTimeouts, Duration).
BACKEND_REF = obj(
    "name",
    group=GROUP,
    kind=KIND,
    name=OBJECT_NAME,
    namespace=DNS_LABEL,
    port=PORT,
    weight={"type": "integer", "minimum": 0, "maximum": 1000000},
)
# Its CEL rule: a port for a core Service, the default.
BACKEND_REF["anyOf"] = [
    {"required": ["port"]},
    {"required": ["group"], "not": {"properties": {"group": {"const": ""}}}},
    {"required": ["kind"], "properties": {"kind": {"not": {"const": "Service"}}}},
]
PATH_MATCH = obj(
    type={"enum": ["Exact", "PathPrefix", "RegularExpression"]},
    value=string(maxLength=1024),
)
ROUTE_RULE = obj(
    matches=array(obj(path=PATH_MATCH), maxItems=64),
    backendRefs=array(BACKEND_REF, maxItems=16),
    timeouts=obj(request=string("^([0-9]{1,5}(h|m|s|ms)){1,4}$")),
)
PARENT_REF = obj("name", group=GROUP, kind=KIND, namespace=DNS_LABEL, name=OBJECT_NAME)
HTTP_ROUTE = obj(
    "apiVersion",
    "kind",
    "metadata",
    "spec",
    apiVersion={"const": "gateway.networking.k8s.io/v1"},
    kind={"const": "HTTPRoute"},
    metadata=META,
    spec=obj(
        parentRefs=array(PARENT_REF, maxItems=32),
        rules=array(ROUTE_RULE, minItems=1, maxItems=16),
    ),
)

CRD_SCHEMAS = {"InferencePool": INFERENCE_POOL, "HTTPRoute": HTTP_ROUTE}

# From llm-d-router v0.10.0: apix/config/v1alpha1/endpointpickerconfig_types.go, and the
# parameters of the plugins we configure (pkg/epp/framework/plugins/datalayer/source/metrics/
# datasource.go, extractor/metrics/factories.go), which the EPP decodes with
# DisallowUnknownFields: a misspelt parameter stops the picker at start.
METRIC_SPEC = string(r"^[a-zA-Z_:][a-zA-Z0-9_:]*(\{.*\})?$")
SPECS = ("queuedRequestsSpec", "runningRequestsSpec", "kvUsageSpec", "loraSpec", "cacheInfoSpec")
ENGINE_CONFIG = obj(
    "name",
    name=string(minLength=1, **{"not": {"const": "default"}}),
    cacheBlockSizeLabelName=string(),
    cacheNumBlocksLabelName=string(),
    cacheBlockSizeSpec=METRIC_SPEC,
    cacheNumBlocksSpec=METRIC_SPEC,
    **dict.fromkeys(SPECS, METRIC_SPEC),
)
PARAMETERS = {
    "metrics-data-source": obj(
        scheme={"enum": ["http", "https"]},
        path=string("^/"),
        port=PORT,
        insecureSkipVerify={"type": "boolean"},
        interval=string("^([0-9]+(ns|us|ms|s|m|h))+$"),
    ),
    "core-metrics-extractor": obj(
        engineLabelKey=string(),
        defaultEngine=string(),
        engineConfigs=array(ENGINE_CONFIG),
    ),
}
SCORERS = ["queue-scorer", "kv-cache-utilization-scorer", "prefix-cache-scorer"]
PLUGIN = obj(
    "type",
    name=string(),
    type={"enum": [*SCORERS, *PARAMETERS]},
    parameters={"type": "object"},
)
PLUGIN["allOf"] = [
    {"if": {"properties": {"type": {"const": t}}}, "then": {"properties": {"parameters": s}}}
    for t, s in PARAMETERS.items()
]
REF = obj("pluginRef", pluginRef=string())
EPP_CONFIG = obj(
    "apiVersion",
    "kind",
    "plugins",
    apiVersion={"const": "llm-d.ai/v1alpha1"},
    kind={"const": "EndpointPickerConfig"},
    plugins=array(PLUGIN),
    dataLayer=obj(sources=array(obj("pluginRef", pluginRef=string(), extractors=array(REF)))),
    schedulingProfiles=array(
        obj(
            "name",
            name=string(),
            plugins=array(obj("pluginRef", pluginRef=string(), weight={"type": "number"})),
        )
    ),
)


# --- helpers ------------------------------------------------------------------------------------


COMPONENT = "app.kubernetes.io/component"


def docs_of(fleet: k8s.Fleet | None = None) -> list[dict]:
    return [d for d in yaml.safe_load_all(k8s.render(fleet or k8s.Fleet())) if d is not None]


def one(docs: list[dict], kind: str, component: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    if component is not None:
        found = [d for d in found if d["metadata"]["labels"][COMPONENT] == component]
    assert len(found) == 1, f"{len(found)} {kind} objects"
    return found[0]


def llmsup_pod(docs: list[dict]) -> dict:
    return one(docs, "DaemonSet")["spec"]["template"]


def container(pod_template: dict, name: str) -> dict:
    spec = pod_template["spec"]
    return next(c for c in spec.get("initContainers", []) + spec["containers"] if c["name"] == name)


def epp_config(docs: list[dict]) -> dict:
    return yaml.safe_load(one(docs, "ConfigMap")["data"]["epp.yaml"])


def exported_gauges() -> dict[str, str]:
    """Metric name -> type, from the gateway's own /metrics text for a serving llmsup."""
    status = {
        "workers": [{"state": "ready", "slots": 8, "running": [1, 2], "restarts": 0}],
        "queue": {"depth": 3, "limit": 32},
        "stopping": False,
        "requests": {"in_flight": 5, "accepted": 9, "rejected": 0},
        "models": [],
    }
    text = Metrics().render(status).decode()
    return {f.name: f.type for f in text_string_to_metric_families(text)}


FULL = k8s.Fleet(
    name="chat",
    namespace="llm",
    create_namespace=True,
    gateway="infra/inference",
    models=("gemma3-270m",),
    workers=2,
    cores_per_worker=3,
    port=8080,
)


# --- the objects are what Kubernetes and the CRDs accept ----------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_builtin_kinds_validate_strictly(version):
    docs = docs_of(FULL)
    kinds = {d["kind"] for d in docs}
    every = "Namespace DaemonSet Service InferencePool ServiceAccount Role RoleBinding ConfigMap"
    assert kinds == {*every.split(), "Deployment", "HTTPRoute"}
    for doc in docs:
        if doc["kind"] not in CRD_SCHEMAS:
            kubernetes_validate.validate(doc, version, strict=True)


def test_crd_kinds_validate_against_their_api():
    checked = set()
    for doc in docs_of(FULL) + docs_of():
        if doc["kind"] in CRD_SCHEMAS:
            jsonschema.validate(doc, CRD_SCHEMAS[doc["kind"]])
            checked.add(doc["kind"])
    assert checked == set(CRD_SCHEMAS)
    jsonschema.validate(epp_config(docs_of()), EPP_CONFIG)


def test_the_schemas_here_refuse_what_the_api_refuses():
    pool = one(docs_of(), "InferencePool")
    ref = pool["spec"]["endpointPickerRef"]
    for spec in (
        {**pool["spec"], "targetPorts": []},
        {**pool["spec"], "endpointPickerRef": {**ref, "failureMode": "Open"}},
        {**pool["spec"], "endpointPickerRef": {"name": ref["name"]}},  # Service, no port
        {**pool["spec"], "selector": {"matchLabels": {}}},
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({**pool, "spec": spec}, INFERENCE_POOL)
    config = epp_config(docs_of())
    extractor = next(p for p in config["plugins"] if p["type"] == "core-metrics-extractor")
    extractor["parameters"]["engineConfigs"][0]["queuedRequestMetric"] = "x"  # not a field
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, EPP_CONFIG)
    deployment = one(docs_of(), "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[0], strict=True)


# --- what they mean together --------------------------------------------------------------------


@pytest.mark.parametrize("fleet", [k8s.Fleet(), FULL], ids=["default", "full"])
def test_readiness_on_health_at_the_pools_target_port(fleet):
    docs = docs_of(fleet)
    node = container(llmsup_pod(docs), "llmsup")
    (port,) = node["ports"]
    assert port["containerPort"] == fleet.port
    probe = node["readinessProbe"]["httpGet"]
    assert probe["path"] == "/health" and probe["port"] in (port["name"], fleet.port)
    # A liveness probe would kill a pod whose /health is 503 while it loads or drains.
    assert "livenessProbe" not in node
    pool = one(docs, "InferencePool")
    assert pool["spec"]["targetPorts"] == [{"number": port["containerPort"]}]
    service = one(docs, "Service", "model-server")
    assert service["spec"]["ports"][0]["targetPort"] in (port["name"], fleet.port)


def test_the_pool_selects_the_llmsup_pods_and_nothing_else():
    docs = docs_of(FULL)
    selector = one(docs, "InferencePool")["spec"]["selector"]["matchLabels"]
    pod_labels = llmsup_pod(docs)["metadata"]["labels"]
    assert selector.items() <= pod_labels.items()
    assert one(docs, "DaemonSet")["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    epp_labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert not selector.items() <= epp_labels.items()
    assert one(docs, "Service", "model-server")["spec"]["selector"] == selector


def test_the_picker_reads_the_gauges_the_gateway_exports():
    docs = docs_of()
    config = epp_config(docs)
    jsonschema.validate(config, EPP_CONFIG)
    plugins = {p["type"]: p.get("parameters", {}) for p in config["plugins"]}
    extractor = plugins["core-metrics-extractor"]
    (engine,) = extractor["engineConfigs"]
    names = {engine[k] for k in ("queuedRequestsSpec", "runningRequestsSpec", "kvUsageSpec")}
    assert names == {k8s.QUEUE_METRIC, k8s.RUNNING_METRIC, k8s.KV_USAGE_METRIC}
    gauges = exported_gauges()
    for name in names:
        assert gauges.get(name) == "gauge", f"{name} is not a gauge of the gateway's /metrics"
    # No KV block table in llmsup: nothing the picker would look for under that name.
    assert "vllm:cache_config_info" not in gauges
    assert "cacheInfoSpec" not in engine and "loraSpec" not in engine
    # The pods name the engine; it is also the default, for a pod without the label.
    assert llmsup_pod(docs)["metadata"]["labels"][k8s.ENGINE_LABEL] == engine["name"]
    assert extractor["defaultEngine"] == engine["name"]
    # The scraper reads the pool's target port, without a key: --public-metrics.
    assert plugins["metrics-data-source"]["path"] == "/metrics"
    assert "--public-metrics" in container(llmsup_pod(docs), "llmsup")["args"]
    # Every plugin a profile or the data layer names is declared.
    refs = {p["pluginRef"] for prof in config["schedulingProfiles"] for p in prof["plugins"]}
    for source in config["dataLayer"]["sources"]:
        refs |= {source["pluginRef"], *(e["pluginRef"] for e in source["extractors"])}
    assert refs <= set(plugins)


def test_the_picker_is_wired_to_its_pool_config_and_account():
    docs = docs_of(FULL)
    deployment = one(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (epp,) = pod["containers"]
    args = dict(a.removeprefix("--").split("=", 1) for a in epp["args"])
    assert args["pool-name"] == "chat" and args["pool-namespace"] == "llm"
    assert args["pool-group"] == k8s.POOL_GROUP
    # Refused by the v0.10.0 picker: metric names belong to the engine entry.
    assert not {"total-queued-requests-metric", "kv-cache-usage-percentage-metric"} & set(args)
    mount = next(m for m in epp["volumeMounts"] if args["config-file"].startswith(m["mountPath"]))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    config_map = one(docs, "ConfigMap")
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    assert args["config-file"].removeprefix(mount["mountPath"] + "/") in config_map["data"]
    account = one(docs, "ServiceAccount")["metadata"]["name"]
    assert pod["serviceAccountName"] == account
    binding, role = one(docs, "RoleBinding"), one(docs, "Role")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": "llm"}]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    granted = {
        (g, r)
        for rule in role["rules"]
        if {"list", "watch"} <= set(rule["verbs"])
        for g in rule["apiGroups"]
        for r in rule["resources"]
    }
    assert {("", "pods"), (k8s.POOL_GROUP, "inferencepools")} <= granted
    # The pool's picker reference is the picker's Service, on the port that reaches ext_proc.
    ref = one(docs, "InferencePool")["spec"]["endpointPickerRef"]
    service = one(docs, "Service", "endpoint-picker")
    assert ref["name"] == service["metadata"]["name"]
    port = next(p for p in service["spec"]["ports"] if p["port"] == ref["port"]["number"])
    assert port["targetPort"] in {p["name"] for p in epp["ports"] if p["containerPort"] == 9002}
    epp_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= epp_labels.items()
    tag = epp["image"].rsplit(":", 1)[1]
    assert tag.startswith("v") and tag not in ("latest", "main")
    # The picker outlives any pod of the pool it routes to.
    grace = llmsup_pod(docs)["spec"]["terminationGracePeriodSeconds"]
    assert pod["terminationGracePeriodSeconds"] >= grace


def test_the_command_line_is_one_llmsup_start_accepts():
    docs = docs_of(FULL)
    pod = llmsup_pod(docs)
    node = container(pod, "llmsup")
    args = node["args"]
    assert node["command"] == ["llmsup"] and args[:2] == ["start", "--foreground"]
    for flag in ("--public-metrics", "--allow-remote"):
        assert flag in args
    assert args[args.index("--node-name") + 1] == "$(POD_NAME)"
    env = {e["name"]: e for e in node["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    ctx = start.make_context("start", [a.replace("$(POD_NAME)", "chat-x7k2p") for a in args[1:]])
    p = ctx.params
    assert p["foreground"] and p["public_metrics"] and p["allow_remote"]
    assert p["node_name"] == "chat-x7k2p" and str(p["api_key_file"]) == k8s.KEY_FILE
    assert (p["workers"], p["cores_per_worker"], p["model"]) == (2, 3, ("gemma3-270m",))
    assert check_http(p["http"], p["allow_remote"], has_key=True) == "0.0.0.0:8080"


def test_the_key_file_is_the_secrets_key_copied_for_llmsups_user():
    docs = docs_of()
    pod = llmsup_pod(docs)
    node, copy = container(pod, "llmsup"), container(pod, "api-key")
    key_file = node["args"][node["args"].index("--api-key-file") + 1]
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    secret = volumes["api-key-secret"]["secret"]
    assert secret["secretName"] == "llmsup-api-key"
    assert secret["items"] == [{"key": "api-key", "path": "api-key"}]
    # The copy reads the Secret's file and writes the key file, 0600, into the emptyDir
    # that llmsup mounts at the same place.
    mounts = {m["name"]: m["mountPath"] for m in copy["volumeMounts"]}
    assert copy["command"] == [
        "install",
        "-m",
        "0600",
        f"{mounts['api-key-secret']}/api-key",
        key_file,
    ]
    (shared,) = [m for m in node["volumeMounts"] if key_file.startswith(m["mountPath"] + "/")]
    assert mounts[shared["name"]] == shared["mountPath"] and "emptyDir" in volumes[shared["name"]]
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert "runAsUser" not in copy.get("securityContext", {})  # the same user as llmsup


def test_drain_fits_in_the_grace_period_and_shm_in_memory():
    fleet = k8s.Fleet(drain_timeout=120, cache_mb=1024, workers=3, cores_per_worker=2)
    pod = llmsup_pod(docs_of(fleet))
    node = container(pod, "llmsup")
    drain = int(node["args"][node["args"].index("--drain-timeout") + 1])
    prestop = node["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert drain == 120 and pod["spec"]["terminationGracePeriodSeconds"] > prestop + drain
    resources = node["resources"]
    assert resources["requests"] == resources["limits"]  # Guaranteed QoS
    assert resources["requests"]["cpu"] == "12"  # 3 workers x 2 cores x 2 CPUs per core
    shm = next(v for v in pod["spec"]["volumes"] if v["name"] == "dshm")["emptyDir"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in node["volumeMounts"]
    assert shm["medium"] == "Memory" and mib(shm["sizeLimit"]) >= 1024
    assert mib(resources["limits"]["memory"]) >= mib(shm["sizeLimit"]) + 3 * k8s.MIN_WORKER_MB


def mib(quantity: str) -> int:
    assert quantity.endswith("Mi")
    return int(quantity[:-2])


# --- the command --------------------------------------------------------------------------------


def test_the_command_writes_the_stream_to_a_file(tmp_path):
    out = tmp_path / "llmsup.yaml"
    result = CliRunner().invoke(
        k8s.k8s_manifests,
        [
            "--name",
            "chat",
            "--namespace",
            "llm",
            "--create-namespace",
            "--gateway",
            "infra/inference",
            "--model",
            "gemma3-270m",
            "-o",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    docs = [d for d in yaml.safe_load_all(out.read_text()) if d]
    assert one(docs, "Namespace")["metadata"]["name"] == "llm"
    route = one(docs, "HTTPRoute")
    assert route["spec"]["parentRefs"][0] == {
        "group": "gateway.networking.k8s.io",
        "kind": "Gateway",
        "name": "inference",
        "namespace": "infra",
    }
    backend = route["spec"]["rules"][0]["backendRefs"][0]
    assert (backend["kind"], backend["name"]) == ("InferencePool", "chat")
    assert "HTTPRoute" not in {d["kind"] for d in docs_of()}  # without --gateway


@pytest.mark.parametrize(
    "args, option, words",
    [
        (["--name", "Chat_1"], "--name", "DNS label of at most 40"),
        (["--name", "a" * 41], "--name", "at most 40"),
        (["--namespace", "LLM"], "--namespace", "DNS label"),
        (["--workers", "0"], "--workers", "1<=x<=256"),
        (["--port", "70000"], "--port", "1<=x<=65535"),
        (["--cache-mb", "8"], "--cache-mb", "minimum of 16"),
        (["--memory-mb", "600"], "--memory-mb", "below 1088"),
        (["--model", "gpt-4"], "--model", "not a model of the catalog"),
        (["--node-selector", "gpu"], "--node-selector", "KEY=VALUE"),
        (["--image", "llmsup latest"], "--image", "without spaces"),
        (["--gateway", "a/b/c"], "--gateway", "[NAMESPACE/]NAME"),
        (["--api-key-secret", "Key!"], "--api-key-secret", "DNS subdomain"),
    ],
)
def test_bad_values_are_refused_naming_the_option_and_limit(args, option, words):
    result = CliRunner().invoke(k8s.k8s_manifests, args)
    assert result.exit_code == 2
    assert option in result.output and words in result.output, result.output


def test_values_with_yaml_syntax_stay_one_scalar():
    # A value with YAML's special characters stays one scalar.
    docs = docs_of(k8s.Fleet(image="registry:5000/llmsup:1.0#x", node_selector=("zone=yes",)))
    node = container(llmsup_pod(docs), "llmsup")
    assert node["image"] == "registry:5000/llmsup:1.0#x"
    assert llmsup_pod(docs)["spec"]["nodeSelector"] == {"zone": "yes"}  # not a YAML 1.1 bool
