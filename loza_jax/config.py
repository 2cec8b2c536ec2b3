"""Typed, frozen configuration: dataclasses, YAML loading, `--set a.b=c` overrides, validation.

Field names mirror HuggingFace's where one exists, so checkpoint conversion is a rename.
Every error names the offending key (dotted path) and, when loaded from disk, the file.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

# The allowed values of each string-choice field: the Literal on the field is their one list (check_choices).
LayerType = Literal["full", "ssa", "blend"]
Architecture = Literal["loza", "longcat_flash", "deepseek_v3"]
DType = Literal["float32", "bfloat16", "float16"]
MoeImpl = Literal["ragged", "dense"]                  # sorted grouped matmul | every expert on every token
Granularity = Literal["layer", "head"]                # one blend alpha per layer | per head
DataSource = Literal["stdlib", "files"]
RetrievalTask = Literal["passkey", "multikey", "multivalue", "vartrack"]
LossSpan = Literal["answer", "all"]                   # loss on answer tokens only | on every token
Objective = Literal["distill", "lm"]
Strategy = Literal["alpha", "random", "alternating", "manual"]
Answers = Literal["generate", "teacher_forced"]

DTYPES = typing.get_args(DType)
RETRIEVAL_TASKS = typing.get_args(RetrievalTask)
MESH_AXES = ("data", "fsdp", "tensor", "context")


@functools.cache
def _hints(cls) -> dict[str, Any]:
  return typing.get_type_hints(cls)


def _check_choice(value: Any, tp: Any, key: str) -> None:
  """ValueError naming `key` when `value` (or an element of a tuple value) is not in its Literal type."""
  origin = typing.get_origin(tp)
  if origin is Literal:
    if value not in typing.get_args(tp):
      raise ValueError(f"{key}: {value!r} is not one of {list(typing.get_args(tp))}")
  elif origin in (typing.Union, types.UnionType) and value is not None:
    inner = [a for a in typing.get_args(tp) if a is not type(None)]
    if len(inner) == 1:
      _check_choice(value, inner[0], key)
  elif origin is tuple and isinstance(value, tuple):
    (elem,) = [a for a in typing.get_args(tp) if a is not Ellipsis]
    for i, v in enumerate(value):
      _check_choice(v, elem, f"{key}[{i}]")


def check_choices(cfg, section: str) -> None:
  """Check every Literal-typed field of dataclass `cfg` (errors name `section.field`): also configs built in code."""
  for name, tp in _hints(type(cfg)).items():
    _check_choice(getattr(cfg, name), tp, f"{section}.{name}")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """YaRN RoPE scaling with DeepSeek-V3 / HuggingFace semantics."""
  type: Literal["yarn"] = "yarn"
  factor: float = 1.0
  original_max_position_embeddings: int = 4096
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  mscale: float = 1.0
  mscale_all_dim: float = 0.0
  attention_factor: float | None = None   # overrides the mscale ratio when set
  truncate: bool = True                   # round the correction range to whole dims

  def __post_init__(self):
    check_choices(self, "rope_scaling")
    if self.factor < 1.0:
      raise ValueError(f"rope_scaling.factor must be >= 1, got {self.factor}")
    if self.original_max_position_embeddings < 1:
      raise ValueError("rope_scaling.original_max_position_embeddings must be >= 1")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Decoder-only MLA transformer (DeepSeek-V3 / LongCat-Flash naming)."""
  architecture: Architecture = "loza"
  vocab_size: int = 256
  hidden_size: int = 128
  intermediate_size: int = 384
  num_hidden_layers: int = 4
  num_attention_heads: int = 4
  num_key_value_heads: int | None = None   # None = num_attention_heads (MLA default)
  q_lora_rank: int = 0                     # 0 = direct q projection
  kv_lora_rank: int = 64
  qk_nope_head_dim: int = 32
  qk_rope_head_dim: int = 16
  v_head_dim: int = 32
  rope_theta: float = 10000.0
  rope_interleave: bool = True             # rotate (x[2i], x[2i+1]) pairs, as DeepSeek-V3 weights expect
  rope_scaling: RopeScaling | None = None
  max_position_embeddings: int = 4096
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = False
  initializer_range: float = 0.02
  dtype: DType = "float32"                 # compute dtype
  param_dtype: DType = "float32"
  remat: bool = False                      # rematerialise each decoder layer in the backward pass
  # Real architectures (HF names). MoE: DeepSeek-V3 and LongCat-Flash; 0 routed experts = dense MLPs only.
  n_routed_experts: int = 0
  num_experts_per_tok: int = 0             # top-k (LongCat: moe_topk)
  moe_intermediate_size: int = 0           # per-expert width (LongCat: expert_ffn_hidden_size)
  n_shared_experts: int = 0                # DeepSeek-V3 shared experts, fused into one MLP
  first_k_dense_replace: int = 0           # DeepSeek-V3: the first k layers use a dense MLP
  n_group: int = 1                         # DeepSeek-V3 group-limited routing
  topk_group: int = 1
  routed_scaling_factor: float = 1.0
  norm_topk_prob: bool = False
  zero_expert_num: int = 0                 # LongCat-Flash identity ("zero-computation") experts
  moe_impl: MoeImpl = "ragged"             # ragged (sorted grouped matmul) | dense (every expert on every token)
  moe_token_chunk: int = 0                 # route and run experts on this many tokens at a time; 0 = all at once
  mla_scale_q_lora: bool = False           # LongCat-Flash: scale the q latent by sqrt(hidden/q_lora_rank)
  mla_scale_kv_lora: bool = False          # ... and the kv latent by sqrt(hidden/kv_lora_rank)
  latent_norm_eps: float | None = None     # eps of q_a/kv_a_layernorm; None = rms_norm_eps (HF uses 1e-6)

  def __post_init__(self):
    check_choices(self, "model")
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "kv_lora_rank", "qk_rope_head_dim", "v_head_dim", "max_position_embeddings"):
      if getattr(self, name) < 1:
        raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
    if self.qk_nope_head_dim < 0 or self.q_lora_rank < 0:
      raise ValueError("model.qk_nope_head_dim and model.q_lora_rank must be >= 0")
    if self.qk_rope_head_dim % 2:
      raise ValueError(f"model.qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")
    if self.num_attention_heads % self.kv_heads:
      raise ValueError(f"model.num_key_value_heads={self.kv_heads} must divide "
                       f"model.num_attention_heads={self.num_attention_heads}")
    if self.moe_token_chunk < 0:
      raise ValueError(f"model.moe_token_chunk must be >= 0 (0 = all tokens at once), got {self.moe_token_chunk}")
    if self.architecture != "loza":
      _check_moe(self)

  @property
  def kv_heads(self) -> int:
    return self.num_key_value_heads or self.num_attention_heads

  @property
  def qk_head_dim(self) -> int:
    return self.qk_nope_head_dim + self.qk_rope_head_dim

  @property
  def attention_sublayers_per_layer(self) -> int:
    return 2 if self.architecture == "longcat_flash" else 1

  @property
  def num_attention_sublayers(self) -> int:
    return self.num_hidden_layers * self.attention_sublayers_per_layer


