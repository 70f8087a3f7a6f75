"""ablate's model code: a configurable decoder whose every architecture option is one config key.

Importing the package registers every technique (mixers, FFNs, activations, norms,
parameterizations) in `models.registry`. Needs torch only.
"""
from models import activations, dyt, ffn, memory, mup, norms, parameterization  # noqa: F401  (registration)
from models import mixers  # noqa: F401
from models.config import ModelConfig, model_config
from models.decoder import DecodeCache, Decoder
from models.registry import ConfigError
from models.tags import param_tags

__all__ = ["ConfigError", "DecodeCache", "Decoder", "ModelConfig", "model_config", "param_tags"]
