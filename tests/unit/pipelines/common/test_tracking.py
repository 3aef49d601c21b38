"""The default MLflow store (the project's SQLite file, also from DVC's queued-experiment copies), registry URIs,
and runs a resumed stage continues."""

from pathlib import Path

import pytest

from pipelines.common.tracking import (
    DEFAULT_TRACKING_URI,
    continue_run,
    default_tracking_uri,
    get_or_create_experiment,
    mlflow_client,
    registered_version,
)


def test_default_store_is_relative_in_the_project(tmp_path: Path):
    assert default_tracking_uri(tmp_path) == DEFAULT_TRACKING_URI == "sqlite:///mlflow.db"


def test_a_queued_dvc_experiment_logs_into_the_projects_store(tmp_path: Path):
    """`dvc exp run --queue` runs stages in <project>/.dvc/tmp/exps/<tmp>/, which DVC deletes afterwards."""
    project = tmp_path / "proj"
    exp_copy = project / ".dvc" / "tmp" / "exps" / "tmpk3x9" / "sub"
    exp_copy.mkdir(parents=True)
    uri = default_tracking_uri(exp_copy)
    assert uri == f"sqlite:///{project.resolve() / 'mlflow.db'}"
    client = mlflow_client(uri)  # the absolute URI is a working store
    get_or_create_experiment(client)
    assert (project / "mlflow.db").is_file()


def test_a_registered_version_is_found_by_alias_number_or_newest(mlflow_uri: str):
    client = mlflow_client(mlflow_uri)
    client.create_registered_model("m")
    run = client.create_run(get_or_create_experiment(client))
    for _ in range(3):
        client.create_model_version("m", f"runs:/{run.info.run_id}/model", run.info.run_id)
    client.set_registered_model_alias("m", "champion", "2")
    assert [
        str(registered_version(client, uri).version) for uri in ("models:/m@champion", "models:/m/1", "models:/m")
    ] == [
        "2",
        "1",
        "3",
    ]
    for missing in ("models:/m@nope", "models:/m/9", "models:/other"):
        with pytest.raises(ValueError, match=f"{missing}: not found in the registry at {mlflow_uri}"):
            registered_version(client, missing)


def test_a_resumed_stage_continues_its_run_only_if_the_store_has_it(mlflow_uri: str):
    client = mlflow_client(mlflow_uri)
    run = client.create_run(get_or_create_experiment(client))
    client.set_terminated(run.info.run_id, "KILLED")
    assert continue_run(client, run.info.run_id) == run.info.run_id
    assert client.get_run(run.info.run_id).info.status == "RUNNING"
    assert continue_run(client, None) is None
    with pytest.warns(UserWarning, match="not in .*; logging to a new run"):
        assert continue_run(client, "0" * 32) is None
