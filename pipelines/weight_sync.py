"""Weights from the RL trainer into the live rollout engines, the trainer side (`rec/engines/weight_sync.py` is
the engine side). One interface, `WeightPusher.push()`, called on every trainer rank after each policy update; the
backend comes from `rollout.weight_sync` in the RL config:

- `files` (CPU and GPU, in and out of process): the policy's parameters are gathered one layer group at a time
  (ZeRO-3 gathers collectively, so every rank walks the same groups); trainer rank 0 writes the group as one
  safetensors shard under `directory`, every rollout engine loads it memory-mapped, the shard is deleted, and the
  next group follows. Host memory on either side: about one layer group beyond the engine's own weights. Only file
  names cross vLLM's RPC. The directory must be readable by every rollout actor: node-local (the default, under the
  system temp dir) when trainer rank 0 and the actors share a node, a shared mount otherwise; `push` checks.
- `nccl` (GPUs): vLLM 0.32's weight transfer API. Trainer rank 0 joins one NCCL group with every engine's workers
  (`NCCLTrainerWeightTransferEngine`), then each update broadcasts the gathered groups from its GPU; the engines load
  them as they arrive. Nothing goes through the object store or the host.

Both end with the engines' prefix caches reset.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch
from pydantic import Field

from rec.config import ConfigError, Section

log = logging.getLogger("gr2.weight_sync")

_LAYER = re.compile(r"^(.*?\blayers\.\d+)\.")


class WeightSyncSection(Section):
    """How the trainer's new weights reach the rollout engines after each policy update."""

    backend: Literal["files", "nccl"] = "files"
    """files: safetensors shards through a directory the engines read (CPU or GPU); nccl: vLLM's weight transfer API,
    a broadcast from trainer rank 0's GPU (GPU engines only)."""
    directory: str | None = None
    """files: where shards are written (null: a folder under the system temp dir of trainer rank 0's node, which
    needs the rollout actors on that node; give a shared mount when they are elsewhere)."""
    shared_directory: bool = False
    """files: true when `directory` is a mount every node sees (then actors on other nodes are allowed)."""
    nccl_port: int | None = Field(default=None, ge=1024, le=65535)
    """nccl: TCP port of the rendezvous on trainer rank 0's node (null: a free port)."""


def layer_groups(names: Sequence[str]) -> list[list[str]]:
    """Parameter names grouped by transformer layer (`...layers.N.`), everything else one name per group, in order.

    >>> layer_groups(["model.embed_tokens.weight", "model.layers.0.a", "model.layers.0.b", "model.layers.1.a",
    ...               "model.norm.weight"])
    [['model.embed_tokens.weight'], ['model.layers.0.a', 'model.layers.0.b'], ['model.layers.1.a'], ['model.norm.weight']]
    """
    groups: list[list[str]] = []
    last = None
    for name in names:
        match = _LAYER.match(name)
        key = match.group(1) if match else None
        if key is not None and key == last:
            groups[-1].append(name)
        else:
            groups.append([name])
        last = key
    return groups


class PolicyWeights:
    """The policy's weights as a stream of layer groups, gathered from ZeRO-3 shards as needed.

    Names are the HF checkpoint names, tied weights under each of their names (vLLM restores a tied LM head from the
    embeddings only when it is named). Call `groups()` on every rank in the same order: under ZeRO-3 each group's
    gather is a collective. Rank 0 gets the full tensors; other ranks get None.
    """

    def __init__(self, module: torch.nn.Module, zero_stage: int, rank: int):
        self.module, self.zero_stage, self.rank = module, zero_stage, rank
        self.params = dict(module.named_parameters(remove_duplicate=False))

    def metadata(self) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        """(name, dtype, full shape) of every tensor, in stream order, without gathering."""
        return [(name, p.dtype, tuple(getattr(p, "ds_shape", p.shape))) for name, p in self.params.items()]

    def groups(self) -> Iterator[tuple[list[str], list[torch.Tensor] | None]]:
        """(names, tensors) per layer group; the tensors are valid until the next group is asked for."""
        import contextlib

        for names in layer_groups(list(self.params)):
            params = [self.params[n] for n in names]
            gather = contextlib.nullcontext()
            if self.zero_stage == 3:
                import deepspeed

                gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
            with gather:
                yield names, [p.detach() for p in params] if self.rank == 0 else None

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor | None]]:
        for names, tensors in self.groups():
            for i, name in enumerate(names):
                yield name, tensors[i] if tensors is not None else None


def default_directory() -> str:
    return os.path.join(tempfile.gettempdir(), "gr2-weight-sync")


