"""Report renderer: content, escaping, self-containment, determinism, PDF/A-3 attachment, atomic output."""

from __future__ import annotations

import copy
import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from auditor.errors import AuditorError
from auditor.report import SECTIONS, build_context, data_only_fetcher, render_html, render_report
from auditor.report import html as report_html
from auditor.report.pdf import ExternalResourceRefused, pdf_bytes, render_pdf

FIXTURE = Path(__file__).parent / "fixtures" / "results_small.json"
EVIL = "<script>alert(1)</script>"


def load() -> dict:
    return json.loads(FIXTURE.read_text(encoding="utf-8"))


def trimmed(results: dict, keep: int = 2, names: tuple[str, ...] | None = None) -> dict:
    """The fixture with fewer behaviours (the first `keep`, or those named): same structure, faster charts."""
    r = copy.deepcopy(results)
    r["behaviors"] = [b for b in r["behaviors"] if b["name"] in names] if names else r["behaviors"][:keep]
    names = {b["name"] for b in r["behaviors"]}
    r["summary"] = [s for s in r["summary"] if s["behavior"] in names]
    r["gates"] = [g for g in r["gates"] if g["behavior"] in names]
    r["diagnostics"] = {s: {b: v for b, v in d.items() if b in names} for s, d in r["diagnostics"].items()}
    return r


def rename_stage(results: dict, old: str, new: str) -> None:
    """Rename a stage everywhere the results dict refers to it."""
    for st in results["stages"]:
        if st["name"] == old:
            st["name"] = new
    for b in results["behaviors"]:
        for key in ("effects", "truth", "share", "fidelity"):
            if old in b.get(key, {}):
                b[key][new] = b[key].pop(old)
        for key in ("effects", "truth"):
            if old in b["per_example"].get(key, {}):
                b["per_example"][key][new] = b["per_example"][key].pop(old)
    for s in results.get("summary", []):
        if s["stage"] == old:
            s["stage"] = new
    for g in results.get("gates", []):
        if g.get("stage") == old:
            g["stage"] = new
    if old in results.get("diagnostics", {}):
        results["diagnostics"][new] = results["diagnostics"].pop(old)


def fake_images(results: dict) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {b["name"]: rng.random((len(b["per_example"]["ids"]), 8, 8)) for b in results["behaviors"]}


@pytest.fixture(scope="module")
def results() -> dict:
    return load()


@pytest.fixture(scope="module")
def rendered(tmp_path_factory, results) -> dict[str, Path]:
    """HTML and JSON of the whole fixture, with thumbnails, rendered once."""
    out = tmp_path_factory.mktemp("report")
    return render_report(results, out, formats=("html", "json"), images=fake_images(results))


@pytest.fixture(scope="module")
def rendered_pdf(tmp_path_factory, results) -> dict[str, Path]:
    """All three formats for a one-behaviour cut of the fixture (the whole one is in a slow test)."""
    out = tmp_path_factory.mktemp("report_pdf")
    return render_report(trimmed(results, keep=1), out)


@pytest.fixture(scope="module")
def html(rendered) -> str:
    return rendered["html"].read_text(encoding="utf-8")


# ----------------------------------------------------------------------------- files


def test_render_report_writes_every_format(rendered, rendered_pdf, results):
    assert set(rendered) == {"html", "json"}
    assert set(rendered_pdf) == {"html", "pdf", "json"}
    assert [p.name for p in (rendered_pdf["html"], rendered_pdf["pdf"], rendered_pdf["json"])] == [
        "report.html", "report.pdf", "results.json"]
    # no temporary file left beside the outputs
    assert sorted(p.name for p in rendered_pdf["html"].parent.iterdir()) == [
        "report.html", "report.pdf", "results.json"]
    expected = json.dumps(results, indent=2, sort_keys=True, allow_nan=False)
    assert rendered["json"].read_text(encoding="utf-8") == expected


def test_results_json_replaces_nan_by_null(tmp_path, results):
    r = trimmed(results, keep=1)
    r["behaviors"][0]["factual"] = float("nan")
    r["behaviors"][0]["effects"]["align"]["naive"] = float("inf")
    r["behaviors"][0]["per_example"]["factual"][0] = np.float64("nan")
    paths = render_report(r, tmp_path, formats=("json",))
    assert set(paths) == {"json"} and not (tmp_path / "report.html").exists()
    back = json.loads(paths["json"].read_text())
    assert back["behaviors"][0]["factual"] is None
    assert back["behaviors"][0]["effects"]["align"]["naive"] is None
    assert back["behaviors"][0]["per_example"]["factual"][0] is None


