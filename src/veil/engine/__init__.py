"""The serving engine: continuous batching over a paged KV cache on the emulated confidential device.

The front door for offline and embedded use::

    from veil.engine import LLM, EngineConfig, SamplingParams, TransportKind

    with LLM(config=EngineConfig(transport=TransportKind.PIPELLM)) as llm:
        print(llm.generate(["The capital of France is"], SamplingParams(max_tokens=16))[0].text)

(These names are not re-exported from `veil` itself: the client enclave measures every veil module
its code imports, and the engine has no place in that trusted base.)
"""

from veil.engine.engine import EngineConfig, LLMEngine, RequestOutput
from veil.engine.llm import LLM, Completion
from veil.engine.offload_policy import HostDtype, OffloadPolicy
from veil.engine.scheduler import PreemptionMode
from veil.model.sampling import SamplingParams
from veil.transport.base import TransportKind

__all__ = [
    "LLM",
    "Completion",
    "EngineConfig",
    "HostDtype",
    "LLMEngine",
    "OffloadPolicy",
    "PreemptionMode",
    "RequestOutput",
    "SamplingParams",
    "TransportKind",
]
