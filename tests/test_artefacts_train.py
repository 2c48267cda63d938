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


def test_auc_histograms_count_pixels_the_network_is_sure_of():
    """p = 1 or 0 exactly (float32 sigmoid saturation, the stage's saturation rule) still counts."""
    from workflows.train.artefacts import auc_from_hist, score_histograms

    prob = np.array([1.0, 1.0, 0.9, 0.2, 0.0, 0.0, 0.95], np.float32)
    truth = np.array([True, True, True, False, False, False, False])
    pos, neg = score_histograms(prob, truth)
    assert pos.sum() == 3 and neg.sum() == 4
    # the only inverted pair is (0.9 positive, 0.95 negative): 11 of 12 pairs ordered
    assert auc_from_hist(pos, neg) == pytest.approx(11 / 12)


def test_a_misspelt_class_in_the_fine_tuning_weights_is_refused_before_any_work(tmp_path, capsys):
    from workflows.train.artefacts import main

    with pytest.raises(SystemExit) as exc:
        main(["--quick", "--finetune-class-weights", '{"hot_columns": 3}', "--out", str(tmp_path / "m"),
              "--work", str(tmp_path / "work")])
    assert exc.value.code == 2
    assert "unknown artefact class 'hot_columns'" in capsys.readouterr().err
    assert not (tmp_path / "work").exists(), "nothing simulated"
    with pytest.raises(SystemExit):
        main(["--quick", "--finetune-pos-weight", "hot_column=3", "--out", str(tmp_path / "m")])
    assert "must be JSON objects" in capsys.readouterr().err
