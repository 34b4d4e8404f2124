"""The C++ thread pool (csrc/thread_pool.cpp) under stress: thousands of back-to-back regions of random task counts on
pools of 2 to 8 threads, spinning and sleeping workers; every task must run exactly once, and a task that throws must
reach Python as an exception and leave the pool usable."""
import pytest

from fastgpt2.kernels import native

pytestmark = pytest.mark.skipif(not native.HAS_EXTENSION, reason="the C++ extension is not in use")

# Regions per case: the unfixed pool (a worker leaving a region could claim a task of the next, larger one) failed
# these eight cases in 8 of 14 runs of the file on 2 shared cores, more often when they were busy; the race needs a
# thread preempted at the wrong moment, so a clean run is evidence, not proof.
NUM_REGIONS = 100_000


@pytest.mark.parametrize("linger", [False, True], ids=["sleeping", "lingering"])
@pytest.mark.parametrize("num_threads", [2, 3, 4, 8])  # 4 and 8 oversubscribe a 2-core machine: more preemption
def test_every_task_runs_exactly_once(num_threads, linger):
    num_tasks, miscounted, early = native._C._thread_pool_stress(num_threads, NUM_REGIONS, 1000 + num_threads, linger)
    assert num_tasks > 50 * NUM_REGIONS  # half the regions have up to 300 tasks
    assert miscounted == 0, f"{miscounted} task indices ran other than once in {NUM_REGIONS} regions"
    assert early == 0, f"{early} regions returned before all their tasks finished"


def test_pool_rebuilt_between_sizes():
    for seed, num_threads in enumerate([2, 8, 3, 1, 4, 2]):
        assert native._C._thread_pool_stress(num_threads, 500, seed, seed % 2 == 0)[1:] == (0, 0)


# Region 0 has at most 16 tasks (possibly 1, which runs on the caller alone), region 101 up to 300 (several threads).
@pytest.mark.parametrize("throw_region", [0, 101])
@pytest.mark.parametrize("linger", [False, True], ids=["sleeping", "lingering"])
@pytest.mark.parametrize("num_threads", [1, 2, 8])
def test_task_exception_reaches_python(num_threads, linger, throw_region):
    # Every task of the region grows a thread_local buffer past any memory: std::bad_alloc on whichever threads run
    # them, which must neither terminate the process nor leave the region half accounted.
    with pytest.raises(MemoryError):
        native._C._thread_pool_stress(num_threads, 200, 7, linger, throw_region=throw_region)
    num_tasks, miscounted, early = native._C._thread_pool_stress(num_threads, 2_000, 8, linger)
    assert num_tasks > 0 and miscounted == 0 and early == 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_threads"):
        native._C._thread_pool_stress(0, 10, 0, False)
    with pytest.raises(ValueError, match="num_regions"):
        native._C._thread_pool_stress(2, -1, 0, False)
