"""Deprecated location of the model-directory I/O: use loza_jax.model_dir (re-exported here for old imports)."""
from loza_jax.model_dir import check_new_dir, load_config_file, load_model, save_model  # noqa: F401
