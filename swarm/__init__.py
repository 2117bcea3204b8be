"""eFedLLM swarm: run a large language model across a peer-to-peer swarm of volunteers' machines.

    from swarm import DistributedModelForCausalLM
    model = DistributedModelForCausalLM.from_pretrained("smollm2-135m", initial_peers=[...])
"""

__version__ = "0.1.0"

__all__ = ["DistributedModelForCausalLM", "__version__"]


def __getattr__(name: str):
    # Imported lazily: peers and tools use swarm's light modules without loading the client.
    if name == "DistributedModelForCausalLM":
        from swarm.client import DistributedModelForCausalLM

        return DistributedModelForCausalLM
    raise AttributeError(f"module 'swarm' has no attribute {name!r}")
