"""The fuzz suite's options, services and report.

    pytest tests/fuzz                          # a sample (CI): --fuzz-examples 360 over every RPC
    pytest tests/fuzz --fuzz-examples 10000    # `make fuzz`

Every service is started once per session, on demand, in a fresh LLMP_HOME; each keeps a
companion thread sending its real request until the session ends. The report lists the calls
made per RPC and per status code.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest

from tests.fuzz.services import CALLS, Targets

DEFAULT_EXAMPLES = 360


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--fuzz-examples",
        type=int,
        default=DEFAULT_EXAMPLES,
        help="random calls in all, shared evenly by the RPCs of every service (default: a CI sample)",
    )


@pytest.fixture(scope="session")
def fuzz_examples(request: pytest.FixtureRequest) -> int:
    # The option is registered only when tests/fuzz is named on the command line (pytest reads
    # pytest_addoption from the conftests it starts with); a run of the whole tree gets the sample.
    return int(request.config.getoption("--fuzz-examples", default=DEFAULT_EXAMPLES))


@pytest.fixture(scope="session")
def targets(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Targets]:
    started = Targets(tmp_path_factory.mktemp("fuzz"))
    yield started
    started.close()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not CALLS:
        return
    write = terminalreporter.write_line
    by_rpc: Counter[str] = Counter()
    by_code: Counter[str] = Counter()
    for (rpc, code), n in CALLS.items():
        by_rpc[rpc] += n
        by_code[code] += n
    terminalreporter.section(f"fuzz: {sum(CALLS.values())} calls")
    for rpc in sorted(by_rpc):
        codes = ", ".join(f"{c} {n}" for (r, c), n in sorted(CALLS.items()) if r == rpc)
        write(f"{rpc:55s} {by_rpc[rpc]:6d}  ({codes})")
    write("by status: " + ", ".join(f"{code} {n}" for code, n in by_code.most_common()))
