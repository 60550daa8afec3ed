"""The onnxruntime session mtp serves its ONNX exports with (mtp.export.onnx_session): every graph level computes
the same residual LayerNorm as numpy, and "all-no-skipln" leaves out the fused SkipLayerNormalization kernel that
"all" puts in."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mtp.config import ConfigError
from mtp.export import ORT_LEVELS, onnx_session

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

HIDDEN = 32


def residual_layer_norm_graph(path: Path) -> Path:
    """LayerNorm(x + bias + skip): the pattern onnxruntime fuses into SkipLayerNormalization."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=HIDDEN).astype(np.float32), name)
             for name in ("bias", "gamma", "beta")]
    nodes = [helper.make_node("Add", ["x", "bias"], ["biased"]), helper.make_node("Add", ["biased", "skip"], ["sum"]),
             helper.make_node("LayerNormalization", ["sum", "gamma", "beta"], ["y"], axis=-1, epsilon=1e-12)]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 5, HIDDEN]) for n in ("x", "skip")]
    output = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5, HIDDEN])
    model = helper.make_model(helper.make_graph(nodes, "residual_ln", inputs, [output], inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return path


def kernels_run(session, feeds: dict[str, np.ndarray]) -> set[str]:
    session.run(None, feeds)
    profile = Path(session.end_profiling())
    events = json.loads(profile.read_text())
    profile.unlink()
    return {e["args"]["op_name"] for e in events if e.get("cat") == "Node" and "op_name" in e.get("args", {})}


def test_every_level_computes_the_layer_norm_and_the_serving_level_leaves_out_the_fused_kernel(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime

    monkeypatch.chdir(tmp_path)  # onnxruntime writes its profiles into the working folder
    path = residual_layer_norm_graph(tmp_path / "ln.onnx")
    rng = np.random.default_rng(1)
    feeds = {n: rng.normal(size=(2, 5, HIDDEN)).astype(np.float32) for n in ("x", "skip")}
    graph = onnx.load(str(path)).graph
    bias, gamma, beta = (onnx.numpy_helper.to_array(t) for t in graph.initializer)
    total = feeds["x"] + bias + feeds["skip"]
    mean, var = total.mean(-1, keepdims=True), total.var(-1, keepdims=True)
    expected = (total - mean) / np.sqrt(var + 1e-12) * gamma + beta
    kernels = {}
    levels = onnxruntime.GraphOptimizationLevel
    expected_levels = {"all": levels.ORT_ENABLE_ALL, "all-no-skipln": levels.ORT_ENABLE_ALL,
                       "extended": levels.ORT_ENABLE_EXTENDED, "basic": levels.ORT_ENABLE_BASIC}
    assert set(ORT_LEVELS) == set(expected_levels)
    for level in ORT_LEVELS:
        session = onnx_session(path, threads=1, level=level, profile=True)
        options = session.get_session_options()
        assert options.graph_optimization_level == expected_levels[level]
        assert (options.intra_op_num_threads, options.inter_op_num_threads) == (1, 1)
        np.testing.assert_allclose(session.run(None, feeds)[0], expected, atol=1e-5)
        kernels[level] = kernels_run(session, feeds)
    assert "SkipLayerNormalization" in kernels["all"]
    assert "SkipLayerNormalization" not in kernels["all-no-skipln"]
    assert "LayerNormalization" in kernels["all-no-skipln"] and "LayerNormalization" in kernels["basic"]


def test_an_unknown_level_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'fast'"):
        onnx_session(tmp_path / "missing.onnx", level="fast")


def test_spinning_off_lets_idle_threads_sleep(tmp_path: Path) -> None:
    path = residual_layer_norm_graph(tmp_path / "ln.onnx")
    spinning = onnx_session(path, threads=2).get_session_options()
    sleeping = onnx_session(path, threads=2, spinning=False).get_session_options()
    assert sleeping.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert spinning.intra_op_num_threads == sleeping.intra_op_num_threads == 2
    with pytest.raises(Exception):  # noqa: B017 - onnxruntime raises its own error type for an unset entry
        spinning.get_session_config_entry("session.intra_op.allow_spinning")
