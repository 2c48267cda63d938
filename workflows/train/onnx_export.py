"""Shared training tail: export a torch model to ONNX, check it against torch, write the card."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pipeline.modelcard import ModelCard, sha256_file, write_card


def export_onnx(model: Any, example: Sequence[Any], path: str | Path, *, input_names: list[str],
                output_names: list[str], dynamic_axes: dict[str, dict[int, str]], opset: int = 17) -> Path:
    """Export ``model`` (eval mode) with the given dynamic axes (batch, and spatial if needed)."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    with torch.no_grad():
        torch.onnx.export(model, tuple(example), str(path), input_names=input_names, output_names=output_names,
                          dynamic_axes=dynamic_axes, opset_version=opset, dynamo=False)
    return path


def max_abs_diff_onnx_torch(model: Any, path: str | Path, inputs: dict[str, np.ndarray]) -> float:
    """Largest |onnxruntime − torch| over every output on fresh inputs (what the card reports)."""
    import onnxruntime as ort
    import torch

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, inputs)
    model.eval()
    with torch.no_grad():
        ref = model(*[torch.from_numpy(v) for v in inputs.values()])
    ref = ref if isinstance(ref, (list, tuple)) else [ref]
    return float(max(np.max(np.abs(g - r.numpy())) for g, r in zip(got, ref)))


def throughput(fn: Any, n_items: int, repeats: int = 3) -> float:
    """Items per second of ``fn()`` (best of ``repeats``), measured in this process."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return n_items / best


def finish_model(model_dir: str | Path, onnx_path: Path, **card_fields: Any) -> ModelCard:
    """Hash the ONNX file and write the card beside it."""
    card = ModelCard(onnx=onnx_path.name, sha256=sha256_file(onnx_path), **card_fields)
    md = [f"# {card.name} v{card.version}", "", "```json", card.model_dump_json(indent=1), "```", ""]
    write_card(model_dir, card, "\n".join(md))
    return card
