// The language-neutral client-state cases (tests/cases/client_state), run on the TypeScript SDK.
// The Python SDK runs the same files (tests/unit/test_shared_state_cases.py); both projections of
// the state must equal the cases' expectations.

import { describe, expect, test } from "vitest";
import { LOCAL_ACTIONS, loadCases, runCase, SERVER_KINDS, STEP_KINDS, survey } from "./state_driver.js";

const cases = loadCases();
const files = [...new Set(cases.map((c) => c.file))];

for (const file of files) {
  describe(file, () => {
    for (const testCase of cases.filter((c) => c.file === file)) {
      test(testCase.name, () => {
        runCase(testCase);
      });
    }
  });
}

test("case files parse and use only handled steps, actions and frame kinds", () => {
  expect(cases.length).toBeGreaterThanOrEqual(25);
  const ids = cases.map((c) => `${c.file}::${c.name}`);
  expect(new Set(ids).size).toBe(ids.length);
  for (const testCase of cases) survey(testCase); // throws on anything unknown
});

test("every action, frame kind and step kind is covered by some case", () => {
  const actions = new Set<string>();
  const frames = new Set<string>();
  const steps = new Set<string>();
  for (const testCase of cases) {
    const used = survey(testCase);
    used.actions.forEach((a) => actions.add(a));
    used.frames.forEach((f) => frames.add(f));
    used.steps.forEach((s) => steps.add(s));
  }
  expect([...actions].sort()).toEqual(Object.keys(LOCAL_ACTIONS).sort());
  expect([...frames].sort()).toEqual([...SERVER_KINDS].sort());
  expect([...steps].sort()).toEqual([...STEP_KINDS].sort());
});
