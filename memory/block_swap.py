"""Block swapping: the frozen base weights of some pipeline layers live in CPU memory and are
copied to the accelerator just before the layer runs (`blocks_to_swap`).

`BlockSwap` owns, per swapped layer, a "home" copy of each frozen tensor (pinned CPU memory on
CUDA) and leaves an empty placeholder in the module between uses. A forward pre-hook loads the
layer's weights and prefetches the next swapped layer on a side CUDA stream, so the copy
overlaps with compute. Backward needs the weights again:

- a checkpointed layer recomputes its forward, so the same pre-hook loads them;
- otherwise the forward saves, instead of each swapped weight, a reference to it
  (`torch.autograd.graph.saved_tensors_hooks`), and the backward loads the weights again when
  autograd unpacks it.

At most `resident` swapped layers hold device copies at once; loading another evicts the least
recently used. Trainable tensors (LoRA) are never swapped. On CPU the copy is a no-op, but the
same bookkeeping runs.

Which layers swap: the last `blocks_to_swap` transformer blocks (`swapped_layer_indices`); the
memory estimate counts the same ones.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict

import torch
from torch import nn

from config.train_config import TrainConfig
from memory.checkpointing import checkpointed
from utils.errors import ConfigError

# Swapped blocks on the device at once: the running one and the prefetched next.
BLOCK_SWAP_RESIDENT = 2

class _Slot:
    """One frozen tensor of a swapped layer: where it sits in its module, and its home copy."""

    __slots__ = ("module", "name", "is_buffer", "home")

    def __init__(self, module: nn.Module, name: str, is_buffer: bool, home: torch.Tensor):
        self.module, self.name, self.is_buffer, self.home = module, name, is_buffer, home

    def current(self) -> torch.Tensor:
        return self.module._buffers[self.name] if self.is_buffer else self.module._parameters[self.name].data

    def put(self, tensor: torch.Tensor) -> None:
        if self.is_buffer:
            self.module._buffers[self.name] = tensor
        else:
            # .data keeps the Parameter object (peft, the engine and the optimizer hold it)
            self.module._parameters[self.name].data = tensor


class _SavedWeight:
    """What autograd saves in place of a swapped weight: the slot to load it from again."""

    __slots__ = ("swap", "layer", "slot", "size", "stride", "offset")

    def __init__(self, swap: "BlockSwap", layer: int, slot: _Slot, size, stride, offset: int):
        self.swap, self.layer, self.slot = swap, layer, slot
        self.size, self.stride, self.offset = size, stride, offset


class BlockSwap:
    """Keeps the frozen weights of `layers` (pipeline layers, in execution order) off the device
    between uses. `checkpointed[i]`: whether layer i's forward is recomputed in the backward."""

    def __init__(self, layers: list[nn.Module], owned: list[list[nn.Module]], checkpointed: list[bool],
                 device: torch.device, resident: int = 2):
        self.layers = layers
        self.checkpointed = checkpointed
        self.device = device
        self.resident = max(1, resident)
        self.cuda = device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        self.slots: list[list[_Slot]] = []
        self.loaded: OrderedDict[int, torch.cuda.Event | None] = OrderedDict()  # layer -> copy done
        self.last = -1  # the layer loaded last: tells forward from backward order
        self.loads = 0  # copies to the device, for tests and logging
        self.handles = []
        for i, modules in enumerate(owned):
            slots = []
            for module in modules:
                for sub in module.modules():
                    for name, p in sub._parameters.items():
                        if p is not None and not p.requires_grad and not p.is_meta:
                            slots.append(_Slot(sub, name, False, self._home(p.data)))
                    for name, b in sub._buffers.items():
                        if b is not None and not b.is_meta:
                            slots.append(_Slot(sub, name, True, self._home(b)))
            self.slots.append(slots)
            self._evict(i)
        for i, layer in enumerate(layers):
            self.handles.append(layer.register_forward_pre_hook(self._make_pre_hook(i)))
            self.handles.append(layer.register_forward_hook(self._make_post_hook(i)))
        self._saving: contextlib.ExitStack | None = None

    # ------------------------------------------------------------------ storage
    def _home(self, tensor: torch.Tensor) -> torch.Tensor:
        home = tensor.detach().to("cpu")
        if self.cuda:
            home = home.pin_memory()
        return home

    def _placeholder(self, slot: _Slot) -> torch.Tensor:
        return torch.empty(0, dtype=slot.home.dtype, device=self.device)

    def _evict(self, i: int) -> None:
        for slot in self.slots[i]:
            slot.put(self._placeholder(slot))
        self.loaded.pop(i, None)

    def is_home(self, i: int) -> bool:
        """Whether layer i holds no device copy (its weights only in their home storage)."""
        return i not in self.loaded and all(s.current().numel() == 0 for s in self.slots[i])

    def _start_load(self, i: int) -> None:
        """Begin copying layer i to the device (on the side stream on CUDA)."""
        if i in self.loaded:
            self.loaded.move_to_end(i)
            return
        while len(self.loaded) >= self.resident:
            self._evict(next(iter(self.loaded)))
        self.loads += 1
        if self.cuda:
            # The copy must not start before compute is done with memory it may reuse.
            self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.copy_stream):
                for slot in self.slots[i]:
                    slot.put(slot.home.to(self.device, non_blocking=True))
                event = torch.cuda.Event()
                event.record(self.copy_stream)
        else:
            for slot in self.slots[i]:
                slot.put(slot.home.to(self.device))  # the home tensor itself: no copy
            event = None
        self.loaded[i] = event

    def _ready(self, i: int) -> None:
        """Make layer i's weights usable by the compute stream now."""
        self._start_load(i)
        event = self.loaded[i]
        if event is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(event)
            for slot in self.slots[i]:
                # memory allocated on the copy stream, used on compute: free only after compute
                slot.current().record_stream(compute)
            self.loaded[i] = None

    def ensure(self, i: int) -> None:
        """Layer i is about to run: load it, and prefetch the next swapped layer in the current
        direction (forward: the following one; backward: the preceding one)."""
        direction = -1 if i < self.last else 1
        self.last = i
        self._ready(i)
        following = i + direction
        if 0 <= following < len(self.layers) and self.resident > 1:
            self._start_load(following)
            self.loaded.move_to_end(i)  # the running layer is the last to evict

    # ------------------------------------------------------------------ hooks
    def _make_pre_hook(self, i: int):
        def pre_hook(module, args):
            self.ensure(i)
            if torch.is_grad_enabled() and not self.checkpointed[i]:
                self._saving = contextlib.ExitStack()
                self._saving.enter_context(torch.autograd.graph.saved_tensors_hooks(
                    lambda t: self._pack(i, t), self._unpack))
        return pre_hook

    def _make_post_hook(self, i: int):
        def post_hook(module, args, output):
            if self._saving is not None:
                self._saving.close()
                self._saving = None
        return post_hook

    def _pack(self, i: int, tensor: torch.Tensor):
        # A saved weight may be a view of it (linear saves weight.t()): match by storage.
        if tensor.device != self.device or tensor.numel() == 0:
            return tensor
        ptr = tensor.untyped_storage().data_ptr()
        for slot in self.slots[i]:
            current = slot.current()
            if current.numel() and current.untyped_storage().data_ptr() == ptr and current.dtype == tensor.dtype:
                return _SavedWeight(self, i, slot, tensor.size(), tensor.stride(),
                                    tensor.storage_offset() - current.storage_offset())
        return tensor

    @staticmethod
    def _unpack(saved):
        if isinstance(saved, _SavedWeight):
            saved.swap.ensure(saved.layer)
            current = saved.slot.current()
            return current.as_strided(saved.size, saved.stride, current.storage_offset() + saved.offset)
        return saved

    def release(self) -> None:
        """Evict every swapped layer (between steps: all weights back in their home storage)."""
        for i in list(self.loaded):
            self._evict(i)

    def remove(self) -> None:
        """Remove the hooks and put every weight back on the device for good."""
        for handle in self.handles:
            handle.remove()
        for i in range(len(self.layers)):
            self._ready(i) if self.cuda else self._start_load(i)
            self.loaded.pop(i, None)


