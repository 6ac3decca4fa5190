"""Signing and verification of accountability reports.

Key material (``auditor keygen --out DIR`` / :func:`generate_keypair`) lives in one folder:

=========================  ==========================================================
``private.pem``            Ed25519 private key, PKCS#8 PEM (encrypted with a passphrase
                           if one is given), mode 0600. Signs ``manifest.json`` and the
                           DSSE attestation. This is the path ``--sign-key`` takes.
``public.pem``             Ed25519 public key, SubjectPublicKeyInfo PEM. Give it to
                           reviewers; it is all ``auditor verify`` and OpenSSL need.
``pdf-signing-key.pem``    RSA-3072 private key (PKCS#8, same passphrase), mode 0600.
``pdf-signing-cert.pem``   Self-signed X.509 certificate for that key (CN = signer name,
                           valid 3 years). Signs the PDF (PAdES baseline B-B).
=========================  ==========================================================

The PDF key and certificate are found beside the Ed25519 key; if they are absent the
PDF is hashed into the manifest unsigned.

Why RSA for the PDF: Ed25519 and ECDSA on the NIST curves are PDF 2.0 features (ISO/TS
32002); pyHanko then registers that extension and raises the catalog /Version to 2.0,
which takes a PDF/A-3b file (based on PDF 1.7) out of conformance. RSA (PKCS#1 v1.5,
SHA-256) keeps the file at 1.7 and is validated by every common PDF reader.
PDF/A-3b is otherwise kept: the signature is an incremental update (the original bytes
are untouched), the widget is invisible (zero /Rect, /F Print+Locked, no appearance
needed), and the document metadata (Info and XMP) is left as it was, so the two stay
consistent (pyHanko would otherwise append itself to /Producer and rewrite ModDate with
the wall clock, breaking both PDF/A consistency and reproducibility).

A signed report folder holds the report files plus:

* ``manifest.json``: canonical JSON (``sort_keys``, no spaces, UTF-8) with the SHA-256 and
  size of every report file and of every input read, tool versions, time, signer and the
  release-gate summary;
* ``manifest.sig``: the raw 64-byte Ed25519 signature over the bytes of ``manifest.json``
  (``openssl pkeyutl -verify -pubin -inkey public.pem -rawin -in manifest.json
  -sigfile manifest.sig``);
* ``attestation.dsse.json``: a DSSE envelope holding an in-toto Statement v1 whose
  subjects are the report files.

Everything is deterministic: with the same inputs, key and ``SOURCE_DATE_EPOCH`` the
manifest, its signature, the attestation and the signed PDF are byte-identical (Ed25519
and RSA PKCS#1 v1.5 are deterministic, ECDSA keys are used with RFC 6979; the PDF's
signing time is SOURCE_DATE_EPOCH and its new document ID is derived from the content).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import platform
import tempfile
from datetime import datetime, timedelta, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import NameOID

from auditor.errors import AuditorError
from auditor.jsonsafe import sha256_file

PRIVATE_KEY_NAME = "private.pem"
PUBLIC_KEY_NAME = "public.pem"
PDF_KEY_NAME = "pdf-signing-key.pem"
PDF_CERT_NAME = "pdf-signing-cert.pem"

MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
DSSE_NAME = "attestation.dsse.json"

MANIFEST_TYPE = "https://auditor.dev/manifest/v1"
DSSE_PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://auditor.dev/accountability-report/v1"
PDF_FIELD_NAME = "AuditorSignature"
CERT_VALIDITY_DAYS = 3 * 365
PDF_RSA_BITS = 3072
DEFAULT_SIGNER_NAME = "auditor signer"

_TOOL_PACKAGES = ("torch", "numpy", "safetensors", "weasyprint", "pyhanko", "cryptography", "jinja2")


# ---------------------------------------------------------------- small helpers

def canonical_json(obj: Any) -> bytes:
    """The canonical bytes of a JSON document (what is signed)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def signing_time() -> datetime:
    """SOURCE_DATE_EPOCH (if set) or now, as an aware UTC datetime without microseconds."""
    sde = os.environ.get("SOURCE_DATE_EPOCH")
    if sde is not None and sde.strip():
        try:
            return datetime.fromtimestamp(int(sde.strip()), tz=timezone.utc)
        except (ValueError, OverflowError, OSError):
            raise AuditorError(f"expected an integer number of seconds since 1970, got {sde!r}",
                               where="SOURCE_DATE_EPOCH") from None
    return datetime.now(timezone.utc).replace(microsecond=0)


