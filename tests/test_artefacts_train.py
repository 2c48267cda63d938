"""A tiny training run of the artefact U-Net exports a working ONNX model with a complete card."""
from __future__ import annotations


import numpy as np
import pytest


@pytest.mark.training
def test_tiny_training_run_exports_a_working_model(tmp_path):
    pytest.importorskip("torch")
    from pipeline.modelcard import load_card
    from stages.artefacts import ARTEFACT_CLASSES, Artefacts, ArtefactsConfig
    from workflows.train.artefacts import load_set, main

    assert main(["--quick", "--steps", "3", "--finetune-steps", "2", "--out", str(tmp_path / "model"), "--work", str(tmp_path / "work")]) == 0
    card = load_card(tmp_path / "model")
    assert card.classes == list(ARTEFACT_CLASSES) and set(card.thresholds) == set(ARTEFACT_CLASSES)
    assert card.training["steps"] == 5 and card.inference["margin"] >= card.inference["dependency_radius"]
    # the exported model runs in the stage on a tile of another size
    from pipeline.manifest import load_manifest
    from pipeline.tile import load_tile

    man = load_manifest(next((tmp_path / "work").glob("train-*/manifest.yaml")))
    tile = load_tile(man, man.tiles[0])
    out = Artefacts().run({"exposure": tile}, ArtefactsConfig(model_dir=str(tmp_path / "model"), device="cpu"))
    mask = out["masks/artefacts"].planes[tile.bands[0]]
    assert mask.dtype == np.uint16 and mask.shape == tile.shape
