from .base import Task
from .classify import ClassifyTask, tokenize_labels
from .embed import EmbedTask, pooling_from_checkpoint, prompts_from_checkpoint
from .next_token import NextTokenTask
from .score import DEFAULT_INSTRUCTION, QWEN3_RERANKER, RerankTemplate, ScoreTask

__all__ = [
    "Task", "ClassifyTask", "EmbedTask", "NextTokenTask", "ScoreTask", "RerankTemplate",
    "QWEN3_RERANKER", "DEFAULT_INSTRUCTION", "tokenize_labels", "pooling_from_checkpoint", "prompts_from_checkpoint",
]
