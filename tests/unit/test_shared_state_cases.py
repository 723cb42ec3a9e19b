"""The language-neutral client-state cases (tests/cases/client_state), run on the Python SDK.

The TypeScript SDK runs the same files (clients/web/test/state_cases.test.ts); both projections
of the state must equal the cases' expectations.
"""

from __future__ import annotations

import pytest

from tests.unit.client_state_cases import (
    LOCAL_ACTIONS,
    SERVER_KINDS,
    STEP_KINDS,
    Case,
    load_cases,
    run_case,
    survey,
)

CASES = load_cases()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_case(case: Case, monkeypatch: pytest.MonkeyPatch) -> None:
    run_case(case, monkeypatch)


def test_case_files_parse_and_use_only_handled_steps() -> None:
    assert len(CASES) >= 25
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)), "case names must be unique within a file"
    for case in CASES:
        survey(case)  # raises on an unknown step, action, frame kind or projection key


def test_every_action_frame_kind_and_step_kind_is_covered() -> None:
    actions: set[str] = set()
    frames: set[str] = set()
    steps: set[str] = set()
    for case in CASES:
        used = survey(case)
        actions |= used.actions
        frames |= used.frames
        steps |= used.steps
    assert actions == set(LOCAL_ACTIONS)
    assert frames == SERVER_KINDS
    assert steps == STEP_KINDS