def _check_moe(c: "ModelConfig") -> None:
  """Validate the MoE fields of a deepseek_v3 / longcat_flash model."""
  if c.n_routed_experts < 1 or c.moe_intermediate_size < 1:
    raise ValueError(f"model.architecture={c.architecture!r} needs model.n_routed_experts >= 1 and "
                     f"model.moe_intermediate_size >= 1, got {c.n_routed_experts}, {c.moe_intermediate_size}")
  n_choices = c.n_routed_experts + c.zero_expert_num
  if not 1 <= c.num_experts_per_tok <= n_choices:
    raise ValueError(f"model.num_experts_per_tok must be in [1, {n_choices}], got {c.num_experts_per_tok}")
  if c.n_group < 1 or c.n_routed_experts % c.n_group or not 1 <= c.topk_group <= c.n_group:
    raise ValueError(f"model.n_group={c.n_group} must divide model.n_routed_experts={c.n_routed_experts} and "
                     f"1 <= model.topk_group={c.topk_group} <= n_group")
  if c.num_experts_per_tok > c.topk_group * (c.n_routed_experts // c.n_group) + c.zero_expert_num:
    raise ValueError(f"model.num_experts_per_tok={c.num_experts_per_tok} exceeds the experts in "
                     f"topk_group={c.topk_group} groups")
  if c.architecture == "longcat_flash" and c.q_lora_rank < 1:
    raise ValueError("model.q_lora_rank: longcat_flash always uses a q LoRA; set q_lora_rank >= 1")
  if c.architecture == "deepseek_v3" and c.zero_expert_num:
    raise ValueError("model.zero_expert_num: zero (identity) experts are a longcat_flash feature")
  if c.first_k_dense_replace < 0 or c.n_shared_experts < 0 or c.zero_expert_num < 0:
    raise ValueError("model.first_k_dense_replace, n_shared_experts and zero_expert_num must be >= 0")


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
  """Per-sublayer attention layout and the SSA pattern (README, "Attention API")."""
  layer_types: tuple[LayerType, ...] | None = None   # one per attention sublayer; None = all full
  block_size: int = 128
  sink_blocks: int = 1
  local_blocks: int = 7
  granularity: Granularity = "layer"           # blend alpha: one per layer, or one per head
  impl: str = "auto"                           # attention implementation (loza_jax.attention registry)

  def __post_init__(self):
    check_choices(self, "attention")
    if self.block_size < 1 or self.local_blocks < 1 or self.sink_blocks < 0:
      raise ValueError("attention: need block_size >= 1, local_blocks >= 1, sink_blocks >= 0; got "
                       f"{self.block_size}, {self.local_blocks}, {self.sink_blocks}")

  def types_for(self, n_sublayers: int) -> tuple[str, ...]:
    return self.layer_types if self.layer_types is not None else ("full",) * n_sublayers


@dataclasses.dataclass(frozen=True)
class MeshAxes:
  """Device mesh shape: one size per axis, -1 in at most one axis for the remaining devices."""
  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  context: int = 1

  def __post_init__(self):
    sizes = {a: getattr(self, a) for a in MESH_AXES}
    for axis, size in sizes.items():
      if size == 0 or size < -1:
        raise ValueError(f"mesh.{axis} must be a positive size or -1 (the rest), got {size}")
    if sum(size == -1 for size in sizes.values()) > 1:
      raise ValueError(f"mesh: at most one axis may be -1, got {sizes}")


@dataclasses.dataclass(frozen=True)
class MeshConfig(MeshAxes):
  """The run's mesh: its shape (MeshAxes) and multi-host start-up."""
  distributed: bool = False       # call jax.distributed.initialize() (also when LOZA_DISTRIBUTED=1)
  coordinator_address: str = ""   # host:port; empty = let JAX detect the cluster
  num_processes: int = 0          # 0 = detect
  process_id: int = -1            # -1 = detect


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Document source, tokenizer, packing and the synthetic retrieval mix (train/data.py)."""
  source: DataSource = "stdlib"     # stdlib (the interpreter's own .py files) | files
  paths: tuple[str, ...] = ()       # .jsonl / .txt / .parquet files or directories (source: files)
  text_key: str = "text"            # JSONL / Parquet field holding the document text
  tokenizer: str = "byte"           # byte | path to a HuggingFace tokenizer.json
  seq_len: int = 256                # packed row length; a multiple of attention.block_size
  chunk_bytes: int = 0              # split documents into pieces of this many bytes; 0 = seq_len tokens at the
                                    # tokenizer's bytes/token measured on training text
  retrieval_fraction: float = 0.0   # share of documents that are synthetic retrieval tasks
  retrieval_tasks: tuple[RetrievalTask, ...] = RETRIEVAL_TASKS
  retrieval_lengths: tuple[int, ...] = ()   # task lengths in tokens; () = seq_len
  retrieval_loss: LossSpan = "answer"   # answer: loss only on the answer span | all: on the whole task text
  passkey_digits: tuple[int, ...] = (7, 7)  # [min, max] digits of training passkeys (uniform, the top capped to
                                    # fit the task length); evaluation always asks for 7
  shuffle: bool = True
  prefetch_batches: int = 2         # whole batches packed ahead by a background thread; 0 = packed on demand
  heldout_fraction: float = 0.02    # share of whole documents (by a stable hash of their id) held out of
                                    # training for evaluation, whatever the seq_len; 0 = none
  seed: int = 0

  def __post_init__(self):
    check_choices(self, "data")
    if self.source == "files" and not self.paths:
      raise ValueError("data.paths: source 'files' needs at least one path (.jsonl, .txt, .parquet or a directory)")
    if self.seq_len < 2:
      raise ValueError(f"data.seq_len must be >= 2, got {self.seq_len}")
    if not 0.0 <= self.heldout_fraction < 1.0:
      raise ValueError(f"data.heldout_fraction must be in [0, 1) (0 = no held-out split), got {self.heldout_fraction}")
    if self.prefetch_batches < 0:
      raise ValueError(f"data.prefetch_batches must be >= 0, got {self.prefetch_batches}")
    if self.chunk_bytes < 0:
      raise ValueError(f"data.chunk_bytes must be >= 0, got {self.chunk_bytes}")
    if not 0.0 <= self.retrieval_fraction <= 1.0:
      raise ValueError(f"data.retrieval_fraction must be in [0, 1], got {self.retrieval_fraction}")
    if not self.retrieval_tasks:
      raise ValueError(f"data.retrieval_tasks: empty; choose from {list(RETRIEVAL_TASKS)}")
    too_long = [n for n in self.retrieval_lengths if not 1 <= n <= self.seq_len]
    if too_long:
      raise ValueError(f"data.retrieval_lengths: {too_long[0]} is not in [1, data.seq_len={self.seq_len}]")
    if len(self.passkey_digits) != 2 or not 1 <= self.passkey_digits[0] <= self.passkey_digits[1]:
      raise ValueError(f"data.passkey_digits: need [min, max] with 1 <= min <= max, got {list(self.passkey_digits)}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimisation, logging and checkpoint settings (train/trainer.py)."""
  run_dir: str = "runs/default"
  steps: int = 100
  batch_size: int = 8               # global rows per step (split over processes and data x fsdp)
  learning_rate: float = 3e-3       # peak of the warmup/cosine schedule
  min_lr_ratio: float = 0.1         # cosine decays to learning_rate * min_lr_ratio
  warmup_steps: int = 10
  decay_steps: int = 0              # cosine length incl. warmup; 0 = train.steps
  weight_decay: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  grad_clip: float = 1.0            # global-norm clip; 0 = off
  z_loss: float = 0.0               # weight of mean(logsumexp(logits)^2)
  trainable: str = ""               # regex on 'a/b/c' param paths; empty = all params
  seed: int = 0
  log_every: int = 10
  checkpoint_every: int = 100       # 0 = only at the end
  keep_checkpoints: int = 3
  async_checkpointing: bool = True
  resume: bool = True               # continue from the latest checkpoint in run_dir
  progress: bool = True             # tqdm bar (process 0)
  tensorboard: bool = True

  def __post_init__(self):
    for name in ("steps", "batch_size", "log_every", "keep_checkpoints"):
      if getattr(self, name) < 1:
        raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
    for name in ("warmup_steps", "decay_steps", "checkpoint_every", "weight_decay", "grad_clip", "z_loss"):
      if getattr(self, name) < 0:
        raise ValueError(f"train.{name} must be >= 0, got {getattr(self, name)}")
    if self.learning_rate <= 0:
      raise ValueError(f"train.learning_rate must be > 0, got {self.learning_rate}")
    if not 0.0 <= self.min_lr_ratio <= 1.0:
      raise ValueError(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
    if self.trainable:
      try:
        re.compile(self.trainable)
      except re.error as e:
        raise ValueError(f"train.trainable: {self.trainable!r} is not a valid regex ({e})") from None


@dataclasses.dataclass(frozen=True)
class CalibrateConfig:
  """Stage 1 (train/calibrate.py): train only the blend alphas of a frozen model."""
  init: str = ""                    # model directory to calibrate (the pipeline fills it in)
  objective: Objective = "distill"  # distill: MSE to the frozen full model's final hidden states | lm
  alpha_l1: float = 0.05            # weight of mean(alpha), pushing towards sparsity
  learning_rate: float = 0.02
  steps: int = 100
  warmup_steps: int = 0
  seq_len: int = 0                  # 0 = data.seq_len
  batch_size: int = 0               # 0 = train.batch_size
  ratio: float = 0.5                # share of sublayers previewed as SSA in calibration.json / alpha.png
  loss_mask: LossSpan = "answer"    # answer: fit only where the next token is a retrieval answer token | all:
                                    # every non-padding token
  retrieval_fraction: float = 1.0   # share of calibration documents that are retrieval tasks (calibrate.seq_len long)

  def __post_init__(self):
    check_choices(self, "calibrate")
    if not 0.0 <= self.retrieval_fraction <= 1.0:
      raise ValueError(f"calibrate.retrieval_fraction must be in [0, 1], got {self.retrieval_fraction}")
    if self.loss_mask == "answer" and self.retrieval_fraction == 0:
      raise ValueError("calibrate.loss_mask=answer needs retrieval tasks: calibrate.retrieval_fraction is 0")
    if self.steps < 1 or self.seq_len < 0 or self.batch_size < 0 or self.warmup_steps < 0:
      raise ValueError("calibrate: steps must be >= 1 and seq_len, batch_size, warmup_steps >= 0")
    if self.alpha_l1 < 0 or self.learning_rate <= 0:
      raise ValueError("calibrate: alpha_l1 must be >= 0 and learning_rate > 0")
    if not 0.0 <= self.ratio <= 1.0:
      raise ValueError(f"calibrate.ratio must be in [0, 1], got {self.ratio}")


@dataclasses.dataclass(frozen=True)
class SparsifyConfig:
  """Stage 2 (train/sparsify.py): choose the SSA sublayers and write the sparse model."""
  init: str = ""                    # model directory (weights to keep)
  calibration: str = ""             # calibration.json (strategy alpha)
  strategy: Strategy = "alpha"      # alpha | random | alternating | manual
  ratio: float = 0.5
  seed: int = 0                     # for strategy random
  layers: tuple[int, ...] = ()      # for strategy manual
  out: str = ""                     # output model directory; "" = <train.run_dir>/model

  def __post_init__(self):
    check_choices(self, "sparsify")
    if not 0.0 <= self.ratio <= 1.0:
      raise ValueError(f"sparsify.ratio must be in [0, 1], got {self.ratio}")


@dataclasses.dataclass(frozen=True)
class MidtrainStage:
  """One context-length stage of mid-training."""
  seq_len: int
  steps: int
  learning_rate: float = 1e-3
  warmup_steps: int = 0
  batch_size: int = 0                       # 0 = train.batch_size
  rope_scaling: RopeScaling | None = None   # e.g. YaRN factor growing with seq_len
  mesh: MeshAxes | None = None              # None = the run's mesh; else this stage's axis sizes (all four:
                                            # omitted axes take their defaults), e.g. context > 1 for long stages

  def __post_init__(self):
    if self.seq_len < 2 or self.steps < 1 or self.learning_rate <= 0 or self.batch_size < 0:
      raise ValueError(f"midtrain.stages: need seq_len >= 2, steps >= 1, learning_rate > 0; got {self}")


def stage_mesh(run: MeshConfig, stage: MeshAxes | None) -> MeshConfig:
  """The mesh a stage runs on: the stage's axis sizes, when it has them, with the run's multi-host start-up."""
  return run if stage is None else dataclasses.replace(run, **{a: getattr(stage, a) for a in MESH_AXES})


@dataclasses.dataclass(frozen=True)
class MidtrainConfig:
  """Stage 3 (train/midtrain.py): train all weights of the sparse model through context stages."""
  init: str = ""                            # sparse model directory
  stages: tuple[MidtrainStage, ...] = ()


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """Stage 4 (train/evaluate.py): perplexity and the synthetic long-context suite."""
  models: tuple[str, ...] = ()              # model directories, compared side by side
  names: tuple[str, ...] = ()               # labels (default: directory names)
  lengths: tuple[int, ...] = (256,)         # retrieval context lengths in tokens
  depths: tuple[float, ...] = (0.1, 0.5, 0.9)
  tasks: tuple[RetrievalTask, ...] = RETRIEVAL_TASKS
  samples: int = 4                          # examples per (task, length, depth) cell
  ppl_rows: int = 8                         # held-out rows per perplexity length
  ppl_lengths: tuple[int, ...] = ()         # perplexity on whole-length held-out pieces; () = evaluate.lengths
  ppl_buckets: int = 4                      # position buckets for perplexity
  batch_size: int = 8
  seed: int = 1234
  answers: Answers = "generate"             # generate: free greedy decoding through the KV cache | teacher_forced
  pad_to: int = 0                           # >0: every teacher-forced / perplexity forward pads its rows to a multiple
                                            # of this many tokens, so all lengths up to it share one compiled shape

  def __post_init__(self):
    check_choices(self, "evaluate")
    if self.names and len(self.names) != len(self.models):
      raise ValueError(f"evaluate.names has {len(self.names)} entries for {len(self.models)} evaluate.models")
    if any(n < 8 for n in self.lengths) or not all(0.0 <= d <= 1.0 for d in self.depths):
      raise ValueError("evaluate: lengths must be >= 8 tokens and depths in [0, 1]")
    if self.samples < 1 or self.ppl_rows < 0 or self.ppl_buckets < 1 or self.batch_size < 1:
      raise ValueError("evaluate: samples, ppl_buckets, batch_size must be >= 1 and ppl_rows >= 0")
    if any(n < 2 for n in self.ppl_lengths):
      raise ValueError(f"evaluate.ppl_lengths: every length must be >= 2 tokens, got {list(self.ppl_lengths)}")
    if self.pad_to < 0:
      raise ValueError(f"evaluate.pad_to must be >= 0 (0: no padding), got {self.pad_to}")


@dataclasses.dataclass(frozen=True)
class PretrainStage:
  """One stage of the pipeline's pretraining curriculum; None / 0 / () fields keep the data and train sections'."""
  seq_len: int
  steps: int
  batch_size: int = 0                           # 0 = train.batch_size
  learning_rate: float = 0.0                    # 0 = train.learning_rate
  warmup_steps: int = 0
  weight_decay: float | None = None             # None = train.weight_decay
  retrieval_fraction: float | None = None       # None = data.retrieval_fraction
  retrieval_lengths: tuple[int, ...] = ()       # () = data.retrieval_lengths
  passkey_digits: tuple[int, ...] = ()          # () = data.passkey_digits

  def __post_init__(self):
    if self.seq_len < 2 or self.steps < 1 or self.batch_size < 0 or self.learning_rate < 0 or self.warmup_steps < 0:
      raise ValueError(f"pipeline.pretrain_stages: need seq_len >= 2, steps >= 1 and batch_size, learning_rate, "
                       f"warmup_steps >= 0; got {self}")
    if self.weight_decay is not None and self.weight_decay < 0:
      raise ValueError(f"pipeline.pretrain_stages: weight_decay must be >= 0, got {self.weight_decay}")
    if self.retrieval_fraction is not None and not 0.0 <= self.retrieval_fraction <= 1.0:
      raise ValueError(f"pipeline.pretrain_stages: retrieval_fraction must be in [0, 1], got {self.retrieval_fraction}")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  """train/pipeline.py: the pretraining curriculum, the α-selection ratios and the baselines they are compared with."""
  random_seeds: int = 3             # random selections (seeds from sparsify.seed on, each a different selection)
  alternating: bool = True          # also the alternating selection
  pretrain_stages: tuple[PretrainStage, ...] = ()   # () = one train.pretrain run with the train and data sections;
                                    # else stage 0 pretrains from scratch and each later stage continues the model
  ratios: tuple[float, ...] = ()    # α-selected sparse models at each of these ratios; () = sparsify.ratio only
                                    # (random and alternating baselines stay at sparsify.ratio)
  eval_rope_scaling: RopeScaling | None = None   # also evaluate the full model with this YaRN ("full+yarn"), and
                                    # the α-selected mid-trained model when its last stage has none ("...+yarn"),
                                    # for lengths past their training
  target_full_beyond: float = 0.95  # the report's bar for the full model's exact match on `beyond` cases at
                                    # data.seq_len (the CPU demo's is 0.9)

  def __post_init__(self):
    if self.random_seeds < 0:
      raise ValueError(f"pipeline.random_seeds must be >= 0, got {self.random_seeds}")
    if not all(0.0 < r <= 1.0 for r in self.ratios) or len(set(self.ratios)) != len(self.ratios):
      raise ValueError(f"pipeline.ratios: need distinct ratios in (0, 1], got {list(self.ratios)}")
    if not 0.0 <= self.target_full_beyond <= 1.0:
      raise ValueError(f"pipeline.target_full_beyond must be in [0, 1], got {self.target_full_beyond}")


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything a run needs; `attention.layer_types` must match the model's sublayer count."""
  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  attention: AttentionConfig = dataclasses.field(default_factory=AttentionConfig)
  mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
  calibrate: CalibrateConfig = dataclasses.field(default_factory=CalibrateConfig)
  sparsify: SparsifyConfig = dataclasses.field(default_factory=SparsifyConfig)
  midtrain: MidtrainConfig = dataclasses.field(default_factory=MidtrainConfig)
  evaluate: EvalConfig = dataclasses.field(default_factory=EvalConfig)
  pipeline: PipelineConfig = dataclasses.field(default_factory=PipelineConfig)

  def __post_init__(self):
    n = self.model.num_attention_sublayers
    lt = self.attention.layer_types
    if lt is not None and len(lt) != n:
      raise ValueError(f"attention.layer_types has {len(lt)} entries but the model has {n} attention "
                       f"sublayers ({self.model.num_hidden_layers} layers x "
                       f"{self.model.attention_sublayers_per_layer})")

  @property
  def layer_types(self) -> tuple[str, ...]:
    return self.attention.types_for(self.model.num_attention_sublayers)


def check_pretrain_stages(cfg: Config) -> None:
  """ValueError unless every pipeline.pretrain_stages entry's data fits its seq_len, a multiple of the block size.

  Checked when a config is loaded (not in Config itself: stages such as calibrate replace data.seq_len)."""
  for i, stage in enumerate(cfg.pipeline.pretrain_stages):
    try:
      pretrain_stage_data(cfg.data, stage)
    except ValueError as e:
      raise ValueError(f"pipeline.pretrain_stages[{i}]: {e}") from None
    if stage.seq_len % cfg.attention.block_size:
      raise ValueError(f"pipeline.pretrain_stages[{i}].seq_len={stage.seq_len} must be a multiple of "
                       f"attention.block_size={cfg.attention.block_size}")


def pretrain_stage_data(data: DataConfig, stage: PretrainStage) -> DataConfig:
  """The data section of one pretraining stage (validated: its retrieval lengths must fit its seq_len)."""
  changes = {"seq_len": stage.seq_len}
  if stage.retrieval_fraction is not None:
    changes["retrieval_fraction"] = stage.retrieval_fraction
  if stage.retrieval_lengths:
    changes["retrieval_lengths"] = stage.retrieval_lengths
  if stage.passkey_digits:
    changes["passkey_digits"] = stage.passkey_digits
  return dataclasses.replace(data, **changes)


# ----------------------------------------------------------------------------------------
# Dict <-> dataclass with strict type checking.


_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _type_name(tp) -> str:
  return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
  """Check/convert a YAML value to the annotated type; raise ValueError naming `key`."""
  origin = typing.get_origin(tp)
  if origin in (typing.Union, types.UnionType):
    args = typing.get_args(tp)
    if value is None and type(None) in args:
      return None
    errors = []
    for arg in args:
      if arg is type(None):
        continue
      try:
        return _convert(value, arg, key)
      except ValueError as e:
        errors.append(str(e))
    raise ValueError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {tp}")
  if origin is Literal:
    _check_choice(value, tp, key)
    return value
  if dataclasses.is_dataclass(tp):
    if isinstance(value, tp):
      return value
    if not isinstance(value, dict):
      raise ValueError(f"{key}: expected a mapping for {tp.__name__}, got {type(value).__name__} {value!r}")
    return from_dict(tp, value, prefix=key)
  if origin is tuple:
    if not isinstance(value, (list, tuple)):
      raise ValueError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
    (elem,) = [a for a in typing.get_args(tp) if a is not Ellipsis]
    return tuple(_convert(v, elem, f"{key}[{i}]") for i, v in enumerate(value))
  if tp is bool:
    if not isinstance(value, bool):
      raise ValueError(f"{key}: expected true/false, got {type(value).__name__} {value!r}")
    return value
  if tp is int:
    if isinstance(value, bool) or not isinstance(value, int):
      raise ValueError(f"{key}: expected an integer, got {type(value).__name__} {value!r}")
    return value
  if tp is float:
    if isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
      value = float(value)   # YAML 1.1 reads "1e-4" (no dot) as a string
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ValueError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(float(value)):
      raise ValueError(f"{key}: expected a finite number, got {value!r}")
    return float(value)
  if tp is str:
    if not isinstance(value, str):
      raise ValueError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
    return value
  raise TypeError(f"{key}: unsupported annotation {_type_name(tp)}")


def from_dict(cls, data: dict, prefix: str = ""):
  """Build dataclass `cls` from a nested dict; unknown keys and wrong types raise ValueError."""
  hints = _hints(cls)
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(data) - fields)
  if unknown:
    where = f"{prefix}." if prefix else ""
    raise ValueError(f"unknown key {where}{unknown[0]!r} (valid keys{' of ' + prefix if prefix else ''}: "
                     f"{sorted(fields)})")
  kwargs = {name: _convert(v, hints[name], f"{prefix}.{name}" if prefix else name) for name, v in data.items()}
  try:
    return cls(**kwargs)
  except ValueError as e:
    raise ValueError(_where(str(e), prefix)) from None


def _where(message: str, prefix: str) -> str:
  """A nested section's own error ("mesh.context must ...") with its full key ("midtrain.stages[1].mesh.context")."""
  head, _, last = prefix.rpartition(".")
  if head and re.match(rf"{re.escape(last)}\b", message):
    return f"{head}.{message}"
  return message


def to_dict(cfg) -> dict:
  """Plain nested dict (tuples as lists) suitable for YAML/JSON."""
  def conv(x):
    if dataclasses.is_dataclass(x):
      return {f.name: conv(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, tuple):
      return [conv(v) for v in x]
    return x
  return conv(cfg)


def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...]) -> dict:
  """Apply `a.b=c` overrides (values parsed as YAML) to a nested dict, returning a new dict."""
  data = yaml.safe_load(yaml.safe_dump(data)) or {}
  set_by: dict[str, str] = {}          # dotted key -> the override that last set it
  for item in overrides:
    if "=" not in item:
      raise ValueError(f"--set {item!r}: expected key=value, e.g. train.steps=10")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
      raise ValueError(f"--set {item!r}: empty part in key {key.strip()!r}; expected e.g. train.steps=10")
    try:
      value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
      raise ValueError(f"--set {item!r}: the value is not valid YAML ({str(e).splitlines()[0]})") from None
    node = data
    for i, p in enumerate(parts[:-1]):
      node = node.setdefault(p, {})
      if not isinstance(node, dict):
        here = ".".join(parts[:i + 1])
        culprit = f"--set {set_by[here]!r} made it {node!r}" if here in set_by else f"it is {node!r} in the config"
        raise ValueError(f"--set {item!r}: {here!r} is not a section ({culprit})")
    is_section = isinstance(node.get(parts[0]), dict) or parts[0] in {f.name for f in dataclasses.fields(Config)}
    if len(parts) == 1 and is_section and not isinstance(value, dict):
      raise ValueError(f"--set {item!r}: {key.strip()!r} is a section, not a value; set a key inside it, e.g. "
                       f"{key.strip()}.<key>=...")
    node[parts[-1]] = value
    set_by[".".join(parts)] = item
  return data


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
  """Load a YAML config (None = defaults) with overrides; errors name the key and the file."""
  source = "<defaults>"
  data: dict = {}
  if path is not None:
    path = Path(path)
    if not path.is_file():
      raise FileNotFoundError(f"config file not found: {path} (try configs/demo_cpu.yaml)")
    source = str(path)
    try:
      data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
      raise ValueError(f"{source}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
      raise ValueError(f"{source}: top level must be a mapping of sections, got {type(data).__name__}")
  try:
    data = apply_overrides(data, overrides)
    cfg = from_dict(Config, data)
    check_pretrain_stages(cfg)
    return cfg
  except ValueError as e:
    raise ValueError(f"{source}: {e}") from None


def save_config(cfg: Config, path: str | Path) -> None:
  Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def replace(cfg, **changes):
  """dataclasses.replace that accepts dotted keys: replace(cfg, **{"attention.layer_types": (...)})."""
  nested: dict[str, dict] = {}
  direct = {}
  for k, v in changes.items():
    head, _, rest = k.partition(".")
    if rest:
      nested.setdefault(head, {})[rest] = v
    else:
      direct[k] = v
  for head, sub in nested.items():
    direct[head] = replace(getattr(cfg, head), **sub)
  return dataclasses.replace(cfg, **direct)
