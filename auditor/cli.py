"""Thin click commands over the library. Exit codes: 0 ok, 1 verification failed,
2 bad input, 3 a release gate failed, 4 internal error (rerun with --debug for the traceback)."""

from __future__ import annotations

import functools
import json
import os
import sys
import time
import traceback
from pathlib import Path

import click

from .errors import AuditorError, GateFailure, VerificationError


def _fail(message: str, code: int):
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


#: AuditConfig fields that a command-line option sets, for error messages.
_CONFIG_FLAGS = {"config.device": "--device", "config.dtype": "--dtype", "config.tiers": "--tier",
                 "config.curvature": "--curvature", "config.rank": "--rank"}


def handle_errors(fn):
    """One line on stderr and the domain exit code; the traceback only with --debug."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        debug = bool((click.get_current_context().find_root().obj or {}).get("debug"))
        try:
            return fn(*args, **kwargs)
        except (AuditorError, VerificationError, GateFailure) as exc:
            if debug:  # the traceback, and still the domain exit code
                traceback.print_exc()
            message = str(exc)
            where = getattr(exc, "where", None)
            if where in _CONFIG_FLAGS:  # name the option the user typed, not the config field behind it
                message = f"{_CONFIG_FLAGS[where]}{message[len(where):]}"
            _fail(message, exc.exit_code)
        except KeyboardInterrupt:
            _fail("interrupted; nothing was written", 130)
        except Exception as exc:  # noqa: BLE001 - the last line of defence of a CLI
            if debug:
                traceback.print_exc()
            _fail(f"internal error: {exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
                  "(rerun with `auditor --debug ...` for the traceback)", 4)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, envvar="AUDITOR_DEBUG", help="Show tracebacks on errors.")
@click.version_option(package_name="auditor")
@click.pass_context
def cli(ctx, debug):
    """auditor: which training stage is accountable for a model's behaviour, and by how much."""
    ctx.obj = {"debug": debug}


@cli.command()
@handle_errors
def schema():
    """Print the JSON Schema of the pipeline YAML."""
    from .pipeline import load_schema

    click.echo(json.dumps(load_schema(), indent=2))


@cli.command()
@click.argument("pipeline", type=click.Path(path_type=Path))
@handle_errors
def validate(pipeline):
    """Validate PIPELINE (YAML, files, per-step logs, checkpoints) without auditing."""
    from .validate import validate_pipeline

    summary = validate_pipeline(pipeline)
    click.echo(f"ok: {pipeline}: {summary}")


@cli.command()
@click.argument("pipeline", type=click.Path(path_type=Path))
@click.option("--quiet", "-q", is_flag=True, help="No progress output.")
@handle_errors
def build(pipeline, quiet):
    """Build a sample's missing artifacts with the YAML's build.factory."""
    from .pipeline import load_pipeline
    from .progress import progress_bar

    p = load_pipeline(pipeline)
    with progress_bar(not quiet, "building") as report:
        built = p.ensure_artifacts(report)
    click.echo(f"built artifacts for {pipeline}" if built else f"artifacts of {pipeline} are present")


@cli.command()
@click.argument("pipeline", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("report"), show_default=True,
              help="Folder for report.html, report.pdf, results.json (and the signature files).")
@click.option("--format", "formats", multiple=True, type=click.Choice(["html", "pdf", "json"]),
              help="Output format(s); repeat the option. Default: html, pdf and json.")
@click.option("--page-size", type=click.Choice(["A4", "Letter"]), default="A4", show_default=True)
@click.option("--sign-key", type=click.Path(path_type=Path), default=None,
              help="Ed25519 private key PEM from `auditor keygen`: sign the report.")
@click.option("--passphrase-env", default=None, metavar="VAR",
              help="Name of an environment variable holding the signing key's passphrase.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:i].")
@click.option("--dtype", type=click.Choice(["float64", "float32"]), default="float64", show_default=True)
@click.option("--no-build", is_flag=True, help="Do not build missing sample artifacts; fail instead.")
@click.option("--retrain", is_flag=True,
              help="Compute the retraining truth by replaying later stages (YAML training.replay).")
