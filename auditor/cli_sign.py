"""click commands for keys and verification: ``auditor keygen`` and ``auditor verify``.

The lead registers them on the main group (``cli.add_command(keygen)``,
``cli.add_command(verify)``); ``auditor generate --sign-key KEY`` calls
:func:`sign_report_dir` with KEY = the ``private.pem`` made by ``keygen``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from auditor.errors import AuditorError, VerificationError
from auditor.signing import (
    PDF_CERT_NAME,
    PDF_KEY_NAME,
    generate_keypair,
    load_signing_key,
    public_key_fingerprint,
    sign_report_dir,
    verify_report,
)

__all__ = ["keygen", "verify", "sign_report_dir", "passphrase_from_env"]


def passphrase_from_env(var: str | None) -> bytes | None:
    """The passphrase held in environment variable ``var`` (None when ``var`` is None)."""
    if var is None:
        return None
    value = os.environ.get(var)
    if not value:
        raise AuditorError(f"environment variable {var} is not set or empty", where="--passphrase-env")
    return value.encode("utf-8")


def _fail(err: AuditorError) -> None:
    click.echo(f"error: {err}", err=True)
    sys.exit(err.exit_code)


@click.command()
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Folder for the keys (created; existing key files are never overwritten).")
@click.option("--passphrase-env", metavar="VAR",
              help="Encrypt the private keys with the passphrase in environment variable VAR.")
@click.option("--name", default="auditor signer", show_default=True,
              help="Signer identity: the PDF certificate's common name and the manifest's signer name.")
def keygen(out_dir: Path, passphrase_env: str | None, name: str) -> None:
    """Create a signing key folder: private.pem + public.pem (Ed25519, for the manifest
    and attestation) and pdf-signing-key.pem + pdf-signing-cert.pem (RSA-3072 with a
    self-signed certificate, for the PDF). Pass private.pem to `generate --sign-key`;
    give public.pem (and pdf-signing-cert.pem) to reviewers."""
    try:
        passphrase = passphrase_from_env(passphrase_env)
        private, public = generate_keypair(out_dir, passphrase, name=name)
        fpr = public_key_fingerprint(load_signing_key(private, passphrase).public_key())
    except AuditorError as e:
        _fail(e)
    click.echo(f"private key (keep secret, for --sign-key): {private}")
    click.echo(f"public key (for reviewers):                {public}")
    click.echo(f"PDF signing key and certificate:           {out_dir / PDF_KEY_NAME}, {out_dir / PDF_CERT_NAME}")
    click.echo(f"public key SHA-256:                        {fpr}")


@click.command()
@click.argument("report_dir", type=click.Path(path_type=Path))
@click.option("--public-key", "public_key", required=True, type=click.Path(path_type=Path),
              help="The signer's Ed25519 public key (public.pem).")
@click.option("--inputs-root", type=click.Path(path_type=Path), default=None,
              help="Folder the recorded input paths are relative to (default: the manifest's inputs_root).")
def verify(report_dir: Path, public_key: Path, inputs_root: Path | None) -> None:
    """Verify a signed report folder: manifest signature, attestation, and the SHA-256 of
    every report file and input. Prints "verified" (exit 0) or one line per problem (exit 1)."""
    try:
        problems = verify_report(report_dir, public_key, inputs_root)
    except AuditorError as e:
        _fail(e)
    if problems:
        for p in problems:
            click.echo(p)
        sys.exit(VerificationError.exit_code)
    click.echo("verified")
