"""``mmggem export``: a self-contained model folder, ready for the Hugging Face Hub, from any model of a run.

The source is a run folder (its ``final/``), ``final/`` itself, any ``checkpoints/step_N``
(FSDP-sharded included; see :mod:`mmggem.checkpoint.runs`) or a model folder. The folder written holds
what :func:`mmggem.save_model` writes (safetensors weights, the config, a Hugging Face text
tower's config and tokenizer files) and a model card ``README.md`` (:mod:`mmggem.share.model_card`).
It is written under a temporary name and renamed into place, so it is complete or absent.

:func:`push_to_hub` uploads such a folder with huggingface_hub's ``upload_folder`` (token from
the usual places: ``HF_TOKEN``, ``hf auth login``); a failure (no network, no token, no rights)
is one line that says the folder is still there to push later.
"""
from __future__ import annotations

from pathlib import Path

from ..checkpoint.runs import load_source, locate
from ..errors import UserError
from ..fileio import atomic_directory
from ..model.clip import save_model
from .model_card import model_card, result_file_evaluations, run_evaluations

CARD_FILE = "README.md"


def export_model(source_path: str | Path, out: str | Path, *, results_dir: str | Path | None = None,
                 license: str = "other", repo_id: str | None = None, overwrite: bool = False) -> Path:
    """Write the model at ``source_path`` and its card to the folder ``out``; return ``out``.

    Args:
        results_dir: a folder of ``mmggem eval`` result JSONs; those computed on this model go into the card
            beside what the run logged.
        license: the card's ``license`` (a Hub licence id such as ``apache-2.0``; ``other`` by default).
        repo_id: the Hub repository it is meant for (the card's loading example names it).
        overwrite: replace a non-empty ``out`` (refused otherwise).
    """
    source = locate(source_path, suggest_all_checkpoints=False)  # an option of eval, not of export
    model, _, _ = load_source(source)
    evaluations = run_evaluations(source)
    if results_dir is not None:
        evaluations += result_file_evaluations(source, Path(results_dir))
    card = model_card(model, source, evaluations, license, repo_id)
    out = Path(out)
    with atomic_directory(out, overwrite=overwrite) as staging:
        save_model(model, staging)
        card.save(staging / CARD_FILE)
    return out


def push_to_hub(folder: str | Path, repo_id: str) -> str:
    """Upload ``folder`` to the Hub model repository ``repo_id`` (created if missing); return the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                                   commit_message="Upload model exported by mmggem")
    except Exception as error:  # network, authentication and Hub errors alike: the folder stays for a later push
        detail = (str(error).strip().splitlines() or [""])[0][:300]
        raise UserError(f"could not push {folder} to the Hub repository {repo_id} ({type(error).__name__}: {detail}); "
                        f"the exported folder is left in place: push it later with `hf upload {repo_id} {folder}`"
                        ) from error
    return commit.commit_url
