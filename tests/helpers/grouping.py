"""Which tests run together on one xdist worker under `make test` (pytest -n 2 --dist loadgroup).

Each worker is a pytest session of its own: a session service (the Prefect server, the Ray cluster, the MLflow
server, the Run button's first run) starts on every worker that runs a test needing it, and a module's fixtures
are made on every worker that runs one of its tests. So the tests that share a service form one group, every
other module is a group of its own, and a group goes to one worker whole (tests/conftest.py's scheduler).

xdist's own `loadgroup` reads `xdist_group` marks by rewriting node ids, which pytest 9 no longer allows; the
controller that schedules only sees node ids, so the groups are written here by node id, and `check` fails the
collection when a test needs a service but is not in that service's group (add it to GROUPS)."""

from __future__ import annotations

# the fixtures that start a shared service (tests/conftest.py) -> the group of the tests that use them
SERVICES = {
    "pipeline": {"champion", "finished_workspace", "flow_stack", "prefect"},
    "ray": {"shared_ray"},
    "mlflow-server": {"mlflow_http"},
}

# node id prefix -> group; the longest prefix that matches wins
GROUPS = {
    "tests/integration/test_flows.py": "pipeline",
    "tests/integration/test_make_run.py": "pipeline",
    "tests/integration/test_setup_documented.py": "pipeline",
    "tests/integration/test_compose.py::test_the_prefect_service_command_answers": "pipeline",
    "tests/integration/test_environment.py::test_prefect_server_starts_and_answers": "pipeline",
    "tests/integration/test_serve.py": "ray",
    "tests/integration/test_serve_lm_eval.py": "ray",
    "tests/integration/test_data_engines.py": "ray",
    "tests/integration/test_compose.py::test_the_ray_head_command_starts_a_cluster": "ray",
    "tests/integration/test_register.py": "mlflow-server",
    "tests/integration/test_compose.py::test_the_mlflow_service_command_serves_artifacts_behind_basic_auth": (
        "mlflow-server"
    ),
    "tests/integration/test_compose.py::test_the_mlflow_users_one_shot_lets_the_worker_write_and_the_ray_head_only_read": (
        "mlflow-server"
    ),
}

# the longest groups start first, so that no worker is left with one at the end
FIRST = ("pipeline", "ray")


def group_of(nodeid: str) -> str:
    """The test's group: its entry in GROUPS, else its module."""
    matches = [prefix for prefix in GROUPS if nodeid == prefix or nodeid.startswith((prefix + "::", prefix + "["))]
    return GROUPS[max(matches, key=len)] if matches else nodeid.split("::")[0]


def needed_group(fixturenames: list[str]) -> str | None:
    """The group of the service a test's fixtures start, if any."""
    return next((group for group, fixtures in SERVICES.items() if fixtures & set(fixturenames)), None)


def check(nodeid: str, fixturenames: list[str]) -> str | None:
    """Why the test is in the wrong group (None when it is not)."""
    needed = needed_group(fixturenames)
    if needed and group_of(nodeid) != needed:
        return (
            f"{nodeid} uses the {needed!r} services but is in group {group_of(nodeid)!r}: "
            f"add it (or its module) to GROUPS in tests/helpers/grouping.py"
        )
    return None


def start_order(nodeid: str) -> int:
    """Sort key: the FIRST groups, in that order, then the rest."""
    group = group_of(nodeid)
    return FIRST.index(group) if group in FIRST else len(FIRST)
