"""`llmsup fleet k8s-manifests`: Kubernetes manifests for llmsup nodes behind Kubernetes'
inference gateway (the Gateway API Inference Extension's InferencePool and endpoint picker).

A template the user applies to their own cluster with an image they build (README: the
cluster path), not a controller of ours; the comments in it say why each setting is there.
The stream, in order: the Namespace (with --create-namespace); the llmsup DaemonSet, one pod
per labelled node running `llmsup start --foreground`; a Service in front of those pods; the
InferencePool selecting them; the endpoint picker (EPP): ServiceAccount, Role, RoleBinding,
ConfigMap (an EndpointPickerConfig whose engine entry names llmsup's gauges), Deployment and
Service; and an HTTPRoute from a Gateway to the pool (with --gateway).

Upstream names it relies on, as the sources of these releases spell them:
- InferencePool `inference.networking.k8s.io/v1`: Gateway API Inference Extension v1.6.0,
  api/v1/inferencepool_types.go. The EPP has moved from there to llm-d-router (its README).
- The EPP of llm-d-router v0.10.0: image ghcr.io/llm-d/llm-d-router-endpoint-picker (its
  release workflow); flags in pkg/epp/server/options.go, where --total-queued-requests-metric
  and the other metric flags are refused when set (metric names go in `engineConfigs`); the
  `core-metrics-extractor` and `metrics-data-source` parameters in pkg/epp/framework/plugins/
  datalayer; RBAC, ports and probes as in its config/charts/routerlib templates.
- HTTPRoute `gateway.networking.k8s.io/v1`: Gateway API v1.6.1, apis/v1/httproute_types.go.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import click

from llmsup.protocol.arena import MIN_MB
from llmsup.supervisor.models.catalog import catalog

POOL_GROUP = "inference.networking.k8s.io"
EPP_IMAGE = "ghcr.io/llm-d/llm-d-router-endpoint-picker:v0.10.0"
ENGINE_LABEL = "llm-d.ai/engine-type"  # the extractor's default engineLabelKey
ENGINE = "llmsup"
# What the picker scores on, as llmsup's gateway exports them (supervisor/gateway/metrics.py).
QUEUE_METRIC = "llmsup_num_requests_waiting"
RUNNING_METRIC = "llmsup_num_requests_running"
KV_USAGE_METRIC = "llmsup_kv_cache_usage_perc"
KEY_FILE = "/run/llmsup-key/api-key"
UID = 1000  # not root: it reads the image's models and writes /tmp, /dev/shm, the key's emptyDir
CACHE_HOME = "/opt/llmsup/cache"  # XDG_CACHE_HOME: the image has the models in it
PRESTOP_S = 5
EXIT_MARGIN_S = 15  # after the drain: workers and the gateway exit, the stop record is written
SHM_SLACK_MB = 64  # the scoreboard and Python's own segments beside the prefix cache
BASE_MB = 512  # the supervisor and the gateway
WORKER_MB = 1024  # one worker with a small model (the catalog's are 98 and 253 MB)
MIN_WORKER_MB = 256

DNS_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")  # Service names (RFC 1035)
NS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")  # namespaces (RFC 1123)
SUBDOMAIN = re.compile(rf"{NS_LABEL.pattern}(\.{NS_LABEL.pattern})*")
LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?")
LABEL_KEY = re.compile(rf"({SUBDOMAIN.pattern}/)?[A-Za-z0-9]([-A-Za-z0-9_.]{{0,61}}[A-Za-z0-9])?")
NAME_MAX = 40  # room for the suffixes (NAME-epp, NAME-api-key) within 63


@dataclass(frozen=True)
class Fleet:
    """What the manifests are made of; `check()` refuses what Kubernetes or llmsup would."""

    name: str = "llmsup"
    namespace: str = "default"
    create_namespace: bool = False
    image: str = "llmsup:latest"
    port: int = 8000
    models: tuple[str, ...] = ()  # none: llmsup's default models
    workers: int = 1
    cores_per_worker: int = 2
    cpus_per_core: int = 2
    cache_mb: int = 256
    memory_mb: int | None = None  # None: /dev/shm + BASE_MB + WORKER_MB per worker
    drain_timeout: int = 30
    api_key_secret: str | None = None  # None: NAME-api-key
    node_selector: tuple[str, ...] = ("llmsup/serve=true",)
    gateway: str | None = None  # [NAMESPACE/]NAME of a Gateway: add an HTTPRoute

    @property
    def secret(self) -> str:
        return self.api_key_secret or f"{self.name}-api-key"

    @property
    def shm_mb(self) -> int:
        return self.cache_mb + SHM_SLACK_MB

    @property
    def memory(self) -> int:
        if self.memory_mb is not None:
            return self.memory_mb
        return self.shm_mb + BASE_MB + self.workers * WORKER_MB

    def labels(self, component: str) -> dict[str, str]:
        return {
            "app.kubernetes.io/name": "llmsup",
            "app.kubernetes.io/instance": self.name,
            "app.kubernetes.io/component": component,
        }

    def check(self) -> None:
        """click.BadParameter naming the option and its limit, for what would be refused."""
        if len(self.name) > NAME_MAX or not DNS_LABEL.fullmatch(self.name):
            bad(f"{self.name!r} must be a DNS label of at most {NAME_MAX} characters: a-z, 0-9 "
                "and '-', starting with a letter", "--name")  # fmt: skip
        if len(self.namespace) > 63 or not NS_LABEL.fullmatch(self.namespace):
            bad(f"{self.namespace!r} must be a DNS label of at most 63 characters", "--namespace")
        if not self.image or any(c.isspace() for c in self.image):
            bad(f"{self.image!r} must be an image reference without spaces", "--image")
        for name in self.models:
            if name not in catalog():
                bad(f"{name!r} is not a model of the catalog ({', '.join(catalog())})",
                    "--model")  # fmt: skip
        if 0 < self.cache_mb < MIN_MB:
            bad(f"{self.cache_mb} is below llmsup's minimum of {MIN_MB} (0 turns it off)",
                "--cache-mb")  # fmt: skip
        floor = self.shm_mb + BASE_MB + self.workers * MIN_WORKER_MB
        if self.memory < floor:
            bad(f"{self.memory} MiB is below {floor}: /dev/shm ({self.shm_mb}), the "
                f"supervisor and gateway ({BASE_MB}) and {MIN_WORKER_MB} per worker",
                "--memory-mb")  # fmt: skip
        if len(self.secret) > 253 or not SUBDOMAIN.fullmatch(self.secret):
            bad(f"{self.secret!r} must be a Secret's name (a DNS subdomain)", "--api-key-secret")
        for item in self.node_selector:
            key, sep, value = item.partition("=")
            if not sep or not LABEL_KEY.fullmatch(key) or not LABEL_VALUE.fullmatch(value):
                bad(f"{item!r} must be KEY=VALUE, a node label", "--node-selector")
        if self.gateway is not None:
            parts = self.gateway.split("/")
            if len(parts) > 2 or not all(NS_LABEL.fullmatch(p) for p in parts):
                bad(f"{self.gateway!r} must be [NAMESPACE/]NAME of a Gateway", "--gateway")


def bad(message: str, option: str):
    raise click.BadParameter(message, param_hint=option)


def llmsup_args(fleet: Fleet) -> list[str]:
    """`llmsup start` in the pod; Kubernetes expands $(POD_NAME) from the pod's env."""
    args = ["start", "--foreground", "--http", f"0.0.0.0:{fleet.port}", "--allow-remote"]
    args += ["--api-key-file", KEY_FILE, "--node-name", "$(POD_NAME)", "--public-metrics"]
    args += ["--workers", str(fleet.workers), "--cores-per-worker", str(fleet.cores_per_worker)]
    args += ["--cache-mb", str(fleet.cache_mb), "--drain-timeout", str(fleet.drain_timeout)]
    for name in fleet.models:
        args += ["--model", name]
    return args


