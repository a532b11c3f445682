"""A cluster that starts its GPU nodes on demand (a GPU group scaled to zero, as in
cluster/aws.yaml and cluster/k8s/raycluster.yaml) still trains and labels on GPUs: the jobs
count the GPU nodes its autoscaler may start, from the node groups it publishes, as Ray Train
does. Here a CPU-only Ray stands in, with the autoscaler's record written by the test."""

import pytest
import ray
from ray._raylet import GCS_AUTOSCALER_CLUSTER_CONFIG_KEY, GCS_AUTOSCALER_STATE_NAMESPACE
from ray.core.generated import autoscaler_pb2
from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_put

from clf import runtime
from clf.config import LabelConfig
from clf.errors import UsageError
from clf.inference import stage


@pytest.fixture(scope="module")
def cpu_only_ray():
    ray.init(num_cpus=1, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.fixture
def node_groups(cpu_only_ray):
    """Publish node groups as the autoscaler of a `ray up` or KubeRay cluster does."""

    def publish(*groups: tuple[str, dict[str, float], int]) -> None:
        config = autoscaler_pb2.ClusterConfig(
            node_group_configs=[
                autoscaler_pb2.NodeGroupConfig(name=name, resources=resources, max_count=count)
                for name, resources, count in groups
            ]
        )
        _internal_kv_put(
            GCS_AUTOSCALER_CLUSTER_CONFIG_KEY,
            config.SerializeToString(),
            namespace=GCS_AUTOSCALER_STATE_NAMESPACE,
        )

    yield publish
    _internal_kv_del(GCS_AUTOSCALER_CLUSTER_CONFIG_KEY, namespace=GCS_AUTOSCALER_STATE_NAMESPACE)


def test_a_cpu_cluster_without_an_autoscaler_has_no_gpus(cpu_only_ray):
    assert runtime.gpu_nodes() == [] and not runtime.use_gpu("auto")
    with pytest.raises(UsageError, match="--device cuda: the Ray cluster has no GPUs"):
        runtime.use_gpu("cuda")


def test_gpu_nodes_the_autoscaler_may_start_count_as_the_clusters_gpus(node_groups):
    node_groups(
        ("cpu", {"CPU": 32}, 4),
        ("gpu", {"CPU": 48, "GPU": 4}, 2),
        ("gpu-off", {"GPU": 8}, 0),  # max 0: never started
    )
    assert runtime.use_gpu("auto") and runtime.use_gpu("cuda")
    assert runtime.cluster_gpus() == 8
    assert [runtime.gpu_actor_slots(share) for share in (1, 0.5, 4, 8)] == [8, 16, 2, 0]
    assert stage.pool_size(LabelConfig(), gpu=True) == 8  # created up front: scales to 2 nodes


def test_an_unbounded_gpu_group_counts_as_one_node(node_groups):
    node_groups(("gpu", {"GPU": 2}, -1))
    assert runtime.cluster_gpus() == 2 and runtime.gpu_actor_slots(1) == 2
