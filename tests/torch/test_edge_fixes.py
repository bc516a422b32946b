"""PyTorch cases an adversarial pass found wrong, each fixed: BN -> bias-free layer -> BN, parametrized
and hooked layers, unbatched convs, decomposed export programs, Conv->BN->BN through a folded
Identity, lazy and weight-normed modules, export failures and output extensions, memory format."""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn as nn

from bnfold.core.decisions import Reason
from tests.helpers.frameworks import torch_pass
from tests.torch.test_edge import _cli, _f64_close, _fold_checked, _nd, _x, pickled  # noqa: F401 - pickled: fixture
from tests.helpers.zoo_torch import randomize_bn


@pytest.mark.parametrize("kind", ["conv", "linear"])
@pytest.mark.parametrize("how", ["module", "graph", "export"])
def test_bn_then_bias_free_layer_then_bn(kind: str, how: str) -> None:
    # BN -> layer(bias=False) -> BN: the first fold gives the layer a bias, the second must keep it
    if kind == "conv":
        model, x = nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(4, 6, 1, bias=False), nn.BatchNorm2d(6)), _x(2, 4, 5, 5)
    else:
        model, x = nn.Sequential(nn.BatchNorm1d(6), nn.Linear(6, 5, bias=False), nn.BatchNorm1d(5)), _x(4, 6)
    d, _ = _fold_checked(randomize_bn(model, 20), x, how=how)


@pytest.mark.parametrize("old_api", [False, True])
def test_spectral_norm_conv_is_not_folded_wrongly(old_api: bool) -> None:
    torch.manual_seed(21)
    sn = nn.utils.spectral_norm if old_api else nn.utils.parametrizations.spectral_norm
    model = nn.Sequential(sn(nn.Conv2d(3, 4, 3)), nn.BatchNorm2d(4))
    model(_x(2, 3, 6, 6))  # a training-mode step: power iteration sets u, v
    if old_api:  # the hook-computed weight cannot even be copied: a clear refusal naming the fix
        from bnfold.core.errors import BnfoldError
        with pytest.raises(BnfoldError, match="remove_spectral_norm"):
            torch_pass.fold(randomize_bn(model, 21), example_inputs=(_x(2, 3, 6, 6),))
        return
    d, _ = _fold_checked(randomize_bn(model, 21), _x(2, 3, 6, 6))
    assert d["1"].reason is Reason.UNSUPPORTED_PRODUCER and "parametrized" in d["1"].detail


@pytest.mark.parametrize("where", ["after", "before"])
def test_conv_whose_hooks_change_its_output_is_not_folded_wrongly(where: str) -> None:
    conv = nn.Conv2d(3, 4, 1)
    if where == "after":
        conv.register_forward_hook(lambda m, i, o: o.clamp(min=0))
        model = nn.Sequential(conv, nn.BatchNorm2d(4))
    else:
        conv.register_forward_pre_hook(lambda m, i: (i[0].clamp(min=0),))
        model = nn.Sequential(nn.BatchNorm2d(3), conv)
    _fold_checked(randomize_bn(model, 22), _x(2, 3, 5, 5))


def test_old_style_weight_norm_conv() -> None:
    from bnfold.core.errors import BnfoldError
    torch.manual_seed(23)
    model = randomize_bn(nn.Sequential(nn.utils.weight_norm(nn.Conv1d(3, 4, 3)), nn.BatchNorm1d(4)), 23)
    try:
        _fold_checked(model, _x(2, 3, 8))
    except BnfoldError:
        pass  # a clear refusal is fine; a RuntimeError from deepcopy or a wrong fold is not


def test_uninitialized_lazy_modules() -> None:
    from bnfold.core.errors import BnfoldError
    model = nn.Sequential(nn.LazyConv2d(4, 3), nn.LazyBatchNorm2d())
    try:
        res = torch_pass.fold(model, example_inputs=(_x(2, 3, 6, 6),), providers=["cpu"])
    except BnfoldError:
        return  # a clear refusal is fine; a ValueError from deepcopy is not
    assert res.report.verification.passed is True and len(res.report.decisions) == 1


def test_decomposed_exported_program_gives_every_bn_a_decision(tmp_path) -> None:
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1),
                                       nn.BatchNorm2d(4)), 24)
    x = _x(2, 3, 8, 8)
    ep = torch.export.export(model, (x,)).run_decompositions()  # core ATen, as for ExecuTorch
    path = str(tmp_path / "dec.pt2")
    torch.export.save(ep, path)
    code, out, _ = _cli([path, "--json"])
    doc = json.loads(out)
    assert len(doc["folded"]) + len(doc["skipped"]) == 2, doc
    res = torch_pass.fold(ep, providers=["cpu"])
    assert sorted(d.bn for d in res.report.decisions) == ["1", "4"]
    assert res.report.verification.passed is True
    _f64_close(model, res.model.module(), (x,))


def test_conv_bn_bn_chain_folds_completely() -> None:
    # torch_pass's docstring: "Capturing and folding repeat until nothing new folds, so Conv->BN->BN folds completely"
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm2d(4)), 25)
    d, res = _fold_checked(model, _x(2, 3, 6, 6))
    assert d["1"].is_folded and d["2"].is_folded, res.report.to_dict()


