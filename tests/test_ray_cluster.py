import pytest
import ray

from ppcr.ray_cluster import ResourceError, init_ray, require_resources


@pytest.fixture(scope="module")
def local_ray(ray_local):
    return ray_local


def test_local_cluster_is_sized_as_asked(local_ray):
    assert local_ray["CPU"] == 4
    assert init_ray() == ray.cluster_resources()  # second call reuses the running cluster


def test_demand_that_fits_passes(local_ray):
    require_resources({"CPU": 3}, "job")


def test_demand_that_cannot_fit_names_the_shortfall(local_ray):
    with pytest.raises(
        ResourceError, match=r"training.*GPU: needs 2, cluster has 0.*CPU: needs 9, cluster has 4"
    ):
        require_resources({"GPU": 2, "CPU": 9}, "training")
