"""Signing and verification: keygen, PAdES PDF signature, manifest + Ed25519 signature,
DSSE/in-toto attestation, tamper detection, OpenSSL interoperability, reproducibility, CLI."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
from datetime import datetime, timezone
import stat
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from auditor import signing
from auditor.cli_sign import keygen, verify
from auditor.errors import AuditorError

PASSPHRASE = b"correct horse battery staple"
SDE = "1700000000"  # 2023-11-14T22:13:20Z
OPENSSL = shutil.which("openssl")

RESULTS = {
    "format": 1,
    "system": {"name": "toy", "version": "1.0.0", "owner": "ML Platform team"},
    "pipeline": {"path": "pipeline.yaml", "sha256": "0" * 64},
    "stages": [{"name": "pretrain", "owner": "Foundation team"}, {"name": "finetune", "owner": "Tuning team"}],
    "gates": [{"id": "final-loss", "rule": "final_value", "description": "d", "behavior": "loss", "stage": None,
               "estimator": None, "observed": 0.2, "min": None, "max": 0.5, "status": "PASS", "detail": "ok."}],
}


@pytest.fixture(scope="session")
def keys(tmp_path_factory):
    """One key folder (passphrase-protected) for the whole session: RSA-3072 keygen is ~1 s."""
    d = tmp_path_factory.mktemp("keys") / "k"
    assert signing.generate_keypair(d, PASSPHRASE, name="Ada Lovelace") == (d / "private.pem", d / "public.pem")
    return d


@pytest.fixture(scope="session")
def unsigned(tmp_path_factory):
    """A report folder (tiny PDF/A-3b from WeasyPrint, HTML, JSON) and an inputs folder."""
    import weasyprint

    base = tmp_path_factory.mktemp("unsigned")
    rep = base / "report"
    rep.mkdir()
    (rep / "report.html").write_text("<html><body><h1>Report</h1><p>ok</p></body></html>\n")
    weasyprint.HTML(string="<html><head><title>Report</title></head><body><h1>Report</h1></body></html>"
                    ).write_pdf(rep / "report.pdf", pdf_variant="pdf/a-3b")
    (rep / "results.json").write_text(json.dumps(RESULTS))
    inp = base / "inputs"
    (inp / "artifacts").mkdir(parents=True)
    (inp / "pipeline.yaml").write_text("format: 1\nsystem: {name: toy}\n")
    (inp / "artifacts" / "x.safetensors").write_bytes(bytes(range(256)) * 4)
    (inp / "artifacts" / "log.csv").write_text("step,stage,group,lr\n0,pretrain,all,0.1\n")
    return base


INPUTS = [{"role": "pipeline", "path": "pipeline.yaml"},
          {"role": "checkpoint", "path": "artifacts/x.safetensors"},
          {"role": "log", "path": "artifacts/log.csv"}]


def _copy_unsigned(unsigned: Path, dest: Path) -> tuple[Path, Path]:
    shutil.copytree(unsigned, dest)
    return dest / "report", dest / "inputs"


def _sign(report: Path, inputs: Path, keys: Path) -> Path:
    files = {"html": report / "report.html", "pdf": report / "report.pdf", "json": report / "results.json"}
    results = dict(RESULTS, inputs_root=str(inputs))
    return signing.sign_report_dir(report, files, INPUTS, results, keys / "private.pem", PASSPHRASE)


@pytest.fixture(scope="session")
def signed(unsigned, keys, tmp_path_factory):
    """A signed report folder (SOURCE_DATE_EPOCH set); never modified by tests (copy it first)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("SOURCE_DATE_EPOCH", SDE)
    try:
        report, inputs = _copy_unsigned(unsigned, tmp_path_factory.mktemp("signed") / "s")
        _sign(report, inputs, keys)
    finally:
        mp.undo()
    return report.parent


@pytest.fixture
def work(signed, tmp_path):
    """A private copy of the signed report and its inputs: (report dir, inputs dir)."""
    shutil.copytree(signed, tmp_path / "w")
    return tmp_path / "w" / "report", tmp_path / "w" / "inputs"


def _flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------- keygen

