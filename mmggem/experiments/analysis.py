"""Looking at a trained model from a notebook: finding a run, encoding images, and GGeM's analyses.

``notebooks/quickstart.ipynb`` and ``notebooks/ggem_analysis.ipynb`` call these
functions, so that the notebooks stay short and what they compute is tested.

The GGeM analyses (Ko et al., arXiv 2212.04114) are:

- :func:`p_trajectory`: the exponent ``p`` of every group at every logged step,
  read from the run's ``results.jsonl`` (the trainer logs ``train/pool_p/group_<g>``,
  the exponents as used in forward, which the optimizer keeps >= 1);
- :func:`pool_compare`: GAP (the mean of the tokens) and the model's own GGeM
  pooling of the *same* patch tokens, so the poolings differ in nothing else;
- :func:`head_dependence`: how strongly the pooled channels of different heads'
  channel groups co-vary across images, measured as the mean absolute Pearson
  correlation between channel pairs. The paper states that grouping channels by
  head "leads to lower head-wise dependence"; this is our own simple proxy for
  that dependence, not necessarily the measure the paper used.
"""
from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from ..train.records import PTrajectory, p_trajectory, read_records  # noqa: F401 - the notebooks call them from here

if TYPE_CHECKING:
    from matplotlib.figure import Figure

RUN_DIR_ENV = "MMGGEM_RUN_DIR"
DEFAULT_RUN_DIR = "runs/demo"
FINAL_MODEL = "final"
MIN_STD = 1e-8
"""A pooled channel whose standard deviation over the images is below this has no correlation: left out."""


# --- finding a run ----------------------------------------------------------------------------------


def find_run_dir(path: str | os.PathLike | None = None) -> Path:
    """The training output folder to analyse: the one that holds ``final/`` (the trained model).

    ``path`` defaults to ``$MMGGEM_RUN_DIR``, else ``runs/demo``. It may be a training
    output folder (``mmggem train``'s ``output_dir``) or an ``mmggem demo --output-dir``
    folder, whose run is in ``run/``. A relative path is looked up from the current
    folder and then from each folder above it, so the default finds the repository's
    ``runs/demo`` from a notebook started in ``notebooks/``.
    """
    given = Path(path if path is not None else os.environ.get(RUN_DIR_ENV, DEFAULT_RUN_DIR)).expanduser()
    for base in _look_up(given):
        for candidate in (base, base / "run"):
            if (candidate / FINAL_MODEL).is_dir():
                return candidate.resolve()
    where = "" if given.is_absolute() else " from the current folder and those above it"
    raise FileNotFoundError(
        f"no trained model for run folder {str(given)!r}: looked for {given / FINAL_MODEL} and "
        f"{given / 'run' / FINAL_MODEL}{where}; train one with `mmggem demo --output-dir {given}` "
        f"or set {RUN_DIR_ENV} to a training output folder"
    )


def _look_up(given: Path) -> list[Path]:
    """Where a relative path may be: from the current folder and each folder above it (absolute: itself)."""
    return [given] if given.is_absolute() else [folder / given for folder in (Path.cwd(), *Path.cwd().parents)]


def run_eval_folders(run_dir: str | os.PathLike) -> dict[str, Path | None]:
    """Each entry of the run's ``eval.datasets`` (from its ``config.yaml``) and the folder it names,
    looked up as :func:`find_run_dir` does, or None where no such folder is found from here."""
    import yaml

    config = yaml.safe_load((Path(run_dir) / "config.yaml").read_text()) or {}
    folders: dict[str, Path | None] = {}
    for entry in config.get("eval", {}).get("datasets", []):
        found = [path for path in _look_up(Path(entry).expanduser()) if path.is_dir()]
        folders[entry] = found[0] if found else None
    return folders


@dataclass(frozen=True)
class RunSet:
    """An evaluation set of a run, its images decoded: class labels and names, or captions, as the set gives them.

    ``images`` are ``[H, W, 3]`` uint8 arrays, in the set's sample order. ``classnames`` and ``templates``
    are those the evaluation uses (the set's own files, else the built-in ones of its name).
    """

    name: str
    path: Path
    images: list[np.ndarray]
    labels: np.ndarray | None = None
    classnames: tuple[str, ...] | None = None
    templates: tuple[str, ...] | None = None
    captions: list[tuple[str, ...]] | None = None


