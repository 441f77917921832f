"""The documentation: the README is a front page, every link resolves, and every test a page cites exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)#\s]+)(#[^)\s]*)?\)")
CITED_TEST = re.compile(r"tests/(test_\w+\.py)::(test_\w+)")


def test_the_readme_is_a_front_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) <= 12 * 1024
    assert 'pip install -e ".[dev]" && python -m pytest -q' in readme  # the command CI runs
    for page in ("scripting", "compatibility", "web-ui", "headhunter", "evaluation", "testbed", "architecture"):
        assert f"docs/{page}.md" in readme


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    for target, _ in LINK.findall(page.read_text()):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        assert (page.parent / target).exists(), f"{page.name} links to missing {target}"


def _test_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {node.name for node in tree.body if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_cited_test_exists(page):
    for file, name in CITED_TEST.findall(page.read_text()):
        assert name in _test_names(ROOT / "tests" / file), f"{page.name} cites missing tests/{file}::{name}"


def test_the_compatibility_page_backs_every_claim_with_a_test():
    text = (ROOT / "docs" / "compatibility.md").read_text()
    sections = re.split(r"\n## ", text)[1:]
    for section in sections:
        title = section.splitlines()[0]
        if title == "diffusers' own tests":
            continue
        assert CITED_TEST.search(section), f"section {title!r} cites no test"


def test_the_web_ui_page_lists_every_limit_with_its_default_and_flag():
    import dataclasses

    from headpag.options import Limits

    text = (ROOT / "docs" / "web-ui.md").read_text()
    table = text[text.index("### Every limit") :]
    for field in dataclasses.fields(Limits):
        default = f"{field.default:g}" if isinstance(field.default, float) else str(field.default)
        assert f"| `{field.name}` | {default} | `{Limits.flag(field.name)}` |" in table, field.name


def test_the_web_ui_page_names_every_public_endpoint():
    from headpag.app.ui import PUBLIC_ENDPOINTS

    text = (ROOT / "docs" / "web-ui.md").read_text()
    section = text[text.index("Endpoints:") :][:400]
    assert all(f"`/{name}`" in section for name in PUBLIC_ENDPOINTS)


def test_the_readme_and_testbed_page_say_what_the_experiments_measured():
    """The README's testbed claims and the summary in docs/testbed.md come from docs/testbed/results.json (written
    by benchmarks/testbed_experiments.py with docs/testbed-results.md)."""
    import json

    results = json.loads((ROOT / "docs" / "testbed" / "results.json").read_text())
    readme = (ROOT / "README.md").read_text().replace("−", "-")
    page = (ROOT / "docs" / "testbed.md").read_text()

    def interval(d):
        return f"{d['difference']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"

    default = results["default"]
    assert f"{results['clean']['held_in']['all_right']['mean']:.1%}" in readme
    sd3 = readme[readme.index("- The shapes testbed is") : readme.index("- Its FLUX sibling")]
    assert ("**not clean**" in sd3) == (not results["clean"]["clean"]) == ("**clean**" not in sd3)
    assert interval(results["regimes"]["no CFG"]["held_in"]["structure"]) in readme
    assert interval(results["regimes"]["no CFG"]["held_in"]["all_right"]) in readme
    assert interval(results["concepts"]["larger"]["asked"]) in readme
    assert interval(default["check"]["all_right"]) in readme
    assert f"{len(results['specific_heads'])} of 80 heads" in readme
    assert f"layer {default['heads']}, s = {default['pag_scale']:g}, u = {default['pag_identity_weight']:g}" in readme
    block = page[page.index("<!-- results:") : page.index("<!-- /results -->")]
    assert interval(default["check"]["all_right"]) in block
    assert ("the bar (lower ends ≥ −0.02) is not met" in block) == (not default["meets"])


def test_the_flux_testbed_claims_come_from_its_experiments():
    """The README's and docs/testbed.md's claims on `headpag-shapes-flux` come from docs/testbed/flux-results.json
    (written by benchmarks/testbed_flux_experiments.py with docs/testbed-flux.md)."""
    import json

    results = json.loads((ROOT / "docs" / "testbed" / "flux-results.json").read_text())
    readme = (ROOT / "README.md").read_text().replace("−", "-")
    page = (ROOT / "docs" / "testbed.md").read_text().replace("−", "-")

    def interval(d):
        return f"{d['difference']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"

    clean = f"{results['clean']['held_in']['all_right']['mean']:.1%}"
    cfg = interval(results["cfg"]["held_in"]["all_right"])
    no_cfg = results["regimes"]["no CFG"]
    readme_part = readme[readme.index("- Its FLUX sibling") :].split("\n- ")[0]
    for text in (readme_part, page[page.index("## The FLUX sibling") :]):
        assert clean in text and cfg in text and interval(no_cfg["held_out"]["structure"]) in text
        assert ("not clean" in text) == (not results["clean"]["clean"])
    assert f"PAG on layer {no_cfg['best']}" in readme and interval(no_cfg["held_in"]["structure"]) in page
    default = results["default"]
    settings = f"s = {default['pag_scale']:g}, u = {default['pag_identity_weight']:g}"
    assert f"PAG on layer {default['heads']} at {settings}" in page
    assert interval(default["check"]["all_right"]) in page and ("misses the bar" in page) == (not default["meets"])
