"""The default MLflow store: the project's SQLite file, also from DVC's queued-experiment copies."""

from pathlib import Path

from pipelines.common.tracking import (
    DEFAULT_TRACKING_URI,
    default_tracking_uri,
    get_or_create_experiment,
    mlflow_client,
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
