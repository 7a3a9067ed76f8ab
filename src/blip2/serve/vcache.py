"""The visual-prompt cache: a bounded LRU of the LLM's soft visual prompt per image.

A request's visual prompt (image encoder -> Q-Former -> projection, [P, D]) depends only on its pixels, the
model, and for InstructBLIP the Q-Former instruction (the queries attend to it), so the key is (model id, hash
of the decoded pixels, instruction ids). Many questions about one picture, or a multi-turn chat about it, then
skip the encoder and the Q-Former. The cache holds at most `max_bytes` of tensors (least recently used out
first) and counts hits, misses and evictions for /metrics.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Hashable

import torch

__all__ = ["VisualCache"]


class VisualCache:
    def __init__(self, max_bytes: int):
        if max_bytes < 1:
            raise ValueError(f"VisualCache: max_bytes must be >= 1, got {max_bytes}")
        self.max_bytes = max_bytes
        self._items: OrderedDict[Hashable, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = self.hits = self.misses = self.evictions = 0

    def get(self, key: Hashable) -> torch.Tensor | None:
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: Hashable, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if size > self.max_bytes:
            return  # larger than the whole cache: not kept
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.bytes -= old.numel() * old.element_size()
            self._items[key] = value
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, dropped = self._items.popitem(last=False)
                self.bytes -= dropped.numel() * dropped.element_size()
                self.evictions += 1

    def __len__(self) -> int:
        return len(self._items)

    def stats(self) -> dict:
        with self._lock:
            looked = self.hits + self.misses
            return {"entries": len(self._items), "bytes": self.bytes, "max_bytes": self.max_bytes,
                    "hits": self.hits, "misses": self.misses, "evictions": self.evictions,
                    "hit_rate": self.hits / looked if looked else 0.0}
