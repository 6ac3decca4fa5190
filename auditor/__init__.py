"""auditor: which training stage is accountable for a model's behaviour, and by how much.

Public API::

    from auditor import load_pipeline, estimate, AuditConfig
    result = estimate(load_pipeline("samples/digits/pipeline.yaml"))
"""

__version__ = "0.1.0"

from .audit import AuditConfig, AuditResult, estimate  # noqa: E402
from .errors import AuditorError, GateFailure, VerificationError  # noqa: E402
from .pipeline import Pipeline, load_pipeline  # noqa: E402

__all__ = ["load_pipeline", "estimate", "AuditConfig", "AuditResult", "Pipeline",
           "AuditorError", "VerificationError", "GateFailure", "__version__"]
