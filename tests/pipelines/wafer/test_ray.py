import numpy as np
import pytest

ray = pytest.importorskip("ray")

from pipelines.wafer.batch import score_local, score_ray  # noqa: E402
from pipelines.wafer.maps import WaferReadError  # noqa: E402
from pipelines.wafer.scoring import WaferScorer  # noqa: E402
from pipelines.wafer.synth import generate  # noqa: E402


@pytest.mark.slow
def test_ray_engine_matches_local(wafer_checkpoint):
    """A local Ray with 2 CPUs; two scorer actors; every input once, in order, same numbers as the local engine."""
    items = list(generate(40, seed=21))
    items.insert(3, WaferReadError("bad", "bad.npy", "bad.npy: broken"))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    try:
        remote = list(score_ray(iter(items), wafer_checkpoint, batch_size=8, concurrency=2, chunk=25))
    finally:
        ray.shutdown()
    local = list(score_local(iter(items), WaferScorer(wafer_checkpoint), batch_size=8))
    assert [r.wafer_id for r in remote] == [r.wafer_id for r in local] == [i.wafer_id for i in items]
    assert [r.status for r in remote].count("error") == 1
    ok = [(a, b) for a, b in zip(remote, local) if a.status == "ok"]
    np.testing.assert_allclose([a.defect_score for a, _ in ok], [b.defect_score for _, b in ok], atol=1e-5)
    np.testing.assert_allclose([a.anomaly_score for a, _ in ok], [b.anomaly_score for _, b in ok], atol=1e-4)
    assert all(a.predicted_class == b.predicted_class for a, b in ok)