def iso_timestamp(t: datetime | None = None) -> str:
    """ISO 8601 UTC timestamp (``2024-01-31T12:00:00Z``); default :func:`signing_time`."""
    t = signing_time() if t is None else t
    return t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _write_new(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)  # the umask may have removed bits


def _atomic_write(path: Path, data: bytes) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise AuditorError(f"{what} not found", where=str(path)) from None
    except IsADirectoryError:
        raise AuditorError(f"expected a {what} file, found a directory", where=str(path)) from None
    except OSError as e:
        raise AuditorError(f"cannot read {what}: {e.strerror}", where=str(path)) from None


# ---------------------------------------------------------------- keys

def _encryption(passphrase: bytes | None) -> serialization.KeySerializationEncryption:
    if passphrase:
        return serialization.BestAvailableEncryption(passphrase)
    return serialization.NoEncryption()


def public_key_fingerprint(public_key) -> str:
    """Hex SHA-256 of the DER SubjectPublicKeyInfo.

    Same as ``openssl pkey -pubin -in public.pem -outform DER | sha256sum``.
    """
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def _load_private_key(path: Path, passphrase: bytes | None, what: str):
    data = _read(path, what)
    try:
        return serialization.load_pem_private_key(data, password=passphrase or None)
    except TypeError:
        if passphrase:
            raise AuditorError(f"{what} is not encrypted, but a passphrase was given; drop --passphrase-env",
                               where=str(path)) from None
        raise AuditorError(f"{what} is encrypted; give its passphrase (--passphrase-env VAR)", where=str(path)) from None
    except ValueError as e:
        # A wrong passphrase usually says so, but now and then the wrongly decrypted bytes fail to
        # parse instead ("Could not deserialize key data"): for an encrypted PEM with a passphrase
        # given, that is a wrong passphrase too.
        encrypted = b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in data or b"Proc-Type: 4,ENCRYPTED" in data
        if "password" in str(e).lower() or "decrypt" in str(e).lower() or (passphrase and encrypted):
            raise AuditorError(f"wrong passphrase for {what}", where=str(path)) from None
        raise AuditorError(f"not a PEM private key ({what})", where=str(path)) from None


