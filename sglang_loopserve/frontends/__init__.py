"""SGLang frontend programs and chat helpers."""

from .documents import python_docs
from .multiturn import DEFAULT_QUESTIONS, TurnResult, connect, document_chat, run_document_chat

__all__ = ["python_docs", "DEFAULT_QUESTIONS", "TurnResult", "connect", "document_chat",
           "run_document_chat"]
