"""The IO-binding path the ONNX stages take on CUDA, exercised on the CPU (same code, device 'cpu')."""
from pathlib import Path

import numpy as np
import pytest

from pipeline import onnx as ponnx

onnx = pytest.importorskip("onnx")


def batch_size_model(path: Path) -> Path:
    """Y = 0 * X + (rows of X): every output row carries the batch size the session saw."""
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Shape", ["X"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["rows"], axis=0),
        helper.make_node("Cast", ["rows"], ["rows_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["X", "nought"], ["X0"]),
        helper.make_node("Add", ["X0", "rows_f"], ["Y"]),
    ]
    graph = helper.make_graph(
        nodes, "batch_size",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["n", 2])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["n", 2])],
        initializer=[helper.make_tensor("zero", TensorProto.INT64, [], [0]),
                     helper.make_tensor("nought", TensorProto.FLOAT, [], [0.0])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


@pytest.fixture
def sess(tmp_path):
    return ponnx.session(batch_size_model(tmp_path / "rows.onnx"), device="cpu")


def test_bound_batches_are_padded_to_one_shape_and_trimmed(sess):
    x = np.arange(20, dtype=np.float32).reshape(10, 2)
    plain = ponnx.run_batched(sess, {"X": x}, batch=4)[0]
    bound = ponnx.run_batched(sess, {"X": x}, batch=4, bind=True)[0]
    assert plain.shape == bound.shape == (10, 2)
    assert plain[:, 0].tolist() == [4] * 8 + [2] * 2   # the plain run's last batch is short
    assert bound[:, 0].tolist() == [4] * 10            # the bound run's is padded to the full batch
    assert len(sess._surveypipe_bindings) == 1         # so one binding serves every batch


def test_bindings_are_kept_per_shape_and_bounded(sess):
    for rows in range(1, ponnx.MAX_BINDINGS + 4):
        y = ponnx.run(sess, {"X": np.ones((rows, 2), np.float32)}, bind=True)[0]
        assert y.shape == (rows, 2) and np.all(y == rows)
    assert len(sess._surveypipe_bindings) == ponnx.MAX_BINDINGS
    y = ponnx.run(sess, {"X": np.ones((2, 2), np.float32)}, bind=True)[0]  # evicted shape: bound again
    assert np.all(y == 2)


def test_binding_reproduces_a_stamp_models_plain_outputs():
    from stages.morphology import load_stamp_model

    d = Path(__file__).resolve().parents[1] / "stages" / "models" / "morphology"
    card, spec, _ = load_stamp_model(d, "cpu")
    s = ponnx.session(card.onnx_path(d), device="cpu")
    x = np.random.default_rng(7).normal(0, 1, (70, spec.channels, spec.size, spec.size)).astype(np.float32)
    plain = ponnx.run_batched(s, {spec.input_name: x}, batch=32, outputs=["probs", "probs_std"])
    bound = ponnx.run_batched(s, {spec.input_name: x}, batch=32, outputs=["probs", "probs_std"], bind=True)
    for p, b in zip(plain, bound):
        assert p.shape == b.shape and p.shape[0] == 70
        np.testing.assert_allclose(b, p, rtol=1e-5, atol=1e-6)


def test_run_into_writes_the_artefact_unets_output_into_the_given_buffer():
    from pipeline.modelcard import load_card
    from stages.artefacts import ARTEFACT_CLASSES

    d = Path(__file__).resolve().parents[1] / "stages" / "models" / "artefacts"
    s = ponnx.session(load_card(d).onnx_path(d), device="cpu")
    x = np.random.default_rng(8).normal(0, 1, (1, 3, 96, 128)).astype(np.float32)
    plain = s.run(None, {s.get_inputs()[0].name: x})[0]
    out = np.full((1, len(ARTEFACT_CLASSES), 96, 128), np.nan, np.float32)
    got = ponnx.run_into(s, {s.get_inputs()[0].name: x}, out)
    assert got is out and np.isfinite(out).all()
    np.testing.assert_array_equal(out, plain)
    with pytest.raises(ValueError, match="C-contiguous"):
        ponnx.run_into(s, {s.get_inputs()[0].name: x}, np.zeros((1, len(ARTEFACT_CLASSES), 128, 96), np.float32).transpose(0, 1, 3, 2))
