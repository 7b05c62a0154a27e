"""Both notebooks run from top to bottom against a run that is not the demo's: trained on colour
shards and evaluated on colour sets built here, so the notebooks must read the run's own sets.

The kernel is ipykernel's own spec for the interpreter running the tests (see
:func:`kernel_manager`), so the notebooks import the same mmggem as the tests,
whatever kernels are installed for the user or the system. Each notebook is
executed once per test module; the tests read its printed lines and displayed
images and check them against the run's files and direct computations.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch
from conftest import cpu_env, records, run_cli, train_args
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient

import mmggem
from mmggem.experiments import analysis
from mmggem.data.fashion_mnist import _png
from mmggem.data.write import ClassSample, RetrievalSample, write_classification_set, write_retrieval_set
from mmggem.evaluate.dataset import open_eval_set, read_image

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
CELL_TIMEOUT_S = 300


def kernel_manager() -> AsyncKernelManager:
    """A kernel manager for the kernel "python3" that runs *this* interpreter (``sys.executable``).

    A ``KernelSpecManager`` with no kernel folders finds no installed spec, so none
    (user, system or another environment's) can shadow the name "python3";
    jupyter_client then uses ipykernel's native spec, which ipykernel builds in
    this process as ``[sys.executable, "-m", "ipykernel_launcher", ...]``.
    Nothing is installed or registered anywhere.
    """
    return AsyncKernelManager(kernel_name="python3", kernel_spec_manager=KernelSpecManager(kernel_dirs=[]))


def execute(name: str, run_dir: Path) -> nbformat.NotebookNode:
    """Run ``notebooks/NAME`` in a fresh kernel started in ``notebooks/``, with ``MMGGEM_RUN_DIR=run_dir``."""
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    manager = kernel_manager()
    assert manager.kernel_spec.argv[0] == sys.executable
    client = NotebookClient(notebook, km=manager, timeout=CELL_TIMEOUT_S,
                            resources={"metadata": {"path": str(NOTEBOOKS)}})
    # cleanup_kc: nbclient shuts down only kernels of managers it made itself; this one is ours
    client.execute(env=cpu_env(MMGGEM_RUN_DIR=str(run_dir)), cleanup_kc=True)
    return notebook


def printed(notebook: nbformat.NotebookNode) -> str:
    """Everything the notebook's code cells printed to stdout."""
    return "".join(output.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                   for output in cell.outputs if output.output_type == "stream" and output.name == "stdout")


def images_shown(notebook: nbformat.NotebookNode) -> int:
    """How many PNG images the notebook displayed."""
    return sum("image/png" in output.get("data", {}) for cell in notebook.cells if cell.cell_type == "code"
               for output in cell.outputs)


def number(pattern: str, text: str) -> float:
    match = re.search(pattern, text)
    assert match, f"{pattern!r} not found in:\n{text}"
    return float(match.group(1))


COLOURS = ("red", "green", "blue", "yellow", "violet")
SET_SIZE = 40


def colour_image(label: int, rng: np.random.Generator) -> np.ndarray:
    """A noisy 28x28 RGB image of the brightness of ``label``, as in the training shards of ``train_shards``."""
    return (rng.random((28, 28, 3)) * 60 + label * 45).astype(np.uint8)


@pytest.fixture(scope="module")
def colour_run(train_shards: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run that is not the demo's: trained on colour shards, evaluated on colour sets built here."""
    root = tmp_path_factory.mktemp("colour_run")
    rng = np.random.default_rng(7)
    labels = [int(label) for label in rng.integers(0, len(COLOURS), SET_SIZE)]
    images = [colour_image(label, rng) for label in labels]
    (root / "colours").mkdir()
    (root / "colour-captions").mkdir()
    write_classification_set(root / "colours", (ClassSample(_png(i), l) for i, l in zip(images, labels)), COLOURS,
                             templates=["a photo of colour {c}."])
    write_retrieval_set(root / "colour-captions", (RetrievalSample(_png(i), [f"a photo of colour {l}", COLOURS[l]])
                                                   for i, l in zip(images, labels)))
    (root / "labels.json").write_text(json.dumps(labels))
    run = root / "run"
    result = run_cli(*train_args(train_shards, run, "train.steps=4", "log.every=2", "data.workers=0",
                                 f"eval.datasets=[{root / 'colours'}, {root / 'colour-captions'}]"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run


@pytest.fixture(scope="module")
def quickstart(colour_run: Path) -> nbformat.NotebookNode:
    return execute("quickstart.ipynb", colour_run)


@pytest.fixture(scope="module")
def ggem_analysis(colour_run: Path) -> nbformat.NotebookNode:
    return execute("ggem_analysis.ipynb", colour_run)


@pytest.mark.parametrize("name", ["quickstart.ipynb", "ggem_analysis.ipynb"])
def test_notebooks_are_stored_without_outputs(name: str) -> None:
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(cell.outputs == [] and cell.execution_count is None for cell in code)
    assert notebook.metadata.kernelspec.name == "python3"


def final_evaluation(run: Path) -> dict:
    return records(run)[-1]


def test_quickstart_accuracy_is_the_runs_evaluation(quickstart: nbformat.NotebookNode, colour_run: Path) -> None:
    text = printed(quickstart)
    assert f"loaded ViT-Ti-4-28 (ggem pooling) from {colour_run / 'final'}" in text
    accuracy = number(rf"zero-shot top-1 on the {SET_SIZE} images of colours: ([0-9.]+)", text)
    assert accuracy == pytest.approx(final_evaluation(colour_run)["eval/colours/acc1"], abs=5e-5)


def test_quickstart_shows_the_runs_images_with_their_predictions(quickstart: nbformat.NotebookNode,
                                                                  colour_run: Path) -> None:
    labels = json.loads((colour_run.parent / "labels.json").read_text())
    names = "|".join(COLOURS)
    lines = re.findall(rf"image (\d+): predicted ({names}) \((\d+)%\), true ({names})\n", printed(quickstart))
    assert len(lines) == 16 and len({index for index, *_ in lines}) == 16
    for index, _, percent, true in lines:
        assert true == COLOURS[labels[int(index)]]
        assert 20 <= int(percent) <= 100  # the top one of five class probabilities
    assert images_shown(quickstart) == 2  # the prediction grid and the retrieval grid


def test_quickstart_retrieves_the_best_matching_images(quickstart: nbformat.NotebookNode, colour_run: Path) -> None:
    match = re.search(r"top 8 images of colour-captions for '(.+)': \[([\d, ]+)\]", printed(quickstart))
    assert match, printed(quickstart)
    caption, shown = match.group(1), [int(i) for i in match.group(2).split(",")]
    labels = json.loads((colour_run.parent / "labels.json").read_text())
    assert caption == f"a photo of colour {labels[0]}"  # the first caption of the set's first image
    # Score every image of the set directly: the shown ones are the best, best first.
    evalset = open_eval_set(colour_run.parent / "colour-captions")
    model, preprocess, tokenizer = mmggem.load(colour_run / "final")
    with torch.inference_mode():
        images = model.encode_image(torch.stack([preprocess(read_image(s)) for s in evalset.samples]))
        text = model.encode_text(tokenizer([caption]))
    scores = (torch.nn.functional.normalize(text, dim=-1) @ torch.nn.functional.normalize(images, dim=-1).T)[0]
    ranked = scores[shown]
    assert torch.all(ranked[:-1] >= ranked[1:] - 1e-6)
    others = [i for i in range(SET_SIZE) if i not in shown]
    assert ranked[-1] >= scores[others].max() - 1e-6


def test_analysis_plots_p_for_every_logged_step(ggem_analysis: nbformat.NotebookNode, colour_run: Path) -> None:
    text = printed(ggem_analysis)
    logged = [record["step"] for record in records(colour_run) if "train/loss" in record]
    assert f"p logged at {len(logged)} steps ({logged[0]} to {logged[-1]})" in text
    final = re.search(r"final p per group: ([\d. ]+)\n", text)
    model, _, _ = mmggem.load(colour_run / "final")
    expected = model.visual.pooler.p.detach().clamp(min=1.0).numpy()
    assert final and np.allclose([float(p) for p in final.group(1).split()], expected, atol=5e-4)


def test_analysis_reports_pooled_values_and_dependence(ggem_analysis: nbformat.NotebookNode) -> None:
    text = printed(ggem_analysis)
    assert f"tokens ({SET_SIZE}, 49, 192)" in text  # every image of the run's classification set
    groups = re.findall(r"group (\d) \(p = [\d.]+\): GAP mean -?[\d.]+, GGeM, p = 1 mean [\d.]+, "
                        r"GGeM, learned p mean [\d.]+; (\d+)% of GGeM values at eps", text)
    assert [int(g) for g, _ in groups] == list(range(6))
    for name in (analysis.GAP, analysis.CLAMPED, analysis.LEARNED):
        between = number(rf"{re.escape(name)}: mean \|corr\| between heads ([\d.]+)", text)
        within = number(rf"{re.escape(name)}: mean \|corr\| between heads [\d.]+, within heads ([\d.]+)", text)
        assert 0 < between < 1 and 0 < within < 1
    # p over training, the per-group histograms, the dependence matrices and the bar chart
    assert images_shown(ggem_analysis) == 4
