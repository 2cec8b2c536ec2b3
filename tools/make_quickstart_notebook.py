"""Regenerate notebooks/quickstart.ipynb (run from the repo root): python tools/make_quickstart_notebook.py"""
import nbformat as nbf

nb = nbf.v4.new_notebook()
md, code = nbf.v4.new_markdown_cell, nbf.v4.new_code_cell
nb.cells = [
md("""# loza-jax quickstart: from a full-attention MLA model to a LoZA sparse model

This notebook walks the LoZA path with the library API on the tiny demo config (it runs on a laptop
CPU in about a minute): train a small full-attention model, **calibrate** one α per attention
sublayer, look at the α's, **sparsify** the lowest half into Streaming Sparse Attention, and
**evaluate** both models side by side. The command-line stages (`python -m train.<stage>`) do the
same with progress bars, checkpoints and logs; `make demo` runs them all."""),
code("""import os, tempfile
from pathlib import Path
import numpy as np
import jax
from loza_jax.config import load_config, replace
from train.trainer import Trainer
from train import data as data_lib
from loza_jax.model_dir import save_model

QUICK = os.environ.get("LOZA_NOTEBOOK_QUICK", "1") == "1"   # tests set 1; set 0 for a longer, better run
work = Path(tempfile.mkdtemp(prefix="loza_quickstart_"))
cfg = load_config("../configs/demo_cpu.yaml", [
    f"train.steps={10 if QUICK else 200}", "train.progress=false", "train.log_every=10",
    f"train.run_dir={work / 'pretrain'}", "calibrate.steps=10" if QUICK else "calibrate.steps=40",
    "evaluate.lengths=[256]" if QUICK else "evaluate.lengths=[256, 512]", "evaluate.samples=1", "evaluate.ppl_rows=2",
])
print(cfg.model.num_hidden_layers, "layers, SSA:", cfg.attention.block_size, "tokens per block,",
      cfg.attention.sink_blocks, "sink +", cfg.attention.local_blocks, "local blocks")"""),
md("## 1. A full-attention model to convert\n\nHere we pretrain one for a few steps; with real checkpoints you would `load_model` one imported from HuggingFace."),
code("""trainer = Trainer(cfg, print_fn=print)
batches = iter(data_lib.build_dataset(cfg, cfg.train.batch_size))
result = trainer.fit(batches)
full_dir = save_model(work / "full", jax.device_get(trainer.state.params), cfg)
print("final training loss", round(result.last_metrics["loss"], 3), "->", full_dir)"""),
md("## 2. Calibrate: every sublayer becomes α·full + (1−α)·SSA, only α trains"),
code("""from train.calibrate import calibrate, markdown, plot_alphas
cal_cfg = replace(cfg, **{"train.run_dir": str(work / "calibrate")})
summary = calibrate(cal_cfg, full_dir)
print(markdown(summary))"""),
code("""from IPython.display import Image
Image(filename=str(work / "calibrate" / "alpha.png"))"""),
md("## 3. Sparsify: the lowest-α half of the sublayers become SSA"),
code("""from train.sparsify import sparsify
sp_cfg = replace(cfg, **{"sparsify.calibration": str(work / "calibrate" / "calibration.json")})
sparse_dir, selection = sparsify(sp_cfg, full_dir, work / "sparse")
print(selection["layer_types"], "ZigZag layer_type:", selection["zigzag_layer_type"])"""),
md("## 4. Evaluate side by side\n\nPerplexity on held-out text and the synthetic long-context suite. The sparse model would next be mid-trained (`train.midtrain`) to recover what sparsity costs."),
code("""from train.evaluate import evaluate
ev_cfg = replace(cfg, **{"train.run_dir": str(work / "eval")})
out = evaluate(ev_cfg, [str(full_dir), str(sparse_dir)], ["full", "loza-sparse"], progress=False)
print(out["markdown"])
ppl = {n: r["perplexity"]["ppl"] for n, r in out["results"].items()}
assert all(np.isfinite(v) for v in ppl.values())"""),
code("""Image(filename=str(work / "eval" / "perplexity_by_position.png"))"""),
]
nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
nbf.write(nb, "notebooks/quickstart.ipynb")
