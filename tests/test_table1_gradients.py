"""experiments/table1_gradients.py on hand-made run directories (known answers)."""
import json

import numpy as np

from experiments import table1_gradients as tg


def _run(tmp_path, name, curves, heldout):
  d = tmp_path / name
  d.mkdir()
  (d / "curves.json").write_text(json.dumps(curves))
  (d / "per_user.json").write_text(json.dumps([{"dennl": {"T50": h}, "conventional_em": {"T50": e}}
                                               for h, e in heldout]))
  return str(d)


def test_time_to_accuracy_of_the_selected_candidate(tmp_path):
  # Two DENNL candidates in seed 0: the second validates better (lower score) and is the one
  # kept; an Initial Fusion candidate is ignored.  Entries: [step, -accuracy, CPU s].
  kept = [[0, -0.85, 0.5], [25, -0.885, 60.0], [50, -0.905, 70.0]]
  curves = {"0": {"T50": {"dennl[likelihood,lr=0.003]": {"validation": [[0, -0.85, 0.4],
                                                                          [25, -0.87, 50.0]]},
                          "dennl[heldout,lr=0.003]": {"validation": kept},
                          "initial_fusion[heldout,lr=0.003]": {"validation": [[0, -0.99, 1.0]]}}},
            "1": {"T50": {"dennl[heldout,lr=0.003]": {"validation": [[0, -0.86, 0.5],
                                                                       [25, -0.89, 40.0]]}}}}
  selected = tg.candidate_curves(curves, "T50")
  np.testing.assert_allclose(selected["0"], [(0, 85.0, 0.5), (25, 88.5, 60.0), (50, 90.5, 70.0)])
  assert tg.first_reaching(selected["0"], 88.0) == 60.0
  assert tg.first_reaching(selected["0"], 91.0) is None
  directory = _run(tmp_path, "exact", curves, [([1.0, 0.8], [0.5, 0.8]), ([0.9, 0.9], [0.9, 0.9])])
  result = tg.compare({"exact": directory}, "T50", [88.0, 90.0], num_bootstrap=200)["exact"]
  assert result["n_seeds"] == 2
  np.testing.assert_allclose(result["heldout_accuracy"], 100 * np.mean([0.9, 0.9]))
  np.testing.assert_allclose(result["best_validation"], np.mean([90.5, 89.0]))
  assert result["cpu_seconds_to"]["88"] == np.median([60.0, 40.0])
  assert result["cpu_seconds_to"]["90"] is None          # seed 1 never got there
  # DENNL - Conventional EM pooled over seeds x users: (0.5 + 0 + 0 + 0) / 4 = 12.5 points.
  np.testing.assert_allclose(result["paired"]["conventional_em"]["mean"], 12.5)
  lines = tg.markdown({"exact": result}, "T50", [88.0, 90.0])
  assert any(line.startswith("| exact | 2 | 90.0 | +12.5 [") for line in lines)
  # Two directories joined by '+' pool their seeds.
  again = _run(tmp_path, "more", curves, [([1.0, 1.0], [0.0, 0.0])] * 2)
  pooled = tg.compare({"exact": directory + "+" + again}, "T50", [88.0], num_bootstrap=200)
  assert pooled["exact"]["n_seeds"] == 4 and len(pooled["exact"]["curves"]) == 4