class WeightPusher:
    """Pushes `PolicyWeights` into rollout actors (`pipelines.rl_rollout.RolloutWorker` handles). Build it on every
    trainer rank; `push` is collective (every rank must call it)."""

    def __init__(self, cfg: WeightSyncSection, actors: list, rank: int, tp_sizes: Sequence[int] | None = None):
        self.cfg, self.actors, self.rank = cfg, actors, rank
        self.tp_sizes = list(tp_sizes or [1] * len(actors))
        self.nccl = None
        self.directory = None
        if cfg.backend == "files" and rank == 0:
            self.directory = os.path.join(cfg.directory or default_directory(), uuid.uuid4().hex[:12])
            self._check_actors_see(self.directory)

    def _check_actors_see(self, directory: str) -> None:
        import ray

        if self.cfg.shared_directory:
            return
        here = ray.get_runtime_context().get_node_id()
        nodes = ray.get([a.node_id.remote() for a in self.actors])
        elsewhere = [i for i, node in enumerate(nodes) if node != here]
        if elsewhere:
            raise ConfigError(
                f"rollout.weight_sync.backend=files writes shards to {directory} on trainer rank 0's node, but rollout "
                f"actor(s) {elsewhere} run on other nodes: set rollout.weight_sync.directory to a mount every node sees "
                "(and shared_directory=true), or use backend=nccl on GPUs")

    def push(self, weights: PolicyWeights) -> dict[str, float]:
        """All of `weights` into every engine; returns {"push_s", "tensors", "bytes"} (on rank 0; zeros elsewhere)."""
        start = time.perf_counter()
        if self.cfg.backend == "files":
            tensors, size = self._push_files(weights)
        else:
            tensors, size = self._push_nccl(weights)
        return {"push_s": time.perf_counter() - start, "tensors": tensors, "bytes": size}

    def _push_files(self, weights: PolicyWeights) -> tuple[int, int]:
        import ray
        from safetensors.torch import save_file

        if self.rank != 0:
            for _ in weights.groups():  # keep in step with rank 0's gathers
                pass
            return 0, 0
        os.makedirs(self.directory, exist_ok=True)
        ray.get([a.start_file_weight_update.remote() for a in self.actors])
        tensors = size = 0
        try:
            for index, (names, group) in enumerate(weights.groups()):
                path = os.path.join(self.directory, f"group-{index:05d}.safetensors")
                # contiguous copies only where needed; tied names get separate entries (safetensors refuses shared
                # storage within one file, and a group holds one name per tensor here)
                save_file({n: t.contiguous() for n, t in zip(names, group)}, path)
                size += os.path.getsize(path)
                loaded = ray.get([a.load_weight_files.remote([path]) for a in self.actors])
                if any(count != len(names) for count in loaded):
                    raise RuntimeError(f"{path}: engines loaded {loaded} of {len(names)} tensors")
                os.remove(path)
                tensors += len(names)
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)
        ray.get([a.finish_file_weight_update.remote() for a in self.actors])
        return tensors, size

    # --- nccl (GPU) ----------------------------------------------------------------------------------------------

    def _push_nccl(self, weights: PolicyWeights) -> tuple[int, int]:
        if self.nccl is None:
            self.nccl = self._nccl_engine(weights)
        self.nccl.source = _VllmSource(weights)
        self.nccl.send_weights()
        if self.rank != 0:
            return 0, 0
        meta = weights.metadata()
        return len(meta), sum(torch.Size(shape).numel() * dtype.itemsize for _, dtype, shape in meta)

    def _nccl_engine(self, weights: PolicyWeights):
        import ray
        from vllm.distributed.weight_transfer import WeightTransferTrainerFactory
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

        address, port = None, 0
        if self.rank == 0:
            address = ray.util.get_node_ip_address()
            port = self.cfg.nccl_port or _free_port()
        info = NCCLTrainerInitInfo(master_address=address or "", master_port=port, world_size=1 + sum(self.tp_sizes),
                                   rank=self.rank)
        return WeightTransferTrainerFactory.trainer_init(info, client=RolloutFleetClient(self.actors, self.tp_sizes),
                                                         source=_VllmSource(weights))


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _VllmSource(weights: PolicyWeights):
    """`weights` as a `vllm.distributed.weight_transfer.WeightSource` (what vLLM's trainer engines iterate)."""
    from vllm.distributed.weight_transfer import ParamMeta, WeightSource

    class Source(WeightSource):
        def metadata(self):
            return [ParamMeta(name, dtype, shape) for name, dtype, shape in weights.metadata()]

        def __iter__(self):
            # rank 0 broadcasts each tensor while its group is gathered; clone so the packed sender may hold it
            for name, tensor in weights:
                yield name, tensor.clone() if tensor is not None else None

    return Source()


class RolloutFleetClient:
    """vLLM's `VLLMWeightSyncClient` protocol over several rollout actors, each one engine: every call fans out and
    waits for all. vLLM's trainer engine places the engines' workers at rank offset 1; with several engines each
    gets its own offset (1, 1 + tp_0, ...), so that all of them share one NCCL group with the trainer."""

    def __init__(self, actors: list, tp_sizes: Sequence[int]):
        self.actors, self.tp_sizes = actors, list(tp_sizes)

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        import ray

        refs, offset = [], int(init_info.get("rank_offset", 1))
        for actor, tp in zip(self.actors, self.tp_sizes):
            refs.append(actor.init_weight_transfer_engine.remote({**init_info, "rank_offset": offset}))
            offset += tp
        ray.get(refs)

    def start_weight_update(self) -> None:
        import ray

        ray.get([a.start_weight_update.remote() for a in self.actors])

    def update_weights(self, update_info) -> None:
        import ray

        ray.get([a.update_weights.remote(update_info) for a in self.actors])

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        import ray

        ray.get([a.finish_weight_update.remote() for a in self.actors])
