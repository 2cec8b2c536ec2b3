"""Config loading: YAML, overrides, and one error test per validation rule."""
import textwrap
import typing

import pytest

from loza_jax.config import (AttentionConfig, CalibrateConfig, Config, DataConfig, EvalConfig, ModelConfig, RopeScaling,
                             SparsifyConfig, from_dict, load_config, replace, save_config, stage_mesh, to_dict)
from loza_jax.context import Layout, check_split


def write(tmp_path, text):
  p = tmp_path / "c.yaml"
  p.write_text(textwrap.dedent(text))
  return p


@pytest.mark.parametrize("path", sorted(str(p) for p in __import__("pathlib").Path("configs").glob("*.yaml")))
def test_every_shipped_config_loads(path):
  cfg = load_config(path)
  assert len(cfg.layer_types) == cfg.model.num_attention_sublayers


def test_shipped_configs_load():
  demo = load_config("configs/demo_cpu.yaml")
  assert demo.model.hidden_size == 128 and demo.attention.block_size == 8 and demo.data.seq_len == 128
  big = load_config("configs/longcat_flash_attention.yaml")
  assert (big.model.qk_head_dim, big.model.v_head_dim, big.model.num_attention_heads) == (192, 128, 64)
  assert big.layer_types == ("full", "ssa")


def test_overrides_and_roundtrip(tmp_path):
  cfg = load_config("configs/demo_cpu.yaml", ["train.steps=7", "attention.layer_types=[ssa, full, blend, full]",
                                              "model.rope_scaling={factor: 4.0}"])
  assert cfg.train.steps == 7 and cfg.layer_types == ("ssa", "full", "blend", "full")
  assert cfg.model.rope_scaling.factor == 4.0
  save_config(cfg, tmp_path / "out.yaml")
  assert load_config(tmp_path / "out.yaml") == cfg
  assert from_dict(Config, to_dict(cfg)) == cfg
  assert replace(cfg, **{"attention.block_size": 8}).attention.block_size == 8
  assert load_config("configs/demo_cpu.yaml", ["train.learning_rate=1e-4"]).train.learning_rate == 1e-4
  with pytest.raises(ValueError, match="train.learning_rate: expected a number"):
    load_config("configs/demo_cpu.yaml", ["train.learning_rate=fast"])


@pytest.mark.parametrize("text,match", [
    ("model: {hidden_sise: 3}", r"unknown key model\.'hidden_sise'"),
    ("modle: {}", r"unknown key 'modle'"),
    ("model: {hidden_size: '128'}", r"model\.hidden_size: expected an integer"),
    ("model: {tie_word_embeddings: 1}", r"model\.tie_word_embeddings: expected true/false"),
    ("model: {rope_theta: abc}", r"model\.rope_theta: expected a number"),
    ("attention: {layer_types: [full, full]}", r"layer_types has 2 entries but the model has 4"),
    ("attention: {layer_types: [full, full, sparse, full]}", r"layer_types\[2\]: 'sparse'"),
    ("model: {num_attention_heads: 4, num_key_value_heads: 3}", r"num_key_value_heads=3 must divide"),
    ("attention: {granularity: token}", r"attention.granularity"),
    ("attention: {block_size: 0}", r"block_size >= 1"),
    ("model: {architecture: llama}", r"model.architecture: 'llama' is not one of"),
    ("model: {hidden_size: 0}", r"model.hidden_size must be >= 1"),
    ("model: {qk_rope_head_dim: 7}", r"qk_rope_head_dim must be even"),
    ("model: {dtype: fp8}", r"model.dtype: 'fp8' is not one of"),
    ("model: {rope_scaling: {type: ntk}}", r"rope_scaling.type"),
    ("model: {rope_scaling: {factr: 2}}", r"unknown key model.rope_scaling.'factr'"),
    ("model: {rope_scaling: {factor: 0.5}}", r"model\.rope_scaling\.factor must be >= 1"),
    ("midtrain: {stages: [{seq_len: 128, steps: 5, mesh: {context: 0}}]}",
     r"midtrain\.stages\[0\]\.mesh\.context must be a positive size or -1"),
    ("midtrain: {stages: [{seq_len: 128, steps: 5, mesh: {fsdp: -1}}]}",
     r"midtrain\.stages\[0\]\.mesh: at most one axis may be -1"),
    ("midtrain: {stages: [{seq_len: 128, steps: 5, mesh: {distributed: true}}]}",
     r"unknown key midtrain\.stages\[0\]\.mesh\.'distributed'"),
    ("- a\n- b", r"top level must be a mapping"),
    ("data: {passkey_digits: [7]}", r"data.passkey_digits: need \[min, max\]"),
    ("pipeline: {pretrain_stages: [{seq_len: 128, steps: 0}]}", r"pipeline.pretrain_stages: need seq_len >= 2, steps >= 1"),
    ("pipeline: {pretrain_stages: [{seq_len: 128, steps: 5, retrieval_fraction: 2.0}]}", r"retrieval_fraction must be"),
    ("pipeline: {pretrain_stages: [{seq_len: 128, steps: 5, retrival_lengths: [96]}]}",
     r"unknown key pipeline.pretrain_stages\[0\].'retrival_lengths'"),
    ("data: {retrieval_lengths: [256]}\npipeline: {pretrain_stages: [{seq_len: 128, steps: 5}]}",
     r"pipeline.pretrain_stages\[0\]: data.retrieval_lengths: 256 is not in \[1, data.seq_len=128\]"),
    ("attention: {block_size: 16}\npipeline: {pretrain_stages: [{seq_len: 120, steps: 5, retrieval_lengths: [96]}]}",
     r"pipeline.pretrain_stages\[0\].seq_len=120 must be a multiple of attention.block_size=16"),
    ("pipeline: {target_full_beyond: 1.5}", r"pipeline.target_full_beyond must be in \[0, 1\], got 1.5"),
])
def test_validation_errors_name_key_and_file(tmp_path, text, match):
  p = write(tmp_path, text)
  with pytest.raises(ValueError, match=match) as e:
    load_config(p)
  assert str(p) in str(e.value)


