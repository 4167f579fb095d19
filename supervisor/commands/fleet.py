"""`llmsup fleet ...`: configuration for running several llmsup nodes behind a balancer that
the user already runs (HAProxy, Kubernetes' inference gateway). llmsup routes nothing itself."""

from __future__ import annotations

import click

from llmsup.supervisor.fleet.haproxy import haproxy_config
from llmsup.supervisor.fleet.k8s import k8s_manifests


@click.group("fleet")
def fleet():
    """Configuration for llmsup nodes behind a balancer (docs/fleet.md)."""


fleet.add_command(haproxy_config)
fleet.add_command(k8s_manifests)
