"""`bnfold --dry-run MODEL --json` lists every BN (every scope) with its neighbourhood, the decision and
the reason, and writes nothing; the same decisions a real fold then makes and verifies."""
from __future__ import annotations

import json
import os

import onnx

from bnfold.cli import main
from tests.helpers.onnx_build import G
from tests.helpers.onnx_fold_check import fold_verified


def mixed_model(rng) -> onnx.ModelProto:
    g = G(rng)
    g.node("Conv", ["x", g.weight("w0", (4, 3, 3, 3))], ["c0"], name="conv0", pads=[1] * 4)
    g.bn("bn_fold", "c0", 4)
    g.node("Relu", ["bn_fold_out"], ["r"], name="relu")
    g.bn("bn_back", "r", 4)
    g.node("Conv", ["bn_back_out", g.weight("w1", (5, 4, 1, 1))], ["c1"], name="conv1")
    g.bn("bn_pad", "c1_relu", 5, out="y")
    g.nodes.insert(-1, onnx.helper.make_node("Sigmoid", ["c1"], ["c1_relu"], name="sig"))
    return g.model([("x", [1, 3, 6, 6])], [("y", [1, 5, 6, 6])])


def test_dry_run_json_lists_every_bn_with_its_neighbourhood(rng, tmp_path, capsys):
    src = tmp_path / "m.onnx"
    onnx.save(mixed_model(rng), src)
    assert main([str(src), "--dry-run", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert os.listdir(tmp_path) == ["m.onnx"]  # nothing written
    entries = {d["bn"]: d for d in doc["folded"] + doc["skipped"]}
    assert set(entries) == {"bn_fold", "bn_back", "bn_pad"}
    assert entries["bn_fold"]["neighbourhood"] == {"input": "Conv conv0", "feeds": ["Relu relu"]}
    assert entries["bn_back"]["direction"] == "before" and entries["bn_back"]["into"] == "conv1"
    assert entries["bn_back"]["neighbourhood"] == {"input": "Relu relu", "feeds": ["Conv conv1"]}
    assert entries["bn_pad"]["reason"] == "UNSUPPORTED_PRODUCER"
    assert entries["bn_pad"]["neighbourhood"] == {"input": "Sigmoid sig", "feeds": ["graph output"]}
    # the real fold makes the same decisions and they verify
    res = fold_verified(mixed_model(rng))
    assert {d.bn: d.is_folded for d in res.report.decisions} == {"bn_fold": True, "bn_back": True, "bn_pad": False}