# The engine entry: llmsup has no LoRA adapters and no KV block table, so loraSpec and
# cacheInfoSpec (vllm:cache_config_info) are left out, which the extractor reads as absent.
EPP_CONFIG = f"""\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: prefix-cache-scorer
- type: metrics-data-source
  parameters:
    scheme: http
    path: /metrics
    interval: 250ms  # each scrape makes llmsup's gateway ask it `status`; default: 50ms
- type: core-metrics-extractor
  parameters:
    defaultEngine: {ENGINE}  # also for a pod without the {ENGINE_LABEL} label
    engineConfigs:
    - name: {ENGINE}
      queuedRequestsSpec: {QUEUE_METRIC}
      runningRequestsSpec: {RUNNING_METRIC}
      kvUsageSpec: {KV_USAGE_METRIC}
dataLayer:
  sources:
  - pluginRef: metrics-data-source
    extractors:
    - pluginRef: core-metrics-extractor
schedulingProfiles:
- name: default
  plugins:  # the upstream chart's default weights
  - pluginRef: queue-scorer
    weight: 2
  - pluginRef: kv-cache-utilization-scorer
    weight: 2
  - pluginRef: prefix-cache-scorer
    weight: 3
"""

NAMESPACE = """\
---
apiVersion: v1
kind: Namespace
metadata:
  name: {namespace}
"""

