"""`LLM`: offline batch generation, the simplest way to use the engine."""
from __future__ import annotations

from collections.abc import Sequence

from tqdm import tqdm

from engine.config import EngineConfig
from engine.lora.request import LoRARequest
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.pooling import PoolingParams
from engine.sampling_params import SamplingParams

Prompt = str | list[int]


class LLM:
    """``LLM(model=None, **engine_options)``: ``model`` is a HF checkpoint directory or a GGUF
    file (None: the default SmolLM2-135M-Instruct); options are `EngineConfig` fields
    (``enable_lora=True, max_loras=..., max_lora_rank=...`` for LoRA adapters)."""

    def __init__(self, model: str | None = None, **kwargs):
        self.engine = LLMEngine(EngineConfig(model=model, **kwargs))
        self._counter = 0

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        priority: Sequence[int] | None = None,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Generates for every prompt (strings or token-id lists) and returns one
        `RequestOutput` per prompt, in input order. One `SamplingParams` applies to all prompts;
        a list gives one per prompt. ``lora_request`` likewise: one adapter for all prompts, or
        one per prompt (None: the base model); adapters not loaded yet are loaded first."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(
                f"sampling_params has {len(sampling_params)} entries but there are {len(prompts)} prompts"
            )
        if priority is not None and len(priority) != len(prompts):
            raise ValueError(f"priority has {len(priority)} entries but there are {len(prompts)} prompts")
        loras = self._lora_per_prompt(lora_request, len(prompts))
        ids = []
        for i, (prompt, params) in enumerate(zip(prompts, sampling_params)):
            rid = f"llm-{self._counter}"
            self._counter += 1
            self.engine.add_request(rid, prompt, params, priority=priority[i] if priority else 0,
                                    lora_request=loras[i])
            ids.append(rid)
        return self._run(ids, use_tqdm)

    def _lora_per_prompt(self, lora_request, num_prompts: int) -> list[LoRARequest | None]:
        if lora_request is None or isinstance(lora_request, LoRARequest):
            loras = [lora_request] * num_prompts
        else:
            loras = list(lora_request)
            if len(loras) != num_prompts:
                raise ValueError(f"lora_request has {len(loras)} entries but there are {num_prompts} prompts")
        for lora in dict.fromkeys(loras):  # distinct, in order
            if lora is not None:
                self.engine.add_lora(lora)  # a no-op when already loaded from that path
        return loras

    def embed(self, texts: Prompt | Sequence[Prompt], pooling: str = "mean", normalize: bool = True,
              use_tqdm: bool = False) -> list[list[float]]:
        """One embedding per text (strings or token-id lists), in input order: the model's final
        hidden states pooled (``mean`` or ``last``) and, with ``normalize``, of unit L2 norm
        (engine/pooling.py says which pooling suits which model)."""
        if isinstance(texts, str) or (texts and isinstance(texts[0], int)):
            texts = [texts]
        params = PoolingParams(pooling=pooling, normalize=normalize)
        ids = []
        for text in texts:
            rid = f"llm-{self._counter}"
            self._counter += 1
            self.engine.add_request(rid, text, params)
            ids.append(rid)
        return [out.embedding for out in self._run(ids, use_tqdm)]

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Applies the tokenizer's chat template to one conversation or a list of them."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        tok = self.engine.tokenizer
        prompts = [
            tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=add_generation_prompt)
            for conv in conversations
        ]
        # the template already holds any BOS: tokenize without adding special tokens again
        prompt_ids = [tok.encode(p, add_special_tokens=False) for p in prompts]
        return self.generate(prompt_ids, sampling_params, use_tqdm=use_tqdm)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        final: dict[str, RequestOutput] = {}
        wanted = set(ids)
        bar = tqdm(total=len(ids), desc="Generating", disable=not use_tqdm, dynamic_ncols=True)
        try:
            while self.engine.has_unfinished_requests() and len(final) < len(ids):
                for out in self.engine.step():
                    if out.finished and out.request_id in wanted:
                        final[out.request_id] = out
                        bar.update(1)
        except BaseException:
            self.engine.abort_request([i for i in ids if i not in final])
            raise
        finally:
            bar.close()
        return [final[i] for i in ids]
