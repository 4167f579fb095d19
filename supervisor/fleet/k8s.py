"""`llmsup fleet k8s-manifests`: Kubernetes manifests for llmsup nodes behind Kubernetes'
inference gateway (the Gateway API Inference Extension's InferencePool and endpoint picker).

A template the user applies to their own cluster with an image they build (docs/fleet.md: the
cluster path), not a controller of ours. Its text is in templates/k8s/*.yaml, filled with
string.Template (${...} placeholders, their values from `template_values`); the comments in
them say why each setting is there. The stream, in order: the Namespace (namespace.yaml,
with --create-namespace); the llmsup DaemonSet, one pod per labelled node running `llmsup
start --foreground`, a Service in front of those pods and the InferencePool selecting them
(model-server.yaml); the endpoint picker (EPP): ServiceAccount, Role, RoleBinding, ConfigMap
(epp-config.yaml, an EndpointPickerConfig whose engine entry names llmsup's gauges),
Deployment and Service (endpoint-picker.yaml); and an HTTPRoute from a Gateway to the pool
(httproute.yaml, with --gateway). header.yaml opens it with how to apply it.

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
import string
from dataclasses import dataclass
from importlib.resources import files
from typing import NoReturn

import click

from llmsup.protocol.arena_layout import MIN_MB
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

# The manifests' text: package data (setup.cfg), so an installed llmsup finds it too.
TEMPLATES = files("llmsup.supervisor.fleet") / "templates" / "k8s"


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
            bad(
                f"{self.name!r} must be a DNS label of at most {NAME_MAX} characters: a-z, 0-9 "
                "and '-', starting with a letter",
                "--name",
            )
        if len(self.namespace) > 63 or not NS_LABEL.fullmatch(self.namespace):
            bad(f"{self.namespace!r} must be a DNS label of at most 63 characters", "--namespace")
        if not self.image or any(c.isspace() for c in self.image):
            bad(f"{self.image!r} must be an image reference without spaces", "--image")
        for name in self.models:
            if name not in catalog():
                bad(f"{name!r} is not a model of the catalog ({', '.join(catalog())})", "--model")
        if 0 < self.cache_mb < MIN_MB:
            bad(
                f"{self.cache_mb} is below llmsup's minimum of {MIN_MB} (0 turns it off)",
                "--cache-mb",
            )
        floor = self.shm_mb + BASE_MB + self.workers * MIN_WORKER_MB
        if self.memory < floor:
            bad(
                f"{self.memory} MiB is below {floor}: /dev/shm ({self.shm_mb}), the "
                f"supervisor and gateway ({BASE_MB}) and {MIN_WORKER_MB} per worker",
                "--memory-mb",
            )
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


def bad(message: str, option: str) -> NoReturn:
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


def q(value: object) -> str:
    """A YAML scalar that stays one, whatever the text: JSON's string syntax is YAML's."""
    return json.dumps(value)


def block(mapping: dict[str, str], indent: int) -> str:
    """A block mapping on lines of their own, after the key it belongs to."""
    return "".join(f"\n{' ' * indent}{q(k)}: {q(v)}" for k, v in mapping.items())


def render(fleet: Fleet) -> str:
    """The manifests' text; click.BadParameter names what is wrong."""
    fleet.check()
    values = template_values(fleet)
    documents = [
        "header.yaml",
        *(["namespace.yaml"] if fleet.create_namespace else []),
        "model-server.yaml",
        "endpoint-picker.yaml",
        *(["httproute.yaml"] if fleet.gateway is not None else []),
    ]
    return "".join(fill(document, values) for document in documents)


