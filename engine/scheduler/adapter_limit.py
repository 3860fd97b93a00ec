"""`AdapterLimit`: the ``max_loras`` admission constraint, for one admission pass.

Guarantees: admitting only requests that ``fits`` keeps the running requests on at most
``max_loras`` distinct LoRA adapters (the base model is not an adapter). A request whose
adapter does not fit waits (``blocked``) and later requests may pass it, but each admission
past it counts (``Request.lora_passed``): once a blocked request has been passed ``max_passes``
times the pass stops admitting (``admitted`` returns True), and a request that arrives at the
head already passed that often (``starved``) stops it too, so the running adapters drain and
it gets a slot: no adapter starves.
"""
from __future__ import annotations

from collections.abc import Iterable

from engine.request import Request


def running_adapters(running: Iterable[Request]) -> set[int]:
    """The distinct adapter uids of ``running``."""
    return {r.lora_id for r in running if r.lora_id is not None}


class AdapterLimit:
    def __init__(self, running: Iterable[Request], max_loras: int, max_passes: int):
        self.adapters = running_adapters(running)
        self.max_loras = max_loras
        self.max_passes = max_passes
        self.blocked: list[Request] = []  # waiting for an adapter slot: the caller pushes them back

    def fits(self, request: Request) -> bool:
        """True when admitting ``request`` keeps the running adapters within ``max_loras``."""
        lora = request.lora_id
        return lora is None or lora in self.adapters or len(self.adapters) < self.max_loras

    def starved(self, request: Request) -> bool:
        """True when ``request`` (which does not fit) has been passed often enough: nothing
        more may be admitted until its adapter fits."""
        return request.lora_passed >= self.max_passes

    def admitted(self, request: Request) -> bool:
        """Records ``request``'s admission; True when the pass must stop admitting."""
        request.lora_passed = 0
        if request.lora_id is not None:
            self.adapters.add(request.lora_id)
        for waiting in self.blocked:
            waiting.lora_passed += 1
        return any(w.lora_passed >= self.max_passes for w in self.blocked)