def test_keygen_writes_keys_with_safe_modes(keys):
    names = sorted(p.name for p in keys.iterdir())
    assert names == ["pdf-signing-cert.pem", "pdf-signing-key.pem", "private.pem", "public.pem"]
    for private in ("private.pem", "pdf-signing-key.pem"):
        assert stat.S_IMODE((keys / private).stat().st_mode) == 0o600
        assert (keys / private).read_text().startswith("-----BEGIN ENCRYPTED PRIVATE KEY-----")
    assert (keys / "public.pem").read_text().startswith("-----BEGIN PUBLIC KEY-----")
    cert = x509.load_pem_x509_certificate((keys / "pdf-signing-cert.pem").read_bytes())
    assert cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == "Ada Lovelace"
    assert isinstance(cert.public_key(), rsa.RSAPublicKey) and cert.public_key().key_size == 3072
    days = (cert.not_valid_after_utc - cert.not_valid_before_utc).days
    assert 3 * 365 <= days <= 3 * 365 + 2


def test_keygen_refuses_to_overwrite(keys):
    before = {p.name: p.read_bytes() for p in keys.iterdir()}
    with pytest.raises(AuditorError, match="refusing to overwrite"):
        signing.generate_keypair(keys)
    assert before == {p.name: p.read_bytes() for p in keys.iterdir()}


def test_encrypted_key_needs_the_right_passphrase(keys):
    with pytest.raises(AuditorError, match="passphrase"):
        signing.load_signing_key(keys / "private.pem")
    with pytest.raises(AuditorError, match="wrong passphrase"):
        signing.load_signing_key(keys / "private.pem", b"wrong")
    assert isinstance(signing.load_signing_key(keys / "private.pem", PASSPHRASE), Ed25519PrivateKey)


def test_wrong_passphrase_that_decrypts_to_garbage_is_still_a_wrong_passphrase(keys, monkeypatch):
    """About 1 wrong passphrase in 200 decrypts without a padding error and then fails to parse:
    cryptography says "Could not deserialize key data" (seen as a flaky test). Forced here."""
    def garbage(data, password=None, **kw):
        raise ValueError("Could not deserialize key data. The data may be in an incorrect format ...")
    monkeypatch.setattr(signing.serialization, "load_pem_private_key", garbage)
    with pytest.raises(AuditorError, match="wrong passphrase"):
        signing.load_signing_key(keys / "private.pem", b"wrong")
    plain = keys.parent / "plain.pem"
    plain.write_bytes(b"-----BEGIN PRIVATE KEY-----\nnot base64\n-----END PRIVATE KEY-----\n")
    with pytest.raises(AuditorError, match="not a PEM private key"):
        signing.load_signing_key(plain, b"wrong")


def test_keygen_cli_without_passphrase(tmp_path, monkeypatch):
    monkeypatch.setattr(signing, "PDF_RSA_BITS", 2048)  # speed; the 3072-bit default is checked above
    r = CliRunner().invoke(keygen, ["--out", str(tmp_path / "k"), "--name", "Grace Hopper"])
    assert r.exit_code == 0, r.output
    assert "BEGIN" not in r.output  # never prints key material
    pem = (tmp_path / "k" / "private.pem").read_bytes()
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    key = signing.load_signing_key(tmp_path / "k" / "private.pem")
    assert signing.public_key_fingerprint(key.public_key()) in r.output
    r2 = CliRunner().invoke(keygen, ["--out", str(tmp_path / "k")])
    assert r2.exit_code == 2 and "refusing to overwrite" in r2.output


def test_keygen_cli_missing_passphrase_env(tmp_path, monkeypatch):
    monkeypatch.delenv("NO_SUCH_VAR_AUDITOR", raising=False)
    r = CliRunner().invoke(keygen, ["--out", str(tmp_path / "k"), "--passphrase-env", "NO_SUCH_VAR_AUDITOR"])
    assert r.exit_code == 2 and "NO_SUCH_VAR_AUDITOR" in r.output
    assert not (tmp_path / "k").exists()


# ---------------------------------------------------------------- round trip

def test_round_trip_verifies(work, keys):
    report, inputs = work
    assert signing.verify_report(report, keys / "public.pem", inputs_root=inputs) == []


def test_verify_uses_recorded_inputs_root(signed, keys):
    assert signing.verify_report(signed / "report", keys / "public.pem") == []


