"""pipelines/serve/cli.py: the local Ray has room for a rolling update of one model while both are served."""

from __future__ import annotations

import os

from pipelines.common.params import ServeParams
from pipelines.serve.cli import logical_cpus


def test_the_local_ray_fits_both_models_and_one_models_replacements():
    # one replica each of two models, one CPU each, and a replacement started before the old replica stops
    assert logical_cpus(ServeParams(num_cpus_per_replica=1, num_replicas=1)) == max(os.cpu_count() or 1, 3)
    assert logical_cpus(ServeParams(num_cpus_per_replica=2, num_replicas=3)) == max(os.cpu_count() or 1, 18)
    assert logical_cpus(ServeParams(num_cpus_per_replica=1, max_surge_percent=0)) == max(os.cpu_count() or 1, 2)
    autoscaled = ServeParams(num_cpus_per_replica=1, min_replicas=1, max_replicas=4)
    assert logical_cpus(autoscaled) == max(os.cpu_count() or 1, 12)