def template_values(fleet: Fleet) -> dict[str, object]:
    """What the templates' ${...} placeholders stand for."""
    node, epp = fleet.labels("model-server"), fleet.labels("endpoint-picker")
    gw_namespace, _, gateway = (fleet.gateway or "").rpartition("/")
    # Names go in as they are (check() let through DNS labels only), other text quoted.
    values: dict[str, object] = {
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
        "queue_metric": QUEUE_METRIC,
        "running_metric": RUNNING_METRIC,
        "kv_usage_metric": KV_USAGE_METRIC,
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
        "gateway": q(gateway),
        "gateway_namespace": f"\n    namespace: {q(gw_namespace)}" if gw_namespace else "",
    }
    for indent in (4, 6, 8):
        values[f"node_labels_{indent}"] = block(node, indent)
        values[f"epp_labels_{indent}"] = block(epp, indent)
    # The picker's EndpointPickerConfig, indented into its ConfigMap's epp.yaml. Its engine
    # entry has no loraSpec and no cacheInfoSpec (vllm:cache_config_info): llmsup has no LoRA
    # adapters and no KV block table, and the extractor reads them as absent.
    epp_config = fill("epp-config.yaml", values)
    values["epp_config"] = "\n".join(f"    {line}" for line in epp_config.splitlines())
    return values


def fill(template: str, values: dict[str, object]) -> str:
    """One template of templates/k8s/ with its placeholders filled."""
    text = (TEMPLATES / template).read_text(encoding="utf-8")
    return string.Template(text).substitute(values)


@click.command("k8s-manifests")
@click.option(
    "--name",
    default="llmsup",
    show_default=True,
    help="The pool's name, its DaemonSet's and Service's; the picker is NAME-epp.",
)
@click.option("--namespace", default="default", show_default=True)
@click.option("--create-namespace", is_flag=True, help="Also write the Namespace.")
@click.option(
    "--image",
    default="llmsup:latest",
    show_default=True,
    help="An llmsup image you build (docs/fleet.md: the cluster path).",
)
@click.option(
    "--port",
    type=click.IntRange(1, 65535),
    default=8000,
    show_default=True,
    help="The HTTP port of every pod (the pool's target port).",
)
@click.option(
    "--model",
    "models",
    multiple=True,
    metavar="NAME",
    help="A catalog model to serve; repeat for several [default: llmsup's].",
)
@click.option(
    "--workers", type=click.IntRange(1, 256), default=1, show_default=True, help="Workers per pod."
)
@click.option(
    "--cores-per-worker",
    type=click.IntRange(1, 64),
    default=2,
    show_default=True,
    help="Physical cores per worker.",
)
@click.option(
    "--cpus-per-core",
    type=click.IntRange(1, 8),
    default=2,
    show_default=True,
    help="Logical CPUs per physical core of the nodes (SMT): the CPU request is "
    "workers x cores-per-worker x this.",
)
@click.option(
    "--cache-mb",
    type=click.IntRange(0, 65536),
    default=256,
    show_default=True,
    help="llmsup's prefix cache in /dev/shm; 0 turns it off.",
)
@click.option(
    "--memory-mb",
    type=click.IntRange(1),
    default=None,
    help=f"A pod's memory request and limit, MiB [default: cache + {SHM_SLACK_MB} + "
    f"{BASE_MB} + {WORKER_MB} per worker].",
)
@click.option(
    "--drain-timeout",
    type=click.IntRange(0, 3600),
    default=30,
    show_default=True,
    help="llmsup's --drain-timeout; the pods' grace period is longer.",
)
@click.option(
    "--api-key-secret",
    default=None,
    help="The Secret whose key `api-key` holds the API key [default: NAME-api-key].",
)
@click.option(
    "--node-selector",
    multiple=True,
    default=("llmsup/serve=true",),
    show_default=True,
    metavar="KEY=VALUE",
    help="Nodes that run llmsup (repeat).",
)
@click.option(
    "--gateway",
    default=None,
    metavar="[NAMESPACE/]NAME",
    help="Also write an HTTPRoute from this Gateway to the pool.",
)
@click.option(
    "-o",
    "--output",
    type=click.File("w"),
    default="-",
    help="Write the manifests here [default: standard output].",
)
def k8s_manifests(output, **options):
    """Kubernetes manifests for llmsup nodes behind an InferencePool and its endpoint picker:
    one YAML stream for `kubectl apply -f`."""
    options["models"] = tuple(options["models"])
    options["node_selector"] = tuple(options["node_selector"])
    output.write(render(Fleet(**options)))
