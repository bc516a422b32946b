"""Folding one model with the batched Conv->BN arithmetic (bnfold/onnx/batched.py) on and off."""
from __future__ import annotations

import json

import onnx

import bnfold
from bnfold.onnx import batched
from bnfold.onnx.folder import OnnxFolder
from bnfold.onnx.scopes import model_opset


def _fold(model: onnx.ModelProto, on: bool, monkeypatch, **kw) -> tuple[bytes, dict]:
    monkeypatch.setattr(batched, "ENABLED", on)
    res = bnfold.fold(model, **{"verify": False, **kw})
    report = res.report.to_dict()
    report.pop("timing_s", None)
    return res.model.SerializeToString(), json.loads(json.dumps(report, default=str))


def same_either_way(model: onnx.ModelProto, monkeypatch, **kw) -> onnx.ModelProto:
    """Fold with the batch on and off (keyword arguments go to bnfold.fold); the input stays as it was and
    both results are identical: bytes and report. Returns the folded model."""
    before = model.SerializeToString()
    on = _fold(model, True, monkeypatch, **kw)
    assert model.SerializeToString() == before, "the input model was changed"
    off = _fold(model, False, monkeypatch, **kw)
    assert model.SerializeToString() == before, "the input model was changed"
    assert on[1] == off[1], "decisions differ"
    assert on[0] == off[0], "folded models differ"
    folded = onnx.ModelProto()
    folded.ParseFromString(on[0])
    return folded


def taken(model: onnx.ModelProto, monkeypatch) -> int:
    """How many BNs of the main graph fold with the batch's arithmetic (on a copy, nothing borrowed)."""
    monkeypatch.setattr(batched, "ENABLED", True)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    f = OnnxFolder(m, m.graph, model_opset(m))
    f.run()
    return f.batched