TEMPLATE = """\
# llmsup behind Kubernetes' inference gateway. Written by `llmsup fleet k8s-manifests`; a
# template: edit it freely. Check it with `kubectl apply --dry-run=server -f FILE`. Needs
# the InferencePool CRD, the API key in a Secret and nodes labelled for llmsup:
#   kubectl -n {namespace} create secret generic {secret} --from-file=api-key=KEY_FILE
#   kubectl label node NODE {node_labels}
{namespace_doc}---
# One llmsup per labelled node. A DaemonSet, not a Deployment: llmsup pins each worker to
# physical cores of its CPU affinity, so two on one node would share cores; a rollout
# replaces a node's pod in place, the old one drained first (no surge).
apiVersion: apps/v1
kind: DaemonSet
metadata:
  name: {name}
  namespace: {namespace}
  labels:{node_labels_4}
spec:
  selector:
    matchLabels:{node_labels_6}
  updateStrategy:
    type: RollingUpdate
    rollingUpdate:
      maxUnavailable: 1
      maxSurge: 0
  template:
    metadata:
      labels:{node_labels_8}
        {engine_label}: {engine}
    spec:
      nodeSelector:{node_selector}
      # preStop, then llmsup's --drain-timeout, then its workers' and gateway's exit.
      terminationGracePeriodSeconds: {grace}
      securityContext:
        runAsUser: {uid}
        runAsGroup: {uid}
        runAsNonRoot: true
        seccompProfile:
          type: RuntimeDefault
      initContainers:
      # The gateway takes its key only from a regular 0600 file of its own user, never a
      # symlink, and a Secret volume's files are root's symlinks: copy it once, as the user.
      - name: api-key
        image: {image}
        command: ["install", "-m", "0600", "/secret/api-key", {key_file}]
        securityContext:
          allowPrivilegeEscalation: false
          capabilities:
            drop: ["ALL"]
        volumeMounts:
        - name: api-key-secret
          mountPath: /secret
          readOnly: true
        - name: api-key
          mountPath: {key_dir}
      containers:
      - name: llmsup
        image: {image}
        command: ["llmsup"]
        args:{args}
        env:
        - name: POD_NAME  # --node-name: X-Llmsup-Node on every response
          valueFrom:
            fieldRef:
              fieldPath: metadata.name
        - name: XDG_CACHE_HOME  # the image has the models in XDG_CACHE_HOME/llmsup/models
          value: {cache_home}
        ports:
        - name: http
          containerPort: {port}
          protocol: TCP
        # 503 while llmsup starts (models loading), stops, or its supervisor is unreachable.
        # No liveness probe: llmsup restarts its own crashed or hung workers and gateway, a
        # start or a drain keeps /health 503 as long as it legitimately takes (which a
        # liveness probe would punish with a kill), and if the supervisor dies the
        # container exits and the kubelet restarts it.
        readinessProbe:
          httpGet:
            path: /health
            port: http
          periodSeconds: 2
          timeoutSeconds: 1
          failureThreshold: 1
        # The picker drops a terminating pod at once and Services soon after, while llmsup
        # still serves; then SIGTERM: it refuses new requests (503 + Retry-After) and lets
        # those in flight finish.
        lifecycle:
          preStop:
            sleep:
              seconds: {prestop}
        # Requests = limits in whole CPUs: Guaranteed QoS, so with the kubelet's static CPU
        # manager policy the pod gets cores of its own, which llmsup reads from its affinity.
        # Kubernetes counts logical CPUs: a worker's physical cores come with their siblings.
        # The memory covers /dev/shm below, which is counted in it.
        resources:
          requests:
            cpu: {cpu}
            memory: {memory}
          limits:
            cpu: {cpu}
            memory: {memory}
        securityContext:
          allowPrivilegeEscalation: false
          capabilities:
            drop: ["ALL"]
        volumeMounts:
        - name: dshm
          mountPath: /dev/shm
        - name: api-key
          mountPath: {key_dir}
          readOnly: true
      volumes:
      # llmsup's prefix cache and scoreboard are POSIX shared memory; a container's own
      # /dev/shm is 64 MiB.
      - name: dshm
        emptyDir:
          medium: Memory
          sizeLimit: {shm}
      - name: api-key
        emptyDir:
          medium: Memory
          sizeLimit: 1Mi
      - name: api-key-secret
        secret:
          secretName: {secret}
          items:
          - key: api-key
            path: api-key
          defaultMode: 292  # 0444, for the copy above: the only container that mounts it
---
# Each node's HTTP API directly (a check, Prometheus); clients go through the Gateway.
apiVersion: v1
kind: Service
metadata:
  name: {name}
  namespace: {namespace}
  labels:{node_labels_4}
spec:
  selector:{node_labels_4}
  ports:
  - name: http
    port: {port}
    targetPort: http
---
apiVersion: {pool_group}/v1
kind: InferencePool
metadata:
  name: {name}
  namespace: {namespace}
  labels:{node_labels_4}
spec:
  selector:
    matchLabels:{node_labels_6}
  targetPorts:
  - number: {port}
  appProtocol: http
  endpointPickerRef:
    kind: Service
    name: {epp}
    port:
      number: 9002
    # With the picker down the Gateway picks a pod itself; llmsup still answers busy.
    failureMode: FailOpen
---
apiVersion: v1
kind: ServiceAccount
metadata:
  name: {epp}
  namespace: {namespace}
  labels:{epp_labels_4}
---
# What the picker watches: the pods, its pool, and llm-d's objectives if they are installed.
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata:
  name: {epp}
  namespace: {namespace}
  labels:{epp_labels_4}
rules:
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "watch", "list"]
- apiGroups: [{pool_group}]
  resources: ["inferencepools"]
  verbs: ["get", "watch", "list"]
- apiGroups: ["llm-d.ai", "inference.networking.x-k8s.io"]
  resources: ["inferenceobjectives", "inferencemodelrewrites"]
  verbs: ["get", "watch", "list"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata:
  name: {epp}
  namespace: {namespace}
  labels:{epp_labels_4}
subjects:
- kind: ServiceAccount
  name: {epp}
  namespace: {namespace}
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: Role
  name: {epp}
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: {epp}
  namespace: {namespace}
  labels:{epp_labels_4}
data:
  epp.yaml: |
{epp_config}\
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {epp}
  namespace: {namespace}
  labels:{epp_labels_4}
spec:
  replicas: 1
  # One picker, its prefix index in memory: the old one goes before the new one starts.
  strategy:
    type: Recreate
  selector:
    matchLabels:{epp_labels_6}
  template:
    metadata:
      labels:{epp_labels_8}
    spec:
      serviceAccountName: {epp}
      # As upstream: no shorter than the longest grace period of the pool's pods.
      terminationGracePeriodSeconds: {grace}
      securityContext:
        seccompProfile:
          type: RuntimeDefault
      containers:
      - name: epp
        image: {epp_image}
        args:
        - --pool-name={name}
        - --pool-namespace={namespace}
        - --pool-group={pool_group}
        - --config-file=/config/epp.yaml
        - --grpc-port=9002
        - --grpc-health-port=9003
        - --tracing=false
        env:
        - name: NAMESPACE
          valueFrom:
            fieldRef:
              fieldPath: metadata.namespace
        - name: POD_NAME
          valueFrom:
            fieldRef:
              fieldPath: metadata.name
        ports:
        - name: grpc
          containerPort: 9002
        - name: grpc-health
          containerPort: 9003
        - name: metrics
          containerPort: 9090
        livenessProbe:
          grpc:
            port: 9003
            service: inference-extension
          initialDelaySeconds: 5
          periodSeconds: 10
        readinessProbe:
          grpc:
            port: 9003
            service: inference-extension
          periodSeconds: 2
        # Not measured here; the upstream chart asks 8 CPUs and 8 GiB for large GPU pools.
        resources:
          requests:
            cpu: 1
            memory: 1Gi
          limits:
            memory: 4Gi
        securityContext:
          allowPrivilegeEscalation: false
          runAsNonRoot: true
          capabilities:
            drop: ["ALL"]
        volumeMounts:
        - name: config
          mountPath: /config
          readOnly: true
      volumes:
      - name: config
        configMap:
          name: {epp}
---
apiVersion: v1
kind: Service
metadata:
  name: {epp}
  namespace: {namespace}
  labels:{epp_labels_4}
spec:
  selector:{epp_labels_4}
  ports:
  - name: grpc-ext-proc
    protocol: TCP
    port: 9002
    targetPort: grpc
    appProtocol: kubernetes.io/h2c
  - name: http-metrics
    protocol: TCP
    port: 9090
    targetPort: metrics
{route_doc}"""

