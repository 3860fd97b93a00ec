"""`model: "auto"`: picking a model per request from rules in the config.

Rules are tried in order; the first whose every set bound holds (prompt tokens, requested
max_tokens, complexity) wins, else `routing.default` (or the last model, by convention the
largest); a rule or the default may name a LoRA adapter as it names a model. A tenant's
`max_cost_per_request` then caps the choice: if the estimated cost of the chosen model
(prompt + max_tokens at its prices) is above it, the most capable model
that fits is used instead (models are listed from small to large), and if none fits, the
cheapest. So small requests go to the small model and heavy ones escalate, within budget.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from server.config_file import ModelConfig, RoutingConfig, TenantConfig
from server.usage import cost

AUTO = "auto"
_HARD_WORDS = re.compile(r"\b(prove|proof|derive|analy[sz]e|step[- ]by[- ]step|explain why|compare|"
                         r"optimi[sz]e|algorithm|theorem|debug|refactor|translate)\b", re.I)


def complexity(text: str) -> float:
    """A cheap 0..1 estimate of how hard a prompt is: length, code, reasoning words and the
    number of questions. Monotone in each signal; meant for routing, not for truth."""
    score = min(len(text) / 4000.0, 0.4)
    score += 0.25 if "```" in text or re.search(r"\bdef |\bclass |;\s*$", text, re.M) else 0.0
    score += min(len(_HARD_WORDS.findall(text)) * 0.15, 0.3)
    score += min(max(text.count("?") - 1, 0) * 0.05, 0.05)
    return round(min(score, 1.0), 4)


@dataclass
class Decision:
    model: str
    reason: str  # which rule or fallback decided, for logs and the X-Conveyor-Route header


@dataclass
class Router:
    config: RoutingConfig
    models: list[ModelConfig]  # small to large
    adapters: dict[str, ModelConfig] = field(default_factory=dict)  # LoRA adapters (priced) by name

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("routing needs at least one model")

    def _estimate(self, model: ModelConfig, prompt_tokens: int, max_tokens: int) -> float:
        return cost(model.price, prompt_tokens, 0, max_tokens)

    def choose(self, tenant: TenantConfig, prompt_tokens: int, max_tokens: int, text: str) -> Decision:
        allowed = [m for m in self.models if tenant.models is None or m.name in tenant.models]
        if not allowed:
            allowed = self.models[:1]
        score = complexity(text)
        decision = None
        for i, rule in enumerate(self.config.rules):
            if ((rule.max_prompt_tokens is None or prompt_tokens <= rule.max_prompt_tokens)
                    and (rule.max_tokens is None or max_tokens <= rule.max_tokens)
                    and (rule.max_complexity is None or score <= rule.max_complexity)):
                decision = Decision(rule.model, f"rule {i}")
                break
        if decision is None:
            decision = Decision(self.config.default or self.models[-1].name, "default")
        # an adapter is chosen only when a rule or the default names it; fallbacks pick base models
        adapters = {n: a for n, a in self.adapters.items() if tenant.models is None or n in tenant.models}
        if decision.model not in [m.name for m in allowed] and decision.model not in adapters:
            decision = Decision(allowed[-1].name, "tenant models")
        ceiling = tenant.max_cost_per_request
        if ceiling is not None:
            by_name = {**{m.name: m for m in allowed}, **adapters}
            if self._estimate(by_name[decision.model], prompt_tokens, max_tokens) > ceiling:
                fits = [m for m in allowed if self._estimate(m, prompt_tokens, max_tokens) <= ceiling]
                best = fits[-1] if fits else min(
                    allowed, key=lambda m: self._estimate(m, prompt_tokens, max_tokens))
                decision = Decision(best.name, "cost ceiling")
        return decision
