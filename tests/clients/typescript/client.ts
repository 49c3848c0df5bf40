// A service's use of optrack through a client generated from its OpenAPI document:
// `openapi-typescript` writes api.d.ts from /api/v1/openapi.json, `openapi-fetch` sends the
// requests. Compiled with `tsc --strict`: a field the document does not type is a compile error.
//
//   node out/client.js BASE_URL TOKEN ID...
import createClient from "openapi-fetch";
import type { components, paths } from "./api.js";

type Operation = components["schemas"]["OperationRecord"];
type ErrorEntry = components["schemas"]["ErrorEntry"];

const [baseUrl, token, ...ids] = process.argv.slice(2);
if (!baseUrl || !token || ids.length === 0) throw new Error("usage: client.js BASE_URL TOKEN ID...");
const optrack = createClient<paths>({ baseUrl, headers: { Authorization: `Bearer ${token}` } });

const tracked = await optrack.POST("/api/v1/operations", { body: { ids } });
if (!tracked.data) throw new Error(`track: HTTP ${tracked.response.status}`);
const added: string[] = tracked.data.added;

const records: Operation[] = [];
for (const id of ids) {
  const one = await optrack.GET("/api/v1/operations/{operation_id}", {
    params: { path: { operation_id: id } },
  });
  if (!one.data) throw new Error(`get ${id}: HTTP ${one.response.status}`);
  records.push(one.data);
}

const page = await optrack.GET("/api/v1/operations", { params: { query: { limit: 100 } } });
const listed: string[] = (page.data?.operations ?? []).map((op) => op.id);

const bad = await optrack.POST("/api/v1/operations", { body: { ids: ["not-an-operation"] } });
const errors: ErrorEntry[] = bad.error?.errors ?? [];

const unknown = await optrack.GET("/api/v1/operations/{operation_id}", {
  params: { path: { operation_id: "comms_operation_01h9krwprkeee8fzqspvwy6nq8" } },
});

const health = await optrack.GET("/healthz");

console.log(
  JSON.stringify({
    added,
    statuses: records.map((op) => op.status),
    next_poll_at: records.map((op) => op.next_poll_at),
    listed,
    bad: { status: bad.response.status, reasons: errors.map((e) => e.reason), index: errors[0]?.index, id: errors[0]?.id },
    unknown: { status: unknown.response.status, reason: unknown.error?.errors[0]?.reason },
    health: health.response.status,
  }),
);