def load_signing_key(path: Path, passphrase: bytes | None = None) -> Ed25519PrivateKey:
    """Load the Ed25519 private key (``private.pem``)."""
    key = _load_private_key(path, passphrase, "Ed25519 private key")
    if not isinstance(key, Ed25519PrivateKey):
        raise AuditorError(f"expected an Ed25519 private key, found {type(key).__name__}", where=str(path))
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Load the Ed25519 public key (``public.pem``, SubjectPublicKeyInfo PEM)."""
    data = _read(path, "public key")
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        raise AuditorError("not a PEM public key (expected '-----BEGIN PUBLIC KEY-----')", where=str(path)) from None
    if not isinstance(key, Ed25519PublicKey):
        raise AuditorError(f"expected an Ed25519 public key, found {type(key).__name__}", where=str(path))
    return key


def pdf_key_paths(private_key_path: Path) -> tuple[Path, Path]:
    """(PDF signing key, PDF certificate) paths beside the Ed25519 key."""
    d = Path(private_key_path).parent
    return d / PDF_KEY_NAME, d / PDF_CERT_NAME


def _self_signed_cert(key: rsa.RSAPrivateKey, name: str, now: datetime) -> x509.Certificate:
    subject = x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, name),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "auditor report signing"),
    ])
    pub = key.public_key()
    ski = x509.SubjectKeyIdentifier.from_public_key(pub)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(pub)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=CERT_VALIDITY_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, content_commitment=True, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )


def generate_keypair(out_dir: Path, passphrase: bytes | None = None, *,
                     name: str = DEFAULT_SIGNER_NAME) -> tuple[Path, Path]:
    """Create the signing key folder (see the module docstring) and return
    (Ed25519 private key path, Ed25519 public key path).

    Refuses to overwrite any existing key file. Private keys are written with mode 0600.
    """
    out_dir = Path(out_dir)
    if not name or not name.strip():
        raise AuditorError("signer name is empty", where="--name")
    if len(name.strip()) > 64:
        raise AuditorError(f"signer name has {len(name.strip())} characters; an X.509 common name holds at most 64",
                           where="--name")
    if out_dir.exists() and not out_dir.is_dir():
        raise AuditorError("exists and is not a directory", where=str(out_dir))
    paths = [out_dir / n for n in (PRIVATE_KEY_NAME, PUBLIC_KEY_NAME, PDF_KEY_NAME, PDF_CERT_NAME)]
    for p in paths:
        if p.exists():
            raise AuditorError("already exists; refusing to overwrite a key (choose another --out)", where=str(p))
    out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    enc = _encryption(passphrase)
    ed = Ed25519PrivateKey.generate()
    pdf_key = rsa.generate_private_key(public_exponent=65537, key_size=PDF_RSA_BITS)
    cert = _self_signed_cert(pdf_key, name.strip(), datetime.now(timezone.utc).replace(microsecond=0))
    pem = serialization.Encoding.PEM
    pkcs8 = serialization.PrivateFormat.PKCS8
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    priv_path, pub_path, pdf_key_path, cert_path = paths
    _write_new(priv_path, ed.private_bytes(pem, pkcs8, enc), 0o600)
    _write_new(pub_path, ed.public_key().public_bytes(pem, spki), 0o644)
    _write_new(pdf_key_path, pdf_key.private_bytes(pem, pkcs8, enc), 0o600)
    _write_new(cert_path, cert.public_bytes(pem), 0o644)
    return priv_path, pub_path


def signer_identity(private_key_path: Path, passphrase: bytes | None = None,
                    name: str | None = None) -> dict:
    """The manifest's ``signer`` block for a key folder.

    ``name`` defaults to the PDF certificate's CN (set by ``keygen --name``).
    """
    key = load_signing_key(private_key_path, passphrase)
    _, cert_path = pdf_key_paths(private_key_path)
    cert_sha = None
    if cert_path.exists():
        cert = _load_cert(cert_path)
        cert_sha = cert.fingerprint(hashes.SHA256()).hex()
        if name is None:
            cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            name = str(cns[0].value) if cns else None
    return {
        "name": name or DEFAULT_SIGNER_NAME,
        "key_type": "ed25519",
        "public_key_sha256": public_key_fingerprint(key.public_key()),
        "pdf_certificate_sha256": cert_sha,
    }


def _load_cert(path: Path) -> x509.Certificate:
    data = _read(path, "certificate")
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise AuditorError("not a PEM X.509 certificate", where=str(path)) from None


# ---------------------------------------------------------------- PDF (PAdES)

def sign_pdf(pdf_in: Path, pdf_out: Path, key_path: Path, cert_path: Path,
             passphrase: bytes | None = None, signer_name: str | None = None,
             when: datetime | None = None) -> None:
    """Add a PAdES baseline B-B signature (ETSI.CAdES.detached, SHA-256) to a PDF as an
    incremental update, leaving the document metadata alone. No timestamp server, no network.

    The key is RSA (as made by :func:`generate_keypair`) or ECDSA (deterministic, RFC 6979;
    note that pyHanko marks an ECDSA-signed file as PDF 2.0, see the module docstring).
    ``when`` (default :func:`signing_time`, i.e. SOURCE_DATE_EPOCH if set) becomes the
    signature's /M entry. ``pdf_in`` and ``pdf_out`` may be the same file.
    """
    from asn1crypto import keys as asn1_keys
    from asn1crypto import x509 as asn1_x509
    from pyhanko.pdf_utils import generic
    from pyhanko.pdf_utils.incremental_writer import IncrementalPdfFileWriter
    from pyhanko.pdf_utils.misc import PdfError
    from pyhanko.sign import fields, signers
    from pyhanko.sign.general import SigningError, get_pyca_cryptography_hash
    from pyhanko_certvalidator.registry import SimpleCertificateStore

    when = signing_time() if when is None else when
    key = _load_private_key(Path(key_path), passphrase, "PDF signing key")
    if not isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)):
        raise AuditorError(f"expected an RSA or ECDSA private key, found {type(key).__name__}", where=str(key_path))
    cert = _load_cert(Path(cert_path))
    if public_key_fingerprint(cert.public_key()) != public_key_fingerprint(key.public_key()):
        raise AuditorError(f"certificate does not match the key {key_path}", where=str(cert_path))
    if signer_name is None:
        cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        signer_name = str(cns[0].value) if cns else DEFAULT_SIGNER_NAME

    class _Signer(signers.SimpleSigner):
        def sign_raw(self, data: bytes, digest_algorithm: str) -> bytes:
            # Uses the key already loaded (pyHanko re-parses it, 0.3 s per RSA key, per call).
            mech = self.get_signature_mechanism_for_digest(digest_algorithm).signature_algo
            digest = get_pyca_cryptography_hash(digest_algorithm)
            if mech == "ecdsa" and isinstance(key, ec.EllipticCurvePrivateKey):
                return key.sign(data, ec.ECDSA(digest, deterministic_signing=True))  # RFC 6979
            if mech == "rsassa_pkcs1v15" and isinstance(key, rsa.RSAPrivateKey):
                return key.sign(data, padding.PKCS1v15(), digest)  # deterministic
            return super().sign_raw(data, digest_algorithm)

    class _FixedTimePdfSigner(signers.PdfSigner):
        """Signs with ``when`` as the signing time (pyHanko always takes the wall clock)."""

        def init_signing_session(self, pdf_out, existing_fields_only=False):
            session = super().init_signing_session(pdf_out, existing_fields_only)
            session.system_time = when
            return session

    class _KeepMetadataWriter(IncrementalPdfFileWriter):
        """Leaves Info and XMP untouched: pyHanko would add itself to Info /Producer only
        (PDF/A requires Info and XMP to agree) and set ModDate to the wall clock."""

        def _update_meta(self):
            pass

    der_key = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    signer = _Signer(
        signing_cert=asn1_x509.Certificate.load(cert.public_bytes(serialization.Encoding.DER)),
        signing_key=asn1_keys.PrivateKeyInfo.load(der_key),
        cert_registry=SimpleCertificateStore(),
    )
    meta = signers.PdfSignatureMetadata(
        field_name=PDF_FIELD_NAME,
        md_algorithm="sha256",
        subfilter=fields.SigSeedSubFilter.PADES,
        name=signer_name,
        reason="Accountability report release sign-off",
    )
    data = _read(Path(pdf_in), "PDF")
    try:
        w = _KeepMetadataWriter(io.BytesIO(data), strict=False)
        if any(sig.field_name == PDF_FIELD_NAME for sig in w.prev.embedded_signatures):
            raise AuditorError(f"already signed (field {PDF_FIELD_NAME!r})", where=str(pdf_in))
        # Deterministic second half of the document ID (pyHanko draws a random one).
        id1 = w._document_id[0]
        id2 = hashlib.sha256(data + iso_timestamp(when).encode()).digest()[:16]
        w._document_id = generic.ArrayObject([id1, generic.ByteStringObject(id2)])
        out = _FixedTimePdfSigner(meta, signer=signer).sign_pdf(w, output=io.BytesIO())
    except (PdfError, SigningError, ValueError) as e:
        raise AuditorError(f"cannot sign PDF: {e}", where=str(pdf_in)) from None
    _atomic_write(Path(pdf_out), out.getvalue())


def verify_pdf_signature(pdf_path: Path, cert_path: Path) -> list[str]:
    """Validate the PDF's signatures with pyHanko, trusting ``cert_path`` as the root.

    Returns problems (empty = every signature is intact, valid, trusted and covers the
    whole file). Offline: no revocation fetching.
    """
    from asn1crypto import x509 as asn1_x509
    from pyhanko.pdf_utils.reader import PdfFileReader
    from pyhanko.sign.validation import validate_pdf_signature
    from pyhanko.sign.validation.status import SignatureCoverageLevel
    from pyhanko_certvalidator import ValidationContext

    name = Path(pdf_path).name
    cert = asn1_x509.Certificate.load(_load_cert(Path(cert_path)).public_bytes(serialization.Encoding.DER))
    problems = []
    with open(pdf_path, "rb") as f:
        reader = PdfFileReader(f, strict=False)
        sigs = reader.embedded_signatures
        if not sigs:
            return [f"{name}: no signature"]
        for sig in sigs:
            vc = ValidationContext(trust_roots=[cert], allow_fetching=False)
            st = validate_pdf_signature(sig, vc)
            if not st.intact:
                problems.append(f"{name}: signature {sig.field_name!r} does not match the document bytes")
            elif not st.valid:
                problems.append(f"{name}: signature {sig.field_name!r} is cryptographically invalid")
            elif not st.trusted:
                problems.append(f"{name}: signature {sig.field_name!r} is not from the trusted certificate")
            elif st.coverage != SignatureCoverageLevel.ENTIRE_FILE:
                problems.append(f"{name}: signature {sig.field_name!r} does not cover the whole file")
    return problems


# ---------------------------------------------------------------- manifest

def _tool_versions() -> dict:
    tools: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in ("auditor",) + _TOOL_PACKAGES:
        try:
            tools[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            tools[pkg] = None
    if tools["auditor"] is None:  # running from a checkout, not installed
        import auditor

        tools["auditor"] = getattr(auditor, "__version__", None)
    return tools


def _posix_rel(path: str, root: str) -> str:
    try:
        rel = os.path.relpath(path, root)
    except ValueError:  # another drive (Windows)
        return Path(path).as_posix()
    if rel == os.pardir or rel.startswith(os.pardir + os.sep):
        return Path(path).as_posix()
    return Path(rel).as_posix()


def _default_inputs_root(inputs: list[dict]) -> str:
    for item in inputs:
        if item.get("role") == "pipeline":
            return os.path.dirname(os.path.abspath(item["path"]))
    if inputs:
        return os.path.commonpath([os.path.dirname(os.path.abspath(i["path"])) for i in inputs])
    return os.getcwd()


def _input_records(inputs: Iterable[dict], root: str, *, explicit_root: bool) -> list[dict]:
    records = []
    for i, item in enumerate(inputs):
        if not isinstance(item, dict) or "path" not in item or "role" not in item:
            raise AuditorError("each input needs 'role' and 'path'", where=f"inputs[{i}]")
        p = os.fspath(item["path"])
        absolute = os.path.abspath(os.path.join(root, p) if explicit_root else p)
        if "sha256" in item and "bytes" in item:
            digest, size = item["sha256"], int(item["bytes"])
        else:
            try:
                digest, size = sha256_file(Path(absolute))
            except OSError as e:
                raise AuditorError(f"cannot read input: {e.strerror}", where=absolute) from None
        records.append({"role": str(item["role"]), "path": _posix_rel(absolute, root),
                        "sha256": digest, "bytes": size})
    unique = {(r["path"], r["role"]): r for r in records}
    return [unique[k] for k in sorted(unique)]


def _gate_summary(gates: list[dict] | None) -> dict:
    from auditor.gates import decision

    gates = list(gates or [])
    return {
        "decision": decision(gates),
        "passed": sum(g["status"] == "PASS" for g in gates),
        "failed": sum(g["status"] != "PASS" for g in gates),
        "results": gates,
    }


def build_manifest(report_files: dict[str, Path], inputs: list[dict], results: dict,
                   signer: str | dict, timestamp: str, *, gates: list[dict] | None = None,
                   inputs_root: Path | None = None) -> dict:
    """Build the report manifest (a JSON-ready dict).

    ``report_files``: name (path inside the report folder, '/'-separated) → file.
    ``inputs``: every input read, ``{role, path}`` (``sha256`` and ``bytes`` are computed
    unless both are given). Paths are recorded relative to ``inputs_root`` (default:
    ``results["inputs_root"]``, else the folder of the input with role "pipeline"), and the
    root itself as an absolute path, so a reviewer can re-point it with
    ``verify --inputs-root``. Relative input paths are taken relative to that root when it
    is given (argument or results), else to the working directory.
    ``signer``: a name, or the dict from :func:`signer_identity`.
    ``gates``: results of :func:`auditor.gates.evaluate_gates` (default ``results.get("gates")``).
    """
    files = []
    for name, path in sorted(report_files.items()):
        _check_member_name(name)
        try:
            digest, size = sha256_file(Path(path))
        except OSError as e:
            raise AuditorError(f"cannot read report file: {e.strerror}", where=str(path)) from None
        files.append({"name": name, "sha256": digest, "bytes": size})

    if inputs_root is None and results.get("inputs_root"):
        inputs_root = Path(results["inputs_root"])
    root = os.path.abspath(inputs_root) if inputs_root is not None else _default_inputs_root(inputs)
    signer_block = dict(signer) if isinstance(signer, dict) else {"name": str(signer)}
    pipeline = dict(results.get("pipeline") or {})
    pipeline["stages"] = [{"name": s.get("name"), "owner": s.get("owner")} for s in results.get("stages", [])]
    summary = _gate_summary(results.get("gates") if gates is None else gates)
    return {
        "format": 1,
        "type": MANIFEST_TYPE,
        "system": results.get("system"),
        "pipeline": pipeline,
        "report_files": files,
        "inputs_root": root,
        "inputs": _input_records(inputs, root, explicit_root=inputs_root is not None),
        "tools": _tool_versions(),
        "timestamp": timestamp,
        "signer": signer_block,
        "gates": summary,
        "decision": summary["decision"],
    }


def _check_member_name(name: str) -> None:
    p = Path(name)
    if not name or p.is_absolute() or ".." in p.parts or "\\" in name:
        raise AuditorError("report file names must be relative paths inside the report folder", where=name)


# ---------------------------------------------------------------- manifest signature + DSSE

def dsse_pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding."""
    t = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


