"""matrec for the Hugging Face ecosystem (the optional extra ``matrec[hf]``).

``import matrec.hf`` registers :class:`MatrecConfig` and :class:`MatrecForCausalLM` with
transformers' ``AutoConfig`` / ``AutoModelForCausalLM``; after it, a saved matrec directory loads
with ``AutoModelForCausalLM.from_pretrained(dir)`` and generates with ``model.generate`` or
``pipeline("text-generation")``. See docs/huggingface.md.
"""
from __future__ import annotations

try:
    import transformers
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError("matrec.hf needs transformers: pip install 'matrec[hf]'") from err

from .configuration import MatrecConfig, config_from_model_spec
from .modeling import MatrecCache, MatrecForCausalLM
from .export import export_hf, workbench_run_from_hf

transformers.AutoConfig.register(MatrecConfig.model_type, MatrecConfig, exist_ok=True)
transformers.AutoModelForCausalLM.register(MatrecConfig, MatrecForCausalLM, exist_ok=True)

__all__ = ["MatrecConfig", "MatrecForCausalLM", "MatrecCache", "config_from_model_spec", "export_hf",
           "workbench_run_from_hf"]
