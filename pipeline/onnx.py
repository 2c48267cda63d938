"""ONNX Runtime sessions: one per model per worker process, provider chosen quietly.

CUDA is used only when onnxruntime can actually create a CUDA session (onnxruntime-gpu falls
back to the CPU silently when CUDA libraries are missing, so the providers of the session we
got are checked); otherwise the CPU. The choice is logged once per model, never printed.
"""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any, Iterable

import numpy as np

log = logging.getLogger("surveypipe.onnx")
_sessions: dict[tuple[str, str, int], Any] = {}
_lock = threading.Lock()
GPU_MEM_LIMIT = 4 << 30


def _quiet(ort: Any) -> None:
    ort.set_default_logger_severity(3)  # errors only: no provider-fallback warnings on CPU hosts


def cuda_usable() -> bool:
    """True when the CUDA provider is compiled in and a GPU device is visible."""
    import onnxruntime as ort

    _quiet(ort)
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return any(Path(p).exists() for p in ("/dev/nvidia0", "/dev/nvidiactl"))


def session(model_path: str | Path, device: str = "auto", threads: int = 1) -> Any:
    """A cached InferenceSession for ``model_path`` on ``device`` ('auto', 'cpu' or 'cuda')."""
    import onnxruntime as ort

    _quiet(ort)
    key = (str(Path(model_path).resolve()), device, threads)
    with _lock:
        if key in _sessions:
            return _sessions[key]
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        want_cuda = device == "cuda" or (device == "auto" and cuda_usable())
        if not want_cuda:
            # the memory pattern pre-plans one block per input shape on top of the arena: off, the artefact
            # U-Net peaks 148 MB lower on 1248^2 windows and the stamp CNNs 26-56 MB lower, at the same speed
            opts.enable_mem_pattern = False
        providers: list[Any] = ["CPUExecutionProvider"]
        if want_cuda:
            providers.insert(0, ("CUDAExecutionProvider", {"gpu_mem_limit": GPU_MEM_LIMIT,
                                                           "cudnn_conv_algo_search": "HEURISTIC",
                                                           "arena_extend_strategy": "kSameAsRequested"}))
        sess = ort.InferenceSession(str(model_path), sess_options=opts, providers=providers)
        got = sess.get_providers()
        if device == "cuda" and "CUDAExecutionProvider" not in got:
            raise RuntimeError(f"CUDA requested for {model_path} but onnxruntime gave {got}")
        log.info("onnx model %s runs on %s", Path(model_path).name, got[0])
        _sessions[key] = sess
        return sess


def provider_of(sess: Any) -> str:
    return sess.get_providers()[0]


def run_batched(sess: Any, inputs: dict[str, np.ndarray], batch: int = 256,
                outputs: Iterable[str] | None = None, release: bool = True) -> list[np.ndarray]:
    """Run ``sess`` over the leading axis of every input in batches; concatenate the outputs.

    With ``release`` the last batch hands the memory arena's unused chunks back (per-batch
    shrinking would cost ~30 % on small batches; keeping the arena would hold one batch's peak
    activations for the rest of the worker's life)."""
    n = len(next(iter(inputs.values())))
    names = list(outputs) if outputs else [o.name for o in sess.get_outputs()]
    if n == 0:
        return [np.zeros((0,) + tuple(d if isinstance(d, int) else 0 for d in o.shape[1:]), np.float32)
                for o in sess.get_outputs() if o.name in names]
    parts: list[list[np.ndarray]] = [[] for _ in names]
    for i in range(0, n, batch):
        last = i + batch >= n
        res = sess.run(names, {k: v[i:i + batch] for k, v in inputs.items()},
                       shrinking_run_options() if release and last else None)
        for j, r in enumerate(res):
            parts[j].append(r)
    return [np.concatenate(p) for p in parts]


def clear_sessions() -> None:
    with _lock:
        _sessions.clear()


def shrinking_run_options() -> Any:
    """RunOptions that hand the memory arena's unused chunks back after each run: for large
    activations (image models on big patches) the arena would otherwise keep the peak of one
    call for the rest of the worker's life, on top of the later stages' memory."""
    import onnxruntime as ort

    ro = ort.RunOptions()
    ro.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0;gpu:0")
    return ro
