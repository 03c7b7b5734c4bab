"""Capabilities that the training loop and ``ngbench bench`` ask an optimizer for.

Code outside the library asks ``isinstance(opt, Instrumented)`` instead of testing an optimizer's
name or attributes.  Every curvature optimizer (the K-FAC family, NG+, MBF, SNGD) and the
shape-based Shampoo and SOAP are instrumented; the ``torch.optim`` baselines (SGD, AdamW) are
not (they have no phases or periodic refresh worth reporting).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Protocol, runtime_checkable

__all__ = ["Instrumented", "SampledFisher", "SplitState"]


@runtime_checkable
class Instrumented(Protocol):
    """An optimizer that reports where its step time and memory go."""

    def phase_times(self) -> dict[str, float]:
        """Cumulative seconds per phase name (e.g. ``statistics``, ``inverse``)."""
        ...

    def memory_usage(self) -> dict[str, int]:
        """Bytes of optimizer state per kind, including ``total``."""
        ...

    def refresh_period(self) -> int:
        """Steps between its costliest periodic refresh (1 = none)."""
        ...


@runtime_checkable
class SampledFisher(Protocol):
    """An optimizer that may ask for an extra backward against labels sampled from the model
    (an MC Fisher) before the training backward of a step."""

    def needs_sampled_backward(self) -> bool:
        """``True`` when this step wants the sampled-label backward."""
        ...

    def sampled_backward(self) -> AbstractContextManager[None]:
        """Backward passes inside it feed the curvature statistics, not ``.grad``."""
        ...


@runtime_checkable
class SplitState(Protocol):
    """An optimizer whose state may be split over ranks (KAISA): every rank calls
    :meth:`consolidate_state_dict` before rank ``to`` saves a checkpoint."""

    def consolidate_state_dict(self, to: int = 0) -> None: ...
