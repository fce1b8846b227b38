"""tokentrail: a CPU inference engine whose every step can be watched."""
from .config import ModelConfig
from .errors import CheckpointError, ContextFullError, TokentrailError
from .model import Model, Session, load

__all__ = ["load", "Model", "Session", "ModelConfig", "CheckpointError", "ContextFullError", "TokentrailError"]
__version__ = "0.1.0"