def _statement(manifest: dict) -> dict:
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": f["name"], "digest": {"sha256": f["sha256"]}} for f in manifest["report_files"]],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "pipeline": {"system": manifest.get("system"), **manifest.get("pipeline", {})},
            "inputs_root": manifest.get("inputs_root"),
            "inputs": manifest["inputs"],
            "gates": manifest["gates"]["results"],
            "decision": manifest["decision"],
            "timestamp": manifest["timestamp"],
            "signer": manifest["signer"],
            "manifest_sha256": None,  # filled in by sign_manifest
        },
    }


def sign_manifest(out_dir: Path, manifest: dict, private_key_path: Path,
                  passphrase: bytes | None = None) -> tuple[Path, Path, Path]:
    """Write ``manifest.json`` (canonical bytes), ``manifest.sig`` (raw Ed25519 signature
    over those bytes) and ``attestation.dsse.json`` into ``out_dir``; return their paths."""
    out_dir = Path(out_dir)
    key = load_signing_key(private_key_path, passphrase)
    fpr = public_key_fingerprint(key.public_key())
    claimed = (manifest.get("signer") or {}).get("public_key_sha256")
    if claimed is not None and claimed != fpr:
        raise AuditorError(f"manifest names signer key {claimed[:16]}…, but this key is {fpr[:16]}…",
                           where=str(private_key_path))
    try:
        body = canonical_json(manifest)
    except ValueError as e:
        raise AuditorError(f"manifest is not valid JSON data: {e}", where=MANIFEST_NAME) from None
    statement = _statement(manifest)
    statement["predicate"]["manifest_sha256"] = hashlib.sha256(body).hexdigest()
    payload = canonical_json(statement)
    envelope = {
        "payloadType": DSSE_PAYLOAD_TYPE,
        "payload": base64.b64encode(payload).decode("ascii"),
        "signatures": [{"keyid": fpr, "sig": base64.b64encode(key.sign(dsse_pae(DSSE_PAYLOAD_TYPE, payload))).decode("ascii")}],
    }
    paths = (out_dir / MANIFEST_NAME, out_dir / SIGNATURE_NAME, out_dir / DSSE_NAME)
    _atomic_write(paths[0], body)
    _atomic_write(paths[1], key.sign(body))
    _atomic_write(paths[2], json.dumps(envelope, indent=2, sort_keys=True).encode("ascii") + b"\n")
    return paths