@pytest.mark.parametrize("nd", [1, 2])
def test_unbatched_conv_input_is_not_folded_into_the_wrong_axis(nd: int) -> None:
    # nn.ConvNd accepts unbatched (C, *spatial) input; BatchNorm1d then normalises axis 1, a spatial axis
    C, _, _ = _nd(nd)
    model = randomize_bn(nn.Sequential(C(3, 6, 3), nn.BatchNorm1d(6)), 27)
    d, _ = _fold_checked(model, _x(3, *([8] * nd)))
    assert d["1"].reason is Reason.AXIS_MISMATCH


def test_cli_export_failure_keeps_an_existing_output_file(pickled) -> None:  # noqa: F811 - the fixture
    d, _ = pickled
    out = d / "precious.onnx"
    out.write_bytes(b"the user's own file")
    # a zero tolerance makes verification fail: "exit 1, nothing written"
    code, _, _ = _cli(["export", str(d / "s.ts"), "--to", "onnx", "--input", "x:2x3x8", "-o", str(out),
                       "--atol", "0", "--rtol", "0"])
    assert code == 1
    assert out.exists() and out.read_bytes() == b"the user's own file"


@pytest.mark.parametrize("src,dst", [("r.pt2", "o.pt"), ("whole.pt", "o.pt2"), ("s.ts", "o.pt2")])
def test_cli_output_extension_must_fit_the_format(pickled, tmp_path, src: str, dst: str) -> None:  # noqa: F811
    d, model = pickled
    if src == "r.pt2":
        torch.export.save(torch.export.export(model, (_x(2, 3, 8),)), str(tmp_path / src))
        source = str(tmp_path / src)
    else:
        source = str(d / src)
    out = str(tmp_path / dst)
    code, _, err = _cli([source, "--trust", "--input", "x:2x3x8", "-o", out])
    if code == 2:  # refused up front: fine, if nothing was written
        assert not os.path.exists(out)
        return
    assert code == 0
    back = torch_pass.load(out, trust=True)  # what bnfold wrote, bnfold must read
    _f64_close(model, back.module() if isinstance(back, torch.export.ExportedProgram) else back, (_x(2, 3, 8),))


def test_channels_last_weights_keep_their_memory_format() -> None:
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)), 29).to(memory_format=torch.channels_last)
    d, res = _fold_checked(model, _x(2, 3, 8, 8).to(memory_format=torch.channels_last))
    assert res.model[0].weight.is_contiguous(memory_format=torch.channels_last)


class KwargNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor, *, shift: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"y": self.bn(self.conv(x)) + shift}


def test_exported_program_with_keyword_inputs() -> None:
    model = randomize_bn(KwargNet(), 28)
    ep = torch.export.export(model, (_x(2, 3, 6, 6),), kwargs={"shift": _x(1, seed=1)})
    res = torch_pass.fold(ep, providers=["cpu"])
    assert res.report.folded and res.report.verification.passed is True
    x, shift = _x(2, 3, 6, 6, seed=5), _x(1, seed=6)
    got = res.model.module()(x, shift=shift)["y"]
    want = model.double()(x.double(), shift=shift.double())["y"]
    assert torch.allclose(got.double(), want, rtol=1e-4, atol=1e-5)


def test_cli_folds_a_pt2_file_with_keyword_inputs(tmp_path) -> None:
    model = randomize_bn(KwargNet(), 30)
    torch.export.save(torch.export.export(model, (_x(2, 3, 6, 6),), kwargs={"shift": _x(1, seed=1)}),
                      str(tmp_path / "k.pt2"))
    code, _, err = _cli([str(tmp_path / "k.pt2"), "--providers", "cpu"])
    assert code == 0, err
    back = torch_pass.load(str(tmp_path / "k.folded.pt2"))
    assert not any("batch_norm" in str(n.target) for n in back.graph.nodes)
    x, shift = _x(2, 3, 6, 6, seed=7), _x(1, seed=8)
    assert torch.allclose(back.module()(x, shift=shift)["y"], model(x, shift=shift)["y"], rtol=1e-4, atol=1e-5)


class EmbedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.fc, self.bn = nn.Embedding(10, 6), nn.Linear(6, 4), nn.BatchNorm1d(4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(self.emb(ids).mean(1)))


def test_pt2_input_without_a_dtype_takes_the_programs_own(tmp_path) -> None:
    """--input ids:4x5 on a program whose ids are int64 makes int64 ids, not floats."""
    model = randomize_bn(EmbedNet(), 31)
    ids = torch.randint(0, 10, (2, 5))
    torch.export.save(torch.export.export(model, (ids,)), str(tmp_path / "e.pt2"))
    code, _, err = _cli([str(tmp_path / "e.pt2"), "--input", "ids:2x5", "--providers", "cpu"])
    assert code == 0, err
    back = torch_pass.load(str(tmp_path / "e.folded.pt2"))
    assert torch.allclose(back.module()(ids), model(ids), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript_mlp_linear_bn1d_folds(how: str) -> None:
    model = randomize_bn(nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3)), 26)
    d, res = _fold_checked(model, _x(4, 6), how=how)
    assert d["1"].is_folded, d["1"].detail  # "cannot prove ... without example inputs", yet they were given


class _DynChain(nn.Module):
    """Data-dependent control flow: fx and torch.export fail, the module-hooks capture is used."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn1, self.bn2 = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > -1e9:
            return self.bn2(self.bn1(self.conv(x)))
        return x


def test_conv_bn_bn_chain_folds_completely_under_module_hooks() -> None:
    d, res = _fold_checked(randomize_bn(_DynChain(), 32), _x(2, 3, 8, 8))
    assert res.report.info["capture"] == "module-hooks"
    assert d["bn1"].is_folded and d["bn2"].is_folded and d["bn2"].producer == "conv"
