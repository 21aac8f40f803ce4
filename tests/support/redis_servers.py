"""redis-server processes the tests and the benchmark own, and the topologies made of them.

Each listens on a free loopback port with its data in a directory of the caller's; whoever
starts one kills it (the fixtures in ``conftest.py``, the benchmark's ``ExitStack``).
"""

from __future__ import annotations

import shutil
import subprocess
from collections import Counter as Tally
from contextlib import contextmanager
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from . import ROOT
from .ports import free_cluster_port, free_port
from .waiting import wait_until

REDIS_CONF = str(ROOT / "config" / "redis.conf")
NOT_DURABLE = ("--save", "", "--appendonly", "no")


class RedisProcess:
    """One redis-server (or Sentinel) the caller owns: start, clean SHUTDOWN, kill -9, restart.

    ``config=REDIS_CONF`` runs the deployed ``config/redis.conf`` (durable AOF, noeviction)
    with only port, address and data directory given on the command line (command-line
    arguments override the file's, so ``*NOT_DURABLE`` turns its persistence off).
    """

    def __init__(
        self,
        directory: Path,
        *args: str,
        port: int | None = None,
        config: str | None = None,
        under: tuple[str, ...] = (),
    ):
        """``under``: a command to run redis-server under (the bench's valgrind)."""
        executable = shutil.which("redis-server")
        if not executable:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.argv = [
            *under,
            executable,
            *([config] if config else []),
            "--port",
            str(self.port),
            "--bind",
            self.host,
            "--dir",
            str(directory),
            *args,
        ]
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def client(self) -> redis.Redis:
        """No retries: redis-py's default backoff would turn each failed ping into seconds."""
        return redis.Redis(
            host=self.host,
            port=self.port,
            decode_responses=True,
            socket_timeout=5,
            retry=Retry(NoBackoff(), 0),
        )

    def start(self, seconds: float = 30) -> RedisProcess:
        log = open(self.directory / "server.log", "a")  # noqa: SIM115 (the process keeps its own handle)
        self.process = subprocess.Popen(
            self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        try:
            wait_until(lambda: self.client().ping(), seconds, what=f"redis on port {self.port}")
        except BaseException:
            self.kill()  # one that never answered is not left behind
            raise
        return self

    def shutdown(self) -> None:
        """A clean stop: Redis fsyncs its AOF (and saves, if configured) before exiting."""
        try:
            self.client().shutdown()
        except redis.ConnectionError:
            pass
        self.process.wait(timeout=30)

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)


def commands_during(redis_client, action) -> Tally:
    """Redis commands the server executed while ``action`` ran (INFO itself left out)."""

    def calls():
        stats = redis_client.info("commandstats")
        return Tally(
            {
                name.removeprefix("cmdstat_"): value["calls"]
                for name, value in stats.items()
                if name != "cmdstat_info"
            }
        )

    before = calls()
    action()
    return calls() - before


class Topology:
    """Redis processes started together: a Cluster or a Sentinel setup, and its REDIS_URL."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.nodes: list[RedisProcess] = []
        self.url = ""

    def start(
        self, *args: str, port: int | None = None, config: str | None = None, name: str | None = None
    ) -> RedisProcess:
        node = RedisProcess(
            self.directory / (name or f"node-{len(self.nodes)}"), *args, port=port, config=config
        )
        self.nodes.append(node)
        return node.start()

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()


@contextmanager
def redis_cluster(directory: Path, replicas: int = 0):
    """Three masters, each with ``replicas`` replicas in sync, all 16384 slots covered;
    REDIS_URL ``redis+cluster://`` (every node)."""
    cluster = Topology(directory)
    try:
        for _ in range(3 * (1 + replicas)):
            cluster.start(
                "--cluster-enabled",
                "yes",
                "--cluster-node-timeout",
                "2000",
                *NOT_DURABLE,
                port=free_cluster_port(),
            )
        addresses = [f"127.0.0.1:{node.port}" for node in cluster.nodes]
        subprocess.run(
            [
                shutil.which("redis-cli"),
                "--cluster",
                "create",
                *addresses,
                "--cluster-replicas",
                str(replicas),
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        for node in cluster.nodes:
            wait_until(
                lambda: node.client().execute_command("CLUSTER INFO")["cluster_state"] == "ok",
                what="cluster_state:ok",
            )
        for node in cluster.nodes:
            wait_until(lambda: replicas_in_sync(node) in (0, replicas), what="replicas in sync")
        cluster.url = "redis+cluster://" + ",".join(addresses)
        yield cluster
    finally:
        cluster.stop()


def replicas_in_sync(node: RedisProcess) -> int | None:
    """A master's replicas that are online; 0 for a replica whose link is up; else None."""
    info = node.client().info("replication")
    if info["role"] == "master":
        links = [value for name, value in info.items() if name.startswith("slave")]
        return sum(1 for link in links if link["state"] == "online")
    return 0 if info.get("master_link_status") == "up" else None


def replicated_write(client: redis.Redis) -> bool:
    """True once the master accepts a write and its replica confirms it (WAIT)."""
    client.set("probe", "1")
    confirmed = client.wait(1, 100) == 1
    client.delete("probe")
    return confirmed


@contextmanager
def redis_sentinel(directory: Path):
    """Master + replica + one Sentinel (quorum 1); REDIS_URL ``redis+sentinel://…/sms``.

    The data nodes are configured as the README recommends: ``min-replicas-to-write 1`` (a
    master whose replica was promoted refuses writes instead of accepting ones the failover
    discards), ``repl-diskless-sync-delay 0`` (a rejoining replica syncs at once), and Sentinel
    runs ``config/sentinel-reconfig.sh`` (which needs redis-cli).
    """
    setup = Topology(directory)
    fenced = (
        "--min-replicas-to-write",
        "1",
        "--min-replicas-max-lag",
        "10",
        "--repl-diskless-sync-delay",
        "0",
        *NOT_DURABLE,
    )
    try:
        master = setup.start(*fenced)
        setup.start(*fenced, "--replicaof", "127.0.0.1", str(master.port))  # the replica
        wait_until(lambda: replicated_write(master.client()), what="a write confirmed by the replica")
        config = directory / "sentinel.conf"
        config.write_text(
            f"sentinel monitor sms 127.0.0.1 {master.port} 1\n"
            "sentinel down-after-milliseconds sms 1000\n"
            "sentinel failover-timeout sms 10000\n"
            f"sentinel client-reconfig-script sms {ROOT / 'config' / 'sentinel-reconfig.sh'}\n"
        )
        sentinel = setup.start("--sentinel", config=str(config), name="sentinel")
        wait_until(
            lambda: [
                r
                for r in sentinel.client().sentinel_slaves("sms")
                if r["flags"] == "slave" and r["master-link-status"] == "ok"
            ],
            what="Sentinel sees a good replica",
        )
        setup.sentinel = sentinel
        setup.url = f"redis+sentinel://127.0.0.1:{sentinel.port}/sms"
        yield setup
    finally:
        setup.stop()
