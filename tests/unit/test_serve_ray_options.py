"""``nvembed serve --ray`` options: checked before Ray starts (no cluster here; the real deployment
is tests/integration/test_serve_ray.py)."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from nvembed_sdk.cli import main
from nvembed_sdk.errors import InputError
from nvembed_sdk.serve.ray_serve import deployment_options


def test_fixed_replicas_and_resources():
    opts = deployment_options(replicas=3, gpus_per_replica=0.5, cpus_per_replica=2, max_ongoing_requests=32)
    assert opts["num_replicas"] == 3 and "autoscaling_config" not in opts
    assert opts["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 0.5}
    assert opts["max_ongoing_requests"] == 32


def test_autoscaling_bounds():
    opts = deployment_options(min_replicas=1, max_replicas=4, max_ongoing_requests=64)
    assert "num_replicas" not in opts
    assert opts["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 32}


@pytest.mark.parametrize("kwargs, option", [
    ({"replicas": 0}, "--replicas"),
    ({"min_replicas": 3, "max_replicas": 2}, "--min-replicas"),
    ({"gpus_per_replica": -1}, "--gpus-per-replica"),
    ({"cpus_per_replica": 0}, "--cpus-per-replica"),
    ({"max_ongoing_requests": 0}, "--max-ongoing-requests"),
])
def test_bad_options_name_the_option(kwargs, option):
    with pytest.raises(InputError, match=option):
        deployment_options(**kwargs)


def test_cli_refuses_ray_options_without_ray(reference_dir):
    res = CliRunner().invoke(main, ["serve", str(reference_dir), "--replicas", "2"])
    assert res.exit_code == 1 and "add --ray" in res.output, res.output
