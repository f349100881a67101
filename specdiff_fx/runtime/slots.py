"""The state of each call slot: its cache buffers, its trajectory stamp, its policy's state.

A step may call the denoiser several times (separate cond and uncond passes, "true CFG"):
each call slot keeps what it computed apart from the others, in one :class:`SlotState`,
whatever the policy.  Every runtime keeps the same contract with it:

* **stamp / valid_for / invalidate.**  A slot is stamped with the trajectory (and step) that
  wrote it; a cache is read only where ``valid_for`` the current trajectory, so a stale read
  (another trajectory, a previous input signature) cannot happen.  ``invalidate()`` forgets the
  stamp and starts the policy's state afresh; the buffers stay, unread until written again.
* **Buffers at the call's sizes.**  A dynamic graph's specs are symbolic (buffers.py); a slot
  allocates each at the sizes of the calls it serves (``sizes``, set by the runtime when a
  call's sizes change, after which every slot is new).
* **Buffers found by their BufferSpec.**  A variant is called with the buffers of the specs its
  pass described; ``buffers(specs)`` hands them in that order, each allocated (zeros) the first
  time it is asked for.  A buffer is one per name: the variants of a policy that name the same
  buffer (a K/V cache the full step writes and the partial step reads) share it.  History
  entries (role ``history``) are one ring per layout, handed by ``ring`` position, never by
  name (runtime rotates it with :meth:`SlotState.rotate_rings`).
* **Policy state in the slot.**  What a policy keeps per slot beyond buffers (taylor: where the
  last full steps were; specdiff: the ring's timesteps, the draft's importance) is one object
  the slot owns (``policy_state``), made by the runtime's factory and made anew by
  ``invalidate()``.

Buffers are allocated once per slot and only written in place, so ``cudagraphs=True`` captures
a variant once per slot with them as static inputs (runtime/cuda_graphs.py).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import torch

from ..buffers import RING, BufferRole, BufferSpec


_KEPT_LISTS = 8
"""Buffer lists a slot keeps for reuse (one per variant's spec list; bounded so that lists
asked for with throwaway spec lists never pile up)."""


def _zeros(spec: BufferSpec) -> torch.Tensor:
    return torch.zeros(spec.shape, dtype=spec.dtype, device=spec.device)




def _ring_key(spec: BufferSpec) -> tuple:
    return tuple(spec.shape), spec.dtype, spec.branch


class SlotState:
    """Buffers, trajectory stamp and policy state of one call slot (module docstring)."""

    def __init__(self, index: int, policy_state: Callable[[], Any] | None = None,
                 sizes: dict | None = None) -> None:
        self.index = index
        # a dynamic graph's sizes in the calls this slot serves (buffers.py: symbolic specs)
        self.sizes = sizes if sizes is not None else {}
        self.trajectory: int | None = None
        self.step: int | None = None
        self._policy_state = policy_state
        self.policy_state: Any = policy_state() if policy_state is not None else None
        self._buffers: dict[str, tuple[BufferSpec, torch.Tensor]] = {}
        self._rings: dict[tuple, list[torch.Tensor]] = {}
        self._lists: dict[int, tuple[Sequence[BufferSpec], list[torch.Tensor]]] = {}

    # ------------------------------------------------------------------ the stamp
    def valid_for(self, trajectory: int) -> bool:
        return self.trajectory is not None and self.trajectory == trajectory

    def stamp(self, trajectory: int, step: int) -> None:
        self.trajectory, self.step = trajectory, step

    def invalidate(self) -> None:
        """Nothing this slot holds is read again until it is written in a trajectory: the
        stamp is gone and the policy's state starts afresh."""
        self.trajectory = self.step = None
        if self._policy_state is not None:
            self.policy_state = self._policy_state()

    # ------------------------------------------------------------------ buffers
    def buffer(self, spec: BufferSpec) -> torch.Tensor:
        """The buffer of ``spec`` (allocated on first use)."""
        if spec.role == BufferRole.HISTORY:
            return self.ring(spec)[spec.ring]
        held = self._buffers.get(spec.name)
        if held is None:
            held = self._buffers[spec.name] = (spec, _zeros(spec.at(self.sizes)))
        elif held[0] is not spec and (held[0].shape != spec.shape or held[0].dtype != spec.dtype):
            raise ValueError(f"buffer {spec.name!r} asked for as {spec.shape} {spec.dtype}, "
                             f"held as {held[0].shape} {held[0].dtype}")
        return held[1]

    def buffers(self, specs: Sequence[BufferSpec]) -> list[torch.Tensor]:
        """The buffers of ``specs`` in their order (a variant's, as its pass described them).

        A list without history entries (which rotate) is kept for the next call with the same
        ``specs`` object, so a call's host work does not grow with the number of buffers."""
        kept = self._lists.get(id(specs))
        if kept is not None and kept[0] is specs:
            return kept[1]
        out = [self.buffer(s) for s in specs]
        if len(self._lists) < _KEPT_LISTS and not any(s.role == BufferRole.HISTORY for s in specs):
            self._lists[id(specs)] = (specs, out)
        return out

    def ring(self, spec: BufferSpec) -> list[torch.Tensor]:
        """The history ring of ``spec``'s layout, newest first (a variant writes the oldest)."""
        key = _ring_key(spec)
        ring = self._rings.get(key)
        if ring is None:
            ring = self._rings[key] = [_zeros(spec.at(self.sizes)) for _ in range(RING)]
        return ring

    def rotate_rings(self) -> None:
        """The oldest entry of each ring was just written: it becomes the newest."""
        for key, ring in self._rings.items():
            self._rings[key] = [ring[-1]] + ring[:-1]

    def find(self, role: BufferRole | str) -> torch.Tensor:
        """The one buffer of ``role`` this slot holds (KeyError: none, or several)."""
        found = [t for s, t in self._buffers.values() if s.role == role]
        if len(found) != 1:
            raise KeyError(f"slot {self.index} holds {len(found)} buffers of role {str(role)!r}")
        return found[0]

    def named(self, *roles: BufferRole | str) -> dict[str, torch.Tensor]:
        """The buffers held, by name (history rings aside), only those of ``roles`` if given."""
        return {name: t for name, (s, t) in self._buffers.items() if not roles or s.role in roles}

    def _tensors(self, *roles: BufferRole | str) -> Iterator[torch.Tensor]:
        for s, t in self._buffers.values():
            if not roles or s.role in roles:
                yield t
        if not roles or BufferRole.HISTORY in roles:
            for ring in self._rings.values():
                yield from ring

    def nbytes_of(self, *roles: BufferRole | str) -> int:
        """Bytes of the buffers held (of ``roles`` if given)."""
        return sum(t.numel() * t.element_size() for t in self._tensors(*roles))

    @property
    def nbytes(self) -> int:
        return self.nbytes_of()


class Slots:
    """A runtime's call slots, each made on first use with the runtime's policy-state factory."""

    def __init__(self, policy_state: Callable[[], Any] | None = None) -> None:
        self._policy_state = policy_state
        self._slots: dict[int, SlotState] = {}
        self.sizes: dict = {}
        """A dynamic graph's sizes (size symbol -> int) for the slots made from here on; the
        runtime sets them, after :meth:`clear`, when a call comes with other sizes."""

    def __getitem__(self, index: int) -> SlotState:
        slot = self._slots.get(index)
        if slot is None:
            slot = self._slots[index] = SlotState(index, self._policy_state, self.sizes)
        return slot

    def __len__(self) -> int:
        return len(self._slots)

    def values(self) -> list[SlotState]:
        return list(self._slots.values())

    def clear(self) -> None:
        """Drop every slot and its buffers (a new input signature, reset, begin_trajectory)."""
        self._slots.clear()

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self._slots.values())