def run_eval_set(run_dir: str | os.PathLike, *kinds: str, limit: int | None = None) -> RunSet:
    """The first set in the run's ``eval.datasets`` of one of ``kinds`` (``classification``, ``retrieval``).

    Read from the run's ``config.yaml``, so a notebook shows the data the run was evaluated on;
    a relative set path is looked up as :func:`find_run_dir` does. ``limit`` keeps the first images only.
    """
    from ..data import formats
    from ..evaluate.dataset import open_eval_set, read_image
    from ..evaluate.metadata import resolve_metadata

    listed = run_eval_folders(run_dir)
    for folder in listed.values():
        kind = formats.read_dataset_type(folder) if folder is not None else None
        if kind not in kinds:
            continue
        evalset = open_eval_set(folder)
        samples = evalset.samples[:limit]
        images = [np.asarray(read_image(sample)) for sample in samples]
        if kind == formats.RETRIEVAL:
            return RunSet(evalset.name, folder, images, captions=[sample.captions for sample in samples])
        metadata = resolve_metadata(evalset.name, evalset.classnames, evalset.templates, source=str(folder))
        return RunSet(evalset.name, folder, images, np.array([sample.label for sample in samples]),
                      metadata.classnames, metadata.templates)
    config = Path(run_dir) / "config.yaml"
    raise FileNotFoundError(f"{config}: no {' or '.join(kinds)} set found among eval.datasets {list(listed)}; "
                            "evaluate the run on one (eval.datasets) to look at it here")


# --- images in, features out ------------------------------------------------------------------------


