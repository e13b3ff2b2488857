"""bench/policy_time.py: every plan() and learning call of the replay is timed under the batch size it served."""

from bench import policy_time


def test_every_step_is_timed_by_its_batch_size():
    # Two workloads of three requests arriving within milliseconds; a draft that misses every fourth token.
    misses = [[i % 4 == 3 for i in range(12)] for _ in range(3)]
    times = policy_time.timed_replay({"a": misses, "b": misses}, rates=[1000.0], seeds=2, max_tokens=12)
    plans, outcomes, timings = times["plan"], times["observe_outcomes"], times["observe_timings"]
    assert set(plans) == set(outcomes) == set(timings) and set(plans) <= {1, 2, 3}
    # The first arrives alone (at 0), the others within milliseconds: they join it after its first step.
    assert 1 in plans and 3 in plans
    for batch in plans:
        assert len(plans[batch]) == len(outcomes[batch]) == len(timings[batch])  # one of each per step
        assert all(ms > 0 for ms in plans[batch] + outcomes[batch] + timings[batch])


def test_the_table_has_a_row_per_bucket_with_calls():
    times = {"plan": {1: [0.1, 0.3, 0.2], 7: [1.0]}, "observe_outcomes": {1: [0.05, 0.05, 0.05], 7: [0.5]},
             "observe_timings": {1: [0.2, 0.4, 0.3], 7: [0.7]}}
    rows = policy_time.table(times)
    # p90 interpolated as bench.serving's
    assert rows[2] == "| 1 | 3 | 0.200 | 0.280 | 0.050 | 0.050 | 0.300 | 0.380 |"
    assert rows[3] == "| 6-10 | 1 | 1.000 | 1.000 | 0.500 | 0.500 | 0.700 | 0.700 |"
    assert len(rows) == 4  # buckets without calls are left out
