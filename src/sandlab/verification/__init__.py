"""Shared code verification: a model's code run against test cases inside bubblewrap sandboxes.

``verify_code(response_or_code, tests, fn_name=None, timeout_s=..., memory_mb=...)`` for one solution,
``CodeVerifier(...).verify_many(items)`` for many in parallel sandboxes; used by the data stages
(``data.agreement.mode=tests``), the GRPO code reward and the code benchmarks. See
``docs/code_verification.md`` for the sandbox and the threat model.
"""

from sandlab.verification.extract import extract_code
from sandlab.verification.sandbox import SandboxUnavailable
from sandlab.verification.types import (
    FUNCTIONAL,
    INFRA_ERROR,
    MEMORY,
    NO_CODE,
    PASS,
    PROGRAM,
    RUNTIME_ERROR,
    SKIPPED,
    STATUSES,
    STDIN,
    TEST_TYPES,
    TIMEOUT,
    WRONG_ANSWER,
    CodeResult,
    TestCase,
)
from sandlab.verification.verify import CodeItem, CodeVerifier, verify_code

__all__ = [
    "FUNCTIONAL", "INFRA_ERROR", "MEMORY", "NO_CODE", "PASS", "PROGRAM", "RUNTIME_ERROR", "SKIPPED", "STATUSES", "STDIN", "TEST_TYPES",
    "TIMEOUT", "WRONG_ANSWER", "CodeItem", "CodeResult", "CodeVerifier", "SandboxUnavailable", "TestCase", "extract_code", "verify_code",
]
