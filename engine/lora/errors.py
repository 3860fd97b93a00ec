"""`LoRAError`: an adapter the engine refuses to load or a request naming an adapter it cannot
serve. An `InvalidParameterError` (so a `ValueError`): the server answers 400 naming ``param``."""
from __future__ import annotations

from engine.errors import InvalidParameterError


class LoRAError(InvalidParameterError):
    """``param`` is the field at fault: ``lora_name``, ``lora_path``, ``rank``,
    ``target_modules``, ``base_model_name_or_path``, an unsupported ``adapter_config.json`` key
    (``modules_to_save``, ``use_dora``, ...), or ``model`` for a request naming an adapter that
    is not loaded."""
