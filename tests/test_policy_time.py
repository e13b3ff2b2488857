"""bench/policy_time.py: every plan() and observe() of the replay is timed under the batch size it served."""

from bench import policy_time


def test_every_step_is_timed_by_its_batch_size():
    # Two workloads of three requests arriving within milliseconds; a draft that misses every fourth token.
    misses = [[i % 4 == 3 for i in range(12)] for _ in range(3)]
    times = policy_time.timed_replay({"a": misses, "b": misses}, rates=[1000.0], seeds=2, max_tokens=12)
    plans, observes = times["plan"], times["observe"]
    assert set(plans) == set(observes) and set(plans) <= {1, 2, 3}
    # The first arrives alone (at 0), the others within milliseconds: they join it after its first step.
    assert 1 in plans and 3 in plans
    for batch in plans:
        assert len(plans[batch]) == len(observes[batch])  # one observe per plan
        assert all(ms > 0 for ms in plans[batch] + observes[batch])


def test_the_table_has_a_row_per_bucket_with_calls():
    times = {"plan": {1: [0.1, 0.3, 0.2], 7: [1.0]}, "observe": {1: [0.05, 0.05, 0.05], 7: [0.5]}}
    rows = policy_time.table(times)
    assert rows[2] == "| 1 | 3 | 0.200 | 0.280 | 0.050 | 0.050 |"  # p90 interpolated as bench.serving's
    assert rows[3] == "| 6-10 | 1 | 1.000 | 1.000 | 0.500 | 0.500 |"
    assert len(rows) == 4  # buckets without calls are left out
