"""HuggingFace checkpoint conversion for DeepSeek-V3 and LongCat-Flash (`python -m loza_jax.convert --help`)."""
from loza_jax.convert.hf import Stats, export_hf, import_hf, read_hf_params, write_hf
from loza_jax.convert.hf_config import config_from_hf, config_to_hf, zigzag_from_attention
from loza_jax.model_dir import load_model, save_model

__all__ = ["Stats", "config_from_hf", "config_to_hf", "export_hf", "import_hf", "load_model", "read_hf_params",
           "save_model", "write_hf", "zigzag_from_attention"]
