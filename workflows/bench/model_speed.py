"""ONNX Runtime vs PyTorch for every shipped model, at the batch and shape its stage uses.

Part of ``surveypipe bench performance`` (issue 9). One thread each (``intra_op_num_threads=1``,
``torch.set_num_threads(1)``), best of three timed passes after a warm-up, on random inputs
of the model's input shape (speed does not depend on the values), through the calls the stages
make (:func:`pipeline.onnx.run_batched`, :func:`pipeline.onnx.run`). The provider actually used
is printed: with ``--device cuda`` on a machine with a GPU the ONNX sessions run on CUDA, through
IO bindings with fixed shapes.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

MODELS = Path(__file__).resolve().parents[2] / "stages" / "models"


def _best(fn: Callable[[], None], repeats: int = 3) -> float:
    fn()  # warm-up (allocations, lazy initialisation)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _torch_threads() -> Any:
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(1)
    return torch


def stamp_model_speed(name: str, batch: int, n: int, device: str) -> dict[str, Any]:
    """Stamps per second of a cutout CNN (morphology, lenses) at the stage's batch size."""
    from pipeline.onnx import provider_of, run_batched, session
    from stages.morphology import load_stamp_model
    from workflows.train.stamps import load_torch_model

    d = MODELS / name
    card, spec, _ = load_stamp_model(d, device)
    sess = session(card.onnx_path(d), device=device, threads=1)
    x = np.arcsinh(np.random.default_rng(0).normal(0, 3, (n, spec.channels, spec.size, spec.size))).astype(np.float32)
    in_name = sess.get_inputs()[0].name

    def ort_run() -> None:
        run_batched(sess, {in_name: x}, batch=batch)

    row: dict[str, Any] = {"model": name, "unit": "stamps/s", "batch": batch, "input": f"{spec.channels}x{spec.size}x{spec.size}",
                           "provider": provider_of(sess), "onnx": n / _best(ort_run)}
    torch = _torch_threads()
    model = load_torch_model(d) if torch is not None else None
    if model is not None:
        xt = torch.from_numpy(x)

        def torch_run() -> None:
            with torch.no_grad():
                for i in range(0, n, batch):
                    model(xt[i:i + batch])

        row["torch"] = n / _best(torch_run)
    return row


def artefact_model_speed(size: int, device: str) -> dict[str, Any]:
    """Band megapixels per second of the artefact U-Net through the stage's patcher (one tile of
    ``size``² pixels, the stage's patch and margin), ONNX Runtime vs the same network in PyTorch."""
    from pipeline.modelcard import load_card
    from pipeline.onnx import provider_of, run, session
    from stages.artefacts import ArtefactsConfig, predict_probabilities

    d = MODELS / "artefacts"
    card = load_card(d)
    geo = card.model_extra.get("inference", {})
    margin, stride = int(geo["margin"]), int(geo.get("stride", 16))
    core = ArtefactsConfig().patch
    sess = session(card.onnx_path(d), device=device, threads=1)
    in_name = sess.get_inputs()[0].name
    x = np.random.default_rng(1).normal(0, 1, (3, size, size)).astype(np.float32)
    x[2] = 0.0
    mpix = size * size / 1e6
    row: dict[str, Any] = {"model": "artefacts", "unit": "band-MPix/s", "batch": 1,
                           "input": f"{size}x{size} tile, patch {core} + margin {margin}",
                           "provider": provider_of(sess)}
    row["onnx"] = mpix / _best(lambda: predict_probabilities(lambda a: run(sess, {in_name: a})[0], x, core=core,
                                                             margin=margin, stride=stride), repeats=2)
    torch = _torch_threads()
    pt = d / "model.pt"
    if torch is not None and pt.exists():
        from workflows.train.artefacts import build_model, card_architecture, with_sigmoid

        net = build_model(card_architecture(card))
        net.load_state_dict(torch.load(pt, map_location="cpu", weights_only=True))
        net = with_sigmoid(net).eval()

        def fn(a: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return net(torch.from_numpy(a)).numpy()

        row["torch"] = mpix / _best(lambda: predict_probabilities(fn, x, core=core, margin=margin, stride=stride), repeats=2)
    return row


def photoz_model_speed(n: int) -> dict[str, Any]:
    """Objects per second of the photo-z ensemble (p(z) on the grid, in the graph) at the stage's batch."""
    from pipeline.modelcard import load_card
    from stages.photoz import BATCH
    from workflows.bench.photoz import throughputs

    d = MODELS / "photoz"
    card = load_card(d)
    n_features = int(card.inputs["features"]["shape"][-1]) if hasattr(card, "inputs") and card.inputs else None
    if n_features is None:
        raise ValueError("photo-z card has no input shape")
    t = throughputs(d, n_features, n=n)
    return {"model": "photoz", "unit": "objects/s", "batch": BATCH, "input": f"{n_features} features",
            "provider": "CPUExecutionProvider", "onnx": t.get("onnx_pdf"), "torch": t.get("torch_pdf")}


def model_speeds(device: str = "cpu", *, stamps: int = 2048, tile: int = 1024, objects: int = 50000) -> list[dict[str, Any]]:
    from stages.lenses import LensesConfig
    from stages.morphology import MorphologyConfig

    rows = [artefact_model_speed(tile, device)]
    try:
        rows.append(photoz_model_speed(objects))
    except Exception as exc:  # a model without its torch twin still gets its ONNX figure elsewhere
        rows.append({"model": "photoz", "error": f"{type(exc).__name__}: {exc}"})
    rows.append(stamp_model_speed("morphology", MorphologyConfig().batch, stamps, device))
    rows.append(stamp_model_speed("lenses", LensesConfig().batch, stamps, device))
    return rows


def print_model_speeds(rows: list[dict[str, Any]]) -> None:
    print("\nONNX Runtime vs PyTorch (1 thread each, the stage's batch and shape; goal ONNX ≥ PyTorch for every model)")
    print(f"{'model':11s} {'unit':12s} {'batch':>5s} {'ONNX Runtime':>13s} {'PyTorch':>10s} {'ratio':>6s}  provider, input")
    for r in rows:
        if "error" in r:
            print(f"{r['model']:11s} not measured: {r['error']}")
            continue
        tr = r.get("torch")
        ratio = f"{r['onnx'] / tr:6.2f}" if tr else "     -"
        print(f"{r['model']:11s} {r['unit']:12s} {r['batch']:5d} {r['onnx']:13.1f} "
              f"{(f'{tr:10.1f}' if tr else '         -')} {ratio}  {r['provider']}, {r['input']}")
