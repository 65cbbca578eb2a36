"""The eval suites, by name: each module has NAME, DESCRIPTION, THRESHOLDS and run(SuiteRun) → SuiteResult."""

from types import ModuleType

from dsarag.evals.suites import docqa, latency, niah, retrieval, routing, temporal, topk_sweep

SUITES: dict[str, ModuleType] = {
    suite.NAME: suite for suite in (niah, docqa, retrieval, routing, temporal, topk_sweep, latency)
}
