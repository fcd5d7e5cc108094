from .decoder import CausalLM
from .registry import supported_architectures, text_family, vision_kind
from .spec import DecoderSpec, spec_from_config

__all__ = ["CausalLM", "DecoderSpec", "spec_from_config", "supported_architectures", "text_family", "vision_kind"]
