"""The lens model's one-view screen: the stage runs the full model only where the screen says it could matter."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from pipeline.errors import ConfigError
from pipeline.modelcard import load_card
from stages.lenses import LENS_FLAGS, SHIPPED_MODEL, Lenses
from workflows.train.lens_screen import screen_threshold

HAVE_SCREEN = (SHIPPED_MODEL / "card.json").exists() and bool(load_card(SHIPPED_MODEL).screen)


def test_screen_threshold_halves_the_lowest_screen_score_above_the_fpr_line():
    rng = np.random.default_rng(3)
    n_neg = 1000
    full = np.r_[rng.uniform(0, 0.5, n_neg), [0.9, 0.95, 0.3]]
    label = np.r_[np.zeros(n_neg, int), [1, 1, 1]]
    ordinary = np.r_[np.ones(n_neg, bool), [False] * 3]
    screen = full.copy()
    screen[n_neg] = 0.2  # a lens the screen undersells: it sets the threshold
    info = screen_threshold(full, screen, label, ordinary, fpr=0.01, safety=2.0)
    line = np.sort(full[:n_neg])[::-1][10]
    assert info["full_score_at_fpr_line"] == pytest.approx(line, abs=1e-6)
    assert info["lowest_screen_score_above_the_line"] == pytest.approx(min(0.2, screen[:n_neg][full[:n_neg] >= line].min()))
    assert info["threshold"] == pytest.approx(info["lowest_screen_score_above_the_line"] / 2, abs=1e-6)
    assert info["n_above_the_line"] == int((full >= line).sum())
    with pytest.raises(ValueError, match="cannot set an FPR"):
        screen_threshold(full[:50], screen[:50], label[:50], ordinary[:50], fpr=0.01)


@pytest.mark.skipif(not HAVE_SCREEN, reason="the shipped lens model has no screen")
def test_a_changed_or_missing_screen_file_is_refused_naming_it(tmp_path):
    d = tmp_path / "lenses"
    shutil.copytree(SHIPPED_MODEL, d)
    with open(d / "screen.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ConfigError, match="screen.onnx.*sha256"):
        load_card(d)
    (d / "screen.onnx").unlink()
    with pytest.raises(ConfigError, match="screen 'screen.onnx', which does not exist"):
        load_card(d)


def _blank_sky_and_a_lens():
    from tests.test_lenses import _scene

    scene = _scene(True)
    o = scene["objects"]
    # the lens at the centre, then three blank-sky positions with the same (fake) deflector photometry
    from pipeline.table import Table

    t = Table()
    for c in o.columns:
        v = np.asarray(o[c])
        t.add(c, np.repeat(v, 4))
    t.columns["objectId"][:] = np.arange(1, 5)
    t.columns["x"][:] = [64.3, 16.0, 112.0, 16.0]
    t.columns["y"][:] = [63.8, 16.0, 16.0, 112.0]
    scene["objects"] = t
    return scene


@pytest.mark.skipif(not HAVE_SCREEN, reason="the shipped lens model has no screen")
def test_screened_candidates_keep_the_screen_score_and_the_rest_the_full_models():
    scene = _blank_sky_and_a_lens()
    st = Lenses()
    got = st.run(scene, st.Config())["lenses"]
    full = st.run(scene, st.Config(screen=False))["lenses"]
    thr = load_card(SHIPPED_MODEL).screen["threshold"]
    screened = (np.asarray(got["lens_flags"]) & LENS_FLAGS["screened"]) != 0
    assert not screened[0] and screened[1:].all()  # the lens goes on to the full model, blank sky does not
    # the full model's scores (to float rounding: ONNX Runtime's sums depend a little on the batch it gets)
    np.testing.assert_allclose(got["lens_score"][~screened], full["lens_score"][~screened], atol=1e-6)
    np.testing.assert_allclose(got["lens_scoreErr"][~screened], full["lens_scoreErr"][~screened], atol=1e-6)
    assert (got["lens_score"][screened] < thr).all() and np.isfinite(got["lens_scoreErr"][screened]).all()
    assert got.attrs["lens_n_full_model"] == 1 and got.attrs["lens_screen_threshold"] == thr
    assert full.attrs["lens_n_full_model"] == 4 and full.attrs["lens_screen_threshold"] is None
    assert not ((np.asarray(full["lens_flags"]) & LENS_FLAGS["screened"]) != 0).any()
    assert "screen.onnx" in [p.name for p in st.model_files(st.Config())]
    assert "screen.onnx" not in [p.name for p in st.model_files(st.Config(screen=False))]


@pytest.mark.skipif(not HAVE_SCREEN, reason="the shipped lens model has no screen")
def test_the_screen_is_the_torch_model_on_one_view(tmp_path):
    pytest.importorskip("torch")
    from workflows.train.lens_screen import export_screen

    d = tmp_path / "lenses"
    shutil.copytree(SHIPPED_MODEL, d)
    path, diff = export_screen(d)
    assert diff < 1e-5
    # the same weights: the shipped screen is this export, byte for byte up to the exporter's determinism
    from pipeline.onnx import session

    rng = np.random.default_rng(11)
    x = np.arcsinh(rng.normal(0, 1, (9, 3, 48, 48)) * rng.lognormal(0, 2, (9, 1, 1, 1))).astype(np.float32)
    a = session(path, device="cpu").run(["probs"], {"input": x})[0]
    b = session(SHIPPED_MODEL / "screen.onnx", device="cpu").run(["probs"], {"input": x})[0]
    np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.skipif(not HAVE_SCREEN, reason="the shipped lens model has no screen")
def test_lens_screen_command_writes_the_screen_into_a_models_card_and_readme(tmp_path, capsys):
    pytest.importorskip("torch")
    from workflows.train import lens_screen

    d = tmp_path / "lenses"
    shutil.copytree(SHIPPED_MODEL, d)
    readme_before = (d / "README.md").read_text().split("## Screen")[0]
    argv = ["--model", str(d), "--scale", "0.07", "--val-negatives", "0", "--field", "256", "--workdir", str(tmp_path / "w")]
    assert lens_screen.main(argv) == 0
    card = load_card(d)  # the new screen.onnx matches the card's sha256
    assert 0 < card.screen["threshold"] < card.screen["lowest_screen_score_above_the_line"]
    assert card.screen["n_validation_stamps"] > 100 and "lens screen: threshold" in capsys.readouterr().out
    readme = (d / "README.md").read_text()
    assert readme.startswith(readme_before) and readme.count("## Screen") == 1
    # too few negatives to place the FPR line: refused with the reason, the model left as it was
    before = (d / "card.json").read_text()
    assert lens_screen.main(argv[:3] + ["0.01"] + argv[4:]) == 2
    assert "cannot set an FPR" in capsys.readouterr().err and (d / "card.json").read_text() == before
    assert sorted(p.name for p in d.iterdir()) == ["README.md", "card.json", "model.onnx", "model.pt", "screen.onnx"]
    load_card(d)
