"""The KV cache the generation engine decodes over: transformers' dynamic cache, kept in buffers with room.

transformers' `DynamicLayer` appends each step's keys and values with `torch.cat`, which copies the whole cache
of every layer at every step: at a few hundred tokens those copies cost about as much as the step's matmuls on
a CPU. Here each layer holds its keys and values in a buffer with spare columns, so a step writes only its own
column and returns a view of the filled part; the buffer doubles when full. The values are the same tensors
either way, so attention (and every generated token) is unchanged.

`layer.keys` and `layer.values` read and assign as on a `DynamicLayer` (assigning replaces the buffer), so code
that edits a cache (dropping finished rows, stacking two caches, trimming padding) works on both.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

MIN_COLUMNS = 64


class RoomyLayer(DynamicLayer):
    """One layer's keys and values (B, H, T, D) in buffers (B, H, capacity, D)."""

    def __init__(self):
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None
        self._lengths = [0, 0]  # filled columns of keys and of values: equal but while one is reassigned
        super().__init__()

    @property
    def _length(self) -> int:
        assert self._lengths[0] == self._lengths[1], "keys and values of a cache layer differ in length"
        return self._lengths[0]

    @property
    def keys(self) -> torch.Tensor | None:
        return None if self._buffers is None else self._buffers[0][..., : self._lengths[0], :]

    @keys.setter
    def keys(self, value: torch.Tensor | None) -> None:
        self._assign(0, value)

    @property
    def values(self) -> torch.Tensor | None:
        return None if self._buffers is None else self._buffers[1][..., : self._lengths[1], :]

    @values.setter
    def values(self, value: torch.Tensor | None) -> None:
        self._assign(1, value)

    def _assign(self, which: int, value: torch.Tensor | None) -> None:
        """Replace keys (0) or values (1) by `value`: that buffer becomes the tensor, with no spare room
        until the next update grows it."""
        if value is None:
            self._buffers, self._lengths = None, [0, 0]
            return
        other = value if self._buffers is None else self._buffers[1 - which]
        self._buffers = (value, other) if which == 0 else (other, value)
        self._lengths[which] = value.shape[-2]
        if self._buffers[1 - which] is value:
            self._lengths[1 - which] = value.shape[-2]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = key_states.shape[-2]
        keys, values = self._room_for(key_states, value_states, self._length + new)
        start = self._length
        keys[..., start : start + new, :] = key_states
        values[..., start : start + new, :] = value_states
        self._lengths = [start + new, start + new]
        return keys[..., : start + new, :], values[..., : start + new, :]

    def _room_for(self, key_states, value_states, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The buffers, grown (doubled) where they hold fewer than `length` columns or another batch."""
        held = self._buffers
        if held is not None and held[0].shape[-2] >= length and held[0].dtype == key_states.dtype:
            return held
        capacity = max(MIN_COLUMNS, 2 * length)
        grown = []
        for states, old in zip((key_states, value_states), held or (None, None)):
            b, h, _, d = states.shape
            buffer = torch.zeros(b, h, capacity, d, dtype=states.dtype, device=states.device)
            if old is not None:
                buffer[..., : length - states.shape[-2], :] = old[..., : length - states.shape[-2], :]
            grown.append(buffer)
        self._buffers = (grown[0], grown[1])
        return self._buffers

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self._buffers is not None and self._length:
            self._buffers = (self._buffers[0][indices], self._buffers[1][indices])

    def get_seq_length(self) -> int:
        return self._length


class RoomyCache(DynamicCache):
    """A `DynamicCache` of `RoomyLayer`s, one added per decoder layer as the first forward reaches it."""

    def __init__(self):
        Cache.__init__(self, layer_class_to_replicate=RoomyLayer)
