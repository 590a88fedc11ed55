"""transformers interoperability: import a pretrained model as a pkmlm run, export a pkmlm model for transformers.

pkmlm.models.hf.families: one Family per transformers model_type (gpt2, llama, qwen2, qwen3): config and tensor
mapping. pkmlm.models.hf.convert: import_pretrained / export_pretrained. modeling_pkmlm.py: the self-contained
model code an export ships for memory models (loaded with trust_remote_code). The CLI is pkmlm/hf.py.
transformers is needed only for .gguf sources and to load an export; reading safetensors needs safetensors.
"""

from pkmlm.models.hf.convert import ExportReport, ImportReport, export_pretrained, import_pretrained, read_source
from pkmlm.models.hf.families import FAMILIES, HFError

__all__ = ["FAMILIES", "HFError", "ExportReport", "ImportReport", "export_pretrained", "import_pretrained",
           "read_source"]
