"""Layer selection for each strategy and ratio, and its errors."""
import pytest

from loza_jax.sparsity import num_to_select, select_layers


@pytest.mark.parametrize("ratio,n,k", [(0.5, 8, 4), (0.0, 8, 0), (1.0, 8, 8), (0.25, 6, 2), (0.5, 5, 3), (0.1, 4, 0)])
def test_count(ratio, n, k):
  assert num_to_select(ratio, n) == k


def test_alpha_picks_lowest():
  alphas = [0.9, 0.1, 0.5, 0.05, 0.7, 0.3]
  sel = select_layers("alpha", 6, 0.5, alphas=alphas)
  assert sel.ssa_layers == (1, 3, 5)
  assert sel.layer_types() == ("full", "ssa", "full", "ssa", "full", "ssa")
  assert select_layers("alpha", 6, 1 / 6, alphas=alphas).ssa_layers == (3,)


def test_alpha_per_head_uses_layer_mean():
  alphas = [[1.0, 1.0], [0.0, 0.2], [0.5, 0.5], [0.9, 0.0]]
  assert select_layers("alpha", 4, 0.5, alphas=alphas).ssa_layers == (1, 3)


def test_random_is_seeded_and_sized():
  a = select_layers("random", 10, 0.3, seed=1)
  assert a == select_layers("random", 10, 0.3, seed=1)
  assert len(a.ssa_layers) == 3 and len(set(a.ssa_layers)) == 3
  assert any(select_layers("random", 10, 0.3, seed=s).ssa_layers != a.ssa_layers for s in range(2, 6))


def test_alternating_and_manual():
  assert select_layers("alternating", 6, 0.5).ssa_layers == (1, 3, 5)
  assert select_layers("alternating", 6, 2 / 3).ssa_layers == (0, 1, 3, 5)
  assert select_layers("manual", 4, manual=[3, 0]).ssa_layers == (0, 3)


@pytest.mark.parametrize("kwargs,match", [
    (dict(strategy="best", num_sublayers=4), "unknown 'best'"),
    (dict(strategy="alpha", num_sublayers=4, ratio=1.5, alphas=[1, 1, 1, 1]), r"ratio must be in \[0, 1\]"),
    (dict(strategy="alpha", num_sublayers=4), "needs calibrated alphas"),
    (dict(strategy="alpha", num_sublayers=4, alphas=[1, 0, 1]), "3 alphas for 4 attention sublayers"),
    (dict(strategy="manual", num_sublayers=4, manual=[4]), r"\[4\] out of range"),
    (dict(strategy="manual", num_sublayers=4), "needs a list"),
])
def test_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    select_layers(**kwargs)
