"""The float64 replay the per-fold proofs run (onnx/replay.py): its ConvTranspose matches onnxruntime on every
explicit-pads layout (groups, strides, dilations, output_padding, 1-3-D), and every fold of a ConvTranspose
decoder is proven, not merely 'not run'."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnfold.onnx.replay import conv_transpose


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_conv_transpose_replay_matches_onnxruntime(nd):
    rng = np.random.default_rng(nd)
    for _ in range(25):
        g = int(rng.choice([1, 2, 3]))
        cin, mg = g * int(rng.integers(1, 3)), int(rng.integers(1, 3))
        k = [int(rng.integers(1, 4)) for _ in range(nd)]
        s = [int(rng.integers(1, 4)) for _ in range(nd)]
        d = [int(rng.integers(1, 3)) for _ in range(nd)]
        attrs = dict(group=g, strides=s, dilations=d, output_padding=[int(rng.integers(0, min(a, b))) for a, b in zip(s, d)],
                     pads=[int(rng.integers(0, k[i])) for i in range(nd)] * 2)
        x = rng.standard_normal((2, cin, *[int(rng.integers(2, 5)) for _ in range(nd)])).astype(np.float32)
        w = rng.standard_normal((cin, mg, *k)).astype(np.float32)
        b = rng.standard_normal(mg * g).astype(np.float32)
        node = helper.make_node("ConvTranspose", ["x", "w", "b"], ["y"], **attrs)
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                                  [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        ref = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
        got = conv_transpose(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64), **attrs)
        assert got.shape == ref.shape, attrs
        assert np.abs(got - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max()), attrs
