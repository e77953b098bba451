import os
import sys

import pytest
from hypothesis import HealthCheck, settings

sys.path.insert(0, os.path.dirname(__file__))

settings.register_profile("ci", deadline=None, max_examples=60,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", deadline=None, max_examples=1000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def cluster_factory():
    """Start LocalClusters and guarantee they are torn down."""
    from cluster import LocalCluster
    made = []

    def make(num_workers=2, num_servers=1, **env):
        cluster = LocalCluster(num_workers, num_servers, **env)
        made.append(cluster)
        return cluster.start()

    yield make
    for cluster in made:
        cluster.close()
