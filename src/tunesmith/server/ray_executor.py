"""Run `tunesmith train` on a Ray cluster's machines: ``tunesmith server --ray ADDRESS``.

The executor connects to a cluster that is already running (``ray start --head`` on one machine,
``ray start --address=HEAD:6379`` on the others); it never starts one. Each training is a Ray actor
(one per job) that starts the same `TrainProcess` as `LocalExecutor` does, on whichever node Ray
placed it:

- **Resources.** With GPUs in the cluster, a slot is one GPU: the actor asks for ``num_gpus=1`` and
  the child inherits the ``CUDA_VISIBLE_DEVICES`` Ray set for the actor (the slot's name is only a
  token). Without GPUs, a slot is one node (its slot name is the node's id) and the actor asks for all
  of that node's CPUs, with a soft affinity to it: one training per machine, as on one machine, and
  nothing else of Ray's shares it. If that node is gone, the actor goes to any node with as many
  CPUs. Nodes with no CPUs (a head started with ``--num-cpus=0``) are not slots.
- **Storage.** The log, the working folder and every path in the command (the config, the run folder,
  the data, the model) must be on storage that all nodes mount at the same path, and the nodes must run
  the same install of tunesmith at the same path as this process (the command starts with this
  interpreter's path). The child's environment is the Ray worker's (that of ``ray start`` on its node)
  plus ``env``; relative paths resolve against this process's working folder.
- **Stopping.** ``terminate()`` calls the actor, which sends SIGTERM to the child: it checkpoints and
  exits with 143. The actor is threaded (``max_concurrency=2``) so that this call is served even while
  another one is. The actor is killed (``ray.kill``) by the first ``poll()`` that sees the exit.
- **A lost actor.** If the actor died (its node was lost, or it could not start the child: a path
  missing on that node), ``poll()`` returns `EXIT_LOST` (a failure) and appends the reason to the log.
- **When this process disconnects or dies.** The actors are not detached: Ray kills them when their
  driver (this process) disconnects (``close()``) or dies. Each child then gets SIGTERM as its parent
  dies (``TrainProcess``'s parent-death signal) and checkpoints, exactly as a local child does when the
  server dies. For that the actors run with ``RAY_kill_child_processes_on_worker_exit=0``: by default
  Ray SIGKILLs a dying worker's child processes, which would lose the training since its last
  checkpoint (tests/server/test_ray_executor.py plants that default and sees the SIGTERM go missing).
  A restarted server therefore resumes the jobs from their checkpoints on shared storage.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from tunesmith.errors import TunesmithError
from tunesmith.launch import TrainProcess

if TYPE_CHECKING:
    from ray import ObjectRef
    from ray.actor import ActorHandle

# poll()'s code for a training whose actor died without reporting the child's exit (node lost, or the
# child could not be started there): a failure, like ssh's 255 for a lost connection.
EXIT_LOST = 255
# Set in the actors' workers: Ray must not SIGKILL the child when the actor dies (see the module's docstring).
ACTOR_ENV = {"RAY_kill_child_processes_on_worker_exit": "0"}


def import_ray() -> ModuleType:
    """Ray, or an error that says how to install it (it is the optional extra ``ray``)."""
    try:
        import ray
    except ImportError as error:
        raise TunesmithError(f"running jobs on a Ray cluster needs Ray ({error}): pip install 'tunesmith[ray]'") \
            from error
    return ray


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Raise a `TunesmithError` unless something listens at ``address`` (``HOST:PORT`` or
    ``ray://HOST:PORT``): ``ray.init`` itself retries an unreachable address for minutes."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise TunesmithError(f"--ray {address!r}: expected the HOST:PORT of a running Ray cluster's head "
                             "(6379 unless `ray start --head --port` said otherwise), or 'auto'")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as error:
        raise TunesmithError(f"cannot reach the Ray cluster at {address} ({error}): start it with "
                             "`ray start --head` on that machine, or pass the address `ray start` printed") from error


class TrainingActor:
    """The body of the Ray actor: one `tunesmith train` child on the node Ray placed the actor on."""

    def __init__(self, command: Sequence[str], log: Path, cwd: Path, env: dict[str, str] | None):
        # The constructor runs on the worker's main thread, which lives as long as the worker: the
        # parent-death signal follows the thread that started the child, so no pool thread may start it.
        # No slot: the child keeps the CUDA_VISIBLE_DEVICES that Ray set for this actor.
        self.process = TrainProcess(command, log, None, cwd, env)

    def poll(self) -> int | None:
        return self.process.poll()

    def terminate(self) -> None:
        self.process.terminate()


class RayTraining:
    """A training started by `RayExecutor`: the handle the job queue polls and terminates."""

    def __init__(self, ray: ModuleType, actor: ActorHandle, log: Path, timeout_s: float):
        self.ray, self.actor, self.log, self.timeout_s = ray, actor, log, timeout_s
        self._asking: ObjectRef | None = None  # an unanswered poll() call: asked again, never twice
        self._code: int | None = None
        self._lock = threading.Lock()

    def poll(self) -> int | None:
        """The child's exit code; None while it runs, and while the actor waits for resources or does not
        answer within ``timeout_s``; `EXIT_LOST` if the actor died."""
        with self._lock:
            if self._code is not None:
                return self._code
            if self._asking is None:
                self._asking = self.actor.poll.remote()
            ready, _ = self.ray.wait([self._asking], timeout=self.timeout_s)
            if not ready:
                return None
            asked, self._asking = self._asking, None
            code = self._answer(asked)
            if code is not None:
                self._code = code
                self.ray.kill(self.actor)
            return code

    def _answer(self, asked: ObjectRef) -> int | None:
        from ray.exceptions import ActorUnavailableError, RayActorError

        try:
            return self.ray.get(asked)
        except ActorUnavailableError:  # unreachable for now (a network blip): ask again
            return None
        except RayActorError as error:
            try:
                with self.log.open("a", encoding="utf-8") as log:
                    log.write(f"\ntunesmith: the Ray actor running this training died (its node was lost, or it "
                              f"could not start the training there); exit code {EXIT_LOST}:\n{error}\n")
            except OSError:  # the log's folder is not on this machine's storage: the code says enough
                pass
            return EXIT_LOST

    def terminate(self) -> None:
        """SIGTERM to the child, through the actor (waits up to ``timeout_s`` for the actor to take it; an
        actor still waiting for resources takes it once placed, and its child then stops at once)."""
        from ray.exceptions import RayActorError

        if self._code is not None:
            return
        sent = self.actor.terminate.remote()
        ready, _ = self.ray.wait([sent], timeout=self.timeout_s)
        if ready:
            try:
                self.ray.get(sent)
            except RayActorError:  # it died: the next poll() reports it
                pass


class RayExecutor:
    """Trainings as Ray actors on an existing cluster at ``address`` (``HOST:PORT``, ``ray://HOST:PORT``
    or ``auto``); see the module's docstring for resources, storage and what a disconnect does."""

    def __init__(self, address: str, timeout_s: float = 1.0):
        self.ray = import_ray()
        if address != "auto":
            check_reachable(address)
        if self.ray.is_initialized():
            raise TunesmithError("this process is already connected to Ray: one RayExecutor per process")
        try:
            self.ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as error:
            raise TunesmithError(f"cannot connect to the Ray cluster at {address}: {error}") from error
        self.address, self.timeout_s = address, timeout_s
        self._actor_class = self.ray.remote(TrainingActor)

    def _nodes(self) -> list[dict[str, Any]]:
        return [node for node in self.ray.nodes() if node["Alive"]]

    def _gpus(self) -> int:
        return int(sum(node["Resources"].get("GPU", 0) for node in self._nodes()))

    def _cpu_nodes(self) -> dict[str, int]:
        """Node id -> CPUs, for each alive node with at least one CPU."""
        cpus = {node["NodeID"]: int(node["Resources"].get("CPU", 0)) for node in self._nodes()}
        return {node: count for node, count in cpus.items() if count >= 1}

    def slots(self) -> list[str | None]:
        """One per GPU in the cluster (``gpu0``, ``gpu1``, ...: Ray picks the GPU), or one per alive node
        with CPUs (its node id) in a cluster without GPUs."""
        gpus = self._gpus()
        if gpus:
            return [f"gpu{index}" for index in range(gpus)]
        return list(self._cpu_nodes())

    def _placement(self, slot: str | None) -> dict[str, Any]:
        """The actor's resource request for ``slot``: one GPU, or one node's CPUs."""
        if self._gpus():
            return {"num_gpus": 1}
        nodes = self._cpu_nodes()
        if not nodes:
            raise TunesmithError(f"the Ray cluster at {self.address} has no alive node with CPUs or GPUs")
        if slot not in nodes:  # the slot's node is gone: any node, as large as the smallest
            return {"num_cpus": min(nodes.values())}
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        return {"num_cpus": nodes[slot], "scheduling_strategy": NodeAffinitySchedulingStrategy(slot, soft=True)}

    def start(self, command: Sequence[str], log: Path, slot: str | None, cwd: Path | None = None,
              env: dict[str, str] | None = None) -> RayTraining:
        log = Path(log).absolute()
        actor = self._actor_class.options(
            max_concurrency=2, runtime_env={"env_vars": ACTOR_ENV}, **self._placement(slot),
        ).remote(list(command), log, Path(cwd or os.getcwd()).absolute(), env)
        return RayTraining(self.ray, actor, log, self.timeout_s)

    def close(self) -> None:
        """Disconnect. Ray then kills the actors of trainings still running, and each child checkpoints
        and stops on its parent-death SIGTERM (as when the server process dies)."""
        if self.ray.is_initialized():
            self.ray.shutdown()