def test_manifest_contents(signed, keys):
    report = signed / "report"
    body = (report / "manifest.json").read_bytes()
    m = json.loads(body)
    assert body == signing.canonical_json(m)  # canonical bytes, exactly
    assert [f["name"] for f in m["report_files"]] == ["report.html", "report.pdf", "results.json"]
    pdf = m["report_files"][1]
    assert pdf["sha256"] == hashlib.sha256((report / "report.pdf").read_bytes()).hexdigest()  # the signed bytes
    assert pdf["bytes"] == (report / "report.pdf").stat().st_size
    assert [(i["role"], i["path"]) for i in m["inputs"]] == [
        ("log", "artifacts/log.csv"), ("checkpoint", "artifacts/x.safetensors"), ("pipeline", "pipeline.yaml")]
    assert m["inputs_root"] == str(signed / "inputs")
    assert m["timestamp"] == "2023-11-14T22:13:20Z"
    pub = signing.load_public_key(keys / "public.pem")
    assert m["signer"]["name"] == "Ada Lovelace"
    assert m["signer"]["public_key_sha256"] == signing.public_key_fingerprint(pub)
    cert = x509.load_pem_x509_certificate((keys / "pdf-signing-cert.pem").read_bytes())
    assert m["signer"]["pdf_certificate_sha256"] == cert.fingerprint(cert.signature_hash_algorithm).hex()
    assert {"python", "torch", "auditor", "pyhanko", "cryptography"} <= set(m["tools"])
    assert m["decision"] == "APPROVED" and m["gates"]["passed"] == 1 and m["gates"]["failed"] == 0
    assert m["pipeline"]["stages"] == [{"name": "pretrain", "owner": "Foundation team"},
                                       {"name": "finetune", "owner": "Tuning team"}]


def test_dsse_envelope(signed, keys):
    report = signed / "report"
    env = json.loads((report / "attestation.dsse.json").read_text())
    assert env["payloadType"] == "application/vnd.in-toto+json"
    payload = base64.b64decode(env["payload"])
    pub = signing.load_public_key(keys / "public.pem")
    (sig,) = env["signatures"]
    assert sig["keyid"] == signing.public_key_fingerprint(pub)
    pub.verify(base64.b64decode(sig["sig"]), signing.dsse_pae(env["payloadType"], payload))  # raises if bad
    st = json.loads(payload)
    m = json.loads((report / "manifest.json").read_bytes())
    assert st["_type"] == "https://in-toto.io/Statement/v1"
    assert st["predicateType"] == "https://auditor.dev/accountability-report/v1"
    assert st["subject"] == [{"name": f["name"], "digest": {"sha256": f["sha256"]}} for f in m["report_files"]]
    pred = st["predicate"]
    assert pred["inputs"] == m["inputs"] and pred["decision"] == "APPROVED"
    assert pred["pipeline"]["system"]["name"] == "toy" and len(pred["pipeline"]["stages"]) == 2
    assert pred["manifest_sha256"] == hashlib.sha256((report / "manifest.json").read_bytes()).hexdigest()


def test_dsse_pae_matches_spec_example():
    # DSSE protocol.md: PAE("http://example.com/HelloWorld", "hello world")
    assert signing.dsse_pae("http://example.com/HelloWorld", b"hello world") == \
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"


# ---------------------------------------------------------------- tampering

@pytest.mark.parametrize("rel, label", [
    ("report/report.html", "report.html"),
    ("report/report.pdf", "report.pdf"),
    ("report/results.json", "results.json"),
    ("inputs/artifacts/x.safetensors", "artifacts/x.safetensors"),
    ("inputs/pipeline.yaml", "pipeline.yaml"),
])
def test_one_changed_byte_is_named(work, keys, rel, label):
    report, inputs = work
    _flip_byte(report.parent / rel)
    assert signing.verify_report(report, keys / "public.pem", inputs_root=inputs) == [f"{label}: SHA-256 mismatch"]


@pytest.mark.parametrize("rel, label", [
    ("report/report.pdf", "report.pdf"),
    ("inputs/artifacts/log.csv", "artifacts/log.csv"),
])
def test_missing_file_is_named(work, keys, rel, label):
    report, inputs = work
    (report.parent / rel).unlink()
    assert signing.verify_report(report, keys / "public.pem", inputs_root=inputs) == [f"{label}: missing"]


def test_wrong_inputs_root_names_every_input(work, keys, tmp_path):
    report, _ = work
    (tmp_path / "empty").mkdir()
    problems = signing.verify_report(report, keys / "public.pem", inputs_root=tmp_path / "empty")
    assert sorted(problems) == ["artifacts/log.csv: missing", "artifacts/x.safetensors: missing",
                                "pipeline.yaml: missing"]