def sign_report_dir(out_dir: Path, report_files: dict[str, Path], inputs: list[dict], results: dict,
                    private_key_path: Path, passphrase: bytes | None = None, *,
                    gates: list[dict] | None = None, signer_name: str | None = None,
                    inputs_root: Path | None = None) -> Path:
    """Sign a finished report folder (what ``auditor generate --sign-key KEY`` does).

    1. PAdES-sign every ``*.pdf`` report file in place if ``pdf-signing-key.pem`` and
       ``pdf-signing-cert.pem`` lie beside ``private_key_path``;
    2. hash the (signed) report files and the inputs into the manifest;
    3. write manifest.json, manifest.sig and attestation.dsse.json.

    Every report file must lie inside ``out_dir``; it is recorded under its path relative
    to ``out_dir`` (the keys of ``report_files`` are not used, so ``{"pdf": path}`` works).
    Returns the manifest path.
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise AuditorError("report folder not found", where=str(out_dir))
    by_name: dict[str, Path] = {}
    for path in report_files.values():
        path = Path(path)
        if not path.is_file():
            raise AuditorError("report file not found", where=str(path))
        rel = _posix_rel(os.path.abspath(path), os.path.abspath(out_dir))
        if Path(rel).is_absolute():
            raise AuditorError(f"report file is not inside the report folder {out_dir}", where=str(path))
        by_name[rel] = path
    report_files = by_name
    identity = signer_identity(private_key_path, passphrase, signer_name)  # checks key + passphrase early
    when = signing_time()
    pdf_key, pdf_cert = pdf_key_paths(private_key_path)
    if pdf_key.exists() and pdf_cert.exists():
        for name, path in sorted(report_files.items()):
            if name.lower().endswith(".pdf"):
                sign_pdf(path, path, pdf_key, pdf_cert, passphrase, identity["name"], when)
    else:
        identity["pdf_certificate_sha256"] = None
    manifest = build_manifest(report_files, inputs, results, identity, iso_timestamp(when),
                              gates=gates, inputs_root=inputs_root)
    return sign_manifest(out_dir, manifest, private_key_path, passphrase)[0]


# ---------------------------------------------------------------- verification

def _verify_dsse(envelope_bytes: bytes, public_key: Ed25519PublicKey, manifest: dict | None,
                 manifest_bytes: bytes | None) -> list[str]:
    where = DSSE_NAME
    try:
        env = json.loads(envelope_bytes)
        payload_type = env["payloadType"]
        payload = base64.b64decode(env["payload"], validate=True)
        sigs = [base64.b64decode(s["sig"], validate=True) for s in env["signatures"]]
    except (ValueError, KeyError, TypeError):
        return [f"{where}: not a DSSE envelope (payloadType, payload, signatures)"]
    if payload_type != DSSE_PAYLOAD_TYPE:
        return [f"{where}: payloadType is {payload_type!r}, expected {DSSE_PAYLOAD_TYPE!r}"]
    pae = dsse_pae(payload_type, payload)
    ok = False
    for sig in sigs:
        try:
            public_key.verify(sig, pae)
            ok = True
            break
        except InvalidSignature:
            continue
    if not ok:
        return [f"{where}: signature invalid"]
    try:
        st = json.loads(payload)
        subjects = sorted((s["name"], s["digest"]["sha256"]) for s in st["subject"])
        predicate = st["predicate"]
    except (ValueError, KeyError, TypeError):
        return [f"{where}: payload is not an in-toto Statement"]
    problems = []
    if st.get("_type") != STATEMENT_TYPE:
        problems.append(f"{where}: _type is {st.get('_type')!r}, expected {STATEMENT_TYPE!r}")
    if manifest is not None:
        files = sorted((f["name"], f["sha256"]) for f in manifest.get("report_files", []))
        if subjects != files:
            problems.append(f"{where}: subjects differ from the report files in {MANIFEST_NAME}")
        if predicate.get("inputs") != manifest.get("inputs"):
            problems.append(f"{where}: predicate inputs differ from {MANIFEST_NAME}")
        if predicate.get("decision") != manifest.get("decision"):
            problems.append(f"{where}: predicate decision differs from {MANIFEST_NAME}")
    if manifest_bytes is not None and predicate.get("manifest_sha256") != hashlib.sha256(manifest_bytes).hexdigest():
        problems.append(f"{where}: manifest_sha256 does not match {MANIFEST_NAME}")
    return problems


def _check_file(path: Path, label: str, expected_sha: str, expected_bytes: int | None) -> str | None:
    if not path.is_file():
        return f"{label}: missing"
    digest, size = sha256_file(path)
    if digest != expected_sha:
        return f"{label}: SHA-256 mismatch"
    if expected_bytes is not None and size != expected_bytes:  # pragma: no cover (needs a hash collision)
        return f"{label}: size mismatch"
    return None


def verify_report(report_dir: Path, public_key_path: Path, inputs_root: Path | None = None) -> list[str]:
    """Check a signed report folder. Returns the problems found; an empty list means verified.

    Checks manifest.sig over manifest.json, the DSSE envelope (signature, subjects = report
    files, inputs, decision), the SHA-256 of every report file in ``report_dir`` and of every
    input (resolved against ``inputs_root``, default the manifest's ``inputs_root``).
    Raises AuditorError for a missing folder or an unusable public key.
    """
    report_dir = Path(report_dir)
    if not report_dir.is_dir():
        raise AuditorError("report folder not found", where=str(report_dir))
    if inputs_root is not None and not Path(inputs_root).is_dir():
        raise AuditorError("inputs root folder not found", where=str(inputs_root))
    public_key = load_public_key(Path(public_key_path))
    problems: list[str] = []

    manifest_path = report_dir / MANIFEST_NAME
    if not manifest_path.is_file():
        return [f"{MANIFEST_NAME}: missing"]
    body = manifest_path.read_bytes()

    sig_path = report_dir / SIGNATURE_NAME
    manifest: dict | None = None
    try:
        manifest = json.loads(body)
        if not isinstance(manifest, dict):
            raise ValueError
    except ValueError:
        problems.append(f"{MANIFEST_NAME}: not a JSON object")
        manifest = None
    if not sig_path.is_file():
        problems.append(f"{SIGNATURE_NAME}: missing")
    else:
        try:
            public_key.verify(sig_path.read_bytes(), body)
        except InvalidSignature:
            msg = f"{SIGNATURE_NAME}: signature invalid"
            claimed = ((manifest or {}).get("signer") or {}).get("public_key_sha256")
            given = public_key_fingerprint(public_key)
            if isinstance(claimed, str) and claimed != given:
                msg += f" (the manifest names signer key {claimed[:16]}…, the given public key is {given[:16]}…)"
            problems.append(msg)

    dsse_path = report_dir / DSSE_NAME
    if not dsse_path.is_file():
        problems.append(f"{DSSE_NAME}: missing")
    else:
        problems += _verify_dsse(dsse_path.read_bytes(), public_key, manifest, body)

    if manifest is None:
        return problems
    try:
        files = [(f["name"], f["sha256"], f.get("bytes")) for f in manifest["report_files"]]
        inputs = [(i["path"], i["sha256"], i.get("bytes")) for i in manifest["inputs"]]
        root = Path(inputs_root) if inputs_root is not None else Path(manifest["inputs_root"])
    except (KeyError, TypeError):
        return problems + [f"{MANIFEST_NAME}: missing report_files, inputs or inputs_root"]
    for name, digest, size in files:
        try:
            _check_member_name(name)
        except AuditorError:
            problems.append(f"{name}: not a path inside the report folder")
            continue
        problem = _check_file(report_dir / name, name, digest, size)
        if problem:
            problems.append(problem)
    for path, digest, size in inputs:
        problem = _check_file(root / path, path, digest, size)  # absolute paths stay absolute
        if problem:
            problems.append(problem)
    listed = {name for name, _, _ in files} | {MANIFEST_NAME, SIGNATURE_NAME, DSSE_NAME}
    for extra in sorted(p for p in report_dir.iterdir() if p.is_file() and p.name not in listed):
        problems.append(f"{extra.name}: not covered by the signature (not in {MANIFEST_NAME})")
    return problems
