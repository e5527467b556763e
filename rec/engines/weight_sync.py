"""Weights into live vLLM engines (RL), the engine side: new policy weights without restarting the engine.

Only control messages cross vLLM's RPC (`LLM.collective_rpc` msgpack-encodes its arguments when the engine runs
out of process, as on GPUs, and refuses byte strings over 4 GiB); the weights themselves travel by one of two
backends, chosen by the RL config (`rollout.weight_sync.backend`; the trainer side is `pipelines/weight_sync.py`):

- `files`: the trainer writes the weights as safetensors shards, one layer group at a time, into a directory the
  engine can read (node-local when trainer and engines share a node, a shared mount otherwise); each engine is sent
  the shard's name and loads it memory-mapped (`WeightSyncExtension`), then the trainer deletes it and writes the
  next. Neither side ever holds more than one layer group beyond the engine's own weights. Works on CPU and GPU, in
  and out of process.
- `nccl`: vLLM's weight transfer API (`LLM(weight_transfer_config={"backend": "nccl"})`,
  `init_weight_transfer_engine` / `start_weight_update` / `update_weights` / `finish_weight_update`): trainer rank 0
  broadcasts each tensor from its GPU to every engine's GPUs. GPU only.

After either, the prefix cache is reset: cached prefixes hold KV computed with the old weights. vLLM is imported
inside functions only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

WEIGHT_SYNC_EXTENSION = "rec.engines.weight_sync.WeightSyncExtension"
"""Pass as `start_llm(..., worker_extension_cls=WEIGHT_SYNC_EXTENSION)` to update weights in place from files."""


class WeightSyncExtension:
    """vLLM worker extension (vLLM mixes it into its worker class, in the engine's own process): one weight update
    session fed shard by shard, as vLLM's own transfer engines do (`initialize_layerwise_reload`, `load_weights` per
    chunk, `finalize_layerwise_reload`). With tensor parallelism every worker reads every shard and keeps its slice
    (vLLM's weight loaders shard as they load)."""

    def start_file_weight_update(self) -> None:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        with set_current_vllm_config(self.vllm_config):
            initialize_layerwise_reload(self.model_runner.get_model())

    def load_weight_files(self, files: Sequence[str]) -> int:
        """Load safetensors shards (memory-mapped, one tensor at a time); returns the tensors loaded."""
        from safetensors import safe_open
        from vllm.config import set_current_vllm_config

        model, loaded = self.model_runner.get_model(), 0
        with set_current_vllm_config(self.vllm_config):
            for path in files:
                with safe_open(path, framework="pt", device="cpu") as shard:
                    for name in shard.keys():
                        model.load_weights([(name, shard.get_tensor(name))])
                        loaded += 1
        return loaded

    def finish_file_weight_update(self) -> None:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        with set_current_vllm_config(self.vllm_config):
            finalize_layerwise_reload(self.model_runner.get_model(), self.vllm_config.model_config)


class FileWeightUpdate:
    """One weight update of a live engine started with `WEIGHT_SYNC_EXTENSION`, from files:
    `start()`, `load(files)` as each shard is written (the trainer deletes it after), `finish()` (which also drops
    cached prefixes)."""

    def __init__(self, llm):
        self.llm = llm

    def start(self) -> None:
        self.llm.collective_rpc("start_file_weight_update")

    def load(self, files: Sequence[str]) -> int:
        return int(self.llm.collective_rpc("load_weight_files", args=(list(files),))[0])

    def finish(self) -> None:
        self.llm.collective_rpc("finish_file_weight_update")
        self.llm.reset_prefix_cache()


class FileWeightUpdateActor:
    """The three methods `pipelines.weight_sync.WeightPusher` calls on an actor for the files backend, for any actor
    class holding its engine as `self.llm` (the RL rollout actors, the weight-sync benchmark's engine actor)."""

    def start_file_weight_update(self) -> None:
        self._file_update = FileWeightUpdate(self.llm)
        self._file_update.start()

    def load_weight_files(self, files: list[str]) -> int:
        return self._file_update.load(files)

    def finish_file_weight_update(self) -> None:
        self._file_update.finish()
        self._file_update = None


def nccl_engine_args() -> dict[str, Any]:
    """`vllm.LLM` arguments that let an engine receive weights over NCCL (vLLM's weight transfer API)."""
    return {"weight_transfer_config": {"backend": "nccl"}}


def completion_logprobs(llm, prompt_ids: Sequence[int], completion_ids: Sequence[int]) -> list[float]:
    """The engine's log-probability of each completion token after the prompt (prompt log-probs of the joined
    sequence, raw logits): what the trainer's model must reproduce once the weights are synced."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    ids = list(prompt_ids) + list(completion_ids)
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
    output = llm.generate([TokensPrompt(prompt_token_ids=ids)], params, use_tqdm=False)[0]
    return [output.prompt_logprobs[i][ids[i]].logprob for i in range(len(prompt_ids), len(ids))]
