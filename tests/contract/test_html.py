"""--html renders in a real browser: Debian's headless chromium loads the page from disk, runs its script
and dumps the DOM; the test checks the summary, every decision, and one mark per compared tensor in each
provider's picture, the first divergence marked. CI installs chromium (.ci/run); without it these tests
fail, they never skip."""
from __future__ import annotations

import html.parser
import json
import os
import re
import shutil
import subprocess

import pytest

from bnfold.cli import main
from bnfold.html import page
from tests.conftest import SAMPLES

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]


@pytest.fixture(scope="module")
def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail("chromium is not installed: the HTML report is checked in a real headless browser; "
                    "install Debian's chromium (apt-get install -y chromium), as .ci/run does")
    return exe


class Dom(html.parser.HTMLParser):
    """Every element of a dumped DOM as (tag, attributes, path of enclosing tags)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str], tuple[str, ...]]] = []
        self.stack: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = {k: v or "" for k, v in attrs}
        self.elements.append((tag, a, tuple(self.stack)))
        if tag not in ("meta", "br", "line", "circle", "input", "link", "img"):
            self.stack.append(f"{tag}#{a.get('id', '')}")

    def handle_endtag(self, tag):
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i].split("#")[0] == tag:
                del self.stack[i:]
                break

    def find(self, tag: str, cls: str | None = None, within: str | None = None) -> list[dict[str, str]]:
        return [a for t, a, path in self.elements if t == tag and (cls is None or cls in a.get("class", "").split())
                and (within is None or any(p.endswith(f"#{within}") for p in path))]


def render(chromium: str, path, tmp_path) -> Dom:
    r = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}", "--dump-dom",
                        f"file://{os.path.abspath(path)}"], capture_output=True, text=True, timeout=180)
    assert r.returncode == 0 and "<body" in r.stdout, r.stderr[-2000:]
    dom = Dom(r.stdout)
    body = dom.find("body")[0]
    assert body.get("data-rendered") == "yes", "the page's script ran to its end"
    return dom


def _check_pictures(dom: Dom, report: dict, section: str = "model-0") -> None:
    ver = report["verification"]
    for name, p in ver["providers"].items():
        svgs = [s for s in dom.find("svg", "profile", within=section) if s.get("data-provider") == name]
        if not p["ran"]:
            assert not svgs and any(x.get("data-provider") == name for x in dom.find("p", "not-run", within=section))
            continue
        assert len(svgs) == 1
        marks = dom.find("circle", "mark", within=svgs[0]["id"])
        compared = p.get("profile") or p["outputs"]
        assert len(marks) == len(compared) == int(svgs[0]["data-marks"]) > 0
        assert {m["data-tensor"] for m in marks} == {c["tensor"] for c in p["profile"]} if "profile" in p else True
        div = dom.find("circle", "divergence", within=svgs[0]["id"])
        fd = ver.get("first_divergence")
        if fd and fd.get("provider") == name:
            assert [d["data-tensor"] for d in div] == [fd["tensor"]]
            assert dom.find("g", "first-divergence", within=svgs[0]["id"])
        else:
            assert not div


def test_failed_verification_page_renders_with_the_divergence_marked(chromium, tmp_path, capsys):
    src = tmp_path / "resnet_block.onnx"
    shutil.copy(os.path.join(SAMPLES, "resnet_block.onnx"), src)
    out = tmp_path / "report.html"
    # a bit-exact tolerance cannot be met: a real failure, reported (and drawn) with its first divergence
    assert main([str(src), "--atol", "0", "--strict", "--json", "--html", str(out)]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert not (tmp_path / "resnet_block.folded.onnx").exists(), "exit 1: no model written, the report is"
    dom = render(chromium, out, tmp_path)
    assert dom.find("section")[0].get("id") == "summary"
    rows = dom.find("tr", "decision")
    assert sorted(r["data-bn"] for r in rows) == sorted(d["bn"] for d in doc["folded"] + doc["skipped"])
    assert dom.find("span", "v-failed")
    _check_pictures(dom, doc)


def test_batch_page_renders_every_model_and_error(chromium, tmp_path, capsys):
    for n in ("skip_cases", "mlp"):
        shutil.copy(os.path.join(SAMPLES, f"{n}.onnx"), tmp_path)
    (tmp_path / "broken.onnx").write_bytes(b"not onnx")
    out = tmp_path / "batch.html"
    assert main([str(tmp_path), "--keep-going", "--dry-run", "--json", "--html", str(out), "-q"]) == 2
    doc = json.loads(capsys.readouterr().out)
    dom = render(chromium, out, tmp_path)
    assert len(dom.find("tr", "model-row")) == 3 and len(dom.find("li", "error")) == 1
    assert len(dom.find("section", "model")) == 2
    for k, rep in enumerate(doc["reports"]):
        rows = dom.find("tr", "decision", within=f"model-{k}")
        assert len(rows) == len(rep["folded"]) + len(rep["skipped"])
        assert {r["data-bn"] for r in rows} == {d["bn"] for d in rep["folded"] + rep["skipped"]}
        assert len(dom.find("tr", "skipped", within=f"model-{k}")) == len(rep["skipped"])
    for k, rep in enumerate(doc["reports"]):
        _check_pictures(dom, rep, f"model-{k}")


def test_check_page_and_screenshot(chromium, tmp_path, capsys):
    src = tmp_path / "mlp.onnx"
    shutil.copy(os.path.join(SAMPLES, "mlp.onnx"), src)
    assert main([str(src), "-q"]) == 0
    capsys.readouterr()
    out = tmp_path / "check.html"
    assert main(["check", str(src), str(tmp_path / "mlp.folded.onnx"), "--html", str(out), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    dom = render(chromium, out, tmp_path)
    _check_pictures(dom, doc)
    png = tmp_path / "shot.png"
    r = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}",
                        f"--screenshot={png}", "--window-size=1000,1200", f"file://{out}"],
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0 and png.stat().st_size > 10_000, r.stderr[-2000:]


def test_page_is_self_contained_and_escapes_names(tmp_path):
    """Names come from users' files: markup in them stays text, and nothing can be fetched."""
    evil = '<img src="http://example.com/x.png" onerror="alert(1)">'
    doc = {"schema": 1, "model": evil, "output": None, "framework": "onnx",
           "folded": [], "skipped": [{"bn": evil, "reason": "NO_PRODUCER", "detail": evil}],
           "verification": {"verdict": "passed", "providers": {"CPUExecutionProvider": {
               "ran": True, "verdict": "passed", "outputs": {evil: {"max_abs": 0.0, "atol": 1e-6, "passed": True}}}}}}
    text = page(doc)
    assert "<img" not in text and "&lt;img" in text
    assert "Content-Security-Policy" in text and "default-src 'none'" in text
    assert not re.search(r'\s(src|href)\s*=\s*"', text), "no attribute may load anything"
    assert "url(" not in text and "@import" not in text
