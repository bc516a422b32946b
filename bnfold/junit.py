"""JUnit XML for CI systems: one test case per (provider, output); unavailable providers are skipped."""
from __future__ import annotations

import xml.etree.ElementTree as ET

from .core.files import atomic_write
from .core.results import Verification


def junit_xml(ver: Verification, suite: str = "bnfold") -> str:
    """The verification as a JUnit XML document."""
    root = ET.Element("testsuites")
    ts = ET.SubElement(root, "testsuite", name=suite)
    tests = failures = skipped = 0
    for pname, p in ver.providers.items():
        if not p.ran:
            tc = ET.SubElement(ts, "testcase", classname=f"bnfold.{pname}", name="(provider)")
            ET.SubElement(tc, "skipped", message=f"not run: {p.why}")
            tests += 1
            skipped += 1
            continue
        for oname, st in p.outputs.items():
            tc = ET.SubElement(ts, "testcase", classname=f"bnfold.{pname}", name=oname)
            tests += 1
            if not st.get("passed"):
                failures += 1
                f = ET.SubElement(tc, "failure", message=f"max abs {st.get('max_abs')} > atol {st.get('atol')}")
                f.text = "\n".join(f"{k}: {v}" for k, v in st.items())
        if not p.passed and all(st.get("passed") for st in p.outputs.values()):
            # outputs agree but an intermediate diverged: report it as its own failing case
            fd = ver.first_divergence or {}
            tc = ET.SubElement(ts, "testcase", classname=f"bnfold.{pname}", name=f"intermediate {fd.get('tensor')}")
            ET.SubElement(tc, "failure", message=f"tensor {fd.get('tensor')} from {fd.get('node')} diverges")
            tests += 1
            failures += 1
    ts.set("tests", str(tests))
    ts.set("failures", str(failures))
    ts.set("skipped", str(skipped))
    ts.set("errors", "0")
    return ET.tostring(root, encoding="unicode")


def write_junit(ver: Verification, path: str, suite: str = "bnfold") -> None:
    """Write junit_xml(ver) atomically."""
    text = junit_xml(ver, suite)

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write('<?xml version="1.0" encoding="utf-8"?>\n' + text + "\n")

    atomic_write(path, write)
