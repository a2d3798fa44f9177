"""Evaluation: robust accuracy under attack suites, reports and pictures.

>>> from bastion.evaluation import evaluate
>>> report = evaluate(model, data, "linf:8/255", attacks="standard")
>>> print(report.table())
>>> report.save("report.json")
"""

from .audit import BUDGETS, AdaptivePlan, AuditBudget, adaptive_plan, audit
from .audit_report import AUDIT_SCHEMA, AuditReport, Check
from .detection import DetectionEval, DetectionReport, roc_auc, system_view
from .evaluate import STATE_SCHEMA, attack_config, evaluate, model_digest, resolve_attacks
from .grid import save_grid
from .harden import HARDEN_SCHEMA, HardenReport, HardenRound, harden
from .presets import PRESETS, preset
from .report import SCHEMA, AttackStats, CurvePoint, Report
from .transfer_study import TRANSFER_SCHEMA, TransferReport, transfer

__all__ = ["AUDIT_SCHEMA", "BUDGETS", "AdaptivePlan", "AuditBudget", "AuditReport", "Check", "DetectionEval", "DetectionReport", "HARDEN_SCHEMA", "HardenReport", "HardenRound", "PRESETS", "SCHEMA", "STATE_SCHEMA", "TRANSFER_SCHEMA", "TransferReport", "AttackStats", "CurvePoint", "Report", "adaptive_plan", "attack_config",
           "audit", "evaluate", "harden", "model_digest", "preset", "resolve_attacks", "roc_auc", "save_grid", "system_view", "transfer"]