ROUTE = """\
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: {name}
  namespace: {namespace}
  labels:{node_labels_4}
spec:
  parentRefs:
  - group: gateway.networking.k8s.io
    kind: Gateway
    name: {gateway}{gateway_namespace}
  rules:
  - matches:
    - path:
        type: PathPrefix
        value: /
    backendRefs:
    - group: {pool_group}
      kind: InferencePool
      name: {name}
    timeouts:
      request: 300s  # the upstream chart's; the Gateway cuts a longer request
"""


def q(value) -> str:
    """A YAML scalar that stays one, whatever the text: JSON's string syntax is YAML's."""
    return json.dumps(value)


def block(mapping: dict[str, str], indent: int) -> str:
    """A block mapping on lines of their own, after the key it belongs to."""
    return "".join(f"\n{' ' * indent}{q(k)}: {q(v)}" for k, v in mapping.items())


def render(fleet: Fleet) -> str:
    """The manifests' text; click.BadParameter names what is wrong."""
    fleet.check()
    node, epp = fleet.labels("model-server"), fleet.labels("endpoint-picker")
    gw_namespace, _, gateway = (fleet.gateway or "").rpartition("/")
    # Names go in as they are (check() let through DNS labels only), other text quoted.
    values = {
        "name": fleet.name,
        "namespace": fleet.namespace,
        "secret": fleet.secret,
        "epp": f"{fleet.name}-epp",
        "image": q(fleet.image),
        "epp_image": q(EPP_IMAGE),
        "port": fleet.port,
        "pool_group": POOL_GROUP,
        "engine_label": ENGINE_LABEL,
        "engine": ENGINE,
        "uid": UID,
        "key_file": q(KEY_FILE),
        "key_dir": q(KEY_FILE.rsplit("/", 1)[0]),
        "cache_home": q(CACHE_HOME),
        "args": "".join(f"\n        - {q(arg)}" for arg in llmsup_args(fleet)),
        "grace": PRESTOP_S + fleet.drain_timeout + EXIT_MARGIN_S,
        "prestop": PRESTOP_S,
        "cpu": q(str(fleet.workers * fleet.cores_per_worker * fleet.cpus_per_core)),
        "memory": q(f"{fleet.memory}Mi"),
        "shm": q(f"{fleet.shm_mb}Mi"),
        "node_selector": block(dict(s.partition("=")[::2] for s in fleet.node_selector), 8),
        "node_labels": " ".join(fleet.node_selector),
        "epp_config": "".join(f"    {line}\n" for line in EPP_CONFIG.splitlines()),
        "gateway": q(gateway),
        "gateway_namespace": f"\n    namespace: {q(gw_namespace)}" if gw_namespace else "",
    }
    for indent in (4, 6, 8):
        values[f"node_labels_{indent}"] = block(node, indent)
        values[f"epp_labels_{indent}"] = block(epp, indent)
    values["namespace_doc"] = NAMESPACE.format(**values) if fleet.create_namespace else ""
    values["route_doc"] = ROUTE.format(**values) if fleet.gateway is not None else ""
    return TEMPLATE.format(**values)