def model_inputs(images: np.ndarray, preprocess: Callable[[Image.Image], torch.Tensor]) -> torch.Tensor:
    """``[N, H, W]`` (grey) or ``[N, H, W, 3]`` uint8 images as a ``[N, 3, h, w]`` batch for the model.

    Each image goes through PIL as an RGB image and then ``preprocess``, exactly as an
    image read from an evaluation set does.
    """
    return torch.stack([preprocess(Image.fromarray(image).convert("RGB")) for image in images])


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def encode_images(model: torch.nn.Module, batch: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Normalised image embeddings ``[N, D]`` (on the CPU) of a preprocessed batch, in chunks."""
    device = _device(model)
    return torch.cat([model.encode_image(batch[i:i + batch_size].to(device), normalize=True).cpu()
                      for i in range(0, len(batch), batch_size)])


@torch.no_grad()
def encode_captions(model: torch.nn.Module, tokenizer: Callable[[list[str]], torch.Tensor],
                    captions: Sequence[str]) -> torch.Tensor:
    """Normalised text embeddings ``[len(captions), D]`` (on the CPU)."""
    return model.encode_text(tokenizer(list(captions)).to(_device(model)), normalize=True).cpu()


def zeroshot_classifier(model: torch.nn.Module, tokenizer: Callable[[list[str]], torch.Tensor],
                        classnames: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """The ``[D, K]`` zero-shot classifier of :mod:`mmggem.evaluate.zeroshot` (the one evaluation uses), on the CPU.

    Column k is the normalised mean of the normalised embeddings of ``templates``
    filled with ``classnames[k]`` (templates use ``{c}``), computed in float32.
    """
    from ..evaluate.dataset import Processes
    from ..evaluate.encode import Encoding
    from ..evaluate.metadata import ClassMetadata
    from ..evaluate.zeroshot import build_classifier

    encoding = Encoding(device=_device(model), amp=False, batch_size=256, num_workers=0, progress=False)
    metadata = ClassMetadata(tuple(classnames), tuple(templates))
    # build_classifier runs in inference mode; the clone is an ordinary tensor, usable anywhere
    return build_classifier(model, tokenizer, metadata, Processes(), encoding).float().cpu().clone()


# --- tokens and pooling ----------------------------------------------------------------------------------


def ggem_pooler(model: torch.nn.Module) -> torch.nn.Module:
    """The model's GGeM pooler (``model.visual.pooler``); ValueError naming the pooling when it is another."""
    from ..model.pooling import GGeM

    pooler = getattr(model.visual, "pooler", None)
    if not isinstance(pooler, GGeM):
        spec = getattr(model, "mmggem_spec", None)
        raise ValueError(f"the model pools with {spec.pooling if spec else type(pooler).__name__!r}, not ggem: "
                         "the GGeM analysis needs a model trained with pooling ggem")
    return pooler


@torch.no_grad()
def patch_tokens(model: torch.nn.Module, batch: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """The ``[N, T, C]`` tokens the image tower's pooler receives for a preprocessed batch (on the CPU)."""
    device = _device(model)
    return torch.cat([model.visual.forward_with_tokens(batch[i:i + batch_size].to(device))[1].float().cpu()
                      for i in range(0, len(batch), batch_size)])


GAP, CLAMPED, LEARNED = "GAP", "GGeM, p = 1", "GGeM, learned p"
"""The poolings :func:`pool_compare` applies to the same tokens."""


@torch.no_grad()
def pool_compare(pooler: torch.nn.Module, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Three poolings of the same ``[N, T, C]`` tokens, each ``[N, C]`` on the CPU.

    - ``GAP``: the mean of the tokens (average pooling);
    - ``GGeM, p = 1``: ``pooler`` with every exponent set to 1, i.e. the mean of the
      tokens clamped to ``eps``; it separates the effect of the clamp from that of p;
    - ``GGeM, learned p``: ``pooler`` itself, as the model pools.
    """
    clamped = copy.deepcopy(pooler)
    clamped.p.fill_(1.0)
    tokens = tokens.to(next(pooler.parameters()).device)
    return {GAP: tokens.mean(dim=1).float().cpu(), CLAMPED: clamped(tokens).float().cpu(),
            LEARNED: pooler(tokens).float().cpu()}


def group_values(pooled: torch.Tensor, groups: int) -> np.ndarray:
    """``[G, N * C/G]``: every pooled value of each contiguous channel group (for per-group distributions)."""
    count, channels = pooled.shape
    if channels % groups:
        raise ValueError(f"{channels} channels do not split into {groups} equal groups")
    grouped = pooled.detach().cpu().reshape(count, groups, channels // groups).transpose(0, 1)
    return grouped.reshape(groups, -1).numpy()


# --- head-wise dependence ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dependence:
    """Mean absolute correlation of pooled channels across images, by channel group (head).

    ``matrix[g, h]`` is the mean of ``|corr(channel i, channel j)|`` over channels i of
    group g and j of group h (i != j on the diagonal); ``between`` is that mean over all
    channel pairs in different groups, ``within`` over all pairs in the same group.
    ``constant_channels`` counts channels left out because they did not vary over the
    images (no correlation is defined for them).
    """

    matrix: np.ndarray  # [G, G]
    between: float
    within: float
    constant_channels: int


def head_dependence(pooled: torch.Tensor, groups: int) -> Dependence:
    """:class:`Dependence` of ``pooled`` (``[N, C]``, one row per image), C split into ``groups`` contiguous groups."""
    values = pooled.detach().double().cpu().numpy()
    count, channels = values.shape
    if channels % groups:
        raise ValueError(f"{channels} channels do not split into {groups} equal groups")
    if count < 3:
        raise ValueError(f"correlations over {count} images mean nothing: give at least 3")
    std = values.std(axis=0)
    kept = std >= MIN_STD
    if kept.sum() < 2:
        raise ValueError(f"only {int(kept.sum())} of {channels} pooled channels vary over the images")
    standard = (values[:, kept] - values[:, kept].mean(axis=0)) / std[kept]
    absolute = np.abs(standard.T @ standard / count)
    group = (np.arange(channels) // (channels // groups))[kept]
    distinct = ~np.eye(len(group), dtype=bool)
    matrix = np.full((groups, groups), math.nan)
    for g in range(groups):
        for h in range(groups):
            pairs = (group[:, None] == g) & (group[None, :] == h) & distinct
            if pairs.any():
                matrix[g, h] = absolute[pairs].mean()
    same = group[:, None] == group[None, :]
    return Dependence(
        matrix=matrix,
        between=float(absolute[~same].mean()) if (~same).any() else math.nan,
        within=float(absolute[same & distinct].mean()) if (same & distinct).any() else math.nan,
        constant_channels=int((~kept).sum()),
    )


# --- showing images -------------------------------------------------------------------------------------


def image_grid(images: np.ndarray, titles: Sequence[str], columns: int = 8,
               colors: Sequence[str] | None = None) -> "Figure":
    """A matplotlib figure showing ``images`` (uint8, grey or RGB) in a grid, each with its title."""
    import matplotlib.pyplot as plt

    if len(images) != len(titles):
        raise ValueError(f"{len(images)} images but {len(titles)} titles")
    rows = max(1, math.ceil(len(images) / columns))
    figure, axes = plt.subplots(rows, columns, figsize=(1.6 * columns, 1.9 * rows), squeeze=False)
    for index, axis in enumerate(axes.flat):
        axis.axis("off")
        if index < len(images):
            axis.imshow(images[index], cmap="gray" if images[index].ndim == 2 else None)
            axis.set_title(titles[index], fontsize=8, color=colors[index] if colors else "black")
    figure.tight_layout()
    return figure
