"""Image input and preprocessing for vision-language models.

``load_image`` turns request inputs into RGB images with clear errors; the
``*_preprocess`` modules turn images into exactly the tensors (and prompt
token counts) that transformers' processors produce; ``prefetch`` runs that
CPU work in threads ahead of the GPU.
"""

from prefillonly.vision.image_io import image_content_hash, load_image, to_rgb
from prefillonly.vision.llava_next_preprocess import LlavaNextImageInput, LlavaNextImagePreprocessor
from prefillonly.vision.preprocess_pool import prefetch
from prefillonly.vision.qwen_preprocess import QwenImageInput, QwenImagePreprocessor, QwenPixels, smart_resize

__all__ = [
    "load_image",
    "image_content_hash",
    "to_rgb",
    "QwenImageInput",
    "QwenImagePreprocessor",
    "QwenPixels",
    "smart_resize",
    "LlavaNextImageInput",
    "LlavaNextImagePreprocessor",
    "prefetch",
]