def test_failed_render_leaves_no_output(tmp_path, results, monkeypatch):
    import auditor.report as report

    def boom(*a, **k):
        raise RuntimeError("PDF engine failed")

    monkeypatch.setattr(report, "pdf_bytes", boom)
    with pytest.raises(RuntimeError):
        render_report(trimmed(results, keep=1), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_bad_options_are_refused_before_rendering(tmp_path, results):
    with pytest.raises(AuditorError, match="page size"):
        render_report(results, tmp_path, page_size="A5")
    with pytest.raises(AuditorError, match="format"):
        render_report(results, tmp_path, formats=("docx",))
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- HTML content


def test_every_section_anchor_is_present(html):
    for sid, title in SECTIONS:
        assert f'<section id="{sid}"' in html, sid
        if sid != "cover":
            assert f'href="#{sid}"' in html  # table of contents


def test_no_external_url_script_or_stylesheet_link(html, results):
    assert re.search(r"https?:", html, flags=re.I) is None
    assert "<script" not in html.lower()
    assert "<link" not in html.lower()
    assert "xlink" not in html
    expected = 0
    for b in results["behaviors"]:
        for per in b["per_example"]["effects"].values():
            eff = np.array(per["shifted"])
            expected += min(5, int(np.sum(eff > 0))) + min(5, int(np.sum(eff < 0)))
    assert html.count('<img class="thumb"') == expected > 60
    srcs = re.findall(r'\ssrc="([^"]*)"', html)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    hrefs = re.findall(r'\shref="([^"]*)"', html)
    assert hrefs and all(h.startswith(("#", "data:image/png;base64,")) for h in hrefs)


def test_every_estimator_and_na_for_accuracy(html, results):
    for e in results["estimators"]:
        assert f">{e}" in html
    (acc,) = build_context(trimmed(results, names=("test_accuracy",)))["behaviors"]
    assert acc["name"] == "test_accuracy" and acc["has_na"]
    for row in acc["rows"]:
        vals = {e["estimator"]: e["value"] for e in row["effects"]}
        assert vals["linear"] == "n/a" and vals["midpoint"] == "n/a"
        assert vals["shifted"] != "n/a"
    assert "n/a: this form does not apply" in html


def test_executive_summary_sentence(html):
    # spurious_probe: factual 0.385828, finetune shifted effect 0.308764, truth 0.320259
    assert ("Removing the finetune stage would lower spurious_probe from 0.386 to 0.0771 "
            "(\u22120.309); retraining confirms: \u22120.32.") in html
    # every stage's truth known and it names another stage
    r = load()
    b = r["behaviors"][1]
    b["truth"]["align"] = -0.9
    item = build_context(trimmed(r, names=(b["name"],)))["summary"][0]
    assert item["stage"] == "finetune" and item["agrees"] == "confirms"
    assert item["sentence"].endswith("Retraining finds the align stage most accountable (effect \u22120.9).")
    # align has no retraining truth
    r = load()
    r["summary"] = []
    for b in r["behaviors"]:
        b["effects"]["align"]["shifted"] = 100.0
    ctx = build_context(trimmed(r, keep=1))
    item = ctx["summary"][0]
    assert item["stage"] == "align" and item["direction"] == "raised"
    assert "no retraining result is available" in item["sentence"] and item["agrees"] is None


def test_drilldown_lists_the_examples_moved_most(results):
    b = results["behaviors"][0]
    eff = np.array(b["per_example"]["effects"]["finetune"]["shifted"])
    ids = b["per_example"]["ids"]
    ctx = build_context(trimmed(results, keep=1))
    d = next(x for x in ctx["behaviors"][0]["drilldown"] if x["stage"] == "finetune")
    assert [r["id"] for r in d["up"]] == [str(ids[i]) for i in np.argsort(-eff, kind="stable")[:5]]
    assert [r["id"] for r in d["down"]] == [str(ids[i]) for i in np.argsort(eff, kind="stable")[:5]]
    assert d["n_up"] + d["n_down"] == int(np.sum(eff != 0))


def test_drilldown_when_a_stage_moved_nothing(results):
    r = trimmed(results, keep=1)
    pe = r["behaviors"][0]["per_example"]
    pe["effects"]["align"]["shifted"] = [0.0] * len(pe["ids"])
    assert "The stage moved no example in either direction." in render_html(r)


def test_thumbnails_only_with_images_and_checked(results):
    r = trimmed(results, keep=1)
    assert '<img class="thumb"' not in render_html(r)
    name = r["behaviors"][0]["name"]
    with pytest.raises(AuditorError, match="aligned"):
        build_context(r, images={name: np.zeros((3, 8, 8))})
    with pytest.raises(AuditorError, match="no behaviour"):
        build_context(r, images={"nope": np.zeros((3, 8, 8))})


def test_png_thumbnail_is_a_valid_png():
    import base64
    import struct
    import zlib

    img = np.linspace(0, 1, 64).reshape(8, 8)
    uri = report_html.png_data_uri(img)
    png = base64.b64decode(uri.split(",", 1)[1])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    w, h = struct.unpack(">II", png[16:24])
    assert (w, h) == (40, 40)
    idat_len = struct.unpack(">I", png[33:37])[0]
    raw = zlib.decompress(png[41:41 + idat_len])
    assert len(raw) == h * (w + 1) and raw[1] == 0 and raw[-1] == 255


def test_user_strings_are_escaped(results):
    r = trimmed(results)
    r["system"]["name"] = EVIL
    r["system"]["owner"] = EVIL
    r["report_id"] = EVIL
    r["reviewers"][0]["name"] = EVIL
    r["stages"][1]["description"] = EVIL
    r["behaviors"][0]["description"] = EVIL
    r["gates"][0]["detail"] = EVIL
    r["inputs"][0]["path"] = EVIL
    r["decision"] = EVIL
    rename_stage(r, "finetune", EVIL)
    out = render_html(r)
    assert EVIL not in out
    assert "<script" not in out.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in out
    # the stage name reached the tables, the summary and the charts (as SVG text, escaped)
    assert out.count("&lt;script&gt;") >= 10


def test_mathtext_in_names_is_literal(results):
    r = trimmed(results, keep=1)
    rename_stage(r, "finetune", "fine$tune$")
    out = render_html(r)  # matplotlib would raise on unbalanced or invalid mathtext
    assert "fine$tune$" in out


def test_same_input_gives_identical_html(html, results):
    assert render_html(results, images=fake_images(results)) == html


def test_optional_keys_may_be_absent(results):
    r = trimmed(results, keep=1)
    for key in ("report_id", "decision", "reviewers", "gates", "inputs", "versions", "seeds", "diagnostics",
                "fidelity_summary", "summary"):
        r.pop(key)
    for st in r["stages"]:
        st.pop("schedule")
    out = render_html(r)
    for sid, _ in SECTIONS:
        assert f'<section id="{sid}"' in out
    assert "NOT RECORDED" in out
    assert "No diagnostics were computed" in out
    assert "No release gates were evaluated" in out


def test_behaviour_without_any_estimate(results):
    r = trimmed(results, keep=1)
    r["summary"] = []
    for per in r["behaviors"][0]["effects"].values():
        for e in per:
            per[e] = None
    out = render_html(r)
    assert f"No estimate is available for {r['behaviors'][0]['name']}." in out


def test_malformed_results_raise_auditor_error():
    with pytest.raises(AuditorError, match="behaviors"):
        render_html({"system": {}, "stages": []})


def test_untrusted_estimates_are_flagged(html):
    assert "Diagnostics flag 4 stage" in html
    assert html.count('class="untrusted"') >= 8  # 4 counterfactual rows + 4 diagnostics rows


def test_diagnostics_inside_each_behaviour_are_used(results):
    """auditor.audit puts diagnostics in each behaviour ({stage: {...}}); the top-level form works too."""
    r = trimmed(results)
    top = r.pop("diagnostics")
    for b in r["behaviors"]:
        b["diagnostics"] = {s: top[s][b["name"]] for s in top}
    ctx = build_context(r)
    assert ctx["diagnostics"] is not None and len(ctx["diagnostics"]) == 3 * 2
    assert ctx["n_untrusted"] == sum(not top[s][b]["trusted"] for s in top for b in top[s])
    assert [row["trusted"] for row in ctx["behaviors"][0]["rows"]] == [
        top[s][r["behaviors"][0]["name"]]["trusted"] for s in ("pretrain", "finetune", "align")]


def test_truth_agreement():
    agree = report_html.truth_agreement
    assert agree(0.309, 0.320) == "confirms"
    assert agree(-2.11, -0.057) == "direction"
    assert agree(0.1, -0.2) == "disagrees"
    assert agree(0.1, None) is None and agree(None, 0.1) is None
    assert agree(0.0, 0.0) == "confirms" and agree(0.1, 0.0) == "disagrees"


def test_gates_and_decision(html):
    assert "2 of 3 gates pass." in html
    assert 'status-fail">FAIL<' in html and 'status-pass">PASS<' in html
    assert 'decision-blocked">BLOCKED<' in html


def test_compliance_mapping(html):
    rows = report_html.load_compliance()
    assert len(rows) >= 12
    sections = {s for s, _ in SECTIONS}
    assert all(r["section"] in sections for r in rows)
    assert not any("Article 12" in r["clause"] for r in rows)
    frameworks = " ".join(r["framework"] + " " + r["clause"] for r in rows)
    for needle in ("Annex IV, point 2(b)", "Annex IV, point 2(d)", "Annex IV, point 2(g)", "Annex XI",
                   "Article 17", "MEASURE 2.1", "MEASURE 2.5", "MEASURE 2.8", "MEASURE 2.9", "MEASURE 2.13",
                   "ISO/IEC 42001"):
        assert needle in frameworks, needle
    unverified = sum(not r["verified"] for r in rows)
    assert html.count('class="badge unverified">unverified clause number<') == unverified + 1  # + legend


def test_number_formatting():
    f = report_html
    assert f.fmt_num(-0.34) == "\u22120.34"
    assert f.fmt_signed(0.309) == "+0.309"
    assert f.fmt_signed(-0.0) == "0"
    assert f.fmt_num(1.5e-5) == "1.50e-05"
    assert f.fmt_num(999.7) == "1000"
    assert f.fmt_num(12345.6) == "12,346"
    assert f.fmt_num(None) == "\u2014" and f.fmt_num(float("nan")) == "\u2014"
    assert f.fmt_pct(-0.9709) == "\u221297%" and f.fmt_pct(0.016) == "+1.6%"
    assert f.sanitize({"a": [np.float32(1.5), float("inf")], 1: np.int64(2)}) == {"a": [1.5, None], "1": 2}
    assert math.isclose(f._num("0.5"), 0.5)


# ----------------------------------------------------------------------------- PDF


def check_pdf(rendered: dict[str, Path], min_pages: int) -> None:
    from pyhanko.pdf_utils.reader import PdfFileReader

    data = rendered["pdf"].read_bytes()
    assert data.startswith(b"%PDF-")
    reader = PdfFileReader(io.BytesIO(data))
    root = reader.root
    names = root["/Names"]["/EmbeddedFiles"]["/Names"]
    assert names[0] == "results.json"
    spec = names[1].get_object()
    assert spec["/AFRelationship"] == "/Data"
    assert spec["/EF"]["/F"].get_object().data == rendered["json"].read_bytes()
    assert len(root["/AF"]) == 1
    xmp = root["/Metadata"].get_object().data
    assert b'pdfaid:part="3"' in xmp and b'pdfaid:conformance="B"' in xmp
    assert int(root["/Pages"]["/Count"]) >= min_pages


def test_pdf_is_pdfa3_with_results_attached(rendered_pdf):
    check_pdf(rendered_pdf, min_pages=8)


@pytest.mark.slow
def test_whole_fixture_pdf(tmp_path, results):
    paths = render_report(results, tmp_path, images=fake_images(results), page_size="Letter")
    check_pdf(paths, min_pages=12)


def test_fetcher_refuses_everything_but_data_uris():
    fetcher = data_only_fetcher()
    for url in ("https://example.com/logo.png", "http://127.0.0.1/x.css", "file:///etc/passwd", "ftp://x/y"):
        with pytest.raises(ExternalResourceRefused):
            fetcher(url)
    resp = fetcher("data:text/plain;base64,aGk=")
    assert resp.read() == b"hi"


def test_pdf_render_fails_on_an_external_reference(tmp_path):
    html = '<html><body><p>x</p><img src="https://example.invalid/tracker.png"></body></html>'
    with pytest.raises(ExternalResourceRefused, match="example.invalid"):
        render_pdf(html, tmp_path / "x.pdf", "A4")
    assert list(tmp_path.iterdir()) == []
    html = '<html><head><link rel="stylesheet" href="file:///etc/hosts"></head><body>x</body></html>'
    with pytest.raises(ExternalResourceRefused):
        pdf_bytes(html)


def test_letter_page_size():
    from pyhanko.pdf_utils.reader import PdfFileReader

    for size, expected in (("Letter", (612, 792)), ("a4", (595, 842))):
        data = pdf_bytes("<html><body><p>x</p></body></html>", size)
        page = PdfFileReader(io.BytesIO(data)).root["/Pages"]["/Kids"][0]
        w, h = (round(float(page["/MediaBox"][i])) for i in (2, 3))
        assert (w, h) == expected


@pytest.mark.slow
def test_pdf_reproducible_with_source_date_epoch(results, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    page = render_html(trimmed(results, keep=1))
    a = pdf_bytes(page, attachment=b"{}")
    b = pdf_bytes(page, attachment=b"{}")
    assert a == b


def test_ids_are_unique_and_every_internal_reference_resolves(html):
    ids = re.findall(r'\sid="([^"]+)"', html)
    assert len(ids) == len(set(ids))
    refs = set(re.findall(r'href="#([^"]+)"', html)) | set(re.findall(r"url\(#([^)]+)\)", html))
    assert refs and refs <= set(ids)


def test_sign_agreement_just_below_70_percent_does_not_read_as_70(results):
    """The fidelity table shades sign agreement below 70 %; 0.698 must not print as "70%" beside the shading."""
    r = trimmed(results, keep=1)
    b = r["behaviors"][0]
    stage = next(iter(b["fidelity"]))
    est = next(iter(b["fidelity"][stage]))
    b["fidelity"][stage][est]["sign_agreement"] = 0.698
    row = next(x for x in build_context(r)["behaviors"][0]["fidelity"] if x["stage"] == stage and x["estimator"] == est)
    assert row["sign_agreement"] == "69.8%" and row["weak_s"] is True
    b["fidelity"][stage][est]["sign_agreement"] = 0.69996
    row = next(x for x in build_context(r)["behaviors"][0]["fidelity"] if x["stage"] == stage and x["estimator"] == est)
    assert row["sign_agreement"] == "69.9%"
    b["fidelity"][stage][est]["sign_agreement"] = 0.7
    row = next(x for x in build_context(r)["behaviors"][0]["fidelity"] if x["stage"] == stage and x["estimator"] == est)
    assert row["sign_agreement"] == "70%" and row["weak_s"] is False


@pytest.mark.parametrize("curvature, judged", [("secant", False), ("hessian", True), (None, False)])
def test_diagnostics_verdict_follows_the_headline_estimator(results, curvature, judged):
    """The diagnostics judge first-order estimates: with the exact tier's secant product as the
    headline, the summary carries no 'not trusted' mark (the Diagnostics section says why); with
    the Hessian product (first order in the change) it does, as for AA."""
    r = trimmed(results, keep=1)
    b = r["behaviors"][0]
    for s in b["effects"]:
        b["effects"][s]["exact"] = b["effects"][s]["shifted"]
        b["per_example"]["effects"][s]["exact"] = b["per_example"]["effects"][s]["shifted"]
    r["estimators"] = [*r["estimators"], "exact"]
    r["primary_estimator"] = "exact"
    r["tiers"] = {"exact": {"curvature": curvature}} if curvature else {}
    ctx = build_context(r)
    assert ctx["judged"] is judged
    flagged = [s for s, d in r["diagnostics"].items() if d[b["name"]]["trusted"] is False]
    assert flagged, "the fixture must flag a stage for this test to mean anything"
    item = ctx["summary"][0]
    if item["stage"] in flagged:
        assert (item["trusted"] is False) is judged
    html = render_html(r)
    assert ("These checks judge the first-order (AA) estimates" in html) is (not judged)


def test_scatter_without_per_example_values_is_left_out(results):
    """A headline estimator listed without per-example values (e.g. results trimmed by hand) must not
    break the fidelity scatter (matplotlib refuses a legend of 0 columns)."""
    r = trimmed(results, keep=1)
    b = r["behaviors"][0]
    for s in b["per_example"]["effects"]:
        b["per_example"]["effects"][s] = {}
    assert "<svg" not in "".join(str(x) for x in [build_context(r)["behaviors"][0].get("scatter")])
