"""The contract shared by train/ and serve/: base loading, the data format (`adapters.data`), the task
metric (`adapters.metric`), the adapter on disk, its card, its checks."""

from adapters.base import BaseConfig, LoadedBase, base_fingerprint, load_base, load_tokenizer
from adapters.card import AdapterCard, read_card
from adapters.chat import FALLBACK_CHAT_TEMPLATE, Message, encode_chat, encode_prompt, render
from adapters.compat import AdapterCheckError, BaseShape, check_adapter, read_adapter_files
from adapters.store import AdapterNameError, AdapterStore, check_name, default_store_dir

__all__ = [
    "AdapterCard",
    "AdapterCheckError",
    "AdapterNameError",
    "AdapterStore",
    "BaseConfig",
    "BaseShape",
    "FALLBACK_CHAT_TEMPLATE",
    "LoadedBase",
    "Message",
    "base_fingerprint",
    "check_adapter",
    "check_name",
    "default_store_dir",
    "encode_chat",
    "encode_prompt",
    "load_base",
    "load_tokenizer",
    "read_adapter_files",
    "read_card",
    "render",
]
