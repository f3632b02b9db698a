"""The science: subject models, verbalizers, reconstructors, checkpoints, analysis, metrics and training.

Pure torch + transformers; nothing here imports the web stack.
"""

from .analysis import Analysis, AnalysisError, Cancelled, Prepared, analyze, prepare, run_batch
from .checkpoint import NLA, CheckpointError, detect_format, load_nla
from .lm import LM, LMPool, load_lm
from .loading import open_nla
from .options import AnalyzeOptions, Resolved, resolve

__all__ = [
    "LM",
    "NLA",
    "Analysis",
    "AnalysisError",
    "AnalyzeOptions",
    "Cancelled",
    "CheckpointError",
    "LMPool",
    "Prepared",
    "Resolved",
    "analyze",
    "detect_format",
    "load_lm",
    "load_nla",
    "open_nla",
    "prepare",
    "resolve",
    "run_batch",
]