# fmt: off
@click.command("k8s-manifests")
@click.option("--name", default="llmsup", show_default=True,
              help="The pool's name, its DaemonSet's and Service's; the picker is NAME-epp.")
@click.option("--namespace", default="default", show_default=True)
@click.option("--create-namespace", is_flag=True, help="Also write the Namespace.")
@click.option("--image", default="llmsup:latest", show_default=True,
              help="An llmsup image you build (README: the cluster path).")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True,
              help="The HTTP port of every pod (the pool's target port).")
@click.option("--model", "models", multiple=True, metavar="NAME",
              help="A catalog model to serve; repeat for several [default: llmsup's].")
@click.option("--workers", type=click.IntRange(1, 256), default=1, show_default=True,
              help="Workers per pod.")
@click.option("--cores-per-worker", type=click.IntRange(1, 64), default=2, show_default=True,
              help="Physical cores per worker.")
@click.option("--cpus-per-core", type=click.IntRange(1, 8), default=2, show_default=True,
              help="Logical CPUs per physical core of the nodes (SMT): the CPU request is "
              "workers x cores-per-worker x this.")
@click.option("--cache-mb", type=click.IntRange(0, 65536), default=256, show_default=True,
              help="llmsup's prefix cache in /dev/shm; 0 turns it off.")
