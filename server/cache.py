"""The content-addressed weight cache: what lets a reconnecting robot send digests, not megabytes.

Uploads a robot marks as weights (``"c": 1`` on a put) are kept here under the
xxh3-128 digest of their bytes, which this server computes itself: a robot cannot
plant bytes under another tensor's digest. A session may take a cached tensor only
by naming its digest (an ``adopt`` request), which it can only know if it holds the
bytes: 128 bits are not guessed, so no robot reads weights it does not already have.
Entries are shared by every session read-only: a session that adopts one gets its
own copy on the device, so an in-place op there cannot change what others see.
The cache holds at most ``max_bytes``; the least recently used entries go first.
"""
from __future__ import annotations

import threading
from collections import OrderedDict

import torch

from rrto.codec import digest


class WeightCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()  # session workers share it

    def add(self, dtype: str, buf, t: torch.Tensor) -> None:
        """Keep ``t`` (dense, on the device; its bytes are ``buf``) unless too large or already there."""
        n = t.numel() * t.element_size()
        if n == 0 or n > self.max_bytes:
            return
        key = (dtype, digest(buf))
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return
        flat = t.as_strided((t.numel(),), (1,), t.storage_offset()).clone()  # storage order = the bytes sent
        with self._lock:
            if key in self._entries:
                return
            self._entries[key] = flat
            self.bytes += n
            while self.bytes > self.max_bytes:
                _, old = self._entries.popitem(last=False)
                self.bytes -= old.numel() * old.element_size()

    def get(self, dtype: str, hexdigest: str) -> torch.Tensor | None:
        """The cached 1-D tensor of these bytes (read-only: copy it before use), or None."""
        with self._lock:
            flat = self._entries.get((dtype, hexdigest))
            if flat is not None:
                self._entries.move_to_end((dtype, hexdigest))
            return flat

    def __len__(self) -> int:
        return len(self._entries)
