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


def test_demand_that_fits_only_when_others_release_warns_once(local_ray, caplog):
    """A Serve app or another job holding CPUs made `ppcr batch` wait without a word; now it says why."""

    @ray.remote(num_cpus=2)
    class Holder:
        def ready(self):
            return True

    holder = Holder.remote()
    try:
        ray.get(holder.ready.remote())
        need = ray.cluster_resources()["CPU"] - 1  # fits the cluster, not what the holder leaves free
        with caplog.at_level("WARNING", logger="ppcr"):
            require_resources({"CPU": need}, "the batch job")
        warned = [r.getMessage() for r in caplog.records if r.name == "ppcr"]
        assert len(warned) == 1 and "the batch job waits for resources" in warned[0], warned
        assert f"CPU: needs {need:g}, " in warned[0] and " free now" in warned[0]
    finally:
        ray.kill(holder)
