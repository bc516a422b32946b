"""Real architectures exported by torch.onnx.export with BN kept: every foldable BN folds, and the
folded model is no less accurate against a float64 reference than the unfolded one."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

import bnfold
from tests.helpers.onnx_build import count_ops, run_ort
from tests.helpers.zoo_deep import export_onnx as export
from tests.helpers.zoo_torch import ZOO, build, example_input


def foldable(model: onnx.ModelProto) -> set[str]:
    """BNs whose input comes from Conv/ConvTranspose/Gemm with no other consumer and not a graph output."""
    prod = {o: n for n in model.graph.node for o in n.output}
    uses: dict[str, int] = {}
    for n in model.graph.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    outs = {o.name for o in model.graph.output}
    k = set()
    for n in model.graph.node:
        if n.op_type == "BatchNormalization":
            p = prod.get(n.input[0])
            if p is not None and p.op_type in ("Conv", "ConvTranspose", "Gemm") and uses[n.input[0]] == 1 \
                    and n.input[0] not in outs:
                k.add(n.name)
    return k


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_model_folds_every_foldable_bn_without_losing_accuracy(name):
    net = build(name, seed=1)
    x = example_input(name, seed=2)
    m = export(net, x)
    n_bn = count_ops(m, "BatchNormalization")
    assert n_bn > 0
    res = bnfold.fold(m)
    rep = res.report
    assert len(rep.folded) + len(rep.skipped) == n_bn
    assert foldable(m) <= {d.bn for d in rep.folded}, rep.to_dict()["skipped"]
    assert rep.folded
    assert rep.verification.passed, rep.verification.to_dict()
    onnx.checker.check_model(res.model)

    with torch.no_grad():
        ref = net.double()(x.double()).numpy()
    feeds = {"input": x.numpy()}
    err_orig = np.abs(run_ort(m, feeds)[0].astype(np.float64) - ref).max()
    err_fold = np.abs(run_ort(res.model, feeds)[0].astype(np.float64) - ref).max()
    # float32 noise at the outputs is random; "no less accurate" with a margin for that randomness
    assert err_fold <= 2.0 * err_orig + 1e-6 * np.abs(ref).max(), (err_fold, err_orig)


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """Cast every float initializer and float graph input/output of `model` to float16."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for t in m.graph.initializer:
        if t.data_type == onnx.TensorProto.FLOAT:
            t.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(t).astype(np.float16), t.name))
    for n in m.graph.node:
        for a in n.attribute:
            if n.op_type == "Constant" and a.name == "value" and a.t.data_type == onnx.TensorProto.FLOAT:
                a.t.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(a.t).astype(np.float16)))
    for v in list(m.graph.input) + list(m.graph.output):
        if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT:
            v.type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    del m.graph.value_info[:]
    return m


@pytest.mark.parametrize("name", ["resnet_basic", "mobilenet_v2", "decoder"])
def test_fp16_fold_error_stays_near_the_unfolded_fp16_error(name):
    net = build(name, seed=3)
    x = example_input(name, seed=4)
    m16 = to_fp16(export(net, x))
    res = bnfold.fold(m16)
    assert res.report.folded and res.report.verification.passed, res.report.verification.to_dict()
    with torch.no_grad():
        ref = net.double()(x.double()).numpy()
    feeds = {"input": x.numpy().astype(np.float16)}
    err_orig = np.abs(run_ort(m16, feeds)[0].astype(np.float64) - ref)
    err_fold = np.abs(run_ort(res.model, feeds)[0].astype(np.float64) - ref)
    # folding re-rounds weights that are already fp16; the bound is ~1.5x the unfolded error
    assert err_fold.mean() <= 1.5 * err_orig.mean(), (err_fold.mean(), err_orig.mean())