def test_missing_file_and_bad_override():
  with pytest.raises(FileNotFoundError, match="nope.yaml"):
    load_config("nope.yaml")
  with pytest.raises(ValueError, match="expected key=value"):
    load_config("configs/demo_cpu.yaml", ["train.steps"])
  with pytest.raises(ValueError, match="configs/demo_cpu.yaml: unknown key train.'stepz'"):
    load_config("configs/demo_cpu.yaml", ["train.stepz=3"])


def test_pretrain_stage_data_inherits_and_overrides():
  from loza_jax.config import pretrain_stage_data
  cfg = load_config("configs/demo_cpu.yaml", ["data.passkey_digits=[7, 9]", "pipeline.pretrain_stages=[{seq_len: 128, "
                                              "steps: 5, retrieval_lengths: [96, 128], passkey_digits: [7, 20]}, "
                                              "{seq_len: 256, steps: 3, retrieval_fraction: 0.5}]"])
  first, last = (pretrain_stage_data(cfg.data, s) for s in cfg.pipeline.pretrain_stages)
  assert (first.seq_len, first.retrieval_lengths, first.passkey_digits) == (128, (96, 128), (7, 20))
  assert first.retrieval_fraction == cfg.data.retrieval_fraction
  assert (last.seq_len, last.retrieval_lengths, last.passkey_digits, last.retrieval_fraction) == (
      256, cfg.data.retrieval_lengths, (7, 9), 0.5)



LITERAL_FIELDS = [  # (section class, its key, a field typed as a Literal or a tuple of Literals)
    (ModelConfig, "model", "architecture"), (ModelConfig, "model", "dtype"), (ModelConfig, "model", "param_dtype"),
    (ModelConfig, "model", "moe_impl"), (RopeScaling, "model.rope_scaling", "type"),
    (AttentionConfig, "attention", "layer_types"), (AttentionConfig, "attention", "granularity"),
    (DataConfig, "data", "source"), (DataConfig, "data", "retrieval_tasks"), (DataConfig, "data", "retrieval_loss"),
    (CalibrateConfig, "calibrate", "objective"), (CalibrateConfig, "calibrate", "loss_mask"),
    (SparsifyConfig, "sparsify", "strategy"), (EvalConfig, "evaluate", "tasks"), (EvalConfig, "evaluate", "answers"),
]


@pytest.mark.parametrize("cls,section,field", LITERAL_FIELDS, ids=[f"{s}.{f}" for _, s, f in LITERAL_FIELDS])
def test_literal_fields_reject_bad_values_naming_key_and_choices(cls, section, field):
  tp = typing.get_type_hints(cls)[field]
  is_tuple = "tuple" in str(tp)
  value = {"layer_types": "[full, bogus, full, full]"}.get(field, "[bogus]" if is_tuple else "bogus")
  extra = ["model.rope_scaling={factor: 2.0}"] if section == "model.rope_scaling" else []
  index = r"\[1\]" if field == "layer_types" else r"\[0\]" if is_tuple else ""
  with pytest.raises(ValueError, match=rf"{section}\.{field}{index}: 'bogus' is not one of \['") as e:
    load_config("configs/demo_cpu.yaml", extra + [f"{section}.{field}={value}"])
  assert "configs/demo_cpu.yaml" in str(e.value)
  with pytest.raises(ValueError, match=rf"\.{field}(\[0\])?: 'bogus' is not one of"):   # configs built in code too
    cls(**{field: ("bogus",) if is_tuple else "bogus"})


def test_midtrain_stage_mesh_overrides_the_run_axes_only():
  cfg = load_config("configs/demo_cpu.yaml", [
      "mesh.distributed=true", "midtrain.stages=[{seq_len: 128, steps: 1}, "
      "{seq_len: 256, steps: 1, mesh: {data: 1, fsdp: -1, context: 2}}]"])
  first, second = (stage_mesh(cfg.mesh, s.mesh) for s in cfg.midtrain.stages)
  assert first == cfg.mesh and cfg.midtrain.stages[0].mesh is None
  assert (second.data, second.fsdp, second.tensor, second.context, second.distributed) == (1, -1, 1, 2, True)
  assert from_dict(Config, to_dict(cfg)) == cfg


def test_longcat_config_uses_context_parallelism_for_long_stages():
  cfg = load_config("configs/longcat_flash_loza.yaml")
  meshes = {s.seq_len: stage_mesh(cfg.mesh, s.mesh) for s in cfg.midtrain.stages}
  assert meshes[32768] == cfg.mesh and cfg.mesh.context == 1
  for seq_len in (131072, 262144):
    m = meshes[seq_len]
    assert (m.data, m.fsdp, m.tensor, m.context) == (1, -1, 8, 8)
    check_split(seq_len, Layout(m.context, "zigzag"), cfg.attention.block_size,
                cfg.attention.sink_blocks * cfg.attention.block_size)
