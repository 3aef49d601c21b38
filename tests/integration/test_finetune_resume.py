"""finetune: a run SIGKILLed after a checkpoint and run again ends with the uninterrupted run's weights, bit for bit,
in the same MLflow run.

Each run is `python -m pipelines.finetune` in its own folder, as DVC runs it, on a tiny random base and a few dozen
conversations: LoRA with dropout (its draws must come back with the step) and gradient accumulation (a checkpoint
must land on a step boundary). Both runs are the same program on the same machine and CPU threads, and a checkpoint
holds all the state (weights, AdamW's moments and step count; the data order and dropout seeds are functions of the
step), so the resumed run redoes exactly the arithmetic the uninterrupted one did: any difference is a bug, not
rounding. The uninterrupted run goes alongside the killed one, so the test costs two runs' time, not three.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipelines.common.layout import Layout
from tests.helpers.chat import write_chats, write_params
from tests.helpers.projects import make_project
from tests.helpers.services import copy_store
from tests.helpers.training import (
    finish,
    kill,
    mlflow_runs,
    newest_step,
    one_value_per_step,
    start,
    wait_for_checkpoint,
)

pytestmark = [pytest.mark.slow, pytest.mark.integration]

STEPS = 12  # ~0.1 s each: the kill lands long before the end
FINETUNE = dict(
    method="lora",
    max_steps=STEPS,
    grad_accum=2,
    checkpoint_every=4,
    val_every=4,  # a checkpoint at a validation step: the resumed run's curves must still hold that validation
    log_every=2,
    lora=dict(rank=4, alpha=8, dropout=0.1, targets=["q_proj", "v_proj"]),
)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A tiny base in artifacts/model, its tokenizer, data/chat and the params; no MLflow store yet."""
    root = make_project(tmp_path_factory.mktemp("finetune-resume"))
    write_chats(root / "data/chat")
    write_params(root, **FINETUNE)
    return root


def workdir(root: Path, project: Path, store: Path) -> Layout:
    """A copy of the project with its own MLflow store (a copy of the migrated one)."""
    shutil.copytree(project, root)
    copy_store(store, root)
    return Layout().under(root)


def test_sigkill_then_rerun_gives_the_uninterrupted_weights_in_the_same_mlflow_run(tmp_path, project, mlflow_template):
    ref, out = (workdir(tmp_path / name, project, mlflow_template) for name in ("uninterrupted", "killed"))
    uninterrupted = start("finetune", ref.root)
    proc = start("finetune", out.root)
    wait_for_checkpoint(out.finetune_checkpoints, proc, 4)
    kill(proc)
    killed_at = newest_step(out.finetune_checkpoints)
    assert killed_at < STEPS and not out.chat_model.exists()
    resumed = start("finetune", out.root)
    expected = finish("finetune", ref.root, uninterrupted)
    assert expected["steps"] == STEPS and expected["resumed_from_step"] == 0
    metrics = finish("finetune", out.root, resumed)
    assert metrics["steps"] == STEPS and metrics["resumed_from_step"] == killed_at

    # bit for bit: the merged model, the adapter, the losses
    merged, reference = (load_file(o.chat_model / "model.safetensors") for o in (out, ref))
    assert merged.keys() == reference.keys()
    assert all(torch.equal(merged[k], reference[k]) for k in reference), "the resumed weights differ"
    adapter, reference_adapter = (load_file(o.chat_adapter / "adapter_model.safetensors") for o in (out, ref))
    assert all(torch.equal(adapter[k], reference_adapter[k]) for k in reference_adapter)
    assert {k: metrics[k] for k in ("train_loss", "val_loss")} == {k: expected[k] for k in ("train_loss", "val_loss")}
    assert (out.finetune_plots / "val.csv").read_text() == (ref.finetune_plots / "val.csv").read_text()

    # the one MLflow run continued: its curves are the uninterrupted run's (steps redone log equal values again)
    client, found = mlflow_runs(out.root)
    assert len(found) == 1 and found[0].info.status == "FINISHED"
    run_id = found[0].info.run_id
    assert json.loads((out.chat_model / "quill_run.json").read_text())["mlflow_run_id"] == run_id
    ref_client, [ref_run] = mlflow_runs(ref.root)
    for name in ("train_loss", "val_loss"):
        history = client.get_metric_history(run_id, name)
        assert one_value_per_step(history), name
        expected_curve = {m.step: m.value for m in ref_client.get_metric_history(ref_run.info.run_id, name)}
        assert {m.step: m.value for m in history} == expected_curve, name
    assert sorted(expected_curve) == list(range(4, STEPS + 1, 4))  # val_loss at every validation step