@click.option("--memory-mb", type=click.IntRange(1), default=None,
              help=f"A pod's memory request and limit, MiB [default: cache + {SHM_SLACK_MB} + "
              f"{BASE_MB} + {WORKER_MB} per worker].")
@click.option("--drain-timeout", type=click.IntRange(0, 3600), default=30, show_default=True,
              help="llmsup's --drain-timeout; the pods' grace period is longer.")
@click.option("--api-key-secret", default=None,
              help="The Secret whose key `api-key` holds the API key [default: NAME-api-key].")
@click.option("--node-selector", multiple=True, default=("llmsup/serve=true",),
              show_default=True, metavar="KEY=VALUE", help="Nodes that run llmsup (repeat).")
@click.option("--gateway", default=None, metavar="[NAMESPACE/]NAME",
              help="Also write an HTTPRoute from this Gateway to the pool.")
@click.option("-o", "--output", type=click.File("w"), default="-",
              help="Write the manifests here [default: standard output].")
def k8s_manifests(output, **options):
    """Kubernetes manifests for llmsup nodes behind an InferencePool and its endpoint picker:
    one YAML stream for `kubectl apply -f`."""
    options["models"] = tuple(options["models"])
    options["node_selector"] = tuple(options["node_selector"])
    output.write(render(Fleet(**options)))
# fmt: on
