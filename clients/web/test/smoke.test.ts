import { test, expect } from "vitest";
import { create } from "@bufbuild/protobuf";
import { ClientFrameSchema } from "../../../gen/ts/threadline/v1/realtime_pb.js";

test("generated code loads", () => {
  const f = create(ClientFrameSchema, {});
  expect(f.kind.case).toBeUndefined();
});