@click.option("--tier", "tiers", multiple=True, type=click.Choice(["exact", "spectral"]),
              help="Add a curvature-aware estimator (needs training.data); repeat the option.")
@click.option("--curvature", type=click.Choice(["secant", "hessian"]), default="secant", show_default=True,
              help="The exact tier's step: gradient difference along the change (secant) or a Hessian-vector "
                   "product at the checkpoint (hessian).")
@click.option("--rank", default=20, show_default=True, type=click.IntRange(1, 1000),
              help="Eigen-directions per segment for --tier spectral.")
@click.option("--quiet", "-q", is_flag=True, help="No progress output.")
@handle_errors
def generate(pipeline, out_dir, formats, page_size, sign_key, passphrase_env, device, dtype, no_build, retrain,
             tiers, curvature, rank, quiet):
    """Audit PIPELINE and write the accountability report.

    Exits 3 when a release gate of the YAML's policy fails (the report is still written)."""
    from .audit import AuditConfig
    from .generate import FORMATS, GenerateConfig
    from .generate import generate as run
    from .progress import progress_bar

    ctx = click.get_current_context()
    given = lambda name: ctx.get_parameter_source(name) != click.core.ParameterSource.DEFAULT  # noqa: E731
    if given("curvature") and "exact" not in tiers:
        raise AuditorError("applies to the exact tier only; add --tier exact", where="--curvature")
    if given("rank") and "spectral" not in tiers:
        raise AuditorError("applies to the spectral tier only; add --tier spectral", where="--rank")
    passphrase = None
    if passphrase_env:
        if passphrase_env not in os.environ:
            raise AuditorError(f"environment variable {passphrase_env} is not set", where="--passphrase-env")
        passphrase = os.environ[passphrase_env].encode()
        if not passphrase:
            raise AuditorError(f"environment variable {passphrase_env} is empty", where="--passphrase-env")
    config = GenerateConfig(out_dir=out_dir, formats=tuple(formats) or FORMATS, page_size=page_size,
                            sign_key=sign_key, passphrase=passphrase,
                            audit=AuditConfig(device=device, dtype=dtype, build=not no_build, retrain=retrain,
                                                  tiers=tuple(tiers), curvature=curvature, rank=rank))
    from .audit import generated_at

    generated_at()  # a bad SOURCE_DATE_EPOCH fails now, not after the audit
    t0 = time.perf_counter()
    with progress_bar(not quiet) as report:
        outcome = run(pipeline, config, report)
    for kind, path in sorted(outcome.files.items()):
        click.echo(f"wrote {path}")
    for line in _summary_lines(outcome.result.data):
        click.echo(line)
    for g in outcome.gates:
        click.echo(f"gate {g['id']}: {g['status']} ({g['detail']})")
    click.echo(f"decision: {outcome.decision}; {time.perf_counter() - t0:.1f} s")
    if outcome.exit_code:
        failed = [g["id"] for g in outcome.gates if g["status"] == "FAIL"]
        _fail(f"release gate(s) failed: {', '.join(failed)}", outcome.exit_code)


def _summary_lines(data: dict) -> list[str]:
    out = []
    for s in data["summary"]:
        truth = f", retraining: {s['truth']:+.4g}" if s.get("truth") is not None else ""
        share = f", {abs(s['share']):.0%} of the total" if s.get("share") is not None else ""
        effect = f"{s['effect']:+.4g}" if s.get("effect") is not None else "n/a"
        warn = "; not trusted by the diagnostics" if s.get("trusted") is False else ""
        out.append(f"{s['behavior']}: stage {s['stage']!r} {s['direction']} it most ({effect}{share}{truth}{warn})")
    return out


from .cli_sign import keygen, verify  # noqa: E402

for _cmd in (keygen, verify):  # their own AuditorError handling stays; everything else gets the one-line treatment
    _cmd.callback = handle_errors(_cmd.callback)
    cli.add_command(_cmd)


def main():
    cli(prog_name="auditor")


if __name__ == "__main__":
    main()
