"""tokentrail: a CPU inference engine whose every step can be watched."""
from .config import ModelConfig
from .errors import CheckpointError, ContextFullError, OptionError, TokentrailError
from .generation_config import GenerationDefaults
from .model import Model, Session, load

__all__ = ["load", "Model", "Session", "ModelConfig", "GenerationDefaults", "CheckpointError", "ContextFullError",
           "OptionError", "TokentrailError"]
__version__ = "0.1.0"
