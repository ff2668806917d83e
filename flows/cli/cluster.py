"""``stein cluster``: a local multi-node Ray cluster (a head and N-1 worker nodes on this machine), the way to try
the cluster path on a laptop. Only click and the standard library at module level: ``stein --help`` stays fast."""

from __future__ import annotations

import json
import shlex
import sys

import click

EXIT_USAGE = 2


def _root():
    from flows.cli.common import _setup

    return _setup()


def _export_lines(state: dict) -> list[str]:
    from tasks.infra.cluster import client_env

    return [f"export {k}={shlex.quote(v)}" for k, v in client_env(state).items()]


@click.group()
def cluster() -> None:
    """A local Ray cluster of several nodes on this machine (127.0.0.1 only, token auth, no dashboard).

    \b
      stein cluster up --nodes 2 --cpus-per-node 1
      RAY_ADDRESS=127.0.0.1:PORT STEIN_NUM_WORKERS=2 stein run gmm2d
      stein cluster status
      stein cluster down

    `stein run` and `stein stage` join it through RAY_ADDRESS exactly as they would join a remote cluster; for the
    project's own cluster they take its token from .stein/cluster/ by themselves. Each Ray Train worker takes one
    CPU, so with --cpus-per-node 1 every DDP worker runs on a node of its own. The nodes offer no GPUs (one GPU
    shared by several nodes would be claimed by each): on a machine with CUDA set STEIN_USE_GPU=false.
    """


@cluster.command()
@click.option("--nodes", type=click.IntRange(min=1, max=64), default=None,
              help="Nodes in all, the head included (default 2; with a cluster up: its size).")
@click.option("--cpus-per-node", type=click.IntRange(min=1, max=4096), default=None,
              help="CPUs each node offers Ray (default 1: one training worker per node).")
@click.option("--timeout", "timeout_s", type=click.FloatRange(1, 86_400), default=180, show_default=True,
              help="Seconds to wait for the nodes to come up.")
def up(nodes: int | None, cpus_per_node: int | None, timeout_s: float) -> None:
    """Start the cluster: the head, then the worker nodes (each `python -m tasks.infra.cluster`, its own process group).

    With a cluster already up, start only those of its nodes that are down (a worker node that crashed comes back
    under its name); asking for another size exits 2. State, token (mode 0600) and one log per node live under
    .stein/cluster/. Prints the `export` lines other Ray programs need to join it.
    """
    root = _root()
    from flows.local import exit_on_termination
    from tasks.infra.cluster import ClusterError, cluster_up
    from tasks.config.sections import ConfigError

    exit_on_termination()  # SIGTERM/SIGHUP: the nodes started so far are stopped again, as on Ctrl-C

    try:
        state = cluster_up(root, nodes, cpus_per_node, timeout_s=timeout_s, echo=click.echo)
    except ConfigError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    except ClusterError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    click.echo(f"Ray cluster of {len(state['nodes'])} node(s) x {state['cpus_per_node']} CPU at {state['address']}")
    click.echo("Use it from stein (the token is found from RAY_ADDRESS):")
    click.echo(f"  RAY_ADDRESS={state['address']} STEIN_NUM_WORKERS={len(state['nodes'])} stein run gmm2d")
    click.echo("or from any Ray program:")
    for line in _export_lines(state):
        click.echo(f"  {line}")


@cluster.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def status(as_json: bool) -> None:
    """Show the cluster's nodes: launcher PID, whether it runs, Ray node id, CPUs, and what the head reports.

    Exits 1 when no cluster is recorded, or when a recorded node is down.
    """
    root = _root()
    from tasks.infra.cluster import ClusterError, cluster_status

    try:
        state = cluster_status(root)
    except ClusterError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    if state is None:
        if as_json:
            click.echo(json.dumps(None))
        else:
            click.echo("no cluster is up in this project (start one with `stein cluster up`)")
        sys.exit(1)
    healthy = all(rec["alive"] for rec in state["nodes"])
    if as_json:
        click.echo(json.dumps(state))
        sys.exit(0 if healthy else 1)
    gcs = state.get("gcs") or {}
    click.echo(f"Ray cluster at {state['address']}: {len(state['nodes'])} node(s) x {state['cpus_per_node']} CPU")
    for rec in state["nodes"]:
        seen = gcs.get(rec.get("node_id") or "", {})
        ray_state = ("alive" if seen.get("alive") else "dead") if seen else "not registered"
        click.echo(f"  {rec['name']:<18} {'running' if rec['alive'] else 'DOWN':<8} pid {rec.get('pid')!s:<8} "
                   f"node {(rec.get('node_id') or '-')[:12]:<12}  head says: {ray_state}")
    if state.get("gcs_error"):
        click.echo(f"  the head did not answer: {state['gcs_error']}")
    for line in _export_lines(state):
        click.echo(line)
    if not healthy:
        click.echo("a node is down: `stein cluster up` starts it again", err=True)
        sys.exit(1)


@cluster.command()
@click.option("--timeout", "timeout_s", type=click.FloatRange(1, 86_400), default=20, show_default=True,
              help="Seconds each node has to stop after SIGTERM before it is killed.")
def down(timeout_s: float) -> None:
    """Stop the cluster: worker nodes first, then the head (SIGTERM to each node's process group, SIGKILL after
    --timeout). Removes the state and the token; keeps the logs. Without a cluster, says so and exits 0."""
    root = _root()
    from tasks.infra.cluster import ClusterError, cluster_down

    try:
        times = cluster_down(root, timeout_s=timeout_s, echo=click.echo)
    except ClusterError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    if times is None:
        click.echo("no cluster is up in this project: nothing to stop")
    else:
        click.echo(f"cluster stopped ({len(times)} node(s), {sum(times.values()):.1f} s)")