def test_wrong_public_key_fails(work, tmp_path):
    report, inputs = work
    other = tmp_path / "other.pem"
    other.write_bytes(Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    problems = signing.verify_report(report, other, inputs_root=inputs)
    assert len(problems) == 2
    assert problems[0].startswith("manifest.sig: signature invalid (the manifest names signer key")
    assert problems[1] == "attestation.dsse.json: signature invalid"


def test_edited_manifest_fails(work, keys):
    """Re-pointing the manifest at a tampered file breaks manifest.sig and the DSSE link."""
    report, inputs = work
    _flip_byte(report / "report.html")
    m = json.loads((report / "manifest.json").read_bytes())
    m["report_files"][0]["sha256"] = hashlib.sha256((report / "report.html").read_bytes()).hexdigest()
    (report / "manifest.json").write_bytes(signing.canonical_json(m))
    problems = signing.verify_report(report, keys / "public.pem", inputs_root=inputs)
    assert problems == ["manifest.sig: signature invalid",
                        "attestation.dsse.json: subjects differ from the report files in manifest.json",
                        "attestation.dsse.json: manifest_sha256 does not match manifest.json"]


def test_edited_attestation_fails(work, keys):
    report, inputs = work
    env = json.loads((report / "attestation.dsse.json").read_text())
    st = json.loads(base64.b64decode(env["payload"]))
    st["predicate"]["decision"] = "APPROVED-BY-HAND"
    env["payload"] = base64.b64encode(json.dumps(st).encode()).decode()
    (report / "attestation.dsse.json").write_text(json.dumps(env))
    assert signing.verify_report(report, keys / "public.pem", inputs_root=inputs) == [
        "attestation.dsse.json: signature invalid"]


@pytest.mark.parametrize("name", ["manifest.sig", "attestation.dsse.json"])
def test_missing_signature_files_are_named(work, keys, name):
    report, inputs = work
    (report / name).unlink()
    assert signing.verify_report(report, keys / "public.pem", inputs_root=inputs) == [f"{name}: missing"]


def test_missing_manifest(work, keys):
    report, inputs = work
    (report / "manifest.json").unlink()
    assert signing.verify_report(report, keys / "public.pem") == ["manifest.json: missing"]


def test_bad_paths_raise(work, keys, tmp_path):
    report, _ = work
    with pytest.raises(AuditorError, match="report folder not found"):
        signing.verify_report(tmp_path / "nope", keys / "public.pem")
    with pytest.raises(AuditorError, match="public key not found"):
        signing.verify_report(report, tmp_path / "nope.pem")
    rsa_pub = x509.load_pem_x509_certificate((keys / "pdf-signing-cert.pem").read_bytes()).public_key()
    (tmp_path / "rsa.pem").write_bytes(
        rsa_pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    with pytest.raises(AuditorError, match="expected an Ed25519 public key"):  # the PDF key is not accepted
        signing.verify_report(report, tmp_path / "rsa.pem")


# ---------------------------------------------------------------- PDF signature

def test_pdf_signature_validates_with_pyhanko(signed, keys):
    assert signing.verify_pdf_signature(signed / "report" / "report.pdf", keys / "pdf-signing-cert.pem") == []


def test_pdf_signature_detects_tampering(work, keys):
    report, _ = work
    pdf = report / "report.pdf"
    _flip_byte(pdf, 200)  # inside the original (signed) revision
    problems = signing.verify_pdf_signature(pdf, keys / "pdf-signing-cert.pem")
    assert problems and "does not match the document bytes" in problems[0]


def test_pdf_signature_untrusted_cert(work, tmp_path):
    report, _ = work
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    other = signing._self_signed_cert(key, "Mallory", datetime.now(timezone.utc))
    (tmp_path / "other.pem").write_bytes(other.public_bytes(serialization.Encoding.PEM))
    problems = signing.verify_pdf_signature(report / "report.pdf", tmp_path / "other.pem")
    assert problems and "not from the trusted certificate" in problems[0]


def test_pdf_signing_keeps_pdfa_and_metadata(signed, unsigned):
    """Incremental update: the original bytes are a prefix; version stays 1.7; Info and XMP unchanged."""
    from pyhanko.pdf_utils.reader import PdfFileReader

    original = (unsigned / "report" / "report.pdf").read_bytes()
    signed_pdf = (signed / "report" / "report.pdf").read_bytes()
    assert signed_pdf.startswith(original) and len(signed_pdf) > len(original)
    a = PdfFileReader(io.BytesIO(original))
    b = PdfFileReader(io.BytesIO(signed_pdf))
    assert b.input_version == (1, 7) and "/Version" not in b.root
    assert dict(b.trailer["/Info"]) == dict(a.trailer["/Info"])
    assert b.root["/Metadata"].data == a.root["/Metadata"].data
    assert b"pdfaid:part" in b.root["/Metadata"].data
    (sig,) = b.embedded_signatures
    assert sig.sig_object["/SubFilter"] == "/ETSI.CAdES.detached"
    assert sig.self_reported_timestamp == datetime.fromtimestamp(int(SDE), tz=timezone.utc)
    widget = sig.sig_field
    assert widget["/F"] == 132 and list(widget["/Rect"]) == [0, 0, 0, 0]  # print + locked, invisible


@pytest.mark.skipif(not shutil.which("pdfsig"), reason="poppler's pdfsig not installed")
def test_pdf_signature_valid_for_pdfsig(signed):
    out = subprocess.run(["pdfsig", str(signed / "report" / "report.pdf")], capture_output=True, text=True).stdout
    assert "Signature is Valid" in out and "Total document signed" in out and "ETSI.CAdES.detached" in out


# ---------------------------------------------------------------- OpenSSL

@pytest.mark.skipif(OPENSSL is None, reason="openssl CLI not installed")
def test_openssl_verifies_manifest_signature(work, keys):
    report, _ = work
    cmd = [OPENSSL, "pkeyutl", "-verify", "-pubin", "-inkey", str(keys / "public.pem"), "-rawin",
           "-in", str(report / "manifest.json"), "-sigfile", str(report / "manifest.sig")]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0 and "Signature Verified Successfully" in r.stdout
    _flip_byte(report / "manifest.json")
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode != 0


@pytest.mark.skipif(OPENSSL is None, reason="openssl CLI not installed")
def test_openssl_fingerprint_matches_manifest(signed, keys):
    der = subprocess.run([OPENSSL, "pkey", "-pubin", "-in", str(keys / "public.pem"), "-outform", "DER"],
                         capture_output=True, check=True).stdout
    m = json.loads((signed / "report" / "manifest.json").read_bytes())
    assert hashlib.sha256(der).hexdigest() == m["signer"]["public_key_sha256"]


# The shell recipes given to reviewers in the README (OpenSSL + coreutils only).
README_DSSE = r"""
T=application/vnd.in-toto+json
sed -n 's/^  "payload": "\(.*\)",$/\1/p' attestation.dsse.json | openssl base64 -d -A > statement.json
sed -n 's/^      "sig": "\(.*\)"$/\1/p' attestation.dsse.json | openssl base64 -d -A > dsse.sig
{ printf 'DSSEv1 %d %s %d ' ${#T} $T $(wc -c < statement.json); cat statement.json; } > pae.bin
openssl pkeyutl -verify -pubin -inkey "$PUB" -rawin -in pae.bin -sigfile dsse.sig
"""
README_HASHES = r"""
grep -o '"name":"[^"]*","sha256":"[0-9a-f]\{64\}"' manifest.json \
  | sed 's/"name":"\(.*\)","sha256":"\(.*\)"/\2  \1/' | sha256sum -c -
"""


@pytest.mark.skipif(OPENSSL is None or not shutil.which("bash") or not shutil.which("sha256sum"),
                    reason="needs openssl, bash and sha256sum")
def test_readme_shell_recipes(work, keys):
    report, _ = work
    env = {"PATH": os.environ["PATH"], "PUB": str(keys / "public.pem")}
    r = subprocess.run(["bash", "-ec", README_DSSE], cwd=report, env=env, capture_output=True, text=True)
    assert r.returncode == 0 and "Signature Verified Successfully" in r.stdout, r.stderr
    r = subprocess.run(["bash", "-ec", README_HASHES], cwd=report, env=env, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.splitlines() == [
        "report.html: OK", "report.pdf: OK", "results.json: OK"], r.stdout + r.stderr
    _flip_byte(report / "report.pdf")
    r = subprocess.run(["bash", "-ec", README_HASHES], cwd=report, env=env, capture_output=True, text=True)
    assert r.returncode != 0 and "report.pdf: FAILED" in r.stdout


# ---------------------------------------------------------------- reproducibility

def test_signing_is_reproducible_under_source_date_epoch(unsigned, signed, keys, tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", SDE)
    report, inputs = _copy_unsigned(unsigned, tmp_path / "again")
    # Same inputs at the same root so that inputs_root matches too.
    shutil.rmtree(inputs)
    inputs = signed / "inputs"
    _sign(report, inputs, keys)
    for name in ("manifest.json", "manifest.sig", "attestation.dsse.json", "report.pdf"):
        assert (report / name).read_bytes() == (signed / "report" / name).read_bytes(), name


def test_timestamp_follows_source_date_epoch(monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "0")
    assert signing.iso_timestamp() == "1970-01-01T00:00:00Z"
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    with pytest.raises(AuditorError, match="SOURCE_DATE_EPOCH"):
        signing.iso_timestamp()


# ---------------------------------------------------------------- sign_report_dir edge cases

def test_without_pdf_key_the_pdf_is_hashed_unsigned(unsigned, keys, tmp_path):
    report, inputs = _copy_unsigned(unsigned, tmp_path / "c")
    kd = tmp_path / "only-ed25519"
    kd.mkdir()
    shutil.copy(keys / "private.pem", kd / "private.pem")
    before = (report / "report.pdf").read_bytes()
    files = {"html": report / "report.html", "pdf": report / "report.pdf", "json": report / "results.json"}
    signing.sign_report_dir(report, files, INPUTS, dict(RESULTS, inputs_root=str(inputs)),
                            kd / "private.pem", PASSPHRASE, signer_name="Bob")
    assert (report / "report.pdf").read_bytes() == before
    m = json.loads((report / "manifest.json").read_bytes())
    assert m["signer"]["pdf_certificate_sha256"] is None and m["signer"]["name"] == "Bob"
    assert signing.verify_report(report, keys / "public.pem") == []


def test_report_file_outside_folder_rejected(unsigned, keys, tmp_path):
    report, inputs = _copy_unsigned(unsigned, tmp_path / "c")
    with pytest.raises(AuditorError, match="not inside the report folder"):
        signing.sign_report_dir(report, {"x": inputs / "pipeline.yaml"}, INPUTS,
                                dict(RESULTS, inputs_root=str(inputs)), keys / "private.pem", PASSPHRASE)


def test_wrong_passphrase_when_signing(unsigned, keys, tmp_path):
    report, inputs = _copy_unsigned(unsigned, tmp_path / "c")
    with pytest.raises(AuditorError, match="wrong passphrase"):
        signing.sign_report_dir(report, {"h": report / "report.html"}, INPUTS, dict(RESULTS),
                                keys / "private.pem", b"nope")
    assert not (report / "manifest.json").exists()


# ---------------------------------------------------------------- verify CLI

def test_verify_cli(work, keys):
    report, inputs = work
    args = [str(report), "--public-key", str(keys / "public.pem"), "--inputs-root", str(inputs)]
    r = CliRunner().invoke(verify, args)
    assert r.exit_code == 0 and r.output == "verified\n"
    _flip_byte(report / "report.html")
    (inputs / "artifacts" / "log.csv").unlink()
    r = CliRunner().invoke(verify, args)
    assert r.exit_code == 1
    assert r.output.splitlines() == ["report.html: SHA-256 mismatch", "artifacts/log.csv: missing"]


def test_verify_cli_bad_paths_exit_2(work, keys, tmp_path):
    report, _ = work
    r = CliRunner().invoke(verify, [str(tmp_path / "nope"), "--public-key", str(keys / "public.pem")])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1 and "nope" in r.output
    r = CliRunner().invoke(verify, [str(report), "--public-key", str(tmp_path / "missing.pem")])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1 and "missing.pem" in r.output


def test_a_file_added_after_signing_is_named(unsigned, keys, tmp_path):
    report, inputs = _copy_unsigned(unsigned, tmp_path / "c")
    files = {p.name: p for p in report.iterdir() if p.is_file()}
    signing.sign_report_dir(report, files, INPUTS, dict(RESULTS, inputs_root=str(inputs)),
                            keys / "private.pem", PASSPHRASE, signer_name="Bob")
    assert signing.verify_report(report, keys / "public.pem") == []
    (report / "report-v2.html").write_text("<p>unsigned</p>")
    assert signing.verify_report(report, keys / "public.pem") == [
        "report-v2.html: not covered by the signature (not in manifest.json)"]