def block_layer_indices(layers) -> list[int]:
    """The transformer-block layers (kind "block")."""
    return [i for i, layer in enumerate(layers) if layer.kind == "block"]


def swapped_layer_indices(layers, blocks_to_swap: int, config_file=None) -> list[int]:
    """The last `blocks_to_swap` block layers, whose frozen weights live in CPU memory."""
    blocks = block_layer_indices(layers)
    if blocks_to_swap > len(blocks):
        raise ConfigError(f"{config_file}: 'blocks_to_swap' = {blocks_to_swap} exceeds the model's "
                          f"{len(blocks)} transformer blocks")
    return blocks[len(blocks) - blocks_to_swap:] if blocks_to_swap else []


def attach_block_swap(model, config: TrainConfig, transformer, layers, device: torch.device):
    """With `blocks_to_swap`, move the swapped blocks' frozen weights to CPU memory and hook their
    layers (before the engine is built, so that it never moves them to the device); else None."""
    s = config.settings
    swapped = swapped_layer_indices(layers, s.blocks_to_swap, config.file)
    if not swapped:
        return None
    chosen = [layers[i] for i in swapped]
    owned = [[transformer.get_submodule(n) for n in layer.module_names] for layer in chosen]
    recomputed = [checkpointed(layer, s.activation_checkpointing, model) for layer in chosen]
    return BlockSwap(chosen, owned, recomputed, device, resident=BLOCK_SWAP_RESIDENT)
