"""Where the Python API finds its default trust layer: an installed plugin, never a hard-wired import.

A package registers a `swarm.hooks.TrustLayerFactory` under the entry-point group `efedllm.trust_layer`
(this project's `reputation` does, in pyproject.toml). Entry points (`swarm-chat`, `swarm-chat serve`) pass
theirs explicitly; `DistributedModelForCausalLM.from_pretrained` falls back to this one.
"""

from __future__ import annotations

import logging
from importlib.metadata import entry_points

from swarm.hooks import TrustLayerFactory

logger = logging.getLogger(__name__)

GROUP = "efedllm.trust_layer"


def default_trust_layer() -> TrustLayerFactory | None:
    """The installed trust layer's factory, or None (with a warning: answers go out unchecked)."""
    found = sorted(entry_points(group=GROUP), key=lambda ep: ep.name)
    if not found:
        logger.warning(f"No trust layer is installed (entry points {GROUP!r}): answers are not spot-checked")
        return None
    if len(found) > 1:
        logger.info(f"Several trust layers are installed ({', '.join(ep.name for ep in found)}); using {found[0].name}")
    return found[0].load()
