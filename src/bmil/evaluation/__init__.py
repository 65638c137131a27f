"""Re-identification evaluation: metrics, dataset test protocols and result reports.

Works on plain numpy features; imports neither the models nor the training engine.
"""

from bmil.evaluation.metrics import PROTOCOLS, evaluate
from bmil.evaluation.protocols import (
    ProtocolResult,
    evaluate_cross_modality,
    evaluate_folder,
    evaluate_llcm,
    evaluate_regdb,
    evaluate_sysu,
)
from bmil.evaluation.report import results_table, save_results

__all__ = [
    "PROTOCOLS",
    "ProtocolResult",
    "evaluate",
    "evaluate_cross_modality",
    "evaluate_folder",
    "evaluate_llcm",
    "evaluate_regdb",
    "evaluate_sysu",
    "results_table",
    "save_results",
]
