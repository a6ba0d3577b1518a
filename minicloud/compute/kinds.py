"""The names of compute's record kinds, declared once: the API, the scheduler and the node's compute reconciler
import them from here."""

from __future__ import annotations

INSTANCE_KIND = "instance"
IMAGE_KIND = "image"
#: One per node: the capacity its agent publishes for the scheduler.
HYPERVISOR_KIND = "hypervisor"
#: One per node: what the scheduler has handed out there (the create handler's compare-and-swap target).
PLACEMENT_KIND = "placement"
