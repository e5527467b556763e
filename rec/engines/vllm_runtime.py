"""Starting vLLM engines: one place that sets what vLLM reads from the environment when an engine starts.

`start_llm` builds a `vllm.LLM` in this process (CPU default: ~2 s start) or in vLLM's multi-process engine (GPU
default, and what a CPU test of the GPU topology uses: the engine core runs in a child process, so every argument
crosses a msgpack boundary and environment variables are read there). `claim_cpu_cores` gives each engine on a node
cores of its own. vLLM is imported inside functions only.
"""

from __future__ import annotations

import os
from typing import Any


def engine_setup(engine_args: dict[str, Any], kv_cache_memory_bytes: int | None, cpu_cores: str | None,
                 in_process: bool) -> dict[str, Any]:
    """Set what vLLM reads from the environment when an engine starts, and this project's engine defaults (eager,
    prefix cache, the KV cache size); returns `engine_args` with them. Shared by `start_llm` and
    `rec.engines.async_reranker.start_async_llm` (whose engine is never in process)."""
    if cpu_cores is not None:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_cores
    if engine_args.get("logits_processors"):
        # Custom processors here use the V1 interface (`vllm.v1.sample.logits_processor`); GPU builds default to
        # Model Runner V2, which has its own. The CPU runner is V1 either way.
        os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    # Set both ways: the variable is process-wide, and an earlier in-process engine of this process set it to 0.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if in_process else "1"
    if kv_cache_memory_bytes is not None:
        engine_args["kv_cache_memory_bytes"] = kv_cache_memory_bytes
    engine_args.setdefault("enforce_eager", True)
    engine_args.setdefault("enable_prefix_caching", True)
    return engine_args


def start_llm(
    model: str,
    max_model_len: int,
    kv_cache_memory_bytes: int | None = None,
    dtype: str = "float32",
    cpu_cores: str | None = None,
    in_process: bool = True,
    **engine_args: Any,
):
    """A `vllm.LLM` for `model` (a local HF checkpoint or hub id).

    `cpu_cores` (e.g. "0", "2-3" or "0,2") binds vLLM's OpenMP threads on CPU builds (VLLM_CPU_OMP_THREADS_BIND; vLLM binds
    every engine to core 0 otherwise); `in_process` runs the engine core in this process (no engine subprocess:
    ~2 s start instead of ~20 s on CPU); `in_process=False` is vLLM's multi-process engine, what GPUs run. Both are
    environment settings vLLM reads when the engine starts.
    """
    engine_args = engine_setup(engine_args, kv_cache_memory_bytes, cpu_cores, in_process)
    if in_process:
        engine_args.setdefault("distributed_executor_backend", "uni")
    from vllm import LLM

    return LLM(model=model, dtype=dtype, max_model_len=max_model_len, **engine_args)


def out_of_process(llm) -> bool:
    """Whether `llm`'s engine core runs in a child process (vLLM's multi-process engine, as on GPUs)."""
    return type(llm.llm_engine.engine_core).__name__ != "InprocClient"


def claim_cpu_cores(count: int, lock_dir: str | None = None) -> tuple[str, Any] | None:
    """Reserve `count` cores of this node for one engine: (VLLM_CPU_OMP_THREADS_BIND value, lock to keep open).

    Engines on one node (e.g. the actors of a Ray Data pool, which are not numbered) take consecutive blocks of the
    cores this process may run on, first come first served, through exclusive file locks that the OS releases when
    the process exits. Returns None when every block is taken (more engines than cores: leave the binding to vLLM).
    """
    import fcntl
    import tempfile

    cores = sorted(os.sched_getaffinity(0))
    directory = lock_dir or os.path.join(tempfile.gettempdir(), "gr2-vllm-cores")
    os.makedirs(directory, exist_ok=True)
    for start in range(0, len(cores) - count + 1, count):
        block = cores[start : start + count]
        handle = open(os.path.join(directory, f"cores-{block[0]}-{block[-1]}.lock"), "w")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            continue
        return ",".join(map(str, block)), handle
    return None
