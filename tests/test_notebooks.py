"""Executes the Colab notebooks in quick mode in a fresh kernel of this interpreter.

The kernel spec is written into the test's temporary directory and points at ``sys.executable``
(no machine-wide kernel spec is assumed, so this works in CI's fresh environment). Each notebook
runs in its own temporary working directory with ``GROWJAX_NOTEBOOK_QUICK=1``; its outputs are
then checked independently of the notebook's own code: the quickstart checkpoint is restored
here and its shapes are checked against the widths and a closed-form parameter count, and the
growth notebook's final widths are rebuilt from its ``growth.jsonl`` records.
"""

import json
import os
import pathlib
import sys

import nbformat
import numpy as np
import optax
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

from growjax import train
from growjax.train.metrics import read_jsonl

NOTEBOOKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         "notebooks")
KERNEL = "growjax-test-python"


def _kernel_manager(tmp_path) -> KernelManager:
  kernel_dir = tmp_path / "kernels" / KERNEL
  kernel_dir.mkdir(parents=True)
  spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
          "display_name": "growjax test (this interpreter)", "language": "python"}
  (kernel_dir / "kernel.json").write_text(json.dumps(spec))
  ksm = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")])
  return KernelManager(kernel_name=KERNEL, kernel_spec_manager=ksm)


def _execute(name: str, tmp_path, monkeypatch):
  """Runs notebooks/<name>.ipynb in quick mode; returns (notebook, stdout text)."""
  work = tmp_path / "cwd"
  work.mkdir()
  monkeypatch.setenv("GROWJAX_NOTEBOOK_QUICK", "1")
  monkeypatch.setenv("GROWJAX_NOTEBOOK_WORKDIR", str(tmp_path / "workdirs"))
  monkeypatch.setenv("MPLBACKEND", "Agg")
  with open(os.path.join(NOTEBOOKS, f"{name}.ipynb"), encoding="utf-8") as f:
    book = nbformat.read(f, as_version=4)
  client = NotebookClient(book, km=_kernel_manager(tmp_path), timeout=300,
                          resources={"metadata": {"path": str(work)}})
  client.execute()
  text = []
  for cell in book.cells:
    for out in cell.get("outputs", []):
      if out.get("output_type") == "stream" and out.get("name") == "stdout":
        text.append(out["text"])
  return book, "\n".join(text)


def _summary(text: str, tag: str, tmp_path) -> tuple[dict, pathlib.Path]:
  """The notebook's summary line and its output folder (a fresh one under tmp_path)."""
  lines = [l for l in text.splitlines() if l.startswith(tag + " ")]
  assert len(lines) == 1, f"expected one {tag} line in the notebook output"
  summary = json.loads(lines[0][len(tag) + 1:])
  workdir = pathlib.Path(summary["workdir"])
  assert workdir.parent == tmp_path / "workdirs"
  return summary, workdir


def _images(book) -> int:
  return sum("image/png" in out.get("data", {}) for c in book.cells
             for out in c.get("outputs", []))


def _is_png(path) -> bool:
  with open(path, "rb") as f:
    return f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("name", ["quickstart", "growth"])
def test_committed_notebooks_are_clean_v4_with_a_guarded_install_cell(name):
  with open(os.path.join(NOTEBOOKS, f"{name}.ipynb"), encoding="utf-8") as f:
    raw = json.load(f)  # valid JSON
  assert raw["nbformat"] == 4
  book = nbformat.reads(json.dumps(raw), as_version=4)
  nbformat.validate(book)
  code = [c for c in book.cells if c.cell_type == "code"]
  assert all(not c.outputs and c.execution_count is None for c in code), "outputs not cleared"
  first = code[0].source
  assert 'find_spec("growjax") is None' in first and "pip" in first
  assert "GROWJAX_NOTEBOOK_QUICK" in "".join(c.source for c in code)


def test_quickstart_trains_grows_and_restores_the_grown_network(tmp_path, monkeypatch):
  book, text = _execute("quickstart", tmp_path, monkeypatch)
  s, workdir = _summary(text, "QUICKSTART_SUMMARY", tmp_path)
  # Growth happened (2 events of 4 units in quick mode, alternating sites) and the restore
  # rebuilt exactly the grown widths without being told them.
  assert s["growth_events"] == 2
  assert sum(s["grown_widths"]) - sum(s["seed_widths"]) == 2 * 4
  assert s["restored_widths"] == s["grown_widths"] != s["seed_widths"]
  assert s["identical_state"] is True
  assert s["max_output_change"] <= 1e-5  # zero fan-out preserves the function (float32)
  # Restore the notebook's checkpoint here: shapes follow the widths, and the parameter count
  # matches the closed form of an MLP 64-w0-w1-10.
  ckpt = train.Checkpointer(s["checkpoint_dir"])
  model, state, history, _ = ckpt.restore(optax.adam(3e-3))
  ckpt.close()
  w0, w1 = s["grown_widths"]
  assert tuple(model.widths) == (w0, w1) and len(history) == 2
  assert state.params["hidden_0"]["kernel"].shape == (64, w0)
  assert state.params["hidden_1"]["kernel"].shape == (w0, w1)
  assert state.params["head"]["kernel"].shape == (w1, 10)
  assert train.num_params(state) == s["params"] == 64 * w0 + w0 + w0 * w1 + w1 + w1 * 10 + 10
  # Adam moments were carried into the grown shapes.
  mu = state.opt_state[0].mu
  assert mu["hidden_0"]["kernel"].shape == (64, w0)
  assert _is_png(workdir / "train_curves.png")
  assert _images(book) >= 1
  assert 0.0 <= s["val_accuracy"] <= 1.0


@pytest.mark.slow  # ~40 s on the 2-core CPU: two growth rounds and three methods compile
def test_growth_notebook_grows_tabulates_and_compares_methods(tmp_path, monkeypatch):
  book, text = _execute("growth", tmp_path, monkeypatch)
  s, workdir = _summary(text, "GROWTH_SUMMARY", tmp_path)
  rounds = read_jsonl(workdir / "growth.jsonl")
  assert s["rounds"] == len(rounds) == 2  # quick schedule: rounds at steps 20 and 40
  assert [r["round"] for r in rounds] == [1, 2]
  # The final widths follow from the applied morphisms recorded per round.
  widths = list(s["seed_widths"])
  for r in rounds:
    for rec in r["records"]:
      if rec["op"] == "add_units":
        widths[int(rec["site"].split("_")[1])] += rec["k"]
  assert widths == s["final_widths"]
  assert s["final_params"] == 64 * widths[0] + widths[0] + widths[0] * 10 + 10
  # The per-round table and the candidate comparison were printed.
  assert "predicted" in text and "realised" in text and "damping" in text
  assert s["methods"] == ["gn", "gradmax", "tiny"]
  assert s["candidates"] == 3 * 1 * 2  # 3 methods x 1 site x k in (1, 2)
  # The comparison re-created round 1's state and statistics batch: same base loss as the
  # Grower logged before applying round 1.
  assert abs(s["compare_base_loss"] - rounds[0]["train_loss"]) < 1e-5
  for png in ("growth.png", "candidates.png", "train_curves.png"):
    assert _is_png(workdir / png)
  assert _images(book) >= 2
  assert np.isfinite(s["val_accuracy"])
