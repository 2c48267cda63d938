"""Asking for CUDA where ONNX Runtime cannot use it: a clear refusal with the reason, and no noise."""
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import make_release
from pipeline import onnx as ponnx
from pipeline.cli import main as cli

PHOTOZ_MODEL = Path(__file__).resolve().parents[1] / "stages" / "models" / "photoz" / "model.onnx"


@pytest.fixture
def no_gpu():
    problem = ponnx.cuda_problem()
    if problem is None:
        pytest.skip("this host has a visible GPU")
    return problem


def test_cuda_session_without_a_gpu_fails_with_the_reason_and_prints_nothing(no_gpu, capfd):
    with pytest.raises(RuntimeError, match="cannot use it here") as err:
        ponnx.session(PHOTOZ_MODEL, device="cuda")
    assert no_gpu in str(err.value)
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""   # onnxruntime's own provider-load error is silenced
    assert ponnx.provider_of(ponnx.session(PHOTOZ_MODEL, device="auto")) == "CPUExecutionProvider"


def test_run_with_device_cuda_on_a_host_without_gpu_is_refused_before_any_tile(no_gpu, tmp_path):
    manifest, _ = make_release(tmp_path / "rel", n_tiles=1, size=96)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["run", str(manifest), "--out", str(out), "--device", "cuda", "--no-progress"])
    assert result.exit_code == 2, result.output
    assert "device cuda for stage(s)" in result.output and no_gpu in result.output
    assert not out.exists()


def test_auto_falls_back_to_a_plain_cpu_session_quietly_when_cuda_cannot_start(no_gpu, monkeypatch, capfd, tmp_path):
    import shutil

    model = tmp_path / "photoz.onnx"  # a path of its own: no cached session
    shutil.copy(PHOTOZ_MODEL, model)
    monkeypatch.setattr(ponnx, "cuda_usable", lambda: True)  # as on a GPU host whose CUDA libraries do not load
    sess = ponnx.session(model, device="auto")
    assert ponnx.provider_of(sess) == "CPUExecutionProvider"
    assert not sess.get_session_options().enable_mem_pattern  # rebuilt with the CPU path's own options
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""
