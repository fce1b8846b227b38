"""tokentrail: a CPU inference engine whose every step can be watched."""
from .config import ModelConfig
from .errors import CheckpointError, ContextFullError, OptionError, TokentrailError
from .generation_config import GenerationDefaults
from .model import Model, Session, load
from .prompt_cache import PromptCache

__all__ = ["load", "Model", "Session", "PromptCache", "ModelConfig", "GenerationDefaults", "CheckpointError", "ContextFullError",
           "OptionError", "TokentrailError"]
__version__ = "0.1.0"
