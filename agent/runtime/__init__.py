"""Runtime drivers: the seam between the reconciler and what actually runs replicas."""

from shoal.agent.runtime.base import LABEL_PREFIX, Observed, Runtime, Usage

__all__ = ["LABEL_PREFIX", "Observed", "Runtime", "Usage"]
