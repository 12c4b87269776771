"""How hard the fuzzers push, and the figures they report.

Each Hypothesis example draws a base input (a valid file, archive or header, shrinkable) and a seed, and the
test body then runs :data:`VARIANTS` inputs made from them by a seeded, fast mutator (``mutate.py``):
Hypothesis' own generation costs milliseconds per example here, the mutator microseconds per input.

``make test`` runs the property tests under the ``ci`` profile: a fixed set (``derandomize``) of
:data:`CI_EXAMPLES` examples x 2 variants each, so the run is quick and repeatable. ``make fuzz`` sets
``ALIGND_FUZZ_PROFILE=fuzz``: ``ALIGND_FUZZ_INPUTS`` random inputs per target (default 100,000, in examples of
50 variants) and ``ALIGND_FUZZ_API_CASES`` schemathesis cases per API operation and backend (default 1,000),
then writes the figures (see ``conftest.py``) to ``ALIGND_FUZZ_RESULTS``.json/.md.

Each target counts the inputs its body ran and how many of them raised. A raising input fails the test
(Hypothesis then shrinks it to a minimal one, re-running the body, so ``crashing_inputs`` counts those runs
too); ``failed`` in the figures is the test's own outcome.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, settings

CI_EXAMPLES = 200
PROFILE = os.environ.get("ALIGND_FUZZ_PROFILE", "ci")
FUZZING = PROFILE == "fuzz"
INPUTS_PER_TARGET = int(os.environ.get("ALIGND_FUZZ_INPUTS", "100000"))
VARIANTS = 50 if FUZZING else 2
FUZZ_EXAMPLES = -(-INPUTS_PER_TARGET // VARIANTS)
API_CASES = int(os.environ.get("ALIGND_FUZZ_API_CASES", "1000")) if FUZZING else 10

# Generated files and archives are big by Hypothesis' standards, and some inputs are slow on a busy machine.
_QUIET = [
    HealthCheck.too_slow,
    HealthCheck.data_too_large,
    HealthCheck.filter_too_much,
    HealthCheck.large_base_example,
]
settings.register_profile(
    "ci",
    max_examples=CI_EXAMPLES,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=_QUIET,
)
settings.register_profile(
    "fuzz", max_examples=FUZZ_EXAMPLES, deadline=None, database=None, suppress_health_check=_QUIET
)
FUZZ_SETTINGS = settings(settings.get_profile(PROFILE))


@dataclass
class Target:
    name: str
    inputs: int = 0
    crashing_inputs: int = 0
    server_errors: int = 0
    schema_violations: int = 0
    seconds: float = 0.0
    nodeids: set[str] = field(default_factory=set)
    failed: bool = False
    notes: list[str] = field(default_factory=list)
    _started: float = field(default_factory=time.monotonic)

    @contextlib.contextmanager
    def input(self) -> Iterator[None]:
        """Count one input; count it as crashing if the body raises (and re-raise)."""
        self.inputs += 1
        test = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0]
        if test:
            self.nodeids.add(test)
        try:
            yield
        except BaseException:
            self.crashing_inputs += 1
            raise
        finally:
            self.seconds = time.monotonic() - self._started

    def row(self) -> dict[str, Any]:
        return {
            "target": self.name,
            "inputs": self.inputs,
            "crashing_inputs": self.crashing_inputs,
            "server_errors_5xx": self.server_errors,
            "schema_violations": self.schema_violations,
            "failed": self.failed,
            "seconds": round(self.seconds, 1),
        }


TARGETS: dict[str, Target] = {}


def target(name: str) -> Target:
    """The figures of one fuzz target (created on first use)."""
    if name not in TARGETS:
        TARGETS[name] = Target(name)
    return TARGETS[name]


def scratch_dir(prefix: str) -> str:
    """A private folder for one fuzzer's files, removed at exit. In /dev/shm when there is one: opening and
    truncating a file costs ~1.3 ms on this machine's disk and ~0.03 ms in memory, which sets the pace."""
    shm = "/dev/shm"
    base = shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None
    path = tempfile.mkdtemp(prefix=prefix, dir=base)
    atexit.register(shutil.rmtree, path, True)
    return path
