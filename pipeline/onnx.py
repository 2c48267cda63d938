"""ONNX Runtime sessions: one per model per worker process, provider chosen quietly.

CUDA is used only when onnxruntime can actually create a CUDA session (onnxruntime-gpu falls
back to the CPU silently when CUDA libraries are missing, so the providers of the session we
got are checked); otherwise the CPU. The choice is logged once per model, never printed.

On CUDA every call goes through an IO binding (:func:`run`): each input shape gets one device
buffer for the worker's life, filled in place, so a call allocates nothing but its outputs, and
:func:`run_batched` pads its last batch to the full batch size, so the stamp models see one
shape (cuDNN picks its algorithms once; the arena, capped at ``GPU_MEM_LIMIT``, holds one block
per tensor). On the CPU a binding gains nothing (the stamp models ran at the same speed either way),
so the CPU path keeps the plain ``InferenceSession.run``.
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
MAX_BINDINGS = 8  # IO bindings (device input buffers) kept per session


def _quiet(ort: Any) -> None:
    ort.set_default_logger_severity(3)  # errors only: no provider-fallback warnings on CPU hosts


def cuda_problem() -> str | None:
    """Why ONNX Runtime cannot run on CUDA on this host, or None when it can try (the CUDA provider
    is compiled in and a GPU device is visible; its libraries are only found when a session starts)."""
    import onnxruntime as ort

    _quiet(ort)
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return f"this onnxruntime ({ort.__version__}) has no CUDA provider (onnxruntime-gpu installs it)"
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return f"CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']!r} hides every GPU"
    if not any(Path(p).exists() for p in ("/dev/nvidia0", "/dev/nvidiactl")):
        return "no NVIDIA GPU is visible on this host (no /dev/nvidia0)"
    return None


def cuda_usable() -> bool:
    """True when the CUDA provider is compiled in and a GPU device is visible."""
    return cuda_problem() is None


def session(model_path: str | Path, device: str = "auto", threads: int = 1) -> Any:
    """A cached InferenceSession for ``model_path`` on ``device`` ('auto', 'cpu' or 'cuda')."""
    import onnxruntime as ort

    _quiet(ort)
    key = (str(Path(model_path).resolve()), device, threads)
    with _lock:
        if key in _sessions:
            return _sessions[key]
        want_cuda = device == "cuda" or (device == "auto" and cuda_usable())
        sess = _new_session(ort, model_path, threads, want_cuda)
        got = sess.get_providers()
        if want_cuda and "CUDAExecutionProvider" not in got:
            why = cuda_problem() or "its CUDA or cuDNN libraries are missing or do not match this onnxruntime"
            if device == "cuda":
                raise RuntimeError(f"CUDA requested for {model_path}, but onnxruntime cannot use it here: {why}; "
                                   f"it offered {got}")
            log.info("onnx model %s: CUDA did not start (%s); the CPU runs it", Path(model_path).name, why)
            sess = _new_session(ort, model_path, threads, False)  # with the CPU's own options
            got = sess.get_providers()
        log.info("onnx model %s runs on %s", Path(model_path).name, got[0])
        _sessions[key] = sess
        return sess


def _new_session(ort: Any, model_path: str | Path, threads: int, cuda: bool) -> Any:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    providers: list[Any] = ["CPUExecutionProvider"]
    if cuda:
        providers.insert(0, ("CUDAExecutionProvider", {"gpu_mem_limit": GPU_MEM_LIMIT,
                                                       "cudnn_conv_algo_search": "HEURISTIC",
                                                       "arena_extend_strategy": "kSameAsRequested"}))
        # a CUDA provider that cannot load its libraries logs an error and falls back: session() checks
        ort.set_default_logger_severity(4)
    else:
        # the memory pattern pre-plans one block per input shape on top of the arena: off, the artefact
        # U-Net peaks 148 MB lower on 1248^2 windows and the stamp CNNs 26-56 MB lower, at the same speed
        opts.enable_mem_pattern = False
    try:
        return ort.InferenceSession(str(model_path), sess_options=opts, providers=providers)
    finally:
        _quiet(ort)


def provider_of(sess: Any) -> str:
    return sess.get_providers()[0]


def on_cuda(sess: Any) -> bool:
    return provider_of(sess) == "CUDAExecutionProvider"


class _Binding:
    """An IO binding of ``sess`` with one buffer per input on the session's device, for one set of
    input shapes: a call copies the inputs into the buffers and the outputs back to the host."""

    def __init__(self, sess: Any, feeds: dict[str, np.ndarray], outputs: list[str]) -> None:
        import onnxruntime as ort

        device = "cuda" if on_cuda(sess) else "cpu"
        self.sess, self.io, self.buffers, self.lock = sess, sess.io_binding(), {}, threading.Lock()
        for name, v in feeds.items():
            buf = ort.OrtValue.ortvalue_from_shape_and_type(v.shape, v.dtype, device, 0)
            self.io.bind_ortvalue_input(name, buf)
            self.buffers[name] = buf
        for name in outputs:
            self.io.bind_output(name, device)

    def __call__(self, feeds: dict[str, np.ndarray], run_options: Any = None) -> list[np.ndarray]:
        with self.lock:  # one call at a time per buffer set (threads of one worker may share a session)
            for name, v in feeds.items():
                self.buffers[name].update_inplace(np.ascontiguousarray(v))
            self.sess.run_with_iobinding(self.io, run_options)
            return self.io.copy_outputs_to_cpu()


def run(sess: Any, feeds: dict[str, np.ndarray], outputs: Iterable[str] | None = None, run_options: Any = None,
        bind: bool | None = None) -> list[np.ndarray]:
    """``sess.run`` on the host, or through a cached IO binding (``bind``; default: on CUDA only).

    Bindings are kept per session, input shapes and outputs (a tile's U-Net windows come in at
    most four shapes, the stamp models' padded batches in one), the ``MAX_BINDINGS`` latest."""
    names = list(outputs) if outputs else [o.name for o in sess.get_outputs()]
    if not (on_cuda(sess) if bind is None else bind):
        return sess.run(names, feeds, run_options)
    cache = sess.__dict__.setdefault("_surveypipe_bindings", {})
    key = (tuple((k, v.shape, v.dtype.str) for k, v in sorted(feeds.items())), tuple(names))
    with _lock:
        binding = cache.pop(key, None) or _Binding(sess, feeds, names)
        cache[key] = binding  # the most recent last
        while len(cache) > MAX_BINDINGS:
            cache.pop(next(iter(cache)))
    return binding(feeds, run_options)


def run_into(sess: Any, feeds: dict[str, np.ndarray], out: np.ndarray, output: str | None = None) -> np.ndarray:
    """``sess.run`` on the host for one output, which ONNX Runtime writes straight into ``out`` (C-contiguous,
    writeable, the output's shape and dtype), and return ``out``.

    A plain run makes the output in the session's arena and copies it into a new array. For the artefact
    U-Net's (7, 1136, 1136) window output that is 36 MB twice. Bound to a buffer the stage reuses,
    the stage peaked 33 MB lower on a 2048² × 6 tile. Its CPU time was about 3 % higher (median of
    eight tile timings from alternating runs, 8.83 against 8.55 s), inside the VM's run-to-run spread."""
    if not (out.flags.c_contiguous and out.flags.writeable):
        raise ValueError("run_into: the output buffer must be C-contiguous and writeable")
    io = sess.io_binding()
    for name, v in feeds.items():
        io.bind_cpu_input(name, np.ascontiguousarray(v))
    io.bind_output(output or sess.get_outputs()[0].name, "cpu", 0, out.dtype, list(out.shape), out.ctypes.data)
    sess.run_with_iobinding(io)
    return out


def run_batched(sess: Any, inputs: dict[str, np.ndarray], batch: int = 256,
                outputs: Iterable[str] | None = None, release: bool = True, bind: bool | None = None) -> list[np.ndarray]:
    """Run ``sess`` over the leading axis of every input in batches; concatenate the outputs.

    With ``release`` the last batch hands the memory arena's unused chunks back (per-batch
    shrinking would cost ~30 % on small batches; keeping the arena would hold one batch's peak
    activations for the rest of the worker's life). Through an IO binding (``bind``, default on
    CUDA) every batch has the full size: a short last batch is padded with copies of its last
    row, whose outputs are dropped."""
    n = len(next(iter(inputs.values())))
    names = list(outputs) if outputs else [o.name for o in sess.get_outputs()]
    if n == 0:
        return [np.zeros((0,) + tuple(d if isinstance(d, int) else 0 for d in o.shape[1:]), np.float32)
                for o in sess.get_outputs() if o.name in names]
    fixed = on_cuda(sess) if bind is None else bind
    parts: list[list[np.ndarray]] = [[] for _ in names]
    for i in range(0, n, batch):
        last = i + batch >= n
        feeds = {k: v[i:i + batch] for k, v in inputs.items()}
        m = len(next(iter(feeds.values())))
        if fixed and m < batch:
            feeds = {k: np.concatenate([v, np.repeat(v[-1:], batch - m, axis=0)]) for k, v in feeds.items()}
        res = run(sess, feeds, names, shrinking_run_options() if release and last else None, bind=fixed)
        for j, r in enumerate(res):
            parts[j].append(r[:m])
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
