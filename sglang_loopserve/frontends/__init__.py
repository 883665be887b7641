"""SGLang frontend programs and chat helpers."""

from .documents import module_doc, python_docs
from .endpoint import LoopServeEndpoint
from .multiturn import (DEFAULT_QUESTIONS, GROWING_CONVERSATION, LONG_GROWING_CONVERSATION, TurnResult, chat,
                        connect, document_messages, growing_messages, run_chat, run_document_chat,
                        run_growing_chat)

__all__ = ["DEFAULT_QUESTIONS", "GROWING_CONVERSATION", "LONG_GROWING_CONVERSATION", "LoopServeEndpoint",
           "TurnResult", "chat", "connect", "document_messages", "growing_messages", "module_doc",
           "python_docs", "run_chat", "run_document_chat", "run_growing_chat"]
