"""Workers undo the allocator setting Dask's nanny gives them (MALLOC_TRIM_THRESHOLD_=65536), which
would page-fault every large temporary array of the stages on every use."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

PROBE = textwrap.dedent("""
    import resource, sys
    import numpy as np
    from pipeline.cluster import tune_malloc
    if sys.argv[1] == "tuned":
        assert tune_malloc()
    a = np.ones(1 << 20)  # 8 MB, once, so the heap has grown
    del a
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(40):
        a = np.ones(1 << 20)
        del a
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
""")


def _faults(mode: str) -> int:
    env = {**os.environ, "MALLOC_TRIM_THRESHOLD_": "65536"}  # what Dask's nanny sets
    out = subprocess.run([sys.executable, "-c", PROBE, mode], env=env, capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


def test_tuned_workers_reuse_freed_arrays_instead_of_faulting_them_in_again():
    untuned, tuned = _faults("plain"), _faults("tuned")
    # 40 x 8 MB faulted in again without the tuning (~20k faults here, the kernel maps a few pages
    # per fault); almost none with it
    assert untuned > 40 * 200, untuned
    assert tuned < untuned / 20, (tuned, untuned)
